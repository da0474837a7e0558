"""Training: the jitted step, and the loop that fills a run directory — metrics, evaluations,
checkpoints — and resumes it after an interruption."""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lm import checkpoint, config as config_lib, data, evaluate, flops, sharding, state as state_lib
from lm.config import Config


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss became non-finite)."""


class Interrupted(TrainingError):
    """SIGTERM/SIGINT stopped the run after saving a checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


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


def make_step(lay: state_lib.Layout):
    cfg = lay.cfg
    schedule = state_lib.lr_schedule(cfg.optim, cfg.train.steps)

    def loss_fn(params, tokens_bt1):
        model = nnx.merge(lay.graphdef, params)
        return model.loss(tokens_bt1[:, :-1], tokens_bt1[:, 1:])

    grad_fn = jax.value_and_grad(loss_fn)

    def step(state, tokens_bt1):
        loss, grads = accumulate(grad_fn, state["params"], tokens_bt1, cfg.train.micro_batches)
        updates, opt = lay.tx.update(grads, state["opt"], state["params"])
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                   "lr": schedule(state["step"])}
        new = {"params": optax.apply_updates(state["params"], updates), "opt": opt,
               "step": state["step"] + 1}
        return new, metrics

    return step


@dataclasses.dataclass(frozen=True)
class Program:
    """The train step of one layout, compiled, and its init (compiled on first use)."""

    layout: state_lib.Layout
    init: callable  # () -> state, created sharded
    step: callable  # (state, tokens_bt1) -> (state, metrics); donates state


def compile_program(cfg: Config, devices=None) -> Program:
    lay = state_lib.layout(cfg, devices)
    batch = jax.ShapeDtypeStruct(lay.batch_shape, jnp.int32, sharding=lay.batch_sharding)
    init = jax.jit(state_lib.init_fn(cfg, lay.tx), out_shardings=lay.shardings)  # on first use
    with sharding.use(lay.mesh, lay.table):
        step = jax.jit(make_step(lay), in_shardings=(lay.shardings, lay.batch_sharding),
                       out_shardings=(lay.shardings, NamedSharding(lay.mesh, P())),
                       donate_argnums=0).lower(lay.abstract, batch).compile()
    return Program(lay, lambda: init(np.uint32(cfg.train.seed)), step)


# --------------------------------------------------------------------------- the loop


