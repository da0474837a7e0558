"""Running a sweep: long-lived workers train its trials, the fitting runs are fitted once, the
held-out prediction is registered *before* any held-out run trains, and the report is written.

    lm sweep SWEEP.yaml [--workers K] [--cpu-devices N] [--store URL]   run (or resume), report
    lm sweep SWEEP.yaml --worker --store URL                            one more worker, anywhere
    lm sweep --plan SWEEP.yaml                                          trials, FLOPs, time
    lm sweep --status SWEEP.yaml [--json]                               progress

`lm sweep` starts K worker processes (`--worker`). Each claims trials from the store and trains
them in-process, one after another, reusing the compiled programs of every shape it met; a
trial that raises is recorded failed and the worker goes on; a worker that dies loses only the
steps since its trial's last checkpoint, and the trial goes back to the queue. With a
PostgreSQL store, workers on other machines (SLURM, Kubernetes, TPU VM hosts) share the sweep.
This module imports JAX only inside a worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import NamedTuple

import numpy as np
import yaml

from lm import (backtest, config as config_lib, flops, laws, report, rundir, scaling, schedule,
                spec as spec_lib, trackers)
from lm.devices import host_memory_bytes
from lm.errors import (Busy, ConfigError, Fenced, FitError, Incomplete, Interrupted, LMError,
                       StoreError, listed)
from lm.noise import Noise, noise_by_budget, noise_by_size
from lm.points import Points
from lm.scaling import Fit
from lm.spec import SweepSpec, Trial
from lm.store import (FINAL, RECONNECT_S, SQLITE, Store, intact_trials,
                      is_postgres, same_config, worker_name)

log = logging.getLogger("lm.sweep")
PREDICTION = "prediction.json"
STALE_S = 120.0  # a worker silent this long has died: its trial goes back to the queue
BEATS = 12  # heartbeats a worker sends within that time
POLL_S = 0.5


# --------------------------------------------------------------------------- the sweep


class Devices(NamedTuple):
    count: int  # 0: unknown
    memory: int  # bytes, all of them together
    platform: str
    kind: str  # jax's device_kind, e.g. "NVIDIA H200"


@functools.cache
def devices(cpu_devices: int | None) -> Devices:
    """The devices a worker has. Asked of a child process, once per runner, so that the
    runner itself never starts JAX."""
    host = host_memory_bytes()
    if cpu_devices:
        return Devices(cpu_devices, host, "cpu", "cpu")  # simulated: they share the host
    probe = ("import jax; d = jax.devices(); print(d[0].platform, len(d), "
             "(d[0].memory_stats() or {}).get('bytes_limit', 0) * len(d), d[0].device_kind)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=300)
    fields = out.stdout.split()
    platform, count, limit, *kind = fields if len(fields) >= 3 else ["cpu", "0", "0"]
    return Devices(int(count), host if platform == "cpu" else int(limit), platform,
                   " ".join(kind) or platform)


def peak(cpu_devices: int | None) -> tuple[float, str]:
    """The peak FLOP/s of a worker's devices, for a sweep's study MFU and its plan's estimates,
    and which it is: an accelerator's data-sheet figure (`flops.PEAKS`, all its devices), else
    an fp32 matmul measured now in numpy (the runner never starts JAX)."""
    d = devices(cpu_devices)
    if d.platform != "cpu":
        with contextlib.suppress(KeyError):
            entry = flops.data_sheet_entry(d.kind)
            return flops.PEAKS[entry] * d.count, entry
    measured = flops.numpy_matmul_flops_per_s(2048)
    return measured, ("measured cpu" if d.platform == "cpu" else
                      f"measured cpu: no data-sheet peak for {d.kind}")


def planned(spec_path: str | Path, cpu_devices: int | None, overrides=()
            ) -> tuple[SweepSpec, list[Trial]]:
    """The spec (with its dotted `overrides`) and its trials, checked to fit a worker's
    devices: their mesh and memory."""
    spec = spec_lib.load_spec(spec_path, overrides)
    trials = spec_lib.plan(spec)
    d = devices(cpu_devices)
    spec_lib.check_devices(trials, d.count)
    spec_lib.check_memory(trials, d.memory, d.platform)
    return spec, trials


def plan_digest(trials: list[Trial]) -> str:
    """What identifies a plan: every trial's name and config."""
    body = json.dumps([(t.name, config_lib.to_dict(t.cfg)) for t in trials], sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def store_url(spec: SweepSpec, url: str | None) -> str:
    return url or str(spec.path / SQLITE)


def _trained(spec: SweepSpec) -> list[str]:
    """The trials that have a run directory in the sweep's directory."""
    return sorted(p.parent.name for p in (spec.path / "trials").glob("*/config.yaml"))


def _open_store(spec: SweepSpec, url: str, again: str, wait: float = 0.0,
                read_only: bool = False) -> Store | None:
    """The sweep's store, for a runner or a worker; `read_only` (a plan): as it is, None if a
    SQLite file is not there. Refused: one that holds another sweep (by `sync`), and one new
    to a sweep that has trained (a mistyped --store), which would otherwise record every trial
    done again from its run directory, in a store of its own. `again`: the command that ran
    the sweep, without its --store, for the hint."""
    default, trained = str(spec.path / SQLITE), _trained(spec)
    lost = "" if url == default else " --store PATH"  # the lost one's, not the mistyped one
    why = (f"sweep {spec.name!r} has trained in {spec.path} ({_count(trained)} with a run "
           f"directory), but {url} holds no sweep: give the store it ran with (--store; by "
           f"default {default}), or, if that store is lost, rebuild it in its place from the "
           f"run directories: `{again}{lost} --rebuild-store`")
    if not is_postgres(url) and not Path(url).exists():
        if trained:
            raise StoreError(why)  # before the file is created
        if read_only:
            return None
    store = Store(url, wait=wait, read_only=read_only)
    if trained and not store.holds_trials():
        raise StoreError(why)
    return store


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


@contextlib.contextmanager
def exclusive(sweep_dir: Path):
    """One `lm sweep` runner per sweep directory at a time (workers are not runners)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / ".runner.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(f"another `lm sweep` is running on {sweep_dir}") from None
        yield


# --------------------------------------------------------------------------- the prediction


def _fitting_points(spec: SweepSpec, store: Store, names) -> Points:
    """The points of the finished fitting trials among `names` (the current plan's), with N
    counted as the spec says, without the sizes too noisy to fit."""
    f = spec.fit
    points = store.points_of(f.params, roles=("fit",), names=names, metric=f.metric)
    noise = noise_by_size(points.finals())
    noisy = too_noisy(spec, noise)
    if noisy and noisy >= set(points.params.tolist()):
        least = min(noise[n].sigma for n in noisy)
        raise FitError(f"every size's seeds spread by more than fit.max_noise={f.max_noise:g} "
                       f"(the least by {least:.3g}), so none is left to fit; raise "
                       "fit.max_noise, or add seeds")
    return points.select(~np.isin(points.params, list(noisy)))


def _fit(spec: SweepSpec, points: Points) -> Fit:
    """The law of `points` (`_fitting_points`, with N counted as the spec says)."""
    f = spec.fit
    try:
        fit = scaling.fit(points, f.law, bootstrap=f.bootstrap, drop_early=f.drop_early,
                          min_tokens_per_param=f.min_tokens_per_param)
        return dataclasses.replace(fit, n_counted=f.params)
    except (ValueError, ArithmeticError) as e:  # no numeric failure escapes as a traceback
        raise FitError(f"the fit of the finished fitting runs failed ({type(e).__name__}: {e})"
                       "; add sizes or token budgets (fit.law needs them spread over more "
                       "than a factor of a few), or check the failed trials") from None


def too_noisy(spec: SweepSpec, noise: dict[float, Noise]) -> set[float]:
    """The sizes whose seeds spread by more than fit.max_noise: the rule, fixed in the spec, by
    which they leave the fit."""
    return {n for n, x in noise.items() if spec.fit.max_noise and x.sigma > spec.fit.max_noise}


def registration(fit: Fit, held: list[Trial], spec: SweepSpec) -> dict:
    """The prediction for each held-out run, from the fit alone, with the fit itself: its loss
    and 95% intervals for the law and for an actual run, at the run's exact FLOPs (6ND
    alongside). `loss` and `are` stay null: the record is never edited; fit.json has them."""
    runs = []
    for t in held:
        facts = t.facts()
        n = spec_lib.fit_params(spec, t.cfg)
        p = scaling.predict(fit, params=n, tokens=facts["tokens"], flops=facts["flops"])
        runs.append({"run": t.name, "params": n, "tokens": facts["tokens"],
                     "flops": facts["flops"], "flops_6nd": facts["flops_6nd"],
                     "compute_ratio": facts["flops"] / fit.max_fit_flops,
                     "predicted": p["loss"], "interval": p.get("run_interval"),
                     "law_interval": p.get("intervals", {}).get("loss"), "loss": None,
                     "are": None})
    return {"made": time.strftime("%Y-%m-%d %H:%M:%S"), "law": fit.law, "runs": runs,
            "fit": fit.to_json()}


def registered_count(registered: dict, trials: list[Trial]) -> str:
    """How a registered fit counted N: recorded since 8c3d2be; in an earlier registration, the
    count that gives each held-out run the N it was registered with."""
    if "n_counted" in registered["fit"]:
        return registered["fit"]["n_counted"]
    cfgs = {t.name: t.cfg for t in trials}
    runs = [r for r in registered["runs"] if r["run"] in cfgs]
    return next((c for c in scaling.N_COUNTS
                 if all(r["params"] == spec_lib.counted_params(cfgs[r["run"]], c) for r in runs)),
                "total")


def register_when_ready(spec: SweepSpec, trials: list[Trial], store: Store) -> bool:
    """Once every fitting trial has ended, fit them and register the held-out prediction,
    exactly once however many workers get here; then the held-out trials may start. Returns
    whether this call registered it. A fit that fails raises (LMError) and registers nothing:
    the held-out runs wait for a prediction, which a rerun makes once the cause is fixed. So
    does a held-out run that trained without one (a store rebuilt without its prediction.json):
    a prediction made now would not be one made before it."""
    held = [t for t in trials if t.role == "holdout"]
    if not held:
        return False
    if _sync_registration(spec, store) is not None:
        store.unblock_held()
        return False
    status = {r["name"]: r["status"] for r in store.trials()}
    fitting = [t.name for t in trials if t.role == "fit"]
    if any(status.get(name) not in FINAL for name in fitting):
        return False
    if started := [t.name for t in held if status.get(t.name) != "blocked"]:
        raise StoreError(
            f"held-out run {listed(started)} trained without a registered prediction, and one "
            f"made now would not be a prediction: put the sweep's {PREDICTION} back (it is read "
            "into the store), or run the study afresh in a new directory")
    points = _fitting_points(spec, store, fitting)
    fit = _fit(spec, points)
    body = {**registration(fit, held, spec), "backtest": _backtest(fit, points, held),
            "fitted_runs": sorted(n for n in fitting if status[n] == "done"),
            "fit_spec": dataclasses.asdict(spec.fit)}
    if not store.register(body, [t.name for t in held]):
        return False
    _write_atomic(spec.path / PREDICTION, json.dumps(body, indent=1))
    log.info("sweep: registered the held-out prediction in %s", spec.path / PREDICTION)
    return True


def _backtest(fit: Fit, points: Points, held: list[Trial]) -> dict | None:
    """The law's reach, tried on the fitting runs' `points` at the held-out runs' compute
    ratios: a diagnostic, which must never cost the prediction it goes with."""
    ratios = [t.facts()["flops"] / fit.max_fit_flops for t in held]
    try:
        return dataclasses.asdict(backtest.farthest(fit, points, ratios))
    except Exception as e:  # noqa: BLE001
        log.warning("sweep: no backtest (%s: %s)", type(e).__name__, e)
        return None


# --------------------------------------------------------------------------- a worker


def _ingest(trial: Trial) -> list[dict]:
    """The trial's learning curves, one per validation set: each evaluation with the train
    loss logged at its step, and whether it ends the run's learning-rate decay."""
    cfg, per_token = trial.cfg, trial.facts()["flops_per_token"]
    train_loss = {r["step"]: r["loss"] for r in rundir.metrics(trial.run_dir) if "event" not in r}
    return [{"step": r["step"], "set": r.get("set", "val"), "tokens": r["tokens"],
             "flops": per_token * r["tokens"], "train_loss": train_loss.get(r["step"]),
             "val_loss": r["loss"], "val_loss_sem": r["loss_sem"], "bpb": r["bpb"],
             "annealed": schedule.annealed(cfg.optim, cfg.train.steps, r["step"])}
            for r in rundir.evals(trial.run_dir)]


def _clock() -> float:
    """Seconds that go on while the host is suspended (a paused VM: the database's clock goes
    on too), where the system has such a clock."""
    return time.clock_gettime(getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC))


