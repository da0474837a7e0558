"""Running a sweep: train its trials, fit once, register the held-out prediction *before* the
held-out runs train, train them, and write the report.

    lm sweep SWEEP.yaml [--workers K] [--cpu-devices N]     run (or resume) and report
    lm sweep --plan SWEEP.yaml                                trials, FLOPs, estimated time
    lm sweep --status SWEEP.yaml                              progress

Each trial trains in a subprocess (`lm train`), so a failure or a crash stays in its trial, and
re-running the same command skips finished trials and resumes interrupted ones from their
checkpoints. Nothing here imports JAX.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from lm import config as config_lib, flops, report, rundir, scaling, spec as spec_lib
from lm.errors import ConfigError, FitError
from lm.scaling import Fit
from lm.spec import SweepSpec, Trial
from lm.store import Store

log = logging.getLogger("lm")
PREDICTION = "prediction.json"


def ingest(trial: Trial) -> list[dict]:
    """The trial's learning curve: each evaluation with the train loss logged at its step."""
    per_token = trial.facts()["flops_per_token"]
    train_loss = {r["step"]: r["loss"] for r in rundir.metrics(trial.run_dir) if "event" not in r}
    return [{"step": r["step"], "tokens": r["tokens"], "flops": per_token * r["tokens"],
             "train_loss": train_loss.get(r["step"]), "val_loss": r["loss"],
             "val_loss_sem": r["loss_sem"], "bpb": r["bpb"]}
            for r in rundir.evals(trial.run_dir)]


# --------------------------------------------------------------------------- devices


