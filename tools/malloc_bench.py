"""Train steps with glibc's default malloc against `lm.devices.keep_freed_memory`, alternated.

    python tools/malloc_bench.py [SPEC] [--sizes 0,3,5,6] [--rounds 2] [--steps 100]

The model sizes of a sweep SPEC (default experiments/quick.yaml; --sizes picks among them in
plan order, held-out sizes last; default all), each on one device as the sweep trains them,
train in a fresh process per setting and round (the setting is process-wide and must precede
JAX), default and kept alternating. Printed per size: minor page faults per step and the median
step time of each setting, and their ratio default / kept (best round of each).
"""

import argparse
import json
import resource
import subprocess
import sys

from lm import spec as spec_lib


def sizes(spec_path: str) -> list:
    """One trial's config per model size of the sweep, in plan order, on one device."""
    from lm import config

    by_size = {}
    for t in spec_lib.plan(spec_lib.load_spec(spec_path)):
        m = t.cfg.model
        by_size.setdefault((m.d_model, m.n_layers, m.n_heads),
                           config.replace(t.cfg, mesh={"data": 1, "model": 1}))
    return list(by_size.values())


def child(keep: bool, spec_path: str, size: int, steps: int) -> None:
    from lm.devices import keep_freed_memory

    if keep:
        keep_freed_memory()
    import jax
    import numpy as np

    from bench import timed
    from lm import data, train

    cfg = sizes(spec_path)[size]
    program = train.compile_program(cfg, jax.devices()[:1])
    state = program.init()
    lay = program.layout
    batch = data.global_batch(data.source(cfg), 0, lay.batch_sharding, lay.batch_shape)
    lr = np.float32(cfg.optim.lr)
    for _ in range(5):  # compile, allocate, page in
        state, _ = program.step(state, batch, lr)
    jax.block_until_ready(state)
    faults, times = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, []
    for _ in range(steps):
        seconds, (state, _) = timed(program.step, state, batch, lr)
        times.append(seconds)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    print(json.dumps({"faults_per_step": faults / steps, "step_s": sorted(times)[steps // 2]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("spec", nargs="?", default="experiments/quick.yaml")
    p.add_argument("--sizes", help="indices among the spec's sizes (default: all)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(bool(args.child[0]), args.spec, *args.child[1:])
    cfgs = sizes(args.spec)
    chosen = map(int, args.sizes.split(",")) if args.sizes else range(len(cfgs))
    for i in chosen:
        best, m = {}, cfgs[i].model
        for _ in range(args.rounds):
            for keep in (0, 1):
                out = subprocess.run([sys.executable, __file__, args.spec, "--child", str(keep),
                                      str(i), str(args.steps)],
                                     capture_output=True, text=True, check=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                if keep not in best or r["step_s"] < best[keep]["step_s"]:
                    best[keep] = r
        d, k = best[0], best[1]
        print(f"d{m.d_model}-l{m.n_layers}-h{m.n_heads}: default {d['faults_per_step']:7.0f} faults/step {1e3 * d['step_s']:6.1f} ms"
              f" | kept {k['faults_per_step']:7.0f} faults/step {1e3 * k['step_s']:6.1f} ms"
              f" | {d['step_s'] / k['step_s']:.2f}x")


if __name__ == "__main__":
    main()
