"""Time the scaling-law fitter on Epoch AI's refit of Chinchilla's Figure 4 data.

    python tools/fit_bench.py [--repeats 3]

Prints the best wall time of a Chinchilla (Approach 3) fit on the 240 points Besiroglu et al.
kept, and the fitted constants. Timing lives here, not in the tests: the machine is shared.
"""

import argparse
import csv
import sys
import time
from pathlib import Path

from lm import scaling
from lm.points import Points

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "chinchilla_fig4_epoch.csv"


def epoch_points(drop_highest: int = 5) -> Points:
    with DATA.open(newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: float(r["loss"]))
    rows = rows[:len(rows) - drop_highest]
    n = [float(r["Model Size"]) for r in rows]
    c = [float(r["Training FLOP"]) for r in rows]
    return Points(params=n, tokens=[ci / (6 * ni) for ci, ni in zip(c, n)],
                          loss=[float(r["loss"]) for r in rows], flops=c)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    points = epoch_points()
    best = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        result = scaling.fit(points)
        best = min(best, time.perf_counter() - start)
    print(scaling.format_fit(result))
    print(f"chinchilla fit of {len(points)} points: best of {args.repeats}: {best:.3f} s")


if __name__ == "__main__":
    sys.exit(main())
