"""The learning rate of every step, computed on the host from the config.

It is an input of the compiled train step, not a constant inside it, so that one compiled
program serves runs of every length and learning rate (seeds, token budgets, sweeps).
"""

from __future__ import annotations

import math

from lm.config import OptimConfig


def learning_rate(o: OptimConfig, steps: int, step: int) -> float:
    """The learning rate of step index `step` (0-based) of a run of `steps` steps: linear
    warmup to `lr`, then cosine/linear decay to `lr * final_lr_ratio` at `steps`."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    floor = o.lr * o.final_lr_ratio
    progress = min(max((step - o.warmup_steps) / max(steps - o.warmup_steps, 1), 0.0), 1.0)
    if o.schedule == "cosine":
        return floor + (o.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if o.schedule == "linear":
        return o.lr - (o.lr - floor) * progress
    return o.lr


def annealed(o: OptimConfig, steps: int, step: int) -> bool:
    """Whether step `step` of a run of `steps` ends a decay of the learning rate, so that its
    loss is the loss a run of that length reaches (a point a scaling law can use as it is)."""
    return step == steps and o.schedule != "constant" and o.final_lr_ratio < 1
