"""AdamW with a learning-rate multiplier for the memory networks; linear warmup, then cosine to zero."""

from __future__ import annotations

import math

import torch
from torch import nn


def parameter_groups(module: nn.Module, memory_params: set[int], lr: float, weight_decay: float,
                     memory_lr_multiplier: float) -> list[dict]:
    """Trainable parameters of `module` in up to four groups: memory or not × decayed or not
    (vectors such as norm weights are not decayed)."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for param in module.parameters():
        if param.requires_grad:
            groups.setdefault((id(param) in memory_params, param.ndim > 1), []).append(param)
    return [{"params": params, "lr": lr * (memory_lr_multiplier if is_memory else 1.0),
             "weight_decay": weight_decay if decayed else 0.0}
            for (is_memory, decayed), params in sorted(groups.items())]


def warmup_cosine(warmup_steps: int, total_steps: int):
    """LambdaLR factor: 0 → 1 linearly over the warmup, then cosine down to 0 at total_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_optimizer(module: nn.Module, memory_params: set[int], lr: float, weight_decay: float,
                    memory_lr_multiplier: float, warmup_steps: int, total_steps: int,
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    groups = parameter_groups(module, memory_params, lr, weight_decay, memory_lr_multiplier)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, total_steps))
