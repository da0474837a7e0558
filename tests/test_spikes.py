import collections

import numpy as np

from lm import spikes

from conftest import small


def test_data_position_passes_over_the_skipped_ranges():
    first = [(15, 18)]  # a spike at step 18 rolled back to step 15
    assert [spikes.data_position(i, first) for i in (14, 15, 16)] == [14, 18, 19]
    both = first + [(19, 21)]  # then one at step 17 rolled back to step 16
    assert [spikes.data_position(i, both) for i in (14, 15, 16, 17)] == [14, 18, 21, 22]
    assert spikes.skip_range(small().train.spikes, 17, 16, first) == (19, 20)

    class Positions:
        def rows(self, step, lo, hi):
            return np.full((hi - lo, 1), step)

        def epoch(self, step):
            return step / 100

    skipping = spikes.Skipping(Positions(), tuple(both))
    assert skipping.rows(16, 0, 2).tolist() == [[21], [21]] and skipping.epoch(17) == 0.22


def test_spike_threshold_waits_for_the_start_and_a_full_window():
    s = small("train.spikes.factor=2", "train.spikes.window=3", "train.spikes.start_step=5",
              "train.spikes.max_spikes=1", "checkpoint.every_steps=1").train.spikes
    assert spikes.threshold(s, 4, [1.0, 2.0, 3.0]) == np.inf
    assert spikes.threshold(s, 5, [1.0, 2.0]) == np.inf
    assert spikes.threshold(s, 5, [1.0, 2.0, 9.0]) == 4.0  # twice the median
    recent = collections.deque([1.0, 1.0, 1.0], maxlen=3)
    spike = spikes.first_spike(s, 5, [1.5, 1.9, 3.1, 1.0], recent)
    assert (spike.step, spike.threshold) == (7, 3.0) and list(recent) == [1.0, 1.5, 1.9]
    assert spikes.first_spike(s, 1, [float("nan")], collections.deque()).step == 1


def test_a_step_whose_gradient_is_not_finite_is_one_though_its_loss_is():
    """Its update left the parameters non-finite: a save after it, or the run's end, would keep
    them (a sweep trial recorded done with a NaN validation loss)."""
    s = small().train.spikes
    losses = [spikes.checked_loss({"loss": 2.0, "grad_norm": g}) for g in (1.0, float("inf"))]
    spike = spikes.first_spike(s, 4, losses, collections.deque())
    assert spike.step == 5 and "loss or gradient became non-finite at step 5" in spike.describe(s)
