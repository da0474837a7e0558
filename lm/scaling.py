"""Scaling-law fits from (params, tokens, loss) points, honest about their error.

Three laws:

* ``chinchilla``: L = E + A/N^alpha + B/D^beta (Hoffmann et al. 2022, Approach 3), fitted on
  log L with a Huber loss (delta = 1e-3) summed over points, as refitted by Besiroglu et al. 2024.
* ``kaplan``: L = E + (C0/C)^alpha, loss against compute alone (Kaplan et al. 2020 with an
  irreducible term); it says nothing about how to split C between N and D.
* ``isoflop``: Chinchilla Approach 2: a parabola of loss against log N per compute budget; the
  minima give N_opt = k_N * C^a and D_opt = k_D * C^b.

Error is reported the way Choshen et al. 2024 advise: the absolute relative error (ARE) of a
held-out run's final loss, and percentile intervals from a bootstrap over whole runs (points of
one learning curve are correlated; resampling them one by one would understate the spread).

Everything here is numpy/scipy; the result is a frozen `Fit` with a JSON round-trip (``fit.json``).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize

from lm.errors import FitError

HUBER_DELTA = 1e-3
BUDGET_TOL = 0.05  # FLOPs within 5% of each other belong to one IsoFLOP budget
_COLUMNS = "params, tokens, loss (optional: flops, run, step)"
_FIELDS = ("params", "tokens", "loss", "flops", "run", "step")


# ----------------------------------------------------------------------------- data


def _own_run(i: int) -> str:
    """Run id of a point that names none: it is a run of its own."""
    return f"#{i}"


@dataclass(frozen=True, eq=False)
class Points:
    """Observed points, one per (run, step): parallel numpy arrays of one length.

    ``flops`` defaults to 6·N·D, ``run`` to one run per point, ``step`` to -1 (unknown).
    """

    params: np.ndarray
    tokens: np.ndarray
    loss: np.ndarray
    flops: np.ndarray | None = None
    run: np.ndarray | None = None
    step: np.ndarray | None = None

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        for name in ("params", "tokens", "loss"):
            put(name, np.asarray(getattr(self, name), dtype=float).reshape(-1))
        n = len(self.params)
        put("flops", 6 * self.params * self.tokens if self.flops is None
            else np.asarray(self.flops, dtype=float).reshape(-1))
        put("run", np.array([_own_run(i) for i in range(n)]) if self.run is None
            else np.asarray(self.run, dtype=str).reshape(-1))
        put("step", np.full(n, -1) if self.step is None
            else np.asarray(self.step, dtype=int).reshape(-1))
        lengths = {f.name: len(getattr(self, f.name)) for f in fields(self)}
        if len(set(lengths.values())) != 1:
            raise FitError(f"Points arrays differ in length: {lengths}")
        for name in ("params", "tokens", "loss", "flops"):
            values = getattr(self, name)
            bad = np.flatnonzero(~(np.isfinite(values) & (values > 0)))
            if bad.size:
                raise FitError(f"Points.{name}[{bad[0]}] = {values[bad[0]]}; "
                                 "expected a positive finite number")

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping[str, Any]]) -> Points:
        """Points from dicts (or sqlite3.Rows) with keys params, tokens, loss and optional
        flops, run, step."""
        if not rows:
            raise FitError(f"no rows; expected dicts with keys {_COLUMNS}")
        return _parse([dict(row) for row in rows], lambda i: f"row {i}")

    def __len__(self) -> int:
        return len(self.loss)

    def select(self, index: np.ndarray) -> Points:
        """The points picked by a boolean mask or an index array (indices may repeat)."""
        return Points(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def _run_groups(self) -> tuple[np.ndarray, np.ndarray]:
        """Each point's run as an integer, and each run's final tokens."""
        _, inv = np.unique(self.run, return_inverse=True)
        last = np.zeros(len(inv))
        np.maximum.at(last, inv, self.tokens)
        return inv, last

    def final_mask(self) -> np.ndarray:
        """True at each run's last point (most tokens, then highest step)."""
        inv, _ = self._run_groups()
        order = np.lexsort((self.step, self.tokens, inv))
        is_last = np.r_[inv[order][1:] != inv[order][:-1], True]
        mask = np.zeros(len(self), dtype=bool)
        mask[order[is_last]] = True
        return mask

    def early_mask(self, fraction: float) -> np.ndarray:
        """True at points trained on less than ``fraction`` of their run's final tokens.

        Progress is measured in tokens rather than logged steps so that the cut does not depend
        on how densely a run was logged; a run's final point is never early.
        """
        inv, last = self._run_groups()
        return self.tokens < fraction * last[inv]


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _positive(value: Any, where: str) -> float:
    if _blank(value):
        raise FitError(f"{where}: missing value; expected a positive finite number")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise FitError(f"{where}: {value!r} is not a number; "
                         "expected a positive finite number") from None
    if not (math.isfinite(x) and x > 0):
        raise FitError(f"{where}: {value!r} is not a positive finite number")
    return x


