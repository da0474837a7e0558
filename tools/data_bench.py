"""Show that loading data is never the bottleneck of a training step.

    python tools/data_bench.py tiny data.source=default --cpu-devices 8 [--steps 20 --rounds 10]

Times the compiled train step of a config in rounds of --steps steps, alternating (in one
process, so that both see the same machine) rounds fed by the loader -- `data.batches`: rows
read from the token file, sharded and transferred in a background thread -- with rounds that
reuse one batch already on the devices. Prints the best round of each, their ratio (1.00: the
data path costs the step nothing), and the time to build one batch alone, for scale.
"""

import argparse
import sys
import time

from lm.devices import simulate_cpu_devices


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--cpu-devices", type=int)
    p.add_argument("--steps", type=int, default=20, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=10, help="timed rounds of each kind")
    p.add_argument("--prefetch", type=int, default=2, help="batches built ahead")
    args = p.parse_intermixed_args()
    if args.cpu_devices:
        simulate_cpu_devices(args.cpu_devices)
    import jax
    import numpy as np

    from lm import config, data, train

    cfg = config.load(args.config, args.overrides)
    program = train.compile_program(cfg)
    sharding, shape = program.layout.batch_sharding, program.layout.batch_shape
    src = data.source(cfg)
    state = program.init()
    lr = np.float32(cfg.optim.lr)
    resident = data.global_batch(src, 0, sharding, shape)
    next_step = 0

    def fed_by_loader():
        nonlocal next_step  # fresh steps every round: nothing is served from a cache
        start, next_step = next_step, next_step + args.steps
        return data.batches(src, sharding, shape, start, next_step, args.prefetch)

    def fed_resident():
        return ((step, resident) for step in range(args.steps))

    def seconds_per_step(feed) -> float:
        nonlocal state
        begin = time.perf_counter()
        for _, batch in feed():
            state, metrics = program.step(state, batch, lr)
        jax.block_until_ready((state, metrics))
        return (time.perf_counter() - begin) / args.steps

    seconds_per_step(fed_by_loader), seconds_per_step(fed_resident)  # warm up both paths
    best = {"loader": float("inf"), "resident": float("inf")}
    for _ in range(args.rounds):
        best["loader"] = min(best["loader"], seconds_per_step(fed_by_loader))
        best["resident"] = min(best["resident"], seconds_per_step(fed_resident))
    begin = time.perf_counter()
    for step in range(args.steps):
        jax.block_until_ready(data.global_batch(src, next_step + step, sharding, shape))
    build = (time.perf_counter() - begin) / args.steps

    print(f"config {args.config} {' '.join(args.overrides)}")
    print(f"mesh {dict(program.layout.mesh.shape)}, batch {shape[0]} x {shape[1]} tokens, "
          f"data.source={cfg.data.source}, epoch {src.epoch(next_step):.3f} reached")
    print(f"step, loader + prefetch: {best['loader'] * 1e3:8.2f} ms")
    print(f"step, resident batch:    {best['resident'] * 1e3:8.2f} ms")
    print(f"ratio loader / resident: {best['loader'] / best['resident']:8.3f}")
    print(f"one batch built alone:   {build * 1e3:8.2f} ms")


if __name__ == "__main__":
    sys.exit(main())
