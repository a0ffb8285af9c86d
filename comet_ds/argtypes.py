"""argparse types shared by `comet-ds` and `comet-prep`: bad values become one usage line."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

from comet_ds.config import parse_token_count

T = TypeVar("T")


def _usage_error_on_value_error(parse: Callable[[str], T], text: str) -> T:
    """parse(text), with a ValueError turned into argparse's one-line usage error."""
    try:
        return parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def token_count(text: str) -> int:
    """4096, 32k, 1m."""
    return _usage_error_on_value_error(parse_token_count, text)


def token_counts(text: str) -> list[int]:
    """A comma-separated list of token counts: 2k,8k,32k."""
    return [token_count(x) for x in text.split(",")]


def depths(text: str) -> list[float]:
    """A count of evenly spaced depths (5) or fractions (0.1,0.5)."""
    from data_prep.passkey import parse_depths

    return _usage_error_on_value_error(parse_depths, text)


def depth_specs(text: str) -> list[float | tuple[float, float]]:
    """depths, where an item may also be a range lo-hi that each sample draws its depth from."""
    from data_prep.passkey import parse_depth_specs

    return _usage_error_on_value_error(parse_depth_specs, text)


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
