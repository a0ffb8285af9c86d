"""CoMeT hyper-parameters and the ids of the tokens CoMeT adds to a vocabulary.

Both are plain data: they validate themselves on construction, round-trip through dicts (and so JSON
and YAML), and say exactly which value is wrong when one is.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from data_prep.errors import CometInputError


class CometConfigError(CometInputError):
    """A setting that cannot work; the message names the setting and what to change."""


class CheckpointMismatchError(CometInputError):
    """Saved weights that do not fit the model or config they are being loaded into."""


LOSS_VOCABULARIES = ("text", "full")


@dataclass(frozen=True)
class CometConfig:
    """Shape of the memory system. Defaults are CoMeT's settings for training at 32k tokens.

    chunk_size: text tokens per chunk (C); attention never crosses a chunk.
    global_slots: global memory slots per layer (G), each fed by one global beacon.
    temp_stride: one temporary beacon after every `temp_stride` text tokens (s); -1 disables the
        temporary memory.
    temp_budget: temporary memory entries kept per layer (Q), newest first (FIFO).
    bottleneck_rank: rank r of the residual low-rank adapter that turns states into memories.
    memory_lr_multiplier: learning-rate factor for the memory networks relative to the base LR.
    loss_vocabulary: the training loss's softmax over the text tokens only ("text": the inserted tokens are never
        targets, so their head rows get no push) or over the whole vocabulary ("full", as the paper's code scores,
        for number-for-number comparisons with it). Predictions never pick an inserted token either way.
    """

    chunk_size: int = 2048
    global_slots: int = 512
    temp_stride: int = 8
    temp_budget: int = 2048
    bottleneck_rank: int = 8
    memory_lr_multiplier: float = 5.0
    loss_vocabulary: str = "text"

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise CometConfigError(message)

        for name in ("chunk_size", "global_slots", "temp_stride", "temp_budget", "bottleneck_rank"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool),
                 f"{name} must be an integer (got {value!r})")
        need(self.chunk_size >= 1, f"chunk_size must be >= 1 text token (got {self.chunk_size})")
        need(self.global_slots >= 1,
             f"global_slots must be >= 1 (got {self.global_slots}): every layer carries a global memory")
        need(self.temp_stride == -1 or self.temp_stride >= 1,
             f"temp_stride must be >= 1, or -1 to disable the temporary memory (got {self.temp_stride})")
        need(self.temp_stride <= self.chunk_size,
             f"temp_stride ({self.temp_stride}) must not exceed chunk_size ({self.chunk_size}): "
             "a chunk would hold no complete beacon group")
        need(self.temp_budget >= 0, f"temp_budget must be >= 0 (got {self.temp_budget})")
        need(not self.temp_enabled or self.temp_budget >= 1,
             "temp_budget must be >= 1 while the temporary memory is on "
             "(set temp_stride=-1 to turn it off)")
        need(self.bottleneck_rank >= 1, f"bottleneck_rank must be >= 1 (got {self.bottleneck_rank})")
        need(isinstance(self.memory_lr_multiplier, (int, float)) and math.isfinite(self.memory_lr_multiplier)
             and self.memory_lr_multiplier > 0,
             f"memory_lr_multiplier must be a positive number (got {self.memory_lr_multiplier!r})")
        need(self.loss_vocabulary in LOSS_VOCABULARIES,
             f"loss_vocabulary must be one of {', '.join(LOSS_VOCABULARIES)} (got {self.loss_vocabulary!r})")

    @property
    def temp_enabled(self) -> bool:
        return self.temp_stride != -1

    @property
    def beacons_per_chunk(self) -> int:
        """Temporary beacons every chunk emits (real ones first, then masked fillers)."""
        return math.ceil(self.chunk_size / self.temp_stride) if self.temp_enabled else 0

    @property
    def queue_capacity(self) -> int:
        return self.temp_budget if self.temp_enabled else 0

    def queue_length(self, chunk_index: int) -> int:
        """Temporary memory entries (real or filler) entering chunk `chunk_index`."""
        return min(self.queue_capacity, self.beacons_per_chunk * chunk_index)

    @property
    def chunk_length(self) -> int:
        """Static token length of every laid-out chunk: slots + text + beacons + padding."""
        return self.chunk_size + self.beacons_per_chunk + 2 * self.global_slots + self.queue_capacity

    def check_hidden_size(self, hidden_size: int) -> None:
        if self.bottleneck_rank > hidden_size:
            raise CometConfigError(
                f"bottleneck_rank ({self.bottleneck_rank}) exceeds the model's hidden size ({hidden_size})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CometConfig:
        return cls(**_known_fields(cls, values, "comet"))


@dataclass(frozen=True)
class CometTokens:
    """Ids of the tokens CoMeT inserts: memory placeholders, temporary beacon, global beacons, pad."""

    placeholder_id: int
    temp_beacon_id: int
    global_beacon_ids: tuple[int, ...]
    pad_id: int
    names: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "global_beacon_ids", tuple(self.global_beacon_ids))
        object.__setattr__(self, "names", tuple(self.names))

    @property
    def inserted_ids(self) -> tuple[int, ...]:
        """Every id the layout inserts into the text (never a prediction target)."""
        return (self.placeholder_id, self.temp_beacon_id, *self.global_beacon_ids)

    def loss_excluded_ids(self, config: CometConfig) -> tuple[int, ...]:
        """The ids the training loss's softmax leaves out under `config.loss_vocabulary`."""
        return self.inserted_ids if config.loss_vocabulary == "text" else ()

    def check_against(self, config: CometConfig) -> None:
        if len(self.global_beacon_ids) != config.global_slots:
            raise CometConfigError(
                f"the tokenizer has {len(self.global_beacon_ids)} global beacon tokens but global_slots is "
                f"{config.global_slots}; extend the tokenizer with the same CoMeT config")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "global_beacon_ids": list(self.global_beacon_ids),
                "names": list(self.names)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CometTokens:
        return cls(**_known_fields(cls, values, "tokens"))


