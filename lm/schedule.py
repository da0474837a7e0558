"""The learning rate of every step, computed on the host from the config.

It is an input of the compiled train step, not a constant inside it, so that one compiled
program serves runs of every length and learning rate (seeds, token budgets, sweeps).

WSD (warmup-stable-decay, Hägele et al. 2024) holds the rate constant after warmup and decays
it over the final `decay_fraction` of the run only. Before the decay, runs of every length
follow the same rates: a cooldown *branch* that starts from a longer run's checkpoint at its
own decay start trains exactly as a run of its length from scratch would.
"""

from __future__ import annotations

import math

from lm.config import OptimConfig


def decay_start(o: OptimConfig, steps: int) -> int:
    """The first step of a wsd run's decay (the steps before it hold the peak rate)."""
    return steps - round(o.decay_fraction * steps)


def learning_rate(o: OptimConfig, steps: int, step: int) -> float:
    """The learning rate of step index `step` (0-based) of a run of `steps` steps: linear
    warmup to `lr`, then cosine/linear decay to `lr * floor` at `steps`, or wsd's plateau
    and final decay (linear or 1-sqrt) to it."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    floor = o.lr * o.floor
    if o.schedule == "constant":
        return o.lr
    if o.schedule == "wsd":
        start = decay_start(o, steps)
        if step < start:
            return o.lr
        progress = (step - start) / (steps - start)
        shape = progress if o.decay_shape == "linear" else math.sqrt(progress)
        return floor + (o.lr - floor) * (1 - shape)
    progress = min(max((step - o.warmup_steps) / max(steps - o.warmup_steps, 1), 0.0), 1.0)
    if o.schedule == "cosine":
        return floor + (o.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return o.lr - (o.lr - floor) * progress


def annealed(o: OptimConfig, steps: int, step: int) -> bool:
    """Whether step `step` of a run of `steps` ends a decay of the learning rate, so that its
    loss is the loss a run of that length reaches (a point a scaling law can use as it is).
    Step i runs at the schedule's rate at i (0 .. steps-1), which reaches the floor at `steps`:
    a run whose last step still warmed up or ran at the peak (a one-step decay) ended no decay."""
    last = steps - 1
    return step == steps and last >= o.warmup_steps and learning_rate(o, steps, last) < o.lr