class Lease:
    """A worker's claim on the trial it trains, as far as the worker can know it. Others take
    the trial over once its newest heartbeat is `stale_s` old by the database's clock, and a
    heartbeat's database time is never earlier than its sending: so while the last beat that
    got through was sent less than `stale_s / 2` ago, no one else can hold the trial, and half
    of `stale_s` is left for a step or a save in flight."""

    def __init__(self, stale_s: float):
        self.ttl, self.renewed, self.lost = stale_s / 2, _clock(), False

    def valid(self) -> bool:
        return not self.lost and _clock() - self.renewed < self.ttl


class _Heartbeat(threading.Thread):
    """Tells the store at once and then every `stale_s / BEATS` seconds that this worker still
    trains its trial, and keeps its `lease` up to date: renewed by each beat that gets through,
    lost for good when the store says the trial is another's."""

    def __init__(self, url: str, name: str, worker: str, stale_s: float):
        super().__init__(daemon=True)
        self.url, self.name, self.worker, self.every = url, name, worker, stale_s / BEATS
        self.lease = Lease(stale_s)
        self.stopped = threading.Event()

    def run(self) -> None:
        store = None  # a connection of its own (the main thread's is busy), made afresh after
        while not self.stopped.is_set():  # a failure: a lost beat is no lost trial
            sent = _clock()
            try:
                store = store or Store(self.url)
                if not store.beat(self.name, self.worker):
                    self.lease.lost = True
                    if not self.stopped.is_set():  # not the trial's own end, recorded meanwhile
                        log.warning("sweep: %s was taken over by another worker", self.name)
                    return
                self.lease.renewed = sent
            except Exception as e:  # noqa: BLE001 - either backend's: logged, then again
                log.warning("sweep: a heartbeat of %s failed (%s); trying again", self.name, e)
                store = None
            self.stopped.wait(self.every)

    def stop(self) -> None:
        """No beat after this returns (unless one hangs past a beat's interval)."""
        self.stopped.set()
        self.join(self.every)


