import numpy as np
import pytest

from lm.noise import (NOISE_FLOOR, Noise, noise_by_budget, noise_by_size, residual_noise,
                      seed_groups, seed_noise)
from lm.points import Points


def finals(groups: dict[tuple[float, float], list[float]]) -> Points:
    """Final points, one run per loss: {(N, D): [its seeds' losses]}."""
    return Points.from_rows([{"params": n, "tokens": d, "loss": loss, "run": f"{n}-{d}-{s}",
                              "annealed": True}
                             for (n, d), losses in groups.items()
                             for s, loss in enumerate(losses)])


def test_seed_noise_pools_the_spread_of_log_loss_over_runs_of_one_n_and_d():
    """Two groups of seeds (1 and 2 degrees of freedom) and a lone run (none): the pooled
    standard deviation of log L over the groups, by hand."""
    groups = {(1e6, 1e9): [3.0, 3.1], (2e6, 1e9): [2.8, 2.9, 2.75], (4e6, 1e9): [2.5]}
    ss = sum(np.sum((np.log(v) - np.log(v).mean()) ** 2) for v in groups.values())
    noise = seed_noise(finals(groups))
    assert noise.source == "seeds" and noise.df == 3 and noise.trend is None
    assert noise.sigma == pytest.approx(np.sqrt(ss / 3), rel=1e-12)
    assert noise.weights(finals(groups)) == pytest.approx(np.ones(6))  # no trend: all alike


def test_no_seeds_or_seeds_that_agree_exactly_measure_no_noise():
    assert seed_noise(finals({(1e6, 1e9): [3.0], (2e6, 1e9): [2.8]})) is None
    assert seed_noise(finals({(1e6, 1e9): [3.0, 3.0], (2e6, 1e9): [2.8, 2.8]})) is None


def test_noise_by_size_pools_each_size_over_its_budgets_and_skips_sizes_without_seeds():
    groups = {(1e6, 1e9): [3.0, 3.3], (1e6, 2e9): [2.9, 3.0], (2e6, 1e9): [2.8, 2.81],
              (4e6, 1e9): [2.5]}
    by_size = noise_by_size(finals(groups))
    assert sorted(by_size) == [1e6, 2e6]
    assert by_size[1e6].df == 2 and by_size[2e6].df == 1
    assert by_size[1e6].sigma > 10 * by_size[2e6].sigma
    assert by_size[2e6].sigma == pytest.approx(abs(np.log(2.81 / 2.8)) / np.sqrt(2))


def test_residual_noise_is_robust_to_outliers_and_never_below_the_floor():
    rng = np.random.default_rng(0)
    residuals = 0.01 * rng.standard_normal(2000)
    with_outliers = np.r_[residuals, np.full(40, 5.0)]
    assert residual_noise(residuals, 3).sigma == pytest.approx(0.01, rel=0.05)
    assert residual_noise(with_outliers, 3).sigma == pytest.approx(0.01, rel=0.08)
    assert residual_noise(np.zeros(10), 3) == Noise(NOISE_FLOOR, 7, "residuals")


def test_a_trend_sets_each_point_s_noise_and_weight():
    """log sigma = c0 + c_N log N + c_D log D; a point twice as noisy as sigma weighs half."""
    noise = Noise(0.01, 10, "seeds", trend=(np.log(0.02), 0.0, -1.0))
    assert noise.at(1e6, [1.0, 2.0]) == pytest.approx([0.02, 0.01])
    points = finals({(1e6, 1.0): [3.0], (1e6, 2.0): [2.9]})
    assert noise.weights(points) == pytest.approx([0.5, 1.0])
    assert "as N^+0.00 D^-1.00: points weighted by its inverse" in noise.describe()


def test_the_trend_holds_its_edge_value_beyond_the_seed_groups():
    """Seeds only where runs are cheap, their spread falling as D^-1, and one long lone run
    past them: the trend is measured on the seed groups' box and held at its edge beyond it,
    so the lone run weighs as the seeded budget at that corner, not 16x more."""
    rng = np.random.default_rng(0)
    groups = {(n, d): list(3.0 * np.exp(0.04 * (1e9 / d) * rng.standard_normal(8)))
              for n in (1e6, 2e6) for d in (1e9, 2e9, 4e9)}
    points = finals({**groups, (8e6, 64e9): [2.2]})
    noise = seed_noise(points)
    assert noise.trend is not None and noise.trend[2] < -0.5
    assert noise.span == pytest.approx(np.log([1e6, 2e6, 1e9, 4e9]))
    edge = noise.at(2e6, 4e9)
    assert noise.at(8e6, 64e9) == pytest.approx(edge)
    assert noise.at(1.5e6, 3e9) > edge  # inside the box the trend itself
    unclamped = Noise(noise.sigma, noise.df, noise.source, noise.trend)
    assert unclamped.at(8e6, 64e9) < edge / 4
    assert noise.weights(finals({(8e6, 64e9): [2.2]})) == pytest.approx([noise.sigma / edge])


def test_noise_by_budget_is_each_trial_s_own_spread():
    groups = {(1e6, 1e9): [3.0, 3.3], (1e6, 2e9): [2.9, 2.9001], (2e6, 1e9): [2.8]}
    by_budget = noise_by_budget(finals(groups))
    assert sorted(by_budget) == [(1e6, 1e9), (1e6, 2e9)]  # the lone run has none
    assert by_budget[(1e6, 1e9)].sigma == pytest.approx(abs(np.log(3.3 / 3.0)) / np.sqrt(2))
    assert by_budget[(1e6, 2e9)].sigma < 1e-4


def test_seeds_are_runs_of_one_n_and_d_to_rounding():
    """An N or D computed two ways (tokens as C / 6N) differs in its last bits: its runs are
    still seeds of one trial, for the noise and for the held-out mean alike; another N is not."""
    d = 6e20 / (6 * 1e6 * 1.1) * 1.1  # 1e14, but not to the last bit
    groups = {(1e6, 1e14): [3.0, 3.3], (1e6, d): [3.1], (1.001e6, 1e14): [2.9], (2e6, 1e14): [2.8]}
    assert d != 1e14
    points = finals(groups)
    assert [list(g) for g in seed_groups(points)] == [[0, 1, 2]]
    assert list(noise_by_budget(points)) == [(1e6, 1e14)]
    assert noise_by_budget(points)[(1e6, 1e14)].df == 2
