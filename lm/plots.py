"""PNG figures of a scaling-law fit, drawn from the points and the `Fit` of ``lm.scaling``.

matplotlib is imported inside the functions (importing this module stays cheap) and figures are
drawn on Agg canvases without pyplot, so nothing depends on a display or on global figure state.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from lm import laws, scaling
from lm.errors import FitError
from lm.points import Points, budget_labels
from lm.scaling import Fit


def _figure(title: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.8), layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    return fig, ax


def _save(fig, out_dir: str | Path, name: str) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)  # render with Agg whatever backend pyplot may have chosen
    fig.savefig(path, dpi=120)
    return path


def _size_colours(fig, ax, points: Points) -> np.ndarray:
    """RGBA per point by log10 params, with a colour bar that says so."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    logn = np.log10(points.params)
    norm = Normalize(logn.min(), max(logn.max(), logn.min() + 1e-9))  # one size: no zero range
    mappable = ScalarMappable(norm, colormaps["viridis"])
    fig.colorbar(mappable, ax=ax, label="log10 params")
    return mappable.to_rgba(logn)


def _roles(points: Points, fit: Fit) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Masks of the points the fit left out (early, not annealed, under-trained), of the
    held-out runs' points, and of the outlier runs' points."""
    held = np.isin(points.run, [r.run for r in fit.holdout])
    return scaling.unused_mask(fit, points), held, np.isin(points.run, list(fit.outliers))


def _scatter_roles(ax, x, y, colours, unused, held, outlier) -> None:
    used = ~unused & ~held
    ax.scatter(x[used], y[used], c=colours[used], s=12, label="fitted")
    if (unused & ~held).any():
        ax.scatter(x[unused & ~held], y[unused & ~held], c=colours[unused & ~held], s=8,
                   alpha=0.25, label="not fitted (early, not annealed or under-trained)")
    if held.any():
        ax.scatter(x[held], y[held], c=colours[held], s=70, marker="*", edgecolors="red",
                   label="held out")
    if (outlier & used).any():
        ax.scatter(x[outlier & used], y[outlier & used], s=60, facecolors="none",
                   edgecolors="black", label="outlier (> 3 noise sigmas)")


def _budgets(points: Points) -> list[Points]:
    """Runs' final points per compute budget, where a budget has enough sizes for a curve."""
    final = points.select(points.final_mask())
    labels = budget_labels(final)
    groups = (final.select(labels == label) for label in np.unique(labels))
    return [g for g in groups if len(np.unique(g.params)) >= 3]


def plot_loss_vs_compute(points: Points, fit: Fit, out_dir: str | Path) -> Path:
    """Every run's loss against compute, and what the law says is reachable at each compute."""
    from matplotlib.collections import LineCollection

    fig, ax = _figure(f"{fit.law} fit: loss vs compute")
    colours = _size_colours(fig, ax, points)
    order = np.lexsort((points.tokens, points.run))
    x, y, run = points.flops[order], points.loss[order], points.run[order]
    same_run = run[1:] == run[:-1]  # consecutive checkpoints of one run form its learning curve
    segments = np.stack([np.c_[x[:-1], y[:-1]], np.c_[x[1:], y[1:]]], axis=1)[same_run]
    ax.add_collection(LineCollection(segments, colors=colours[order][:-1][same_run],
                                     linewidths=0.8, alpha=0.6))
    _scatter_roles(ax, points.flops, points.loss, colours, *_roles(points, fit))

    grid = np.geomspace(points.flops.min(), 10 * points.flops.max(), 200)
    try:
        pred = scaling.predict(fit, flops=grid)
    except FitError:  # no compute-optimal split to draw: the fit's allocation says why
        pred = {}
    if "loss" in pred:
        label = "L(C) fit" if fit.law == "kaplan" else "compute-optimal frontier L(N_opt, D_opt)"
        ax.plot(grid, pred["loss"], "k-", lw=1.5, label=label)
        if "intervals" in pred:
            ax.fill_between(grid, *pred["intervals"]["loss"], color="k", alpha=0.15, lw=0,
                            label="95% interval")
    if fit.budgets:
        ax.plot([b.flops for b in fit.budgets], [b.loss for b in fit.budgets], "kD",
                label="IsoFLOP minima")
    ax.set(xscale="log", xlabel="compute C (FLOPs)", ylabel="loss")
    ax.legend(fontsize="small")
    return _save(fig, out_dir, "loss_vs_compute.png")


