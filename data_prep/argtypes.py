"""argparse types shared by `comet-prep` and `comet-ds`: bad values become one usage line."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import TypeVar

from data_prep.errors import CometInputError

T = TypeVar("T")


def parse_token_count(text: str) -> int:
    """A token count as people write it: 4096, 32k, 1.5k, 1m (k = 1024, m = 1024**2)."""
    cleaned = text.strip().lower()
    scale = {"k": 1024, "m": 1024**2}.get(cleaned[-1:], 1)
    try:
        value = float(cleaned.rstrip("km")) * scale
    except ValueError:
        raise CometInputError(f"not a token count: {text!r} (use e.g. 4096, 32k, 1m)") from None
    if not math.isfinite(value) or value < 1 or value != int(value):
        raise CometInputError(f"not a whole positive token count: {text!r}")
    return int(value)


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


def _number(kind: type[T], accept: Callable[[T], bool], wanted: str) -> Callable[[str], T]:
    """An argparse type that reads `kind` and refuses values `accept` rejects (NaN fails every
    comparison, so it is refused too), saying what is `wanted`."""
    noun = "whole number" if kind is int else "number"

    def parse(text: str) -> T:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {noun}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range: give {wanted}")
        return value

    return parse


# counts of processes, questions, samples, events, threads
positive_int = _number(int, lambda v: v >= 1, "a whole number of at least 1")
# where 0 means none or no limit (--top-k, --pretrain-steps)
non_negative_int = _number(int, lambda v: v >= 0, "a whole number of at least 0")
# sizes, temperatures
positive_float = _number(float, lambda v: 0 < v < float("inf"), "a finite number above 0")
# sizes where 0 means none (comet-ds bench prep --agent-logs-mb)
non_negative_float = _number(float, lambda v: 0 <= v < float("inf"), "a finite number of at least 0")
# --top-p
probability = _number(float, lambda v: 0 < v <= 1, "a number above 0 and at most 1")


def positive_ints(text: str) -> list[int]:
    """A comma-separated list of counts: 2,4,8."""
    return [positive_int(x) for x in text.split(",")]


def non_negative_ints(text: str) -> list[int]:
    """A comma-separated list of counts where 0 means none: 0,4,8."""
    return [non_negative_int(x) for x in text.split(",")]


def positive_floats(text: str) -> list[float]:
    """A comma-separated list of sizes: 50,200."""
    return [positive_float(x) for x in text.split(",")]


def choice_list(*choices: str) -> Callable[[str], list[str]]:
    """A type for comma-separated picks from `choices` (sft,qa), each named once."""

    def parse(text: str) -> list[str]:
        picked = text.split(",")
        unknown = [p for p in picked if p not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(map(repr, unknown))}: choose from "
                                             f"{','.join(choices)}")
        return list(dict.fromkeys(picked))

    return parse


def column_mapping(text: str) -> dict[str, str]:
    """our=theirs pairs naming the file's column for each of comet-prep user-behavior's columns:
    user_id=visitorid,timestamp=ts."""
    from data_prep.user_behavior import TAOBAO_COLUMNS

    mapping: dict[str, str] = {}
    for pair in text.split(","):
        ours, equals, theirs = (part.strip() for part in pair.partition("="))
        if not equals or not ours or not theirs:
            raise argparse.ArgumentTypeError(f"{pair!r} is not our=theirs, e.g. user_id=visitorid")
        if ours not in TAOBAO_COLUMNS:
            raise argparse.ArgumentTypeError(f"{ours!r} is not one of our columns: {', '.join(TAOBAO_COLUMNS)}")
        if ours in mapping:
            raise argparse.ArgumentTypeError(f"{ours} is given twice")
        mapping[ours] = theirs
    return mapping


def depths(text: str) -> list[float]:
    """A count of evenly spaced depths (5) or fractions (0.1,0.5)."""
    from data_prep.passkey import parse_depths

    return _usage_error_on_value_error(parse_depths, text)


def depth_specs(text: str) -> list[float | tuple[float, float]]:
    """depths, where an item may also be a range lo-hi that each sample draws its depth from."""
    from data_prep.passkey import parse_depth_specs

    return _usage_error_on_value_error(parse_depth_specs, text)