def device_memory(cpu_devices: int | None) -> int:
    """Memory the trials' devices have. Asked of a child process, so that the runner never
    starts JAX's threads (it forks trial processes)."""
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if cpu_devices:
        return host  # simulated devices share the host's memory
    probe = ("import jax; d = jax.devices(); print(d[0].platform, "
             "(d[0].memory_stats() or {}).get('bytes_limit', 0) * len(d))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=300)
    platform, limit = (out.stdout.split() + ["cpu", "0"])[:2]
    return host if platform == "cpu" else int(limit)


def planned(spec_path: str | Path, cpu_devices: int | None) -> tuple[SweepSpec, list[Trial]]:
    """The spec and its trials, checked to fit the devices' memory."""
    spec = spec_lib.load_spec(spec_path)
    trials = spec_lib.plan(spec)
    spec_lib.check_memory(trials, device_memory(cpu_devices))
    return spec, trials


# --------------------------------------------------------------------------- trials


def _die_with_parent() -> None:
    """In the child: get SIGTERM (save a checkpoint and stop) if the runner dies, even by
    SIGKILL, so that no orphan keeps writing into the sweep."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def launch(trial: Trial, cpu_devices: int | None) -> subprocess.Popen:
    trial.run_dir.mkdir(parents=True, exist_ok=True)
    config_lib.dump(trial.cfg, trial.run_dir / "trial.yaml")
    cmd = [sys.executable, "-m", "lm.cli", "train", str(trial.run_dir / "trial.yaml")]
    if cpu_devices:
        cmd += ["--cpu-devices", str(cpu_devices)]
    output = open(trial.run_dir / "train.log", "a")
    return subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL,
                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)


def _tail(path: Path, lines: int = 12) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def execute(trials: list[Trial], store: Store, workers: int = 1,
            cpu_devices: int | None = None) -> None:
    """Train `trials`, `workers` at a time; record each outcome as it ends."""
    queue, running = list(trials), {}
    try:
        while queue or running:
            while queue and len(running) < workers:
                t = queue.pop(0)
                store.set_status(t.name, "running")
                running[t.name] = (t, launch(t, cpu_devices), time.time())
                log.info("sweep: started %s (%s, %.3g FLOPs)", t.name, t.role, t.facts()["flops"])
            time.sleep(0.2)
            for name, (t, proc, start) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                _record(store, t, proc.returncode, time.time() - start)
    finally:  # interrupted: let running trials save a checkpoint, then stop
        for t, proc, _ in running.values():
            proc.send_signal(signal.SIGTERM)
        for t, proc, _ in running.values():
            proc.wait()
            store.set_status(t.name, "pending")


def _record(store: Store, t: Trial, returncode: int, wall: float) -> None:
    if returncode == 0:
        points = ingest(t)
        store.finish(t.name, points, wall)
        log.info("sweep: finished %s in %.0f s, validation loss %.4f", t.name, wall,
                 points[-1]["val_loss"])
    else:
        store.set_status(t.name, "failed", _tail(t.run_dir / "train.log"), wall)
        log.warning("sweep: FAILED %s (exit %d); see %s", t.name, returncode,
                    t.run_dir / "train.log")


@contextlib.contextmanager
def exclusive(sweep_dir: Path):
    """One runner per sweep directory at a time."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / ".runner.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another `lm sweep` is running on {sweep_dir}") from None
        yield


# --------------------------------------------------------------------------- fit, predict


def _fit(store: Store, spec: SweepSpec) -> Fit:
    """The law of the finished fitting runs: the one fit of the sweep."""
    try:
        return scaling.fit(store.points_of(spec.fit.params, roles=("fit",)), spec.fit.law,
                           bootstrap=spec.fit.bootstrap, drop_early=spec.fit.drop_early)
    except ValueError as e:
        raise FitError(f"cannot fit the finished fitting runs of {spec.path}: {e}") from None


def register(fit: Fit, held: list[Trial], spec: SweepSpec) -> dict:
    """The prediction for each held-out run, from the fit alone, and the fit itself."""
    out = {"made": time.strftime("%Y-%m-%d %H:%M:%S"), "law": fit.law, "runs": {},
           "fit": fit.to_json()}
    for t in held:
        facts = t.facts()
        n = facts["params"] if spec.fit.params == "total" else facts["params_non_embedding"]
        if fit.law == "isoflop":
            out["runs"][t.name] = scaling.predict(fit, flops=facts["flops"])
        else:
            out["runs"][t.name] = scaling.predict(fit, params=n, tokens=facts["tokens"])
    return out


def run(spec_path: str | Path, workers: int = 1, cpu_devices: int | None = None) -> Fit:
    """Run (or resume) a sweep, fit, predict the held-out runs before training them, and
    write fit.json, prediction.json, plots and report.md into the sweep directory."""
    spec, trials = planned(spec_path, cpu_devices)
    sweep_dir = spec.path
    with exclusive(sweep_dir):
        (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump(dataclasses.asdict(spec),
                                                             sort_keys=False))
        store = Store(sweep_dir / "store.sqlite")
        store.sync(trials)
        store.reset_running()
        done = {t["name"] for t in store.trials() if t["status"] == "done"}
        todo = [t for t in trials if t.name not in done]
        execute([t for t in todo if t.role == "fit"], store, workers, cpu_devices)
        failed = [t["name"] for t in store.trials() if t["status"] == "failed"]
        if failed:
            log.warning("sweep: %d trial(s) failed: %s; fitting without them", len(failed),
                        failed)
        held = [t for t in trials if t.role == "holdout"]
        registered = _registered(sweep_dir)
        if registered:
            fit = Fit.from_json(registered["fit"], str(sweep_dir / PREDICTION))
        else:
            fit = _fit(store, spec)
            if held:
                registered = register(fit, held, spec)
                (sweep_dir / PREDICTION).write_text(json.dumps(registered, indent=1))
        execute([t for t in todo if t.role == "holdout"], store, workers, cpu_devices)
        points = store.points_of(spec.fit.params)
        trained = sorted({t.name for t in held} & set(points.run))
        fit = scaling.score(fit, points, trained) if trained else fit
        report.write(sweep_dir, spec.name, spec.base, fit, points, store.trials(), registered)
    print(scaling.format_fit(fit))
    for r in fit.holdout:
        print(f"held-out {r.run}: predicted {r.predicted:.4f}"
              f"{report._interval(r.interval)}, actual {r.loss:.4f}, ARE {r.are:.2%}")
    print(f"report: {sweep_dir / 'report.md'}")
    return fit


def _registered(sweep_dir: Path) -> dict | None:
    path = sweep_dir / PREDICTION
    return json.loads(path.read_text()) if path.exists() else None


# --------------------------------------------------------------------------- plan and status


def plan_text(spec_path: str | Path, cpu_devices: int | None = None) -> str:
    spec, trials = planned(spec_path, cpu_devices)
    return spec_lib.plan_text(spec, trials, flops.numpy_matmul_flops_per_s())


def status_text(spec_path: str | Path) -> str:
    spec = spec_lib.load_spec(spec_path)
    path = spec.path / "store.sqlite"
    if not path.is_file():
        return f"sweep {spec.name} has not started ({path} does not exist)"
    store = Store(path)
    rows = store.trials()
    last = store.last_losses()
    counts = {s: sum(r["status"] == s for r in rows)
              for s in ("done", "running", "pending", "failed")}
    lines = [f"sweep {spec.name}: " + ", ".join(f"{n} {s}" for s, n in counts.items())]
    for r in rows:
        loss = f"{last[r['name']]:.4f}" if r["name"] in last else "-"
        wall = f"{r['wall_s']:.0f}s" if r["wall_s"] else "-"
        lines.append(f"  {r['name']:<34} {r['role']:<8} {r['status']:<8} {r['flops']:>10.3g} "
                     f"FLOPs  loss {loss:>7}  {wall:>6}")
        if r["status"] == "failed" and r["error"]:
            lines.append("    " + r["error"].strip().splitlines()[-1][:150])
    return "\n".join(lines)