def plot_isoflops(points: Points, fit: Fit, out_dir: str | Path) -> Path:
    """Final loss against params per compute budget; the fitted parabolas (isoflop) or the law's
    IsoFLOP curves L(N, C/6N) (chinchilla) over them."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LogNorm

    budgets = _budgets(points)
    centres = [float(np.exp(np.log(b.flops).mean())) for b in budgets]
    flops = centres + [b.flops for b in fit.budgets]
    if not flops:
        raise ValueError("no compute budget has >= 3 model sizes to draw an IsoFLOP curve")
    fig, ax = _figure(f"{fit.law} fit: IsoFLOP curves")
    colour = ScalarMappable(LogNorm(min(flops), max(flops) * (1 + 1e-9)), colormaps["plasma"])
    fig.colorbar(colour, ax=ax, label="compute C (FLOPs)")
    for b, c in zip(budgets, centres):
        ax.scatter(b.params, b.loss, color=colour.to_rgba(c), s=14)
        if fit.law in laws.ND_LAWS:
            n = np.geomspace(b.params.min() / 1.5, b.params.max() * 1.5, 100)
            d = c / scaling.run_flops(fit, n, 1.0)  # the points' FLOPs per token, not 6N
            law = scaling.predict(fit, params=n, tokens=d)["loss"]
            ax.plot(n, law, "--", color=colour.to_rgba(c), lw=1)
    for b in fit.budgets:
        n = np.geomspace(*b.params_range, 100)
        parabola = b.loss + b.curvature * np.log(n / b.params) ** 2
        ax.plot(n, parabola, color=colour.to_rgba(b.flops), lw=1)
        ax.plot(b.params, b.loss, "kD", ms=4)
    ax.set(xscale="log", xlabel="params N", ylabel="final loss")
    return _save(fig, out_dir, "isoflops.png")


def plot_holdout(points: Points, fit: Fit, out_dir: str | Path) -> Path:
    """Predicted against actual loss: the fitted points in grey, held-out runs' finals in red."""
    if not fit.holdout:
        raise ValueError("the fit has no held-out runs; fit with holdout= to get this plot")
    unused, held, _ = _roles(points, fit)
    used = points.select(~unused & ~held)
    runs = fit.holdout
    actual = np.array([r.loss for r in runs])
    predicted = np.array([r.predicted for r in runs])
    fig, ax = _figure(f"{fit.law} fit: held-out runs, mean ARE {fit.are:.2%}")
    ax.scatter(used.loss, scaling.predicted_loss(fit, used), c="0.6", s=8, label="fitted points")
    yerr = None
    if runs[0].interval:  # bars span the 95% interval for an actual run
        lo, hi = np.array([r.interval for r in runs]).T  # one may miss its own estimate
        yerr = np.clip([predicted - lo, hi - predicted], 0, None)
    ax.errorbar(actual, predicted, yerr=yerr, fmt="*", color="red", ms=10, capsize=3,
                label="held out (final), 95% interval for a run")
    for r in runs:
        ax.annotate(f"{r.run}: {r.are:.1%}", (r.loss, r.predicted), fontsize="small",
                    xytext=(5, -10), textcoords="offset points")
    lims = [min(used.loss.min(), actual.min()), max(used.loss.max(), actual.max())]
    ax.plot(lims, lims, "k:", lw=1, label="predicted = actual")
    ax.set(xlabel="actual loss", ylabel="predicted loss")
    ax.legend(fontsize="small")
    return _save(fig, out_dir, "holdout.png")


def plot_residuals(points: Points, fit: Fit, out_dir: str | Path) -> Path:
    """log L - log L_fit against compute: structure here is what the law misses."""
    residual = np.log(points.loss) - np.log(scaling.predicted_loss(fit, points))
    fig, ax = _figure(f"{fit.law} fit: residuals")
    _scatter_roles(ax, points.flops, residual, _size_colours(fig, ax, points), *_roles(points, fit))
    ax.axhline(0, color="k", lw=1)
    ax.set(xscale="log", xlabel="compute C (FLOPs)", ylabel="log loss - log fitted loss")
    ax.legend(fontsize="small")
    return _save(fig, out_dir, "residuals.png")


def plot_all(points: Points, fit: Fit, out_dir: str | Path) -> list[Path]:
    """Every figure that applies to this fit; returns the paths written."""
    plots: list[Callable] = [plot_loss_vs_compute]
    if fit.law == "isoflop" or _budgets(points):
        plots.append(plot_isoflops)
    if fit.law in laws.LOSS_LAWS:
        plots.append(plot_residuals)
    if fit.holdout:
        plots.append(plot_holdout)
    return [plot(points, fit, out_dir) for plot in plots]
