"""Sweeps: a YAML spec -> trials (each an ordinary run directory) -> a SQLite store -> a fit, a
prediction for the held-out run made *before* it trains, and a report.

    lm sweep SWEEP.yaml [--workers K] [--cpu-devices N]     run (or resume) and report
    lm sweep --plan SWEEP.yaml                                trials, FLOPs, estimated time
    lm sweep --status SWEEP.yaml                              progress

Each trial trains in a subprocess (`lm train`), so a failure or a crash stays in its trial, and
re-running the same command skips finished trials and resumes interrupted ones from their
checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import yaml

from lm import config as config_lib, flops, scaling
from lm.config import Config, ConfigError


# --------------------------------------------------------------------------- the spec


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How each size trains: the rules that make small runs comparable (Porian et al. 2024)."""

    lr: float = 3e-3
    lr_ref_width: int = 0  # 0: every size uses `lr`; else lr * (lr_ref_width / d_model)^lr_power
    lr_power: float = 1.0
    warmup_tokens_per_param: float = 1.0  # warmup scales with model size: N tokens by default
    min_warmup_steps: int = 5
    max_warmup_fraction: float = 0.25
    eval_points: int = 8  # log-spaced evaluations per trial: its learning curve
    min_steps: int = 20  # shorter budgets are an error, not a silently useless run


@dataclasses.dataclass(frozen=True)
class HoldoutSpec:
    size: dict = dataclasses.field(default_factory=dict)  # empty: no held-out run
    tokens: float = 0.0


@dataclasses.dataclass(frozen=True)
class FitSpec:
    law: Literal["chinchilla", "kaplan", "isoflop"] = "chinchilla"
    drop_early: float = 0.1
    bootstrap: int = 100
    params: Literal["total", "non_embedding"] = "total"


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    name: str = "sweep"
    base: str = "tiny"  # config (preset or file) every trial starts from
    dir: str = ""  # default: runs/sweeps/<name>
    overrides: dict = dataclasses.field(default_factory=dict)  # dotted keys for every trial
    sizes: tuple[dict, ...] = ()  # model shapes, each a dict of dotted overrides
    tokens: tuple[float, ...] = ()  # token budgets: every size trains on each
    isoflop: tuple[float, ...] = ()  # or compute budgets C: sizes around the optimum of each
    isoflop_points: int = 4
    seeds: tuple[int, ...] = (0,)
    recipe: Recipe = Recipe()
    holdout: HoldoutSpec = HoldoutSpec()
    fit: FitSpec = FitSpec()

    @property
    def path(self) -> Path:
        return Path(self.dir or f"runs/sweeps/{self.name}")


def load_spec(path: str | Path) -> SweepSpec:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep spec {path} not found")
    raw = yaml.safe_load(path.read_text()) or {}
    spec = config_lib.build(SweepSpec, raw)
    if not spec.sizes:
        raise ConfigError(f"{path}: `sizes` is empty; list model shapes, e.g. "
                          "[{model.d_model: 64, model.n_layers: 2}]")
    if bool(spec.tokens) == bool(spec.isoflop):
        raise ConfigError(f"{path}: give exactly one of `tokens` (budgets per size) or "
                          "`isoflop` (compute budgets)")
    if spec.fit.law == "isoflop" and not spec.isoflop:
        raise ConfigError(f"{path}: fit.law=isoflop needs `isoflop` compute budgets")
    return spec


# --------------------------------------------------------------------------- trials


@dataclasses.dataclass(frozen=True)
class Trial:
    name: str
    role: Literal["fit", "holdout"]
    cfg: Config

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.train.run_dir)

    def facts(self) -> dict:
        """What a fit needs to know of the trial, from its config alone."""
        m, counts = self.cfg.model, flops.param_counts(self.cfg.model)
        tokens = self.cfg.train.steps * self.cfg.train.batch_size * self.cfg.seq_len
        per_token = flops.train_flops_per_token(m, self.cfg.seq_len)
        return {"params": counts["total"], "params_non_embedding": counts["non_embedding"],
                "tokens": tokens, "flops_per_token": per_token, "flops": per_token * tokens,
                "flops_6nd": 6 * counts["total"] * tokens}


def _dotted(mapping: dict) -> list[str]:
    return [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}"
            for k, v in mapping.items()]


def _size_config(spec: SweepSpec, size: dict) -> Config:
    return config_lib.load(spec.base, _dotted(spec.overrides) + _dotted(size))


