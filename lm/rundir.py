"""A run directory: the one module that knows its files.

    config.yaml     the resolved config (written once every check has passed: it marks the
                    directory as a run's)
    metrics.jsonl   one JSON row per logged step, and `event` rows (loss-spike rollbacks)
    eval.jsonl      one JSON row per evaluation
    checkpoints/    orbax checkpoints, one directory per step
    events.out.tfevents.*, wandb/   the same rows for TensorBoard and W&B (train.trackers)
    plugins/profile/  jax.profiler traces (train.profile), where TensorBoard looks for them
    .lock           held by the process that trains or evaluates the run, with its name

Everything a fit needs is in these files. Also here: the steps at which a run evaluates and
saves, as plain functions of its config, so that a sweep can plan them without running it.
Nothing here imports JAX.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

import numpy as np
import yaml

from lm import config as config_lib
from lm.config import Config
from lm.errors import Busy, CheckpointError, ConfigError, DataError

CONFIG, METRICS, EVALS, CHECKPOINTS, LOCK, DATA = (
    "config.yaml", "metrics.jsonl", "eval.jsonl", "checkpoints", ".lock", "data.json")
RUN_FILES = (METRICS, EVALS, CHECKPOINTS)  # besides config.yaml
SWEEP_FILES = ("store.sqlite", "prediction.json")  # a sweep directory's, which no run shares

log = logging.getLogger("lm")


def checkpoints(run_dir: str | Path) -> Path:
    return Path(run_dir).expanduser().resolve() / CHECKPOINTS


def _is_run_config(path: Path) -> bool:
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    sections = {f.name for f in dataclasses.fields(Config)}
    return isinstance(raw, dict) and "train" in raw and set(raw) <= sections


def checked(run_dir: str) -> Path:
    """`train.run_dir`, resolved, once checked to be new or a run's. Training rewrites a run's
    config.yaml, trims its metrics.jsonl and eval.jsonl to the resumed step and deletes old
    checkpoints, so it refuses a directory holding such files that a run did not write (a run
    writes config.yaml first). Other files, e.g. a sweep's, are left alone."""
    path = Path(run_dir).expanduser().resolve()
    if path in (Path("/"), Path.home().resolve()):
        raise ConfigError(f"train.run_dir={run_dir} is {path}: a run writes, rewinds and deletes "
                          "files in its directory; give it a directory of its own, e.g. "
                          "runs/NAME")
    blocked = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise ConfigError(f"train.run_dir={run_dir}: {blocked} is a file, not a directory")
    if sweep := next((n for n in SWEEP_FILES if (path / n).exists()), None):
        raise ConfigError(f"train.run_dir={run_dir} is a sweep's directory (it holds {sweep}); "
                          "give the run a directory of its own")
    config_file = path / CONFIG
    if config_file.exists() and not _is_run_config(config_file):
        raise ConfigError(f"train.run_dir={run_dir}: {config_file} is not the config of an lm "
                          "run, and training would overwrite it; choose another train.run_dir")
    found = [name for name in RUN_FILES if (path / name).exists()]
    if found and not config_file.exists():
        raise ConfigError(f"train.run_dir={run_dir}: {path} holds {', '.join(found)} but no "
                          "config.yaml, so no lm run wrote them, and training would rewrite "
                          "them; choose another train.run_dir")
    return path


