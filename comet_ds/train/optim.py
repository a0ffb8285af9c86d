"""AdamW with a learning-rate multiplier for the memory networks; linear warmup, then cosine to zero."""

from __future__ import annotations

import torch
from torch import nn

from comet_ds.schedule import warmup_schedule


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


def build_optimizer(module: nn.Module, memory_params: set[int], lr: float, weight_decay: float,
                    memory_lr_multiplier: float, warmup_steps: int, total_steps: int, schedule: str = "cosine",
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    groups = parameter_groups(module, memory_params, lr, weight_decay, memory_lr_multiplier)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_schedule(warmup_steps, total_steps, schedule))