def _name(cfg: Config, tokens: int, seed: int) -> str:
    m = cfg.model
    return f"d{m.d_model}-l{m.n_layers}-h{m.n_heads}-t{tokens:.3g}-s{seed}".replace("+", "")


def _trial(spec: SweepSpec, size: dict, tokens: float, seed: int, role: str) -> Trial:
    """One run of `size` on about `tokens` tokens, with the recipe's per-size LR and warmup."""
    base, r = _size_config(spec, size), spec.recipe
    per_step = base.train.batch_size * base.seq_len
    steps = round(tokens / per_step)
    if steps < r.min_steps:
        raise ConfigError(
            f"a budget of {tokens:.3g} tokens is {steps} steps of {per_step} tokens for size "
            f"{size}; recipe.min_steps={r.min_steps}: raise the budget or lower train.batch_size")
    n = flops.param_counts(base.model)["total"]
    warmup = round(r.warmup_tokens_per_param * n / per_step)
    warmup = min(max(warmup, r.min_warmup_steps), int(r.max_warmup_fraction * steps))
    lr = r.lr * (r.lr_ref_width / base.model.d_model) ** r.lr_power if r.lr_ref_width else r.lr
    name = _name(base, steps * per_step, seed)
    settings = {"train.steps": steps, "train.seed": seed, "optim.warmup_steps": warmup,
                "train.run_dir": str(spec.path / "trials" / name), "train.progress": False,
                "eval.log_points": r.eval_points,
                "checkpoint.every_steps": max(steps // 4, 1)}  # resumable, not too chatty
    if "optim.lr" not in size:  # a size may state its own tuned LR
        settings["optim.lr"] = lr
    cfg = config_lib.load(spec.base, _dotted(spec.overrides) + _dotted(size) + _dotted(settings))
    return Trial(name, role, cfg)


def _isoflop_sizes(spec: SweepSpec, budget: float) -> list[tuple[dict, float]]:
    """`isoflop_points` sizes around the expected optimum of `budget` (D = 20 N, Chinchilla's
    rule of thumb), each with the tokens that spend the budget exactly."""
    cfgs = [(size, _size_config(spec, size)) for size in spec.sizes]
    cfgs.sort(key=lambda sc: flops.param_counts(sc[1].model)["total"])
    guess = math.sqrt(budget / (6 * 20))
    logs = [abs(math.log(flops.param_counts(c.model)["total"] / guess)) for _, c in cfgs]
    k = min(spec.isoflop_points, len(cfgs))
    centre = min(range(len(cfgs)), key=logs.__getitem__)
    lo = min(max(centre - k // 2, 0), len(cfgs) - k)
    return [(size, budget / flops.train_flops_per_token(c.model, c.seq_len))
            for size, c in cfgs[lo:lo + k]]


def plan(spec: SweepSpec) -> list[Trial]:
    """Every trial of the sweep: the fitting grid, then the held-out run(s)."""
    grid = ([(size, tokens) for size in spec.sizes for tokens in spec.tokens] if spec.tokens
            else [pair for budget in spec.isoflop for pair in _isoflop_sizes(spec, budget)])
    trials = [_trial(spec, size, tokens, seed, "fit") for size, tokens in grid
              for seed in spec.seeds]
    if spec.holdout.size:
        trials.append(_trial(spec, spec.holdout.size, spec.holdout.tokens, spec.seeds[0],
                             "holdout"))
        largest = max(t.facts()["flops"] for t in trials if t.role == "fit")
        if trials[-1].facts()["flops"] <= largest:
            raise ConfigError(
                f"the held-out run ({trials[-1].facts()['flops']:.3g} FLOPs) must use more "
                f"compute than the largest fitting run ({largest:.3g}); raise holdout.tokens "
                "or holdout.size")
    names = [t.name for t in trials]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"the sweep repeats trials {duplicates}: sizes and budgets must differ")
    try:
        scaling.check_design(planned_points([t for t in trials if t.role == "fit"], spec),
                             spec.fit.law, spec.fit.drop_early)
    except ValueError as e:
        raise ConfigError(f"the sweep as planned cannot be fitted: {e}; add sizes or budgets")
    return trials


def planned_points(trials: list[Trial], spec: SweepSpec) -> scaling.Points:
    """The evaluations the trials will make, with a placeholder loss: what a fit will see."""
    from lm.train import eval_steps  # imports JAX, but starts no backend: forking stays safe

    rows = []
    for t in trials:
        facts, per_step = t.facts(), t.cfg.train.batch_size * t.cfg.seq_len
        params = facts["params"] if spec.fit.params == "total" else facts["params_non_embedding"]
        for step in sorted(eval_steps(t.cfg) or {t.cfg.train.steps}):
            rows.append({"params": params, "tokens": step * per_step, "loss": 1.0, "run": t.name,
                         "flops": step * per_step * facts["flops_per_token"], "step": step})
    return scaling.Points.from_rows(rows)


def memory_bytes(cfg: Config) -> int:
    """Rough peak training memory: fp32 parameters, gradients and two Adam moments, plus
    activations kept for the backward pass (about 34·d bytes per token and layer, Korthikanti
    et al. 2022, and the attention scores) and the logits."""
    m = cfg.model
    tokens = cfg.train.batch_size // cfg.train.micro_batches * cfg.seq_len
    layer = tokens * (34 * m.d_model + 5 * m.n_heads * cfg.seq_len)
    remat = {"none": 1.0, "dots": 0.5, "full": 0.1}[m.remat]
    logits = 4 * tokens * m.vocab_size * (1 if m.loss_chunk else 3)
    return int(16 * flops.param_counts(m)["total"] + remat * m.n_layers * layer + logits)


def available_bytes(cpu_devices: int | None) -> int:
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


def check_memory(trials: list[Trial], cpu_devices: int | None = None) -> None:
    limit = available_bytes(cpu_devices)
    for t in trials:
        need = memory_bytes(t.cfg)
        if limit and need > 0.8 * limit:
            raise ConfigError(
                f"trial {t.name} needs about {need / 2**30:.1f} GiB but the devices have "
                f"{limit / 2**30:.1f} GiB; lower train.batch_size, raise train.micro_batches "
                "or set model.remat")


# --------------------------------------------------------------------------- the store


SCHEMA = """
CREATE TABLE IF NOT EXISTS trials (
    name TEXT PRIMARY KEY, role TEXT NOT NULL, config TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending', error TEXT,
    params INTEGER, params_non_embedding INTEGER, tokens INTEGER, flops_per_token REAL,
    flops REAL, flops_6nd REAL, wall_s REAL, updated REAL);
CREATE TABLE IF NOT EXISTS points (
    trial TEXT NOT NULL REFERENCES trials(name), step INTEGER NOT NULL, tokens INTEGER,
    flops REAL, train_loss REAL, val_loss REAL, val_loss_sem REAL, bpb REAL,
    PRIMARY KEY (trial, step));
"""


class Store:
    """The sweep's SQLite database: every trial with its facts and status, every evaluation.
    Each write is one transaction, so a killed runner leaves it consistent."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.db = sqlite3.connect(self.path, timeout=60)
        self.db.row_factory = sqlite3.Row
        with self.db:
            self.db.executescript(SCHEMA)

    def sync(self, trials: list[Trial]) -> None:
        """Record new trials; refuse a trial whose config changed under the same name."""
        with self.db:
            for t in trials:
                config = json.dumps(config_lib.to_dict(t.cfg), sort_keys=True)
                old = self.db.execute("SELECT config FROM trials WHERE name=?",
                                      (t.name,)).fetchone()
                if old is None:
                    self.db.execute(
                        "INSERT INTO trials (name, role, config, params, params_non_embedding, "
                        "tokens, flops_per_token, flops, flops_6nd, updated) VALUES "
                        "(:name, :role, :config, :params, :params_non_embedding, :tokens, "
                        ":flops_per_token, :flops, :flops_6nd, :updated)",
                        {"name": t.name, "role": t.role, "config": config,
                         "updated": time.time(), **t.facts()})
                elif not _same_config(old["config"], t.cfg):
                    raise ConfigError(
                        f"trial {t.name} in {self.path} was planned with another config; the "
                        "spec changed under an existing sweep: use a new `dir` (or name)")

    def set_status(self, name: str, status: str, error: str | None = None,
                   wall_s: float | None = None) -> None:
        with self.db:
            self.db.execute("UPDATE trials SET status=?, error=?, wall_s=COALESCE(?, wall_s), "
                            "updated=? WHERE name=?", (status, error, wall_s, time.time(), name))

    def finish(self, name: str, points: list[dict], wall_s: float) -> None:
        """A trial's evaluations and its `done` status, in one transaction."""
        with self.db:
            self.db.execute("DELETE FROM points WHERE trial=?", (name,))
            self.db.executemany(
                "INSERT INTO points VALUES (:trial, :step, :tokens, :flops, :train_loss, "
                ":val_loss, :val_loss_sem, :bpb)", [{"trial": name, **p} for p in points])
            self.db.execute("UPDATE trials SET status='done', error=NULL, wall_s=?, updated=? "
                            "WHERE name=?", (wall_s, time.time(), name))

    def reset_running(self) -> None:
        """Trials a dead runner left `running` are pending again (their checkpoints remain)."""
        with self.db:
            self.db.execute("UPDATE trials SET status='pending' WHERE status='running'")

    def trials(self) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT * FROM trials ORDER BY flops, name")]

    def points(self, params: str = "total") -> list[dict]:
        """Every evaluation of every finished trial, as rows for scaling.Points."""
        column = "params" if params == "total" else "params_non_embedding"
        rows = self.db.execute(
            f"SELECT t.name AS run, t.role, t.{column} AS params, p.tokens, p.flops, "
            "p.val_loss AS loss, p.step FROM points p JOIN trials t ON p.trial = t.name "
            "WHERE t.status = 'done' ORDER BY t.name, p.step")
        return [dict(r) for r in rows]


def _same_config(stored: str, cfg: Config) -> bool:
    """Whether a stored trial config is `cfg`, read with today's defaults: a key added to lm
    since the sweep started does not orphan its trials."""
    try:
        return config_lib.from_dict(json.loads(stored)) == cfg
    except ConfigError:  # a key that no longer exists
        return False


def load_points(source: str | Path) -> tuple[scaling.Points, list[str]]:
    """Points from a sweep (directory or store file) or a CSV, and the designated held-out
    runs (a sweep's `holdout` trials; none for a CSV)."""
    source = Path(source)
    store_path = source / "store.sqlite" if source.is_dir() else source
    if store_path.suffix != ".sqlite":
        return scaling.load_csv(source), []
    if not store_path.is_file():
        raise ConfigError(f"{store_path} not found: run the sweep first (lm sweep SWEEP.yaml)")
    rows = Store(store_path).points()
    if not rows:
        raise ConfigError(f"{store_path} holds no finished trials yet")
    held = sorted({r["run"] for r in rows if r["role"] == "holdout"})
    return scaling.Points.from_rows(rows), held


# --------------------------------------------------------------------------- running


def ingest(trial: Trial) -> list[dict]:
    """The trial's learning curve: each evaluation with the train loss logged at its step."""
    from lm.evaluate import EVAL_FILE, read_rows

    per_token = trial.facts()["flops_per_token"]
    train_loss = {r["step"]: r["loss"] for r in read_rows(trial.run_dir / "metrics.jsonl")}
    return [{"step": r["step"], "tokens": r["tokens"], "flops": per_token * r["tokens"],
             "train_loss": train_loss.get(r["step"]), "val_loss": r["loss"],
             "val_loss_sem": r["loss_sem"], "bpb": r["bpb"]}
            for r in read_rows(trial.run_dir / EVAL_FILE)]


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
    log = open(trial.run_dir / "train.log", "a")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
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
                print(f"sweep: started {t.name} ({t.role}, {t.facts()['flops']:.3g} FLOPs)",
                      flush=True)
            time.sleep(0.2)
            for name, (t, proc, start) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                wall = time.time() - start
                if proc.returncode == 0:
                    points = ingest(t)
                    store.finish(name, points, wall)
                    print(f"sweep: finished {name} in {wall:.0f} s, validation loss "
                          f"{points[-1]['val_loss']:.4f}", flush=True)
                else:
                    store.set_status(name, "failed", _tail(t.run_dir / "train.log"), wall)
                    print(f"sweep: FAILED {name} (exit {proc.returncode}); see "
                          f"{t.run_dir / 'train.log'}", flush=True)
    finally:  # interrupted: let running trials save a checkpoint, then stop
        for t, proc, _ in running.values():
            proc.send_signal(signal.SIGTERM)
        for t, proc, _ in running.values():
            proc.wait()
            store.set_status(t.name, "pending")


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


def points_of(store: Store, spec: SweepSpec, roles=("fit", "holdout")) -> scaling.Points:
    rows = [r for r in store.points(spec.fit.params) if r["role"] in roles]
    if not rows:
        raise ConfigError(f"no finished {'/'.join(roles)} trials in {store.path} to fit")
    return scaling.Points.from_rows(rows)


def run(spec_path: str | Path, workers: int = 1, cpu_devices: int | None = None) -> dict:
    """Run (or resume) a sweep, fit, predict the held-out runs before training them, and
    write fit.json, prediction.json, plots and report.md into the sweep directory."""
    from lm import report

    spec = load_spec(spec_path)
    trials = plan(spec)
    check_memory(trials, cpu_devices)
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
            print(f"sweep: {len(failed)} trial(s) failed: {failed}; fitting without them",
                  file=sys.stderr)
        held = [t for t in trials if t.role == "holdout"]
        prediction_path = sweep_dir / "prediction.json"
        if held and not prediction_path.exists():
            try:
                fit = scaling.fit(points_of(store, spec, roles=("fit",)), spec.fit.law,
                                  bootstrap=spec.fit.bootstrap, drop_early=spec.fit.drop_early)
            except ValueError as e:
                raise ConfigError(f"cannot fit the finished fitting runs of {sweep_dir}: {e}")
            prediction_path.write_text(json.dumps(predict_held(fit, held, spec), indent=1))
        execute([t for t in todo if t.role == "holdout"], store, workers, cpu_devices)
        try:
            return report.write(sweep_dir, spec, store, [t.name for t in held])
        except ValueError as e:
            raise ConfigError(f"cannot fit the finished runs of {sweep_dir}: {e}")


def predict_held(fit: dict, held: list[Trial], spec: SweepSpec) -> dict:
    """The pre-registered prediction for each held-out run, from the fit alone."""
    out = {"made": time.strftime("%Y-%m-%d %H:%M:%S"), "law": fit["law"], "runs": {}}
    for t in held:
        facts = t.facts()
        n = facts["params"] if spec.fit.params == "total" else facts["params_non_embedding"]
        if fit["law"] == "isoflop":
            out["runs"][t.name] = scaling.predict(fit, flops=facts["flops"])
        else:
            out["runs"][t.name] = scaling.predict(fit, params=n, tokens=facts["tokens"])
    return out


# --------------------------------------------------------------------------- plan and status


def print_plan(spec_path: str | Path, cpu_devices: int | None = None) -> None:
    spec = load_spec(spec_path)
    trials = plan(spec)
    check_memory(trials, cpu_devices)
    peak = flops.matmul_flops_per_s(1024)
    mfu, compile_s = 0.25, 15.0  # typical of small models on CPU; compile per trial
    print(f"sweep {spec.name}: {len(trials)} trials into {spec.path} "
          f"(time assumes {mfu:.0%} of a measured {peak / 1e9:.0f} GFLOP/s, "
          f"+{compile_s:.0f} s per trial)")
    print(f"{'trial':<34} {'role':<8} {'params':>10} {'tokens':>10} {'FLOPs':>10} "
          f"{'steps':>6} {'lr':>8} {'~time':>8}")
    total = 0.0
    for t in trials:
        f = t.facts()
        seconds = f["flops"] / (mfu * peak) + compile_s
        total += seconds
        print(f"{t.name:<34} {t.role:<8} {f['params']:>10,} {f['tokens']:>10.3g} "
              f"{f['flops']:>10.3g} {t.cfg.train.steps:>6} {t.cfg.optim.lr:>8.2e} "
              f"{seconds / 60:>7.1f}m")
    print(f"total: {sum(t.facts()['flops'] for t in trials):.3g} FLOPs, about {total / 60:.0f} "
          "minutes on this machine with one worker")


def print_status(spec_path: str | Path) -> None:
    spec = load_spec(spec_path)
    path = spec.path / "store.sqlite"
    if not path.is_file():
        print(f"sweep {spec.name} has not started ({path} does not exist)")
        return
    store = Store(path)
    rows = store.trials()
    last = {}
    for p in store.db.execute("SELECT trial, val_loss FROM points ORDER BY step"):
        last[p["trial"]] = p["val_loss"]
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "running", "pending",
                                                               "failed")}
    print(f"sweep {spec.name}: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    for r in rows:
        loss = f"{last[r['name']]:.4f}" if r["name"] in last else "-"
        wall = f"{r['wall_s']:.0f}s" if r["wall_s"] else "-"
        print(f"  {r['name']:<34} {r['role']:<8} {r['status']:<8} {r['flops']:>10.3g} FLOPs  "
              f"loss {loss:>7}  {wall:>6}")
        if r["status"] == "failed" and r["error"]:
            print("    " + r["error"].strip().splitlines()[-1][:150])
