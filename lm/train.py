"""Training: the optimiser, state created sharded at birth, the jitted step, and the loop that
fills a run directory."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lm import config as config_lib, data, sharding
from lm.config import Config, OptimConfig
from lm.model import Transformer


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss became non-finite)."""


# --------------------------------------------------------------------------- optimiser


def lr_schedule(o: OptimConfig, steps: int):
    """Linear warmup to `lr`, then cosine/linear decay to `lr * final_lr_ratio` at `steps`."""
    floor = o.lr * o.final_lr_ratio

    def lr(step):
        step = jnp.asarray(step, jnp.float32)
        warm = o.lr * (step + 1) / max(o.warmup_steps, 1)
        progress = jnp.clip((step - o.warmup_steps) / max(steps - o.warmup_steps, 1), 0, 1)
        decay = {
            "cosine": floor + (o.lr - floor) * 0.5 * (1 + jnp.cos(jnp.pi * progress)),
            "linear": o.lr - (o.lr - floor) * progress,
            "constant": jnp.asarray(o.lr, jnp.float32),
        }[o.schedule]
        return jnp.where(step < o.warmup_steps, warm, decay)

    return lr


def _decays(path, _) -> bool:
    """Weight decay applies to matrices, not to norm scales."""
    return not any(str(getattr(k, "key", "")).endswith("norm") for k in path)


def optimizer(cfg: Config) -> optax.GradientTransformation:
    o = cfg.optim
    adamw = optax.adamw(
        lr_schedule(o, cfg.train.steps), b1=o.b1, b2=o.b2, eps=o.eps,
        weight_decay=o.weight_decay,
        mask=lambda params: jax.tree_util.tree_map_with_path(_decays, params))
    return optax.chain(optax.clip_by_global_norm(o.clip_norm), adamw) if o.clip_norm else adamw


# --------------------------------------------------------------------------- the step


def accumulate(grad_fn, params, tokens_bt1, n: int):
    """Mean loss and gradient over `n` equal micro-batches: the same as one full batch.

    Micro-batch i takes rows i, i+n, i+2n, ..., so each device's contiguous block of rows
    feeds every micro-batch and nothing moves between devices."""
    if n == 1:
        return grad_fn(params, tokens_bt1)
    b = tokens_bt1.shape[0]
    micro_mbt = tokens_bt1.reshape(b // n, n, -1).swapaxes(0, 1)

    def add(total, tokens_bt1):
        value = grad_fn(params, sharding.constrain(tokens_bt1, ("batch", None)))
        return jax.tree.map(jnp.add, total, value), None

    zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    total, _ = jax.lax.scan(add, zero, micro_mbt)
    return jax.tree.map(lambda x: x / n, total)


def make_step(cfg: Config, graphdef, tx: optax.GradientTransformation):
    schedule = lr_schedule(cfg.optim, cfg.train.steps)

    def loss_fn(params, tokens_bt1):
        model = nnx.merge(graphdef, params)
        return model.loss(tokens_bt1[:, :-1], tokens_bt1[:, 1:])

    grad_fn = jax.value_and_grad(loss_fn)

    def step(state, tokens_bt1):
        loss, grads = accumulate(grad_fn, state["params"], tokens_bt1, cfg.train.micro_batches)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                   "lr": schedule(state["step"])}
        new = {"params": optax.apply_updates(state["params"], updates), "opt": opt,
               "step": state["step"] + 1}
        return new, metrics

    return step


# --------------------------------------------------------------------------- sharded state


def state_shardings(abstract, mesh: Mesh, table: dict):
    """A sharding for every leaf: parameters (and the Adam moments that mirror them) from
    their logical axes, everything else (counters) replicated."""

    def leaf(x):
        if isinstance(x, nnx.Variable):
            return x.replace(sharding.named(mesh, table, x.axes))
        return NamedSharding(mesh, P())

    return jax.tree.map(leaf, abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))