def eval_steps(cfg: Config) -> set[int]:
    """Steps at which the loop evaluates: every `eval.every_steps`, `eval.log_points`
    log-spaced steps (a learning curve), and the last step whenever either is on."""
    e, steps = cfg.eval, cfg.train.steps
    out = set(range(e.every_steps, steps + 1, e.every_steps)) if e.every_steps else set()
    if e.log_points:  # from the last step down, so that one point is the last step
        first = max(1, steps // 32)
        out |= {int(round(s)) for s in np.geomspace(steps, first, e.log_points)}
    return out | {steps} if out else out


def save_steps(cfg: Config) -> set[int]:
    every = cfg.checkpoint.every_steps
    return set(range(every, cfg.train.steps, every)) | {cfg.train.steps} if every else {
        cfg.train.steps}


def _keep_rows(path: Path, through: int) -> None:
    """Drop the rows a resumed run will write again (step > `through`)."""
    rows = [r for r in evaluate.read_rows(path) if r["step"] <= through]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


class _StopSignals:
    """SIGTERM/SIGINT ask the loop to save and stop after the current step; a second one
    aborts at once. Only the main thread can own signal handlers."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _resume(program: Program, mngr) -> tuple[dict, int]:
    lay = program.layout
    restored = checkpoint.restore_latest(mngr, lay.abstract, lay.shardings)
    if restored is None:
        return program.init(), 0
    state, meta = restored
    step = meta["step"]
    state["step"] = jax.device_put(np.int32(step), lay.shardings["step"])
    return state, step


def _log_row(step: int, cfg: Config, metrics: dict, seconds_per_step: float,
             peak: float, epoch: float) -> dict:
    tokens_per_step = cfg.train.batch_size * cfg.seq_len
    model_flops = flops.train_flops_per_token(cfg.model, cfg.seq_len) * tokens_per_step
    return {
        "step": step,
        "tokens": step * tokens_per_step,
        "loss": float(metrics["loss"]),
        "lr": float(metrics["lr"]),
        "grad_norm": float(metrics["grad_norm"]),
        "step_time_s": seconds_per_step,
        "tokens_per_s": tokens_per_step / seconds_per_step,
        "model_flops_per_s": model_flops / seconds_per_step,
        "mfu": model_flops / seconds_per_step / peak,
        "epoch": epoch,  # passes over the training data so far: > 1 means it repeats
    }


def train(cfg: Config, devices=None) -> dict:
    """Train `cfg` into `cfg.train.run_dir`, resuming from its newest complete checkpoint;
    returns the last metrics row."""
    from tqdm import tqdm

    t = cfg.train
    run_dir = Path(t.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_lib.dump(cfg, run_dir / "config.yaml")
    program = compile_program(cfg, devices)
    mngr = checkpoint.manager(run_dir, cfg.checkpoint)
    state, start = _resume(program, mngr)
    metrics_path, eval_path = run_dir / "metrics.jsonl", run_dir / evaluate.EVAL_FILE
    for path in (metrics_path, eval_path):
        _keep_rows(path, start)
    to_eval, to_save = eval_steps(cfg), save_steps(cfg)
    ev = evaluate.evaluator(program.layout) if to_eval else None
    peak = t.peak_flops or flops.peak_flops_per_s(list(program.layout.mesh.devices.flat))
    src = data.source(cfg)
    row = (evaluate.read_rows(metrics_path) or [{}])[-1]
    with (open(metrics_path, "a") as log, open(eval_path, "a") as eval_log, _StopSignals() as stop,
          tqdm(initial=start, total=t.steps, disable=not t.progress, unit="step") as bar):
        pending, clock = [], time.perf_counter()
        lay = program.layout
        for index, tokens in data.batches(src, lay.batch_sharding, lay.batch_shape, start,
                                          t.steps):
            step = index + 1  # steps done after this one
            state, metrics = program.step(state, tokens)
            pending.append(metrics)
            if step % t.log_every == 0 or step == t.steps:
                pending = jax.device_get(pending)  # the loop's only regular host sync
                bad = [step - len(pending) + i + 1 for i, m in enumerate(pending)
                       if not math.isfinite(float(m["loss"]))]
                if bad:
                    raise TrainingError(
                        f"loss became non-finite at step {bad[0]}; lower optim.lr "
                        f"(now {cfg.optim.lr}) or set optim.clip_norm (now {cfg.optim.clip_norm})")
                row = _log_row(step, cfg, pending[-1], (time.perf_counter() - clock) / len(pending),
                               peak, src.epoch(step))
                log.write(json.dumps(row) + "\n")
                log.flush()
                bar.update(len(pending))
                bar.set_postfix(loss=f"{row['loss']:.4f}")
                bar.write(f"step {step:>6}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  "
                          f"{row['tokens_per_s']:,.0f} tok/s  mfu {row['mfu']:.1%}")
                pending, clock = [], time.perf_counter()
            if step in to_eval:
                eval_row = ev.row(state["params"], step)
                eval_log.write(json.dumps(eval_row) + "\n")
                eval_log.flush()
                bar.write(f"step {step:>6}  eval loss {eval_row['loss']:.4f} "
                          f"± {eval_row['loss_sem'] or 0:.4f}")
            if step in to_save or stop.signum:
                checkpoint.save(mngr, state, {"step": step, "seed": t.seed,
                                              "config": config_lib.to_dict(cfg)})
            if stop.signum:
                mngr.wait_until_finished()
                raise Interrupted(
                    f"stopped by {signal.Signals(stop.signum).name} at step {step}; saved a "
                    f"checkpoint to {checkpoint.directory(run_dir)}. Run the same command again "
                    "to resume.", stop.signum)
    mngr.wait_until_finished()
    return row
