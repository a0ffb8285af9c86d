"""Plain helpers shared by test modules and by pipeline_worker.py, which torchrun starts as a script and
which therefore cannot take fixtures (those live in conftest.py). Test files import them as `helpers`:
pytest puts tests/ on sys.path for modules of a folder without __init__.py, and a script's own folder is
on its path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# what the subprocesses of a test run with: one thread each, the venv's launchers first on PATH
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}:{os.environ['PATH']}"}
# a two-message chat that every agent-log reader accepts
TRAJECTORY = {"id": "run-1", "messages": [{"role": "user", "content": "Say hi."},
                                          {"role": "assistant", "content": "hi"}]}


# -- models ------------------------------------------------------------------------------------------------


def trained_like(model, scale: float = 0.05, seed: int = 1):
    """Move every trainable weight away from its init (LoRA B starts at zero), so that a weight lost or
    misplaced by the code under test shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def finite_logits(logits: list[torch.Tensor]) -> torch.Tensor:
    """Per-chunk logits as one tensor; the never-predicted inserted tokens' -inf become 0 so that
    differences of two runs are finite."""
    return torch.nan_to_num(torch.cat(logits, dim=1), neginf=0.0)


def greedy_by_recompute(model, prompt: list[int], steps: int) -> list[int]:
    """Greedy generation the slow way: lay out prompt + generated text as in training and rerun the whole
    sequence for every new token."""
    from comet_ds.layout import ChunkLayout, Role

    layout, ids, out = ChunkLayout(model.config, model.tokens), list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            chunks = layout.layout([ids])
            logits = model(chunks, return_logits=True).logits[-1][0]
            last_text = (chunks[-1].roles[0] == Role.TEXT).nonzero()[-1, 0]
            out.append(int(logits[last_text].argmax()))
            ids.append(out[-1])
    return out


def untrained_adapter(base: str, config, out: Path) -> Path:
    """A LoRA CoMeT model directory on `base`, saved straight after it is built: for commands that need
    one to load, not one that has learnt anything."""
    from comet_ds.modeling.finetune import FinetuneSettings
    from comet_ds.modeling.pretrained import build_comet, save_comet

    model, tokenizer = build_comet(base, config)
    save_comet(model, tokenizer, out, FinetuneSettings(), base)
    return out


# -- run configs and training runs ---------------------------------------------------------------------------


def write_run(directory: Path, base: str, data: str, *, deepspeed: dict | None = None, train: dict | None = None,
              **top) -> Path:
    """`directory`/run.yaml: a run on the 2-stage CPU DeepSpeed config (or `deepspeed`, written beside it)
    with a small chunk layout, writing into `directory`/run; `top` sets other top-level keys."""
    directory.mkdir(parents=True, exist_ok=True)
    deepspeed_path = REPO / "ds_configs" / "cpu_fp32_2stage.json"
    if deepspeed is not None:
        deepspeed_path = directory / "ds.json"
        deepspeed_path.write_text(json.dumps(deepspeed))
    config = {"base_model": base, "dataset": data, "output_dir": str(directory / "run"),
              "deepspeed_config": str(deepspeed_path),
              "comet": {"chunk_size": 64, "global_slots": 4, "temp_stride": 8, "temp_budget": 16},
              "train": dict(train or {}), **top}
    path = directory / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def write_short_run(directory: Path, base: str, data: str, **train) -> Path:
    """A run short enough to train in a test: 8 steps, a checkpoint every 2; `train` overrides."""
    return write_run(directory, base, data, train={"steps": 8, "lr": 5e-3, "warmup_steps": 1, "grad_clip": 1.0,
                                                   "save_every": 2, **train})


def interruptible(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    """`command` started with Ctrl-C's default action restored: a shell's background job inherits SIGINT
    ignored, and Python then never raises KeyboardInterrupt, so a SIGINT test would wait forever."""
    return subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def torchrun(config: Path, *extra: str) -> list[str]:
    """The command line of `comet-ds train --config CONFIG` in 2 processes on this machine."""
    from comet_ds.resources import free_port

    return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), "-m", "comet_ds.cli", "train", "--config", str(config), *extra]


def losses(run_dir: Path) -> dict[int, list[float]]:
    """step → every loss metrics.jsonl logged for it (one, unless a step was logged twice)."""
    out: dict[int, list[float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out.setdefault(row["step"], []).append(row["loss"])
    return out


def save_dataset(path: Path, input_ids: list[list[int]], labels: list[list[int]]) -> str:
    """A dataset of exactly these rows, with the column types comet-prep writes."""
    from datasets import Dataset, Features, List, Value

    features = Features({"input_ids": List(Value("int32")), "labels": List(Value("int32"))})
    Dataset.from_dict({"input_ids": input_ids, "labels": labels}, features=features).save_to_disk(str(path))
    return str(path)


# -- command lines -----------------------------------------------------------------------------------------


def refusal(capsys: pytest.CaptureFixture, run: Callable[[], object], code: int = 2) -> str:
    """The one line a refused command prints, after checking its exit status and that no traceback shows;
    only what `run` prints counts."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


# -- comet-prep readers --------------------------------------------------------------------------------------


def read_all_events(path: Path, mapping: dict[str, str] | None = None) -> list[tuple]:
    """Every event of an event log as (user, timestamp, item, category, behavior) and every rejection
    as (line, reason), in the order the reader yields them (a block read line by line yields its
    rejections before its events)."""
    from data_prep.user_behavior import read_events

    out = []
    for item in read_events(path, mapping or {}):
        if isinstance(item, tuple):
            out.append((item[0], str(item[1])))
        else:
            out += zip(*(column.to_pylist() for column in item.columns))
    return out
