"""How well a sweep's design can predict its held-out runs, before any of it trains.

    python tools/design_sim.py SWEEP.yaml [key=value ...] --law FIT.json [--noise 0.005]
                               [--studies 200] [--bootstrap 0]

Takes the sweep's planned trials (their N and D, seeds included), draws their final losses
from the law in FIT.json (a fit of an earlier study: the truth, for this simulation) with
log-normal run-to-run noise: of standard deviation --noise, or by default the noise that fit
measured, with its trend in N and D where it found one. It fits them as the sweep will, and
predicts the held-out runs; over --studies such draws it prints how often E collapses or is
not identified, the held-out ARE's median and 95th percentile, the share of studies within 2%,
and how often the 95% interval for an actual run holds the run's loss.
"""

import argparse
import json
import sys

import numpy as np

from lm import scaling, spec as spec_lib
from lm.points import Points


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("spec")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--law", required=True, help="a fit.json whose law plays the truth")
    p.add_argument("--noise", type=float,
                   help="std of log final loss (default: FIT.json's noise and its trend)")
    p.add_argument("--studies", type=int, default=200)
    p.add_argument("--bootstrap", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_intermixed_args()
    spec = spec_lib.load_spec(args.spec, args.overrides)
    truth = scaling.Fit.from_json(json.loads(open(args.law).read()), args.law)
    trials = [t for t in spec_lib.plan(spec) if t.role in ("fit", "holdout")]
    facts = [t.facts() for t in trials]
    n = np.array([spec_lib.fit_params(spec, t.cfg) for t in trials], float)
    d = np.array([f["tokens"] for f in facts], float)
    c = np.array([f["flops"] for f in facts], float)
    mean = scaling.predicted_loss(truth, Points(params=n, tokens=d, loss=np.ones_like(n), flops=c))
    held = [t.name for t in trials if t.role == "holdout"]
    noise = (truth.noise.at(n, d) if args.noise is None and truth.noise
             else np.full(len(n), 0.005 if args.noise is None else args.noise))
    rng = np.random.default_rng(args.seed)
    are, covered, collapsed, unidentified = [], 0, 0, 0
    for _ in range(args.studies):
        loss = mean * np.exp(noise * rng.standard_normal(len(mean)))
        points = Points(params=n, tokens=d, loss=loss, flops=c, run=[t.name for t in trials],
                        annealed=np.ones(len(n), bool))
        fit = scaling.fit(points, spec.fit.law, holdout=held, bootstrap=args.bootstrap,
                          min_tokens_per_param=spec.fit.min_tokens_per_param, seed=len(are))
        are.append(fit.are)
        covered += all(r.interval[0] <= r.loss <= r.interval[1] for r in fit.holdout)
        collapsed += fit.params.get("E", 1.0) < 1e-3
        unidentified += bool(fit.identifiability and not fit.identifiability.identified)
    are = np.array(are)
    k = args.studies
    spread = f"{noise.min():.2%}" + (f" to {noise.max():.2%}" if np.ptp(noise) else "")
    print(f"{len(trials) - len(held)} fitting runs, held-out {held}; noise {spread}; "
          f"{k} studies")
    print(f"E collapsed in {collapsed / k:.0%}, not identified in {unidentified / k:.0%}")
    print(f"held-out ARE: median {np.median(are):.2%}, 95th percentile "
          f"{np.percentile(are, 95):.2%}; within 2% in {np.mean(are <= 0.02):.0%}")
    print(f"the 95% interval for an actual run held its loss in {covered / k:.0%}")


if __name__ == "__main__":
    sys.exit(main())
