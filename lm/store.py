"""A sweep's store: every trial with its facts, status and owner, every evaluation it made, and
the registered prediction.

Two backends behind one class: a SQLite file in the sweep directory (the default, one machine)
and PostgreSQL (`postgresql://...`, psycopg 3), which workers on many machines share. Workers
claim trials atomically (`FOR UPDATE SKIP LOCKED` on PostgreSQL, an immediate transaction on
SQLite), send heartbeats while they train, and a trial whose worker stopped beating goes back
to the queue. Each write is one transaction, so a killed process leaves the store consistent,
and an operation whose PostgreSQL connection breaks runs again on a new one.

The schema is versioned; a store an older lm wrote is upgraded in place, never dropped.
Nothing here imports JAX.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
import socket
import sqlite3
import time
from collections.abc import Collection
from pathlib import Path

import numpy as np

from lm import config as config_lib
from lm.config import Config
from lm.errors import ConfigError, FitError, StoreError, listed
from lm.points import Points, load_csv
from lm.spec import Trial

log = logging.getLogger("lm.store")
VERSION = 2
SCHEMA_LOCK = 0x6C6D  # PostgreSQL advisory lock key ("lm") held while the schema changes
SQLITE = "store.sqlite"
FINAL = ("done", "failed")  # a failed trial is final once it failed the same way MAX_FAILURES times
MAX_FAILURES = 3
RECONNECT_S = 60.0  # how long an operation waits for a lost PostgreSQL server to come back
# libpq's connection settings, where the URL does not give them: a network that goes silent is
# a lost connection within ~30 s, not the kernel's ~15 minutes of retransmissions (TCP only).
TCP = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
       "keepalives_count": 3, "tcp_user_timeout": 30_000}

POINTS = """CREATE TABLE IF NOT EXISTS points (
    trial TEXT NOT NULL REFERENCES trials(name), step INTEGER NOT NULL,
    "set" TEXT NOT NULL DEFAULT 'val', tokens BIGINT, flops DOUBLE PRECISION,
    train_loss DOUBLE PRECISION, val_loss DOUBLE PRECISION, val_loss_sem DOUBLE PRECISION,
    bpb DOUBLE PRECISION, annealed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (trial, step, "set"))"""
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS sweep (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS trials (
    name TEXT PRIMARY KEY, role TEXT NOT NULL, config TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending', error TEXT,
    params BIGINT, params_non_embedding BIGINT, tokens BIGINT, flops_per_token DOUBLE PRECISION,
    flops DOUBLE PRECISION, flops_6nd DOUBLE PRECISION, wall_s DOUBLE PRECISION,
    updated DOUBLE PRECISION);
{POINTS};
CREATE TABLE IF NOT EXISTS prediction (
    id INTEGER PRIMARY KEY, made DOUBLE PRECISION NOT NULL, body TEXT NOT NULL);
"""
# Version 1 (the first runner's) had no `sweep` or `prediction` table, and `trials` and
# `points` without the columns below.
V2_COLUMNS = {  # added to `trials` by the upgrade from version 1
    "worker": "TEXT", "attempts": "INTEGER NOT NULL DEFAULT 0",
    "failures": "INTEGER NOT NULL DEFAULT 0", "heartbeat": "DOUBLE PRECISION",
    "timings": "TEXT", "parent": "TEXT", "spent_flops": "DOUBLE PRECISION"}
# A version-1 `points` table lacks the validation set (named sets came later) and whether a
# point ends a learning-rate decay; it is copied into the version-2 table.
V1_POINTS = ("trial", "step", "tokens", "flops", "train_loss", "val_loss", "val_loss_sem", "bpb")


# Take the largest pending trial (`{among}`: of some names) whose parent (the stable run a
# cooldown branch starts from), if any, is done; `{lock}` is the backend's row lock. Heartbeats
# are stamped and judged by the database's clock (`{now}`): workers' clocks may disagree.
CLAIM = ("UPDATE trials SET status='running', worker=?, attempts=attempts+1, heartbeat={now}, "
         "updated=? WHERE name = (SELECT name FROM trials WHERE status='pending'{among} AND "
         "(parent IS NULL OR parent IN (SELECT name FROM trials WHERE status='done')) ORDER BY "
         "COALESCE(spent_flops, flops) DESC, name LIMIT 1{lock}) RETURNING name")