@contextlib.contextmanager
def _trial_log(run_dir: Path):
    """lm's log records of the trial into its train.log, as `lm train` would write them."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logging.getLogger("lm").addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger("lm").removeHandler(handler)
        handler.close()


def _train_one(trial: Trial, session, store: Store, worker: str, stale_s: float) -> None:
    """Train `trial` in this process and record how it ended."""
    import jax

    from lm import train

    beat = _Heartbeat(store.url, trial.name, worker, stale_s)
    beat.start()
    session.lease, start = beat.lease, time.time()
    try:
        try:
            with _trial_log(trial.run_dir):
                config_lib.dump(trial.cfg, trial.run_dir / "trial.yaml")  # to rerun it by hand
                log.info("sweep: %s trains %s (%s, %.3g FLOPs) on %d device(s)", worker,
                         trial.name, trial.role, trial.facts()["flops"], jax.device_count())
                train.train(trial.cfg, session=session)
        finally:  # the trial's end goes to the store below, with no beat of it in between
            beat.stop()
            session.lease = None
    except Interrupted:
        store.release(trial.name, worker)
        raise
    except Busy as e:  # someone else holds its run directory: theirs, for now
        store.release(trial.name, worker)
        log.warning("sweep: %s", e)
        time.sleep(stale_s / BEATS)
    except Fenced as e:  # the trial, and what becomes of it, are another worker's now
        log.warning("sweep: %s", e)
    except Exception as e:  # noqa: BLE001 - a trial's failure stays in the trial
        detail = str(e) if isinstance(e, LMError) else traceback.format_exc(limit=4)
        final = store.fail(trial.name, f"{type(e).__name__}: {detail}".strip(),
                           time.time() - start, _spent(session), worker)
        log.warning("sweep: FAILED %s (%s: %s)%s; see %s", trial.name, type(e).__name__,
                    str(e)[:300], {True: "", False: ", to be retried",
                                   None: ", but another worker had taken it over"}[final],
                    trial.run_dir / "train.log")
    else:
        points = _ingest(trial)
        if store.finish(trial.name, points, time.time() - start, _spent(session), worker,
                        _spent_flops(trial)):
            log.info("sweep: finished %s in %.0f s, validation loss %.4f", trial.name,
                     time.time() - start, points[-1]["val_loss"])
        else:
            log.warning("sweep: %s ended after another worker had taken it over; its result "
                        "is that worker's to record", trial.name)


def _spent_flops(trial: Trial) -> float | None:
    """The FLOPs a cooldown branch spent: from the checkpoint it started from, before its
    branch step where its stable run saved none there (`checkpoint.branch_point`); None for
    other trials, which spend what they were planned to."""
    t = trial.cfg.train
    if not t.branch_from:
        return None
    from lm import checkpoint

    start = checkpoint.branch_point(t.branch_from, t.branch_step) or 0
    return trial.facts()["flops_per_token"] * trial.cfg.tokens_per_step * (t.steps - start)


def _spent(session) -> dict:
    """The seconds by phase since the last trial ended (the first trial carries the worker's
    start-up), and a fresh count for the next."""
    spent = dict(session.seconds)
    session.seconds.clear()
    return spent


def work(spec_path: str | Path, url: str | None = None, stale_s: float = STALE_S,
         overrides=()) -> None:
    """A worker: claim trials and train them until every trial of the sweep has ended. A
    trial whose worker has not been heard of for `stale_s` is taken over."""
    started = time.perf_counter()
    spec = spec_lib.load_spec(spec_path, overrides)
    trials = {t.name: t for t in spec_lib.plan(spec)}
    store = _open_store(spec, store_url(spec, url), invocation(spec_path, overrides),
                        wait=RECONNECT_S)  # a server restarting: wait for it
    store.sync(spec.name, plan_digest(list(trials.values())), list(trials.values()))
    _compilation_cache()
    import jax

    spec_lib.check_devices(list(trials.values()), jax.device_count())  # before any trains
    from lm import train
    from lm.processes import StopSignals

    for handler in logging.getLogger("lm").handlers:  # the terminal: the sweep, not each step
        handler.addFilter(lambda r: r.name == log.name or r.levelno >= logging.WARNING)
    session, worker = train.Session(), worker_name()
    session.seconds["startup"] = time.perf_counter() - started  # imports, devices, the store
    with StopSignals() as stop:  # a stop between trials, or at a trial's very end, ends it here
        _work(spec, trials, store, session, worker, stale_s, stop)
    if stop.signum is not None:
        raise Interrupted(f"worker {worker} stopped by {signal.Signals(stop.signum).name} "
                          "between trials; the trials it finished are in the store", stop.signum)


def _work(spec: SweepSpec, trials: dict[str, Trial], store: Store, session, worker: str,
          stale_s: float, stop) -> None:
    prepared = set()  # held-out trials compiled ahead, or tried
    while stop.signum is None:
        name = claim(store, worker, trials, session.compiled)
        if name is not None:
            _train_one(trials[name], session, store, worker, stale_s)
            continue
        try:
            if register_when_ready(spec, list(trials.values()), store):
                continue
        except LMError as e:  # nothing else can train: exit 2, which no runner restarts
            raise FitError(f"no prediction registered, so the held-out runs wait: {e}") from None
        store.reclaim(stale_s)
        store.fail_orphans()
        rows = [r for r in store.trials() if r["name"] in trials]
        if all(r["status"] in FINAL for r in rows):
            return
        if waiting := [r["name"] for r in rows if r["status"] == "blocked"
                       and r["name"] not in prepared]:
            prepared.add(waiting[0])
            _prepare(trials[waiting[0]], session)  # then the next look at the store
            continue
        time.sleep(POLL_S)


def _prepare(trial: Trial, session) -> None:
    """Compile a held-out trial's programs while it waits for the registration, which waits
    for fitting trials training elsewhere: its compile then leaves the path from the last
    fitting run to the prediction's check, loaded from the persistent cache by whichever
    worker trains it. A failure here is the trial's, met again when it trains."""
    try:
        session.prepare(trial.cfg)
    except Exception as e:  # noqa: BLE001
        log.info("sweep: %s's programs not compiled ahead (%s: %s)", trial.name,
                 type(e).__name__, e)


