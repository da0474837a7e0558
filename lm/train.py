"""Training: the jitted step, and the loop that fills a run directory — metrics, evaluations,
checkpoints — resumes it after an interruption and rolls it back past loss spikes, in one
process or in each process of a multi-process run alike."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lm import (checkpoint, config as config_lib, corpus, data, evaluate, flops,
                profiling, rundir, schedule, sharding, spikes, state as state_lib, trackers)
from lm.devices import host_memory_bytes
from lm.config import Config
from lm.errors import Busy, CheckpointError, ConfigError, Fenced, Interrupted
from lm.processes import StopSignals, agree, is_primary, primary_first, sync

log = logging.getLogger("lm")


# --------------------------------------------------------------------------- the step


def accumulate(grad_fn, params, tokens_bt1, n: int):
    """`grad_fn`'s value (a loss, or a loss and a dict of metrics) and gradient over `n` equal
    micro-batches: their mean, the same as one full batch's, but for metrics named `max_*`,
    which take the largest.

    Micro-batch i takes rows i, i+n, i+2n, ..., so each device's contiguous block of rows
    feeds every micro-batch and nothing moves between devices."""
    if n == 1:
        return grad_fn(params, tokens_bt1)
    b = tokens_bt1.shape[0]
    micro_mbt = tokens_bt1.reshape(b // n, n, -1).swapaxes(0, 1)

    def is_max(path) -> bool:
        return str(getattr(path[-1], "key", "")).startswith("max_")

    def combine(path, total, value):
        return jnp.maximum(total, value) if is_max(path) else total + value

    def add(total, tokens_bt1):
        value = grad_fn(params, sharding.constrain(tokens_bt1, ("batch", None)))
        return jax.tree_util.tree_map_with_path(combine, total, value), None

    shapes = jax.eval_shape(grad_fn, params, micro_mbt[0])
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    total, _ = jax.lax.scan(add, zero, micro_mbt)
    return jax.tree_util.tree_map_with_path(lambda path, x: x if is_max(path) else x / n, total)


def make_step(lay: state_lib.Layout):
    """(state, tokens [b, t+1], learning rate) -> (state, metrics). The learning rate is an
    input, so that one compiled step serves runs of any length, schedule and peak rate. The
    metrics: loss (the cross-entropy, without the z-loss), grad_norm, lr, and with
    `train.log_stability` max_attention_logit and output_logit_rms."""
    cfg = lay.cfg

    def loss_fn(params, tokens_bt1):
        model = nnx.merge(lay.graphdef, params)
        return model.objective(tokens_bt1[:, :-1], tokens_bt1[:, 1:], cfg.optim.z_loss,
                               cfg.train.log_stability)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, tokens_bt1, lr):
        (_, aux), grads = accumulate(grad_fn, state["params"], tokens_bt1,
                                     cfg.train.micro_batches)
        direction, opt = lay.tx.update(grads, state["opt"], state["params"])
        updates = jax.tree.map(lambda u: -lr * u, direction)
        metrics = {"loss": aux["loss"], "grad_norm": optax.tree.norm(grads), "lr": lr}
        if cfg.train.log_stability:  # the logits' mean square over micro-batches, then its root
            metrics |= {"max_attention_logit": aux["max_attention_logit"],
                        "output_logit_rms": jnp.sqrt(aux["output_logit_ms"])}
        new = {"params": optax.apply_updates(state["params"], updates), "opt": opt,
               "step": state["step"] + 1}
        return new, metrics

    return step


@dataclasses.dataclass(frozen=True)
class Program:
    """The train step of one layout, compiled, and its init, compiled on first use (a cooldown
    branch, restored from its parent's checkpoint, never needs it) inside `timed("compile")`:
    a Session's timer charges it to compiling."""

    layout: state_lib.Layout
    _init: Callable  # jitted: seed -> state, created sharded
    step: Callable  # (state, tokens_bt1, lr) -> (state, metrics); donates state
    timed: Callable[[str], contextlib.AbstractContextManager] = contextlib.nullcontext

    @functools.cached_property
    def _compiled_init(self) -> Callable:
        # The init runs once a run. On CPU, LLVM's full optimisation of its random-number
        # kernels was ~3/4 of its compile time (4.6-5.2 s against 1.3-1.7 s a shape, one core);
        # at level 1 it computes the same bits (a test checks).
        cpu = self.layout.mesh.devices.flat[0].platform == "cpu"
        with self.timed("compile"):
            return self._init.lower(state_lib.SEED).compile(
                compiler_options={"xla_backend_optimization_level": 1} if cpu else None)

    def init(self, seed: int | None = None) -> dict:
        return self._compiled_init(np.uint32(self.layout.cfg.train.seed if seed is None else seed))


LR = jax.ShapeDtypeStruct((), jnp.float32)


def compiled_key(cfg: Config) -> tuple:
    """What a compiled step depends on: runs that agree on it share one program, whatever
    their length, learning rate, schedule, seed, data or run directory."""
    o, t = cfg.optim, cfg.train
    return (cfg.model, cfg.mesh, t.batch_size, t.micro_batches, cfg.seq_len, t.log_stability,
            (o.b1, o.b2, o.eps, o.weight_decay, o.clip_norm, o.z_loss))


def compile_program(cfg: Config, devices=None) -> Program:
    return _compile(state_lib.layout(cfg, devices))


def _compile(lay: state_lib.Layout) -> Program:
    cfg = lay.cfg
    config_lib.check_train_batch(cfg, dict(lay.mesh.shape))
    batch = jax.ShapeDtypeStruct(lay.batch_shape, jnp.int32, sharding=lay.batch_sharding)
    init = jax.jit(state_lib.init_fn(cfg, lay.tx), out_shardings=lay.shardings)
    replicated = NamedSharding(lay.mesh, P())
    with sharding.use(lay.mesh, lay.table):
        step = jax.jit(make_step(lay), in_shardings=(lay.shardings, lay.batch_sharding,
                                                     replicated),
                       out_shardings=(lay.shardings, replicated),
                       donate_argnums=0).lower(lay.abstract, batch, LR).compile()
    return Program(lay, init, step)


# --------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class _Run:
    """What the loop carries from one segment (a stretch of steps without a spike) to the
    next: the fixed parts of the run, and where it stands."""

    cfg: Config
    program: Program
    mngr: object  # orbax CheckpointManager
    source: data.Source
    log: rundir.Log
    evaluator: evaluate.Evaluators | None
    peak: float
    peak_name: str  # which peak: a data-sheet entry, `measured cpu` or `train.peak_flops`
    trace: profiling.Trace
    stop: StopSignals
    bar: object  # tqdm
    state: dict
    start: int  # the step the segment starts from
    skipped: list  # data positions skipped, [start, stop) ranges
    recent: collections.deque  # losses of the steps before, for the spike threshold
    row: dict  # the last metrics row
    session: Session
    clock: float = 0.0
    saved_at: float = dataclasses.field(default_factory=time.perf_counter)
    logged: int = 0  # the last step logged


def _resume(cfg: Config, program: Program, mngr) -> tuple[dict, int, list, collections.deque]:
    """From the newest checkpoint that restores (a fresh state at step 0 without one): the
    state, the step, the data positions skipped so far and the losses of the steps before."""
    lay = program.layout
    saved = sorted(mngr.all_steps())
    restored = checkpoint.restore_latest(mngr, lay.abstract, lay.shardings, aside=True)
    if restored is None and saved:  # starting afresh would rewind the run's logs to step 0
        raise CheckpointError(
            f"no checkpoint in {checkpoint.directory(cfg.train.run_dir)} restores (steps "
            f"{saved}, each unreadable or damaged, are left as they were, and so are the run's "
            "logs): restore them from a copy, or train afresh in another train.run_dir")
    state, meta = restored or _start(cfg, program)
    state["step"] = jax.device_put(np.int32(meta["step"]), lay.shardings["step"])
    return (state, meta["step"], [tuple(r) for r in meta.get("skipped", [])],
            collections.deque(meta.get("recent_losses", []), maxlen=cfg.train.spikes.window))


def _start(cfg: Config, program: Program) -> tuple[dict, dict]:
    """A run's first state and meta: fresh at step 0, or a cooldown branch's, from its parent's
    checkpoint at the branch step (the same state the parent had there, bit for bit). A parent
    that saved no checkpoint there (a budget added to a sweep after its stable run ended) lends
    its latest one before it, and the branch trains the stable steps in between itself: the
    parent's learning rates and batches up to the branch step are the branch's own, so it ends
    as if branched at the step. Without one before it, the branch starts afresh."""
    t, lay = cfg.train, program.layout
    if not t.branch_from:
        return program.init(t.seed), {"step": 0}
    step = checkpoint.branch_point(t.branch_from, t.branch_step)
    if step is None:
        log.info("%s has no checkpoint up to step %d: starting afresh", t.branch_from,
                 t.branch_step)
        return program.init(t.seed), {"step": 0}
    log.info("branching from step %d of %s%s", step, t.branch_from,
             f" (its latest up to step {t.branch_step})" if step < t.branch_step else "")
    parent = checkpoint.manager(t.branch_from, read_only=True)
    try:
        return checkpoint.restore(parent, step, lay.abstract, lay.shardings)
    except CheckpointError:
        raise
    except Exception as e:  # damaged: the branch cannot start, and must not start elsewhere
        raise CheckpointError(
            f"train.branch_from={t.branch_from}: its checkpoint at step {step} does not "
            f"restore ({checkpoint.why(e)}); train that run again") from e


STABILITY = ("max_attention_logit", "output_logit_rms")  # train.log_stability's metrics


def _log_metrics(run: _Run, step: int, metrics: dict, epoch: float) -> None:
    now = time.perf_counter()
    seconds = (now - run.clock) / (step - run.logged)
    cfg = run.cfg
    run.row = {
        "step": step,
        "tokens": step * cfg.tokens_per_step,
        "loss": float(metrics["loss"]),
        "lr": float(metrics["lr"]),
        "grad_norm": float(metrics["grad_norm"]),
        "step_time_s": seconds,
        "tokens_per_s": cfg.tokens_per_step / seconds,
        "model_flops_per_s": flops.step_flops(cfg) / seconds,
        "mfu": flops.mfu(cfg, seconds, run.peak),
        "peak": run.peak_name,
        "peak_flops_per_s": run.peak,
        "epoch": epoch,  # passes over the training data so far: > 1 means it repeats
        **{key: float(metrics[key]) for key in STABILITY if key in metrics},
        **data.realised(run.source, step),  # a mixture's shares of the rows so far
    }
    run.log.append("metrics", run.row)
    run.bar.update(step - run.bar.n)
    run.bar.set_postfix(loss=f"{run.row['loss']:.4f}")
    log.info("step %6d  loss %.4f  lr %.2e  %s tok/s  mfu %.1f%%", step, run.row["loss"],
             run.row["lr"], f"{run.row['tokens_per_s']:,.0f}", 100 * run.row["mfu"])
    run.clock, run.logged = now, step


def _evaluate(run: _Run, step: int) -> None:
    with run.session.timed("eval"):
        rows = run.evaluator.rows(run.state["params"], step)
    for row in rows:
        run.log.append("eval", row)
        log.info("step %6d  eval %s loss %.4f ± %.4f", step, row["set"], row["loss"],
                 row["loss_sem"] or 0)


def _save(run: _Run, step: int) -> None:
    with run.session.timed("checkpoint"):
        _save_now(run, step)
    run.saved_at = time.perf_counter()


def _save_now(run: _Run, step: int) -> None:
    checkpoint.save(run.mngr, run.state, {
        "step": step, "seed": run.cfg.train.seed, "config": config_lib.to_dict(run.cfg),
        "skipped": run.skipped, "recent_losses": list(run.recent)}, run.cfg.checkpoint)


def _fence(session: Session, run_dir, when: str) -> None:
    """Stop before writing once a sweep worker's claim on the run has lapsed (`Session.lease`):
    another worker may be training it now."""
    if session.lease is not None and not session.lease.valid():
        raise Fenced(f"stopped {when} without writing: this worker's claim on {run_dir} "
                     "lapsed, and another worker may be training it now")


def _after_step(run: _Run, step: int, pending: list, src: spikes.Skipping,
                to_eval: set, to_save: set) -> spikes.Spike | None:
    """Everything the loop does after step `step`: check the losses since the last check,
    log, evaluate, save and stop, as their schedules say. Returns a spike, found before any
    of that happened."""
    t, every = run.cfg.train, run.cfg.checkpoint.every_seconds
    _fence(run.session, t.run_dir, f"after step {step}")
    log_now = step % t.log_every == 0 or step == t.steps
    stopping = run.stop.agreed(can_sync=log_now)
    overdue = log_now and every > 0 and agree(time.perf_counter() - run.saved_at >= every)
    save_now = step in to_save or stopping or overdue
    eval_now = step in to_eval
    # the host waits for the device only here; before evaluating too, so that the steps'
    # time is not charged to the evaluation, and a spike is found before it is evaluated
    if log_now or save_now or eval_now:
        checked = jax.device_get(pending)
        pending.clear()
        spike = spikes.first_spike(t.spikes, step - len(checked) + 1,
                                   [spikes.checked_loss(m) for m in checked], run.recent)
        if spike:
            return spike
    if log_now:
        _log_metrics(run, step, checked[-1], src.epoch(step))
    if eval_now:
        _evaluate(run, step)
    if save_now:
        _fence(run.session, t.run_dir, f"after step {step}")  # the evaluation may have been long
        _save(run, step)
    if stopping:
        run.mngr.wait_until_finished()
        raise Interrupted(f"stopped by {signal.Signals(stopping).name} at step {step}; saved a "
                          f"checkpoint to {checkpoint.directory(t.run_dir)}. Run the same "
                          "command again to resume.", stopping)
    return None


def _segment(run: _Run) -> spikes.Spike | None:
    """Train from `run.start` to the end, or to the first loss spike, which is returned."""
    cfg, lay = run.cfg, run.program.layout
    src = spikes.Skipping(run.source, tuple(run.skipped))
    to_eval, to_save = rundir.eval_steps(cfg), rundir.save_steps(cfg)
    pending = []
    run.clock, run.logged = time.perf_counter(), run.start
    batches = data.batches(src, lay.batch_sharding, lay.batch_shape, run.start, cfg.train.steps)
    with contextlib.closing(batches), run.session.timed("steps"):
        for index, tokens in batches:
            run.trace.before_step(index, run.state)
            lr = np.float32(schedule.learning_rate(cfg.optim, cfg.train.steps, index))
            run.state, metrics = run.program.step(run.state, tokens, lr)
            pending.append(metrics)
            if spike := _after_step(run, index + 1, pending, src, to_eval, to_save):
                run.trace.end()
                return spike
    run.trace.end()
    return None


def _roll_back(run: _Run, spike: spikes.Spike) -> None:
    """To the newest checkpoint, which is always older than the spike (no save happens before
    the steps it holds have been checked), passing over the batches that led to the spike."""
    s = run.cfg.train.spikes
    if len(run.skipped) >= s.max_spikes:
        raise spike.error(run.cfg)
    run.mngr.wait_until_finished()
    run.state, run.start, _, run.recent = _resume(run.cfg, run.program, run.mngr)  # skips stay
    run.skipped.append(spikes.skip_range(s, spike.step, run.start, run.skipped))
    run.log.rewind(run.start, run.skipped)
    run.log.append("metrics", spike.event(run.start, run.skipped))
    run.bar.update(run.start - run.bar.n)
    skip = run.skipped[-1]
    log.warning("%s: rolled back to step %d, skipping batches %d..%d (%d of %d spikes)",
                spike.describe(s), run.start, skip[0], skip[1] - 1, len(run.skipped),
                s.max_spikes)


class Session:
    """What a process keeps across the runs it trains one after another (a sweep's worker):
    the compiled steps and evaluators of every shape it met, reused by later runs of that
    shape (seeds, token budgets, cooldown branches), and where its time went."""

    def __init__(self, devices=None):
        self.devices = devices
        self.seconds: collections.Counter = collections.Counter()  # by phase
        # A sweep worker's claim on the run it trains (`runner.Lease`): once it is no longer
        # valid, the loop stops before writing anything more. None: the run is this process's.
        self.lease = None
        self._layouts: dict = {}
        self._programs: dict = {}
        self._evaluators: dict = {}
        self._phases: list[str] = []
        self._since = time.perf_counter()

    def _charge(self) -> None:
        now = time.perf_counter()
        if self._phases:
            self.seconds[self._phases[-1]] += now - self._since
        self._since = now

    @contextlib.contextmanager
    def timed(self, phase: str):
        """Charge the time inside the block to `phase`, not to the phase around it."""
        self._charge()
        self._phases.append(phase)
        try:
            yield
        finally:
            self._charge()
            self._phases.pop()

    def layout(self, cfg: Config) -> state_lib.Layout:
        """`cfg`'s layout (mesh, shardings, abstract state), without compiling anything."""
        key = compiled_key(cfg)
        if key not in self._layouts:
            self._layouts[key] = state_lib.layout(cfg, self.devices)
        return self._layouts[key]

    def program(self, cfg: Config) -> Program:
        key = compiled_key(cfg)
        if key not in self._programs:
            with self.timed("compile"):
                self._programs[key] = dataclasses.replace(_compile(self.layout(cfg)),
                                                          timed=self.timed)
        return self._programs[key]

    def prepare(self, cfg: Config) -> None:
        """Compile, ahead of its run, every program `_train` would compile for `cfg`: the
        step, the init where the run starts afresh (a branch restores its parent's state), and
        the evaluator where it evaluates."""
        program = self.program(cfg)
        if not cfg.train.branch_from:
            program._compiled_init  # noqa: B018 - compiled on first use
        self.evaluator(cfg)

    def compiled(self, cfg: Config) -> bool:
        """Whether this process has compiled `cfg`'s shape."""
        return compiled_key(cfg) in self._programs

    def evaluator(self, cfg: Config) -> evaluate.Evaluators | None:
        """`cfg`'s evaluator, compiled once per shape and data; None for a run that evaluates
        at no step."""
        if not rundir.eval_steps(cfg):
            return None
        key = (compiled_key(cfg), cfg.data, cfg.eval.batch_size)
        if key not in self._evaluators:
            lay = dataclasses.replace(self.layout(cfg), cfg=cfg)
            with self.timed("compile"):
                self._evaluators[key] = evaluate.evaluator(lay)
        return self._evaluators[key]


def train(cfg: Config, devices=None, session: Session | None = None) -> dict:
    """Train `cfg` into `cfg.train.run_dir`, resuming from its newest complete checkpoint;
    returns the last metrics row. Every process of a multi-process run calls it alike.

    The host waits for the device only at log points and before each checkpoint save (which
    waits anyway); there it checks the loss of every step since the last check. A loss spike
    (train.spikes) rolls the run back to its newest checkpoint and passes over the batches
    that led to it. The ranges skipped live in every checkpoint's meta, so a resumed run reads
    the same batches as an uninterrupted one."""
    run_dir = rundir.checked(cfg.train.run_dir)
    trackers.require(cfg.train.trackers)
    session = session or Session(devices)
    devices = jax.devices() if session.devices is None else session.devices
    config_lib.check_devices(cfg, len(devices))  # before the run directory exists
    _check_memory(cfg, devices)
    _check_parent(cfg.train, session.layout(cfg).abstract)
    with rundir.locked(run_dir) if is_primary() else contextlib.nullcontext():
        sync("run directory locked")  # by every process, before process 0 writes into it
        return _train(cfg, run_dir, session)


def _check_parent(t, abstract: dict) -> None:
    """A branch's parent is a run directory of the configured model and optimiser (`abstract`),
    and not one still training: its checkpoint at the branch step may not be written yet, or be
    pruned while it is read."""
    if not t.branch_from:
        return
    parent = Path(t.branch_from)
    if not (parent / rundir.CONFIG).is_file():
        raise ConfigError(f"train.branch_from={parent} is not a run directory (no "
                          f"{rundir.CONFIG}); give the train.run_dir of the run to branch from")
    if who := rundir.holder(parent):
        raise Busy(f"train.branch_from={parent} is in use by {who}; branch once it has ended")
    try:
        checkpoint.newest_fitting(parent, abstract)
    except CheckpointError as e:
        raise CheckpointError(f"train.branch_from={parent} trained another model or optimiser"
                              f": {e}") from None


def _check_same_batches(cfg: Config, run_dir) -> None:
    """A run resumed reads the batches of its steps by their number, and counts its tokens so:
    refuse what would change them (the batch size, the sequence length, the data order, a
    mixture's weights) for a run that has checkpoints."""
    if not checkpoint.directory(run_dir).is_dir() or not checkpoint.manager(
            run_dir, read_only=True).all_steps():
        return
    was = rundir.load_config(run_dir)
    changed = [f"{key} {a} -> {b}" for key, a, b in (
        ("train.batch_size", was.train.batch_size, cfg.train.batch_size),
        ("data.seq_len", was.seq_len, cfg.seq_len), ("data.seed", was.data_seed, cfg.data_seed),
        ("data.mixture", was.data.mixture, cfg.data.mixture)) if a != b]
    if changed:
        raise ConfigError(f"{run_dir} trained on other batches ({'; '.join(changed)}): its steps "
                          "would read other data and its token counts be wrong; keep them, or "
                          "train a new run (another train.run_dir, or train.branch_from it)")


def _check_memory(cfg: Config, devices) -> None:
    """`flops.check_memory` against what `devices` have together. Simulated CPU devices share
    the host's memory; each process's host, or other hosts' devices, which report nothing
    here, are taken to be alike."""
    local = [d for d in devices if d.process_index == jax.process_index()]
    if devices[0].platform == "cpu":
        have = host_memory_bytes() * len({d.process_index for d in devices})
    else:
        try:
            have = sum((d.memory_stats() or {}).get("bytes_limit", 0) for d in local)
        except Exception:  # noqa: BLE001 - a platform without memory statistics: unknown
            have = 0
        have = have * len(devices) // max(len(local), 1)
    flops.check_memory(cfg, have, devices[0].platform)


def _train(cfg: Config, run_dir, session: Session) -> dict:
    from tqdm import tqdm

    t = cfg.train
    lay = session.layout(cfg)  # the mesh, the data and the checkpoints are checked before
    with session.timed("data"):  # anything compiles or is written
        source = primary_first(lambda: data.source(cfg))
    checkpoint.check_fits(run_dir, lay.abstract, t.steps)
    _check_same_batches(cfg, run_dir)
    program = session.program(cfg)
    _fence(session, run_dir, "before its first step")  # compiling may have been long
    rundir.bind_data(run_dir, corpus.identity(cfg), training=True, writes=is_primary())
    with session.timed("restore"):
        mngr = checkpoint.manager(run_dir)
        state, start, skipped, recent = _resume(cfg, program, mngr)
    evaluator = session.evaluator(cfg)
    devices = list(lay.mesh.devices.flat)
    peak = t.peak_flops or flops.peak_flops_per_s(devices)
    peak_name = "train.peak_flops" if t.peak_flops else flops.peak_name(devices)
    with (StopSignals() as stop,
          tqdm(initial=start, total=t.steps, disable=not (t.progress and is_primary()),
               unit="step") as bar,
          trackers.opened(cfg, run_dir, writes=is_primary()) as tracked):
        run_log = rundir.Log(run_dir, writes=is_primary(), sinks=[tracked])
        run_log.rewind(start, skipped)
        if is_primary():  # once nothing can refuse the run any more: else it keeps its config
            rundir.write_config(run_dir, cfg)
        run = _Run(cfg, program, mngr, source, run_log, evaluator, peak, peak_name,
                   profiling.Trace(t.profile, run_dir), stop, bar, state, start, skipped, recent,
                   run_log.last_metrics(), session)
        try:
            while (spike := _segment(run)) is not None:
                _roll_back(run, spike)
        except Exception:  # a fence, a spike past its budget: a save under way ends first
            mngr.wait_until_finished()  # (under the claim, for a fence)
            raise
        with session.timed("checkpoint"):
            mngr.wait_until_finished()
            _fence(session, run_dir, "after its last step")
            checkpoint.prune(mngr, cfg.checkpoint)  # the last save committed: keep the policy
    return run.row
