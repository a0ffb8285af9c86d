"""One CoMeT layer step: inject memories → HF decoder layer → read beacons → update memories."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from comet_ds.layout import ChunkIndices, attention_mask_from_roles, position_ids_from_roles
from comet_ds.modeling.memory import LayerMemory, MemoryState


def chunk_attention_mask(roles: torch.Tensor) -> torch.Tensor | None:
    """How sdpa masks the chunk: None (causal attention, no mask) where that is exact, else a boolean
    [B, 1, L, L] mask, True where a token may attend.

    A token attends causally to the attended tokens of its chunk (`attention_mask_from_roles`). When the
    attended tokens of every row come first (every chunk of sequences laid out in full chunks), causality
    alone hides the masked ones from every attended token, so no mask is needed: sdpa then runs with
    is_causal, where its fastest kernels (flash on CUDA, with grouped-query attention and no repeated keys)
    apply, and skips the blocks above the diagonal. Only the rows of masked tokens (padding, filler
    beacons) come out otherwise than under a full mask, and nothing reads them: they carry no label, and a
    filler's memory entry lands in a slot that is masked wherever it is used.

    Otherwise (a queue holding fillers puts masked slots ahead of text) a boolean mask: the same pattern
    as an additive float mask of 0 and the dtype's minimum, at a quarter of fp32's bytes and selected
    rather than added. A token left with no key at all (none occurs in a laid-out chunk, whose first
    token is always attended) may attend to itself: some kernels return NaN for a fully masked row, and a
    NaN row poisons every row that holds it as a key, even with zero weight.
    """
    attended = attention_mask_from_roles(roles).bool()
    if bool((attended[:, 1:] <= attended[:, :-1]).all()):  # attended tokens are a prefix of every row
        return None
    return _allowed(attended)


def allowed_keys(roles: torch.Tensor) -> torch.Tensor:
    """[B, 1, L, L] bool: True where a token may attend (see chunk_attention_mask)."""
    return _allowed(attention_mask_from_roles(roles).bool())


def _allowed(attended: torch.Tensor) -> torch.Tensor:
    length = attended.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=attended.device).tril()
    allowed = causal & attended[:, None, :]
    keyless = ~allowed.any(dim=-1, keepdim=True)
    return (allowed | (keyless & torch.eye(length, dtype=torch.bool, device=attended.device)))[:, None]


@dataclass(frozen=True)
class ChunkContext:
    """Everything a layer needs about the chunk besides its hidden states; built once per chunk."""

    attention_mask: torch.Tensor | None  # see chunk_attention_mask
    position_ids: torch.Tensor  # [B, L] chunk-local
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    indices: ChunkIndices

    @classmethod
    def build(cls, roles: torch.Tensor, rotary_embedding: nn.Module, dtype: torch.dtype,
              queue_capacity: int) -> ChunkContext:
        position_ids = position_ids_from_roles(roles)
        probe = torch.empty(0, dtype=dtype, device=roles.device)
        return cls(
            attention_mask=chunk_attention_mask(roles),
            position_ids=position_ids,
            position_embeddings=rotary_embedding(probe, position_ids),
            indices=ChunkIndices.from_roles(roles, queue_capacity),
        )


def gather_rows(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def scatter_rows(hidden: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Replace (not add) the rows of `hidden` at `index` with `rows`, out of place."""
    return hidden.scatter(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]), rows)


class CometLayer(nn.Module):
    """An unmodified HF decoder layer plus its memory networks."""

    def __init__(self, decoder_layer: nn.Module, memory: LayerMemory):
        super().__init__()
        self.decoder_layer = decoder_layer
        self.memory = memory
        self.activation_checkpointing = False

    def forward(self, hidden: torch.Tensor, ctx: ChunkContext,
                state: MemoryState | None) -> tuple[torch.Tensor, MemoryState]:
        idx = ctx.indices
        if state is not None:
            hidden = scatter_rows(hidden, idx.global_slots, state.global_memory)
            if state.temp_memory is not None:
                hidden = scatter_rows(hidden, idx.temp_slots, state.temp_memory)
        kwargs = {"attention_mask": ctx.attention_mask, "position_ids": ctx.position_ids,
                  "position_embeddings": ctx.position_embeddings}
        if self.activation_checkpointing and torch.is_grad_enabled():
            # only the stateless decoder layer is recomputed; memory bookkeeping runs once
            out = checkpoint(self.decoder_layer, hidden, use_reentrant=False, **kwargs)
        else:
            out = self.decoder_layer(hidden, **kwargs)
        if isinstance(out, tuple):  # older transformers return (hidden_states, ...)
            out = out[0]
        return out, self.next_state(out, idx, state)

    def next_state(self, out: torch.Tensor, idx: ChunkIndices, state: MemoryState | None) -> MemoryState:
        global_memory, global_state = self.memory.global_memory(
            gather_rows(out, idx.global_beacons), None if state is None else state.global_state, idx.global_restart)
        temp_memory = None
        if self.memory.temp_memory is not None:
            entries = self.memory.temp_memory(gather_rows(out, idx.temp_beacons))
            if state is not None and state.temp_memory is not None:
                entries = torch.cat([state.temp_memory, entries], dim=1)
            temp_memory = gather_rows(entries, idx.temp_keep)
        return MemoryState(global_memory, global_state, temp_memory)
