"""Training: the jitted step, and the loop that fills a run directory — metrics, evaluations,
checkpoints — resumes it after an interruption and rolls it back past loss spikes, in one
process or in each process of a multi-process run alike."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import signal
import statistics
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from lm import checkpoint, config as config_lib, data, evaluate, flops, sharding, state as state_lib
from lm.config import Config, ConfigError


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


# --------------------------------------------------------------------------- processes


def is_primary() -> bool:
    """Process 0 writes the run's files and prints; every process computes, and all of them
    take part in checkpoints."""
    return jax.process_index() == 0


def _sync(name: str) -> None:
    """Wait until every process gets here (at once when there is only one)."""
    multihost_utils.sync_global_devices(f"lm: {name}")


def _primary_first(make):
    """`make()` on process 0 and then on the others, which find what it left in shared storage
    (a prepared dataset) instead of all building it at the same time."""
    out = make() if is_primary() else None
    _sync("process 0 went first")
    return out if is_primary() else make()


# --------------------------------------------------------------------------- the run directory


RUN_FILES = ("metrics.jsonl", evaluate.EVAL_FILE, "checkpoints")  # besides config.yaml


def _is_run_config(path: Path) -> bool:
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    sections = {f.name for f in dataclasses.fields(Config)}
    return isinstance(raw, dict) and "train" in raw and set(raw) <= sections


def run_directory(run_dir: str) -> Path:
    """`train.run_dir`, resolved, once checked to be new or a run's. Training rewrites a run's
    config.yaml, trims its metrics.jsonl and eval.jsonl to the resumed step and deletes old
    checkpoints, so it refuses a directory holding such files that a run did not write (a run
    writes config.yaml first). Other files, e.g. a sweep's, are left alone."""
    path = Path(run_dir).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"train.run_dir={run_dir}: {path} is not a directory")
    config_file = path / "config.yaml"
    if config_file.exists() and not _is_run_config(config_file):
        raise ConfigError(f"train.run_dir={run_dir}: {config_file} is not the config of an lm "
                          "run, and training would overwrite it; choose another train.run_dir")
    found = [name for name in RUN_FILES if (path / name).exists()]
    if found and not config_file.exists():
        raise ConfigError(f"train.run_dir={run_dir}: {path} holds {', '.join(found)} but no "
                          "config.yaml, so no lm run wrote them, and training would rewrite "
                          "them; choose another train.run_dir")
    return path


class _RunLog:
    """A run's metrics.jsonl and eval.jsonl: one JSON row per line, written by process 0 alone,
    and rewound with the run."""

    def __init__(self, run_dir: Path):
        self.paths = {"metrics": run_dir / "metrics.jsonl", "eval": run_dir / evaluate.EVAL_FILE}

    def rewind(self, through: int, skipped) -> None:
        """Keep what a run resumed from the checkpoint of step `through`, with `skipped`, would
        not write again: the rows of the steps until then, and the events of its rollbacks."""

        def kept(row):
            return tuple(row["skipped"]) in skipped if "event" in row else row["step"] <= through

        if is_primary():
            for path in self.paths.values():
                rows = [r for r in evaluate.read_rows(path) if kept(r)]
                tmp = path.with_suffix(".tmp")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
                tmp.replace(path)

    def append(self, name: str, row: dict) -> None:
        if is_primary():
            with open(self.paths[name], "a") as f:
                f.write(json.dumps(row) + "\n")

    def last_metrics(self) -> dict:
        return (evaluate.read_rows(self.paths["metrics"]) or [{}])[-1]


# --------------------------------------------------------------------------- loss spikes


def data_position(step: int, skipped) -> int:
    """The batch that step index `step` reads, counted in an uninterrupted run's steps, when the
    data positions in the `skipped` ranges [start, stop) are passed over. Rollbacks only go
    forward in the data, so the ranges ascend and each applies to every step from its start."""
    position = step
    for start, stop in skipped:
        if position >= start:
            position += stop - start
    return position


@dataclasses.dataclass(frozen=True)
class Skipping:
    """`source` with the `skipped` data positions passed over: step i reads its batch at
    data_position(i). A pure function of (step, skipped), like the data itself."""

    source: data.Source
    skipped: tuple[tuple[int, int], ...] = ()

    def rows(self, step: int, lo: int, hi: int) -> np.ndarray:
        return self.source.rows(data_position(step, self.skipped), lo, hi)

    def epoch(self, step: int) -> float:
        return self.source.epoch(data_position(step, self.skipped))


