"""What a study's design costs in held-out error, read from the study repeated with other seeds.

    python tools/design_bench.py SOURCE... (--holdout-above FLOPS | --holdout RUNS)
                                 [--law LAW] [--min-tokens-per-param R] [--params COUNT]
                                 [--seeds K,K,...]... [--draws 200]

The SOURCEs are one study repeated with disjoint seeds (points CSVs or sweeps). Each source's
final points are cut into units, one per (model size, seed): a stable run and its cooldown
branches stay together. Then, with every error as predicted over actual, less 1:
- at each N and D with seeds, how far their mean moves from source to source, against what
  their spread alone would move it: the excess is what a source's runs share;
- the design's limit as seeds grow: the law fitted to the mean log loss at each N and D,
  predicting the held-out runs' mean; what no number of seeds removes (the law's misfit to the
  mean curve at that reach);
- each source's own prediction (as coverage_bench prints them);
- for each --seeds allocation (seeds per size, smallest first; default: the first source's),
  DRAWS studies drawn from the pooled units without replacement, each fitted as `lm fit` does
  and scored on a held-out run drawn from the pool: the prediction about the held-out mean
  and its error on that run. Units drawn from different sources share nothing a study's
  seeds do (their data order), so this spread is a floor for the sources' own.
The main job's, e.g.

    python tools/design_bench.py experiments/results/quick/seed{60,70,80,{100..390..10}}/points.csv \\
        --holdout-above 2e12 --law kaplan-nd --min-tokens-per-param 4 --seeds 6,6,2,2,3,3
"""

import collections
import dataclasses

import numpy as np

from lm import laws, scaling
from lm.errors import FitError
from lm.points import Points

from backtest_bench import held_out, loaded, sources_parser  # a script beside this one in tools/


def joined(parts: list[Points]) -> Points:
    return Points(**{f.name: np.concatenate([getattr(p, f.name) for p in parts])
                     for f in dataclasses.fields(Points)})


def units(tag: str, points: Points, held: set[str]
          ) -> tuple[dict[float, list[Points]], list[Points]]:
    """A source's fitting units by N, and its `held` runs (one unit each); run names are
    prefixed with `tag` so that units of different sources never share one."""
    final = points.finals()
    is_held = np.isin(final.run, list(held))
    final = dataclasses.replace(final, run=np.char.add(f"{tag}:", final.run))
    rest = final.select(~is_held)
    seed = np.array([r.rsplit("-s", 1)[-1] for r in rest.run])  # a sweep's run names end -sSEED
    fitting = collections.defaultdict(list)
    for n, s in sorted(set(zip(rest.params, seed))):
        fitting[n].append(rest.select((rest.params == n) & (seed == s)))
    return fitting, [final.select(final.run == f"{tag}:{r}") for r in sorted(held)]


def fitted(args, study: Points, held: list[str]) -> list[scaling.HeldOut]:
    return scaling.fit(study, args.law, holdout=held,
                       min_tokens_per_param=args.min_tokens_per_param).holdout


def means(parts: list[Points], tag: str) -> list[dict]:
    """One point per N and D of `parts`: their mean log loss, as a run named tag-N-D."""
    p = joined(parts)
    return [{"params": n, "tokens": d, "loss": np.exp(np.log(p.loss[at]).mean()),
             "flops": p.flops[at].mean(), "run": f"{tag}-{n:.0f}-{d:.0f}", "annealed": True}
            for n, d in sorted(set(zip(p.params, p.tokens)))
            for at in [(p.params == n) & (p.tokens == d)]]


def limit(args, pool: dict[float, list[Points]], held: list[Points]) -> float:
    """The law on the mean log loss at each N and D, predicting the held-out mean: its error."""
    targets = means(held, "held")
    study = Points.from_rows(means([u for us in pool.values() for u in us], "mean") + targets)
    scored = fitted(args, study, [t["run"] for t in targets])
    return float(np.mean([h.predicted / h.loss - 1 for h in scored]))


