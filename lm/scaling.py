"""Scaling-law fits from (params, tokens, loss) points, honest about their error. `lm.laws` holds
the laws (Chinchilla's sum, Kaplan's L(N, D) and L(C), IsoFLOP) and fits one once, `lm.noise`
measures the runs' own noise; here are the fit's uncertainty, the law's misfit, whether E is
identified, predictions and held-out error.

Compute is the exact FLOPs of each run where known (else 6ND), everywhere: the allocation solves
C = f(N) * D with the FLOPs per token f(N) = k N^gamma fitted to the points (k = 6, gamma = 1
for 6ND data).

Error is reported the way Choshen et al. 2024 advise: the absolute relative error (ARE) of a
held-out run's final loss. The law's uncertainty comes from a bootstrap over whole runs (points
of one learning curve are correlated), each refit started afresh from a grid; an interval for an
*actual* run adds that run's own noise and the law's misfit, measured by refitting it on its
smaller runs and predicting the larger ones (`Misfit`). The noise also sets Huber's delta and,
where it trends in N and D, weights the points. Whether the points pin E down at all is checked
by profiling the objective over E.

Everything here is numpy/scipy; the result is a frozen `Fit` with a JSON round-trip (fit.json).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
import threadpoolctl
from scipy.optimize import brentq
from scipy.stats import norm

from lm.errors import FitError, listed
from lm.laws import (LAWS, LOSS_LAWS, ND_LAWS, NOUNS, Budget, Law, allocation_coefs, at_bounds,
                     by_name, centre, descend, e_ceiling, flops_per_token, isoflop, power_fit,
                     power_line, problem, settle, uncentre)
from lm.noise import Noise, residual_noise, seed_groups, seed_noise
from lm.points import Points, budget_labels, resample_runs

HUBER_K = 1.345  # delta = HUBER_K * noise: 95% efficiency at Gaussian noise, robust beyond
# What a fit's N counts (fit.params, lm fit --params), in words
N_COUNTS = {"total": "all parameters", "non_embedding": "the non-embedding parameters",
            "flops": "the training FLOPs per token / 6 (so that C = 6ND exactly)"}
E_FLAT = 0.5  # E is not identified when the E the data allow include 0 or the lowest loss, or
# span half its range
CHI2_95 = 3.841  # 95% quantile of chi-squared with 1 degree of freedom: the profile's cut
E_TOL = 1e-4  # of the lowest loss: how closely the ends of the range of E the data allow are found
LAPLACE_DRAWS = 400
LAPLACE_STEP = 1e-4  # of each draw's offset: log L is linear in theta over it, to rounding
MIN_BOOTSTRAP_SHARE = 0.5  # of bootstrap refits that must converge for their intervals to count
# ...and at least this many: the fewest whose range holds the median of their distribution
# 95% of the time (1 - 2 * 0.5**B >= 0.95; the 2.5-97.5 percentiles lie just inside that
# range); fewer give an "interval" that may miss the fit altogether
MIN_BOOTSTRAP = 6
MISFIT_KEEP = 0.5  # the misfit's refits keep at least this share of the fitting runs: fewer
# pin the law down so loosely that their errors measure that, not the law's shape
MISFIT_GRID = np.r_[0.0, np.geomspace(1e-4, 0.3, 120)]  # its terms' values tried (of log L)
MISFIT_TIE = 0.1  # nats of log-likelihood within which its fits are equally good
# The fitted points' (log N, log D) must spread this far off one line (`_nd_spread`) for the
# law to split the loss between N and D (two budgets 1.4x apart at every size spread 0.12)
ND_SPREAD_MIN = 0.1
ONE_LADDER = ("N and D moved together in the fitted runs (one tokens-per-parameter ratio, or "
              "one line in log N and log D): the fit cannot tell N's effect from D's, so the "
              "compute-optimal split is not measured; train some sizes on other budgets")


# ----------------------------------------------------------------------------- the result


@dataclass(frozen=True)
class HeldOut:
    """A held-out run's final loss against the law's prediction. `interval` is a 95% interval
    for an actual run (the law's uncertainty, its misfit at the run's reach and a run's own
    noise); `law_interval` the law's sampling uncertainty alone."""

    run: str
    params: float
    tokens: float
    flops: float
    predicted: float
    loss: float
    are: float
    compute_ratio: float | None = None  # its FLOPs over the largest fitting run's
    interval: tuple[float, float] | None = None
    law_interval: tuple[float, float] | None = None
    seeds: int = 1  # > 1: the mean loss of that many runs of one N and D (their interval too)

    @property
    def label(self) -> str:
        return f"{self.run} (mean of {self.seeds} seeds)" if self.seeds > 1 else self.run


@dataclass(frozen=True)
class Bootstrap:
    n: int
    seed: int
    failed: int  # refits that raised (a resample without enough distinct sizes)
    not_converged: int  # refits whose optimiser did not meet its tolerance
    samples: dict[str, list[float]]  # law parameter -> its value in each converged refit

    @property
    def usable(self) -> bool:
        """Whether the converged refits may stand for the law's uncertainty: when most
        resamples fail, those left are the ones that happened to fit, not a sample of it."""
        return self.n - self.failed - self.not_converged >= max(MIN_BOOTSTRAP,
                                                                MIN_BOOTSTRAP_SHARE * self.n)


@dataclass(frozen=True)
class Laplace:
    """The law's uncertainty from the fit's curvature at its optimum, when no bootstrap was
    run: theta = (E, log coefficients, exponents) ~ N(mean, cov), cov the sandwich estimate
    with each run's points as one cluster (they are correlated), propagated to predictions to
    first order (`_laplace_values`)."""

    mean: tuple[float, ...]
    cov: tuple[tuple[float, ...], ...]


@dataclass(frozen=True)
class Misfit:
    """What the law's shape misses, measured on its own runs. The law is refitted on the
    fitting runs with at most 1/2, 1/4, ... of the largest one's compute (while they are at
    least half of the runs) and predicts the runs above; log(actual / predicted) is modelled
    as normal with variance s^2 + constant^2 + (per_efold * ln r)^2 — s what the refit's own
    interval for a run explains, r the run's compute over the largest the refit saw — and
    (constant, per_efold) set by maximum likelihood. An interval for a run r x beyond the
    fitting runs adds `sigma(r)`: the bootstrap and a run's noise hold the law's sampling
    error, not a law of the wrong shape, which on public sweeps was most of the error."""

    constant: float
    per_efold: float
    refits: int
    predictions: int  # (refit, run above it) pairs

    def sigma(self, reach) -> np.ndarray:
        """Its standard deviation (of log L) at `reach` x the largest fitting run's compute;
        the constant alone within the fitting runs' compute."""
        ln_r = np.log(np.maximum(np.asarray(reach, dtype=float), 1.0))
        return np.sqrt(self.constant ** 2 + (self.per_efold * ln_r) ** 2)

    def describe(self) -> str:
        refits = f"{self.refits} refit{'s' * (self.refits != 1)}"
        return (f"{self.constant:.2%} and {self.per_efold:.2%} per e-fold of compute beyond "
                f"the fitting runs, added in quadrature (from {refits} on its smaller runs, "
                f"{self.predictions} predictions)")


@dataclass(frozen=True)
class Allocation:
    """The compute-optimal split N_opt = coef * C^exponent (and D_opt likewise), when the law
    determines it, for C in exact FLOPs (see Fit.flops_per_token)."""

    determined: bool
    note: str = ""
    params: dict[str, float] | None = None  # {"coef", "exponent"}
    tokens: dict[str, float] | None = None
    examples: tuple[dict[str, float], ...] = ()
    # runs on one line only (ONE_LADDER): that line, D = coef * N^exponent
    ladder: dict[str, float] | None = None


@dataclass(frozen=True)
class Identifiability:
    """How well the points pin E down: the objective profiled over E (the other parameters
    refitted at each), and the E whose profile stays within the noise of the best (a 95%
    profile interval, each run's points counted as one observation). `laws` are the law's
    parameters at each allowed E, to say how far predictions move across them."""

    e: tuple[float, ...]
    objective: tuple[float, ...]
    allowed: tuple[float, float]
    identified: bool
    laws: tuple[dict[str, float], ...] = ()


@dataclass(frozen=True)
class Fit:
    """A fitted law: its parameters, how they were found, and what it predicts. `fit.json` is
    `to_json()`, with the law's parameters at the top level."""

    law: str
    params: dict[str, float]
    objective: float
    converged: bool
    n_points: int
    n_runs: int
    points_dropped: int
    drop_early: float
    allocation: Allocation
    loss: str = "huber"  # the robust loss on log L: huber | lsq
    huber_delta: float | None = None
    noise: Noise | None = None
    flops_per_token: dict[str, float] = field(default_factory=lambda: {"coef": 6.0,
                                                                       "exponent": 1.0})
    annealed_only: bool = False  # fitted on points that end a learning-rate decay
    min_tokens_per_param: float = 0.0
    n_counted: str = "total"  # what N is: a key of N_COUNTS (a CSV's: its params column)
    max_fit_flops: float = 0.0  # the largest compute among the fitted points
    warnings: tuple[str, ...] = ()
    bootstrap: Bootstrap | None = None
    laplace: Laplace | None = None
    misfit: Misfit | None = None  # in every interval for a run; None: too few runs to measure
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    identifiability: Identifiability | None = None
    budgets: tuple[Budget, ...] = ()
    outliers: tuple[str, ...] = ()  # runs whose residual exceeds 3 noise sigmas
    holdout: tuple[HeldOut, ...] = ()
    are: float | None = None  # mean over the held-out runs
    # held-out runs of one N and D (seeds) together: the law predicts their expected loss,
    # which their mean measures with a run's noise divided by sqrt(seeds)
    holdout_means: tuple[HeldOut, ...] = ()

    @property
    def scored(self) -> tuple[HeldOut, ...]:
        """Every held-out row: each run, then each mean of a size's seeds."""
        return self.holdout + self.holdout_means

    @property
    def formula(self) -> str:
        return by_name(self.law).formula

    def to_json(self) -> dict:
        out = {"law": self.law, "formula": self.formula, **self.params}
        for f in fields(self):
            if f.name in ("law", "params"):
                continue
            value = getattr(self, f.name)
            if f.name == "holdout":
                value = {"runs": [asdict(r) for r in value]} if value else None
            elif f.name == "holdout_means":
                value = [asdict(r) for r in value] or None
            elif f.name == "budgets":
                value = [asdict(b) for b in value] or None
            elif value is not None and f.name in ("allocation", "bootstrap", "noise",
                                                  "identifiability", "laplace", "misfit"):
                value = asdict(value)
            if value is not None:
                out[f.name] = value
        return json.loads(json.dumps(out))  # tuples -> lists, as read back

    @classmethod
    def from_json(cls, raw: Any, where: str = "fit") -> Fit:
        """The fit a `to_json()` dict describes; a FitError names any field that is missing or
        of the wrong type."""
        if not isinstance(raw, dict):
            raise FitError(f"{where}: not a fit (a JSON object written by lm fit)")
        law = _field(raw, "law", str, where)
        if law not in LAWS:
            raise FitError(f"{where}: law {law!r} is not one of {', '.join(LAWS)}")
        try:
            alloc = raw["allocation"]
            boot, noise, ident, laplace, misfit = (raw.get(k) for k in (
                "bootstrap", "noise", "identifiability", "laplace", "misfit"))
            return cls(
                law=law, params={k: _field(raw, k, float, where) for k in by_name(law).names},
                objective=_field(raw, "objective", float, where),
                converged=_field(raw, "converged", bool, where),
                n_points=_field(raw, "n_points", int, where),
                n_runs=_field(raw, "n_runs", int, where),
                points_dropped=_field(raw, "points_dropped", int, where),
                drop_early=_field(raw, "drop_early", float, where),
                allocation=Allocation(**{**alloc, "examples": tuple(alloc.get("examples", ()))}),
                loss=raw.get("loss", "huber"), huber_delta=raw.get("huber_delta"),
                noise=Noise(**{**noise, "trend": _floats(noise.get("trend")),
                                "span": _floats(noise.get("span"))}) if noise else None,
                flops_per_token=raw.get("flops_per_token", {"coef": 6.0, "exponent": 1.0}),
                annealed_only=bool(raw.get("annealed_only", False)),
                min_tokens_per_param=float(raw.get("min_tokens_per_param", 0.0)),
                n_counted=str(raw.get("n_counted", "total")),
                max_fit_flops=float(raw.get("max_fit_flops", 0.0)),
                warnings=tuple(raw.get("warnings", ())),
                bootstrap=Bootstrap(**boot) if boot else None,
                laplace=Laplace(tuple(laplace["mean"]), tuple(map(tuple, laplace["cov"])))
                if laplace else None,
                misfit=Misfit(**misfit) if misfit else None,
                intervals={k: _floats(v) for k, v in raw.get("intervals", {}).items()},
                identifiability=Identifiability(
                    tuple(ident["e"]), tuple(ident["objective"]), _floats(ident["allowed"]),
                    ident["identified"], tuple(ident.get("laws", ()))) if ident else None,
                budgets=tuple(Budget(**{**b, "params_range": _floats(b["params_range"])})
                              for b in raw.get("budgets") or ()),
                outliers=tuple(raw.get("outliers", ())),
                holdout=_held_out((raw.get("holdout") or {}).get("runs", [])),
                are=raw.get("are"), holdout_means=_held_out(raw.get("holdout_means") or []))
        except (KeyError, TypeError, AttributeError) as e:
            raise FitError(f"{where}: a field is missing or malformed ({type(e).__name__}: "
                           f"{e}); refit it with lm fit") from None


def _held_out(rows: list) -> tuple[HeldOut, ...]:
    return tuple(HeldOut(**{**r, "interval": _floats(r.get("interval")),
                            "law_interval": _floats(r.get("law_interval"))}) for r in rows)


def _field(raw: dict, key: str, kind: type, where: str):
    value = raw.get(key)
    ok = (isinstance(value, bool) if kind is bool else
          isinstance(value, (int, float)) and not isinstance(value, bool) and
          (kind is float or float(value).is_integer()) if kind in (int, float) else
          isinstance(value, kind))
    if not ok or (kind is float and not math.isfinite(value)):
        raise FitError(f"{where}: field {key!r} is {'missing' if key not in raw else repr(value)}"
                       f"; expected {kind.__name__}. Refit with lm fit")
    return kind(value)


def _floats(value) -> tuple[float, ...] | None:
    return None if value is None else tuple(float(v) for v in value)


# ----------------------------------------------------------------------------- fit


def _holdout_runs(points: Points, holdout: str | Collection[str] | None,
                  above: float | None) -> np.ndarray:
    # each run's compute where it will be scored: its last annealed point, where there are any
    final = points.finals()
    held = set()
    if above is not None:
        held |= set(final.run[final.flops > above])
        if not held:
            raise FitError(f"holdout_above={above:g} holds out no run: the largest run's "
                           f"compute is {final.flops.max():.3g} FLOPs")
    if holdout is None:
        return np.array(sorted(held), dtype=str)
    if holdout == "largest":  # every run whose final compute ties (within 1%) with the largest
        return np.array(sorted(held | set(final.run[final.flops >= 0.99 * final.flops.max()])),
                        dtype=str)
    if isinstance(holdout, str):
        raise FitError(f"holdout={holdout!r}; "
                       "expected None, 'largest' or a collection of run ids")
    runs = np.unique(np.asarray(list(holdout), dtype=str))
    unknown = np.setdiff1d(runs, points.run)
    if unknown.size or not runs.size:
        raise FitError(f"holdout names no run or unknown runs {unknown.tolist()}; "
                       f"runs are e.g. {np.unique(points.run)[:5].tolist()}")
    return np.array(sorted(held | set(runs.tolist())), dtype=str)


def _usable(points: Points, drop_early: float, min_tokens_per_param: float
            ) -> tuple[Points, bool]:
    """The points any law may fit, and whether they are annealed ends only: where the points
    say which end a learning-rate decay, those; else all but the early ones. Never points with
    fewer than `min_tokens_per_param` tokens per parameter."""
    kept = well_trained(points, min_tokens_per_param)
    annealed = bool(kept.annealed.any())
    return kept.select(kept.annealed if annealed else ~kept.early_mask(drop_early)), annealed


def _chosen(usable: Points, law: Law) -> Points:
    """The usable points `law` fits: finals-only laws each run's last, frontier laws the
    compute-efficient envelope, the others all."""
    if law.finals_only:
        usable = usable.select(usable.final_mask())
    if law.frontier:
        usable = usable.select(usable.frontier_mask())
    return usable


def _fitted(points: Points, law: Law, drop_early: float, min_tokens_per_param: float
            ) -> tuple[Points, bool]:
    """The points a fit of `law` uses, and whether they are annealed ends only."""
    usable, annealed = _usable(points, drop_early, min_tokens_per_param)
    return _chosen(usable, law), annealed


def unused_mask(fit: Fit, points: Points) -> np.ndarray:
    """True at the points of runs `fit` was fitted on that it left out: early, not annealed,
    under-trained, off the frontier or not a run's last, as its law chose (held-out runs'
    points are not among them)."""
    held = np.isin(points.run, [r.run for r in fit.holdout])
    used, _ = _fitted(points.select(~held), by_name(fit.law), fit.drop_early,
                      fit.min_tokens_per_param)
    keys = set(zip(used.run, used.step, used.tokens))
    return ~held & np.array([k not in keys for k in zip(points.run, points.step, points.tokens)],
                            bool)


def too_few_tokens(tokens, params, min_tokens_per_param: float):
    """Whether a model of `params` parameters saw too few `tokens` to be fitted: the early
    transient, not the law."""
    return np.asarray(tokens) < min_tokens_per_param * np.asarray(params)


def well_trained(points: Points, min_tokens_per_param: float) -> Points:
    """The points whose models saw at least `min_tokens_per_param` tokens per parameter."""
    return points.select(~too_few_tokens(points.tokens, points.params, min_tokens_per_param))


def tokens_per_param_floor(law: str, given: float | None = None) -> float:
    """`given`, else `law`'s default (1 token per parameter; 0 for isoflop)."""
    return by_name(law).min_tokens_per_param if given is None else given


def check_design(points: Points, law: str = "chinchilla", drop_early: float = 0.1,
                 min_tokens_per_param: float | None = None) -> None:
    """Refuse planned points (say, a sweep's, before it trains) that could not pin `law` down:
    the same check a fit makes, made before any compute is spent."""
    spec = by_name(law)
    floor = tokens_per_param_floor(law, min_tokens_per_param)
    spec.check(_fitted(points, spec, drop_early, floor)[0])


def _raw_fit(train: Points, law: Law, delta: float, noise: Noise | None, fpt, start=None
             ) -> tuple[dict, float, bool, list]:
    """(params, objective, converged, IsoFLOP budgets) of `law` on `train`, each point weighted
    by `noise` (where it has a trend)."""
    law.check(train)
    if law.inputs is None:
        return isoflop(train, fpt)
    return *power_fit(train, law, delta, noise, start), []


def _residuals(law: Law, params: Mapping, points: Points) -> np.ndarray:
    return np.log(law.loss(params, points.params, points.tokens, points.flops) / points.loss)


def fit(points: Points, law: str = "chinchilla", **options) -> Fit:
    """Fit ``law`` to ``points``: see `_fit` for the options. Its many small linear-algebra
    calls run on one BLAS thread: threads of their own, spinning for work this small, made
    them ten times slower on a busy machine."""
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        return _fit(points, law, **options)


def _fit(points: Points, law: str = "chinchilla", *,
         holdout: str | Collection[str] | None = None, holdout_above: float | None = None,
         bootstrap: int = 0, drop_early: float = 0.1, min_tokens_per_param: float | None = None,
         loss: str = "huber", huber_delta: float | None = None, seed: int = 0) -> Fit:
    """Fit ``law`` to ``points``.

    drop_early: drop points trained on less than this fraction of their run's final tokens
        (points marked annealed are used instead, when there are any).
    min_tokens_per_param: drop points of models that have seen fewer tokens than this many
        per parameter: the transient of early training, not the law (default: 1; 0 for
        isoflop).
    holdout: None, "largest" (the run(s) with the largest final compute) or run ids; with
        holdout_above, the runs with more final FLOPs than that too. They are left out and
        their final losses predicted (ARE).
    bootstrap: refits on runs resampled with replacement, for 95% intervals (seeded by seed).
    loss: "huber" on log L, its delta set from the noise unless huber_delta is given; "lsq".
    """
    spec = by_name(law)
    min_tokens_per_param = tokens_per_param_floor(law, min_tokens_per_param)
    if not 0 <= drop_early < 1:
        raise FitError(f"drop_early={drop_early}; expected a fraction in [0, 1)")
    if not (bootstrap == 0 or bootstrap >= MIN_BOOTSTRAP):
        raise FitError(f"bootstrap={bootstrap}; expected 0 (intervals from the fit's curvature) "
                       f"or at least {MIN_BOOTSTRAP} refits, the fewest a 95% interval is drawn "
                       "from")
    if loss not in ("huber", "lsq"):
        raise FitError(f"loss={loss!r}; expected huber or lsq")
    if not len(points):
        raise FitError("no points to fit")
    held = _holdout_runs(points, holdout, holdout_above)
    if held.size and spec.loss is None:
        raise FitError(f"holdout needs a law that predicts loss ({', '.join(LOSS_LAWS)}), "
                       f"not {law}: hold out none (lm fit --holdout none)")
    rest = points.select(~np.isin(points.run, held))
    if not len(rest):
        raise FitError(f"every one of the {len(held)} runs is held out (holdout, holdout_above);"
                       " hold out fewer, so that some are left to fit")
    usable, annealed = _usable(rest, drop_early, min_tokens_per_param)
    train = _chosen(usable, spec)
    if not len(train):
        raise FitError(f"no point is left to fit: of {len(rest)}, every one is early "
                       f"(drop_early={drop_early}) or has fewer than min_tokens_per_param="
                       f"{min_tokens_per_param} tokens per parameter; lower them (or are "
                       "params and tokens in different units, millions and billions?)")
    fpt = flops_per_token(train)
    finals = train.select(train.final_mask())
    noise = seed_noise(usable.select(usable.final_mask()))  # every run's end: a frontier keeps
    # the luckier of two seeds at most
    delta = math.inf if loss == "lsq" else huber_delta
    if delta is None:  # from the noise: measured across seeds, else in a least-squares fit
        if noise is None and spec.inputs is not None:
            lsq = _raw_fit(train, spec, math.inf, None, fpt)[0]
            _require_finite(law, lsq)
            noise = residual_noise(_residuals(spec, lsq, finals), len(spec.names))
        delta = HUBER_K * noise.sigma if noise else math.inf
    params, objective, converged, budgets = _raw_fit(train, spec, delta, noise, fpt)
    _require_finite(law, params)
    if noise is None and spec.loss is not None:
        noise = residual_noise(_residuals(spec, params, finals), len(spec.names))
    result = Fit(law=law, params=params, objective=objective, converged=converged,
                 n_points=len(train), n_runs=len(np.unique(train.run)),
                 points_dropped=len(rest) - len(train), drop_early=drop_early,
                 allocation=Allocation(False), loss="huber" if math.isfinite(delta) else "lsq",
                 huber_delta=float(delta) if math.isfinite(delta) else None, noise=noise,
                 flops_per_token=fpt, annealed_only=annealed,
                 min_tokens_per_param=min_tokens_per_param,
                 max_fit_flops=float(train.flops.max()), budgets=tuple(budgets))
    boot = _bootstrap(train, spec, delta, noise, fpt, params, bootstrap, seed) if bootstrap \
        else None
    if spec.inputs is not None and not (boot and boot.usable):
        result = replace(result, laplace=_laplace(train, spec, delta, noise, params))
    if spec.loss is not None:
        result = replace(result, misfit=_misfit(train, spec, delta, noise, fpt))
    if boot:
        result = replace(result, bootstrap=boot, intervals={
            k: tuple(np.percentile(v, [2.5, 97.5]).tolist())
            for k, v in boot.samples.items() if v} if boot.usable else {})
    if spec.loss is not None:
        result = replace(result, outliers=_outliers(result, spec, train),
                         identifiability=_identifiability(result, spec, train, delta))
    result = replace(result, allocation=_allocation(result, train))
    if held.size:
        result = score(result, points, held)
    return replace(result, warnings=tuple(_warnings(result, train, rest)))


def _require_finite(law: str, params: Mapping[str, float]) -> None:
    """Refuse a law whose parameters overflow: a scale such as Kaplan's C0 = exp(level /
    alpha) does as its exponent goes to 0, where the loss hardly changes over the points and
    no power law describes how it would go on."""
    bad = [f"{k} = {v}" for k, v in params.items() if not math.isfinite(v)]
    if bad:
        raise FitError(f"the {law} fit is out of floating-point range ({', '.join(bad)}; "
                       f"{_exponents(params)}): the loss hardly changes with scale over these "
                       "points. "
                       "Check that the loss column is the runs' loss, or add runs over a wider "
                       "range of sizes and budgets")


def _exponents(params: Mapping[str, float]) -> str:
    """A power law's exponents among its parameters, e.g. 'alpha = 0.34, beta = 0.28'."""
    return ", ".join(f"{k} = {v:.3g}" for k, v in params.items() if "alpha" in k or k == "beta")


def _bootstrap(train: Points, law: Law, delta: float, noise: Noise | None, fpt, start: dict,
               n: int, seed: int) -> Bootstrap:
    """Refit on ``n`` resamples of whole runs, each from the grid of starts and the point
    estimate, whichever is better; failed and unconverged refits are counted and left out.
    IsoFLOP curves are resampled each within its budget: the budgets are the design, the runs
    on each the sample (drawn across budgets, most refits left some budget with too few sizes
    for its parabola)."""
    rng = np.random.default_rng(seed)
    strata = budget_labels(train) if law.finals_only else None
    draws, failed, not_converged = [], 0, 0
    for _ in range(n):
        try:
            sample = train.select(resample_runs(train.run, rng, strata))
            params, _, converged, _ = _raw_fit(sample, law, delta, noise, fpt, start)
        except (FitError, ArithmeticError):  # too few distinct sizes, or nothing to fit
            failed += 1
            continue
        if converged:
            draws.append(params)
        else:
            not_converged += 1
    return Bootstrap(n, seed, failed, not_converged, {k: [d[k] for d in draws] for k in law.names})


def _laplace(train: Points, law: Law, delta: float, noise: Noise | None, params: dict
             ) -> Laplace:
    """theta ~ N(theta_hat, c H^-1 M H^-1): H the Gauss-Newton curvature of the robust
    objective, M the spread of its gradient summed run by run, c = G/(G-1) (n-1)/(n-q) for G
    runs, n points and q free parameters (the clustered sandwich's usual small-sample
    correction: without it, refits on simulated studies of the fitted law missed by 1.19x
    what their intervals said; 1.13x with it). Parameters at a bound are held there."""
    p, mu = problem(law, train, delta, noise)
    theta = np.clip(centre(law.to_theta(params), mu), *np.array(p.bounds()).T)
    pred, jac = p.jacobian(theta)
    jac = jac * (p.w / pred)[:, None]  # d r / d theta
    r = p.residuals(theta)
    free = np.array([lo < x < hi for x, (lo, hi) in zip(theta, p.bounds())])
    jac = jac[:, free]
    inside = (np.abs(r) <= p.delta).astype(float)  # Huber's second derivative
    h = jac.T @ (inside[:, None] * jac)
    _, cluster = np.unique(train.run, return_inverse=True)
    scores = np.zeros((cluster.max() + 1, jac.shape[1]))
    np.add.at(scores, cluster, p.psi(r)[:, None] * jac)
    h_inv = np.linalg.pinv(h)
    g, n, q = len(scores), len(r), int(free.sum())
    c = g / max(g - 1, 1) * (n - 1) / max(n - q, 1)
    cov = np.zeros((len(theta), len(theta)))
    cov[np.ix_(free, free)] = c * h_inv @ (scores.T @ scores) @ h_inv
    k = p.k
    m = np.eye(len(theta))  # uncentring: a_j += g_j mu_j
    m[1:k + 1, k + 1:2 * k + 1] = np.diag(mu)
    return Laplace(tuple(uncentre(theta, mu).tolist()), tuple(map(tuple, (m @ cov @ m.T).tolist())))


def _misfit(train: Points, law: Law, delta: float, noise: Noise, fpt) -> Misfit | None:
    """The Misfit of `law` on `train` (see there), its refits with the fit's own settings;
    None where not even the runs below half the largest one's compute can be refitted. Where
    the likelihood cannot tell a constant from growth (the runs predicted share one reach),
    the tie goes to growth: the reading that does not shrink an extrapolation's interval."""
    refits = list(_refit_errors(train, law, delta, noise, fpt))
    if not refits:
        return None
    z, ln_r, s = map(np.concatenate, zip(*refits))
    growth = (MISFIT_GRID[:, None] * ln_r) ** 2  # [k, pairs]; a row of constants at a time
    nll = np.array([0.5 * np.sum(np.log(v) + z ** 2 / v, axis=-1)  # [constant, k]: memory
                    for v in (s ** 2 + m ** 2 + growth for m in MISFIT_GRID)])  # O(pairs)
    tied = nll <= nll.min() + MISFIT_TIE
    i = np.flatnonzero(tied.any(axis=1))[0]  # the smallest constant among the best
    j = np.flatnonzero(tied[i])[0]
    return Misfit(float(MISFIT_GRID[i]), float(MISFIT_GRID[j]), len(refits), len(z))


def _refit_errors(train: Points, law: Law, delta: float, noise: Noise, fpt):
    """Refit `law` on the runs with at most half the compute of the largest run (then of the
    largest run the refit kept, and so on) while they are at least MISFIT_KEEP of the runs;
    for each refit, the runs above it as (log(actual / predicted), log of their compute over
    the largest the refit saw, the standard deviation of the refit's interval for a run)."""
    final = train.select(train.final_mask())
    top = final.flops.max()
    while (below := final.flops <= top / 2).sum() >= MISFIT_KEEP * len(final):
        top = final.flops[below].max()
        above = final.select(~below)
        args = above.params, above.tokens, above.flops
        sub = train.select(np.isin(train.run, final.run[below]))
        try:
            with np.errstate(all="ignore"):  # a wild refit or draw may overflow: dropped
                refit, _, ok, _ = _raw_fit(sub, law, delta, noise, fpt)
                if not ok:  # its errors would measure the optimiser's stall, not the law
                    continue
                draws = np.log(_positive(_laplace_values(
                    law, _laplace(sub, law, delta, noise, refit), lambda p: law.loss(p, *args))))
                predicted = np.log(law.loss(refit, *args))
        except (FitError, ArithmeticError, ValueError):  # too few sizes left, or degenerate
            return
        if len(draws) < 2 or not np.all(np.isfinite(predicted)):
            return
        yield (np.log(above.loss) - predicted, np.log(above.flops / top),
               np.sqrt(np.var(draws, axis=0) + noise.sigma ** 2))


def _outliers(fit: Fit, law: Law, train: Points) -> tuple[str, ...]:
    """Runs with a point more than 3 noise sigmas (its own) off the law (they weigh little
    under Huber, but a reader should see them)."""
    r = _residuals(law, fit.params, train)
    far = np.abs(r) > 3 * np.maximum(fit.noise.at(train.params, train.tokens), 1e-12)
    return tuple(sorted(set(train.run[far].tolist())))


def huber_efficiency(c: float) -> float:
    """E psi'(z) / E psi(z)^2 for z ~ N(0, 1), psi Huber's at c (delta over the noise): twice
    a Huber objective's rise, in units of the noise squared and times this, is a chi-squared
    deviance (the robust analogue of the likelihood ratio). 1 for least squares (c = inf),
    1.157 at HUBER_K, about 0.8 / c where delta is far below the noise."""
    if not math.isfinite(c):
        return 1.0
    inside = 2 * norm.cdf(c) - 1
    return inside / (inside - 2 * c * norm.pdf(c) + 2 * c * c * norm.sf(c))


def _identifiability(fit: Fit, law: Law, train: Points, delta: float) -> Identifiability:
    """The objective profiled over E in [0, lowest loss), the other parameters refitted at
    each E from their neighbour's optimum; the E whose deviance from the best stays under the
    95% chi-squared cut, each run's points counted as one observation (points of one run are
    correlated). The cut's crossings are found between the grid's points by Brent's method
    (about half the refits bisection takes)."""
    p, mu = problem(law, train, delta, fit.noise)
    best = centre(law.to_theta(fit.params), mu)
    sigma = max(fit.noise.sigma, 1e-6)
    cut = (CHI2_95 * sigma ** 2 / (2 * huber_efficiency(delta / sigma))
           * len(train) / len(np.unique(train.run)))
    profile: dict[float, tuple[float, np.ndarray]] = {fit.params["E"]: (fit.objective, best)}

    def excess(e: float) -> float:  # the profile at E = e over the best, less the cut
        if e not in profile:  # refitted from the nearest E's optimum
            near = profile[min(profile, key=lambda x: abs(x - e))][1]
            bounds = p.bounds(e)  # a stalled descent would read as a worse fit, ruling e out
            res = settle(p, descend(p, np.r_[e, near[1:]], bounds, ftol=1e-10), bounds, 1e-10)
            profile[e] = (float(res.fun * p.scale), res.x)
        return profile[e][0] - fit.objective - cut

    ends = []
    for side in (np.linspace(fit.params["E"], p.e_max, 6)[1:],
                 np.linspace(fit.params["E"], 0.0, 6)[1:]):  # outwards from the optimum
        inside = fit.params["E"]
        for e in side:
            if excess(e) > 0:  # the crossing, between the last E inside and e
                crossing = brentq(excess, inside, e, xtol=E_TOL * p.e_max)
                # which may lie just outside the cut: the end is the nearest E evaluated inside
                # (Brent's last bracket holds one within xtol)
                lo, hi = sorted((inside, e))
                inside = min((x for x in profile if lo <= x <= hi and excess(x) <= 0),
                             key=lambda x: abs(x - crossing))
                break
            inside = e
        ends.append(inside)
    allowed = (float(min(ends)), float(max(ends)))
    grid = sorted(profile)
    laws = tuple(law.from_theta(uncentre(profile[e][1], mu)) for e in grid
                 if allowed[0] <= e <= allowed[1])
    # Not identified: the data cannot tell the law from a pure power law (E = 0), nor from
    # one whose loss stops falling at their lowest (E at its ceiling), or allow E over half
    # its range.
    identified = 0 < allowed[0] and allowed[1] < p.e_max and \
        allowed[1] - allowed[0] < E_FLAT * p.e_max
    return Identifiability(tuple(grid), tuple(profile[e][0] for e in grid), allowed,
                           identified, laws)


def _nd_spread(train: Points) -> float:
    """How far the fitted points' (log N, log D) spread off the line they lie along: the
    smallest standard deviation of the cloud. Near 0 (one tokens-per-parameter ladder), N
    and D moved together and the law's split of the loss between them is not measured."""
    x = np.log(np.column_stack([train.params, train.tokens]))
    return float(np.sqrt(max(np.linalg.eigvalsh(np.cov(x.T))[0], 0.0)))


def _allocation(fit: Fit, train: Points) -> Allocation:
    """N_opt = coef * C^exponent for params and tokens, with examples from the data's largest
    compute decade upwards."""
    coefs = allocation_coefs(fit.law, fit.params, fit.flops_per_token)
    if coefs is None:
        return Allocation(False, "loss against compute alone does not say how to split it into "
                                 "N and D")
    if _nd_spread(train) < ND_SPREAD_MIN:
        return Allocation(False, ONE_LADDER, ladder=power_line(train.params, train.tokens))
    k_n, a, k_d, b = map(float, coefs)
    if not all(np.isfinite([k_n, a, k_d, b])) or min(k_n, k_d) <= 0:
        return Allocation(False, f"the exponents ({_exponents(fit.params)}) put the optimum "
                                 "out of reach")
    decade = math.ceil(math.log10(fit.max_fit_flops))
    examples = predict(replace(fit, allocation=Allocation(True)),  # what this one says
                       flops=10.0 ** np.arange(decade, decade + 4))
    keys = [k for k in ("flops", "params", "tokens", "loss") if k in examples]
    return Allocation(True, params={"coef": k_n, "exponent": a},
                      tokens={"coef": k_d, "exponent": b},
                      examples=tuple(dict(zip(keys, v)) for v in zip(*(examples[k] for k in keys))))


# ----------------------------------------------------------------------------- predictions


def _sampled(fit: Fit, fn: Callable[[dict], np.ndarray]) -> np.ndarray | None:
    """``fn`` (the law's parameters, each a column [S, 1], to positive values [S, ...]) in
    each converged bootstrap refit, or in draws of its Laplace approximation; None when it has
    neither."""
    if fit.bootstrap and fit.bootstrap.usable:
        return _positive(fn({k: np.asarray(v, dtype=float)[:, None]
                             for k, v in fit.bootstrap.samples.items()}))
    if fit.laplace is None:
        return None
    return _positive(_laplace_values(by_name(fit.law), fit.laplace, fn))


def _positive(values: np.ndarray) -> np.ndarray:
    """The draws [S, ...] whose values are all finite and positive: a wild draw's may
    overflow, underflow or fall below zero."""
    return values[np.all(np.isfinite(values) & (values > 0), axis=tuple(range(1, values.ndim)))]


def _laplace_values(law: Law, laplace: Laplace, fn: Callable[[dict], np.ndarray]
                    ) -> np.ndarray:
    """``fn`` (as for `_sampled`) in LAPLACE_DRAWS draws theta = mean + delta of the Laplace
    approximation, to first order in log: log fn(mean) + J delta, J measured along each delta
    scaled by LAPLACE_STEP (the delta method, one draw at a time). The drawn parameters
    themselves are no approximation to trust: an outer power's levels trade off along a ridge
    over which the law is far from linear, and kaplan-nd's predictions at them spread many
    times as widely as its bootstrap's (README, "Intervals")."""
    mean = np.asarray(laplace.mean)
    deltas = np.random.default_rng(0).multivariate_normal(
        np.zeros_like(mean), laplace.cov, size=LAPLACE_DRAWS, method="eigh")
    thetas = mean + LAPLACE_STEP * np.r_[np.zeros((1, len(mean))), deltas]
    with np.errstate(divide="ignore", invalid="ignore"):
        log = np.log(fn({k: np.asarray(v)[:, None] for k, v in law.from_theta(thetas.T).items()}))
    return np.exp(log[0] + (log[1:] - log[0]) / LAPLACE_STEP)


def _law_losses(fit: Fit, n, d, c) -> tuple[np.ndarray, np.ndarray | None]:
    """The law's loss at (N, D, C) [m], and in each of its draws [S, m] (None without)."""
    law = by_name(fit.law)
    point = np.asarray(law.loss(fit.params, n, d, c), dtype=float)
    with np.errstate(over="ignore", invalid="ignore"):  # a wild draw may overflow: dropped
        return point, _sampled(fit, lambda p: np.asarray(law.loss(p, n, d, c), dtype=float))