@contextlib.contextmanager
def locked(run_dir: Path):
    """Hold the run directory for as long as the block runs, so that no second process trains
    or evaluates it at the same time. The OS releases the lock however the process ends, kill
    -9 included; a second process gets an error naming the holder."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"train.run_dir={run_dir} cannot be created ({e.strerror}); give a "
                          "directory where this user can write") from None
    try:
        lock = open(run_dir / LOCK, "a+")
    except OSError as e:  # a read-only copy: sampling and exporting need no lock
        raise ConfigError(f"{run_dir}: cannot take its lock ({e.strerror}); training and "
                          "evaluating write into the run directory: copy it where this user "
                          "can write") from None
    with lock as f:
        if who := _taken_by(f, fcntl.LOCK_EX):
            raise Busy(f"{run_dir} is in use by {who}; wait for it to end or stop it, or use "
                       "another train.run_dir")
        f.seek(0)
        f.truncate()
        f.write(f"lm (pid {os.getpid()} on {socket.gethostname()}, since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        f.flush()
        yield


def holder(run_dir: Path) -> str | None:
    """Who holds `run_dir` (a process training or evaluating it), or None; the lock file is
    only read."""
    try:
        f = open(run_dir / LOCK)
    except OSError:  # never locked, or not readable: nobody can be told to wait
        return None
    with f:
        return _taken_by(f, fcntl.LOCK_SH)


def _taken_by(f, mode: int) -> str | None:
    """Take the lock on the open lock file `f` in `mode` without waiting; where another
    process holds it, who that is (as its lock file names it) instead."""
    try:
        fcntl.flock(f, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        return f.read().strip() or "another process"
    return None


def write_config(run_dir: Path, cfg: Config) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    config_lib.dump(cfg, run_dir / CONFIG)


def bind_data(run_dir: Path, identity: dict, *, training: bool, writes: bool = True) -> None:
    """Hold a run to the data it was trained on (`corpus.identity`). Training records it on
    the first start and must meet the same tokenizer and training streams on every resume;
    evaluating, sampling and exporting must meet the same tokenizer (synthetic tokens have
    none: text for a synthetic run, or synthetic for a text run, is refused too). A changed
    corpus (files added or edited) or another machine's default corpus would otherwise
    prepare a new tokenizer, silently, under the old embeddings. Runs of older lm versions
    have no record: training makes one, the others take the run on trust."""
    path = run_dir / DATA
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        recorded = None
    if recorded is not None:
        keys = ("tokenizer_sha256", "train_tokens") if training else ("tokenizer_sha256",)
        changed = [k for k in keys if recorded.get(k) != identity[k]]
        if changed:
            raise DataError(
                f"{run_dir} was trained on other data than data.source prepares now "
                f"({', '.join(changed)} differ; it used {recorded.get('dataset')}, now "
                f"{identity['dataset']}): the source's files changed, or this machine's differ. "
                "Point data.source (or data.cache_dir) at the data the run used, or train a "
                "new run")
    elif training and writes:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(identity, indent=1))
        tmp.replace(path)


# What a trained run's parameters mean: its architecture and the tokenizer of its embeddings.
ARCHITECTURE = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "mlp",
                "tie_embeddings", "qk_norm", "parametrization", "base_width", "rope_theta",
                "norm_eps")


def _as_trained(cfg: Config) -> dict:
    return {**{f"model.{k}": getattr(cfg.model, k) for k in ARCHITECTURE},
            "data.vocab_size": cfg.vocab_size, "data.tokenizer": cfg.data.tokenizer,
            "data.tokenizer_sample_bytes": cfg.data.tokenizer_sample_bytes}


def load_config(run_dir: str | Path, overrides=()) -> Config:
    """A trained run's config, with `overrides` of how to use it (mesh, evaluation, data to
    read). An override of what it was trained as is refused before anything is prepared: it
    would restore the parameters into another model, or train another tokenizer for its
    embeddings and then blame the data."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise CheckpointError(
            f"{run_dir} is not a run directory (no config.yaml); give the train.run_dir of a run")
    cfg = config_lib.load(path, list(overrides))
    now = _as_trained(cfg)
    try:
        was = _as_trained(config_lib.load(path))
    except ConfigError:  # an older lm's config that today's refuses: the overrides mend it,
        # but the model it stored stays as it is written
        stored = config_lib.read_yaml(path).get("model") or {}
        was = {**now, **{f"model.{k}": v for k, v in stored.items() if k in ARCHITECTURE}}
    if changed := [k for k in was if now[k] != was[k]]:
        raise ConfigError(
            f"{run_dir} was trained with {', '.join(f'{k}={was[k]}' for k in changed)}, and "
            f"its checkpoints hold that model: drop the override{'s' * (len(changed) > 1)} "
            f"({', '.join(f'{k}={now[k]}' for k in changed)}). To evaluate on other text, "
            "give data.val_source or data.val_sets")
    return cfg


def read_rows(path: Path) -> list[dict]:
    """The JSON rows of a .jsonl file ([] if there is none). A partial last line, left by a
    process killed while writing it, is dropped with a warning; a bad line before it is an
    error."""
    if not path.is_file():
        return []
    lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    rows = []
    for n, line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            if n != lines[-1][0]:
                raise DataError(f"{path}, line {n}: not a JSON row ({line[:80]!r}); the file "
                                "was edited or damaged: remove that line") from None
            log.warning("%s: dropping its last line, a row cut short (%r)", path, line[:80])
            continue
        rows.append(row)
    return rows


def log_rows(path: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl or eval.jsonl (`read_rows`), each one lm wrote: an
    object with its step."""
    rows = read_rows(path)
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or "step" not in row:
            raise DataError(f"{path}: row {n} is not one lm wrote (no step: {str(row)[:80]!r});"
                            " the file was edited: remove that line")
    return rows


def _drop_partial_line(f) -> None:
    """Cut a row that a killed writer left without its newline, so that the next row starts a
    line of its own (glued to it, both would be lost and the file unreadable past them)."""
    end = f.seek(0, os.SEEK_END)
    start = f.seek(max(end - 65536, 0))  # a row is far shorter
    tail = f.read()
    if tail and not tail.endswith(b"\n"):
        f.truncate(start + tail.rfind(b"\n") + 1)


def metrics(run_dir: str | Path) -> list[dict]:
    return log_rows(Path(run_dir) / METRICS)


def evals(run_dir: str | Path) -> list[dict]:
    return log_rows(Path(run_dir) / EVALS)


class Log:
    """A run's metrics.jsonl and eval.jsonl: one JSON row per line, written by one process
    (`writes`: process 0 of a multi-process run), and rewound with the run. Each of `sinks`
    (`lm.trackers`) gets every row and every rewind too."""

    def __init__(self, run_dir: Path, writes: bool = True, sinks=()):
        self.paths = {"metrics": run_dir / METRICS, "eval": run_dir / EVALS}
        self.writes = writes
        self.sinks = sinks

    def rewind(self, through: int, skipped) -> None:
        """Keep what a run resumed from the checkpoint of step `through`, with `skipped`, would
        not write again: the rows of the steps until then, and the events of its rollbacks."""

        def kept(row):
            return tuple(row["skipped"]) in skipped if "event" in row else row["step"] <= through

        if self.writes:
            for path in self.paths.values():
                rows = [r for r in log_rows(path) if kept(r)]
                tmp = path.with_suffix(".tmp")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
                tmp.replace(path)
            for sink in self.sinks:
                sink.rewind(through)

    def append(self, name: str, row: dict) -> None:
        if self.writes:
            with open(self.paths[name], "a+b") as f:
                _drop_partial_line(f)
                f.write((json.dumps(row) + "\n").encode())
            for sink in self.sinks:
                sink.append(name, row)

    def last_metrics(self) -> dict:
        return (log_rows(self.paths["metrics"]) or [{}])[-1]


# --------------------------------------------------------------------------- schedules


def eval_steps(cfg: Config) -> set[int]:
    """Steps at which a run evaluates: every `eval.every_steps`, `eval.log_points` log-spaced
    steps (a learning curve), and the last step whenever either is on."""
    e, steps = cfg.eval, cfg.train.steps
    out = set(range(e.every_steps, steps + 1, e.every_steps)) if e.every_steps else set()
    if e.log_points:  # from the last step down, so that one point is the last step
        first = max(1, steps // 32)
        out |= {int(round(s)) for s in np.geomspace(steps, first, e.log_points)}
    return out | {steps} if e.every_steps or e.log_points else out


def save_steps(cfg: Config) -> set[int]:
    """Steps at which a run saves a checkpoint: every `checkpoint.every_steps`, those of
    `checkpoint.steps`, and the last."""
    every, steps = cfg.checkpoint.every_steps, cfg.train.steps
    regular = set(range(every, steps, every)) if every else set()
    return regular | set(cfg.checkpoint.steps) | {steps}