def worker_name(pid: int | None = None) -> str:
    """How the store names a worker: its host and process id."""
    return f"{socket.gethostname()}:{pid or os.getpid()}"


# --------------------------------------------------------------------------- backends


class _SQLite:
    def __init__(self, path: Path):
        self.where = str(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.con = sqlite3.connect(path, timeout=60, isolation_level=None)  # autocommit
            self.con.row_factory = sqlite3.Row
            self.con.execute("PRAGMA foreign_keys = ON")
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"{path}: cannot open the store ({e})") from None

    @contextlib.contextmanager
    def transaction(self):
        """One transaction that takes the write lock at once: claims never race."""
        self.con.execute("BEGIN IMMEDIATE")
        try:
            yield self
            self.con.execute("COMMIT")
        except BaseException:
            self.con.execute("ROLLBACK")
            raise

    def execute(self, sql: str, params=()):
        return self.con.execute(sql, params)

    def executescript(self, sql: str) -> None:
        self.con.executescript(sql)

    def columns(self, table: str) -> set[str]:
        return {r["name"] for r in self.con.execute(f"PRAGMA table_info({table})")}

    def lost(self, error: Exception) -> bool:
        """A local file has no connection to lose."""
        return False

    def lock_schema(self) -> None:
        """Nothing to do: SQLite's write lock already serialises schema changes."""

    lock = ""  # one writer at a time: the transaction is the lock
    now = "((julianday('now') - 2440587.5) * 86400.0)"  # Unix seconds


class _Postgres:
    def __init__(self, url: str, wait: float = 0.0):
        self.url, self.where = url, re.sub(r"//[^@/]*@", "//", url)  # no password in messages
        try:
            import psycopg
        except ImportError:
            raise StoreError("--store postgresql://... needs psycopg 3: pip install "
                             "'psycopg[binary]'") from None
        self.psycopg = psycopg
        try:
            self.con = self._connect()
        except psycopg.Error as e:
            if not wait:
                raise StoreError(f"cannot reach the store {self.where}: {_first_line(e)}; check "
                                 "the host, port, user, password and database of the URL") from None
            log.warning("cannot reach the store %s yet (%s); trying for %.0f s", self.where,
                        _first_line(e), wait)
            self.reconnect(time.monotonic() + wait, f"cannot reach the store within {wait:.0f} s",
                           _first_line(e))

    def _connect(self):
        from psycopg.conninfo import conninfo_to_dict
        from psycopg.rows import dict_row

        given = conninfo_to_dict(self.url)  # the URL's own settings win
        return self.psycopg.connect(self.url, autocommit=True, row_factory=dict_row,
                                    **{k: v for k, v in TCP.items() if k not in given})

    def lost(self, error: Exception) -> bool:
        """Whether `error` came with the connection's end (the server restarted, the network
        failed, an administrator or a timeout ended the session): a new one may carry on."""
        return isinstance(error, self.psycopg.Error) and self.con.broken

    def reconnect(self, deadline: float, failure: str, cause: str = "") -> None:
        """A new connection, tried again and again until `deadline` (time.monotonic())."""
        wait = 0.5
        while time.monotonic() < deadline:
            try:
                self.con = self._connect()
                return
            except self.psycopg.Error as e:
                cause = _first_line(e)
            time.sleep(min(wait, max(deadline - time.monotonic(), 0.0)))
            wait = min(2 * wait, 5.0)
        raise StoreError(f"{failure} ({self.where}: {cause}); what was committed is kept there: "
                         "run the sweep again once the server is back")

    @contextlib.contextmanager
    def transaction(self):
        with self.con.transaction():
            yield self

    def execute(self, sql: str, params=()):
        return self.con.execute(sql.replace("?", "%s"), params)

    def executescript(self, sql: str) -> None:
        with self.con.transaction():
            self.lock_schema()
            for statement in filter(str.strip, sql.split(";")):
                self.con.execute(statement)

    def columns(self, table: str) -> set[str]:
        rows = self.con.execute("SELECT column_name FROM information_schema.columns WHERE "
                                "table_name = %s AND table_schema = current_schema()", (table,))
        return {r["column_name"] for r in rows}

    def lock_schema(self) -> None:
        """Serialise schema changes until this transaction ends: workers started at once on an
        empty database would otherwise create or alter the same tables side by side."""
        self.con.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))

    lock = " FOR UPDATE SKIP LOCKED"  # workers on many machines pass over each other's row
    now = "EXTRACT(EPOCH FROM clock_timestamp())"


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def is_postgres(url: str) -> bool:
    """Whether `url` names a PostgreSQL store; else it is a SQLite file's path (refused if it
    is a URL of another scheme, which a path would mangle into a file name)."""
    if url.startswith(("postgresql://", "postgres://")):
        return True
    if "://" in url:
        raise StoreError(f"{url}: not a store URL lm reads; give a SQLite file's path or "
                         "postgresql://user:password@host:port/database")
    return False


