"""Moving models between comet_ds and the CoMeT paper's code (its checkpoint layout, not its code).

The paper's checkpoints are a Qwen3 `save_pretrained` directory whose config.json adds the CoMeT fields
(chunk_size, placeholder_id, temp_beacon_id, temp_beacon_stride, temp_mem_budget, global_beacon_ids) and whose
weights name each decoder layer `model.layers.<i>.inner_layer.*` next to its memory networks
`…global_memory_net.*` and `…temp_memory_net.*`; the vocabulary is padded to a multiple of 256 and every token id
keeps its meaning both ways. Weights are read from safetensors files only (a pickle is never loaded).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from comet_ds.config import CheckpointMismatchError, CometConfig, CometInputError, CometTokens
from comet_ds.modeling.finetune import FinetuneSettings
from comet_ds.modeling.model import CometForCausalLM
from comet_ds.modeling.pretrained import export_inputs, load_merged, read_meta, write_comet
from comet_ds.modeling.tokens import PLACEHOLDER_TOKEN, TEMP_BEACON_TOKEN, global_beacon_token
from data_prep.fs import check_output, output_directory

IMPORT = "comet-ds import-official"
EXPORT_OFFICIAL = "comet-ds export --format official"
COMET_FIELDS = ("chunk_size", "placeholder_id", "temp_beacon_id", "temp_beacon_stride", "temp_mem_budget",
                "global_beacon_ids")
VOCAB_MULTIPLE = 256
OFFICIAL_RANK = 8  # the paper's memory networks have a fixed rank-8 bottleneck
OFFICIAL_WEIGHTS = "model.safetensors"
# our LayerMemory parameter → the paper's name for it, both under a layer
MEMORY_NAMES = {
    "global_memory.norm.weight": "global_memory_net.norm.weight",
    "global_memory.gate.weight": "global_memory_net.g_proj.weight",
    "global_memory.adapter.down.weight": "global_memory_net.o_proj.down_proj.weight",
    "global_memory.adapter.up.weight": "global_memory_net.o_proj.up_proj.weight",
    "temp_memory.norm.weight": "temp_memory_net.0.weight",
    "temp_memory.adapter.down.weight": "temp_memory_net.1.down_proj.weight",
    "temp_memory.adapter.up.weight": "temp_memory_net.1.up_proj.weight",
}
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def import_official(checkpoint: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the paper's checkpoint directory `checkpoint` as a comet_ds model directory `out` (a full model:
    it loads with `comet-ds generate` and `comet-ds eval`, or seeds training with init_from)."""
    checkpoint = Path(checkpoint)
    fields = _official_config(checkpoint)
    check_output(out, IMPORT, overwrite=overwrite, inputs=[checkpoint])  # before loading: a refusal costs no time
    state = _read_weights(checkpoint)
    memory = {k: v for k, v in state.items() if ".global_memory_net." in k or ".temp_memory_net." in k}
    backbone_state = {k.replace(".inner_layer.", "."): v for k, v in state.items() if k not in memory}
    down = memory.get("model.layers.0.global_memory_net.o_proj.down_proj.weight")
    if down is None:
        raise CheckpointMismatchError(f"{checkpoint} has no global memory weights "
                                      "(model.layers.0.global_memory_net.*): is it a CoMeT checkpoint?")
    comet = CometConfig(chunk_size=fields["chunk_size"], global_slots=len(fields["global_beacon_ids"]),
                        temp_stride=fields["temp_beacon_stride"], temp_budget=fields["temp_mem_budget"],
                        bottleneck_rank=down.shape[0])

    hf_config = AutoConfig.from_pretrained(checkpoint)
    for name in COMET_FIELDS:
        delattr(hf_config, name)
    hf_config.architectures = ["Qwen3ForCausalLM"]
    backbone = AutoModelForCausalLM.from_config(hf_config, dtype=down.dtype, attn_implementation="sdpa")
    result = backbone.load_state_dict(backbone_state, strict=False)
    tied = {"lm_head.weight"} if hf_config.tie_word_embeddings else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise CheckpointMismatchError(f"{checkpoint}: the weights do not fit its config.json's model: missing "
                                      f"{sorted(set(result.missing_keys) - tied)[:3]}, unexpected "
                                      f"{sorted(result.unexpected_keys)[:3]}")
    backbone.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    tokens = _official_tokens(checkpoint, fields, tokenizer, hf_config.pad_token_id)
    model = CometForCausalLM(backbone, comet, tokens)
    ours = {f"layers.{i}.memory.{name}": memory.get(f"model.layers.{i}.{official}")
            for i in range(len(model.layers)) for name, official in MEMORY_NAMES.items()
            if comet.temp_enabled or not name.startswith("temp_")}
    if missing := [name for name, tensor in ours.items() if tensor is None]:
        raise CheckpointMismatchError(f"{checkpoint} lacks memory weights for {len(missing)} tensors, e.g. "
                                      f"{missing[0]} (model.layers.<i>.global_memory_net / temp_memory_net)")
    ours["embedding.new_rows"] = backbone.get_input_embeddings().weight.detach()[list(tokens.inserted_ids)]
    model.load_comet_state_dict(ours, source=str(checkpoint))
    with output_directory(out, IMPORT, overwrite=overwrite, inputs=[checkpoint]) as scratch:
        write_comet(model, tokenizer, scratch, FinetuneSettings(method="full"), base_model=None)
    return Path(out)


