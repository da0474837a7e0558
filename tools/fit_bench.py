"""Time the scaling-law fitter.

    python tools/fit_bench.py [--repeats 3]
    python tools/fit_bench.py --curves 150x200 [--repeats 1]

By default: the best wall time of a Chinchilla (Approach 3) fit on the 240 points of Epoch AI's
refit of Chinchilla's Figure 4 (the ones Besiroglu et al. kept), and the fitted constants.
With --curves RUNSxPOINTS: a `kaplan-nd` fit with `lm fit`'s 100 bootstrap refits of whole loss
curves, RUNS runs of POINTS points each, drawn from Hoffmann et al.'s law with 0.5% noise —
the many-point fit of a sweep's curves. Timing lives here, not in the tests: the machine is
shared.
"""

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

from lm import laws, scaling
from lm.points import Points
from lm.spec import FitSpec

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "chinchilla_fig4_epoch.csv"
HOFFMANN = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}


def epoch_points(drop_highest: int = 5) -> Points:
    with DATA.open(newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: float(r["loss"]))
    rows = rows[:len(rows) - drop_highest]
    n = [float(r["Model Size"]) for r in rows]
    c = [float(r["Training FLOP"]) for r in rows]
    return Points(params=n, tokens=[ci / (6 * ni) for ci, ni in zip(c, n)],
                          loss=[float(r["loss"]) for r in rows], flops=c)


def curve_points(runs: int, per_run: int, seed: int = 0) -> Points:
    """`runs` runs from 1e6 to 1e8 params, each trained to 5-100 tokens per param, `per_run`
    evenly spaced evaluations each."""
    rng = np.random.default_rng(seed)
    sizes = np.geomspace(1e6, 1e8, runs)
    n = np.repeat(sizes, per_run)
    step = np.tile(np.arange(1, per_run + 1), runs)
    d = np.repeat(sizes * rng.uniform(5, 100, runs), per_run) * step / per_run
    loss = laws.by_name("chinchilla").loss(HOFFMANN, n, d, 6 * n * d) * np.exp(
        rng.normal(0, 0.005, n.size))
    return Points(params=n, tokens=d, loss=loss, run=np.repeat(np.arange(runs), per_run),
                  step=step)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--curves", metavar="RUNSxPOINTS", help="fit synthetic loss curves instead")
    args = p.parse_args()
    if args.curves:
        runs, per_run = map(int, args.curves.split("x"))
        points, law, options = curve_points(runs, per_run), "kaplan-nd", {
            "bootstrap": FitSpec.bootstrap}
    else:
        points, law, options = epoch_points(), "chinchilla", {}
    best = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        result = scaling.fit(points, law, **options)
        best = min(best, time.perf_counter() - start)
    print(scaling.format_fit(result))
    print(f"{law} fit of {len(points)} points: best of {args.repeats}: {best:.3f} s")


if __name__ == "__main__":
    sys.exit(main())
