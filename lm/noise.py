"""Run-to-run noise of final losses, as a standard deviation of log L: pooled over seeds (runs
of one N and D), with its trend in N and D where the seeds show one, else from a fit's
residuals. The fitter weights points, sets Huber's delta and widens a run's interval by it; a
sweep's report shows it per model size."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import digamma, polygamma

from lm.points import Points

# No loss is known better than this (of log L): a float32 loss has 7 digits, a table often 4-5.
# Exact synthetic losses would otherwise set Huber's delta at rounding error (1e-11), where the
# optimiser cannot meet its tolerance and the profile of E cannot tell one E from another.
NOISE_FLOOR = 1e-5
CHI2_95_2DF = 5.991  # 95% quantile of chi-squared with 2 degrees of freedom: the trend's test
MAX_TREND_CORRELATION = 0.99  # |corr(log N, log D)| over the seed groups beyond which N and D
# cannot be told apart in the trend


@dataclass(frozen=True)
class Noise:
    """Run-to-run noise of a final loss, as a standard deviation of log L (a relative error),
    with its degrees of freedom and where it was measured: `seeds` (runs of one N and D) or
    `residuals` (of the fit, when no two runs share N and D). `trend`, where the seeds measure
    one: (c0, c_N, c_D) of log sigma = c0 + c_N log N + c_D log D (short runs of small models
    are far noisier than long ones), and `span`, the (log N, log D) box of the seed groups that
    measured it: (log N min, max, log D min, max)."""

    sigma: float
    df: int
    source: str
    trend: tuple[float, float, float] | None = None
    span: tuple[float, float, float, float] | None = None

    def at(self, params, tokens) -> np.ndarray:
        """The noise of a run of `params` on `tokens`: by the trend, else `sigma` everywhere.
        Beyond the seed groups the trend holds its value at their edge: seeds where runs are
        cheap (small models, short budgets) say nothing of how quiet the long runs past them
        are, and a trend carried out there would weight those runs without bound."""
        params, tokens = np.broadcast_arrays(np.asarray(params, float), np.asarray(tokens, float))
        if self.trend is None:
            return np.full(params.shape, self.sigma)
        c0, c_n, c_d = self.trend
        log_n, log_d = np.log(params), np.log(tokens)
        if self.span is not None:
            log_n, log_d = np.clip(log_n, *self.span[:2]), np.clip(log_d, *self.span[2:])
        return np.exp(c0 + c_n * log_n + c_d * log_d)

    def describe(self) -> str:
        """E.g. '0.80% of the loss (from seeds, 12 degrees of freedom), as N^+0.22 D^-1.08:
        points weighted by its inverse'."""
        trend = (f", as N^{self.trend[1]:+.2f} D^{self.trend[2]:+.2f}: points weighted by its "
                 "inverse" if self.trend else "")
        return (f"{self.sigma:.2%} of the loss (from {self.source}, {self.df} degrees of "
                f"freedom){trend}")

    def weights(self, points: Points) -> np.ndarray:
        """Each point's weight in the fit, sigma / its own noise: a point twice as noisy as
        the pooled noise counts half in log-loss units (1 everywhere without a trend)."""
        return self.sigma / self.at(points.params, points.tokens)


def _groups(finals: Points) -> tuple[np.ndarray, np.ndarray]:
    """Runs that share N and D (to 6 digits of their logs: an N or D computed two ways, as
    C / 6N, differs in its last bits), ordered by N then D: each group's first run, and each
    run's group."""
    keys = np.stack([np.round(np.log(finals.params), 6), np.round(np.log(finals.tokens), 6)], 1)
    _, first, group = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    return first, group.reshape(-1)


def seed_groups(finals: Points) -> list[np.ndarray]:
    """The indices of the runs that share N and D, where more than one does (seeds)."""
    _, group = _groups(finals)
    return [g for g in (np.flatnonzero(group == k) for k in np.unique(group)) if len(g) > 1]


