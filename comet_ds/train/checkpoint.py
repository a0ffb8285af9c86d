"""Checkpoints that appear whole or not at all, are verified before a resume trusts them, and resume exactly.

Layout under <output_dir>/checkpoints:
    step-N/              DeepSpeed's files (trainable weights per layer, optimizer, LR schedule),
                         rng-<rank>.safetensors per rank, trainer_state.json, adapter/ (a CoMeT model
                         directory that `comet-ds generate` and `comet-ds export` load), and
                         checkpoint.sha256.json: the size and sha256 of every other file, written last
    latest               the tag of the newest complete checkpoint
Everything is written under .staging/ first; rank 0 moves the finished directory into place and only
then rewrites `latest` (write-and-rename), so a crash at any point leaves the previous one usable.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import deepspeed.comm as dist
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from comet_ds.config import CometInputError
from comet_ds.modeling.finetune import FinetuneSettings
from comet_ds.modeling.model import CometForCausalLM
from comet_ds.modeling.pretrained import write_comet
from data_prep.fs import file_sha256, fsync_tree

STAGING = ".staging"
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "checkpoint.sha256.json"
STEP_DIR = re.compile(r"step-(\d+)")


class DamagedCheckpointError(CometInputError):
    """A checkpoint whose files differ from its manifest, or that lacks a file a resume needs."""


class NonFiniteError(CometInputError):
    """Training produced a non-finite loss, gradient norm or weight."""


def save_rng_state(path: Path) -> None:
    """This process's RNG states as tensors plus JSON, so that loading them runs no code (no pickle)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    save_file(tensors, path, metadata={"python_random": json.dumps(random.getstate())})


def read_rng_state(path: Path) -> dict[str, Any]:
    """The RNG states `save_rng_state` wrote, checked; refuses a missing or malformed file."""
    if not path.is_file():
        raise DamagedCheckpointError(f"checkpoint {path.parent} lacks {path.name} (this process's RNG state): "
                                     "pass --resume auto to resume from the newest checkpoint that verifies")
    try:
        with safe_open(path, "pt") as file:
            tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118 (safe_open is no dict)
            version, internal, gauss_next = json.loads((file.metadata() or {})["python_random"])
        python = (int(version), tuple(int(x) for x in internal), gauss_next)
        cuda = [tensors[f"cuda.{i}"] for i in range(sum(name.startswith("cuda.") for name in tensors))]
        return {"torch": tensors["torch"], "python": python, "cuda": cuda}
    except (SafetensorError, KeyError, TypeError, ValueError) as err:
        raise DamagedCheckpointError(f"{path} is not a valid RNG state ({type(err).__name__}): pass --resume auto "
                                     "to resume from the newest checkpoint that verifies") from None


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _files(directory: Path) -> dict[str, Path]:
    """Every file under `directory` but the manifest, by its path relative to `directory`."""
    return {path.relative_to(directory).as_posix(): path for path in sorted(directory.rglob("*"))
            if path.is_file() and path != directory / MANIFEST}