def export_official(path: str | Path, out: str | Path, base_model: str | Path | None = None,
                    allow_base_mismatch: bool = False, overwrite: bool = False) -> Path:
    """Write the CoMeT model directory `path` (LoRA merged in) in the paper's checkpoint layout."""
    inputs = export_inputs(path, base_model)
    meta = read_meta(path)  # what the paper's code cannot run is refused before anything loads
    if (model_type := meta["fingerprint"]["model_type"]) != "qwen3":
        raise CometInputError(f"the paper's code runs Qwen3 models only; this one is a {model_type}")
    if (rank := meta["comet"]["bottleneck_rank"]) != OFFICIAL_RANK:
        raise CometInputError(f"the paper's memory networks have rank {OFFICIAL_RANK}; this model's "
                              f"comet.bottleneck_rank is {rank}")
    check_output(out, EXPORT_OFFICIAL, overwrite=overwrite, inputs=inputs)
    model, tokenizer = load_merged(path, base_model, allow_base_mismatch)
    backbone, config, tokens = model.backbone, model.config, model.tokens
    state = {}
    for name, tensor in backbone.state_dict().items():
        layer = _LAYER.fullmatch(name)
        state[f"model.layers.{layer[1]}.inner_layer.{layer[2]}" if layer else name] = tensor
    for i, layer in enumerate(model.layers):
        for name, tensor in layer.memory.state_dict().items():
            state[f"model.layers.{i}.{MEMORY_NAMES[name]}"] = tensor
    vocab = -(-state["model.embed_tokens.weight"].shape[0] // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in state:  # rows past the tokenizer's are never used: the mean row, as a resize would give
            rows = state[name]
            state[name] = torch.cat([rows, rows.mean(0, keepdim=True).expand(vocab - rows.shape[0], -1)])
    if backbone.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    hf = backbone.config.to_dict()
    hf.update(vocab_size=vocab, pad_token_id=tokens.pad_id, architectures=["MemQwen3ForCausalLM"],
              chunk_size=config.chunk_size, placeholder_id=tokens.placeholder_id,
              temp_beacon_id=tokens.temp_beacon_id, temp_beacon_stride=config.temp_stride,
              temp_mem_budget=config.temp_budget, global_beacon_ids=list(tokens.global_beacon_ids))
    with output_directory(out, EXPORT_OFFICIAL, overwrite=overwrite, inputs=inputs) as scratch:
        save_file({k: v.detach().contiguous() for k, v in state.items()}, scratch / OFFICIAL_WEIGHTS,
                  metadata={"format": "pt"})
        (scratch / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
        tokenizer.save_pretrained(scratch)
    return Path(out)


def _official_config(checkpoint: Path) -> dict:
    """The CoMeT fields of the checkpoint's config.json, refused with what is wrong before anything loads."""
    file = checkpoint / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{checkpoint} has no config.json: pass the directory the paper's code saved")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CometInputError(f"{file} is not valid JSON ({err})") from None
    if missing := [name for name in COMET_FIELDS if name not in config]:
        raise CometInputError(f"{file} lacks the CoMeT fields {', '.join(missing)}: is it a checkpoint of the "
                              "paper's code?")
    if config.get("model_type") != "qwen3":
        raise CometInputError(f"{file}: the paper's checkpoints are Qwen3 models (model_type 'qwen3'), this one is "
                              f"{config.get('model_type')!r}")
    if not config["global_beacon_ids"]:
        raise CometInputError(f"{file}: global_beacon_ids is empty (no global memory); comet_ds models always "
                              "carry one")
    return config


def _read_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    index = checkpoint / f"{OFFICIAL_WEIGHTS}.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    elif (checkpoint / OFFICIAL_WEIGHTS).is_file():
        files = [OFFICIAL_WEIGHTS]
    else:
        raise FileNotFoundError(f"{checkpoint} has no {OFFICIAL_WEIGHTS} (nor its .index.json): comet_ds reads "
                                "safetensors only, never a pickle; save the model with safe_serialization=True")
    state = {}
    for name in files:
        try:
            state.update(load_file(checkpoint / name))
        except (SafetensorError, OSError) as err:
            raise CheckpointMismatchError(f"{checkpoint / name} cannot be read ({err})") from None
    return state


def _official_tokens(checkpoint: Path, fields: dict, tokenizer: PreTrainedTokenizerBase,
                     pad_id: int | None) -> CometTokens:
    """The checkpoint's inserted-token ids, checked against its tokenizer (each id names the token it should)."""
    ids = [fields["placeholder_id"], fields["temp_beacon_id"], *fields["global_beacon_ids"]]
    names = [PLACEHOLDER_TOKEN, TEMP_BEACON_TOKEN,
             *(global_beacon_token(i) for i in range(len(fields["global_beacon_ids"])))]
    found = tokenizer.convert_ids_to_tokens(ids)
    if wrong := [(i, name, got) for i, name, got in zip(ids, names, found) if got != name]:
        i, name, got = wrong[0]
        raise CheckpointMismatchError(f"{checkpoint}: config.json gives id {i} for {name}, but its tokenizer has "
                                      f"{got!r} there ({len(wrong)} such id(s))")
    pad_id = next((i for i in (pad_id, tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), None)
    if pad_id is None:
        raise CometInputError(f"{checkpoint}: neither config.json nor the tokenizer names a pad or eos token")
    return CometTokens(placeholder_id=ids[0], temp_beacon_id=ids[1], global_beacon_ids=tuple(ids[2:]), pad_id=pad_id,
                       names=tuple(names))
