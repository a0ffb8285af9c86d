"""The learning-rate schedules of every training in the package: linear warmup, then cosine to zero or
constant. Pretraining the tiny base (modeling) and fine-tuning (train) both use them, so they sit below both."""

from __future__ import annotations

import math
from collections.abc import Callable

# "constant" suits a stage of a curriculum whose next stage goes on learning: cosine brings the rate to zero
# exactly where that stage's loss is still falling
LR_SCHEDULES = ("cosine", "constant")


def warmup_schedule(warmup_steps: int, total_steps: int, kind: str = "cosine") -> Callable[[int], float]:
    """LambdaLR factor: 0 → 1 linearly over the warmup, then cosine down to 0 at total_steps, or 1 throughout."""
    if kind not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {kind!r}; choose one of {', '.join(LR_SCHEDULES)}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor
