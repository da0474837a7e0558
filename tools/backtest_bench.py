"""The backtest against the held-out error it is meant to foreshadow, source by source.

    python tools/backtest_bench.py SOURCE... (--holdout-above FLOPS | --holdout RUNS)
                                   [--law LAW] [--min-tokens-per-param R] [--params COUNT]

Each SOURCE (a points CSV or a sweep) is fitted without its held-out runs (those above FLOPS,
or the comma-separated RUNS) and scored on them; the line gives the backtest's RMS error and
mean (refitted at 1/r of the largest fitting run's compute, r the farthest held-out reach the
runs allow) beside the held-out runs' own, then the medians. The README's figures for the
main job's studies:

    python tools/backtest_bench.py experiments/results/quick/seed*/points.csv \\
        --holdout-above 2e12 --law kaplan-nd --min-tokens-per-param 4
"""

import argparse
import statistics

import numpy as np

from lm import backtest, laws, scaling, store
from lm.cli import holdout_names


def sources_parser(doc: str) -> argparse.ArgumentParser:
    """SOURCE... (points CSVs or sweeps), which of their runs are held out, and the point
    filter: the arguments of the tools that score held-out runs source by source."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("sources", nargs="+")
    holdout = p.add_mutually_exclusive_group(required=True)
    holdout.add_argument("--holdout-above", type=float, metavar="FLOPS")
    holdout.add_argument("--holdout", metavar="RUNS",
                         help="run names, comma-separated, as for lm fit --holdout")
    p.add_argument("--min-tokens-per-param", type=float, metavar="R")
    p.add_argument("--params", default="total", choices=scaling.N_COUNTS,
                   help="what N counts, as lm fit --params (default: total)")
    return p


def loaded(args, source: str):
    """The points of `source`, with N counted as `sources_parser`'s --params says."""
    return store.load_points(source, params=args.params)[0]


def held_out(args, points) -> dict:
    """`scaling.fit`'s held-out runs and point filter from `sources_parser`'s arguments."""
    return {"holdout_above": args.holdout_above,
            "holdout": holdout_names(args.holdout.strip(), set(points.run.tolist()))
            if args.holdout else None,
            "min_tokens_per_param": args.min_tokens_per_param}


def main() -> None:
    p = sources_parser(__doc__)
    p.add_argument("--law", default="chinchilla", choices=laws.LAWS)
    args = p.parse_args()
    tried, held = [], []
    for source in args.sources:
        points = loaded(args, source)
        fit = scaling.fit(points, args.law, **held_out(args, points))
        if not fit.holdout:
            print(f"{source}: no held-out run", flush=True)
            continue
        b = backtest.farthest(fit, points, [r.compute_ratio for r in fit.holdout])
        z = np.log([r.loss / r.predicted for r in fit.holdout])
        held.append(float(np.sqrt(np.mean(z ** 2))))
        if b.runs:
            tried.append(b.rms)
        line = f"{100 * b.rms:5.2f}% (mean {100 * b.mean:+5.2f}%)" if b.runs else "too few runs"
        print(f"{source}: backtest {line}; held-out {100 * held[-1]:5.2f}% (mean "
              f"{100 * z.mean():+5.2f}%, {len(z)} runs)", flush=True)
    if tried and held:
        print(f"median RMS error: backtest {100 * statistics.median(tried):.2f}% over "
              f"{len(tried)}, held-out {100 * statistics.median(held):.2f}% over {len(held)}")


if __name__ == "__main__":
    main()