def claim(store: Store, worker: str, trials: dict[str, Trial], compiled) -> str | None:
    """The largest pending trial of a shape this worker has compiled (`compiled(cfg)`), else
    of a shape no other worker is training, else the largest: each worker compiles fewer
    shapes. (Two workers that took a size's two seeds at once compiled its programs twice,
    side by side.) Only trials of `trials`: a store keeps those of an edited spec's old plan."""
    from lm.train import compiled_key

    shape = {n: compiled_key(t.cfg) for n, t in trials.items()}
    busy = {shape[r["name"]] for r in store.trials()
            if r["status"] == "running" and r["name"] in shape}
    for among in ([n for n, t in trials.items() if compiled(t.cfg)],
                  [n for n in trials if shape[n] not in busy], list(trials)):
        if (name := store.claim(worker, among)) is not None:
            return name
    return None


def _compilation_cache() -> None:
    """JAX's persistent compilation cache, shared by every process and re-run: a worker that
    meets a shape another compiled before loads it instead."""
    import jax

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir",
                          str(Path("~/.cache/lm/jax").expanduser()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


# --------------------------------------------------------------------------- the runner


def _spawn(spec_path, overrides, url: str, cpu_devices: int | None, stale_s: float
           ) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lm.cli", "sweep", str(spec_path), *overrides, "--worker",
           "--store", url, "--stale-after", str(stale_s)]
    if cpu_devices:
        cmd += ["--cpu-devices", str(cpu_devices)]
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)


