"""argparse types of `comet-ds` alone (the ones `comet-prep` shares are in data_prep.argtypes)."""

from __future__ import annotations

import argparse


def device(text: str) -> str:
    """auto (a GPU when torch sees one, else the CPU), cpu, cuda or cuda:N."""
    import torch

    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: this torch build sees no CUDA device (use --device cpu)")
    return text


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def dtype(text: str):  # -> torch.dtype (torch is imported lazily to keep --help fast)
    """fp32, bf16 or fp16."""
    import torch

    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"{text!r}: choose one of {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[text])