def _step(value: Any, where: str) -> int:
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = math.nan
    if not (x.is_integer() and x >= 0):
        raise FitError(f"{where}: {value!r} is not a step; expected an integer >= 0 (or empty)")
    return int(x)


def _parse(records: Sequence[Mapping[str, Any]], locate: Callable[[int], str]) -> Points:
    """Records of cells (strings or numbers) → Points; each error names the record and column."""
    cols: dict[str, list] = {f.name: [] for f in fields(Points)}
    for i, rec in enumerate(records):
        where = lambda name: f"{locate(i)}, column '{name}'"  # noqa: E731
        row = {k: _positive(rec.get(k), where(k)) for k in ("params", "tokens", "loss")}
        flops, run, step = (rec.get(k) for k in ("flops", "run", "step"))
        row["flops"] = (6 * row["params"] * row["tokens"] if _blank(flops)
                        else _positive(flops, where("flops")))
        row["run"] = _own_run(i) if _blank(run) else str(run).strip()
        row["step"] = -1 if _blank(step) else _step(step, where("step"))
        for k, v in row.items():
            cols[k].append(v)
    return Points(**cols)


def load_csv(path: str | Path, ignore_columns: bool = False) -> Points:
    """Points from a CSV with columns params, tokens, loss and optional flops, run, step.

    A column of another name is an error (a misspelt `run` would silently make every row a
    run of its own) unless `ignore_columns`. A CSV without ``run`` makes each row its own run.
    """
    path = Path(path)
    if not path.is_file():
        raise FitError(f"{path}: no such file; expected a CSV with columns {_COLUMNS}")
    with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: a byte-order mark is no name
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise FitError(f"{path}: empty file; expected a header line with columns {_COLUMNS}")
        reader.fieldnames = header = [h.strip() for h in reader.fieldnames]
        missing = [c for c in ("params", "tokens", "loss") if c not in header]
        if missing:
            raise FitError(f"{path}, line 1: missing column(s) {', '.join(missing)}; "
                           f"found {', '.join(header)}; expected {_COLUMNS}")
        unknown = [c for c in header if c not in _FIELDS]
        if unknown and not ignore_columns:
            raise FitError(f"{path}, line 1: unknown column(s) {', '.join(unknown)}; the columns "
                           f"are {_COLUMNS}: rename a misspelt one, or ignore the others "
                           "(lm fit --ignore-columns)")
        records, lines = [], []
        for rec in reader:
            records.append(rec)
            lines.append(reader.line_num)
    if not records:
        raise FitError(f"{path}: no data rows after the header; expected rows of {_COLUMNS}")
    return _parse(records, lambda i: f"{path}, line {lines[i]}")


