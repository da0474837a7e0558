"""The sweep store on both backends: SQLite, and a real PostgreSQL server started by the test
session."""

import contextlib
import json
import sqlite3
import subprocess
import sys
import time

import pytest

from lm import config, spec as spec_lib
from lm.errors import ConfigError, FitError, StoreError
from lm.store import MAX_FAILURES, Store, intact_trials, load_points

from sweeps import spec_file


def fresh_database(base: str) -> str:
    """The URL of a new database on the server at `base`: one for each test."""
    import psycopg

    name = f"t{time.time_ns()}"
    with psycopg.connect(base, autocommit=True) as con:
        con.execute(f"CREATE DATABASE {name}")
    return base.replace("/postgres?", f"/{name}?")


@pytest.fixture(params=["sqlite", "postgres"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "store.sqlite")
    return fresh_database(request.getfixturevalue("postgres"))


@pytest.fixture
def trials(tmp_path):
    return spec_lib.plan(spec_lib.load_spec(spec_file(tmp_path)))


def test_workers_keep_to_the_shapes_they_compiled_and_spread_over_the_others(url, trials):
    """Workers starting together take different sizes, not one size's two budgets; with every
    size busy, the largest trial; a worker takes the trials of a size it has compiled first."""
    from lm import runner

    store = Store(url)
    store.sync("t", "plan1", trials)
    plan = {t.name: t for t in trials}
    width = {n: t.cfg.model.d_model for n, t in plan.items()}
    flops = {n: t.facts()["flops"] for n, t in plan.items()}
    fitting = [n for n, t in plan.items() if t.role == "fit"]
    none = lambda cfg: False  # noqa: E731 - nothing compiled yet
    w1, w2, w3, w4 = (runner.claim(store, f"w{i}", plan, none) for i in range(1, 5))
    assert flops[w1] == max(flops[n] for n in fitting)  # the largest first
    assert sorted([width[w1], width[w2], width[w3]]) == [16, 32, 48]  # then a size each
    assert width[w4] == 48 and flops[w4] > flops[w2]  # every size busy: the largest
    pending = [r["name"] for r in store.trials() if r["status"] == "pending"]
    got = runner.claim(store, "w3", plan, lambda cfg: cfg.model.d_model == 16)
    assert width[got] == 16 and flops[got] == max(flops[n] for n in pending if width[n] == 16)
    assert flops[got] < max(flops[n] for n in pending)  # over larger trials of other sizes


def test_claims_heartbeats_failures_and_the_prediction(url, trials):
    store = Store(url)
    store.sync("t", "plan1", trials)
    fit = sorted((t for t in trials if t.role == "fit"), key=lambda t: -t.facts()["flops"])
    status = {r["name"]: r["status"] for r in store.trials()}
    assert status[trials[-1].name] == "blocked"  # the held-out run waits for the prediction
    claims = [store.claim("w1"), store.claim("w2")]
    assert claims == [fit[0].name, fit[1].name]  # the largest first, each to one worker
    other = Store(url)  # a second connection, as another machine's
    assert store.beat(claims[0], "w1") and not other.beat(claims[0], "w2")
    time.sleep(0.05)
    other.beat(claims[1], "w2")
    assert store.reclaim(0.03) == [claims[0]]  # w1 went silent; w2 just spoke
    assert store.claim("w3") == claims[0]  # taken over
    point = {"step": 2, "tokens": 512, "flops": 1e6, "train_loss": 3.0, "val_loss": 3.1,
             "val_loss_sem": 0.01, "bpb": None}
    assert not store.finish(claims[0], [point], 2.0, worker="w1")  # w1 lost it: w3's now
    assert store.fail(claims[0], "TrainingError: lost", 2.0, worker="w1") is None
    row = {r["name"]: r for r in store.trials()}[claims[0]]
    assert (row["status"], row["worker"], row["failures"]) == ("running", "w3", 0)
    assert store.last_losses() == {}
    for attempt in range(1, MAX_FAILURES + 1):
        final = store.fail(claims[1], "TrainingError: loss became non-finite", 1.0, worker="w2")
        assert final == (attempt == MAX_FAILURES)
        if not final:
            assert store.claim("w2") == claims[1]  # retried until it fails the same way thrice
    rows = {r["name"]: r for r in store.trials()}
    assert rows[claims[1]]["status"] == "failed" and rows[claims[1]]["attempts"] == 3
    assert store.finish(claims[0], [point], 2.0, {"steps": 1.5}, worker="w3", spent_flops=7.0)
    assert store.last_losses() == {claims[0]: 3.1}
    assert {r["name"]: r for r in store.trials()}[claims[0]]["spent_flops"] == 7.0
    finished = {r["name"]: r for r in Store(url).trials()}[claims[0]]
    assert finished["status"] == "done" and json.loads(finished["timings"]) == {"steps": 1.5}
    assert store.register({"runs": {}}, [trials[-1].name])
    assert not other.register({"runs": {"x": 1}}, [trials[-1].name])  # exactly once
    assert other.prediction() == {"runs": {}}
    assert {r["name"]: r["status"] for r in store.trials()}[trials[-1].name] == "pending"


def test_another_sweep_another_plan_or_a_changed_trial_is_refused(url, trials):
    """A store of another sweep, a worker with another plan, and a trial whose config or role
    changed (a fitting budget now held out would have trained before its registration)."""
    store = Store(url)
    store.sync("t", "plan1", trials)
    with pytest.raises(StoreError, match="holds sweep 't', not 'u'"):
        Store(url).sync("u", "plan1", trials)
    with pytest.raises(StoreError, match="planned by another spec"):
        Store(url).sync("t", "plan2", trials)  # a worker with another spec
    Store(url).sync("t", "plan2", trials, replan=True)  # the runner after an edit of the spec
    changed = config.replace(trials[0].cfg, train={"steps": 7})
    with pytest.raises(ConfigError, match="another config"):
        store.sync("t", "plan2", [spec_lib.Trial(trials[0].name, "fit", changed)], replan=True)
    fitting = next(t for t in trials if t.role == "fit")  # a budget now held out, say
    with pytest.raises(ConfigError, match=r"another config or role \(fit\)"):
        store.sync("t", "plan2", [spec_lib.Trial(fitting.name, "holdout", fitting.cfg)],
                   replan=True)


def test_trials_stored_before_a_new_config_key_are_the_same(tmp_path, trials):
    store = Store(tmp_path / "store.sqlite")
    store.sync("t", "p", trials)
    old = config.to_dict(trials[0].cfg)
    del old["train"]["spikes"]  # as written by an lm without train.spikes
    store.db.execute("UPDATE trials SET config=? WHERE name=?", (json.dumps(old), trials[0].name))
    store.sync("t", "p", trials)  # same trials: accepted


# The store of the first runner: no version, no `sweep` or `prediction` table.
V1 = """
CREATE TABLE trials (name TEXT PRIMARY KEY, role TEXT NOT NULL, config TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending', error TEXT, params INTEGER,
    params_non_embedding INTEGER, tokens INTEGER, flops_per_token REAL, flops REAL,
    flops_6nd REAL, wall_s REAL, updated REAL);
CREATE TABLE points (trial TEXT NOT NULL REFERENCES trials(name), step INTEGER NOT NULL,
    tokens INTEGER, flops REAL, train_loss REAL, val_loss REAL, val_loss_sem REAL, bpb REAL,
    PRIMARY KEY (trial, step));
"""


def test_a_store_of_the_first_runner_is_upgraded_not_dropped(tmp_path, trials):
    path = tmp_path / "store.sqlite"
    con = sqlite3.connect(path)
    con.executescript(V1)
    t = trials[0]
    con.execute("INSERT INTO trials (name, role, config, status, params, tokens, flops) VALUES "
                "(?, 'fit', ?, 'done', 100, 1000, 1e6)",
                (t.name, json.dumps(config.to_dict(t.cfg), sort_keys=True)))
    con.execute("INSERT INTO trials (name, role, config, status) VALUES (?, 'holdout', ?, "
                "'pending')", (trials[-1].name, json.dumps(config.to_dict(trials[-1].cfg))))
    con.execute("INSERT INTO points VALUES (?, 5, 1000, 1e6, 3.0, 3.2, 0.01, NULL)", (t.name,))
    con.commit()
    con.close()
    store = Store(path)
    store.sync("t", "p", trials)
    rows = {r["name"]: r for r in store.trials()}
    assert rows[t.name]["status"] == "done" and store.last_losses()[t.name] == 3.2
    assert rows[trials[-1].name]["status"] == "blocked"  # not before the prediction
    assert store._get("version") == "2" and rows[t.name]["attempts"] == 0


def test_checking_a_file_s_sweep_changes_no_byte_of_it(tmp_path, trials):
    """--rebuild-store checks whose store it sets aside; an old store set aside must stay as
    the first runner wrote it, not be upgraded by the check."""
    old, empty_old = tmp_path / "old.sqlite", tmp_path / "empty_old.sqlite"
    for path in (old, empty_old):
        with contextlib.closing(sqlite3.connect(path)) as con:
            con.executescript(V1)
            if path == old:
                con.execute("INSERT INTO trials (name, role, config) VALUES ('a', 'fit', '{}')")
                con.commit()
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"\x00 not a database " * 100)
    theirs = tmp_path / "theirs.sqlite"
    Store(theirs).sync("theirs", "p", trials)
    before = {p: p.read_bytes() for p in (old, empty_old, garbage, theirs)}
    # what a rebuild would mend: not an intact store of the sweep's own (the first runner's
    # named no sweep, so its trials are the sweep's)
    assert [intact_trials(p, "theirs") for p in (old, empty_old, garbage, theirs)] == [
        1, 0, 0, len(trials)]
    with pytest.raises(StoreError, match="holds sweep 'theirs', not 't'"):
        intact_trials(theirs, "t")
    assert {p: p.read_bytes() for p in before} == before


def test_a_store_whose_writer_died_mid_transaction_is_read_as_last_committed(tmp_path, trials):
    """A writer killed in the middle of a transaction leaves a hot journal; the check of whose
    sweep the store holds reads past it (rolled back), so another sweep's store is refused
    still."""
    path = tmp_path / "store.sqlite"
    Store(path).sync("theirs", "p", trials)
    crash = f"""
import os, sqlite3
con = sqlite3.connect({str(path)!r}, isolation_level=None)
con.execute("CREATE TABLE big (x BLOB)")
for i in range(200):
    con.execute("INSERT INTO big VALUES (randomblob(4000))")
con.execute("PRAGMA cache_size=1")  # dirty pages spill to the file mid-transaction
con.execute("BEGIN")
con.execute("UPDATE sweep SET value='half-written' WHERE key='name'")
for i in range(200):
    con.execute("UPDATE big SET x = randomblob(4000) WHERE rowid=?", (i + 1,))
os._exit(0)
"""
    subprocess.run([sys.executable, "-c", crash], check=True)
    assert path.with_name("store.sqlite-journal").exists()  # hot: the crash left it
    with pytest.raises(StoreError, match="holds sweep 'theirs', not 'mine'"):
        intact_trials(path, "mine")


def test_garbage_or_a_foreign_database_is_not_a_store(tmp_path):
    garbage = tmp_path / "store.sqlite"
    garbage.write_bytes(b"\x00\x01 not a database " * 100)
    with pytest.raises(StoreError, match="is not a sweep store .*--rebuild-store"):
        Store(garbage)
    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as con:
        con.execute("CREATE TABLE trials (id INTEGER, measurement REAL)")
    with pytest.raises(StoreError, match="another program's"):
        Store(foreign)


@pytest.mark.parametrize("make_url, message", [
    (lambda pg: "postgresql://lm@127.0.0.1:1/postgres", "cannot reach the store"),
    (lambda pg: pg.replace("lm@", "nobody_here@"), "cannot reach the store"),
])
def test_an_unreachable_or_unauthorised_postgres_url_says_so(postgres, make_url, message):
    with pytest.raises(StoreError, match=message):
        Store(make_url(postgres))


def test_a_worker_claims_only_trials_of_its_own_plan(url, trials):
    """An edited spec leaves its old plan's trials pending in the store; a worker of the new
    plan must not take them (it would not know their config)."""
    from lm import runner

    store = Store(url)
    store.sync("t", "plan1", trials)
    fitting = [t for t in trials if t.role == "fit"]
    plan = {t.name: t for t in fitting[:2]}
    got = [runner.claim(store, "w1", plan, lambda cfg: False) for _ in range(3)]
    assert sorted(got[:2]) == sorted(plan) and got[2] is None
    assert sum(r["status"] == "pending" for r in store.trials()) == len(fitting) - 2


def test_heartbeats_keep_the_database_clock_and_stores_open_side_by_side(url, trials,
                                                                          monkeypatch):
    """A worker whose clock runs 1000 s behind keeps its trial: heartbeats are stamped and
    judged by the database's clock. Workers started at once on an empty database all open it
    (PostgreSQL would otherwise create and alter the same tables side by side)."""
    import threading

    import lm.store

    opened, errors = [], []

    def open_store():
        try:
            opened.append(Store(url))
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(opened) == 4
    store, other = Store(url), Store(url)  # SQLite's connections stay in their own thread
    store.sync("t", "plan1", trials)
    behind = time.time() - 1000
    monkeypatch.setattr(lm.store.time, "time", lambda: behind)
    name = store.claim("late")
    assert store.beat(name, "late")
    monkeypatch.undo()
    assert other.reclaim(60.0) == []
    assert other.reclaim(60.0, dead_workers=["late"]) == [name]


def test_an_up_to_date_store_opens_read_only(tmp_path, trials, monkeypatch):
    """A colleague's sweep, readable but not writable: its status and points still open."""
    import lm.store

    path = tmp_path / "store.sqlite"
    Store(path).sync("t", "plan1", trials)
    connect = sqlite3.connect
    monkeypatch.setattr(lm.store.sqlite3, "connect",
                        lambda p, **kw: connect(f"file:{p}?mode=ro", uri=True, **kw))
    store = Store(path, create=False)
    assert len(store.trials()) == len(trials)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        store.claim("w1")


def test_a_csvs_n_is_its_params_column_or_its_flops_per_token_over_6(tmp_path):
    path = tmp_path / "points.csv"
    path.write_text("params,tokens,loss,flops\n1000,2e6,3.0,1.8e10\n4000,2e6,2.5,5.4e10\n"
                    "4000,3e6,2.4,8.100000001e10\n")
    assert list(load_points(path)[0].params) == [1000, 4000, 4000]
    by_flops, held = load_points(path, params="flops")
    assert list(by_flops.params) == [1500, 4500, 4500] and held == []  # C / 6D, one per model
    path.write_text("params,tokens,loss\n1000,2e6,3.0\n4000,2e6,2.5\n")  # FLOPs are 6ND
    assert list(load_points(path, params="flops")[0].params) == [1000, 4000]
    with pytest.raises(FitError, match="params column is its N"):
        load_points(path, params="non_embedding")
    with pytest.raises(FitError, match="a CSV has one loss column, its loss; --metric code"):
        load_points(path, metric="code")


def cut(url: str, *pids: int) -> None:
    """End the PostgreSQL sessions `pids` (all of `url`'s database but this one's, if none
    given) as an administrator would, waiting until they are gone."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as con:
        con.execute("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE "
                    "datname = current_database() AND pid <> pg_backend_pid()"
                    + (" AND pid = ANY(%s)" if pids else ""), (list(pids),) if pids else ())


def lose_the_connection(store: Store, monkeypatch, step: str, meanwhile=None) -> None:
    """The store's next `step` ("execute": a statement; "transaction") commits, then its
    connection breaks before the reply comes back; or, given `meanwhile` (what another worker
    does then), the connection breaks before the transaction's commit."""
    original, pending = getattr(store.db, step), [True]

    def broken():
        if pending and pending.pop():
            cut(store.url, store.db.con.info.backend_pid)
            if meanwhile:
                meanwhile()  # and the commit that follows fails
            else:
                store.db.con.execute("SELECT 1")  # raises: the connection is gone

    def execute(sql, params=()):
        cursor = original(sql, params)
        broken()
        return cursor

    @contextlib.contextmanager
    def transaction():
        with original() as db:
            yield db
            if meanwhile:
                broken()
        broken()

    monkeypatch.setattr(store.db, step, {"execute": execute, "transaction": transaction}[step])


def test_a_lost_connection_is_made_again_and_no_work_done_twice(postgres, trials, monkeypatch,
                                                                caplog):
    """Every operation outlives its PostgreSQL session's end: a claim, finish, failure,
    retry, reclaim or registration whose commit got through but whose reply did not is found
    done, not done again (nor reported as nothing done); one that did not get through is not
    taken for done."""
    url = fresh_database(postgres)
    store = Store(url)
    store.sync("t", "plan1", trials)
    cut(store.url)
    assert len(store.trials()) == len(trials)  # a new connection, the same store
    assert "lost the store" in caplog.text

    old = store.claim("w1")  # still its own: a worker fenced off a trial does not release it
    lose_the_connection(store, monkeypatch, "execute")
    first = store.claim("w1", [t.name for t in trials if t.name != old])
    running = {r["name"]: r["attempts"] for r in store.trials()
               if r["status"] == "running" and r["worker"] == "w1"}
    assert first != old and running == {old: 1, first: 1}
    second = store.claim("w2")

    point = {"step": 1, "tokens": 8, "flops": 1.0, "train_loss": 3.0, "val_loss": 3.1,
             "val_loss_sem": 0.01, "bpb": 1.2}
    lose_the_connection(store, monkeypatch, "transaction")
    assert store.finish(first, [point], 1.0, worker="w1")
    assert len(store.points()) == 1 and not store.finish(first, [point], 1.0, worker="w9")

    lose_the_connection(store, monkeypatch, "transaction")
    assert store.fail(second, "Boom", 1.0, worker="w2") is False  # to be retried
    row = next(r for r in store.trials() if r["name"] == second)
    assert (row["status"], row["failures"]) == ("pending", 1)  # counted once
    store.db.execute("UPDATE trials SET status='failed' WHERE name=?", (second,))
    lose_the_connection(store, monkeypatch, "transaction")
    assert store.retry_failed([second]) == [second]  # requeued by the lost attempt: said so
    lose_the_connection(store, monkeypatch, "execute")
    assert store.reclaim(3600, dead_workers=["w1"]) == [old]

    held, body = [t.name for t in trials if t.role == "holdout"], {"made": "now", "runs": []}
    lose_the_connection(store, monkeypatch, "transaction")
    assert store.register(body, held)
    assert not store.register({"made": "later", "runs": []}, held)
    assert store.prediction() == body
    store.db.execute("DELETE FROM prediction")
    other = Store(url)  # registers the same prediction while this one's connection is down
    lose_the_connection(store, monkeypatch, "transaction", lambda: other.register(body, held))
    assert not store.register(body, held)  # the other's, not this one's


def test_replays_end_when_the_connection_keeps_breaking(postgres, trials, monkeypatch):
    import lm.store

    store = Store(fresh_database(postgres))
    store.sync("t", "plan1", trials)
    monkeypatch.setattr(lm.store, "RECONNECT_S", 1.0)
    original, calls = store.db.execute, []

    def execute(sql, params=()):  # every statement's session ended as it is sent
        calls.append(sql)
        assert len(calls) < 100, "replayed without end"
        cut(store.url, store.db.con.info.backend_pid)
        return original(sql, params)

    monkeypatch.setattr(store.db, "execute", execute)
    with pytest.raises(StoreError, match="lost the store and could not reach it again within 1 s"):
        store.trials()


def test_a_store_outlives_a_server_restart_but_says_when_it_stays_away(postgres_server, trials,
                                                                       monkeypatch):
    """An operation waits for a restarting server, up to RECONNECT_S; so does a worker's store
    opened while the server is down."""
    import threading

    import lm.store

    url = fresh_database(postgres_server.url)
    store = Store(url)
    store.sync("t", "plan1", trials)
    postgres_server.stop()
    threading.Timer(2.0, postgres_server.start).start()
    assert store.claim("w1") is not None  # waited for the server
    postgres_server.stop()
    threading.Timer(2.0, postgres_server.start).start()
    assert len(Store(url, wait=60).trials()) == len(trials)
    monkeypatch.setattr(lm.store, "RECONNECT_S", 1.0)
    postgres_server.stop()
    try:
        with pytest.raises(StoreError, match=r"lost the store and could not reach it again "
                                             r"within 1 s \(postgresql://.* run the sweep again"):
            store.trials()
    finally:
        postgres_server.start()
    assert sum(r["status"] == "running" for r in store.trials()) == 1


def test_held_out_runs_outside_the_registration_are_refused_but_not_by_a_failed_one(tmp_path,
                                                                                   trials):
    """A registration holds its held-out runs; an older lm's record of a failed fit ({made,
    failed}, which let them train unpredicted) holds none and refuses none."""
    held = [t.name for t in trials if t.role == "holdout"]
    for body, refused in (({"made": "then", "runs": []}, True),
                          ({"made": "then", "failed": "the fit failed"}, False)):
        store = Store(tmp_path / f"{refused}.sqlite")
        store.sync("t", "plan1", trials)
        store.register(body, [])
        if refused:
            with pytest.raises(ConfigError, match=f"held-out run {held[0]} is not in the "
                                                  "prediction registered"):
                store.sync("t", "plan1", trials)
        else:
            store.sync("t", "plan1", trials)