def _seed_groups(finals: Points) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Over the groups of runs that share N and D: each group's first run, its number of
    runs, the sum of squares of its log losses about their mean, and whether those measure
    a spread (seeds that differ: not one run, nor copies)."""
    first, group = _groups(finals)
    y = np.log(finals.loss)
    sizes = np.bincount(group)
    means = np.bincount(group, y) / sizes
    ss = np.bincount(group, (y - means[group]) ** 2)
    return first, sizes, ss, (sizes > 1) & (ss > 0)


def seed_noise(finals: Points) -> Noise | None:
    """The pooled spread of log L over runs that share N and D (seeds), if any do, with its
    trend in N and D where the seeds measure one."""
    first, sizes, ss, seeded = _seed_groups(finals)
    df = int(np.sum(sizes - 1))
    if df < 1 or not np.sum(ss) > 0:  # seeds that agree exactly measure no noise (copies)
        return None
    trend = noise_trend(finals)
    span = tuple(float(f(np.log(a[first[seeded]]))) for a in (finals.params, finals.tokens)
                 for f in (np.min, np.max))
    return Noise(float(np.sqrt(np.sum(ss) / df)), df, "seeds", trend, span if trend else None)


def noise_trend(finals: Points) -> tuple[float, float, float] | None:
    """(c0, c_N, c_D) of log sigma = c0 + c_N log N + c_D log D, from the seed variance s^2 of
    each group of runs that share N and D: a regression of log s^2, less its known bias
    (E log(chi^2_k / k) = digamma(k/2) - log(k/2)), weighted by its known inverse variance
    (1 / trigamma(k/2)). None unless at least 5 groups with seeds, over 2 sizes and 2 budgets
    that do not move together (budgets in proportion to size cannot tell N's part from D's),
    show one: the slopes must differ from 0 at 95% (a chi-squared test), else weights drawn
    from noise would only add noise to the fit."""
    first, sizes, ss, seeded = _seed_groups(finals)
    logn, logd = np.log(finals.params[first[seeded]]), np.log(finals.tokens[first[seeded]])
    if seeded.sum() < 5 or np.ptp(logn) < 1e-9 or np.ptp(logd) < 1e-9 or \
            abs(np.corrcoef(logn, logd)[0, 1]) > MAX_TREND_CORRELATION:
        return None
    k = sizes[seeded] - 1
    log_s2 = np.log(ss[seeded] / k) - (digamma(k / 2) - np.log(k / 2))
    x = np.column_stack([np.ones_like(logn), logn - logn.mean(), logd - logd.mean()])
    w = 1 / polygamma(1, k / 2)
    cov = np.linalg.inv(x.T @ (x * w[:, None]))
    coef = cov @ (x.T @ (log_s2 * w))
    if coef[1:] @ np.linalg.solve(cov[1:, 1:], coef[1:]) < CHI2_95_2DF:
        return None
    c0 = coef[0] - coef[1] * logn.mean() - coef[2] * logd.mean()
    return float(c0 / 2), float(coef[1] / 2), float(coef[2] / 2)


def noise_by_size(finals: Points) -> dict[float, Noise]:
    """The seed noise of each model size (pooled over its token budgets), where it has seeds."""
    out = {}
    for n in np.unique(finals.params):
        noise = seed_noise(finals.select(finals.params == n))
        if noise:
            out[float(n)] = noise
    return out


def noise_by_budget(finals: Points) -> dict[tuple[float, float], Noise]:
    """The seed noise of each (model size, token count) that has seeds: of each trial."""
    first, group = _groups(finals)
    out = {}
    for k, i in enumerate(first):
        noise = seed_noise(finals.select(group == k))
        if noise:
            out[(float(finals.params[i]), float(finals.tokens[i]))] = noise
    return out


def residual_noise(residuals: np.ndarray, n_params: int) -> Noise:
    """The spread of the fit's residuals, robustly: 1.4826 x their median absolute deviation
    (the standard deviation, for Gaussian noise), so that a few outliers do not inflate it; at
    least NOISE_FLOOR."""
    mad = np.median(np.abs(residuals - np.median(residuals)))
    return Noise(max(float(1.4826 * mad), NOISE_FLOOR), max(len(residuals) - n_params, 1),
                 "residuals")
