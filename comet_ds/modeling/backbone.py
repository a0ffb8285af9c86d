"""Loading a Hugging Face decoder-only model and checking that CoMeT can wrap it."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from comet_ds.config import CometConfig, CometConfigError, CometInputError


class UnsupportedModelError(CometInputError):
    """The base model's structure does not fit the CoMeT layer wrapper."""


@dataclass(frozen=True)
class DecoderParts:
    """The pieces of an HF causal LM that CoMeT reassembles chunk by chunk."""

    embed_tokens: nn.Embedding
    layers: nn.ModuleList
    norm: nn.Module
    lm_head: nn.Linear
    rotary_emb: nn.Module


def decoder_parts(model: PreTrainedModel) -> DecoderParts:
    """Split an HF causal LM into embedding, decoder layers, final norm, head and rotary embedding."""
    kind = getattr(model.config, "model_type", type(model).__name__)
    decoder = getattr(model, "model", None)
    missing = [name for name in ("embed_tokens", "layers", "norm", "rotary_emb")
               if decoder is None or not hasattr(decoder, name)]
    if not hasattr(model, "lm_head"):
        missing.append("lm_head")
    if missing:
        raise UnsupportedModelError(
            f"model type {kind!r} is not supported: it lacks {', '.join(missing)}; CoMeT wraps decoder-only "
            "models laid out like Llama, Qwen2/Qwen3 and Mistral (model.embed_tokens, model.layers, model.norm, "
            "model.rotary_emb, lm_head)")
    if getattr(model.lm_head, "bias", None) is not None:
        raise UnsupportedModelError(f"model type {kind!r} is not supported: its LM head has a bias")
    params = inspect.signature(decoder.layers[0].forward).parameters
    for needed in ("hidden_states", "attention_mask", "position_embeddings"):
        if needed not in params:
            raise UnsupportedModelError(
                f"model type {kind!r} is not supported: its decoder layers do not take {needed!r}")
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation != "sdpa":
        # the chunk's mask is None (causal) or boolean (comet_ds.modeling.layer.chunk_attention_mask), which
        # only sdpa reads as meant: eager attention would add a boolean mask and skip causality without one
        raise UnsupportedModelError(
            f"the base model runs {implementation!r} attention; CoMeT needs 'sdpa': load it with "
            "attn_implementation='sdpa'")
    layer_types = getattr(model.config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise UnsupportedModelError(
            f"model type {kind!r} has non-full-attention layers ({sorted(set(layer_types))}); CoMeT builds its own "
            "chunk-local masks and supports full-attention layers only")
    return DecoderParts(decoder.embed_tokens, decoder.layers, decoder.norm, model.lm_head, decoder.rotary_emb)


def cache_keyword(decoder_layer: nn.Module) -> str:
    """The decoder layer's keyword for its KV cache: `cache` in newer transformers releases,
    `past_key_values` in older ones (a wrong keyword would be swallowed by **kwargs, silently)."""
    params = inspect.signature(decoder_layer.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def check_fits(model: PreTrainedModel, config: CometConfig) -> None:
    """Reject CoMeT settings the base model cannot run: one clear line each."""
    hf = model.config
    config.check_hidden_size(hf.hidden_size)
    limit = getattr(hf, "max_position_embeddings", None)
    if limit is not None and config.chunk_length > limit:
        raise CometConfigError(
            f"a laid-out chunk is {config.chunk_length} tokens (chunk_size + beacons + 2*global_slots + "
            f"temp_budget) but the base model supports {limit} positions; lower chunk_size, global_slots or "
            "temp_budget")
    window = getattr(hf, "sliding_window", None)
    if window is not None and getattr(hf, "use_sliding_window", True) and config.chunk_length > window:
        raise CometConfigError(
            f"a laid-out chunk is {config.chunk_length} tokens but the base model attends within a sliding "
            f"window of {window}; lower chunk_size, global_slots or temp_budget to fit the window")


def load_backbone(path: str | Path, dtype: torch.dtype = torch.float32,
                  attn_implementation: str = "sdpa") -> PreTrainedModel:
    """Load an HF causal LM from a local directory, with an error that says what is missing."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"base model directory {str(path)!r} has no config.json; pass a local directory written by "
            "save_pretrained (comet-ds init-base --out DIR builds a tiny one)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    decoder_parts(model)
    return model