@dataclasses.dataclass(frozen=True)
class Spike:
    step: int
    loss: float
    threshold: float  # the loss it went over; inf before detection starts

    def describe(self, s: config_lib.SpikeConfig) -> str:
        if not math.isfinite(self.loss):
            return f"loss became non-finite at step {self.step}"
        return (f"loss spiked to {self.loss:.4g} at step {self.step}, over {s.factor} × the "
                f"median of the {s.window} steps before it ({self.threshold / s.factor:.4g})")


def spike_threshold(s: config_lib.SpikeConfig, step: int, recent) -> float:
    """The loss above which `step` is a spike, given the losses of the steps before it: `factor`
    times their running median, once there are `window` of them and `start_step` is reached."""
    if not s.factor or step < s.start_step or len(recent) < s.window:
        return math.inf
    return s.factor * statistics.median(recent)


def first_spike(s: config_lib.SpikeConfig, first_step: int, losses: list[float],
                recent: collections.deque) -> Spike | None:
    """The first of `losses` (of steps first_step, first_step + 1, ...) that is non-finite or
    over its threshold; `recent` (the running window) takes the losses before it."""
    for step, loss in enumerate(losses, first_step):
        threshold = spike_threshold(s, step, recent)
        if not math.isfinite(loss) or loss > threshold:
            return Spike(step, loss, threshold)
        recent.append(loss)
    return None


def skip_range(s: config_lib.SpikeConfig, spike_step: int, back_to: int,
               skipped) -> tuple[int, int]:
    """The data positions passed over after rolling back from a spike at `spike_step` to the
    checkpoint of step `back_to`: those of the steps in between, which led to the spike, or
    `skip_batches` if more (PaLM went back ~100 steps and skipped 200-500 batches)."""
    start = data_position(back_to, skipped)
    return start, start + max(s.skip_batches, spike_step - back_to)


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

    def agreed(self, can_sync: bool) -> int | None:
        """The signal to stop on after this step, the same in every process (they must save
        together). Processes that may have got different signals compare them only where the
        loop waits for the device anyway (`can_sync`): a step later, not a sync per step."""
        if jax.process_count() == 1:
            return self.signum
        if not can_sync:
            return None
        return int(multihost_utils.process_allgather(np.int32(self.signum or 0)).max()) or None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _resume(program: Program, mngr) -> tuple[dict, int, list, collections.deque]:
    """From the newest checkpoint that restores (a fresh state at step 0 without one): the
    state, the step, the data positions skipped so far and the losses of the steps before."""
    lay = program.layout
    restored = checkpoint.restore_latest(mngr, lay.abstract, lay.shardings)
    state, meta = restored or (program.init(), {"step": 0})
    state["step"] = jax.device_put(np.int32(meta["step"]), lay.shardings["step"])
    window = lay.cfg.train.spikes.window
    return (state, meta["step"], [tuple(r) for r in meta.get("skipped", [])],
            collections.deque(meta.get("recent_losses", []), maxlen=window))


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


def _spike_row(spike: Spike, back_to: int, skipped: list) -> dict:
    """The metrics.jsonl row of a rollback: an `event` at the spike's step, followed by the rows
    of the steps the run does again from `back_to`."""
    finite = math.isfinite(spike.loss)
    return {"step": spike.step, "event": "loss_spike", "loss": spike.loss if finite else None,
            "threshold": spike.threshold if math.isfinite(spike.threshold) else None,
            "rolled_back_to": back_to, "skipped": list(skipped[-1]), "spikes": len(skipped)}


def _spike_error(spike: Spike, cfg: Config) -> TrainingError:
    s, o = cfg.train.spikes, cfg.optim
    too_many = f", one spike more than train.spikes.max_spikes={s.max_spikes} allows"
    return TrainingError(f"{spike.describe(s)}{too_many if s.max_spikes else ''}; lower optim.lr "
                         f"(now {o.lr}) or set optim.clip_norm (now {o.clip_norm})")


