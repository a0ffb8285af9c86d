"""argparse types shared by `comet-ds` and `comet-prep`: bad values become one usage line."""

from __future__ import annotations

import argparse

from comet_ds.config import parse_token_count


def token_count(text: str) -> int:
    """4096, 32k, 1m."""
    try:
        return parse_token_count(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def token_counts(text: str) -> list[int]:
    """A comma-separated list of token counts: 2k,8k,32k."""
    return [token_count(x) for x in text.split(",")]


def depths(text: str) -> list[float]:
    """A count of evenly spaced depths (5) or fractions (0.1,0.5)."""
    from data_prep.passkey import parse_depths

    try:
        return parse_depths(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def depth_specs(text: str) -> list[float | tuple[float, float]]:
    """depths, where an item may also be a range lo-hi that each sample draws its depth from."""
    from data_prep.passkey import parse_depth_specs

    try:
        return parse_depth_specs(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


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
