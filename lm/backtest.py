"""The law's reach, measured on its own runs.

Before an extrapolation of r x the largest fitting run's compute is trusted, the law is refitted
on the fitting runs with at most 1/r of that compute and predicts the fitting runs above it:
an extrapolation of up to r x, made where the answer is known. Its error measures a law of the
wrong shape, which on public sweeps was most of the error (their held-out residuals were 3-5
times the fitted ones; the README). It is reported beside the interval, a check on it: one
split, with fewer runs than the fit, is a noisy measure; what goes into the interval is
`scaling.Misfit`, modelled over many splits. On the main job's 28 registered studies and 16
fits of eight public sweeps its RMS error was of the order of the held-out runs' (median 1.9%
against 1.2% and 1.8%) and its sign theirs in 33 of 44, but single values ranged from a
quarter to sixty times theirs.

Beside it, `other_law`: the other law of N and D, fitted alike, predicts the same held-out
runs. Their gap is how far a law's shape alone moves the extrapolation, a part of the error
that neither law's interval holds where the runs cannot tell the shapes apart (README: on
Li et al.'s (Mis)Fitting runs the two laws swap places with the point filter).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lm import laws, scaling
from lm.errors import FitError
from lm.points import Points


@dataclass(frozen=True)
class Backtest:
    ratio: float  # the extrapolation tried: the refit's runs have <= 1/ratio of the compute
    runs: int = 0  # the fitting runs above, predicted (0: too few runs on a side to try)
    rms: float | None = None  # of log(actual / predicted) over them: a relative error
    mean: float | None = None  # its mean: > 0 where the law predicts too low
    refit_runs: int = 0  # the runs the refit saw (0 in fits written before it was kept)
    converged: bool = True  # the refit's optimiser met its tolerance


def backtest(fit: scaling.Fit, points: Points, ratio: float) -> Backtest:
    """Refit `fit`'s law, with its settings, on the points it used from the runs whose final
    compute is at most 1/`ratio` of the largest, and score the refit on the other runs' final
    points (none scored where either side is empty or too small to fit). `points`: those
    `fit` was fitted on or left out (its held-out runs are set aside)."""
    if ratio <= 1 or fit.law not in laws.LOSS_LAWS:  # no reach to try, or no loss to score
        return Backtest(float(ratio))
    held = np.isin(points.run, [h.run for h in fit.holdout])
    used = points.select(~held & ~scaling.unused_mask(fit, points))
    final = used.select(used.final_mask())
    if not len(final):
        return Backtest(float(ratio))
    below = final.flops <= final.flops.max() / ratio
    # a refit on no more runs than the law has parameters measures its own looseness
    if below.all() or below.sum() <= len(laws.by_name(fit.law).names):
        return Backtest(float(ratio))
    try:  # a few runs may not pin the law down: no backtest, and no noise about it
        with np.errstate(all="ignore"):
            refit = scaling.fit(used.select(np.isin(used.run, final.run[below])), fit.law,
                                drop_early=fit.drop_early,
                                min_tokens_per_param=fit.min_tokens_per_param, loss=fit.loss,
                                huber_delta=fit.huber_delta if fit.loss == "huber" else None)
    except (FitError, ArithmeticError, ValueError):  # ValueError: numpy's LinAlgError too
        return Backtest(float(ratio))
    above = final.select(~below)
    z = np.log(above.loss / scaling.predicted_loss(refit, above))
    return Backtest(float(ratio), len(above), float(np.sqrt(np.mean(z ** 2))),
                    float(np.mean(z)), int(below.sum()), refit.converged)


def farthest(fit: scaling.Fit, points: Points, ratios) -> Backtest:
    """The backtest at the largest of the held-out runs' `ratios` that the fitting runs can
    try (a 30x reach may leave too few runs below; the 4x beside it not). Each try is a refit:
    of many close ratios, only those 1.25x apart are tried, largest first."""
    tried = []
    for r in sorted(set(ratios), reverse=True):
        if tried and r > tried[-1].ratio / 1.25:
            continue
        tried.append(backtest(fit, points, r))
        if tried[-1].runs:
            return tried[-1]
    return tried[0] if tried else Backtest(0.0)


def describe(b: Backtest) -> str:
    """One line for a fit's summary and a sweep's report."""
    if b.ratio <= 1:
        return "backtest: none (no held-out run goes beyond the fitting runs' compute)"
    if not b.runs:
        return (f"backtest: too few fitting runs below 1/{b.ratio:.3g} of the largest's "
                "compute to refit the law and try a reach of that size on the runs above")
    return (f"backtest: refitted on the {f'{b.refit_runs} ' if b.refit_runs else ''}runs "
            f"with at most 1/{b.ratio:.3g} of the largest "
            f"fitting run's compute, the law predicts the {b.runs} above with an RMS error of "
            f"{100 * b.rms:.2f}% (mean {100 * b.mean:+.2f}%: "
            f"{'actual above predicted' if b.mean > 0 else 'actual below predicted'})"
            + ("; the refit did not meet its tolerance, so its error may be the optimiser's"
               if not b.converged else ""))


@dataclass(frozen=True)
class Spread:
    law: str  # the other law of N and D
    runs: int = 0  # the held-out runs both predict (0: the other law could not be fitted)
    rms: float | None = None  # of log(its prediction / the fit's) over them
    mean: float | None = None  # its mean: > 0 where the other law predicts higher
    largest: float | None = None  # the largest |log(its prediction / the fit's)|


def other_law(fit: scaling.Fit, points: Points, **options) -> Spread | None:
    """Fit the other law of N and D to `points` with the `options` `fit` was made with (its
    held-out runs, point filters and loss; no bootstrap), and compare their predictions of the
    held-out runs. None for a law of compute, or a fit without held-out runs."""
    other = laws.other_nd_law(fit.law)
    if other is None or not fit.holdout:
        return None
    try:
        with np.errstate(all="ignore"):
            refit = scaling.fit(points, other, **options)
    except (FitError, ArithmeticError, ValueError):
        return Spread(other)
    theirs = {h.run: h.predicted for h in refit.holdout}
    z = np.log([theirs[h.run] / h.predicted for h in fit.holdout if h.run in theirs])
    if not z.size:
        return Spread(other)
    return Spread(other, len(z), float(np.sqrt(np.mean(z ** 2))), float(np.mean(z)),
                  float(np.max(np.abs(z))))


def describe_spread(s: Spread) -> str:
    """One line for a fit's summary."""
    if not s.runs:
        return f"the other law of N and D, {s.law}, could not be fitted to these runs"
    gap = (f"the held-out run {100 * abs(s.mean):.2f}% {'higher' if s.mean > 0 else 'lower'}"
           if s.runs == 1 else f"the {s.runs} held-out runs {100 * s.rms:.2f}% from this one "
           f"(RMS; mean {100 * s.mean:+.2f}%, at most {100 * s.largest:.2f}%)")
    return (f"the other law of N and D, {s.law}, fitted alike, predicts {gap}: a law's shape "
            "alone moves the prediction that much")
