"""Token sequences → fixed-length chunks with memory slots and beacons.

Layout of chunk t of one sequence (every chunk padded to `CometConfig.chunk_length`):

    [G global slots]  (t > 0)      placeholders, overwritten by the global memory of chunk t-1 (masked, and
                                   the temporary queue's slots too, where a packed sequence starts a new
                                   document whose memory starts over)
    [q_t temp slots]               placeholders, slot j receives temporary-queue entry j
    [text, beacon after every s]   the chunk's text; each beacon summarises the s tokens before it
    [G global beacons]             read out to update the global memory
    [filler beacons]               masked, so every chunk emits exactly ceil(C/s) temporary entries
    [padding]

Each token carries a *role*. Roles alone determine the attention mask, the position ids and every
index tensor the model needs, so a pipeline stage can rebuild all per-chunk metadata from one
integer tensor.

The temporary queue is chronological and may interleave real entries with fillers (from chunks
shorter than C). Slot j is masked exactly when queue entry j is a filler, so a filler can never
land in an attended slot (putting real slots first and filler slots last instead would misalign
the two whenever fillers sit between real entries).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum

import torch

from comet_ds.config import CometConfig, CometConfigError, CometInputError, CometTokens
from data_prep.tokens import IGNORE_INDEX


class Role(IntEnum):
    PAD = 0
    TEXT = 1
    GLOBAL_SLOT = 2
    TEMP_SLOT = 3
    TEMP_SLOT_EMPTY = 4  # slot of a filler queue entry: masked
    TEMP_BEACON = 5
    TEMP_BEACON_FILLER = 6  # masked; keeps the per-chunk beacon count static
    GLOBAL_BEACON = 7
    GLOBAL_SLOT_EMPTY = 8  # masked: the row starts a new document here, its global memory starts over


_ATTENDED = (Role.TEXT, Role.GLOBAL_SLOT, Role.TEMP_SLOT, Role.TEMP_BEACON, Role.GLOBAL_BEACON)


def attention_mask_from_roles(roles: torch.Tensor) -> torch.Tensor:
    """1 for tokens other tokens may attend to, 0 for padding, fillers and empty slots."""
    mask = torch.zeros_like(roles)
    for role in _ATTENDED:
        mask |= roles == role
    return mask


def position_ids_from_roles(roles: torch.Tensor) -> torch.Tensor:
    """Chunk-local positions: the number of attended tokens before each token."""
    mask = attention_mask_from_roles(roles)
    return torch.cumsum(mask, dim=-1) - mask


def fifo_keep(realness: torch.Tensor, capacity: int) -> torch.Tensor:
    """Indices (ascending) of the queue entries kept: real before filler, newer before older.

    realness: [B, n] bool over cat(queue, new entries) in chronological order.
    Returns [B, min(capacity, n)] long.
    """
    n = realness.shape[-1]
    keep = min(capacity, n)
    order = torch.arange(n, device=realness.device)
    score = realness.long() * n + order  # real entries outrank fillers; newer outrank older
    kept = torch.topk(score, keep, dim=-1).indices
    return torch.sort(kept, dim=-1).values


@dataclass(frozen=True)
class Chunk:
    """Chunk `index` of a batch of B sequences; all tensors are [B, chunk_length]."""

    index: int
    input_ids: torch.Tensor
    labels: torch.Tensor
    roles: torch.Tensor

    @property
    def attention_mask(self) -> torch.Tensor:
        return attention_mask_from_roles(self.roles)

    @property
    def position_ids(self) -> torch.Tensor:
        return position_ids_from_roles(self.roles)

    @property
    def num_labels(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def to(self, device: torch.device | str) -> Chunk:
        """The same chunk with its tensors on `device` (itself when they are there already)."""
        if self.input_ids.device == torch.device(device):
            return self
        return Chunk(self.index, self.input_ids.to(device), self.labels.to(device), self.roles.to(device))


@dataclass(frozen=True)
class ChunkIndices:
    """Where memories go in and come out of one chunk; each [B, k] long, k fixed per chunk."""

    global_slots: torch.Tensor
    temp_slots: torch.Tensor
    temp_beacons: torch.Tensor
    global_beacons: torch.Tensor
    temp_keep: torch.Tensor  # into cat(queue entering the chunk, the chunk's new entries)
    global_restart: torch.Tensor | None = None  # [B] bool, rows whose global memory starts over; None: no row

    @classmethod
    def from_roles(cls, roles: torch.Tensor, queue_capacity: int) -> ChunkIndices:
        def where(*wanted: Role) -> torch.Tensor:
            hit = torch.zeros_like(roles, dtype=torch.bool)
            for role in wanted:
                hit |= roles == role
            counts = hit.sum(dim=-1)
            if bool((counts != counts[0]).any()):
                raise ValueError(f"rows of a chunk disagree on the number of {wanted[0].name} tokens: "
                                 f"{counts.tolist()}")
            return hit.nonzero()[:, 1].view(roles.shape[0], -1)

        temp_slots = where(Role.TEMP_SLOT, Role.TEMP_SLOT_EMPTY)
        temp_beacons = where(Role.TEMP_BEACON, Role.TEMP_BEACON_FILLER)
        realness = torch.cat([roles.gather(1, temp_slots) == Role.TEMP_SLOT,
                              roles.gather(1, temp_beacons) == Role.TEMP_BEACON], dim=1)
        restart = (roles == Role.GLOBAL_SLOT_EMPTY).any(dim=-1)
        return cls(
            global_slots=where(Role.GLOBAL_SLOT, Role.GLOBAL_SLOT_EMPTY),
            temp_slots=temp_slots,
            temp_beacons=temp_beacons,
            global_beacons=where(Role.GLOBAL_BEACON),
            temp_keep=fifo_keep(realness, queue_capacity),
            global_restart=restart if bool(restart.any()) else None,
        )


def fixed_chunk_sizes(length: int, chunk_size: int) -> list[int]:
    """Full chunks of `chunk_size` text tokens and one remainder chunk."""
    full, rest = divmod(length, chunk_size)
    return [chunk_size] * full + ([rest] if rest else [])


def restart_plan(document_plans: Sequence[Sequence[int]]) -> tuple[list[int], list[int]]:
    """Chunk sizes and restarts (see iter_chunks) for a packed sequence whose memories start over at every
    document: each document, cut by its own chunk plan, starting a chunk of its own."""
    sizes: list[int] = []
    restarts: list[int] = []
    for plan in document_plans:
        if sizes:
            restarts.append(len(sizes))
        sizes += plan
    return sizes, restarts


def shift_labels(labels: Sequence[int]) -> list[int]:
    """Label of each text token = the next text token's label; the last has none."""
    return [*labels[1:], IGNORE_INDEX]


