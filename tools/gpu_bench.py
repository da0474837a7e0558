"""Step time, tokens/s and MFU of a config with each attention path, model.attention=einsum
and dot_product (jax.nn.dot_product_attention: cuDNN flash attention on GPUs), on one device;
ends with one JSON line.

    python tools/gpu_bench.py [CONFIG] [key=value ...] [--steps N] [--cpu-devices N]

CONFIG defaults to gpt2-small (123.6M parameters: d_model 768, 12 layers, context 1024, bf16).
Each path trains `--steps` timed steps on one resident synthetic batch after two warm-up steps,
from the same initial state, and reports its median and best step time, tokens/s and MFU
against the peak lm.flops names (the data sheet's on a GPU or TPU, a measured fp32 matmul on a
CPU), whether XLA called cuDNN's fused attention, and its loss at the first step and after the
steps (the first should agree between the paths to bf16 rounding); then each path's attention
output and gradients against fp32 on random inputs of the config's shapes (relative L2 error).
Anything runs it; check it on a CPU with a tiny override:

    python tools/gpu_bench.py model.n_layers=1 model.d_model=64 model.n_heads=2 \\
        model.d_ff=128 model.context=64 model.vocab_size=256 train.batch_size=2 --steps 2
"""

import argparse
import json
import statistics
import sys
import time

PATHS = ("einsum", "dot_product")
FIXED = ["mesh.data=1", "mesh.model=1", "data.source=synthetic"]  # one device, no corpus


def time_path(cfg, steps: int) -> dict:
    """Time `steps` training steps of `cfg` on one device and one resident batch."""
    import jax
    import numpy as np

    from lm import data, flops, train

    program = train.compile_program(cfg, jax.devices()[:1])
    lay = program.layout
    state = program.init()
    batch = data.global_batch(data.source(cfg), 0, lay.batch_sharding, lay.batch_shape)
    lr = np.float32(cfg.optim.lr)
    state, metrics = program.step(state, batch, lr)
    first_loss = float(metrics["loss"])  # the initial parameters': no update in it yet
    state, metrics = program.step(state, batch, lr)  # warm-up: allocation, autotuning
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = program.step(state, batch, lr)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"step_time_s": median, "step_time_best_s": min(times),
            "tokens_per_s": cfg.tokens_per_step / median,
            "model_flops_per_s": flops.step_flops(cfg) / median,
            "cudnn_fmha": "__cudnn$fmha" in program.step.as_text(),
            "first_loss": first_loss, "loss": float(metrics["loss"])}


def attention_errors(cfg, batch: int = 2) -> dict:
    """Each path's relative L2 error, in the config's dtype, against fp32 einsum attention at
    full matmul precision: its output and the gradients of a random projection of it, on
    random queries, keys and values of the config's shapes (`batch` sequences)."""
    import functools

    import jax
    import jax.numpy as jnp

    from lm.ops import attention

    m = cfg.model
    q_shape = (batch, m.context, m.n_heads, m.head_dim)
    kv_shape = (batch, m.context, m.n_kv_heads, m.head_dim)
    q, k, v, cotangent = (jax.random.normal(key, shape) for key, shape in zip(
        jax.random.split(jax.random.key(0), 4), (q_shape, kv_shape, kv_shape, q_shape)))
    positions = jnp.arange(m.context)  # small: a constant

    @functools.partial(jax.jit, static_argnums=(0, 1))  # inputs as arguments: captured
    def out_and_grads(path, dtype, q, k, v, cotangent):  # constants XLA would try to fold
        def f(q, k, v):
            return attention(q, k, v, positions, m.head_dim ** -0.5, path)
        out, vjp = jax.vjp(f, *(x.astype(dtype) for x in (q, k, v)))
        return [x.astype(jnp.float32) for x in (out, *vjp(cotangent.astype(dtype)))]

    with jax.default_matmul_precision("highest"):
        reference = out_and_grads("einsum", jnp.float32, q, k, v, cotangent)
    errors = {}
    for path in PATHS:
        ours = out_and_grads(path, jnp.dtype(m.dtype), q, k, v, cotangent)
        errors[path] = {name: float(jnp.linalg.norm(a - r) / jnp.linalg.norm(r))
                        for name, a, r in zip(("out", "dq", "dk", "dv"), ours, reference)}
    return errors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("config", nargs="?", default="gpt2-small")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--cpu-devices", type=int, help="simulate N CPU devices")
    args = p.parse_intermixed_args()
    if "=" in args.config:  # only overrides were given
        args.overrides.insert(0, args.config)
        args.config = "gpt2-small"
    if args.cpu_devices:
        from lm.devices import simulate_cpu_devices  # imports no JAX: must come first

        simulate_cpu_devices(args.cpu_devices)
    import jax

    from lm import config, flops

    configs = {path: config.load(args.config, args.overrides + FIXED + [f"model.attention={path}"])
               for path in PATHS}
    cfg, device = configs["einsum"], jax.devices()[0]
    peak = cfg.train.peak_flops or flops.peak_flops_per_s([device])
    result = {"config": args.config, "overrides": args.overrides, "steps": args.steps,
              "device": device.device_kind,
              "peak": "train.peak_flops" if cfg.train.peak_flops else flops.peak_name([device]),
              "peak_flops_per_s": peak, "params": flops.param_counts(cfg.model)["total"],
              "tokens_per_step": cfg.tokens_per_step, "dtype": cfg.model.dtype}
    for path, path_cfg in configs.items():
        result[path] = time_path(path_cfg, args.steps)
        result[path]["mfu"] = result[path]["model_flops_per_s"] / peak
    result["attention_rel_error"] = attention_errors(cfg)
    result["dot_product_speedup"] = (result["einsum"]["step_time_s"]
                                     / result["dot_product"]["step_time_s"])
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