def _connect(url: str, wait: float):
    return _Postgres(url, wait) if is_postgres(url) else _SQLite(Path(url))


def _check_held(where: str, held: str | None, name: str) -> str | None:
    if held not in (None, name):
        raise StoreError(f"{where} holds sweep {held!r}, not {name!r}: give each sweep a store "
                         "of its own")
    return held


def intact_trials(path: Path, name: str) -> int:
    """How many trials the SQLite store `path` holds if it reads whole (by SQLite's
    quick_check; 0 if damaged, empty or not a store), refusing one that holds another sweep.
    By bare queries: opening it as a Store would upgrade an older store in place, and one about
    to be set aside must stay as it was. (A hot journal, left by a writer killed
    mid-transaction, is rolled back by the query: the file as last committed.)"""
    held, trials = None, 0
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=60)) as con:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master")}
            if "sweep" in tables:  # the first runner's named no sweep
                held = con.execute("SELECT value FROM sweep WHERE key = 'name'").fetchone()
            if "trials" in tables and con.execute("PRAGMA quick_check").fetchone() == ("ok",):
                trials = con.execute("SELECT count(*) FROM trials").fetchone()[0]
    except sqlite3.Error:
        pass
    _check_held(str(path), held and held[0], name)
    return trials


# --------------------------------------------------------------------------- the store


def _surviving(operation):
    """A store operation that outlives a lost PostgreSQL connection: reconnect and run it
    again, for up to RECONNECT_S. Each operation is one statement or one transaction, committed
    whole or not at all, so running it again is safe; where the connection broke after a
    commit, before its reply came, the replay (`replaying`) finds its own work done (a claim,
    a finish, a failure, a registration: each stamped with the operation's `stamp`) instead of
    doing it twice. An operation called by another is replayed with it. A Store is one
    thread's."""

    @functools.wraps(operation)
    def run(self, *args, **kwargs):
        if self._busy:
            return operation(self, *args, **kwargs)
        self._busy, self.stamp, deadline = True, time.time(), None
        try:
            while True:
                try:
                    return operation(self, *args, **kwargs)
                except Exception as e:
                    if not self.db.lost(e):
                        raise
                    log.warning("lost the store %s (%s); reconnecting", self.path,
                                _first_line(e))
                    deadline = deadline or time.monotonic() + RECONNECT_S
                    self.db.reconnect(deadline, "lost the store and could not reach it again "
                                      f"within {RECONNECT_S:.0f} s", _first_line(e))
                    self.replaying = True
        finally:
            self._busy = self.replaying = False

    return run


class Store:
    """A sweep's trials, points and prediction, in SQLite (a path) or PostgreSQL (a URL)."""

    def __init__(self, url: str | Path, *, create: bool = True, wait: float = 0.0,
                 read_only: bool = False):
        """`wait`: seconds to keep trying a PostgreSQL server that cannot be reached (a worker
        started while its database restarts), saying why at once. `read_only`: a store that
        is not up to date (an older lm's; a database without tables) is left as it is, and
        `current` says so."""
        self.url = str(url)
        if not create and not is_postgres(self.url) and not Path(url).is_file():
            raise StoreError(f"{url} not found: run the sweep first (lm sweep SWEEP.yaml)")
        self.db = _connect(self.url, wait)
        self.path = self.db.where
        self._busy = self.replaying = False  # see _surviving
        self.stamp = time.time()
        self.read_only, self.current = read_only, True
        self._open()

    @_surviving
    def _open(self) -> None:
        """Create the tables, or check that they are a sweep store's and upgrade them."""
        try:
            tables = {t: self.db.columns(t) for t in ("sweep", "trials", "points")}
            if tables["trials"] and not {"name", "role", "config", "status"} <= tables["trials"]:
                raise StoreError(self._not_a_store("its `trials` table is another program's"))
            written = tables["sweep"] and self._get("version")
            version = int(written or (1 if tables["trials"] else VERSION))
            if version > VERSION:
                raise StoreError(f"{self.path} was written by a newer lm (store version "
                                 f"{version}, this lm reads up to {VERSION}); upgrade lm")
            if written and version == VERSION and set(V2_COLUMNS) <= tables["trials"] \
                    and "set" in tables["points"]:
                return  # up to date: nothing to write, so a read-only store opens too
            if self.read_only:
                self.current = False
                return
            self.db.executescript(SCHEMA)
            with self.db.transaction():
                self.db.lock_schema()
                have = self.db.columns("trials")
                for column, kind in V2_COLUMNS.items():
                    if column not in have:
                        self.db.execute(f"ALTER TABLE trials ADD COLUMN {column} {kind}")
                if "set" not in self.db.columns("points"):
                    self._upgrade_points()
                self._set("version", str(VERSION))
        except (sqlite3.DatabaseError, ValueError) as e:
            raise StoreError(self._not_a_store(str(e))) from None

    def _upgrade_points(self) -> None:
        columns = ", ".join(V1_POINTS)
        self.db.execute("ALTER TABLE points RENAME TO points_v1")
        self.db.execute(POINTS)
        self.db.execute(f"INSERT INTO points ({columns}) SELECT {columns} FROM points_v1")
        self.db.execute("DROP TABLE points_v1")

    def _not_a_store(self, why: str) -> str:
        return (f"{self.path} is not a sweep store ({why}); move it away and rebuild it from the "
                "trials' run directories: lm sweep SWEEP.yaml --rebuild-store")

    def _get(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM sweep WHERE key=?", (key,)).fetchone()
        return row["value"] if row else None

    def _set(self, key: str, value: str) -> None:
        self.db.execute("INSERT INTO sweep (key, value) VALUES (?, ?) ON CONFLICT (key) DO "
                        "UPDATE SET value=excluded.value", (key, value))

    # ----------------------------------------------------------------------- the plan

    @_surviving
    def check_sweep(self, name: str) -> str | None:
        """Refuse a store that holds a sweep other than `name`; the sweep it holds, if any."""
        return _check_held(self.path, self._get("name"), name)

    @_surviving
    def check_plan(self, name: str, trials: list[Trial], digest: str | None = None,
                   registered: dict | None = None) -> None:
        """Refuse, writing nothing, a plan the store cannot take: a store holding another
        sweep; with a `digest`, a plan other than the store's (a worker started with another
        spec; a runner may replan); a trial whose config or role changed under its name; a
        held-out run that the `registered` prediction (the store's, or the prediction.json a
        run would register first) does not hold."""
        held = self.check_sweep(name)
        if held is not None and digest is not None and self._get("plan") != digest:
            raise StoreError(f"{self.path} holds sweep {name!r} as planned by another spec: "
                             "start every worker with the spec the sweep was started with "
                             "(the sweep directory's sweep.yaml)")
        if registered is not None and "failed" not in registered and (new := sorted(
                {t.name for t in trials if t.role == "holdout"}
                - {r["run"] for r in registered.get("runs", [])})):
            raise ConfigError(
                f"held-out run {listed(new)} is not in the prediction registered in "
                f"{self.path}, which is never edited: it would train unpredicted. Hold it "
                "out in a sweep of its own (a new `dir`), or take it out of the spec")
        for t in trials:
            old = self.db.execute("SELECT config, role FROM trials WHERE name=?",
                                  (t.name,)).fetchone()
            if old is not None and (not same_config(old["config"], t.cfg)
                                    or old["role"] != t.role):
                raise ConfigError(
                    f"trial {t.name} in {self.path} was planned with another config or "
                    f"role ({old['role']}); the spec changed under an existing sweep: resume "
                    "it with the spec it ran with (the sweep.yaml in its directory, which "
                    "states every setting), or use a new `dir` (or name)")

    @_surviving
    def sync(self, name: str, digest: str, trials: list[Trial], replan: bool = False) -> None:
        """Open the store for sweep `name` as planned (`digest` of its plan): record new trials,
        in one transaction, once `check_plan` (with the digest unless `replan`, the runner after
        an edit of the spec) passes them. Held-out trials wait ('blocked') until the
        prediction is registered."""
        with self.db.transaction():
            prediction = self.prediction()
            self.check_plan(name, trials, None if replan else digest, prediction)
            self._set("name", name)
            self._set("plan", digest)
            registered = prediction is not None
            if not registered:  # a store of an older lm let them start before registration
                self.db.execute("UPDATE trials SET status='blocked' WHERE role='holdout' AND "
                                "status='pending'")
            have = {r["name"] for r in self.db.execute("SELECT name FROM trials")}
            for t in trials:
                if t.name in have:
                    continue
                facts = t.facts()
                self.db.execute(
                    "INSERT INTO trials (name, role, config, status, params, "
                    "params_non_embedding, tokens, flops_per_token, flops, flops_6nd, "
                    "spent_flops, parent, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
                    "?, ?)",
                    (t.name, t.role, _config_json(t.cfg),
                     "blocked" if t.role == "holdout" and not registered else "pending",
                     facts["params"], facts["params_non_embedding"], facts["tokens"],
                     facts["flops_per_token"], facts["flops"], facts["flops_6nd"],
                     facts["spent_flops"], t.parent, time.time()))

    # ----------------------------------------------------------------------- workers

    @_surviving
    def claim(self, worker: str, among: Collection[str] | None = None) -> str | None:
        """The name of a pending trial (one of `among`, if given), now running under `worker`;
        None if none is pending. The largest first: they take longest, so the sweep ends
        sooner."""
        if self.replaying and (name := self._stamped(worker)) is not None:
            return name  # claimed by the lost attempt
        names = sorted(among or ())
        if among is not None and not names:
            return None
        where = f" AND name IN ({', '.join('?' * len(names))})" if among is not None else ""
        row = self.db.execute(CLAIM.format(lock=self.db.lock, among=where, now=self.db.now),
                              (worker, self.stamp, *names)).fetchone()
        return row["name"] if row else None

    @_surviving
    def beat(self, name: str, worker: str) -> bool:
        """Say `worker` is still training `name`; False if the trial is no longer its own."""
        cur = self.db.execute(f"UPDATE trials SET heartbeat={self.db.now} WHERE name=? AND "
                              "worker=? AND status='running'", (name, worker))
        return cur.rowcount == 1

    @_surviving
    def reclaim(self, stale_s: float, dead_workers=()) -> list[str]:
        """Running trials whose worker stopped beating `stale_s` ago (or is known dead) go back
        to the queue; they resume from their checkpoints. One statement, so that a heartbeat
        that lands meanwhile keeps its trial."""
        dead = list(dead_workers)
        of_dead = f" OR worker IN ({', '.join('?' * len(dead))})" if dead else ""
        rows = self.db.execute(
            "UPDATE trials SET status='pending', worker=NULL, updated=? WHERE status='running' "
            f"AND (COALESCE(heartbeat, 0) < {self.db.now} - ?{of_dead}) RETURNING name",
            (self.stamp, stale_s, *dead)).fetchall()
        return sorted({r["name"] for r in rows} | self._requeued())

    @_surviving
    def fail_orphans(self) -> list[str]:
        """Branches whose stable run failed for good cannot start: they fail too."""
        with self.db.transaction():
            rows = self.db.execute("SELECT c.name, c.parent FROM trials c JOIN trials p ON "
                                   "c.parent = p.name WHERE p.status = 'failed' AND c.status IN "
                                   "('pending', 'blocked')").fetchall()
            for r in rows:
                self.db.execute("UPDATE trials SET status='failed', error=?, updated=? WHERE "
                                "name=?", (f"its stable run {r['parent']} failed",
                                           time.time(), r["name"]))
        return [r["name"] for r in rows]

    @_surviving
    def release(self, name: str, worker: str) -> None:
        """A worker stopped (a signal) before `name` ended: pending again, for anyone."""
        self.db.execute("UPDATE trials SET status='pending', worker=NULL, updated=? WHERE "
                        "name=? AND worker=?", (time.time(), name, worker))

    @staticmethod
    def _owned(worker: str | None) -> tuple[str, tuple]:
        """The condition that the trial is still `worker`'s (none without a worker: a rebuild)."""
        return (" AND worker=? AND status='running'", (worker,)) if worker else ("", ())

    @_surviving
    def finish(self, name: str, points: list[dict], wall_s: float | None,
               timings: dict | None = None, worker: str | None = None,
               spent_flops: float | None = None) -> bool:
        """A trial's evaluations and its `done` status, in one transaction, with the FLOPs it
        spent where they were not the planned ones. With `worker`, only while the trial is
        still that worker's: False if another has taken it over (the result is then the new
        owner's to record)."""
        owned, args = self._owned(worker)
        with self.db.transaction():
            cur = self.db.execute("UPDATE trials SET status='done', error=NULL, wall_s=?, "
                                  "timings=?, updated=?, spent_flops=COALESCE(?, spent_flops) "
                                  f"WHERE name=?{owned}",
                                  (wall_s, json.dumps(timings or {}), self.stamp, spent_flops,
                                   name, *args))
            if cur.rowcount != 1:  # another's now, or finished by the lost attempt
                return self.replaying and self._stamped(worker, name) == name
            self.db.execute("DELETE FROM points WHERE trial=?", (name,))
            for p in points:
                self.db.execute(
                    'INSERT INTO points (trial, step, "set", tokens, flops, train_loss, '
                    "val_loss, val_loss_sem, bpb, annealed) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (name, p["step"], p.get("set", "val"), p["tokens"], p["flops"],
                     p["train_loss"], p["val_loss"], p["val_loss_sem"], p["bpb"],
                     int(p.get("annealed", False))))
        return True

    @_surviving
    def fail(self, name: str, error: str, wall_s: float, timings: dict | None = None,
             worker: str | None = None) -> bool | None:
        """Record a failure. The trial is retried until it fails the same way MAX_FAILURES
        times in a row; returns whether it is now final. With `worker`, only while the trial
        is still that worker's: None if another has taken it over."""
        owned, args = self._owned(worker)
        with self.db.transaction():
            row = self.db.execute("SELECT status, error, failures FROM trials WHERE name=?",
                                  (name,)).fetchone()
            same = row["error"] == error
            failures = row["failures"] + 1 if same else 1
            final = failures >= MAX_FAILURES
            cur = self.db.execute("UPDATE trials SET status=?, error=?, failures=?, wall_s=?, "
                                  f"timings=?, updated=? WHERE name=?{owned}",
                                  ("failed" if final else "pending", error, failures, wall_s,
                                   json.dumps(timings or {}), self.stamp, name, *args))
            if cur.rowcount != 1:  # taken over (PostgreSQL locks no row between the two)
                if self.replaying and self._stamped(worker, name) == name:
                    return row["status"] == "failed"  # recorded by the lost attempt
                return None
        return final

    def _stamped(self, worker: str | None, name: str | None = None) -> str | None:
        """The trial (`name`, or any) that `worker` last changed in this operation, before its
        connection was lost; None if none."""
        row = self.db.execute("SELECT name FROM trials WHERE worker=? AND updated=?"
                              + (" AND name=?" if name else ""),
                              (worker, self.stamp) + ((name,) if name else ())).fetchone()
        return row["name"] if row else None

    @_surviving
    def retry_failed(self, names: Collection[str]) -> list[str]:
        """The failed trials among `names` queued again with their failures forgotten (the
        user fixed the cause); a held-out one waits for the prediction as before."""
        with self.db.transaction():
            registered = self.prediction() is not None
            rows = [r for r in self.db.execute(
                "SELECT name, role FROM trials WHERE status='failed'").fetchall()
                if r["name"] in names]
            for r in rows:
                waits = r["role"] == "holdout" and not registered
                self.db.execute("UPDATE trials SET status=?, failures=0, updated=? WHERE name=?",
                                ("blocked" if waits else "pending", self.stamp, r["name"]))
        return sorted({r["name"] for r in rows} | self._requeued())

    def _requeued(self) -> set[str]:
        """The trials this operation queued again before its connection was lost (after the
        commit, before the reply): what a replay reports as its own."""
        if not self.replaying:
            return set()
        return {r["name"] for r in self.db.execute(
            "SELECT name FROM trials WHERE updated=? AND status IN ('pending', 'blocked')",
            (self.stamp,)).fetchall()}

    # ----------------------------------------------------------------------- the prediction

    @_surviving
    def register(self, body: dict, held: list[str]) -> bool:
        """Store the prediction, once: the first caller wins and releases the held-out trials;
        returns whether this call registered it."""
        with self.db.transaction():
            cur = self.db.execute("INSERT INTO prediction (id, made, body) VALUES (1, ?, ?) "
                                  "ON CONFLICT (id) DO NOTHING", (self.stamp, json.dumps(body)))
            if cur.rowcount != 1:  # another's registration, or this one's by the lost attempt
                return self.replaying and self.db.execute(
                    "SELECT made FROM prediction WHERE id=1").fetchone()["made"] == self.stamp
            for name in held:
                self.db.execute("UPDATE trials SET status='pending' WHERE name=? AND "
                                "status='blocked'", (name,))
        return True

    @_surviving
    def unblock_held(self) -> None:
        """Release held-out trials still blocked after the registration: a worker's `sync` that
        read no prediction just before another's registration committed blocks them again."""
        self.db.execute("UPDATE trials SET status='pending' WHERE status='blocked' AND "
                        "EXISTS (SELECT 1 FROM prediction)")

    @_surviving
    def prediction(self) -> dict | None:
        row = self.db.execute("SELECT body FROM prediction WHERE id=1").fetchone()
        return json.loads(row["body"]) if row else None

    # ----------------------------------------------------------------------- the runs

    @_surviving
    def add_run(self, run: dict) -> None:
        """Record a run of `lm sweep` that ended trials (its workers, start, end and the
        machine's peak), under a key of its own: runners on two machines overwrite nothing."""
        self._set(f"run:{run['started']!r}:{worker_name()}", json.dumps(run))

    @_surviving
    def runs(self) -> list[dict]:
        return [json.loads(r["value"]) for r in self.db.execute(
            "SELECT value FROM sweep WHERE key LIKE ?", ("run:%",))]

    # ----------------------------------------------------------------------- reading

    @_surviving
    def holds_trials(self) -> bool:
        """Whether the store records any trial (an older lm's too): not a new store."""
        return bool(self.db.columns("trials")) and self.db.execute(
            "SELECT 1 FROM trials LIMIT 1").fetchone() is not None

    @_surviving
    def trials(self) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT * FROM trials ORDER BY flops, name")]

    @_surviving
    def points(self, params: str = "total", metric: str = "val") -> list[dict]:
        """Every evaluation on validation set `metric` of every finished trial, as rows for
        Points."""
        column = {"total": "t.params", "non_embedding": "t.params_non_embedding",
                  "flops": "t.flops_per_token / 6"}[params]  # as spec.fit_params counts N
        rows = self.db.execute(
            f"SELECT t.name AS run, t.role, {column} AS params, p.tokens, p.flops, "
            "p.val_loss AS loss, p.step, p.annealed FROM points p JOIN trials t ON "
            "p.trial = t.name WHERE t.status = 'done' AND p.\"set\" = ? ORDER BY t.name, p.step",
            (metric,))
        return [dict(r) for r in rows]

    @_surviving
    def points_of(self, params: str = "total", roles=("fit", "holdout"), names=None,
                  metric: str = "val") -> Points:
        """The points of the finished trials of `roles` (and of `names`, if given)."""
        rows = [r for r in self.points(params, metric)
                if r["role"] in roles and (names is None or r["run"] in names)]
        if not rows:
            raise StoreError(f"no finished {'/'.join(roles)} trials in {self.path} with "
                             f"evaluations on {metric!r} to fit")
        return Points.from_rows(rows)

    @_surviving
    def sets(self) -> list[str]:
        """The validation sets the store has evaluations on."""
        return sorted(r["s"] for r in self.db.execute('SELECT DISTINCT "set" AS s FROM points'))

    @_surviving
    def last_sems(self, metric: str = "val") -> dict[str, float]:
        """Each trial's standard error of its latest loss on `metric`, relative to the loss:
        the evaluation's own noise, to set against the runs' noise."""
        rows = self.db.execute('SELECT trial, val_loss, val_loss_sem FROM points WHERE "set" = ? '
                               "ORDER BY step", (metric,))
        return {r["trial"]: (r["val_loss_sem"] or 0.0) / r["val_loss"] for r in rows}

    @_surviving
    def last_losses(self, metric: str = "val") -> dict[str, float]:
        """Each trial's latest loss on validation set `metric`."""
        rows = self.db.execute('SELECT trial, val_loss FROM points WHERE "set" = ? ORDER BY step',
                               (metric,))
        return {r["trial"]: r["val_loss"] for r in rows}


