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
