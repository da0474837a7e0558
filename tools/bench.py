"""Training throughput and MFU of a config, against a peak measured in the same run.

    python tools/bench.py CONFIG [key=value ...] [--steps N] [--mesh-ratio DATA,MODEL]
                          [--variant KEY=VALUE ...] [--vmap K] [--json] [--cpu-devices N]

The step runs on one resident batch after a compile warm-up. On a shared CPU the fp32 matmul
peak drifts by 3x within an hour, so timed steps and timed 2048^3 matmuls alternate and the
best of each is kept; MFU = model FLOPs (lm.flops: exact matmul count) / time / that peak.
With --mesh-ratio the config also runs on a (data, model) mesh of simulated CPU devices
(DATA*MODEL of them unless --cpu-devices says otherwise), interleaved with the one-device step,
and `mesh_step_ratio` = mesh step time / one-device step time.
With --variant KEY=VALUE (repeatable) the config also runs with those overrides, interleaved
with it step by step: `variant_speedup` = best step time / the variant's best, and
`variant_speedup_median`, the median of the paired ratios (an A/B in one process).
With --vmap K, K models of the same shape (seeds seed..seed+K-1) train at once in one jitted
step, vmapped over their states, on the same batch; `vmap_speedup` = K x one-model step time /
K-model step time, both measured interleaved (one device).
"""

import argparse
import json
import sys
import time


def timed(fn, *args):
    import jax

    start = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    return time.perf_counter() - start, out


def vmapped(lay, k: int):
    """A step training K models of `lay`'s shape at once, and their K fresh states: the pure
    step and init of lm.train/lm.state, vmapped over the state (the batch is shared)."""
    import jax
    import numpy as np

    from lm import state as state_lib, train

    seeds = lay.cfg.train.seed + np.arange(k, dtype=np.uint32)
    states = jax.jit(jax.vmap(state_lib.init_fn(lay.cfg, lay.tx)))(seeds)
    step = jax.jit(jax.vmap(train.make_step(lay), in_axes=(0, None, None)), donate_argnums=0)
    return step, states


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--mesh-ratio", help="DATA,MODEL: also time this mesh against one device")
    p.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE",
                   help="also time the config with this override (repeatable)")
    p.add_argument("--vmap", type=int, metavar="K", help="also time K models trained at once")
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    p.add_argument("--cpu-devices", type=int, help="simulate N CPU devices")
    args = p.parse_intermixed_args()
    mesh = tuple(map(int, args.mesh_ratio.split(","))) if args.mesh_ratio else None
    if mesh and not args.cpu_devices:
        args.cpu_devices = mesh[0] * mesh[1]
    from lm.devices import keep_freed_memory, simulate_cpu_devices  # no JAX: must come first

    keep_freed_memory()  # as `lm` does
    if args.cpu_devices:
        simulate_cpu_devices(args.cpu_devices)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lm import config, data, flops, train

    one_device = ["mesh.data=1", "mesh.model=1"]
    cfg = config.load(args.config, args.overrides + one_device)
    source = data.source(cfg)

    def run(step, state, lay):  # a step, its state, and a batch placed for its layout
        return {"step": step, "state": state, "times": [],
                "batch": data.global_batch(source, 0, lay.batch_sharding, lay.batch_shape)}

    lr = np.float32(cfg.optim.lr)

    one = train.compile_program(cfg, jax.devices()[:1])
    runs = {"one": run(one.step, one.init(), one.layout)}
    if mesh:
        program = train.compile_program(config.replace(cfg, mesh={"data": mesh[0],
                                                                  "model": mesh[1]}),
                                        jax.devices()[: mesh[0] * mesh[1]])
        runs["mesh"] = run(program.step, program.init(), program.layout)
    if args.variant:
        other = train.compile_program(
            config.load(args.config, args.overrides + one_device + args.variant),
            jax.devices()[:1])
        runs["variant"] = run(other.step, other.init(), other.layout)
    if args.vmap:
        runs["vmap"] = run(*vmapped(one.layout, args.vmap), one.layout)
    for r in runs.values():
        for _ in range(2):  # warm-up: the first calls compile, allocate and page in
            r["state"], _ = r["step"](r["state"], r["batch"], lr)

    a = jax.device_put(jax.random.normal(jax.random.key(0), (2048, 2048), jnp.float32),
                       jax.devices()[0])
    matmul = jax.jit(lambda x: x @ x)
    timed(matmul, a)
    matmul_times = []
    for _ in range(args.steps):
        for r in runs.values():
            seconds, (r["state"], _) = timed(r["step"], r["state"], r["batch"], lr)
            r["times"].append(seconds)
        matmul_times.append(timed(matmul, a)[0])

    peak = cfg.train.peak_flops or (2 * 2048**3 / min(matmul_times)
                                    if jax.devices()[0].platform == "cpu"
                                    else flops.peak_flops_per_s(jax.devices()[:1]))
    step_time = min(runs["one"]["times"])
    model_flops = flops.step_flops(cfg)
    result = {
        "config": args.config, "overrides": args.overrides, "steps": args.steps,
        "step_time_s": step_time, "tokens_per_s": cfg.tokens_per_step / step_time,
        "model_flops_per_s": model_flops / step_time, "peak_flops_per_s": peak,
        "mfu": flops.mfu(cfg, step_time, peak),
        "step_time_median_s": sorted(runs["one"]["times"])[len(runs["one"]["times"]) // 2],
    }
    if mesh:
        result["mesh"] = args.mesh_ratio
        result["mesh_step_time_s"] = min(runs["mesh"]["times"])
        result["mesh_step_ratio"] = result["mesh_step_time_s"] / step_time
    if args.variant:
        paired = sorted(a / b for a, b in zip(runs["one"]["times"], runs["variant"]["times"]))
        result |= {"variant": args.variant,
                   "variant_step_time_s": min(runs["variant"]["times"]),
                   "variant_speedup": step_time / min(runs["variant"]["times"]),
                   "variant_speedup_median": paired[len(paired) // 2]}
    if args.vmap:
        vmap_time = min(runs["vmap"]["times"])
        result |= {"vmap": args.vmap, "vmap_step_time_s": vmap_time,
                   "vmap_speedup": args.vmap * step_time / vmap_time,
                   "vmap_mfu": args.vmap * flops.mfu(cfg, vmap_time, peak)}
    width = max(map(len, result))
    for key, value in result.items():
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {shown}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
