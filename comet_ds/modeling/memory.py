"""The per-layer memory networks and the state they carry from one chunk to the next."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class MemoryState(NamedTuple):
    """What one layer hands from chunk t-1 to chunk t of the same layer.

    global_memory: [B, G, H] written into the global slots.
    global_state: [B, G, H] gated recurrent state the global memory is derived from.
    temp_memory: [B, q, H] temporary FIFO queue, oldest first (None when disabled or empty).
    """

    global_memory: torch.Tensor
    global_state: torch.Tensor
    temp_memory: torch.Tensor | None


def detach_state(state: MemoryState | None) -> MemoryState | None:
    """The same memory values with no gradient path back to the chunks that produced them."""
    if state is None:
        return None
    return MemoryState(*(None if x is None else x.detach() for x in state))


class LowRankAdapter(nn.Module):
    """x + up(down(x)) with a rank-r bottleneck: turns a state into the memory injected."""

    def __init__(self, hidden_size: int, rank: int):
        super().__init__()
        self.down = nn.Linear(hidden_size, rank, bias=False)
        self.up = nn.Linear(rank, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.down(x))


class GlobalMemory(nn.Module):
    """Gated recurrent global memory: one scalar gate per slot weighs the old state against the new.

    c = RMSNorm(global beacon outputs); s = c on the first chunk (no gate), else
    g = sigmoid(W [c; s_prev]) and s = g * s_prev + (1 - g) * c; memory = adapter(s).
    """

    def __init__(self, hidden_size: int, rank: int):
        super().__init__()
        self.norm = nn.RMSNorm(hidden_size)
        self.gate = nn.Linear(2 * hidden_size, 1, bias=False)
        self.adapter = LowRankAdapter(hidden_size, rank)

    def forward(self, beacon_outputs: torch.Tensor, previous_state: torch.Tensor | None,
                restart: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """restart: [B] bool, rows that start over here as on a first chunk (a new document); None: none."""
        candidate = self.norm(beacon_outputs)
        if previous_state is None:
            state = candidate
        else:
            gate = torch.sigmoid(self.gate(torch.cat([candidate, previous_state], dim=-1)))
            state = gate * previous_state + (1 - gate) * candidate
            if restart is not None:
                state = torch.where(restart[:, None, None], candidate, state)
        return self.adapter(state), state


class TempMemory(nn.Module):
    """Projects temporary beacon outputs into queue entries: adapter(RMSNorm(x))."""

    def __init__(self, hidden_size: int, rank: int):
        super().__init__()
        self.norm = nn.RMSNorm(hidden_size, eps=1e-12)
        self.adapter = LowRankAdapter(hidden_size, rank)

    def forward(self, beacon_outputs: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.norm(beacon_outputs))


class LayerMemory(nn.Module):
    """The memory networks of one decoder layer."""

    def __init__(self, hidden_size: int, rank: int, temp_enabled: bool, init_std: float):
        super().__init__()
        self.global_memory = GlobalMemory(hidden_size, rank)
        self.temp_memory = TempMemory(hidden_size, rank) if temp_enabled else None
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=init_std)