def train(cfg: Config, devices=None) -> dict:
    """Train `cfg` into `cfg.train.run_dir`, resuming from its newest complete checkpoint;
    returns the last metrics row. Every process of a multi-process run calls it alike.

    The host waits for the device only at log points and before each checkpoint save (which
    waits anyway); there it checks the loss of every step since the last check. A loss spike
    (train.spikes) rolls the run back to its newest checkpoint, which is always older than the
    spike since no save happens before the steps it holds have been checked, and passes over
    the batches that led to the spike. The ranges skipped live in every checkpoint's meta, so
    a resumed run reads the same batches as an uninterrupted one."""
    from tqdm import tqdm

    t = cfg.train
    run_dir = run_directory(t.run_dir)
    _sync("run directory checked")  # by every process, before process 0 writes into it
    if is_primary():
        run_dir.mkdir(parents=True, exist_ok=True)
        config_lib.dump(cfg, run_dir / "config.yaml")
    program = compile_program(cfg, devices)
    lay = program.layout
    mngr = checkpoint.manager(run_dir, cfg.checkpoint)
    source = _primary_first(lambda: data.source(cfg))
    state, start, skipped, recent = _resume(program, mngr)
    log = _RunLog(run_dir)
    log.rewind(start, skipped)
    to_eval, to_save = eval_steps(cfg), save_steps(cfg)
    ev = evaluate.evaluator(lay) if to_eval else None
    peak = t.peak_flops or flops.peak_flops_per_s(list(lay.mesh.devices.flat))
    row = log.last_metrics()
    say = tqdm.write if is_primary() else (lambda message: None)
    with (_StopSignals() as stop,
          tqdm(initial=start, total=t.steps, disable=not (t.progress and is_primary()),
               unit="step") as bar):
        while True:  # from `start` to the end, or to a spike and back
            src, spike = Skipping(source, tuple(skipped)), None
            pending, clock, logged = [], time.perf_counter(), start
            with contextlib.closing(data.batches(src, lay.batch_sharding, lay.batch_shape,
                                                 start, t.steps)) as batches:
                for index, tokens in batches:
                    step = index + 1  # steps done after this one
                    state, metrics = program.step(state, tokens)
                    pending.append(metrics)
                    log_now = step % t.log_every == 0 or step == t.steps
                    stopping = stop.agreed(can_sync=log_now)
                    save_now = step in to_save or stopping
                    if log_now or save_now:
                        checked = jax.device_get(pending)
                        spike = first_spike(t.spikes, step - len(checked) + 1,
                                            [float(m["loss"]) for m in checked], recent)
                        if spike:
                            break
                        pending = []
                    if log_now:
                        now = time.perf_counter()
                        row = _log_row(step, cfg, checked[-1], (now - clock) / (step - logged),
                                       peak, src.epoch(step))
                        log.append("metrics", row)
                        bar.update(step - bar.n)
                        bar.set_postfix(loss=f"{row['loss']:.4f}")
                        say(f"step {step:>6}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  "
                            f"{row['tokens_per_s']:,.0f} tok/s  mfu {row['mfu']:.1%}")
                        clock, logged = now, step
                    if step in to_eval:
                        eval_row = ev.row(state["params"], step)
                        log.append("eval", eval_row)
                        say(f"step {step:>6}  eval loss {eval_row['loss']:.4f} "
                            f"± {eval_row['loss_sem'] or 0:.4f}")
                    if save_now:
                        checkpoint.save(mngr, state, {
                            "step": step, "seed": t.seed, "config": config_lib.to_dict(cfg),
                            "skipped": skipped, "recent_losses": list(recent)})
                    if stopping:
                        mngr.wait_until_finished()
                        raise Interrupted(
                            f"stopped by {signal.Signals(stopping).name} at step {step}; saved "
                            f"a checkpoint to {checkpoint.directory(run_dir)}. Run the same "
                            "command again to resume.", stopping)
            if spike is None:
                break
            if len(skipped) >= t.spikes.max_spikes:
                raise _spike_error(spike, cfg)
            mngr.wait_until_finished()
            state, start, _, recent = _resume(program, mngr)  # the skips since then stay
            skipped.append(skip_range(t.spikes, spike.step, start, skipped))
            log.rewind(start, skipped)
            log.append("metrics", _spike_row(spike, start, skipped))
            bar.update(start - bar.n)
            say(f"{spike.describe(t.spikes)}: rolled back to step {start}, skipping batches "
                f"{skipped[-1][0]}..{skipped[-1][1] - 1} ({len(skipped)} of "
                f"{t.spikes.max_spikes} spikes)")
    mngr.wait_until_finished()
    return row