def _config_json(cfg: Config) -> str:
    return json.dumps(config_lib.to_dict(cfg), sort_keys=True)


def same_config(stored: str | dict, cfg: Config) -> bool:
    """Whether a stored trial config (its JSON, or a run's config.yaml as a dict) is `cfg` in
    all that decides its losses: read with today's defaults (a key added to lm since the sweep
    started does not orphan its trials), wherever the sweep directory is now, however often it
    checkpoints or logs."""
    try:
        old = config_lib.from_dict(json.loads(stored) if isinstance(stored, str) else stored)
    except ConfigError:  # a key that no longer exists
        return False
    t = cfg.train
    kept = {"run_dir": t.run_dir, "log_every": t.log_every, "progress": t.progress,
            "peak_flops": t.peak_flops}  # and a branch's parent, one directory over:
    if Path(old.train.branch_from).name == Path(t.branch_from).name:
        kept["branch_from"] = t.branch_from
    return config_lib.replace(old, train=kept, checkpoint=config_lib.to_dict(cfg)["checkpoint"]
                              ) == cfg


def load_points(source: str | Path, ignore_columns: bool = False, metric: str = "val",
                params: str = "total") -> tuple[Points, list[str]]:
    """Points from a sweep (directory, store file or PostgreSQL URL) or a CSV, and the
    designated held-out runs (a sweep's `holdout` trials; none for a CSV). A sweep's points are
    its evaluations on validation set `metric`, with N counted as `params` (total,
    non_embedding or flops, as spec.fit_params); a CSV's N is its params column, or with
    `flops` its FLOPs per token / 6."""
    source = str(source)
    if Path(source).is_dir():
        source = str(Path(source) / SQLITE)
    if not is_postgres(source) and not source.endswith(".sqlite"):
        points = load_csv(source, ignore_columns)
        if params == "non_embedding":
            raise FitError(f"{source}: a CSV's params column is its N; count N without the "
                           "embeddings there, not with --params non_embedding")
        if metric != "val":
            raise FitError(f"{source}: a CSV has one loss column, its loss; --metric {metric} "
                           "picks a sweep's validation set")
        # C / 6D, rounded so that the rows of one model agree exactly (and where the CSV has
        # no flops column, they are 6ND and N stays as it is)
        return (dataclasses.replace(points, params=np.round(points.flops / (6 * points.tokens)))
                if params == "flops" else points), []
    store = Store(source, create=False)
    rows = store.points(params, metric)
    if not rows:
        raise StoreError(f"{source} holds no finished trials with evaluations on {metric!r} "
                         f"yet (its sets: {', '.join(store.sets()) or 'none'})")
    held = sorted({r["run"] for r in rows if r["role"] == "holdout"})
    return Points.from_rows(rows), held
