"""Learning-rate and loss-weight schedules: plain functions of the step, easy to test against a formula."""

from __future__ import annotations

import math


def lr_factor(step: int, total: int, warmup: int, shape: str, min_ratio: float) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based) of `total`:
    linear warm-up from 1/warmup to 1 over `warmup` steps, then cosine / linear decay to
    `min_ratio` at the last step, or constant."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if shape == "constant":
        return 1.0
    span = max(total - warmup - 1, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    if shape == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if shape == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    raise ValueError(f"unknown schedule {shape!r}")


def ramp(start: float, end: float, step: int, total: int, shape: str = "linear") -> float:
    """A value going from `start` at step 0 to `end` at the last step (loss weights, e.g. KD 1.0 -> 0.75)."""
    progress = min(step / max(total - 1, 1), 1.0)
    if shape == "cosine":
        progress = 0.5 * (1 - math.cos(math.pi * progress))
    return start + (end - start) * progress


def weight_at(weight, step: int, total: int) -> float:
    if isinstance(weight, dict):
        return ramp(float(weight["from"]), float(weight["to"]), step, total, weight.get("shape", "linear"))
    return float(weight)
