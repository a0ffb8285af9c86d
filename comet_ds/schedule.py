"""The learning-rate schedule of every training in the package: linear warmup, then cosine to zero.
Pretraining the tiny base (modeling) and fine-tuning (train) both use it, so it sits below both."""

from __future__ import annotations

import math
from collections.abc import Callable


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LambdaLR factor: 0 → 1 linearly over the warmup, then cosine down to 0 at total_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor
