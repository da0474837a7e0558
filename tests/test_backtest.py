"""The law's reach, tried on its own runs: small where the law holds, large and of the right
sign where it does not, and said plainly where there are too few runs to try it. Beside it,
the other law of N and D's predictions of the held-out runs."""

from dataclasses import replace

import numpy as np
import pytest

from lm import backtest, scaling
from lm.points import Points
from test_scaling import KAPLAN_ND, kaplan_nd, law


def grid(loss_fn, noise, seed=0, sizes=np.geomspace(1e6, 1e9, 10), ratios=(5, 10, 20, 40)):
    rng = np.random.default_rng(seed)
    n, r = (a.ravel() for a in np.meshgrid(sizes, ratios))
    d = n * r
    loss = loss_fn(n, d) * np.exp(noise * rng.standard_normal(n.size))
    return Points(params=n, tokens=d, loss=loss, run=[f"N{a:.3g}-r{b}" for a, b in zip(n, r)],
                  annealed=np.ones(n.size, bool))


def test_where_the_law_holds_its_reach_misses_by_about_the_noise():
    points = grid(law, 0.003)
    tried = backtest.backtest(scaling.fit(points), points, 16.0)
    assert tried.ratio == 16.0 and tried.runs == 6 and tried.refit_runs == 34
    assert tried.rms < 3 * 0.003 and abs(tried.mean) < 2 * 0.003
    assert "refitted on the 34 runs with at most 1/16" in backtest.describe(tried)


def test_a_law_of_the_wrong_shape_shows_in_its_reach_with_its_sign():
    """Kaplan's L(N, D) (data saturation depends on size) fitted with Chinchilla's sum: the
    sum, fitted on the small runs, misses the large ones far beyond the noise."""
    points = grid(lambda n, d: kaplan_nd(n, d, dict(KAPLAN_ND, N_c=2e9, D_c=5e10)), 0.002)
    wrong = backtest.backtest(scaling.fit(points, "chinchilla"), points, 4.0)
    right = backtest.backtest(scaling.fit(points, "kaplan-nd"), points, 4.0)
    assert wrong.runs == right.runs == np.sum(points.flops > points.flops.max() / 4)
    assert wrong.rms > 5 * 0.002 and wrong.mean > 3 * 0.002  # the sum predicts too low
    assert right.rms < 2 * 0.002


def test_too_few_runs_below_the_reach_say_so():
    points = grid(law, 0.003, sizes=np.geomspace(1e6, 4e6, 3))
    fit = scaling.fit(points)
    tried = backtest.backtest(fit, points, 1000.0)
    assert tried.runs == 0 and tried.rms is None
    assert backtest.describe(tried).startswith("backtest: too few fitting runs below 1/1e+03")
    assert backtest.backtest(fit, points, 1.0).runs == 0  # no reach to try
    # five runs below, for the five parameters of Chinchilla's sum: a refit, but no test
    points = grid(law, 0.003, sizes=np.geomspace(1e6, 1e9, 20), ratios=(5, 40))
    fit, flops = scaling.fit(points), np.sort(points.flops)
    for k in (5, 6):
        tried = backtest.backtest(fit, points, flops[-1] / flops[k - 1] / 1.001)
        assert (tried.runs > 0, tried.refit_runs) == ((True, 6) if k == 6 else (False, 0))


def test_the_farthest_reach_the_runs_can_try_is_tried():
    points = grid(law, 0.003)
    fit = scaling.fit(points)
    assert backtest.farthest(fit, points, [1e8, 16.0, 16.0]) == backtest.backtest(
        fit, points, 16.0)
    assert backtest.farthest(fit, points, [1e8]) == backtest.Backtest(1e8)


def test_a_refit_that_did_not_converge_is_said_to_be_rough(monkeypatch):
    points = grid(law, 0.003)
    fit, real = scaling.fit(points), scaling.fit
    assert backtest.backtest(fit, points, 16.0).converged
    monkeypatch.setattr(scaling, "fit", lambda *a, **k: replace(real(*a, **k), converged=False))
    tried = backtest.backtest(fit, points, 16.0)
    assert not tried.converged and tried.runs == 6
    assert backtest.describe(tried).endswith("did not meet its tolerance, so its error may be "
                                             "the optimiser's")
    assert "tolerance" not in backtest.describe(replace(tried, converged=True))


def test_a_refit_that_fails_any_way_leaves_no_backtest_and_no_error(monkeypatch):
    """A few runs flat in N made kaplan-nd's refit raise ValueError (math domain error), which
    once crashed `lm fit` after its fit and would have kept a sweep from registering."""
    points = grid(law, 0.003)
    fit = scaling.fit(points)

    def failing(*args, **kwargs):
        raise ValueError("math domain error")

    held = scaling.fit(points, holdout="largest")
    monkeypatch.setattr(scaling, "fit", failing)
    tried = backtest.backtest(fit, points, 16.0)
    assert tried == backtest.Backtest(16.0)
    spread = backtest.other_law(held, points, holdout="largest")
    assert spread == backtest.Spread("kaplan-nd")
    assert backtest.describe_spread(spread).endswith("could not be fitted to these runs")
    assert backtest.describe(backtest.Backtest(0.5)).startswith("backtest: none")


def test_the_other_law_shows_how_far_a_laws_shape_alone_moves_the_held_out_runs():
    """Kaplan's L(N, D) as truth, the largest runs held out: Chinchilla's sum predicts them too
    low, and the other law of N and D, fitted alike, says by about how much."""
    points = grid(lambda n, d: kaplan_nd(n, d, dict(KAPLAN_ND, N_c=2e9, D_c=5e10)), 0.002)
    held = {"holdout": None, "holdout_above": points.flops.max() / 12}
    sum_fit = scaling.fit(points, "chinchilla", **held)
    spread = backtest.other_law(sum_fit, points, **held)
    alone = scaling.fit(points, "kaplan-nd", **held)  # fitted alike: the same options
    z = np.log([a.predicted / s.predicted for a, s in zip(alone.holdout, sum_fit.holdout)])
    assert [a.run for a in alone.holdout] == [s.run for s in sum_fit.holdout]
    assert (spread.law, spread.runs) == ("kaplan-nd", len(sum_fit.holdout)) and spread.runs >= 4
    assert spread.rms == pytest.approx(np.sqrt(np.mean(z ** 2)))
    assert spread.mean == pytest.approx(z.mean()) and spread.largest == pytest.approx(
        np.abs(z).max())
    sum_error = np.mean([np.log(s.loss / s.predicted) for s in sum_fit.holdout])
    assert spread.mean > 3 * 0.002 and spread.mean == pytest.approx(sum_error, rel=0.5)
    assert "kaplan-nd, fitted alike, predicts the" in backtest.describe_spread(spread)
    assert "mean +" in backtest.describe_spread(spread)
    # a law of compute has no other law of N and D; a fit without held-out runs nothing to move
    assert backtest.other_law(scaling.fit(points, "kaplan", **held), points, **held) is None
    assert backtest.other_law(scaling.fit(points, "chinchilla"), points) is None
