import numpy as np
import pytest

from lm import plots, scaling
from lm.points import Points

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def chinchilla_points():
    """Noisy learning curves (4 checkpoints each) from a Chinchilla-like law."""
    grid = np.meshgrid(np.geomspace(1e6, 1e9, 5), [5, 20, 80], [1, 2, 3, 4], indexing="ij")
    n, r, k = (a.ravel() for a in grid)
    d = n * r * k / 4
    noise = 0.005 * np.random.default_rng(0).standard_normal(n.size)
    loss = (1.8 + 400 * n ** -0.34 + 1500 * d ** -0.3) * (1 + noise)
    return Points(params=n, tokens=d, loss=loss, run=[f"{a:.0e}-{b}" for a, b in zip(n, r)], step=k)


def isoflop_points():
    """Five sizes around the optimum at each of three budgets; loss a parabola in log N."""
    c = np.repeat([1e18, 1e19, 1e20], 5)
    n_opt = 0.1 * c ** 0.5
    n = n_opt * np.tile(np.geomspace(0.25, 4, 5), 3)
    loss = 4 - 0.1 * np.log10(c) + 0.05 * np.log(n / n_opt) ** 2
    return Points(params=n, tokens=c / (6 * n), loss=loss)


def assert_pngs(paths, names):
    assert sorted(p.name for p in paths) == sorted(names)
    for path in paths:
        assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_plot_all_chinchilla_with_holdout_and_bootstrap(tmp_path):
    points = chinchilla_points()
    fit = scaling.fit(points, holdout="largest", bootstrap=6)
    paths = plots.plot_all(points, fit, tmp_path / "plots")
    assert_pngs(paths, ["loss_vs_compute.png", "residuals.png", "holdout.png"])


def test_plot_all_for_runs_on_one_tokens_per_parameter_line(tmp_path):
    """A fit with no compute-optimal split (every size at 20 tokens per parameter) still
    plots, without the frontier it cannot draw, so that a sweep's report gets written."""
    n = np.geomspace(1e6, 1e9, 6)
    # measured losses: exact ones leave a flat valley that each descent crawls along to its
    # iteration limit (a 12 s fit)
    noise = 0.005 * np.random.default_rng(0).standard_normal(6)
    loss = (1.8 + 400 * n ** -0.34 + 1500 * (20 * n) ** -0.3) * (1 + noise)
    points = Points(params=n, tokens=20 * n, loss=loss)
    fit = scaling.fit(points, bootstrap=0)
    assert not fit.allocation.determined
    assert_pngs(plots.plot_all(points, fit, tmp_path), ["loss_vs_compute.png", "residuals.png"])


def test_plot_all_isoflop(tmp_path):
    points = isoflop_points()
    fit = scaling.fit(points, "isoflop")
    assert_pngs(plots.plot_all(points, fit, tmp_path), ["loss_vs_compute.png", "isoflops.png"])


def test_chinchilla_isoflop_curves_and_missing_holdout(tmp_path):
    points = isoflop_points()
    fit = scaling.fit(points, drop_early=0)
    assert_pngs([plots.plot_isoflops(points, fit, tmp_path)], ["isoflops.png"])
    with pytest.raises(ValueError, match="no held-out runs"):
        plots.plot_holdout(points, fit, tmp_path)
