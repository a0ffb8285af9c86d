"""Building a CoMeT model from a base model directory, and saving, loading and exporting it.

A CoMeT model directory holds:
    comet_config.json          CoMeT config, token ids, fine-tune settings, base model, its shape and
                               the sha256 of its weight files
    comet_memory.safetensors   memory networks and the rows of the inserted tokens
    adapter_config.json        standard PEFT LoRA adapter (LoRA runs only), loadable with
    adapter_model.safetensors  peft.PeftModel.from_pretrained(base, dir)
    config.json, model*.safetensors   the whole backbone (full fine-tunes and merged exports only)
    tokenizer files            the tokenizer with the CoMeT tokens added
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from comet_ds.config import CheckpointMismatchError, CometConfig, CometTokens
from comet_ds.modeling.backbone import load_backbone
from comet_ds.modeling.finetune import FinetuneSettings, apply_finetune
from comet_ds.modeling.model import CometForCausalLM
from comet_ds.modeling.tokens import extend_tokenizer
from data_prep.fs import atomic_directory, check_output, file_sha256, output_directory

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


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "comet_ds"


def _file_sha256(path: Path, cache: dict[str, dict[str, Any]]) -> str:
    """sha256 of a file, streamed; reused from `cache` while its size and modification time stay the same."""
    stat = path.stat()
    key = str(path.resolve())
    known = cache.get(key)
    if (isinstance(known, dict) and known.get("size") == stat.st_size and known.get("mtime_ns") == stat.st_mtime_ns
            and isinstance(known.get("sha256"), str)):
        return known["sha256"]
    cache[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": file_sha256(path)}
    return cache[key]["sha256"]


def base_weights_fingerprint(base: str | Path) -> str:
    """sha256 over the names and sha256s of a base model directory's weight files: the exact weights an
    adapter was trained on. A file's hash is cached on disk, keyed by path, size and modification time:
    hashing a multi-GB base is slow, and it is fingerprinted at every checkpoint and load."""
    cache_file = _cache_dir() / "weights-sha256.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if not isinstance(cache, dict):  # a damaged cache only costs hashing again
        cache = {}
    before = dict(cache)
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(base).iterdir() if p.suffix in (".safetensors", ".bin")):
        digest.update(f"{path.name} {_file_sha256(path, cache)}\n".encode())
    if cache != before:
        try:  # a private temporary file, then a rename: processes saving at once never see half a file
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            handle, scratch = tempfile.mkstemp(dir=cache_file.parent, prefix=f".{cache_file.name}.")
            with os.fdopen(handle, "w") as out:
                out.write(json.dumps(cache))
            os.replace(scratch, cache_file)
        except OSError:
            pass  # a read-only home only costs hashing again next time
    return digest.hexdigest()


def check_base_weights(path: Path, meta: dict[str, Any], base: Path, allow_mismatch: bool) -> None:
    """Refuse to put an adapter on a base other than the one it was trained on (same shape, other weights
    load without an error and generate garbage)."""
    recorded = meta.get("base_weights_sha256")
    if recorded is None:
        warnings.warn(f"{path} records no fingerprint of its base weights (written by an older comet_ds): "
                      f"{base} cannot be checked to be the base it was trained on", stacklevel=3)
        return
    found = base_weights_fingerprint(base)
    if found != recorded and not allow_mismatch:
        raise CheckpointMismatchError(
            f"{path} was trained on base weights with sha256 {recorded} but {base} has {found}; load it onto "
            "the base it was trained from, or pass --allow-base-mismatch if the weights are known to be the same")


def write_comet(model: CometForCausalLM, tokenizer: PreTrainedTokenizerBase, out: Path,
                settings: FinetuneSettings, base_model: str | None) -> None:
    """Write a CoMeT model directory into `out` (an existing, empty directory).

    base_model=None stores the whole backbone in `out` (full fine-tunes, merged exports).
    """
    meta = {"format_version": FORMAT_VERSION, "comet": model.config.to_dict(), "tokens": model.tokens.to_dict(),
            "finetune": settings.to_dict(), "base_model": base_model,
            "fingerprint": _fingerprint(model.backbone.config),
            "base_weights_sha256": None if base_model is None else base_weights_fingerprint(base_model)}
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
    """The comet_config.json of a CoMeT model directory, checked to be one this comet_ds wrote."""
    file = Path(path) / COMET_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a CoMeT model directory (no {COMET_CONFIG}); "
                                "pass a directory written by comet-ds (a checkpoint's adapter or an export)")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointMismatchError(f"{file} is damaged (not JSON: {err}); copy the model directory again "
                                      "from where it was written") from None
    if not isinstance(meta, dict):
        raise CheckpointMismatchError(f"{file} is damaged (a JSON {type(meta).__name__}, not an object); copy the "
                                      "model directory again from where it was written")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointMismatchError(f"{file}: format version {meta.get('format_version')!r} is not supported "
                                      f"by this comet_ds (expects {FORMAT_VERSION})")
    sections = ("comet", "tokens", "finetune", "fingerprint")
    damaged = [key for key in sections if not isinstance(meta.get(key), dict)]
    if damaged or not isinstance(meta.get("base_model"), (str, type(None))):
        raise CheckpointMismatchError(f"{file} is damaged ({', '.join(damaged) or 'base_model'} missing or of the "
                                      "wrong type); copy the model directory again from where it was written")
    return meta


def check_weight_files(path: Path, meta: dict[str, Any]) -> None:
    """Refuse, before any model loads, a CoMeT model directory whose safetensors files are missing or
    damaged (a truncated copy, an interrupted download): only their headers are read."""
    names = [MEMORY_WEIGHTS, *([ADAPTER_WEIGHTS, "adapter_config.json"] if meta["base_model"] is not None else [])]
    for name in names:
        file = path / name
        if not file.is_file():
            raise CheckpointMismatchError(f"{path} is incomplete: {name} is missing; copy the whole model directory "
                                          "again from where it was written")
        if file.suffix == ".safetensors":
            try:
                with safe_open(file, "pt"):
                    pass
            except SafetensorError as err:
                raise CheckpointMismatchError(f"{file} is damaged ({err}); copy the model directory again from "
                                              "where it was written") from None


def check_continuable(path: str | Path, config: CometConfig, settings: FinetuneSettings,
                      base_config: PretrainedConfig, base_model: str | Path) -> None:
    """Raise unless training can start from the CoMeT model directory `path` with these settings: the
    same chunk layout and memories, the same fine-tune shape, the base weights it was trained on."""
    meta = read_meta(path)
    # settings that only steer optimisation may change from one stage to the next
    free = {"memory_lr_multiplier", "loss_vocabulary", "lora_dropout"}
    for what, saved, wanted in (("comet", meta["comet"], config.to_dict()),
                                ("finetune", meta["finetune"], settings.to_dict()),
                                ("base model shape", meta["fingerprint"], _fingerprint(base_config))):
        differ = sorted(k for k in saved.keys() | wanted.keys() if k not in free and saved.get(k) != wanted.get(k))
        if differ:
            raise CheckpointMismatchError(
                f"init_from {str(path)!r} cannot seed this run: its {what} differs in "
                + ", ".join(f"{k} ({saved.get(k)!r} there, {wanted.get(k)!r} here)" for k in differ))
    recorded = meta.get("base_weights_sha256")
    if recorded is not None and recorded != (found := base_weights_fingerprint(base_model)):
        raise CheckpointMismatchError(
            f"init_from {str(path)!r} cannot seed this run: it was trained on base weights with sha256 {recorded} "
            f"but base_model {base_model} has {found}; set base_model to the base it was trained from")


def load_comet(path: str | Path, base_model: str | Path | None = None, dtype: torch.dtype = torch.float32,
               allow_base_mismatch: bool = False, comet: CometConfig | None = None,
               ) -> tuple[CometForCausalLM, PreTrainedTokenizerBase, FinetuneSettings]:
    """Load a CoMeT model directory onto its base (or the base given here) and restore all weights.

    An adapter loads only onto the base weights it was trained on, unless allow_base_mismatch. `comet` replaces
    the saved CoMeT settings: a run's, which check_continuable found to differ only where training may.
    """
    path = Path(path)
    meta = read_meta(path)
    check_weight_files(path, meta)
    settings = FinetuneSettings.from_dict(meta["finetune"])
    config, tokens = comet or CometConfig.from_dict(meta["comet"]), CometTokens.from_dict(meta["tokens"])
    base = path if meta["base_model"] is None else Path(base_model or meta["base_model"])
    # the base is checked before it loads, so that a refusal costs no time: first its shape, then its weights
    found = _fingerprint(AutoConfig.from_pretrained(base))
    if found != meta["fingerprint"]:
        raise CheckpointMismatchError(
            f"{path} was trained on a base with {meta['fingerprint']} but {base} has {found}; "
            "load it onto the base model it was trained from")
    if meta["base_model"] is not None:
        check_base_weights(path, meta, base, allow_base_mismatch)
    tokenizer = AutoTokenizer.from_pretrained(path)
    backbone = load_backbone(base, dtype)
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


EXPORT = "comet-ds export"  # the command named in an export's output marker


def export_merged(path: str | Path, out: str | Path, base_model: str | Path | None = None,
                  allow_base_mismatch: bool = False, overwrite: bool = False) -> Path:
    """Write a standalone model directory: LoRA merged into the base weights, inserted rows written in.

    `out` must be new or empty, or (with `overwrite`) an earlier export, and outside the adapter and base
    directories; it appears whole.
    """
    inputs = export_inputs(path, base_model)
    check_output(out, EXPORT, overwrite=overwrite, inputs=inputs)  # before loading: a refusal costs no time
    model, tokenizer = load_merged(path, base_model, allow_base_mismatch)
    # the inserted tokens' output rows were trained only as inputs: a plain transformers generate() must never pick
    # one, so the export's generation config suppresses them
    model.backbone.generation_config.suppress_tokens = list(model.tokens.inserted_ids)
    with output_directory(out, EXPORT, overwrite=overwrite, inputs=inputs) as scratch:
        write_comet(model, tokenizer, scratch, FinetuneSettings(method="full"), base_model=None)
    return Path(out)


def export_inputs(path: str | Path, base_model: str | Path | None = None) -> list[Path]:
    """The directories an export of the CoMeT model directory `path` reads (its output must lie outside them)."""
    meta = read_meta(path)
    check_weight_files(Path(path), meta)
    return [Path(path), *[Path(p) for p in filter(None, [base_model or meta["base_model"]])]]


def load_merged(path: str | Path, base_model: str | Path | None = None,
                allow_base_mismatch: bool = False) -> tuple[CometForCausalLM, PreTrainedTokenizerBase]:
    """A CoMeT model directory as one model: LoRA merged into the base weights by peft itself
    (PeftModel.from_pretrained + merge_and_unload, which also proves the adapter files are standard PEFT), the
    inserted tokens' rows written into the embedding matrix."""
    path = Path(path)
    meta = read_meta(path)
    if meta["base_model"] is None:
        model, tokenizer, _ = load_comet(path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path)
        check_base_weights(path, meta, Path(base_model or meta["base_model"]), allow_base_mismatch)
        backbone = load_backbone(base_model or meta["base_model"])
        fit_vocabulary(backbone, tokenizer, mean_resizing=False)
        merged = PeftModel.from_pretrained(backbone, path).merge_and_unload()
        model = CometForCausalLM(merged, CometConfig.from_dict(meta["comet"]), CometTokens.from_dict(meta["tokens"]))
        model.load_comet_state_dict(load_file(path / MEMORY_WEIGHTS), source=str(path / MEMORY_WEIGHTS))
    model.embedding.write_into_base()
    return model, tokenizer
