"""How often intervals for held-out runs hold, with and without the law's misfit, on simulated
ladders whose truth is or is not the fitted law's shape.

    python tools/misfit_sim.py [--draws 40] [--noise 0.003] [CASE ...]

A CASE is TRUTH,DESIGN,LAW: TRUTH one of chinchilla (Hoffmann et al.'s constants), drift (its
N exponent falling by 0.03 per e-fold of N), bend (its D exponent rising by 0.02 per e-fold of
D), kaplan (Kaplan et al.'s L(N, D) with a floor 1.5); DESIGN grid (6 sizes over 14x, 5-40
tokens per parameter; held out at 4x and 30x the largest compute) or isoflop (7 sizes about
the optimum at 5 budgets over 100x; held out compute-optimal at 10x and 100x); LAW a loss law
of lm.scaling. Every draw adds log-normal noise to each run and fits with `scaling.fit`'s
defaults; each line gives, per held-out reach, the RMS error, the share of intervals for a run
that hold the actual loss, and their median half-width, with the misfit and without it (the
same fit rescored with `misfit=None`).
"""

import argparse
from dataclasses import replace

import numpy as np

from lm import scaling
from lm.points import Points

TRUTHS = {
    "chinchilla": lambda n, d: 1.69 + 406.4 / n ** 0.34 + 410.7 / d ** 0.28,
    "drift": lambda n, d: 1.69 + 406.4 / 1e8 ** 0.34 * (1e8 / n) ** (0.34 - 0.03 * np.log(n / 1e8))
    + 410.7 / d ** 0.28,
    "bend": lambda n, d: 1.69 + 406.4 / n ** 0.34
    + 410.7 / 1e10 ** 0.28 * (1e10 / d) ** (0.28 + 0.02 * np.log(d / 1e10)),
    "kaplan": lambda n, d: 1.5 + ((8.8e13 / n) ** (0.076 / 0.095) + 5.4e13 / d) ** 0.095,
}
CASES = ["chinchilla,grid,chinchilla", "drift,grid,chinchilla", "bend,grid,chinchilla",
         "chinchilla,isoflop,chinchilla", "drift,isoflop,chinchilla", "kaplan,isoflop,chinchilla",
         "kaplan,grid,kaplan-nd", "chinchilla,isoflop,kaplan-nd"]


def design(name: str) -> tuple[list, list]:
    """(N, D) of the fitting runs and of the held-out ones."""
    if name == "grid":
        sizes = np.geomspace(1e7, 1.4e8, 6)
        fitting = [(n, n * r) for n in sizes for r in (5, 10, 20, 40)]
        c_max = 6 * sizes[-1] ** 2 * 40
        held = [(sizes[-1] * np.sqrt(k), k * c_max / (6 * sizes[-1] * np.sqrt(k))) for k in (4, 30)]
        return fitting, held
    optimal = lambda c: np.sqrt(c / 120)  # noqa: E731 (20 tokens per parameter)
    fitting = [(n, c / (6 * n)) for c in np.geomspace(1e17, 1e19, 5)
               for n in optimal(c) * np.geomspace(1 / 4, 4, 7)]
    return fitting, [(optimal(c), c / (6 * optimal(c))) for c in (1e20, 1e21)]


def draw(truth, fitting, held, noise, rng) -> Points:
    rows = [{"params": n, "tokens": d, "run": f"{kind}{i}"}
            for kind, pairs in (("f", fitting), ("h", held)) for i, (n, d) in enumerate(pairs)]
    for row in rows:
        row["loss"] = truth(row["params"], row["tokens"]) * np.exp(noise * rng.standard_normal())
    return Points.from_rows(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("cases", nargs="*", default=CASES, metavar="CASE")
    p.add_argument("--draws", type=int, default=40)
    p.add_argument("--noise", type=float, default=0.003, help="std of log L per run")
    args = p.parse_args()
    for case in args.cases:
        truth, kind, law = case.split(",")
        fitting, held = design(kind)
        rng = np.random.default_rng(0)
        rows = {}  # reach -> [(error, inside with, inside without, half-widths)]
        for _ in range(args.draws):
            points = draw(TRUTHS[truth], fitting, held, args.noise, rng)
            runs = [f"h{i}" for i in range(len(held))]
            fit = scaling.fit(points, law, holdout=runs)
            bare = scaling.score(replace(fit, misfit=None), points, runs)
            for a, b in zip(fit.holdout, bare.holdout):
                rows.setdefault(round(a.compute_ratio), []).append((
                    np.log(a.loss / a.predicted),
                    *(h.interval[0] <= h.loss <= h.interval[1] for h in (a, b)),
                    *(np.log(h.interval[1] / h.interval[0]) / 2 for h in (a, b))))
        for reach, r in sorted(rows.items()):
            z, with_, without, w_with, w_without = map(np.array, zip(*r))
            print(f"{case:32s} {reach:4d}x  RMS error {np.sqrt(np.mean(z ** 2)):6.2%}  inside "
                  f"{with_.mean():4.0%} with the misfit, {without.mean():4.0%} without; half-width "
                  f"{np.median(w_with):6.2%} / {np.median(w_without):6.2%}", flush=True)


if __name__ == "__main__":
    main()