def _die_with_parent() -> None:
    """In a worker: SIGTERM (save a checkpoint and stop) if the runner dies, even by SIGKILL,
    so that no orphan keeps training into the sweep."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _supervise(spec_path, overrides, url: str, workers: int, cpu_devices: int | None,
               stale_s: float, names: set[str], store: Store) -> None:
    """Start `workers` worker processes and keep that many alive until every trial has ended.
    A worker that dies (a kill, running out of memory) has its trial put back at once, and
    another takes its place."""
    procs = [_spawn(spec_path, overrides, url, cpu_devices, stale_s) for _ in range(workers)]
    restarts = 0
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(POLL_S)
            for i, p in enumerate(procs):
                if p.poll() is None or p.returncode == 0:
                    continue
                dead = worker_name(p.pid)
                back = store.reclaim(stale_s, dead_workers=[dead])
                refused = p.returncode == ConfigError.exit_code  # bad input: so would the next
                if back or not refused:  # a refusal, the worker said why
                    log.warning("sweep: worker %s ended with exit code %d%s", dead,
                                p.returncode, f"; {', '.join(back)} back in the queue" if back
                                else "")
                if _unfinished(store, names) and not refused and restarts < 2 * workers:
                    restarts += 1
                    procs[i] = _spawn(spec_path, overrides, url, cpu_devices, stale_s)
                else:
                    procs[i].returncode = 0  # let it rest
    finally:  # interrupted: workers save a checkpoint of their trial, then stop
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait()


def _unfinished(store: Store, names: set[str]) -> bool:
    """Whether a trial of `names` has not ended: a worker has work (a trial to train, or a
    prediction to register before held-out runs can)."""
    return any(r["status"] not in FINAL for r in store.trials() if r["name"] in names)


def run(spec_path: str | Path, workers: int = 1, cpu_devices: int | None = None,
        url: str | None = None, stale_s: float = STALE_S, overrides=(),
        retry_failed: bool = False) -> Fit | None:
    """Run (or resume) a sweep with `workers` local workers, then write fit.json,
    prediction.json (registered before the held-out runs train), plots and report.md.
    `retry_failed`: trials that failed for good train again (their cause fixed). Raises
    Incomplete, after the report, where the sweep lacks its fit or a held-out run's score."""
    spec, trials = planned(spec_path, cpu_devices, overrides)
    url_given, url = url, store_url(spec, url)
    names = {t.name for t in trials}
    with exclusive(spec.path):
        store = _open_store(spec, url, invocation(spec_path, overrides, None, cpu_devices))
        _sync_registration(spec, store)  # first: the plan is checked against it
        store.sync(spec.name, plan_digest(trials), trials, replan=True)
        _write_atomic(spec.path / "sweep.yaml", yaml.safe_dump(dataclasses.asdict(spec),
                                                               sort_keys=False))
        if not is_postgres(url):  # SQLite: this runner is the sweep's only one
            store.reclaim(0.0)
        if retry_failed:
            back = store.retry_failed(names)
            log.info("sweep: %s", f"{len(back)} failed trials train again" if back else
                     "no trial had failed")
        if _unfinished(store, names):  # else no worker is started, just the report
            started = time.time()
            peak_flops, peak_name = peak(cpu_devices)
            try:
                _supervise(spec_path, overrides, url, workers, cpu_devices, stale_s, names,
                           store)
            finally:  # interrupted too: where the study's time went counts this run's part
                run = report.Timing(workers, started, time.time(), peak_flops, peak_name)
                if report.ended_in([run], store.trials()):
                    store.add_run(dataclasses.asdict(run))
        fit = _report(spec, trials, store)
    _say_what_is_left(invocation(spec_path, overrides, url_given, cpu_devices), trials, store,
                      fit)
    return fit


def invocation(spec_path, overrides=(), url: str | None = None,
               cpu_devices: int | None = None) -> str:
    """`lm sweep` as the user ran it (spec, overrides, store, devices): hints repeat it, so
    that they act on the same sweep."""
    flags = [*overrides] + (["--store", url] if url else []) + (
        ["--cpu-devices", str(cpu_devices)] if cpu_devices else [])
    return " ".join(["lm sweep", str(spec_path), *flags])


