"""Shared fixtures: tiny base models written with save_pretrained, a saved adapter and a passkey dataset,
each built once per session. Plain helpers that scripts need too are in helpers.py."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def base_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from comet_ds.modeling.tiny_base import init_base

    root = tmp_path_factory.mktemp("bases")
    return {arch: str(init_base(root / arch, arch, num_layers=2)) for arch in ("llama", "qwen3", "qwen2", "mistral")}


@pytest.fixture(scope="session")
def adapter(base_dirs: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained LoRA adapter on the Llama base with 16-token chunks; tests copy it before changing it."""
    from helpers import untrained_adapter

    from comet_ds.config import CometConfig

    config = CometConfig(chunk_size=16, global_slots=4, temp_stride=4, temp_budget=6)
    return untrained_adapter(base_dirs["llama"], config, tmp_path_factory.mktemp("adapter") / "adapter")


@pytest.fixture(scope="session")
def passkey_data(base_dirs: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """6 passkey samples of 300 tokens, 2 at each depth (0, 0.5, 1), in the Llama base's tokens."""
    from data_prep.cli import main as prep_main

    out = tmp_path_factory.mktemp("data") / "passkey"
    prep_main(["passkey", "--tokenizer", base_dirs["llama"], "--lengths", "300", "--depths", "3",
               "--samples-per-cell", "2", "--seed", "3", "--output", str(out), "--quiet"])
    return str(out)


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
