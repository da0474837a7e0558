"""The `lm` command. JAX is imported only after `--cpu-devices` has set XLA_FLAGS."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _use_cpu_devices(n: int | None) -> None:
    """Simulate `n` CPU devices; must run before jax is imported."""
    if not n:
        return
    if "jax" in sys.modules:
        import jax

        if jax.device_count() != n:
            raise SystemExit(f"error: --cpu-devices {n} came after jax started with "
                             f"{jax.device_count()} devices")
        return
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    os.environ["JAX_PLATFORMS"] = "cpu"


# --------------------------------------------------------------------------- commands


def cmd_train(args) -> int:
    from lm import config, train

    cfg = config.load(args.config, args.overrides)
    row = train.train(cfg)
    print(f"done: step {row['step']}, loss {row['loss']:.4f}; run dir {cfg.train.run_dir}")
    return 0


def cmd_info(args) -> int:
    import jax
    from flax import nnx

    from lm import config, flops, sharding
    from lm.model import Transformer

    cfg = config.load(args.config, args.overrides)
    sizes = config.mesh_shape(cfg, jax.device_count())
    table = sharding.rules(cfg.mesh.fsdp)
    abstract = nnx.state(nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0))))
    params = []
    for path, var in nnx.to_flat_state(abstract):
        params.append({"name": ".".join(map(str, path)), "shape": list(var.shape),
                       "axes": list(var.axes), "spec": str(sharding.spec(var.axes, table))})
    counts = flops.param_counts(cfg.model)
    info = {"params_total": counts["total"], "params_non_embedding": counts["non_embedding"],
            "params_embedding": counts["embedding"], "mesh": sizes,
            "train_flops_per_token": flops.train_flops_per_token(cfg.model, cfg.seq_len),
            "params": params}
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"parameters: {counts['total']:,} total, {counts['non_embedding']:,} non-embedding")
    print(f"mesh: {sizes}   training FLOPs/token: {info['train_flops_per_token']:.4g}")
    width = max(len(p["name"]) for p in params)
    for p in params:
        print(f"  {p['name']:<{width}}  {str(tuple(p['shape'])):<24} "
              f"{str(tuple(p['axes'])):<40} {p['spec']}")
    return 0


# --------------------------------------------------------------------------- parser


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cpu-devices", type=int, metavar="N",
                        help="simulate N CPU devices (e.g. 8 for a 2x4 mesh on a laptop)")
    top = argparse.ArgumentParser(prog="lm", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)

    def command(name, func, help, config=True):
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        if config:
            p.add_argument("config", help="YAML file or preset name in configs/ (e.g. tiny)")
            p.add_argument("overrides", nargs="*", metavar="key=value",
                           help="dotted overrides, e.g. train.steps=100 mesh.model=2")
        p.set_defaults(func=func)
        return p

    command("train", cmd_train, "train a model into train.run_dir")
    command("info", cmd_info, "parameter counts and per-parameter sharding").add_argument(
        "--json", action="store_true", help="print one JSON object")
    return top


def main(argv: list[str] | None = None) -> int:
    top = parser()
    # Overrides may follow flags (`lm train tiny --cpu-devices 8 train.steps=5`).
    args, extra = top.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray or (extra and not hasattr(args, "overrides")):
        top.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides += extra
    _use_cpu_devices(args.cpu_devices)
    from lm.config import ConfigError
    from lm.train import TrainingError

    try:
        return args.func(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
