"""A sweep's store: every trial with its facts and status, and every evaluation it made.

SQLite, one file in the sweep directory; each write is one transaction, so a killed runner
leaves it consistent.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from lm import config as config_lib, scaling
from lm.config import Config
from lm.errors import ConfigError, StoreError
from lm.spec import Trial


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

    def points_of(self, params: str = "total", roles=("fit", "holdout")) -> scaling.Points:
        """The points of the finished trials of `roles`."""
        rows = [r for r in self.points(params) if r["role"] in roles]
        if not rows:
            raise StoreError(f"no finished {'/'.join(roles)} trials in {self.path} to fit")
        return scaling.Points.from_rows(rows)

    def last_losses(self) -> dict[str, float]:
        """Each trial's latest validation loss."""
        rows = self.db.execute("SELECT trial, val_loss FROM points ORDER BY step")
        return {r["trial"]: r["val_loss"] for r in rows}


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
        raise StoreError(f"{store_path} not found: run the sweep first (lm sweep SWEEP.yaml)")
    rows = Store(store_path).points()
    if not rows:
        raise StoreError(f"{store_path} holds no finished trials yet")
    held = sorted({r["run"] for r in rows if r["role"] == "holdout"})
    return scaling.Points.from_rows(rows), held