class ChunkLayout:
    """Lays out token sequences as chunks for a given CoMeT config and token ids."""

    def __init__(self, config: CometConfig, tokens: CometTokens):
        tokens.check_against(config)
        self.config = config
        self.tokens = tokens

    def num_chunks(self, length: int) -> int:
        return max(1, math.ceil(length / self.config.chunk_size))

    def iter_chunks(
        self,
        input_ids: Sequence[Sequence[int]],
        labels: Sequence[Sequence[int]] | None = None,
        text_chunk_sizes: Sequence[Sequence[int]] | None = None,
        restarts: Sequence[Sequence[int]] | None = None,
    ) -> Iterator[Chunk]:
        """Yield the chunks of a batch of sequences one at a time (constant memory).

        labels are aligned with input_ids (HF convention, IGNORE_INDEX = not trained) and are shifted
        here on the text alone, so every inserted token is ignored. Default: labels = input_ids.
        text_chunk_sizes: per sequence, the text tokens of each chunk (each 1..chunk_size);
        default: full chunks and one remainder. Shorter sequences are padded with empty chunks.
        restarts: per sequence, the chunks (> 0) at which its memories start over: a packed sequence's
        documents, each starting a chunk, then share nothing (see restart_plan).
        """
        cfg = self.config
        if not input_ids:
            raise CometInputError("no sequences to lay out")
        labels = input_ids if labels is None else labels
        plans = []
        for i, ids in enumerate(input_ids):
            if len(ids) == 0:
                raise CometInputError(f"sequence {i} is empty")
            if len(labels[i]) != len(ids):
                raise CometInputError(f"sequence {i}: {len(labels[i])} labels for {len(ids)} tokens")
            sizes = list(text_chunk_sizes[i]) if text_chunk_sizes else fixed_chunk_sizes(len(ids), cfg.chunk_size)
            if sum(sizes) != len(ids) or any(not 1 <= s <= cfg.chunk_size for s in sizes):
                raise CometConfigError(f"sequence {i}: chunk sizes {sizes} must each be in 1..{cfg.chunk_size} "
                                       f"and sum to its {len(ids)} tokens")
            plans.append(sizes)
        num_chunks = max(len(p) for p in plans)
        shifted = [shift_labels(lab) for lab in labels]
        starts = [0] * len(input_ids)
        queues: list[list[bool]] = [[] for _ in input_ids]
        restart_at = [set(r) for r in restarts] if restarts else [set() for _ in input_ids]
        for t in range(num_chunks):
            rows = []
            for i, ids in enumerate(input_ids):
                size = plans[i][t] if t < len(plans[i]) else 0
                text = slice(starts[i], starts[i] + size)
                starts[i] += size
                restart = t > 0 and t in restart_at[i]
                if restart:  # the queue's entries become fillers: masked, and evicted first
                    queues[i] = [False] * len(queues[i])
                row, new_entries = self._lay_out_chunk(t, ids[text], shifted[i][text], queues[i], restart)
                realness = torch.tensor([queues[i] + new_entries])
                kept = fifo_keep(realness, cfg.queue_capacity)[0].tolist()
                queues[i] = [(queues[i] + new_entries)[k] for k in kept]
                rows.append(row)
            ids_t, labels_t, roles_t = (torch.tensor([r[k] for r in rows], dtype=torch.long) for k in range(3))
            yield Chunk(index=t, input_ids=ids_t, labels=labels_t, roles=roles_t)

    def layout(self, input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]] | None = None,
               text_chunk_sizes: Sequence[Sequence[int]] | None = None,
               restarts: Sequence[Sequence[int]] | None = None) -> list[Chunk]:
        return list(self.iter_chunks(input_ids, labels, text_chunk_sizes, restarts))

    def _lay_out_chunk(self, t: int, text: Sequence[int], text_labels: Sequence[int], queue: list[bool],
                       restart: bool) -> tuple[tuple[list[int], list[int], list[int]], list[bool]]:
        cfg, tok = self.config, self.tokens
        ids: list[int] = []
        labels: list[int] = []
        roles: list[int] = []

        def put(token: int, role: Role, label: int = IGNORE_INDEX) -> None:
            ids.append(token)
            labels.append(label)
            roles.append(role)

        if t > 0:
            for _ in range(cfg.global_slots):
                put(tok.placeholder_id, Role.GLOBAL_SLOT_EMPTY if restart else Role.GLOBAL_SLOT)
        for real in queue:
            put(tok.placeholder_id, Role.TEMP_SLOT if real else Role.TEMP_SLOT_EMPTY)
        real_beacons = 0
        for k, (token, label) in enumerate(zip(text, text_labels)):
            put(int(token), Role.TEXT, int(label))
            if cfg.temp_enabled and ((k + 1) % cfg.temp_stride == 0 or k + 1 == len(text)):
                put(tok.temp_beacon_id, Role.TEMP_BEACON)
                real_beacons += 1
        for beacon_id in tok.global_beacon_ids:
            put(beacon_id, Role.GLOBAL_BEACON)
        fillers = cfg.beacons_per_chunk - real_beacons
        for _ in range(fillers):
            put(tok.pad_id, Role.TEMP_BEACON_FILLER)
        for _ in range(cfg.chunk_length - len(ids)):
            put(tok.pad_id, Role.PAD)
        return (ids, labels, roles), [True] * real_beacons + [False] * fillers
