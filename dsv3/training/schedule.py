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


def schedule_warning(t: TrainConfig) -> str | None:
    """A warning line when the schedule of :func:`lr_at` cannot run its course: with
    ``warmup_steps >= steps`` the rate never decays, and reaches ``lr`` only at the last step
    (``==``) or never (``>``). None otherwise."""
    if t.warmup_steps > t.steps:
        return (f"warning: train.warmup_steps={t.warmup_steps} > train.steps={t.steps}: the learning rate ends "
                f"at {lr_at(t.steps - 1, t):.2e}, never reaching train.lr={t.lr:g} nor decaying; lower "
                "train.warmup_steps")
    if t.warmup_steps == t.steps:
        return (f"warning: train.warmup_steps=train.steps={t.steps}: the learning rate reaches train.lr={t.lr:g} "
                "only at the last step and never decays; lower train.warmup_steps")
    return None