def _say_what_is_left(again: str, trials: list[Trial], store: Store, fit: Fit | None) -> None:
    """After the report: raise Incomplete where the sweep lacks its product (a fit; a held-out
    run's score), saying why and what to do (`again`: the command that ran it); else name the
    trials that failed for good."""
    status = {r["name"]: r["status"] for r in store.trials()}
    failed = [t.name for t in trials if status.get(t.name) == "failed"]
    waiting = "blocked" if fit is None else None  # held-out runs that wait for a fit
    left = [t.name for t in trials if status.get(t.name) not in (*FINAL, waiting)]
    held = [t.name for t in trials if t.role == "holdout"]
    some = (f"{_count(failed)} failed for good ({listed(failed)}); fix the cause (`{again} "
            f"--status` shows each error), then `{again} --retry-failed` trains them again")
    if left:
        raise Incomplete(f"the sweep ended with {_count(left)} not run ({listed(left)}): its "
                         f"workers stopped (see above); run `{again}` again"
                         + ("" if fit else "; the fit of the runs so far failed too"))
    if fit is None:
        unregistered = store.prediction() is None and bool(held)
        raise Incomplete(
            "the fit of the fitting runs failed (the report says why)"
            + (", so no prediction is registered and no held-out run trains" * unregistered)
            + (f"; {some}" if failed else "; change the spec's fit settings or add sizes or "
               "budgets, then run it again"))
    lost = [name for name in held if name in failed]
    if lost:
        raise Incomplete(f"held-out {_count(lost, 'run')} failed ({listed(lost)}): no loss to "
                         f"score the registered prediction against there; {some}")
    if failed:
        print(f"sweep: {some}; the fit and report are without them")


def _count(names: list, noun: str = "trial") -> str:
    return f"{len(names)} {noun}{'s' * (len(names) != 1)}"


def _sync_registration(spec: SweepSpec, store: Store) -> dict | None:
    """The registered prediction in the store and in prediction.json alike, and that
    prediction (None: none yet). A file the store lacks (an earlier lm's store had no
    prediction table; a store rebuilt or new) becomes the store's registered prediction; a
    registration whose file is missing (its writer killed between the two writes) is written
    out."""
    path = spec.path / PREDICTION
    if (registered := store.prediction()) is not None:
        if not path.exists():
            _write_atomic(path, json.dumps(registered, indent=1))
        return registered
    if (read := _registered_file(path)) is None:
        return None
    store.register(*read)
    return read[0]


def _registered_file(path: Path) -> tuple[dict, list[str]] | None:
    """A prediction.json's registration and the held-out runs it holds; None if there is none.
    (An lm of 4f5a8c7-2741309 recorded a failed fit as {made, failed}: it holds none.)"""
    if not path.exists():
        return None
    try:
        body = json.loads(path.read_text())
        return body, [] if "failed" in body else [r["run"] for r in body["runs"]]
    except (ValueError, TypeError, KeyError):
        raise StoreError(f"{path} is damaged (not a registration's JSON: cut short?). It held "
                         "the registered held-out prediction, which cannot be made again after "
                         "the fitting runs; restore it from a backup, or move it away to "
                         "continue without a pre-registered prediction") from None


# --------------------------------------------------------------------------- the report


def _report(spec: SweepSpec, trials: list[Trial], store: Store) -> Fit | None:
    names = {t.name for t in trials}
    rows = store.trials()
    # the time went into every trial, those the spec no longer has too
    timing = report.time_split([report.Timing(**r) for r in store.runs()], rows)
    orphans = sorted(r["name"] for r in rows if r["name"] not in names)
    done_ever = {r["name"] for r in rows if r["status"] == "done"}
    rows = [r for r in rows if r["name"] in names]
    fitting = [t.name for t in trials if t.role == "fit"]
    held = sorted(t.name for t in trials if t.role == "holdout")
    registered = store.prediction()
    points = store.points_of(spec.fit.params, names=names, metric=spec.fit.metric) if any(
        r["status"] == "done" for r in rows) else None
    trained = sorted(set(held) & set(points.run)) if points else []
    fit, error, prior = None, None, None
    if registered and "fit" in registered:
        prior = dataclasses.replace(Fit.from_json(registered["fit"], str(spec.path / PREDICTION)),
                                    n_counted=registered_count(registered, trials))
        same_count = prior.n_counted == spec.fit.params
        # the runs it was registered for, also those an edited spec no longer plans, at N
        # counted as when it was registered, whatever the spec says now
        if ours := sorted({p["run"] for p in registered["runs"]} & done_ever):
            prior = scaling.score(prior, store.points_of(
                prior.n_counted, names=set(ours), metric=spec.fit.metric), ours)
        done, settings = set(points.run) if points else set(), dataclasses.asdict(spec.fit)
        if same_count and registered.get("fitted_runs") == sorted(set(fitting) & done) and \
                registered.get("fit_spec", settings) == settings and set(trained) <= set(ours):
            fit = prior  # nothing changed since (runs, fit settings (older registrations did
            # not record them), held-out runs): a refit would be the same
    if fit is None:
        try:
            fit = _fit(spec, _fitting_points(spec, store, fitting))
        except LMError as e:
            error = str(e)
        if fit and trained:
            fit = scaling.score(fit, points, trained)
    report.write(spec.path, report.Results(
        spec.name, spec.base, fit, error, points, rows, registered, prior, orphans, timing,
        _sensitivity(spec, store, fitting, trained) if fit else None,
        _noise_table(spec, store, fitting),
        _other_law(spec, store, fitting, trained) if fit else None))
    tracked = [n for n in trials[0].cfg.train.trackers if n != "jsonl"]
    if tracked:  # where the trials' metrics went, the sweep's summary goes too
        trackers.write_summary(tracked, spec.path, _summary(prior or fit, timing))
    _print_summary(spec, fit, prior, error, timing)
    return fit