def _run_interval(fit: Fit, point: np.ndarray, draws: np.ndarray | None, flops, seeds=1
                  ) -> np.ndarray:
    """95% intervals [m, 2] for the final loss of an actual run (or the mean of `seeds` runs,
    one count or one per column) of `flops` each: the law's uncertainty (its bootstrap draws),
    the law's misfit that far beyond the fitting runs' compute (a normal of
    `Misfit.sigma`; seeds do not average it away) and the run's own noise (Student t with the
    noise's degrees of freedom, over sqrt(seeds)), combined in log space. The run's noise is
    the pooled one even where a trend says the run is quieter: on the registered studies the
    trend's value there (kept within the seed groups' range) held 22 of 26 held-out runs
    against the pooled noise's 25: the pooled noise also carries some of the law's misfit,
    which an interval for an actual run must hold too."""
    law = np.log(point)[None] if draws is None or not len(draws) else np.log(draws)
    rng = np.random.default_rng(0)
    reps = max(1, 20_000 // len(law))
    spread = fit.noise.sigma / np.sqrt(seeds) * rng.standard_t(fit.noise.df,
                                                               size=(len(law) * reps, 1))
    if fit.misfit:
        reach = np.asarray(flops, dtype=float) / fit.max_fit_flops
        spread = spread + fit.misfit.sigma(reach) * rng.standard_normal((len(law) * reps, 1))
    total = np.repeat(law, reps, axis=0) + spread
    return np.exp(np.percentile(total, [2.5, 97.5], axis=0)).T


def run_flops(fit: Fit, n: np.ndarray, d: np.ndarray) -> np.ndarray:
    """The FLOPs of a run of N parameters on D tokens, by the points' FLOPs per token."""
    return fit.flops_per_token["coef"] * n ** fit.flops_per_token["exponent"] * d


def score(fit: Fit, points: Points, held: Collection[str]) -> Fit:
    """`fit` with the final losses of the runs `held` (left out of it) set against what it
    predicts for them: their ARE, and whether each falls in its interval for an actual run."""
    law = by_name(fit.law)
    if law.loss is None:
        raise FitError(f"an {fit.law} fit predicts no loss; use chinchilla or kaplan")
    # against what the fit saw: annealed ends, where it took only those
    final = points.select(points.final_mask(fit.annealed_only) & np.isin(points.run, list(held)))
    held_out = _scored(fit, final)
    seeds = seed_groups(final)
    means = replace(final.select(np.array([g[0] for g in seeds], dtype=int)),
                    loss=np.array([final.loss[g].mean() for g in seeds]),
                    run=np.array([_seeds_name(final.run[g]) for g in seeds]))
    return replace(fit, holdout=held_out, are=float(np.mean([r.are for r in held_out])),
                   holdout_means=_scored(fit, means, [len(g) for g in seeds]))


def _scored(fit: Fit, final: Points, seeds: Sequence[int] | None = None) -> tuple[HeldOut, ...]:
    """Each of `final`'s losses (of one run, or the mean of `seeds[i]` runs) against the law."""
    seeds = [1] * len(final) if seeds is None else list(seeds)
    point, draws = _law_losses(fit, final.params, final.tokens, final.flops)
    runs = _run_interval(fit, point, draws, final.flops, np.asarray(seeds, dtype=float))
    laws = np.percentile(draws, [2.5, 97.5], axis=0).T if draws is not None and len(draws) \
        else [None] * len(final)
    are = np.abs(point - final.loss) / final.loss
    ratio = final.flops / fit.max_fit_flops
    return tuple(HeldOut(str(r), float(n), float(d), float(c), float(p), float(l), float(e),
                         float(q), (float(i[0]), float(i[1])),
                         None if w is None else (float(w[0]), float(w[1])), k)
                 for r, n, d, c, q, p, l, e, i, w, k in zip(
                     final.run, final.params, final.tokens, final.flops, ratio, point,
                     final.loss, are, runs, laws, seeds))


def _seeds_name(runs: Sequence[str]) -> str:
    """Runs d80-...-s0, d80-...-s1 together: d80-... (their common stem), else all names."""
    stem = re.sub(r"[-_]s?\d*$", "", os.path.commonprefix([str(r) for r in runs]))
    return stem or "+".join(map(str, runs))


def predicted_loss(fit: Fit, points: Points) -> np.ndarray:
    """The law's loss at each point (point estimate)."""
    law = by_name(fit.law)
    if law.loss is None:
        raise FitError(f"an {fit.law} fit predicts no loss; use chinchilla or kaplan")
    return np.asarray(law.loss(fit.params, points.params, points.tokens, points.flops), float)


def held_out_range(fit: Fit, run: HeldOut) -> tuple[float, float] | None:
    """How far the prediction for `run` moves across the E the data allow."""
    ident = fit.identifiability
    if not ident or not ident.laws:
        return None
    law = by_name(fit.law)
    losses = [float(law.loss(p, run.params, run.tokens, run.flops)) for p in ident.laws]
    return min(losses), max(losses)


def _warnings(fit: Fit, train: Points, rest: Points) -> list[str]:
    """What makes a fit untrustworthy for extrapolation, each with what to do about it
    (`rest`: the points it was given, held-out runs aside)."""
    out = []
    if not fit.converged:
        out.append("the optimiser did not meet its tolerance; the fit may not be the best one")
    kept = well_trained(rest, fit.min_tokens_per_param)
    if fit.annealed_only and len(unmarked := np.setdiff1d(kept.run, kept.run[kept.annealed])):
        out.append(f"{len(unmarked)} run(s) with no point marked annealed, where others have "
                   f"one, are left out: {listed(unmarked.tolist())}; mark the points that end "
                   "their decay (column annealed), or fit them apart")
    if not fit.annealed_only and fit.n_points > fit.n_runs and not by_name(fit.law).frontier:
        out.append(f"{fit.n_points} points from {fit.n_runs} runs' learning curves: a point "
                   "before a run's learning-rate decay ends sits above the loss of a run "
                   "trained to that length, and bends the law; mark the points that end a "
                   "decay (column annealed), or keep run ends only (lm fit --drop-early 0.99)")
    need = (("params", "tokens") if fit.law in ND_LAWS else
            {"kaplan": ("flops",)}.get(fit.law, ("params",)))
    few = [f"{len(np.unique(getattr(train, k)))} distinct {NOUNS[k]}" for k in need
           if len(np.unique(getattr(train, k))) < 4]
    if few:
        out.append(f"only {' and '.join(few)}: fewer than 4 cannot test the law's shape; add "
                   "sizes or budgets")
    if by_name(fit.law).inputs is not None and (pinned := at_bounds(by_name(fit.law),
                                                                     fit.params, train)):
        out.append(f"{listed(pinned)} at a bound of the fit's search: the data do not pin the "
                   "law's shape down there, and predictions rest on where the search stopped; "
                   "add sizes or budgets over a wider range, or try another law")
    ident = fit.identifiability
    if ident and not ident.identified and fit.laplace is not None:
        out.append("intervals from the fit's curvature understate the law's uncertainty when E "
                   "is not identified; bootstrap (lm fit --bootstrap 100)")
    if ident and not ident.identified:
        moves = [f"{r.run}: {lo:.4g}..{hi:.4g}" for r in fit.holdout
                 if (span := held_out_range(fit, r)) for lo, hi in [span]]
        out.append(f"E is not identified: the fit is as good, within the noise, for E from "
                   f"{ident.allowed[0]:.4g} to {ident.allowed[1]:.4g}"
                   + (" (the lowest loss fitted: the law may stop falling right past the "
                      "data)" if ident.allowed[1] >= e_ceiling(train) else "")
                   + (f"; held-out predictions across that range: {listed(moves, '; ')}"
                      if moves else "") + ". Add model sizes or budgets over a wider range, "
                   "or seeds")
    span = train.flops.max() / train.flops.min()
    far = [r for r in fit.holdout if r.compute_ratio > max(span, 10.0)]
    if far:
        out.append(f"{listed([r.run for r in far])} use{'s' * (len(far) == 1)} up to "
                   f"{max(r.compute_ratio for r in far):.3g}x the largest fitting run's "
                   f"compute, farther than the fitted points span ({span:.3g}x): trust "
                   f"{'its prediction' if len(far) == 1 else 'their predictions'} less")
    if by_name(fit.law).frontier and fit.holdout:  # beyond 2 noise sigmas: not noise
        flops = np.r_[train.flops, [r.flops for r in fit.holdout]]
        loss = np.r_[train.loss, [r.loss for r in fit.holdout]]
        off = [r.run for r in fit.holdout if np.any(
            (flops <= r.flops) & (loss < r.loss * np.exp(-2 * fit.noise.sigma)))]
        if off:
            out.append(f"{len(off)} of {len(fit.holdout)} held-out runs lie off the "
                       f"compute-efficient frontier ({listed(off)}: another run reached a "
                       f"loss lower by more than the noise with no more compute), which "
                       f"{fit.law} predicts: their errors measure how far off they lie, not "
                       "the law's")
    drawn = sum(b.inside for b in fit.budgets) >= 2  # the N_opt line through those alone
    for b in fit.budgets:
        if not b.inside:
            out.append(f"the IsoFLOP minimum at C={b.flops:.3g} lies outside the sizes tried"
                       + (" (left out of the N_opt line)" if drawn else "")
                       + "; add sizes on its far side")
    if fit.budgets and not 0 < (a := fit.params["a"]) < 1:
        out.append(f"N_opt grows as C^{a:.3g}: {'D_opt' if a > 1 else 'N_opt'} falls as compute "
                   "grows, which no scaling law does; the budgets' minima are not measured "
                   "well enough: add sizes around each minimum")
    if fit.bootstrap and (bad := fit.bootstrap.failed + fit.bootstrap.not_converged):
        out.append(f"{bad} of {fit.bootstrap.n} bootstrap refits failed or did not converge and "
                   + ("are left out of the intervals" if fit.bootstrap.usable else
                      "the rest cannot stand for the law's uncertainty: intervals from the "
                      "fit's curvature instead, which understates them when E is not "
                      "identified; add sizes or budgets"))
    if fit.law in ND_LAWS and fit.allocation.note == ONE_LADDER:  # `_allocation` measured it
        out.append(ONE_LADDER + "; predictions hold along that line only")
    if fit.outliers:
        out.append(f"{len(fit.outliers)} run(s) lie more than 3 noise sigmas off the law: "
                   f"{listed(fit.outliers)}")
    return out


def _positive_array(value: Any, name: str) -> np.ndarray:
    x = np.asarray(value, dtype=float).reshape(-1)
    if not x.size or not np.all(np.isfinite(x) & (x > 0)):
        raise FitError(f"{name}={value!r}; expected positive finite number(s)")
    return x


def off_ladder(fit: Fit, params: float, tokens: float) -> float | None:
    """How far a run of N `params` and D `tokens` lies off the one line in log N and log D
    that the fit's runs moved along, as the factor D / D on the line (None: the runs did not,
    or an older fit.json does not say). Off it, the fit cannot tell N's effect from D's, so
    its intervals do not hold there."""
    if (ladder := fit.allocation.ladder) is None:
        return None
    return tokens / (ladder["coef"] * params ** ladder["exponent"])


def predict(fit: Fit, *, params=None, tokens=None, flops=None) -> dict:
    """Evaluate a fit. ``params`` and ``tokens`` give the loss of such a run (at ``flops``
    when given: a run's exact compute, which kaplan's L(C) needs; else the points' FLOPs per
    token); ``flops`` alone gives the compute-optimal N and D and the loss there, as far as the
    law determines them. Scalars give floats, sequences give lists. ``intervals`` holds the
    law's 95% bounds (from its bootstrap, else its curvature); ``run_interval`` a 95% interval
    for the loss of an actual run, which adds the run's own noise and the law's misfit at its
    reach."""
    law = by_name(fit.law)
    query = {"params": params, "tokens": tokens, "flops": flops}
    given = [k for k, v in query.items() if v is not None]
    if {"params", "tokens"} <= set(given):
        if law.loss is None:
            raise FitError(f"an {fit.law} fit gives the compute-optimal allocation, not a loss; "
                           "give flops alone (lm predict FIT --flops C)")
        n, d = np.broadcast_arrays(_positive_array(params, "params"),
                                   _positive_array(tokens, "tokens"))
        c = run_flops(fit, n, d) if flops is None else np.broadcast_to(
            _positive_array(flops, "flops"), n.shape)
        inputs = {"params": n, "tokens": d, "flops": c}
    elif given == ["flops"]:
        c = _positive_array(flops, "flops")
        coefs = allocation_coefs(fit.law, fit.params, fit.flops_per_token)
        if coefs is not None and not fit.allocation.determined:
            raise FitError(f"this fit does not determine the compute-optimal split: "
                           f"{fit.allocation.note}; give params and tokens instead")
        inputs = {"flops": c}
        if coefs is not None:
            k_n, a, k_d, b = coefs
            inputs |= {"params": k_n * c ** a, "tokens": k_d * c ** b}
        n, d = inputs.get("params"), inputs.get("tokens")
    else:
        raise FitError(f"predict needs params and tokens (for the loss) or flops alone (for the "
                       f"compute-optimal allocation); got {', '.join(given) or 'none of them'}")
    out, intervals = dict(inputs), {}
    if law.loss is not None:
        point, draws = _law_losses(fit, n, d, c)
        out["loss"] = point
        if draws is not None and len(draws):
            intervals["loss"] = np.percentile(draws, [2.5, 97.5], axis=0)
        if fit.noise:
            out["run_interval"] = _run_interval(fit, point, draws, c).T
    if given == ["flops"]:
        for k, v in _allocation_draws(fit, c).items():
            intervals[k] = np.percentile(v, [2.5, 97.5], axis=0)
    scalar = all(np.ndim(query[k]) == 0 for k in given)
    plain = (lambda x: float(np.asarray(x).reshape(-1)[0])) if scalar else \
        (lambda x: np.asarray(x, dtype=float).tolist())
    result = {"law": fit.law, "given": given,
              **{k: plain(v) for k, v in out.items() if k != "run_interval"}}
    if intervals:
        result["intervals"] = {k: [plain(lo), plain(hi)] for k, (lo, hi) in intervals.items()}
    if "run_interval" in out:
        result["run_interval"] = [plain(out["run_interval"][0]), plain(out["run_interval"][1])]
    return result


def _allocation_draws(fit: Fit, c: np.ndarray) -> dict[str, np.ndarray]:
    """N_opt and D_opt at compute `c` in each of the law's draws [S, m]."""
    if allocation_coefs(fit.law, fit.params, fit.flops_per_token) is None:
        return {}

    def optimum(p: dict) -> np.ndarray:  # [S, 2, m]
        k_n, a, k_d, b = (np.asarray(x, dtype=float) for x in allocation_coefs(
            fit.law, p, fit.flops_per_token))
        return np.stack([k_n * c ** a, k_d * c ** b], axis=1)

    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        both = _sampled(fit, optimum)
    if both is None or not len(both):  # no draws, or every one wild
        return {}
    return {"params": both[:, 0], "tokens": both[:, 1]}


# ----------------------------------------------------------------------------- text


def format_fit(fit: Fit) -> str:
    """A few lines for the terminal."""
    law = by_name(fit.law)
    status = "converged" if fit.converged else "NOT CONVERGED"
    used = "annealed ends of runs" if fit.annealed_only else (
        f"{fit.points_dropped} points dropped (early or under-trained)")
    robust = ("a parabola in log N per budget, then a line through the minima in log N"
              if law.inputs is None else "least squares on log L" if fit.loss == "lsq"
              else f"Huber delta {fit.huber_delta:.3g} on log L")
    lines = [f"{fit.law} fit: {law.formula}",
             f"  {fit.n_points} points from {fit.n_runs} runs ({used}); {robust}; "
             f"objective {fit.objective:.6g}, {status}"]
    if fit.n_counted != "total":  # predictions need N counted the same way
        lines.append(f"  N counts {N_COUNTS[fit.n_counted]}")
    if fit.noise:
        lines.append(f"  run-to-run noise {fit.noise.describe()}")
    unidentified = fit.identifiability is not None and not fit.identifiability.identified
    for k in law.names:
        interval = (f" 95% [{fit.intervals[k][0]:.4g}, {fit.intervals[k][1]:.4g}]"
                    if k in fit.intervals else "")
        if k == "E" and unidentified:  # refits that all stop at a bound do not pin it down
            interval += " (NOT identified: see the E the data allow)"
        lines.append(f"  {k:<6} {fit.params[k]:<10.5g}{interval}".rstrip())
    if fit.identifiability:
        i = fit.identifiability
        lines.append(f"  E the data allow: [{i.allowed[0]:.4g}, {i.allowed[1]:.4g}] "
                     f"({'identified' if i.identified else 'NOT identified'})")
    if fit.bootstrap:
        b = fit.bootstrap
        lines.append(f"  {'intervals from' if b.usable else 'NO intervals from (too few):'} "
                     f"{b.n - b.failed - b.not_converged} bootstrap refits over runs "
                     f"({b.failed} failed, {b.not_converged} not converged, left out)")
    if fit.laplace and not (fit.bootstrap and fit.bootstrap.usable):
        lines.append("  intervals from the fit's curvature (its normal, to first order)")
    if fit.misfit:
        lines.append(f"  the law's misfit on its own runs: {fit.misfit.describe()}; in the "
                     "intervals for runs")
    elif law.loss is not None:
        lines.append("  the law's misfit: not measured (too few runs, or too few sizes among them, "
                     "below half the largest one's compute to refit the law); intervals hold "
                     "sampling error and noise only")
    for m in fit.budgets:
        outside = "" if m.inside else ", minimum outside the sizes tried"
        lines.append(f"  budget C={m.flops:.3g}: N_opt={m.params:.3g}, D_opt={m.tokens:.3g}, "
                     f"L={m.loss:.4g} ({m.n_runs} runs{outside})")
    alloc = fit.allocation
    if alloc.determined:
        n, d = alloc.params, alloc.tokens
        lines.append(f"  compute-optimal: N_opt = {n['coef']:.4g} C^{n['exponent']:.4f}, "
                     f"D_opt = {d['coef']:.4g} C^{d['exponent']:.4f} (C in FLOPs, "
                     f"{fit.flops_per_token['coef']:.3g} N^{fit.flops_per_token['exponent']:.3f} "
                     "per token)")
        lines += [f"    C={e['flops']:.0e}: N={e['params']:.3g}, D={e['tokens']:.3g}"
                  + (f", L={e['loss']:.4g}" if "loss" in e else "") for e in alloc.examples]
    else:
        lines.append(f"  compute-optimal allocation: not determined ({alloc.note})")
    lines += [f"  WARNING {w}" for w in fit.warnings]
    if fit.holdout:
        lines.append(f"  held-out ARE {fit.are:.2%} (mean over {len(fit.holdout)} runs)")
        lines += [f"    run {r.label} ({r.compute_ratio:.1f}x the largest fitting run): "
                  f"predicted {r.predicted:.4g}" + (f" [{r.interval[0]:.4g}, {r.interval[1]:.4g}]"
                                                    if r.interval else "")
                  + f", actual {r.loss:.4g}, ARE {r.are:.2%}" for r in fit.scored]
    return "\n".join(lines)


def format_prediction(pred: Mapping) -> str:
    """One line per queried input: what was given, then what the law says about it."""
    column = lambda v: np.atleast_1d(v).tolist()  # noqa: E731
    values = {k: column(pred[k]) for k in ("params", "tokens", "flops", "loss") if k in pred}
    bounds = {k: list(zip(column(lo), column(hi)))
              for k, (lo, hi) in pred.get("intervals", {}).items()}
    runs = list(zip(*map(column, pred["run_interval"]))) if "run_interval" in pred else None

    def show(k, i):
        interval = f" [{bounds[k][i][0]:.4g}, {bounds[k][i][1]:.4g}]" if k in bounds else ""
        derived = k == "flops" and k not in pred["given"]  # by the fit's FLOPs per token
        return f"{k}{'~' if derived else '='}{values[k][i]:.4g}{interval}"

    inputs = [k for k in values if k in pred["given"]]
    outputs = [k for k in values if k not in pred["given"]]
    return "\n".join(f"{pred['law']}: {' '.join(show(k, i) for k in inputs)} -> "
                     f"{' '.join(show(k, i) for k in outputs)}"
                     + (f"; an actual run: [{runs[i][0]:.4g}, {runs[i][1]:.4g}]" if runs else "")
                     for i in range(len(values[inputs[0]])))
