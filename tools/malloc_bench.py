"""Train steps with glibc's default malloc against `lm.devices.keep_freed_memory`, alternated.

    python tools/malloc_bench.py [--sizes 16:2:1,40:2:2,64:3:4,80:3:5] [--rounds 2] [--steps 100]

Each size (d_model:n_layers:n_heads, the main job's recipe: context 128, batch 8, one device)
trains in a fresh process per setting and round (the setting is process-wide and must precede
JAX), default and kept alternating. Printed per size: minor page faults per step and the median
step time of each setting, and their ratio default / kept (best round of each).
"""

import argparse
import json
import resource
import subprocess
import sys
import time


def child(keep: bool, d: int, layers: int, heads: int, steps: int) -> None:
    from lm.devices import keep_freed_memory

    if keep:
        keep_freed_memory()
    import jax
    import numpy as np

    from lm import config, data, train

    cfg = config.load("tiny", ["data.source=default", "model.context=128", "train.batch_size=8",
                               f"model.d_model={d}", f"model.n_layers={layers}",
                               f"model.n_heads={heads}", "mesh.data=1", "mesh.model=1"])
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
        start = time.perf_counter()
        state, _ = program.step(state, batch, lr)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - start)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    print(json.dumps({"faults_per_step": faults / steps, "step_s": sorted(times)[steps // 2]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="16:2:1,40:2:2,64:3:4,80:3:5")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--child", nargs=5, type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(bool(args.child[0]), *args.child[1:])
    for size in args.sizes.split(","):
        best = {}
        for _ in range(args.rounds):
            for keep in (0, 1):
                out = subprocess.run([sys.executable, __file__, "--child", str(keep),
                                      *size.split(":"), str(args.steps)],
                                     capture_output=True, text=True, check=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                if keep not in best or r["step_s"] < best[keep]["step_s"]:
                    best[keep] = r
        d, k = best[0], best[1]
        print(f"d{size}: default {d['faults_per_step']:7.0f} faults/step {1e3 * d['step_s']:6.1f} ms"
              f" | kept {k['faults_per_step']:7.0f} faults/step {1e3 * k['step_s']:6.1f} ms"
              f" | {d['step_s'] / k['step_s']:.2f}x")


if __name__ == "__main__":
    main()
