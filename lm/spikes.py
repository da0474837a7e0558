"""Loss spikes (PaLM, Chowdhery et al. 2022): which step is one, and the data it skips.

A step whose loss or gradient is non-finite, or whose loss is above `factor` x the running
median of the `window` steps before it, rolls the run back to its newest checkpoint and passes
over the batches from there through the spike. All of it is a pure function of (step, losses,
ranges skipped), so a resumed run reads exactly the batches an uninterrupted one does.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import statistics

import numpy as np

from lm.config import Config, SpikeConfig
from lm.errors import TrainingError


def data_position(step: int, skipped) -> int:
    """The batch that step index `step` reads, counted in an uninterrupted run's steps, when the
    data positions in the `skipped` ranges [start, stop) are passed over. Rollbacks only go
    forward in the data, so the ranges ascend and each applies to every step from its start."""
    position = step
    for start, stop in skipped:
        if position >= start:
            position += stop - start
    return position


@dataclasses.dataclass(frozen=True)
class Skipping:
    """`source` with the `skipped` data positions passed over: step i reads its batch at
    data_position(i). A pure function of (step, skipped), like the data itself."""

    source: object  # an lm.data.Source
    skipped: tuple[tuple[int, int], ...] = ()

    def rows(self, step: int, lo: int, hi: int) -> np.ndarray:
        return self.source.rows(data_position(step, self.skipped), lo, hi)

    def epoch(self, step: int) -> float:
        return self.source.epoch(data_position(step, self.skipped))


@dataclasses.dataclass(frozen=True)
class Spike:
    step: int
    loss: float
    threshold: float  # the loss it went over; inf before detection starts

    def describe(self, s: SpikeConfig) -> str:
        if not math.isfinite(self.loss):
            return f"loss or gradient became non-finite at step {self.step}"
        return (f"loss spiked to {self.loss:.4g} at step {self.step}, over {s.factor} × the "
                f"median of the {s.window} steps before it ({self.threshold / s.factor:.4g})")

    def event(self, back_to: int, skipped: list) -> dict:
        """The metrics.jsonl row of the rollback: an `event` at the spike's step, followed by
        the rows of the steps the run does again from `back_to`."""
        finite = math.isfinite(self.loss)
        return {"step": self.step, "event": "loss_spike", "loss": self.loss if finite else None,
                "threshold": self.threshold if math.isfinite(self.threshold) else None,
                "rolled_back_to": back_to, "skipped": list(skipped[-1]), "spikes": len(skipped)}

    def error(self, cfg: Config) -> TrainingError:
        s, o = cfg.train.spikes, cfg.optim
        too_many = f", one spike more than train.spikes.max_spikes={s.max_spikes} allows"
        return TrainingError(f"{self.describe(s)}{too_many if s.max_spikes else ''}; lower "
                             f"optim.lr (now {o.lr}) or set optim.clip_norm (now {o.clip_norm})")


def checked_loss(metrics: dict) -> float:
    """A step's loss as the check sees it: non-finite where its gradient was, as the update it
    made left the parameters non-finite though the loss it was taken at was not (the last step
    of a run, or the step before a save, would otherwise pass them on unseen)."""
    loss = float(metrics["loss"])
    return loss if math.isfinite(float(metrics["grad_norm"])) else math.nan


def threshold(s: SpikeConfig, step: int, recent) -> float:
    """The loss above which `step` is a spike, given the losses of the steps before it: `factor`
    times their running median, once there are `window` of them and `start_step` is reached."""
    if not s.factor or step < s.start_step or len(recent) < s.window:
        return math.inf
    return s.factor * statistics.median(recent)


def first_spike(s: SpikeConfig, first_step: int, losses: list[float],
                recent: collections.deque) -> Spike | None:
    """The first of `losses` (of steps first_step, first_step + 1, ...) that is non-finite or
    over its threshold; `recent` (the running window) takes the losses before it."""
    for step, loss in enumerate(losses, first_step):
        limit = threshold(s, step, recent)
        if not math.isfinite(loss) or loss > limit:
            return Spike(step, loss, limit)
        recent.append(loss)
    return None


def skip_range(s: SpikeConfig, spike_step: int, back_to: int, skipped) -> tuple[int, int]:
    """The data positions passed over after rolling back from a spike at `spike_step` to the
    checkpoint of step `back_to`: those of the steps in between, which led to the spike, or
    `skip_batches` if more (PaLM went back ~100 steps and skipped 200-500 batches)."""
    start = data_position(back_to, skipped)
    return start, start + max(s.skip_batches, spike_step - back_to)
