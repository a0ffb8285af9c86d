"""Building a CoMeT model from a base model directory, and saving, loading and exporting it.

A CoMeT model directory holds:
    comet_config.json          CoMeT config, token ids, fine-tune settings, base model, shape fingerprint
    comet_memory.safetensors   memory networks and the rows of the inserted tokens
    adapter_config.json        standard PEFT LoRA adapter (LoRA runs only), loadable with
    adapter_model.safetensors  peft.PeftModel.from_pretrained(base, dir)
    config.json, model*.safetensors   the whole backbone (full fine-tunes and merged exports only)
    tokenizer files            the tokenizer with the CoMeT tokens added
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from comet_ds.config import CheckpointMismatchError, CometConfig, CometTokens
from comet_ds.fs import atomic_directory
from comet_ds.modeling.backbone import load_backbone
from comet_ds.modeling.finetune import FinetuneSettings, apply_finetune
from comet_ds.modeling.model import CometForCausalLM
from comet_ds.modeling.tokens import extend_tokenizer

COMET_CONFIG = "comet_config.json"
MEMORY_WEIGHTS = "comet_memory.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # key prefix PeftModel uses for adapter weights
FORMAT_VERSION = 1


def fit_vocabulary(backbone: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, mean_resizing: bool) -> None:
    """Grow the embedding (and head) so every tokenizer id has a row."""
    if len(tokenizer) > backbone.get_input_embeddings().num_embeddings:
        backbone.resize_token_embeddings(len(tokenizer), mean_resizing=mean_resizing)


def build_comet(base_model: str | Path, config: CometConfig, settings: FinetuneSettings | None = None,
                dtype: torch.dtype = torch.float32) -> tuple[CometForCausalLM, PreTrainedTokenizerBase]:
    """A fresh CoMeT model on a pretrained base: tokenizer extended, memories initialised."""
    settings = settings or FinetuneSettings()
    base_model = str(Path(base_model).absolute())
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    tokens = extend_tokenizer(tokenizer, config)
    backbone = load_backbone(base_model, dtype)
    fit_vocabulary(backbone, tokenizer, mean_resizing=True)  # new rows start at the mean embedding
    model = CometForCausalLM(backbone, config, tokens)
    apply_finetune(model, settings, base_model)
    return model, tokenizer


def _fingerprint(hf: PretrainedConfig) -> dict[str, Any]:
    return {"model_type": hf.model_type, "hidden_size": hf.hidden_size, "num_hidden_layers": hf.num_hidden_layers}


def write_comet(model: CometForCausalLM, tokenizer: PreTrainedTokenizerBase, out: Path,
                settings: FinetuneSettings, base_model: str | None) -> None:
    """Write a CoMeT model directory into `out` (an existing, empty directory).

    base_model=None stores the whole backbone in `out` (full fine-tunes, merged exports).
    """
    meta = {"format_version": FORMAT_VERSION, "comet": model.config.to_dict(), "tokens": model.tokens.to_dict(),
            "finetune": settings.to_dict(), "base_model": base_model,
            "fingerprint": _fingerprint(model.backbone.config)}
    (out / COMET_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    save_file({k: v.detach().contiguous() for k, v in model.comet_state_dict().items()}, out / MEMORY_WEIGHTS)
    if base_model is None:
        model.backbone.save_pretrained(out)
    elif settings.method == "lora":
        settings.lora_config(base_model).save_pretrained(out)
        adapter = get_peft_model_state_dict(model.backbone, save_embedding_layers=False)
        save_file({PEFT_PREFIX + k: v.detach().contiguous() for k, v in adapter.items()}, out / ADAPTER_WEIGHTS)
    else:
        raise ValueError("a full fine-tune stores its backbone: call with base_model=None")
    tokenizer.save_pretrained(out)


def save_comet(model: CometForCausalLM, tokenizer: PreTrainedTokenizerBase, out: str | Path,
               settings: FinetuneSettings, base_model: str | None) -> Path:
    """Atomically (re)write the CoMeT model directory `out`."""
    if settings.method == "full":
        base_model = None
    with atomic_directory(out) as scratch:
        write_comet(model, tokenizer, scratch, settings, base_model)
    return Path(out)


def read_meta(path: str | Path) -> dict[str, Any]:
    file = Path(path) / COMET_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a CoMeT model directory (no {COMET_CONFIG}); "
                                "pass a directory written by comet-ds (a checkpoint's adapter or an export)")
    meta = json.loads(file.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointMismatchError(f"{file}: format version {meta.get('format_version')!r} is not supported "
                                      f"by this comet_ds (expects {FORMAT_VERSION})")
    return meta


def check_continuable(path: str | Path, config: CometConfig, settings: FinetuneSettings,
                      base_config: PretrainedConfig) -> None:
    """Raise unless training can start from the CoMeT model directory `path` with these settings: the
    same chunk layout and memories, the same fine-tune shape, a base of the same shape."""
    meta = read_meta(path)
    # settings that only steer optimisation may change from one stage to the next
    free = {"memory_lr_multiplier", "lora_dropout"}
    for what, saved, wanted in (("comet", meta["comet"], config.to_dict()),
                                ("finetune", meta["finetune"], settings.to_dict()),
                                ("base model shape", meta["fingerprint"], _fingerprint(base_config))):
        differ = sorted(k for k in saved.keys() | wanted.keys() if k not in free and saved.get(k) != wanted.get(k))
        if differ:
            raise CheckpointMismatchError(
                f"init_from {str(path)!r} cannot seed this run: its {what} differs in "
                + ", ".join(f"{k} ({saved.get(k)!r} there, {wanted.get(k)!r} here)" for k in differ))


def load_comet(path: str | Path, base_model: str | Path | None = None, dtype: torch.dtype = torch.float32,
               ) -> tuple[CometForCausalLM, PreTrainedTokenizerBase, FinetuneSettings]:
    """Load a CoMeT model directory onto its base (or the base given here) and restore all weights."""
    path = Path(path)
    meta = read_meta(path)
    settings = FinetuneSettings.from_dict(meta["finetune"])
    config, tokens = CometConfig.from_dict(meta["comet"]), CometTokens.from_dict(meta["tokens"])
    base = path if meta["base_model"] is None else Path(base_model or meta["base_model"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    backbone = load_backbone(base, dtype)
    found = _fingerprint(backbone.config)
    if found != meta["fingerprint"]:
        raise CheckpointMismatchError(
            f"{path} was trained on a base with {meta['fingerprint']} but {base} has {found}; "
            "load it onto the base model it was trained from")
    fit_vocabulary(backbone, tokenizer, mean_resizing=False)  # inserted rows come from the checkpoint
    model = CometForCausalLM(backbone, config, tokens)
    if meta["base_model"] is not None:  # LoRA: inject adapters, then fill them
        apply_finetune(model, settings, str(base))
        adapter = load_file(path / ADAPTER_WEIGHTS)
        result = set_peft_model_state_dict(
            model.backbone, {k.removeprefix(PEFT_PREFIX): v for k, v in adapter.items()})
        if result.unexpected_keys:
            raise CheckpointMismatchError(f"{path / ADAPTER_WEIGHTS} has weights this base model has no place "
                                          f"for: {result.unexpected_keys[:3]}")
    else:
        apply_finetune(model, settings)
    model.load_comet_state_dict(load_file(path / MEMORY_WEIGHTS), source=str(path / MEMORY_WEIGHTS))
    return model, tokenizer, settings


def export_merged(path: str | Path, out: str | Path, base_model: str | Path | None = None) -> Path:
    """Write a standalone model directory: LoRA merged into the base weights, inserted rows written in.

    The LoRA weights are merged by peft itself (PeftModel.from_pretrained + merge_and_unload), so this
    also proves the adapter files are standard PEFT.
    """
    path = Path(path)
    meta = read_meta(path)
    if meta["base_model"] is None:
        model, tokenizer, _ = load_comet(path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path)
        backbone = load_backbone(base_model or meta["base_model"])
        fit_vocabulary(backbone, tokenizer, mean_resizing=False)
        merged = PeftModel.from_pretrained(backbone, path).merge_and_unload()
        model = CometForCausalLM(merged, CometConfig.from_dict(meta["comet"]), CometTokens.from_dict(meta["tokens"]))
        model.load_comet_state_dict(load_file(path / MEMORY_WEIGHTS), source=str(path / MEMORY_WEIGHTS))
    model.embedding.write_into_base()
    return save_comet(model, tokenizer, out, FinetuneSettings(method="full"), base_model=None)