def _summary(fit: Fit | None, timing: dict) -> dict[str, float]:
    """A sweep in scalars: the law's parameters, each held-out run's prediction and error
    (registered, where there is a registration), the wall time and the study MFU."""
    out = {"wall_s": timing["wall_s"], "mfu": timing["mfu"]}
    if fit:
        out.update({f"law/{k}": v for k, v in fit.params.items()})
        for r in fit.scored:
            out[f"{r.run}/predicted"], out[f"{r.run}/actual"] = r.predicted, r.loss
            out[f"{r.run}/are"] = r.are
    return out


def _noise_table(spec: SweepSpec, store: Store, fitting: list[str]) -> list[dict]:
    """Per model size: the spread of its final losses across seeds (pooled, and at each token
    budget), the evaluation's own standard error, and whether the size was left out of the fit
    as too noisy."""
    try:
        points = store.points_of(spec.fit.params, roles=("fit",), names=fitting,
                                 metric=spec.fit.metric)
    except LMError:
        return []
    finals = points.finals()
    sems = store.last_sems(spec.fit.metric)
    noise = noise_by_size(finals)
    noisy = too_noisy(spec, noise)
    budgets = noise_by_budget(finals)
    return [{"params": n, "seed_std": x.sigma, "df": x.df,
             "eval_sem": float(np.median([sems[r] for r in finals.run[finals.params == n]])),
             "left_out": n in noisy,
             "by_budget": [[d, b.sigma] for (m, d), b in budgets.items() if m == n]}
            for n, x in sorted(noise.items())]


def _refit(spec: SweepSpec, store: Store, fitting: list[str], trained: list[str],
           **change) -> dict | None:
    """The law refitted with a fit setting changed (`change`), without bootstrap, and what it
    predicts for the held-out runs: how much the conclusions hang on that choice. None for a
    law of compute, or where the refit fails."""
    if spec.fit.law not in laws.ND_LAWS:
        return None
    other = dataclasses.replace(spec, fit=dataclasses.replace(spec.fit, bootstrap=0, **change))
    try:
        fit = _fit(other, _fitting_points(other, store, fitting))
    except LMError:
        return None
    if trained:
        fit = scaling.score(fit, store.points_of(other.fit.params, metric=spec.fit.metric),
                            trained)
    return {**change, **fit.params,
            "held_out": {r.run: {"predicted": r.predicted, "are": r.are} for r in fit.holdout}}


def _sensitivity(spec: SweepSpec, store: Store, fitting: list[str], trained: list[str]
                 ) -> dict | None:
    """The law refitted with N counted another way (all parameters; the non-embedding ones
    where the spec counts all)."""
    other = "non_embedding" if spec.fit.params == "total" else "total"
    return _refit(spec, store, fitting, trained, params=other)


def _other_law(spec: SweepSpec, store: Store, fitting: list[str], trained: list[str]
               ) -> dict | None:
    """The other law of N and D fitted alike: how far a law's shape alone moves the held-out
    runs' predictions (`backtest.other_law` for `lm fit`)."""
    return _refit(spec, store, fitting, trained, law=laws.other_nd_law(spec.fit.law))


def _print_summary(spec, fit, prior, error, timing) -> None:
    if fit:
        print(scaling.format_fit(fit))
    if error:
        print(f"fit failed: {error}")
    shown = prior or fit
    for r in shown.scored if shown else ():
        interval = f" [{r.interval[0]:.4f}, {r.interval[1]:.4f}]" if r.interval else ""
        print(f"held-out {r.label}: predicted {r.predicted:.4f}{interval} (registered), "
              f"actual {r.loss:.4f}, ARE {r.are:.2%}")
    runs = f" over {timing['runs']} runs" if timing["runs"] > 1 else ""
    print(f"wall {timing['wall_s']:.0f} s{runs}, study MFU {timing['mfu']:.1%}; report: "
          f"{spec.path / 'report.md'}")


# --------------------------------------------------------------------------- plan, status


def plan_text(spec_path: str | Path, cpu_devices: int | None = None, overrides=(),
              url: str | None = None) -> str:
    """The trials, their FLOPs and estimated time, once the plan is checked as the run would
    check it, against the sweep's store too where it has one."""
    spec, trials = planned(spec_path, cpu_devices, overrides)
    again = invocation(spec_path, overrides, None, cpu_devices)
    text = spec_lib.plan_text(spec, trials, *peak(cpu_devices))
    store = _open_store(spec, store_url(spec, url), again, read_only=True)
    if store is not None and store.current:
        # the run takes the store's registration, else the file's (damaged: refused)
        registered = store.prediction()
        if registered is None and (read := _registered_file(spec.path / PREDICTION)):
            registered = read[0]
        store.check_plan(spec.name, trials, registered=registered)
    elif store is not None and store.holds_trials():
        text += (f"\n(not checked against {store.path}: an older lm's store, which the run "
                 "upgrades, then checks)")
    return text


