"""Training throughput and MFU of a config, against a peak measured in the same run.

    python tools/bench.py CONFIG [key=value ...] [--steps N] [--mesh-ratio DATA,MODEL] [--json]
                          [--cpu-devices N]

The step runs on one resident batch after a compile warm-up. On a shared CPU the fp32 matmul
peak drifts by 3x within an hour, so timed steps and timed 2048^3 matmuls alternate and the
best of each is kept; MFU = model FLOPs (lm.flops: exact matmul count) / time / that peak.
With --mesh-ratio the config also runs on a (data, model) mesh, interleaved with the
one-device step, and `mesh_step_ratio` = mesh step time / one-device step time.
"""

import argparse
import json
import os
import sys
import time


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    import jax

    jax.block_until_ready(out)
    return time.perf_counter() - start, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--mesh-ratio", help="DATA,MODEL: also time this mesh against one device")
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    p.add_argument("--cpu-devices", type=int)
    args = p.parse_intermixed_args()
    if args.mesh_ratio and not args.cpu_devices:
        args.cpu_devices = 8
    if args.cpu_devices:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.cpu_devices}")
    import jax
    import jax.numpy as jnp

    from lm import config, data, flops, train

    cfg = config.load(args.config, args.overrides + ["mesh.data=1", "mesh.model=1"])
    programs = {"one": train.compile_program(cfg, jax.devices()[:1])}
    if args.mesh_ratio:
        d, m = map(int, args.mesh_ratio.split(","))
        mesh_cfg = config.replace(cfg, mesh={"data": d, "model": m})
        programs["mesh"] = train.compile_program(mesh_cfg, jax.devices()[: d * m])
    runs = {}
    for name, program in programs.items():
        lay = program.layout
        batch = data.global_batch(data.source(cfg), 0, lay.batch_sharding, lay.batch_shape)
        state = program.init()
        for _ in range(2):  # warm-up: first calls allocate and page in
            state, _ = program.step(state, batch)
        runs[name] = {"program": program, "state": state, "batch": batch, "times": []}

    a = jax.device_put(jax.random.normal(jax.random.key(0), (2048, 2048), jnp.float32),
                       jax.devices()[0])
    matmul = jax.jit(lambda x: x @ x)
    timed(matmul, a)
    matmul_times = []
    for _ in range(args.steps):
        for run in runs.values():
            seconds, (run["state"], _) = timed(run["program"].step, run["state"], run["batch"])
            run["times"].append(seconds)
        matmul_times.append(timed(matmul, a)[0])

    peak = cfg.train.peak_flops or (2 * 2048**3 / min(matmul_times)
                                    if jax.devices()[0].platform == "cpu"
                                    else flops.peak_flops_per_s(jax.devices()[:1]))
    step_time = min(runs["one"]["times"])
    tokens = cfg.train.batch_size * cfg.seq_len
    model_flops = flops.train_flops_per_token(cfg.model, cfg.seq_len) * tokens
    result = {
        "config": args.config, "overrides": args.overrides, "steps": args.steps,
        "step_time_s": step_time, "tokens_per_s": tokens / step_time,
        "model_flops_per_s": model_flops / step_time, "peak_flops_per_s": peak,
        "mfu": model_flops / step_time / peak,
        "step_time_median_s": sorted(runs["one"]["times"])[len(runs["one"]["times"]) // 2],
    }
    if "mesh" in runs:
        result["mesh"] = args.mesh_ratio
        result["mesh_step_time_s"] = min(runs["mesh"]["times"])
        result["mesh_step_ratio"] = result["mesh_step_time_s"] / step_time
    width = max(map(len, result))
    for key, value in result.items():
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {shown}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
