"""Learning-rate schedule: the 'poly' policy of the paper (Sec. IV-B)."""

from __future__ import annotations


def poly_lr(base_lr: float, step: int, total_steps: int, power: float = 0.9) -> float:
    """lr = base_lr * (1 - step / total_steps) ** power, for step in [0, total_steps)."""
    if total_steps <= 0:
        raise ValueError("total_steps must be positive")
    progress = min(max(step, 0), total_steps) / total_steps
    return base_lr * (1.0 - progress) ** power