def _known_fields(cls: type, values: dict[str, Any], section: str) -> dict[str, Any]:
    """`values` checked against the fields of `cls`: unknown names and values of the wrong type are
    errors that name the setting."""
    known = _field_types(cls)
    checked = {}
    for key, value in values.items():
        if key not in known:
            hint = difflib.get_close_matches(key, list(known), n=1)
            suggestion = f"; did you mean {hint[0]!r}?" if hint else f"; known: {', '.join(known)}"
            raise CometConfigError(f"unknown {section} setting {key!r}{suggestion}")
        checked[key] = _typed(f"{section}.{key}", known[key], value)
    return checked


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """Each field's annotation as a type, whether or not the module postpones annotations to strings."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


_SCALARS = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}


def _scalar_kinds(annotation: Any) -> tuple[type, ...] | None:
    """The types a scalar annotation allows (int, str | None, Optional[float]: type(None) for null), or
    None for any other annotation."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    kinds = typing.get_args(annotation) if union else (annotation,)
    return kinds if all(kind in _SCALARS or kind is type(None) for kind in kinds) else None


def _typed(name: str, annotation: Any, value: Any) -> Any:
    """`value` as the scalar type `annotation` allows (float, int | None, ...); other annotations
    (sections, tuples) pass through for their own checks."""
    kinds = _scalar_kinds(annotation)
    if kinds is None:
        return value
    if value is None and type(None) in kinds:
        return value
    if float in kinds and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if str in kinds and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # run_name: 2024
    if isinstance(value, bool):
        ok = bool in kinds
    elif isinstance(value, int):
        ok = int in kinds or float in kinds
    elif isinstance(value, float):
        ok = float in kinds
    else:
        ok = isinstance(value, str) and str in kinds
    if not ok:
        expected = " or ".join(_SCALARS.get(kind, "null") for kind in sorted(kinds, key=lambda k: k is type(None)))
        raise CometConfigError(f"{name} must be {expected} (got {value!r})")
    return value
