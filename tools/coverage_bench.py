"""How a law's intervals and predictions hold on held-out runs, source by source.

    python tools/coverage_bench.py SOURCE... (--holdout-above FLOPS | --holdout RUNS)
                                   [--law LAW ...] [--bootstrap 50] [--min-tokens-per-param R]
                                   [--params COUNT]

Each SOURCE (a points CSV or a sweep) is fitted by each LAW (default: both laws of N and D)
without its held-out runs, as `lm fit SOURCE --law LAW --bootstrap B --holdout-above FLOPS`
does, and scored on them: how many lie inside their 95% intervals for a run, the mean and
median |ARE|, the median half-width of those intervals and of the law's alone, their ratio to
the median |ARE| (about 2.9 for a calibrated normal interval), and how many ended below their
prediction; then the same over all sources, and the error's mean and spread beside the
spreads of the predictions and of the actual losses (for one study repeated with other seeds:
how much of the error is the prediction's own variation, how much the held-out runs'). The
protocol of experiments/results/public/coverage.md and clean-test.md, e.g.

    python tools/coverage_bench.py nemotron.csv --holdout-above 5e19
"""

import statistics

import numpy as np

from lm import laws, scaling
from lm.errors import FitError

from backtest_bench import held_out, loaded, sources_parser  # a script beside this one in tools/


def score(runs) -> dict:
    """Held-out runs (`scaling.HeldOut`s) against their predictions and intervals."""
    are = [abs(r.are) for r in runs]
    half = [(r.interval[1] - r.interval[0]) / 2 / r.predicted for r in runs]
    law_half = [(r.law_interval[1] - r.law_interval[0]) / 2 / r.predicted for r in runs]
    return {"runs": len(runs),
            "inside": sum(r.interval[0] <= r.loss <= r.interval[1] for r in runs),
            "mean_are": float(np.mean(are)), "median_are": statistics.median(are),
            "half_width": statistics.median(half), "law_half_width": statistics.median(law_half),
            "below": sum(r.loss < r.predicted for r in runs),
            "reach": (min(r.compute_ratio for r in runs), max(r.compute_ratio for r in runs))}


def main() -> None:
    p = sources_parser(__doc__)
    p.add_argument("--law", action="append", choices=laws.LOSS_LAWS,
                   help="repeatable; default: " + ", ".join(laws.ND_LAWS))
    p.add_argument("--bootstrap", type=int, default=50)
    args = p.parse_args()
    totals = {}
    for source in args.sources:
        points = loaded(args, source)
        for law in args.law or laws.ND_LAWS:
            try:
                fit = scaling.fit(points, law, bootstrap=args.bootstrap,
                                  **held_out(args, points))
            except FitError as e:
                print(f"{source} {law}: {e}", flush=True)
                continue
            s = score(fit.holdout)
            totals.setdefault(law, []).extend(fit.holdout)
            print(f"{source} {law}: {s['inside']} of {s['runs']} inside (reach "
                  f"{s['reach'][0]:.3g}-{s['reach'][1]:.3g}x); |ARE| mean "
                  f"{s['mean_are']:.2%}, median {s['median_are']:.2%}; median half-width "
                  f"{s['half_width']:.2%} (the law's {s['law_half_width']:.2%}), "
                  f"{s['half_width'] / s['median_are']:.1f}x the median |ARE|; "
                  f"{s['below']} below their prediction", flush=True)
    for law, runs in totals.items():
        s = score(runs)
        print(f"{law}: {s['inside']} of {s['runs']} held-out runs inside "
              f"({s['inside'] / s['runs']:.0%}); |ARE| mean {s['mean_are']:.2%}, within 2% "
              f"{sum(abs(r.are) <= 0.02 for r in runs)}; {s['below']} below their prediction")
        if len(runs) > 2:  # e.g. one run a study, for studies repeated with other seeds
            err = np.log([r.loss / r.predicted for r in runs])
            spread = [np.std(np.log([getattr(r, k) for r in runs]), ddof=1)
                      for k in ("predicted", "loss")]
            print(f"{law}: log(actual / predicted) mean {err.mean():+.2%}, std "
                  f"{np.std(err, ddof=1):.2%}; std of log predicted {spread[0]:.2%}, of log "
                  f"actual {spread[1]:.2%}")


if __name__ == "__main__":
    main()
