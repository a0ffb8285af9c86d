"""Shared fixtures: tiny Llama and Qwen3 base models written with save_pretrained, built once."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def base_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from comet_ds.modeling.tiny_base import init_base

    root = tmp_path_factory.mktemp("bases")
    return {arch: str(init_base(root / arch, arch, num_layers=2)) for arch in ("llama", "qwen3", "qwen2", "mistral")}


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