def status(spec_path: str | Path, url: str | None = None, overrides=()) -> list[dict]:
    """Every trial of the sweep: name, role, status, worker, attempts, wall_s, loss."""
    spec = spec_lib.load_spec(spec_path, overrides)
    url = store_url(spec, url)
    if not is_postgres(url) and not Path(url).is_file():
        return []
    store = Store(url, create=False)
    store.check_sweep(spec.name)
    last = store.last_losses(spec.fit.metric)  # the loss the fit takes
    keys = ("name", "role", "status", "worker", "attempts", "wall_s", "flops", "error")
    return [{**{k: r[k] for k in keys}, "loss": last.get(r["name"])} for r in store.trials()]


def status_text(spec_path: str | Path, url: str | None = None, overrides=()) -> str:
    spec = spec_lib.load_spec(spec_path, overrides)
    rows = status(spec_path, url, overrides)
    if not rows and _trained(spec):
        return (f"sweep {spec.name}: its store ({store_url(spec, url)}) holds no trials, but its "
                f"trials have run directories: rebuild it from them with `"
                f"{invocation(spec_path, overrides, url)} --rebuild-store`")
    if not rows:
        return f"sweep {spec.name} has not started (no store at {store_url(spec, url)})"
    counts = {s: sum(r["status"] == s for r in rows)
              for s in ("done", "running", "pending", "blocked", "failed")}
    lines = [f"sweep {spec.name}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
             + " (C: a run's compute, from step 0, in FLOPs)"]
    for r in rows:
        loss = f"{r['loss']:.4f}" if r["loss"] is not None else "-"
        wall = f"{r['wall_s']:.0f}s" if r["wall_s"] else "-"
        lines.append(f"  {r['name']:<34} {r['role']:<8} {r['status']:<8} C={r['flops']:<9.3g} "
                     f"loss {loss:>7}  {wall:>6}  {r['worker'] or ''}")
        if r["status"] == "failed" and r["error"]:
            lines.append("    " + r["error"].strip().splitlines()[-1][:150])
    if counts["failed"]:
        lines.append(f"once what made them fail is fixed, `{invocation(spec_path, overrides, url)} "
                     "--retry-failed` trains the failed trials again")
    return "\n".join(lines)


# --------------------------------------------------------------------------- repair


def _ran_as_planned(trial: Trial) -> bool:
    """Whether the trial's run directory, if it holds a run, holds one of the trial's config."""
    ran = trial.run_dir / "config.yaml"
    try:
        return not ran.is_file() or same_config(yaml.safe_load(ran.read_text()), trial.cfg)
    except (OSError, yaml.YAMLError, TypeError):  # unreadable: not the plan's
        return False


def rebuild_store(spec_path: str | Path, url: str | None = None, overrides=()) -> str:
    """A new store from the trials' run directories: a damaged SQLite one is moved aside (a
    PostgreSQL one cannot be: it is filled only where it holds no trial, its tables dropped or
    lost), every trial whose run finished is recorded done with its evaluations, the others
    pending. It trains nothing, so the trials' devices are not checked."""
    spec = spec_lib.load_spec(spec_path, overrides)
    trials = spec_lib.plan(spec)
    url = store_url(spec, url)
    path = None if is_postgres(url) else Path(url)
    aside = path and path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
    with exclusive(spec.path):
        if otherwise := [t.name for t in trials if not _ran_as_planned(t)]:
            raise ConfigError(
                f"trial {listed(otherwise)} ran with another config than the spec plans now (it "
                f"changed under the sweep), and a rebuild would record it as planned: rebuild "
                f"with the spec it ran with ({spec.path / 'sweep.yaml'}), or use a new `dir`")
        _registered_file(spec.path / PREDICTION)  # damaged: said before anything is moved
        if path is None:
            store = Store(url)
            store.check_sweep(spec.name)
            if store.holds_trials():
                raise StoreError(
                    f"{store.path} holds the trials of sweep {spec.name!r}: --rebuild-store "
                    "fills a PostgreSQL store only where it holds none, as one cannot be set "
                    "aside: drop the sweep's tables first (or give a new database)")
        else:
            if path.exists():
                if n := intact_trials(path, spec.name):
                    raise StoreError(
                        f"{path} is intact (it reads whole and holds sweep {spec.name!r}'s {n} "
                        f"trial{'s' * (n != 1)}): --rebuild-store mends a damaged or lost store, "
                        "and would drop what only the store holds (the time each `lm sweep` "
                        "took, each trial's attempts). To rebuild it anyway, move it away first")
                for suffix in ("", "-journal", "-wal", "-shm"):  # a journal goes with its file
                    if (side := path.with_name(path.name + suffix)).exists():
                        side.rename(aside.with_name(aside.name + suffix))
            store = Store(path)
        _sync_registration(spec, store)
        store.sync(spec.name, plan_digest(trials), trials)
        done = 0
        for t in trials:
            rows = [r for r in rundir.metrics(t.run_dir) if "event" not in r]
            if rows and rows[-1]["step"] == t.cfg.train.steps and rundir.evals(t.run_dir):
                store.finish(t.name, _ingest(t), None)
                done += 1
    kept = f" (the old store kept as {aside.name})" if aside and aside.exists() else ""
    return f"rebuilt {store.path}{kept}: {done} of {len(trials)} trials done, the rest pending"

