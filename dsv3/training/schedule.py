"""Learning-rate schedule: linear warmup, then cosine decay (DeepSeek-V3 report §4.2, simplified)."""

from __future__ import annotations

import math

from dsv3.config import TrainConfig


def lr_at(step: int, t: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    ``lr * (step+1) / warmup_steps`` during warmup; then cosine from ``lr`` down to
    ``lr * min_lr_ratio`` at the last step.
    """
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    span = max(t.steps - t.warmup_steps - 1, 1)
    progress = min((step - t.warmup_steps) / span, 1.0)
    floor = t.lr * t.min_lr_ratio
    return floor + (t.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