def shared(pool: dict[float, list[Points]]) -> list[str]:
    """At each N and D with seeds: the seeds' spread within a source, and how far their mean
    moves from source to source against what that spread alone would move it: the excess is
    what a source's runs share (a data order, where its trials read one)."""
    lines = []
    for n in sorted(pool):
        p = joined(pool[n])
        source = np.array([r.split(":", 1)[0] for r in p.run])
        for d in np.unique(p.tokens):
            logs = [np.log(p.loss[(p.tokens == d) & (source == s)]) for s in np.unique(source)]
            logs = [x for x in logs if len(x) > 1]
            if len(logs) < 2:
                continue
            var = np.array([np.var(x, ddof=1) for x in logs])
            k = np.array([len(x) for x in logs])
            lines.append(f"N={n:.4g} D={d:.3g}: {k.mean():.3g} seeds spread "
                         f"{100 * var.mean() ** 0.5:.2f}%; their mean "
                         f"{100 * np.std([x.mean() for x in logs], ddof=1):.2f}% from source to "
                         f"source ({100 * np.mean(var / k) ** 0.5:.2f}% by that spread)")
    return lines


def drawn(args, pool, held, seeds: list[int], rng) -> tuple[np.ndarray, np.ndarray]:
    """Predictions of `args.draws` drawn studies: their error about the held-out runs' mean
    loss, and on the held-out run each was scored on."""
    mean = np.exp(np.mean([np.log(h.loss).mean() for h in held]))
    about, own = [], []
    for _ in range(args.draws):
        picked = [size[i] for n, k in zip(sorted(pool), seeds)
                  for size in [pool[n]] for i in rng.choice(len(size), k, replace=False)]
        h = held[rng.integers(len(held))]
        try:
            scored = fitted(args, joined([*picked, h]), list(h.run))
        except FitError:  # a draw the law cannot take: counted out below
            continue
        about += [s.predicted / mean - 1 for s in scored]
        own += [s.predicted / s.loss - 1 for s in scored]
    return np.array(about), np.array(own)


def pct(x: np.ndarray) -> str:
    return f"{100 * x.mean():+.2f}% ± {100 * x.std():.2f}%"


def main() -> None:
    p = sources_parser(__doc__)
    p.add_argument("--law", default="kaplan-nd", choices=laws.LOSS_LAWS)
    p.add_argument("--seeds", action="append", metavar="K,K,...",
                   help="seeds per size, smallest first (repeatable)")
    p.add_argument("--draws", type=int, default=200)
    args = p.parse_args()
    pool, held, own = collections.defaultdict(list), [], []
    for i, source in enumerate(args.sources):
        points = loaded(args, source)
        scored = scaling.fit(points, args.law, **held_out(args, points)).holdout
        fitting, held_runs = units(str(i), points, {h.run for h in scored})
        if i == 0:
            first = [len(fitting[n]) for n in sorted(fitting)]
        for n, us in fitting.items():
            pool[n] += us
        held += held_runs
        own += [h.predicted / h.loss - 1 for h in scored]
    mean = np.exp(np.mean([np.log(h.loss).mean() for h in held]))
    print(f"{len(args.sources)} sources; units per size: "
          + ", ".join(f"N={n:.4g}: {len(pool[n])}" for n in sorted(pool))
          + f"; {len(held)} held-out runs, mean loss {mean:.4f}")
    print("\n".join(shared(pool)))
    print(f"the design's limit (the law on mean losses): {100 * limit(args, pool, held):+.2f}%")
    own = np.array(own)
    print(f"the sources' own: {len(own)} predictions, error on their run {pct(own)}, within 2%: "
          f"{np.mean(abs(own) < 0.02):.0%}")
    rng = np.random.default_rng(0)
    for seeds in [[int(k) for k in s.split(",")] for s in args.seeds or [",".join(map(str, first))]]:
        if len(seeds) != len(pool) or any(k > len(pool[n]) for n, k in zip(sorted(pool), seeds)):
            p.error(f"--seeds {seeds}: expected {len(pool)} counts, each at most its size's units")
        about, err = drawn(args, pool, held, seeds, rng)
        if not len(err):
            print(f"seeds {','.join(map(str, seeds))}: no draw could be fitted")
            continue
        print(f"seeds {','.join(map(str, seeds))}: {len(err)} of {args.draws} draws fitted; "
              f"prediction about the held-out mean {pct(about)}; error on its run {pct(err)}, "
              f"within 2%: {np.mean(abs(err) < 0.02):.0%}")


if __name__ == "__main__":
    main()
