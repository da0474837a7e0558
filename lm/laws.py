"""The laws a fit can take, and how one is fitted to points once (its uncertainty is
`scaling`'s):

* ``chinchilla``: L = E + A/N^alpha + B/D^beta (Hoffmann et al. 2022, Approach 3), fitted on
  log L with a Huber loss summed over points (Besiroglu et al. 2024), E bounded to
  [0, lowest loss observed).
* ``kaplan-nd``: L = E + ((N_c/N)^(alpha_N/alpha_D) + D_c/D)^alpha_D (Kaplan et al. 2020,
  eq. 1.5, with a floor E). Unlike Chinchilla's sum, how much a model gains from more data
  depends on its size: small models saturate in D while large ones keep gaining, which is what
  small ladders that give every size the same token budgets show.
* ``kaplan``: L = E + (C0/C)^alpha, fitted on the compute-efficient frontier (the lower envelope
  of loss against compute over all runs, as Kaplan et al. 2020 define it); it says nothing about
  how to split C between N and D.
* ``isoflop``: Chinchilla Approach 2: a parabola of loss against log N per compute budget; the
  minima give N_opt(C) and D_opt(C).

The first three are a constant plus power laws, fitted on log L (each point weighted by its
noise where the seeds show a trend) by L-BFGS-B with exact gradients from the best starts of a
unit-free grid (`Problem`, `power_fit`); `allocation_coefs` turns a law into N_opt(C), D_opt(C).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy.optimize import minimize

from lm.errors import FitError
from lm.noise import NOISE_FLOOR, Noise
from lm.points import BUDGET_TOL, Points, budget_labels


# ----------------------------------------------------------------------------- the power-sum fit
#
# The three parametric laws are a constant plus a sum of power laws, fitted on log L:
#   L = E + sum_j exp(a_j - alpha_j x_j),   x_j = log of N, D or C, centred on its mean,
# so that a_j is the log of term j at a typical point and the grid of starts is unit-free.
# theta = (E, a_1..a_k, alpha_1..alpha_k); E is bounded to [0, lowest loss).


# Kaplan's (N_c/N)^(alpha_N/alpha_D) is stored as N_c = exp(a / g) for the ratio g: as g
# goes to 0, N_c over- or underflows and the term turns into 0^0 = 1. A ratio under 1/20 is
# a loss that hardly depends on N (on public sweeps and this project's studies it is 0.33 to
# 1.2), so the fit stops there.
OUTER_RATIO_MIN = 0.05


@dataclass(frozen=True)
class Problem:
    """A power-sum fit, L = E + S or (with `outer`) L = E + S^p, S = sum_j exp(a_j - g_j x_j):
    centred log inputs xc [n, k], log losses y [n], their weights w [n] (`Noise.weights`),
    the robust loss. theta = [E, a_1..a_k, g_1..g_k] (+ [p]). With `outer` the last input's
    exponent is 1 (Kaplan's D_c/D): the outer power sets the law's slope in it."""

    xc: np.ndarray
    y: np.ndarray
    w: np.ndarray
    delta: float  # Huber's delta in log-loss units; inf: least squares
    e_max: float
    outer: bool = False

    @property
    def k(self) -> int:
        return self.xc.shape[1]

    def subset(self, rows: np.ndarray) -> Problem:
        """The same fit over the points at `rows`."""
        return replace(self, xc=self.xc[rows], y=self.y[rows], w=self.w[rows])

    def bounds(self, e: float | None = None) -> list[tuple[float, float]]:
        """E in [0, lowest loss) (or fixed at `e`); each term's level and exponent bounded so
        that nothing overflows. Under an outer power p a level is log S = log(L - E) / p: 11.6
        for Kaplan et al.'s own law (alpha_D 0.095), so its bounds reach L - E from e^-3 to
        e^3 at p = 0.02; exp(150 + 4 |x|), squared, stays finite for inputs within 10^22 of
        their centre."""
        exponents = [(0.0, 4.0)] * self.k
        levels = (-30.0, 10.0)
        if self.outer:  # the inner exponents are ratios, alpha_N / alpha_D: see OUTER_RATIO_MIN
            exponents = [(OUTER_RATIO_MIN, 4.0)] * (self.k - 1) + [(1.0, 1.0), (0.01, 2.0)]
            levels = (-150.0, 150.0)
        return [(0.0, self.e_max) if e is None else (e, e)] + [levels] * self.k + exponents

    def psi(self, r: np.ndarray) -> np.ndarray:
        """The robust loss's derivative: r, clipped to [-delta, delta] for Huber."""
        return np.clip(r, -self.delta, self.delta)

    def rho(self, r: np.ndarray) -> np.ndarray:
        """r^2 / 2 within delta, delta (|r| - delta / 2) beyond: psi(r) (r - psi(r) / 2)."""
        psi = self.psi(r)
        return psi * (r - 0.5 * psi)

    @property
    def scale(self) -> float:
        """Divides the objective so that it is O(points) and L-BFGS-B's tolerances hold."""
        return min(self.delta, 0.05) ** 2

    def terms(self, theta: np.ndarray) -> np.ndarray:
        """exp(a_j - g_j x_j) [..., n, k] for theta [..., 1+2k(+1)]; the bounds on a and g
        keep it finite."""
        k = self.k
        return np.exp(theta[..., None, 1:k + 1] - theta[..., None, k + 1:2 * k + 1] * self.xc)

    def predicted(self, theta: np.ndarray) -> np.ndarray:
        s = self.terms(theta).sum(-1)
        return theta[..., :1] + (s ** theta[..., -1:] if self.outer else s)

    def residuals(self, theta: np.ndarray) -> np.ndarray:
        return (np.log(self.predicted(theta)) - self.y) * self.w

    def objective(self, theta: np.ndarray) -> np.ndarray:
        """Sum of rho over points, for one theta or a stack of them."""
        return self.rho(self.residuals(theta)).sum(-1)

    def jacobian(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The predicted losses [n] and their derivatives in theta [n, len(theta)]."""
        t = self.terms(theta)
        s = t.sum(-1)
        if not self.outer:
            return theta[0] + s, np.column_stack([np.ones_like(s), t, -t * self.xc])
        p = theta[-1]
        sp = s ** p
        inner = (p * sp / s)[:, None]  # d S^p / d S
        return theta[0] + sp, np.column_stack([np.ones_like(s), inner * t,
                                               -inner * t * self.xc, sp * np.log(s)])

    def objective_and_grad(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        pred, jac = self.jacobian(theta)
        r = (np.log(pred) - self.y) * self.w
        psi = self.psi(r)
        grad = (psi * self.w / pred) @ jac  # d rho / d pred, chained
        return float(psi @ (r - 0.5 * psi)) / self.scale, grad / self.scale


_ALPHAS = np.array([0.1, 0.25, 0.5, 0.8, 1.2])
_LEVELS = np.array([0.03, 0.1, 0.3, 0.6])  # of the median loss, for each term at the centre
_E_FRACTIONS = np.array([0.0, 0.25, 0.5, 0.75, 0.95])  # of the lowest loss
_POWERS = np.array([0.1, 0.25, 0.5, 1.0])  # outer powers
_N_STARTS = 6
# Ranking the grid costs (starts x points): on a sweep's loss curves (30,000 points) it was 104
# of a 120 s fit. Which starts are best is a coarse question that 2,000 evenly spaced points
# answer; the descents from them use every point.
GRID_POINTS = 2000


def _grid(p: Problem) -> np.ndarray:
    """Every combination of starting E, term levels and exponents (and outer powers: each
    term's level is then that of S^p), within the bounds."""
    levels = np.log(_LEVELS * np.exp(np.median(p.y)))
    lo, hi = np.array(p.bounds()).T
    axes = [_E_FRACTIONS * p.e_max, *[levels] * p.k, *[_ALPHAS] * p.k, *[_POWERS] * p.outer]
    axes = [np.unique(np.clip(a, *b)) for a, *b in zip(axes, lo, hi)]  # a fixed exponent: once
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(axes))
    if p.outer:  # (powers <= 1 only widen the levels: clipping them before changes nothing)
        grid[:, 1:p.k + 1] /= grid[:, -1:]
    return np.unique(np.clip(grid, lo, hi), axis=0)


def _starts(p: Problem, extra: Sequence[np.ndarray] = ()) -> np.ndarray:
    """The best few of the grid (and of `extra` candidates), judged by the objective."""
    grid = np.concatenate([_grid(p), *[np.asarray(e)[None] for e in extra]])
    n = len(p.y)
    judge = p.subset(np.linspace(0, n - 1, min(n, GRID_POINTS)).round().astype(int))
    chunks = np.array_split(grid, max(1, grid.size * len(judge.y) // 2_000_000))  # bounded memory
    f = np.concatenate([judge.objective(g) for g in chunks])
    return grid[np.argsort(f)[:_N_STARTS]]


def converged(res, p: Problem, bounds) -> bool:
    """L-BFGS-B met its tolerance (not: stopped at its iteration limit or in a failed line
    search), at a point whose projected gradient is small — or every residual, weighted as in
    the fit, is within a thousandth of NOISE_FLOOR: exact losses, where no step can do better
    and a line search in rounding error fails."""
    if np.max(np.abs(p.residuals(res.x))) <= 1e-3 * NOISE_FLOOR:
        return True
    lo, hi = np.array(bounds).T
    g = np.where((res.x <= lo + 1e-12) & (res.jac > 0) | (res.x >= hi - 1e-12) & (res.jac < 0),
                 0.0, res.jac)
    return bool(res.status == 0 and np.max(np.abs(g)) <= 1e-3 * max(1.0, abs(res.fun)))


def descend(p: Problem, theta0: np.ndarray, bounds, ftol: float = 1e-13):
    """One L-BFGS-B descent of `p`'s objective from theta0 (clipped into `bounds`)."""
    theta0 = np.clip(theta0, *np.array(bounds).T)
    return minimize(p.objective_and_grad, theta0, jac=True, method="L-BFGS-B", bounds=bounds,
                    options={"maxiter": 10_000, "maxfun": 20_000, "ftol": ftol,
                             "gtol": 1e-9, "maxls": 50})


def settle(p: Problem, res, bounds, ftol: float = 1e-13):
    """`res`, or where a fresh descent from it ends if it did not converge: a line search
    stalled, often in rounding noise, and fresh curvature memory there confirms or moves on."""
    return res if converged(res, p, bounds) else descend(p, res.x, bounds, ftol)


def _solve(p: Problem, extra: Sequence[np.ndarray] = ()):
    """The lowest optimum from the best starts of the grid and of `extra` (a bootstrap
    refit's: the point estimate): (theta, objective, converged)."""
    bounds = p.bounds()
    starts = _starts(p, extra)
    results = []
    for s in starts:
        results.append(descend(p, s, bounds))
        best = min(results, key=lambda res: res.fun)
        if sum(res.fun <= best.fun * (1 + 1e-9) + 1e-12 for res in results) >= 2:
            break  # two starts agree on the lowest optimum: the rest would find it again
    best = settle(p, best, bounds)
    return best.x, float(best.fun * p.scale), converged(best, p, bounds)


def e_ceiling(points: Points) -> float:
    """The largest E a fit to `points` may take: just under their lowest loss, where the law's
    terms would vanish."""
    return float(points.loss.min()) * (1 - 1e-6)


def problem(law: Law, points: Points, delta: float, noise: Noise | None = None
            ) -> tuple[Problem, np.ndarray]:
    """`law`'s power sum over `points` (weighted by `noise` where it has a trend, Huber's
    `delta`), and the mean log inputs mu it is centred on."""
    logx = law.inputs(points)
    mu = logx.mean(0)
    w = noise.weights(points) if noise else np.ones(len(points))
    return Problem(logx - mu, np.log(points.loss), w, delta, e_ceiling(points), law.outer), mu


def uncentre(theta: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """a_j + g_j mu_j: the log coefficient of term j in the raw inputs."""
    k = len(mu)
    return np.r_[theta[:1], theta[1:k + 1] + theta[k + 1:2 * k + 1] * mu, theta[k + 1:]]


def centre(theta: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """uncentre's inverse: a_j - g_j mu_j."""
    k = len(mu)
    return np.r_[theta[:1], theta[1:k + 1] - theta[k + 1:2 * k + 1] * mu, theta[k + 1:]]


# ----------------------------------------------------------------------------- laws


NOUNS = {"params": "model sizes (params)", "tokens": "token counts",
         "flops": "compute values (flops)"}


def _require_distinct(points: Points, law: str, **minimum: int) -> None:
    """Refuse, before optimising, points that cannot pin the law down."""
    got = {name: len(np.unique(getattr(points, name))) for name in minimum}
    if any(got[name] < need for name, need in minimum.items()):
        need = " and ".join(f">= {n} distinct {NOUNS[name]}" for name, n in minimum.items())
        have = ", ".join(f"{got[name]} {NOUNS[name]}" for name in minimum)
        raise FitError(f"a {law} fit needs {need}; the points to fit have {have}")


def _inputs_chinchilla(points: Points) -> np.ndarray:
    return np.log(np.column_stack([points.params, points.tokens]))


def _inputs_kaplan(points: Points) -> np.ndarray:
    return np.log(points.flops)[:, None]


def _plain(x):
    """A float for a scalar, the array itself for a stack of draws."""
    return float(x) if np.ndim(x) == 0 else x


def _from_theta_chinchilla(theta) -> dict:
    e, a, b, alpha, beta = theta
    return {"E": _plain(e), "A": _plain(np.exp(a)), "B": _plain(np.exp(b)),
            "alpha": _plain(alpha), "beta": _plain(beta)}


def _to_theta_chinchilla(p: Mapping[str, float]) -> np.ndarray:
    return np.array([p["E"], math.log(p["A"]), math.log(p["B"]), p["alpha"], p["beta"]])


def _from_theta_kaplan_nd(theta) -> dict:
    # (N_c/N)^g = exp(g log N_c - g log N); D_c/D = exp(log D_c - log D); alpha_D = p
    e, a_n, a_d, g, _, p = theta
    return {"E": _plain(e), "N_c": _plain(np.exp(a_n / g)), "D_c": _plain(np.exp(a_d)),
            "alpha_N": _plain(g * p), "alpha_D": _plain(p)}


def _to_theta_kaplan_nd(p: Mapping[str, float]) -> np.ndarray:
    g = p["alpha_N"] / p["alpha_D"]
    with np.errstate(divide="ignore"):  # a term that vanished (N_c = 0): a level of -inf,
        log_nc, log_dc = np.log([p["N_c"], p["D_c"]])  # which its bounds clip
    return np.array([p["E"], g * log_nc, log_dc, g, 1.0, p["alpha_D"]])


def _from_theta_kaplan(theta) -> dict:
    # (C0/C)^alpha = exp(alpha log C0 - alpha log C): coefficient alpha log C0
    e, k, alpha = theta
    with np.errstate(divide="ignore", over="ignore"):
        return {"E": _plain(e), "C0": _plain(np.exp(k / alpha)), "alpha": _plain(alpha)}


def _to_theta_kaplan(p: Mapping[str, float]) -> np.ndarray:
    return np.array([p["E"], p["alpha"] * math.log(p["C0"]), p["alpha"]])


def _check_nd(law: str) -> Callable[[Points], None]:
    return lambda points: _require_distinct(points, law, params=3, tokens=3)


def _check_kaplan(points: Points) -> None:
    _require_distinct(points, "kaplan", flops=3)


def _budgets_of(points: Points) -> list[Points]:
    labels = budget_labels(points)
    return [points.select(labels == label) for label in np.unique(labels)]


def _check_isoflop(points: Points) -> list[Points]:
    """The points grouped by compute budget, once checked to be enough for Approach 2."""
    budgets = _budgets_of(points)
    for b in budgets:
        sizes = len(np.unique(b.params))
        if sizes < 3:
            raise FitError(f"an isoflop fit needs >= 3 distinct model sizes per compute "
                           f"budget; the budget at C ~ {np.exp(np.log(b.flops).mean()):.3g} "
                           f"FLOPs has {sizes} (without a budget column, runs are one budget "
                           f"when their FLOPs lie within {BUDGET_TOL:.0%}: where exact FLOPs "
                           "stray from the budget the runs were sized for, name it in a column "
                           "budget)")
    if len(budgets) < 2:
        raise FitError(f"an isoflop fit needs >= 2 compute budgets (named in a column budget, "
                       f"else FLOPs apart by more than {BUDGET_TOL:.0%}); the points to fit "
                       f"have {len(budgets)}")
    return budgets


def _chinchilla_loss(p, n, d, c):
    return p["E"] + p["A"] * n ** -p["alpha"] + p["B"] * d ** -p["beta"]


def _kaplan_nd_loss(p, n, d, c):
    inner = (p["N_c"] / n) ** (p["alpha_N"] / p["alpha_D"]) + p["D_c"] / d
    return p["E"] + inner ** p["alpha_D"]


def _kaplan_loss(p, n, d, c):
    return p["E"] + (p["C0"] / c) ** p["alpha"]


@dataclass(frozen=True)
class Law:
    """A law's formula and parameter names, and how it meets points: its check, its log inputs
    and theta <-> parameters (power sums), its loss, which points it fits."""

    formula: str
    names: tuple[str, ...]
    check: Callable[[Points], object]  # raises FitError if the points cannot pin the law down
    inputs: Callable[[Points], np.ndarray] | None = None  # log inputs [n, k] of a power sum
    from_theta: Callable | None = None
    to_theta: Callable | None = None
    loss: Callable | None = None  # (params, N, D, C) -> L
    finals_only: bool = False  # IsoFLOP curves compare runs at their end, not along the way
    frontier: bool = False  # Kaplan's L(C) is the envelope of all runs' points
    outer: bool = False  # E + S^p rather than E + S (see Problem)
    # points of models that saw fewer tokens per parameter are not fitted unless told
    # otherwise: the transient of early training, not the law
    min_tokens_per_param: float = 1.0
    theta_names: tuple[str, ...] | None = None  # what each of theta is, where not `names`


_LAWS = {
    "chinchilla": Law("L = E + A/N^alpha + B/D^beta", ("E", "A", "B", "alpha", "beta"),
                      _check_nd("chinchilla"), _inputs_chinchilla, _from_theta_chinchilla,
                      _to_theta_chinchilla, _chinchilla_loss),
    "kaplan-nd": Law("L = E + ((N_c/N)^(alpha_N/alpha_D) + D_c/D)^alpha_D",
                     ("E", "N_c", "D_c", "alpha_N", "alpha_D"), _check_nd("kaplan-nd"),
                     _inputs_chinchilla, _from_theta_kaplan_nd, _to_theta_kaplan_nd,
                     _kaplan_nd_loss, outer=True,
                     theta_names=("E", "N_c", "D_c", "alpha_N/alpha_D", "", "alpha_D")),
    "kaplan": Law("L = E + (C0/C)^alpha", ("E", "C0", "alpha"), _check_kaplan,
                  _inputs_kaplan, _from_theta_kaplan, _to_theta_kaplan, _kaplan_loss,
                  frontier=True),
    "isoflop": Law("N_opt = k_N C^a, D_opt = k_D C^b", ("k_N", "a", "k_D", "b"),
                   _check_isoflop, finals_only=True, min_tokens_per_param=0.0),  # an IsoFLOP
    # curve's large-model arm lies under 1 token per parameter by design: without it, the
    # parabola's vertex moves
}
LAWS = tuple(_LAWS)
LOSS_LAWS = tuple(name for name, law in _LAWS.items() if law.loss is not None)
ND_LAWS = ("chinchilla", "kaplan-nd")  # laws of N and D: they say how to split compute


def other_nd_law(law: str) -> str | None:
    """The other law of N and D (None for a law of compute): the shape to compare a fit with."""
    return next((other for other in ND_LAWS if other != law), None) if law in ND_LAWS else None


def by_name(name: str) -> Law:
    """The law called `name` (one of LAWS)."""
    if name not in _LAWS:
        raise FitError(f"unknown law {name!r}; expected one of {', '.join(LAWS)}")
    return _LAWS[name]


def power_line(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """y = coef * x^exponent, fitted in log-log (proportional where x does not vary)."""
    logx, logy = np.log(x), np.log(y)
    if np.ptp(logx) < 1e-9:
        return {"coef": float(np.exp(np.mean(logy - logx))), "exponent": 1.0}
    exponent, log_coef = np.polyfit(logx, logy, 1)
    return {"coef": float(np.exp(log_coef)), "exponent": float(exponent)}


def flops_per_token(points: Points) -> dict[str, float]:
    """f(N) = coef * N^exponent, the training FLOPs of one token, fitted to the points' FLOPs
    (6N for points that give none; exact matmul counts grow faster than N at small N)."""
    return power_line(points.params, points.flops / points.tokens)


def power_fit(points: Points, law: Law, delta: float, noise: Noise | None,
              start: Mapping | None = None):
    """(params, objective, converged) of a power-sum law."""
    p, mu = problem(law, points, delta, noise)
    extra = [] if start is None else [centre(law.to_theta(start), mu)]
    theta, objective, ok = _solve(p, extra)
    return law.from_theta(uncentre(theta, mu)), objective, ok


FLAT_TERM = 0.01  # a term that changes by less than this share over the data is a constant


def at_bounds(law: Law, params: Mapping[str, float], points: Points) -> list[str]:
    """The parameters of `law` fitted to `points` that the fit's search left at a bound: an
    exponent at its ceiling, or at 0 in all but name (its term changes by less than FLAT_TERM
    of itself over the points), a term's level at its floor (the term vanished). The data did
    not pin the law's shape down there, whatever the optimiser reports. E is left to the
    profile of its likelihood (`Identifiability`), which says what the data allow."""
    p, mu = problem(law, points, math.inf)
    theta = centre(law.to_theta(params), mu)
    names = law.theta_names or law.names
    margin = 1e-6 * np.diff(p.bounds()).ravel()  # of each one's range: L-BFGS-B stops on it
    lo, hi = np.array(p.bounds()).T + [margin, -margin]
    if not p.outer:  # (kaplan-nd's exponents are bounded away from 0)
        exponents = slice(p.k + 1, 2 * p.k + 1)
        with np.errstate(divide="ignore"):  # an input that does not vary pins no exponent
            lo[exponents] = np.maximum(lo[exponents], FLAT_TERM / np.ptp(p.xc, axis=0))
    return [names[i] for i in range(1, len(theta))
            if margin[i] > 0 and not lo[i] < theta[i] < hi[i]]


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


def isoflop(points: Points, fpt: Mapping[str, float]) -> tuple[dict, float, bool, list]:
    """Approach 2: per budget, the minimum of a parabola of loss in log N; then log-log lines
    N_opt = k_N C^a through the minima inside the sizes tried (all, if fewer than two are),
    and D_opt = C / f(N_opt) with the points' FLOPs per token f."""
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
        n_opt = float(np.exp(x))
        minima.append(Budget(c, n_opt, c / (fpt["coef"] * n_opt ** fpt["exponent"]),
                             float(c0 - c1 * c1 / (4 * c2)), len(b),
                             (float(b.params.min()), float(b.params.max())),
                             bool(logn.min() <= x <= logn.max()), float(c2)))
    line = [m for m in minima if m.inside]  # a minimum outside the sizes is extrapolated:
    line = line if len(line) >= 2 else minima  # left out where two others can draw the line
    logc, logn = np.log([m.flops for m in line]), np.log([m.params for m in line])
    a, log_kn = np.polyfit(logc, logn, 1)
    k, g = fpt["coef"], fpt["exponent"]
    params = {"k_N": float(np.exp(log_kn)), "a": float(a),  # D = C / (k (k_N C^a)^g)
              "k_D": float(1 / (k * np.exp(log_kn) ** g)), "b": float(1 - a * g)}
    rss = float(np.sum((logn - (log_kn + a * logc)) ** 2))
    return params, rss, True, minima


def allocation_coefs(law: str, p: Mapping[str, float], fpt: Mapping[str, float]):
    """(k_N, a, k_D, b): N_opt = k_N C^a, D_opt = k_D C^b, or None when the law says
    nothing about the split. Chinchilla: minimising L(N, C / f(N)) with f(N) = k N^g gives
    N_opt^(alpha + g beta) = alpha A / (g beta B) (C/k)^beta (g = 1, k = 6: Hoffmann et al.).
    Kaplan's L(N, D) is least where (N_c/N)^r + D_c k N^g / C is, r = alpha_N / alpha_D:
    N_opt^(r + g) = r N_c^r C / (g D_c k)."""
    if law == "isoflop":
        return p["k_N"], p["a"], p["k_D"], p["b"]
    if law not in ND_LAWS:
        return None
    k, g = fpt["coef"], fpt["exponent"]
    q = {name: np.asarray(value, dtype=float) for name, value in p.items()}
    with np.errstate(divide="ignore", over="ignore", under="ignore", invalid="ignore"):
        if law == "kaplan-nd":
            r = q["alpha_N"] / q["alpha_D"]
            a = 1 / (r + g)
            k_n = (r * q["N_c"] ** r / (g * q["D_c"] * k)) ** a
        else:
            s = q["alpha"] + g * q["beta"]
            a = q["beta"] / s
            k_n = (q["alpha"] * q["A"] / (g * q["beta"] * q["B"])) ** (1 / s) * k ** -a
        return k_n, a, 1 / (k * k_n ** g), 1 - g * a