def write_manifest(directory: Path) -> None:
    """Record the size and sha256 of every file in `directory`; written last, it marks the checkpoint complete."""
    files = {name: {"size": path.stat().st_size, "sha256": file_sha256(path)}
             for name, path in _files(directory).items()}
    (directory / MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n")


def checkpoint_problem(directory: Path) -> str | None:
    """Why `directory` does not match its manifest (naming the first file that differs), or None if it does."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return f"no {MANIFEST} (written before checkpoints carried one, or damaged)"
    try:
        expected = {name: (int(entry["size"]), str(entry["sha256"]))
                    for name, entry in json.loads(manifest.read_text())["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is not a valid manifest"
    found = _files(directory)
    if missing := sorted(expected.keys() - found.keys()):
        return f"{missing[0]} is missing"
    if extra := sorted(found.keys() - expected.keys()):
        return f"{extra[0]} is not in its manifest"
    for name, (size, sha256) in sorted(expected.items()):
        if found[name].stat().st_size != size or file_sha256(found[name]) != sha256:
            return f"{name} has changed (its size or sha256 differs from the manifest)"
    return None


def latest_tag(root: Path) -> str | None:
    file = root / LATEST
    return file.read_text().strip() if file.is_file() else None


def _step_dirs(root: Path) -> list[Path]:
    """The step-N directories under `root`, oldest first."""
    found = [(int(match[1]), path) for path in root.glob("step-*")
             if path.is_dir() and (match := STEP_DIR.fullmatch(path.name))]
    return [path for _, path in sorted(found)]


def choose_resume_checkpoint(root: Path, mode: str) -> tuple[str | None, list[str]]:
    """The tag to resume from (None: there is no checkpoint) and one line for each newer checkpoint skipped.

    "latest": the checkpoint `latest` names, which must verify; "auto": the newest step-N that verifies.
    """
    if mode == "latest":
        tag = latest_tag(root)
        if tag is not None and not STEP_DIR.fullmatch(tag):
            raise DamagedCheckpointError(f"{root / LATEST} names {tag!r}, not a step-N checkpoint: pass --resume auto "
                                         "to resume from the newest checkpoint that verifies")
        if tag is not None and (problem := checkpoint_problem(root / tag)):
            raise DamagedCheckpointError(f"checkpoint {root / tag} is damaged: {problem}; pass --resume auto to "
                                         "resume from the newest checkpoint that verifies")
        return tag, []
    skipped = []
    for directory in reversed(_step_dirs(root)):
        problem = checkpoint_problem(directory)
        if problem is None:
            return directory.name, skipped
        skipped.append(f"skipped checkpoint {directory}: {problem}")
    if skipped:
        raise DamagedCheckpointError(f"no checkpoint in {root} verifies ({'; '.join(skipped)}): "
                                     "train into a new output_dir")
    return None, []


def finite_on_every_rank(values: Iterable[torch.Tensor], device: torch.device) -> bool:
    """Collective: whether every value on every rank is finite; all ranks get the same answer."""
    finite = all(bool(torch.isfinite(value).all()) for value in values)
    flag = torch.tensor([1.0 if finite else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() == 1.0)


def same_on_every_rank(tag: str | None, device: torch.device) -> bool:
    """Collective: whether every rank chose the same checkpoint tag (nodes without a shared filesystem may not)."""
    digest = int.from_bytes(hashlib.sha256(str(tag).encode()).digest()[:7], "big")
    extremes = torch.tensor([digest, -digest], dtype=torch.int64, device=device)
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)  # the largest digest and minus the smallest
    return bool(extremes[0] == -extremes[1])


def save_checkpoint(engine: Any, model: CometForCausalLM, tokenizer: Any, root: Path, step: int,
                    settings: FinetuneSettings, base_model: str, trainer_state: dict[str, Any],
                    keep: int) -> Path:
    """Collective: every rank calls it. Returns the finished checkpoint directory."""
    trained_params = [p for p in engine.module.parameters() if p.requires_grad]
    if not finite_on_every_rank((p.detach() for p in trained_params), engine.device):
        raise NonFiniteError(f"the trained weights at step {step} are not finite, so no checkpoint was saved: "
                             "lower train.lr, or check the dataset and init_from weights")
    rank, tag = dist.get_rank(), f"step-{step}"
    staging = root / STAGING / tag
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(str(root / STAGING), tag=tag, save_latest=False, exclude_frozen_parameters=True)
    save_rng_state(staging / f"rng-{rank}.safetensors")
    names = {id(p): n for n, p in model.named_parameters()}
    if engine.grid.get_data_parallel_id() == 0:  # one copy of each stage's trained weights
        trained = {names[id(p)]: p.detach().contiguous() for p in trained_params}
        save_file(trained, staging / f"trained-stage{engine.stage_id}.safetensors")
    dist.barrier()
    final = root / tag
    if rank == 0:
        _assemble_adapter(model, tokenizer, staging, settings, base_model)
        (staging / TRAINER_STATE).write_text(json.dumps({**trainer_state, "step": step}, indent=2) + "\n")
        write_manifest(staging)  # last: a checkpoint with a manifest is complete
        fsync_tree(staging)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        pointer = root / f".{LATEST}.tmp"
        pointer.write_text(tag + "\n")
        os.replace(pointer, root / LATEST)
        _prune(root, keep, just_written=final)
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


def _prune(root: Path, keep: int, just_written: Path | None = None) -> None:
    """Delete all but the `keep` newest checkpoints, but never the newest one that verifies (a damaged newer
    one must not cost the last good one), never `just_written`, and nothing that is not a step-N directory
    this module wrote. `just_written` counts as verified without reading it again: its manifest was made
    from these very files a moment ago, and it is normally the newest, so a save hashes nothing twice."""
    written = [path for path in _step_dirs(root) if (path / TRAINER_STATE).is_file()]
    newest_verified = next((path for path in reversed(written)
                            if path == just_written or checkpoint_problem(path) is None), None)
    for old in written[:-keep]:
        if old not in (newest_verified, just_written):
            shutil.rmtree(old, ignore_errors=True)


def restore_checkpoint(engine: Any, root: Path, tag: str) -> dict[str, Any]:
    """Collective: load checkpoint `tag` (verified in preflight) into the engine, and this process's RNG state."""
    directory = root / tag
    # without this process's RNG state the resumed run would draw different numbers: refuse before loading
    rng = read_rng_state(directory / f"rng-{dist.get_rank()}.safetensors")
    # DeepSpeed unpickles its model and optimizer files: a checkpoint directory must be trusted like code.
    load_path, _ = engine.load_checkpoint(str(root), tag=tag, load_module_strict=False)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {directory}")
    set_rng_state(rng)
    return json.loads((directory / TRAINER_STATE).read_text())