@dataclasses.dataclass
class Program:
    """Everything compiled for one config on one mesh."""

    cfg: Config
    mesh: Mesh
    table: dict
    graphdef: nnx.GraphDef
    abstract: dict  # the train state as ShapeDtypeStructs
    shardings: dict
    batch_sharding: NamedSharding
    init: callable  # () -> state, created sharded
    step: callable  # (state, tokens_bt1) -> (state, metrics); donates state

    @property
    def batch_shape(self) -> tuple[int, int]:
        return self.cfg.train.batch_size, self.cfg.seq_len + 1


def compile_program(cfg: Config, devices=None) -> Program:
    mesh = sharding.make_mesh(cfg, devices)
    table = sharding.rules(cfg.mesh.fsdp)
    tx = optimizer(cfg)

    def init(seed):  # traced, so that one compiled program serves every seed
        params = nnx.state(Transformer(cfg.model, rngs=nnx.Rngs(jax.random.key(seed))))
        return {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    seed = jax.ShapeDtypeStruct((), jnp.uint32)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0))))
    abstract = jax.eval_shape(init, seed)
    shardings = state_shardings(abstract, mesh, table)
    batch_sharding = sharding.named(mesh, table, ("batch", None))
    replicated = NamedSharding(mesh, P())
    batch = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.seq_len + 1), jnp.int32,
                                 sharding=batch_sharding)
    with sharding.use(mesh, table):
        init_c = jax.jit(init, out_shardings=shardings).lower(seed).compile()
        step_c = jax.jit(make_step(cfg, graphdef, tx), in_shardings=(shardings, batch_sharding),
                         out_shardings=(shardings, replicated),
                         donate_argnums=0).lower(abstract, batch).compile()
    return Program(cfg, mesh, table, graphdef, abstract, shardings, batch_sharding,
                   lambda: init_c(jnp.uint32(cfg.train.seed)), step_c)


# --------------------------------------------------------------------------- the loop


def _log_row(step: int, cfg: Config, metrics: list[dict], seconds: float) -> dict:
    step_time = seconds / len(metrics)
    tokens_per_step = cfg.train.batch_size * cfg.seq_len
    return {
        "step": step,
        "tokens": step * tokens_per_step,
        "loss": float(sum(m["loss"] for m in metrics) / len(metrics)),
        "lr": float(metrics[-1]["lr"]),
        "grad_norm": float(metrics[-1]["grad_norm"]),
        "step_time_s": step_time,
        "tokens_per_s": tokens_per_step / step_time,
    }


def train(cfg: Config, devices=None) -> dict:
    """Train `cfg` into `cfg.train.run_dir`; returns the last logged metrics row."""
    from tqdm import tqdm

    t = cfg.train
    run_dir = Path(t.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_lib.dump(cfg, run_dir / "config.yaml")
    program = compile_program(cfg, devices)
    state = program.init()
    src = data.source(cfg)
    row: dict = {}
    with open(run_dir / "metrics.jsonl", "w") as log, tqdm(
            total=t.steps, disable=not t.progress, desc="train", unit="step") as bar:
        pending, start = [], time.perf_counter()
        for step in range(t.steps):
            tokens = data.global_batch(src, step, program.batch_sharding, program.batch_shape)
            state, metrics = program.step(state, tokens)
            pending.append(metrics)
            if (step + 1) % t.log_every and step + 1 < t.steps:
                continue
            pending = jax.device_get(pending)  # the loop's only host sync
            bad = [step + 1 - len(pending) + i + 1 for i, m in enumerate(pending)
                   if not math.isfinite(float(m["loss"]))]
            if bad:
                raise TrainingError(
                    f"loss became non-finite at step {bad[0]}; lower optim.lr "
                    f"(now {cfg.optim.lr}) or set optim.clip_norm (now {cfg.optim.clip_norm})")
            row = _log_row(step + 1, cfg, pending, time.perf_counter() - start)
            log.write(json.dumps(row) + "\n")
            log.flush()
            bar.update(len(pending))
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            bar.write(f"step {row['step']:>6}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  "
                      f"{row['tokens_per_s']:,.0f} tok/s")
            pending, start = [], time.perf_counter()
    return row
