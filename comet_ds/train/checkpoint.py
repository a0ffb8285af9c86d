"""Checkpoints that appear whole or not at all, and resume exactly.

Layout under <output_dir>/checkpoints:
    step-N/              DeepSpeed's files (trainable weights per layer, optimizer, LR schedule),
                         rng-<rank>.pt per rank, trainer_state.json, and adapter/ (a CoMeT model
                         directory that `comet-ds generate` and `comet-ds export` load)
    latest               the tag of the newest complete checkpoint
Everything is written under .staging/ first; rank 0 moves the finished directory into place and only
then rewrites `latest` (write-and-rename), so a crash at any point leaves the previous one usable.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import deepspeed.comm as dist
import torch
from safetensors.torch import load_file, save_file

from comet_ds.modeling.finetune import FinetuneSettings
from comet_ds.modeling.model import CometForCausalLM
from comet_ds.modeling.pretrained import write_comet

STAGING = ".staging"
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_tag(root: Path) -> str | None:
    file = root / LATEST
    return file.read_text().strip() if file.is_file() else None


def save_checkpoint(engine: Any, model: CometForCausalLM, tokenizer: Any, root: Path, step: int,
                    settings: FinetuneSettings, base_model: str, trainer_state: dict[str, Any],
                    keep: int) -> Path:
    """Collective: every rank calls it. Returns the finished checkpoint directory."""
    rank, tag = dist.get_rank(), f"step-{step}"
    staging = root / STAGING / tag
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(str(root / STAGING), tag=tag, save_latest=False, exclude_frozen_parameters=True)
    torch.save(rng_state(), staging / f"rng-{rank}.pt")
    names = {id(p): n for n, p in model.named_parameters()}
    if engine.grid.get_data_parallel_id() == 0:  # one copy of each stage's trained weights
        trained = {names[id(p)]: p.detach().contiguous() for p in engine.module.parameters() if p.requires_grad}
        save_file(trained, staging / f"trained-stage{engine.stage_id}.safetensors")
    dist.barrier()
    final = root / tag
    if rank == 0:
        _assemble_adapter(model, tokenizer, staging, settings, base_model)
        (staging / TRAINER_STATE).write_text(json.dumps({**trainer_state, "step": step}, indent=2) + "\n")
        for path in staging.rglob("*"):
            if path.is_file():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        pointer = root / f".{LATEST}.tmp"
        pointer.write_text(tag + "\n")
        os.replace(pointer, root / LATEST)
        _prune(root, keep)
    dist.barrier()
    return final


def _assemble_adapter(model: CometForCausalLM, tokenizer: Any, staging: Path, settings: FinetuneSettings,
                      base_model: str) -> None:
    """Rank 0 gathers every stage's trained weights into its full model and writes the adapter dir."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for file in sorted(staging.glob("trained-stage*.safetensors")):
            for name, value in load_file(file).items():
                params[name].copy_(value)
    adapter = staging / "adapter"
    adapter.mkdir()
    write_comet(model, tokenizer, adapter, settings, None if settings.method == "full" else base_model)


def _prune(root: Path, keep: int) -> None:
    done = sorted((p for p in root.glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def restore_checkpoint(engine: Any, root: Path) -> dict[str, Any] | None:
    """Collective: load the newest complete checkpoint into the engine; None if there is none."""
    tag = latest_tag(root)
    if tag is None:
        return None
    directory = root / tag
    if not (directory / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"checkpoint {directory} is incomplete (no {TRAINER_STATE}); "
                                f"point {root / LATEST} at a complete step-N directory")
    load_path, _ = engine.load_checkpoint(str(root), tag=tag, load_module_strict=False)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {directory}")
    rng_file = directory / f"rng-{dist.get_rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((directory / TRAINER_STATE).read_text())