def resample_runs(run: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Point indices of one bootstrap sample: as many runs as there are, drawn with
    replacement, each contributing all of its points."""
    _, inv, counts = np.unique(run, return_inverse=True, return_counts=True)
    order = np.argsort(inv, kind="stable")  # points grouped by run
    starts = np.cumsum(counts) - counts
    drawn = rng.integers(len(counts), size=len(counts))
    lengths = counts[drawn]
    within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return order[np.repeat(starts[drawn], lengths) + within]


def group_budgets(flops: np.ndarray, tol: float = BUDGET_TOL) -> np.ndarray:
    """Budget label per point. Sweeping up from the smallest FLOPs, each budget takes every point
    within ``tol`` of its first, so no budget spans more than ``tol`` (no chaining)."""
    order = np.argsort(flops)
    sorted_flops = flops[order]
    labels = np.empty(len(flops), dtype=int)
    start, label = 0, 0
    while start < len(flops):
        end = np.searchsorted(sorted_flops, sorted_flops[start] * (1 + tol), side="right")
        labels[order[start:end]] = label
        start, label = end, label + 1
    return labels


# ----------------------------------------------------------------------------- robust fit
#
# Both parametric laws are a sum of power laws plus a constant, fitted in log space:
#   log L = logsumexp(e, a_1 - alpha_1 log x_1, ..., a_k - alpha_k log x_k),  theta = (e, a, alpha)
# The optimiser sees log x centred on its mean, so a_j becomes the log of term j at a typical
# point: the grid of starts is then unit-free and a, alpha are far less correlated.

_ALPHAS = np.array([0.05, 0.15, 0.3, 0.6, 1.2])
_FRACTIONS = np.array([0.02, 0.1, 0.3, 0.6, 0.9])  # of the median loss, for e and each a_j
_N_STARTS = 8


def _huber(r: np.ndarray) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= HUBER_DELTA, 0.5 * r * r, HUBER_DELTA * (a - 0.5 * HUBER_DELTA))


def _logsumexp(t: np.ndarray) -> np.ndarray:
    """Over the last axis; several times faster than scipy's on the starts grid."""
    m = t.max(-1, keepdims=True)
    return m[..., 0] + np.log(np.exp(t - m).sum(-1))


def _log_terms(theta: np.ndarray, xc: np.ndarray) -> np.ndarray:
    """Log of each additive term, shape (..., n, 1+k), for theta of shape (..., 1+2k)."""
    k = xc.shape[1]
    e, a, alpha = theta[..., None, :1], theta[..., None, 1:k + 1], theta[..., None, k + 1:]
    powers = a - alpha * xc
    return np.concatenate([np.broadcast_to(e, powers.shape[:-1] + (1,)), powers], axis=-1)


def _objective_and_grad(theta: np.ndarray, xc: np.ndarray, y: np.ndarray) -> tuple:
    """Summed Huber loss of the log residuals, divided by delta so that it is O(1) and
    L-BFGS-B's tolerances (relative to max(|f|, 1)) mean something."""
    t = _log_terms(theta, xc)
    z = _logsumexp(t)
    w = np.exp(t - z[:, None])  # d z / d (each term)
    r = z - y
    psi = np.clip(r, -HUBER_DELTA, HUBER_DELTA)
    grad = np.concatenate([psi @ w, -(psi[:, None] * w[:, 1:] * xc).sum(0)])
    return _huber(r).sum() / HUBER_DELTA, grad / HUBER_DELTA


def _grid_starts(xc: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The best few of a grid of thetas, judged by the objective evaluated on the whole grid."""
    k = xc.shape[1]
    levels = np.log(_FRACTIONS) + np.median(y)
    axes = np.meshgrid(*[levels] * (1 + k), *[_ALPHAS] * k, indexing="ij")
    grid = np.stack(axes, -1).reshape(-1, 1 + 2 * k)
    chunks = np.array_split(grid, max(1, grid.size * len(y) // 2_000_000))  # bounded memory
    f = np.concatenate([_huber(_logsumexp(_log_terms(g, xc)) - y).sum(-1) for g in chunks])
    return grid[np.argsort(f)[:_N_STARTS]]


def _fit_power_sum(logx: np.ndarray, y: np.ndarray, start: np.ndarray | None = None):
    """Minimise the summed Huber objective from a grid of starts (or from ``start``).

    Returns (theta, objective, converged) with theta in uncentred coordinates.
    """
    mu = logx.mean(0)
    xc = logx - mu
    k = logx.shape[1]

    def shift(theta):  # centring lowers a_j by alpha_j * mu_j and leaves e and alpha alone
        return np.r_[0.0, theta[k + 1:] * mu, np.zeros(k)]

    def descend(theta0):
        # ftol: any tighter and L-BFGS-B's line search fails in rounding noise at the optimum.
        return minimize(_objective_and_grad, theta0, args=(xc, y), jac=True, method="L-BFGS-B",
                        options={"maxiter": 5000, "ftol": 1e-13, "gtol": 1e-9})

    if start is None:
        starts = _grid_starts(xc, y)
    else:
        start = np.asarray(start, dtype=float)
        starts = [start - shift(start)]
    results = []
    for s in starts:
        results.append(descend(s))
        best = min(results, key=lambda res: res.fun)
        if sum(res.fun <= best.fun * (1 + 1e-9) for res in results) >= 2:
            break  # two starts agree on the lowest optimum: the rest would find it again
    if not best.success:  # a line search stalled, often in rounding noise at the optimum itself:
        best = descend(best.x)  # fresh curvature memory there either confirms it or moves on
    small_gradient = np.linalg.norm(best.jac) < 1e-4  # of the delta-scaled objective
    converged = bool(best.success and small_gradient)
    return best.x + shift(best.x), float(best.fun * HUBER_DELTA), converged


# ----------------------------------------------------------------------------- laws

_NOUNS = {"params": "model sizes (params)", "tokens": "token counts",
          "flops": "compute values (flops)"}


def _require_distinct(points: Points, law: str, **minimum: int) -> None:
    """Refuse, before optimising, points that cannot pin the law down."""
    got = {name: len(np.unique(getattr(points, name))) for name in minimum}
    if any(got[name] < need for name, need in minimum.items()):
        need = " and ".join(f">= {n} distinct {_NOUNS[name]}" for name, n in minimum.items())
        have = ", ".join(f"{got[name]} {_NOUNS[name]}" for name in minimum)
        raise FitError(f"a {law} fit needs {need}; the points to fit have {have}")


def _fit_chinchilla(points: Points, start: Mapping[str, float] | None) -> tuple[dict, dict]:
    _check_chinchilla(points)
    theta0 = None if start is None else [math.log(start["E"]), math.log(start["A"]),
                                         math.log(start["B"]), start["alpha"], start["beta"]]
    theta, objective, converged = _fit_power_sum(
        np.log(np.column_stack([points.params, points.tokens])), np.log(points.loss), theta0)
    e, a, b, alpha, beta = map(float, theta)
    return ({"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": alpha, "beta": beta},
            {"objective": objective, "converged": converged})


def _fit_kaplan(points: Points, start: Mapping[str, float] | None) -> tuple[dict, dict]:
    _check_kaplan(points)
    # (C0/C)^alpha = exp(alpha log C0 - alpha log C): one power term with coefficient alpha log C0.
    theta0 = None if start is None else [math.log(start["E"]),
                                         start["alpha"] * math.log(start["C0"]), start["alpha"]]
    theta, objective, converged = _fit_power_sum(np.log(points.flops)[:, None],
                                                 np.log(points.loss), theta0)
    e, k, alpha = map(float, theta)
    return ({"E": math.exp(e), "C0": math.exp(k / alpha), "alpha": alpha},
            {"objective": objective, "converged": converged})


def _check_chinchilla(points: Points) -> None:
    _require_distinct(points, "chinchilla", params=3, tokens=3)


def _check_kaplan(points: Points) -> None:
    _require_distinct(points, "kaplan", flops=3)


def _budgets_of(points: Points) -> list[Points]:
    labels = group_budgets(points.flops)
    return [points.select(labels == label) for label in np.unique(labels)]


def _check_isoflop(points: Points) -> list[Points]:
    """The points grouped by compute budget, once checked to be enough for Approach 2."""
    budgets = _budgets_of(points)
    for b in budgets:
        sizes = len(np.unique(b.params))
        if sizes < 3:
            raise FitError(f"an isoflop fit needs >= 3 distinct model sizes per compute "
                             f"budget; the budget at C ~ {np.exp(np.log(b.flops).mean()):.3g} "
                             f"FLOPs has {sizes}")
    if len(budgets) < 2:
        raise FitError(f"an isoflop fit needs >= 2 compute budgets (FLOPs apart by more than "
                         f"{BUDGET_TOL:.0%}); the points to fit have {len(budgets)}")
    return budgets


def _fit_isoflop(points: Points, start: Mapping[str, float] | None) -> tuple[dict, dict]:
    """Approach 2: per budget, the minimum of a parabola of loss in log N; then log-log lines.
    Closed-form, so ``start`` is not needed."""
    budgets = _check_isoflop(points)
    minima = []
    for b in budgets:
        c = float(np.exp(np.log(b.flops).mean()))
        logn = np.log(b.params)
        c2, c1, c0 = np.polyfit(logn, b.loss, 2)
        if c2 <= 0:
            raise FitError(f"isoflop: the loss-vs-log N parabola of the budget at C ~ {c:.3g} "
                             "FLOPs curves downwards, so it has no minimum; add sizes on both "
                             "sides of the optimum")
        x = -c1 / (2 * c2)
        minima.append(Budget(c, float(np.exp(x)), float(c / (6 * np.exp(x))),
                             float(c0 - c1 * c1 / (4 * c2)), len(b),
                             (float(b.params.min()), float(b.params.max())),
                             bool(logn.min() <= x <= logn.max()), float(c2)))
    logc = np.log([m.flops for m in minima])
    logn = np.log([m.params for m in minima])
    a, log_kn = np.polyfit(logc, logn, 1)
    # D_opt = C / (6 N_opt) at every budget, so the tokens line is the params line's complement.
    params = {"k_N": float(np.exp(log_kn)), "a": float(a),
              "k_D": float(np.exp(-log_kn) / 6), "b": float(1 - a)}
    rss = float(np.sum((logn - (log_kn + a * logc)) ** 2))
    return params, {"objective": rss, "converged": True, "budgets": minima}


def _chinchilla_loss(p, n, d, c):
    return p["E"] + p["A"] * n ** -p["alpha"] + p["B"] * d ** -p["beta"]


def _kaplan_loss(p, n, d, c):
    return p["E"] + (p["C0"] / c) ** p["alpha"]


def _chinchilla_allocation(p):
    """Minimising L at fixed C = 6ND: N_opt = G (C/6)^a, D_opt = (C/6)^b / G (Hoffmann et al.)."""
    s = p["alpha"] + p["beta"]
    a, b = p["beta"] / s, p["alpha"] / s
    g = (p["alpha"] * p["A"] / (p["beta"] * p["B"])) ** (1 / s)
    return g * 6.0 ** -a, a, 6.0 ** -b / g, b


def _isoflop_allocation(p):
    return p["k_N"], p["a"], p["k_D"], p["b"]


@dataclass(frozen=True)
class _Law:
    formula: str
    names: tuple[str, ...]
    fit: Callable[[Points, Mapping[str, float] | None], tuple[dict, dict]]  # (params, diagnostics)
    check: Callable[[Points], object]  # raises ValueError if the points cannot pin the law down
    loss: Callable | None  # (params, N, D, C) -> L
    allocation: Callable | None  # params -> (k_N, a, k_D, b): N_opt = k_N C^a, D_opt = k_D C^b
    finals_only: bool = False  # IsoFLOP curves compare runs at their end, not along the way


_LAWS = {
    "chinchilla": _Law("L = E + A/N^alpha + B/D^beta", ("E", "A", "B", "alpha", "beta"),
                       _fit_chinchilla, _check_chinchilla, _chinchilla_loss,
                       _chinchilla_allocation),
    "kaplan": _Law("L = E + (C0/C)^alpha", ("E", "C0", "alpha"), _fit_kaplan, _check_kaplan,
                   _kaplan_loss, None),
    "isoflop": _Law("N_opt = k_N C^a, D_opt = k_D C^b", ("k_N", "a", "k_D", "b"),
                    _fit_isoflop, _check_isoflop, None, _isoflop_allocation, finals_only=True),
}
LAWS = tuple(_LAWS)
LOSS_LAWS = tuple(name for name, law in _LAWS.items() if law.loss is not None)


def _law(name: str) -> _Law:
    if name not in _LAWS:
        raise FitError(f"unknown law {name!r}; expected one of {', '.join(LAWS)}")
    return _LAWS[name]


# ----------------------------------------------------------------------------- the result


@dataclass(frozen=True)
class HeldOut:
    """A held-out run's final loss against the law's prediction."""

    run: str
    params: float
    tokens: float
    flops: float
    loss: float
    predicted: float
    are: float
    interval: tuple[float, float] | None = None  # 95%, when the fit was bootstrapped


@dataclass(frozen=True)
class Budget:
    """An IsoFLOP budget's parabola: loss = loss_opt + curvature * (ln N - ln N_opt)^2."""

    flops: float
    params: float
    tokens: float
    loss: float
    n_runs: int
    params_range: tuple[float, float]
    inside: bool  # the minimum lies within the sizes tried
    curvature: float


@dataclass(frozen=True)
class Bootstrap:
    n: int
    seed: int
    failed: int
    not_converged: int
    samples: dict[str, list[float]]  # law parameter -> its value in each successful refit


@dataclass(frozen=True)
class Allocation:
    """The compute-optimal split N_opt = coef * C^exponent (and D_opt likewise), when the law
    determines it."""

    determined: bool
    note: str = ""
    params: dict[str, float] | None = None  # {"coef", "exponent"}
    tokens: dict[str, float] | None = None
    examples: tuple[dict[str, float], ...] = ()


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
    warnings: tuple[str, ...] = ()
    bootstrap: Bootstrap | None = None
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    budgets: tuple[Budget, ...] = ()
    holdout: tuple[HeldOut, ...] = ()
    are: float | None = None  # mean over the held-out runs

    @property
    def formula(self) -> str:
        return _law(self.law).formula

    def to_json(self) -> dict:
        out = {"law": self.law, "formula": self.formula, **self.params}
        for f in fields(self):
            if f.name in ("law", "params"):
                continue
            value = getattr(self, f.name)
            if f.name == "holdout":
                value = {"runs": [asdict(r) for r in value]} if value else None
            elif value is not None and f.name in ("allocation", "bootstrap"):
                value = asdict(value)
            elif f.name == "budgets":
                value = [asdict(b) for b in value] or None
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
        if law not in _LAWS:
            raise FitError(f"{where}: law {law!r} is not one of {', '.join(LAWS)}")
        spec = _LAWS[law]
        try:
            holdout = tuple(HeldOut(**{**r, "interval": _pair(r.get("interval"))})
                            for r in (raw.get("holdout") or {}).get("runs", []))
            alloc = raw["allocation"]
            boot = raw.get("bootstrap")
            return cls(
                law=law, params={k: _field(raw, k, float, where) for k in spec.names},
                objective=_field(raw, "objective", float, where),
                converged=_field(raw, "converged", bool, where),
                n_points=_field(raw, "n_points", int, where),
                n_runs=_field(raw, "n_runs", int, where),
                points_dropped=_field(raw, "points_dropped", int, where),
                drop_early=_field(raw, "drop_early", float, where),
                allocation=Allocation(**{**alloc, "examples": tuple(alloc.get("examples", ()))}),
                warnings=tuple(raw.get("warnings", ())),
                bootstrap=Bootstrap(**boot) if boot else None,
                intervals={k: _pair(v) for k, v in raw.get("intervals", {}).items()},
                budgets=tuple(Budget(**{**b, "params_range": _pair(b["params_range"])})
                              for b in raw.get("budgets") or ()),
                holdout=holdout, are=raw.get("are"))
        except (KeyError, TypeError, AttributeError) as e:
            raise FitError(f"{where}: a field is missing or malformed ({type(e).__name__}: "
                           f"{e}); refit it with lm fit") from None


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


def _pair(value) -> tuple[float, float] | None:
    return None if value is None else (float(value[0]), float(value[1]))


# ----------------------------------------------------------------------------- fit


def _holdout_runs(points: Points, holdout: str | Collection[str] | None) -> np.ndarray:
    if holdout is None:
        return np.array([], dtype=str)
    if holdout == "largest":  # every run whose final compute ties (within 1%) with the largest
        final = points.select(points.final_mask())
        return final.run[final.flops >= 0.99 * final.flops.max()]
    if isinstance(holdout, str):
        raise FitError(f"holdout={holdout!r}; "
                         "expected None, 'largest' or a collection of run ids")
    runs = np.unique(np.asarray(list(holdout), dtype=str))
    unknown = np.setdiff1d(runs, points.run)
    if unknown.size or not runs.size:
        raise FitError(f"holdout names no run or unknown runs {unknown.tolist()}; "
                         f"runs are e.g. {np.unique(points.run)[:5].tolist()}")
    return runs


def _bootstrap(points: Points, law: _Law, start: dict, n: int, seed: int) -> Bootstrap:
    """Refit on ``n`` resamples of whole runs, each started from the point estimate."""
    rng = np.random.default_rng(seed)
    draws, failed, not_converged = [], 0, 0
    for _ in range(n):
        try:
            params, diagnostics = law.fit(points.select(resample_runs(points.run, rng)), start)
        except ValueError:  # a resample can lack enough distinct sizes to pin the law down
            failed += 1
            continue
        draws.append(params)
        not_converged += not diagnostics["converged"]
    return Bootstrap(n, seed, failed, not_converged, {k: [d[k] for d in draws] for k in law.names})


def _evaluate(fit: Fit, quantities: Callable[[dict], dict]) -> tuple[dict, dict]:
    """Quantities at the point estimate, and their 95% intervals over the bootstrap samples.

    ``quantities`` maps law parameters to arrays over 1-D inputs; samples enter as (S, 1)
    columns so that one call evaluates every sample at every input.
    """
    point = quantities(fit.params)
    samples = fit.bootstrap.samples if fit.bootstrap else {}
    if not samples or not len(next(iter(samples.values()))):
        return point, {}
    with np.errstate(over="ignore", invalid="ignore"):  # a wild resample may overflow: ignore it
        draws = quantities({k: np.asarray(v, dtype=float)[:, None] for k, v in samples.items()})
    return point, {k: np.nanpercentile(v, [2.5, 97.5], axis=0) for k, v in draws.items()}


def _points_loss(fit: Fit, points: Points) -> tuple[dict, dict]:
    law = _law(fit.law)
    if law.loss is None:
        raise FitError(f"an {fit.law} fit predicts no loss; use chinchilla or kaplan")
    # Each point's own FLOPs (not 6ND), so that kaplan sees the compute actually spent.
    return _evaluate(fit, lambda p: {"loss": law.loss(p, points.params, points.tokens,
                                                      points.flops)})


def predicted_loss(fit: Fit, points: Points) -> np.ndarray:
    """The law's loss at each point (point estimate)."""
    return _points_loss(fit, points)[0]["loss"]


def _allocation(fit: Fit, law: _Law, max_flops: float) -> Allocation:
    """N_opt = coef * C^exponent for params and tokens, with examples from the data's largest
    compute decade upwards."""
    if law.allocation is None:
        return Allocation(False, "loss against compute alone does not say how to split it into "
                                 "N and D")
    k_n, a, k_d, b = map(float, law.allocation(fit.params))
    decade = math.ceil(math.log10(max_flops))
    examples = predict(fit, flops=10.0 ** np.arange(decade, decade + 4))
    keys = [k for k in ("flops", "params", "tokens", "loss") if k in examples]
    return Allocation(True, params={"coef": k_n, "exponent": a},
                      tokens={"coef": k_d, "exponent": b},
                      examples=tuple(dict(zip(keys, v)) for v in zip(*(examples[k] for k in keys))))


def _holdout(fit: Fit, points: Points, held: np.ndarray) -> tuple[tuple[HeldOut, ...], float]:
    """Each held-out run's final loss against the law's prediction, and their mean ARE."""
    final = points.select(points.final_mask() & np.isin(points.run, held))
    point, intervals = _points_loss(fit, final)
    are = np.abs(point["loss"] - final.loss) / final.loss
    bounds = list(zip(*intervals["loss"])) if intervals else [None] * len(final)
    runs = tuple(HeldOut(str(r), float(n), float(d), float(c), float(l), float(p), float(e),
                         None if i is None else (float(i[0]), float(i[1])))
                 for r, n, d, c, l, p, e, i in zip(final.run, final.params, final.tokens,
                                                    final.flops, final.loss, point["loss"], are,
                                                    bounds))
    return runs, float(are.mean())


def _fitted(points: Points, law: _Law, drop_early: float) -> Points:
    """The points a fit uses: no early ones; for finals-only laws, each run's last."""
    kept = points.select(~points.early_mask(drop_early))
    return kept.select(kept.final_mask()) if law.finals_only else kept


def check_design(points: Points, law: str = "chinchilla", drop_early: float = 0.1) -> None:
    """Refuse planned points (say, a sweep's, before it trains) that could not pin `law` down:
    the same check a fit makes, made before any compute is spent."""
    spec = _law(law)
    spec.check(_fitted(points, spec, drop_early))


def fit(points: Points, law: str = "chinchilla", *, holdout: str | Collection[str] | None = None,
        bootstrap: int = 0, drop_early: float = 0.1, seed: int = 0) -> Fit:
    """Fit ``law`` to ``points``.

    drop_early: drop points trained on less than this fraction of their run's final tokens.
    holdout: None, "largest" (the run(s) with the largest final compute) or run ids; these are
        left out and their final losses predicted (ARE). bootstrap: number of refits on runs
        resampled with replacement, giving 95% percentile intervals (seeded by ``seed``).
    """
    spec = _law(law)
    if not 0 <= drop_early < 1:
        raise FitError(f"drop_early={drop_early}; expected a fraction in [0, 1)")
    if bootstrap < 0:
        raise FitError(f"bootstrap={bootstrap}; expected a number of refits >= 0")
    held = _holdout_runs(points, holdout)
    if held.size and spec.loss is None:
        raise FitError(f"holdout needs a law that predicts loss "
                       f"({', '.join(LOSS_LAWS)}), not {law}")
    early = points.early_mask(drop_early)
    train = _fitted(points.select(~np.isin(points.run, held)), spec, drop_early)
    params, diagnostics = spec.fit(train, None)
    boot = _bootstrap(train, spec, params, bootstrap, seed) if bootstrap else None
    intervals = {k: tuple(np.percentile(v, [2.5, 97.5]).tolist())
                 for k, v in boot.samples.items()} if boot and boot.samples[spec.names[0]] else {}
    result = Fit(law=law, params=params, objective=diagnostics["objective"],
                 converged=diagnostics["converged"], n_points=len(train),
                 n_runs=len(np.unique(train.run)), points_dropped=int(early.sum()),
                 drop_early=drop_early, allocation=Allocation(False), bootstrap=boot,
                 intervals=intervals, budgets=tuple(diagnostics.get("budgets", ())))
    result = replace(result, allocation=_allocation(result, spec, train.flops.max()),
                     warnings=tuple(_warnings(result, train)))
    return score(result, points, held) if held.size else result


def score(fit: Fit, points: Points, held: Collection[str]) -> Fit:
    """`fit` with the final losses of the runs `held` (left out of it) set against what it
    predicted for them: their ARE."""
    runs, are = _holdout(fit, points, np.asarray(sorted(held), dtype=str))
    return replace(fit, holdout=runs, are=are)


def _warnings(fit: Fit, train: Points) -> list[str]:
    """What makes a converged fit untrustworthy for extrapolation."""
    out = []
    if "E" in fit.params and fit.params["E"] < 1e-3 * train.loss.min():
        out.append("E ~ 0: the points do not pin down the irreducible loss, so the law is a pure "
                   "power law that keeps falling; extrapolations will overshoot. Add model sizes "
                   "or token budgets, or seeds to average the runs' noise")
    return out


# ----------------------------------------------------------------------------- predict


def _positive_array(value: Any, name: str) -> np.ndarray:
    x = np.asarray(value, dtype=float).reshape(-1)
    if not x.size or not np.all(np.isfinite(x) & (x > 0)):
        raise FitError(f"{name}={value!r}; expected positive finite number(s)")
    return x


def predict(fit: Fit, *, params=None, tokens=None, flops=None) -> dict:
    """Evaluate a fit: ``params`` and ``tokens`` give the loss (kaplan: at C = 6ND); ``flops``
    alone gives the compute-optimal N and D and the loss there, as far as the law determines
    them. Scalars give floats, sequences give lists; ``intervals`` holds 95% bounds when the fit
    was bootstrapped."""
    name = fit.law
    law = _law(name)
    query = {"params": params, "tokens": tokens, "flops": flops}
    given = [k for k, v in query.items() if v is not None]
    if given == ["params", "tokens"]:
        if law.loss is None:
            raise FitError(f"an {name} fit gives the compute-optimal allocation, not a loss; "
                           "call predict with flops= alone")
        n, d = np.broadcast_arrays(_positive_array(params, "params"),
                                   _positive_array(tokens, "tokens"))
        inputs = {"params": n, "tokens": d, "flops": 6 * n * d}
        quantities = lambda p: {"loss": law.loss(p, n, d, 6 * n * d)}  # noqa: E731
    elif given == ["flops"]:
        c = _positive_array(flops, "flops")
        inputs = {"flops": c}

        def quantities(p):
            out = {}
            if law.allocation is not None:
                k_n, a, k_d, b = law.allocation(p)
                out = {"params": k_n * c ** a, "tokens": k_d * c ** b}
            if law.loss is not None:
                out["loss"] = law.loss(p, out.get("params"), out.get("tokens"), c)
            return out
    else:
        raise FitError(f"predict needs params and tokens (for the loss) or flops alone (for the "
                       f"compute-optimal allocation); got {', '.join(given) or 'none of them'}")
    point, intervals = _evaluate(fit, quantities)
    scalar = all(np.ndim(query[k]) == 0 for k in given)
    plain = (lambda x: float(x[0])) if scalar else (lambda x: np.asarray(x, dtype=float).tolist())
    out = {"law": name, "given": given, **{k: plain(v) for k, v in {**inputs, **point}.items()}}
    if intervals:
        out["intervals"] = {k: [plain(lo), plain(hi)] for k, (lo, hi) in intervals.items()}
    return out


# ----------------------------------------------------------------------------- text


def format_fit(fit: Fit) -> str:
    """A few lines for the terminal."""
    law = _law(fit.law)
    status = "converged" if fit.converged else "NOT CONVERGED"
    lines = [f"{fit.law} fit: {law.formula}",
             f"  {fit.n_points} points from {fit.n_runs} runs ({fit.points_dropped} early "
             f"points dropped); objective {fit.objective:.6g}, {status}"]
    for k in law.names:
        interval = (f" 95% [{fit.intervals[k][0]:.4g}, {fit.intervals[k][1]:.4g}]"
                    if k in fit.intervals else "")
        lines.append(f"  {k:<6} {fit.params[k]:<10.5g}{interval}".rstrip())
    if fit.bootstrap:
        b = fit.bootstrap
        lines.append(f"  intervals from {b.n - b.failed} bootstrap refits over runs "
                     f"({b.failed} failed, {b.not_converged} not converged)")
    for m in fit.budgets:
        outside = "" if m.inside else ", minimum outside the sizes tried"
        lines.append(f"  budget C={m.flops:.3g}: N_opt={m.params:.3g}, D_opt={m.tokens:.3g}, "
                     f"L={m.loss:.4g} ({m.n_runs} runs{outside})")
    alloc = fit.allocation
    if alloc.determined:
        n, d = alloc.params, alloc.tokens
        lines.append(f"  compute-optimal: N_opt = {n['coef']:.4g} C^{n['exponent']:.4f}, "
                     f"D_opt = {d['coef']:.4g} C^{d['exponent']:.4f}")
        lines += [f"    C={e['flops']:.0e}: N={e['params']:.3g}, D={e['tokens']:.3g}"
                  + (f", L={e['loss']:.4g}" if "loss" in e else "") for e in alloc.examples]
    else:
        lines.append(f"  compute-optimal allocation: not determined ({alloc.note})")
    lines += [f"  WARNING {w}" for w in fit.warnings]
    if fit.holdout:
        lines.append(f"  held-out ARE {fit.are:.2%} (mean over {len(fit.holdout)} runs)")
        lines += [f"    run {r.run}: predicted {r.predicted:.4g}, actual {r.loss:.4g}, "
                  f"ARE {r.are:.2%}" for r in fit.holdout]
    return "\n".join(lines)


def format_prediction(pred: Mapping) -> str:
    """One line per queried input: what was given, then what the law says about it."""
    column = lambda v: np.atleast_1d(v).tolist()  # noqa: E731
    values = {k: column(pred[k]) for k in ("params", "tokens", "flops", "loss") if k in pred}
    bounds = {k: list(zip(column(lo), column(hi)))
              for k, (lo, hi) in pred.get("intervals", {}).items()}

    def show(k, i):
        interval = f" [{bounds[k][i][0]:.4g}, {bounds[k][i][1]:.4g}]" if k in bounds else ""
        return f"{k}={values[k][i]:.4g}{interval}"

    inputs = [k for k in values if k in pred["given"]]
    outputs = [k for k in values if k not in pred["given"]]
    return "\n".join(f"{pred['law']}: {' '.join(show(k, i) for k in inputs)} -> "
                     f"{' '.join(show(k, i) for k in outputs)}"
                     for i in range(len(values[inputs[0]])))
