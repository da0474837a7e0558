"""Sweeps run by long-lived workers: killed and resumed, failing trials, a shared PostgreSQL
store with a worker killed mid-trial, edits of a finished sweep, and bad stores."""

import contextlib
import dataclasses
import json
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import yaml

from lm import cli, config, runner, spec as spec_lib
from lm.errors import ConfigError, FitError, Incomplete, StoreError
from lm.store import Store, load_points

from conftest import lm_here
from sweeps import BASE, SIZES, finished_sweep, spec_file
from test_store import V1, cut, fresh_database
from test_trackers import read_scalars

DIVERGES = {"model.d_model": 24, "model.n_layers": 1, "model.n_heads": 2,
            "model.init_std": 1e20}  # its loss is non-finite at once: a trial that fails


def lm(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "lm.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def final_losses(store_url) -> dict[str, float]:
    return Store(store_url).last_losses()


WSD = {"eval_points": 6, "lr": 1e-2, "schedule": "wsd"}  # stable runs and cooldown branches


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A wsd sweep run to its end by one worker, after its runner was killed with SIGKILL once
    its first trial was done: (spec path, the second run's output)."""
    tmp_path = tmp_path_factory.mktemp("sweep")
    path = spec_file(tmp_path, sizes=SIZES + [DIVERGES], recipe=WSD,
                     overrides={**BASE, "train.trackers": ["jsonl", "tensorboard"]})
    args = ["sweep", str(path), "--workers", "1", "--cpu-devices", "1"]
    first = subprocess.Popen([sys.executable, "-m", "lm.cli", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    store_path = tmp_path / "sweep" / "store.sqlite"
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None:
        if store_path.exists() and any(t["status"] == "done" for t in Store(store_path).trials()):
            break
        time.sleep(0.3)
    first.send_signal(signal.SIGKILL)  # its worker gets SIGTERM, saves and stops
    first.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(t["status"] == "running"
                                          for t in Store(store_path).trials()):
        time.sleep(0.1)  # the worker saves its trial and gives it back
    done_before = {t["name"] for t in Store(store_path).trials() if t["status"] == "done"}
    assert done_before
    second = lm(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    return path, second, done_before


def test_the_sweep_summary_goes_where_the_trials_metrics_went(finished):
    path, _, _ = finished
    scalars = read_scalars(path.parent / "sweep")
    registered = json.loads((path.parent / "sweep" / "prediction.json").read_text())
    (held,) = registered["runs"]
    assert scalars[f"summary/{held['run']}/predicted"][0] == pytest.approx(held["predicted"])
    assert {"summary/law/E", "summary/wall_s", "summary/mfu"} <= set(scalars)


def test_a_killed_sweep_resumes_without_redoing_finished_trials(finished):
    path, out, done_before = finished
    for name in done_before:
        assert f"trains {name}" not in out.stderr
    trials = {t["name"]: t for t in Store(path.parent / "sweep" / "store.sqlite").trials()}
    assert sum(t["status"] == "done" for t in trials.values()) == 13  # 3 sizes x 4, held out
    (failed,) = [t for t in trials.values() if t["status"] == "failed" and t["role"] == "stable"]
    assert "non-finite" in failed["error"] and failed["attempts"] == 3  # then given up
    assert out.stderr.count(f"FAILED {failed['name']}") == 3  # the worker went on each time
    orphans = [t for t in trials.values() if t["parent"] == failed["name"]]
    assert len(orphans) == 3 and all(t["status"] == "failed" and t["attempts"] == 0 and
                                     "stable run" in t["error"] for t in orphans)
    assert "4 trials failed for good" in out.stdout and "--retry-failed" in out.stdout
    for t in trials.values():  # every branch trained after its stable run, from its checkpoint
        if t["parent"] and t["status"] == "done":
            assert "branching from step" in (Path(path.parent / "sweep" / "trials" / t["name"] /
                                                   "train.log").read_text())


def test_the_prediction_is_registered_once_from_the_fitting_runs(finished, capsys):
    path, out, _ = finished
    sweep_dir = path.parent / "sweep"
    registered = json.loads((sweep_dir / "prediction.json").read_text())
    assert registered == Store(sweep_dir / "store.sqlite").prediction()
    fitting = [t.name for t in spec_lib.plan(spec_lib.load_spec(path)) if t.role == "fit"]
    assert registered["fitted_runs"] == sorted(n for n in fitting if "d24" not in n)
    fit = json.loads((sweep_dir / "fit.json").read_text())
    (held,) = registered["runs"]
    (scored,) = fit["holdout"]["runs"]
    assert held["run"] == scored["run"] and held["loss"] is None and held["are"] is None
    for key in ("params", "tokens", "flops", "compute_ratio", "predicted", "interval"):
        assert held[key] == pytest.approx(scored[key], rel=1e-9), key
    assert held["compute_ratio"] > 4 and held["flops_6nd"] < held["flops"]
    lo, hi = held["interval"]
    assert lo < held["predicted"] < hi and scored["loss"] > 0
    # the law's reach, tried on the fitting runs at the held-out run's compute ratio
    assert registered["backtest"]["ratio"] == pytest.approx(held["compute_ratio"])
    report = (sweep_dir / "report.md").read_text()
    for part in ("Held-out prediction (registered)", "Where the time went", "Study MFU",
                 "| steps |", "plots/holdout.png", "N counts all parameters.",
                 "Its reach, tried on the fitting runs when the prediction was registered",
                 "The law's misfit on its own runs (refitted on the smaller",
                 "- With N counted as non-embedding parameters: E ",
                 "- With the other law of N and D, `kaplan-nd`, fitted alike: E "):
        assert part in report, part
    assert "Refit after registration" not in report
    assert "held-out" in out.stdout and "ARE" in out.stdout
    code, refit, err = lm_here(capsys, "fit", str(sweep_dir), "--out",
                               str(path.parent / "refit.json"), "--min-tokens-per-param", "0",
                               "--bootstrap", "0")  # the ARE needs no intervals
    assert code == 0, err
    refitted = json.loads((path.parent / "refit.json").read_text())
    assert refitted["are"] == pytest.approx(fit["are"])
    assert refitted["backtest"]["ratio"] == pytest.approx(held["compute_ratio"], rel=1e-6)
    assert "backtest: " in refit
    assert refitted["law_spread"]["law"] in ("chinchilla", "kaplan-nd")
    assert "the other law of N and D, " in refit


def test_n_counted_by_flops_is_each_trials_flops_per_token_over_6(finished, capsys):
    path, _, _ = finished
    spec = spec_lib.load_spec(path)
    points, _ = load_points(path.parent / "sweep", params="flops")
    by_flops = dataclasses.replace(spec, fit=dataclasses.replace(spec.fit, params="flops"))
    trials = {t.name: t for t in spec_lib.plan(spec)}
    assert len(set(points.params)) >= 3
    for run, n, tokens, flops in zip(points.run, points.params, points.tokens, points.flops):
        assert n == spec_lib.fit_params(by_flops, trials[run].cfg) == \
            trials[run].facts()["flops_per_token"] / 6
        assert 6 * n * tokens == pytest.approx(flops, rel=1e-12)  # C = 6ND, exactly
        assert n > spec_lib.fit_params(spec, trials[run].cfg)  # attention and head count
    held = [t for t in trials.values() if t.role == "holdout"]
    for counted in ("total", "non_embedding", "flops"):  # a registration from before 8c3d2be
        old = {"fit": {}, "runs": [{"run": t.name, "params": spec_lib.counted_params(t.cfg,
                                                                                 counted)}
                                   for t in held]}
        assert runner.registered_count(old, list(trials.values())) == counted
    out = path.parent / "by_flops.json"
    assert cli.main(["fit", str(path.parent / "sweep"), "--params", "flops", "--bootstrap", "0",
                     "--out", str(out)]) == 0
    assert "N counts the training FLOPs per token / 6" in capsys.readouterr().out
    assert json.loads(out.read_text())["n_counted"] == "flops"  # lm predict needs to know
    assert cli.main(["predict", str(out), "--params", "1e5", "--tokens", "1e7"]) == 0
    assert "N counts the training FLOPs" in capsys.readouterr().out


def test_status_lists_every_trial_as_json(finished, capsys):
    path, _, _ = finished
    assert cli.main(["sweep", "--status", str(path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 17
    for row in rows:
        assert {"name", "role", "status", "worker", "attempts", "wall_s"} <= set(row)
        assert row["status"] == "failed" or row["attempts"] >= 1 and row["worker"]


def test_editing_a_finished_sweep_keeps_its_record(finished, tmp_path, capsys):
    path, _, _ = finished
    sweep_dir = tmp_path / "sweep"
    shutil.copytree(path.parent / "sweep", sweep_dir)
    spec = yaml.safe_load(path.read_text())
    registered = (sweep_dir / "prediction.json").read_bytes()

    changed = dict(spec, dir=str(sweep_dir), recipe={**spec["recipe"], "lr": 5e-3})
    (tmp_path / "changed.yaml").write_text(yaml.safe_dump(changed))
    sweep_yaml = (sweep_dir / "sweep.yaml").read_bytes()
    code, _, err = lm_here(capsys, "sweep", str(tmp_path / "changed.yaml"), "--cpu-devices", "8")
    assert code == 2 and "planned with another config" in err
    assert (sweep_dir / "sweep.yaml").read_bytes() == sweep_yaml  # refused: nothing written

    # one size fewer, and N counted another way
    fewer = dict(spec, dir=str(sweep_dir), sizes=spec["sizes"][:3],
                 fit={**spec["fit"], "params": "flops"})
    (tmp_path / "fewer.yaml").write_text(yaml.safe_dump(fewer))
    code, _, err = lm_here(capsys, "sweep", str(tmp_path / "fewer.yaml"), "--cpu-devices", "8")
    assert code == 0, err[-2000:]
    assert (sweep_dir / "prediction.json").read_bytes() == registered
    report = (sweep_dir / "report.md").read_text()
    assert "Kept, not fitted" in report and "d24-l1-h2-t5.12e03-s0" in report
    assert "Held-out prediction (registered)" in report and "Refit after registration" in report
    # the registered fit is still scored at the N it was made with: its row as first reported
    before = (path.parent / "sweep" / "report.md").read_text()
    row = next(line for line in before.splitlines() if line.startswith("| d") and "%" in line)
    assert row in report
    assert "It counted N as all parameters (the spec now counts the training FLOPs" in report
    assert json.loads((sweep_dir / "fit.json").read_text())["n_counted"] == "flops"
    # a rerun that trained nothing reports where the study's time went, as before it, the
    # trials of the size it no longer has included: the time went into them too
    def time_section(text):
        return text.split("## Where the time went")[1].split("## Trials")[0]

    assert time_section(report) == time_section(before)
    assert "trials ended in one run of `lm sweep`" in report


def test_the_report_refits_only_what_changed_since_the_registration(finished, tmp_path,
                                                                    monkeypatch):
    """Rerun on a finished sweep, the report takes the registered fit as it is; a fit setting
    edited since (here the bootstrap's size) makes it refit, and report the refit beside it."""
    path, _, _ = finished
    sweep_dir = tmp_path / "sweep"
    shutil.copytree(path.parent / "sweep", sweep_dir)
    refits = []
    fit = runner._fit
    monkeypatch.setattr(runner, "_fit", lambda spec, points: (
        refits.append(spec.fit) or fit(spec, points)))

    def report(**changes):
        raw = dict(yaml.safe_load(path.read_text()), dir=str(sweep_dir), **changes)
        (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
        spec = spec_lib.load_spec(tmp_path / "s.yaml")
        trials = spec_lib.plan(spec)
        refits.clear()
        runner._report(spec, trials, Store(sweep_dir / "store.sqlite"))
        # the law with the spec's own settings; others are the report's alternatives
        return [f for f in refits if f == spec.fit], (sweep_dir / "report.md").read_text()

    main_refits, text = report()
    assert main_refits == [] and "Refit after registration" not in text
    registered = json.loads((sweep_dir / "prediction.json").read_text())["fit"]
    assert json.loads((sweep_dir / "fit.json").read_text())["objective"] == registered["objective"]
    spec = yaml.safe_load(path.read_text())
    main_refits, text = report(fit={**spec["fit"], "bootstrap": spec["fit"]["bootstrap"] + 1})
    assert len(main_refits) == 1 and "Refit after registration" in text

    # A held-out run the registration does not hold is refused before anything trains; one
    # taken out of the spec after it trained is still scored as registered.
    (old,) = [r["run"] for r in json.loads((sweep_dir / "prediction.json").read_text())["runs"]]
    store = Store(sweep_dir / "store.sqlite")
    for holdout in ({**spec["holdout"], "tokens": 2 * spec["holdout"]["tokens"]}, {}):
        (tmp_path / "s.yaml").write_text(yaml.safe_dump(dict(spec, dir=str(sweep_dir),
                                                             holdout=holdout)))
        edited = spec_lib.load_spec(tmp_path / "s.yaml")
        trials = spec_lib.plan(edited)
        if holdout:
            with pytest.raises(ConfigError, match=r"held-out run .*-t6.55e04-s0 is not in the "
                                                  r"prediction registered in .* new `dir`"):
                store.sync(edited.name, "edited", trials, replan=True)
    store.sync(edited.name, "edited", trials, replan=True)
    runner._report(edited, trials, store)
    registered_part = (sweep_dir / "report.md").read_text().split(
        "## Held-out prediction (registered)")[1].split("##")[0]
    assert f"| {old} |" in registered_part and "not trained yet" not in registered_part


def test_a_size_whose_seeds_spread_beyond_fit_max_noise_leaves_the_fit(tmp_path):
    """The spec's rule: a size whose seeds spread by more than fit.max_noise is not fitted; the
    report says so and gives each size's spread, pooled and budget by budget. (Finished trials
    written to the store: 3 seeds a size, the smallest 5% noisy, the others 0.1%.)"""
    sizes = [{**s, "seeds": 3} for s in SIZES + [DIVERGES | {"model.init_std": 0.02}]]
    path = finished_sweep(tmp_path, lambda t: 0.05 if t.cfg.model.d_model == 16 else 0.001,
                          sizes=sizes, holdout={},
                          fit={"bootstrap": 0, "min_tokens_per_param": 0, "max_noise": 0.01})
    spec = spec_lib.load_spec(path)
    trials = spec_lib.plan(spec)
    store = Store(spec.path / "store.sqlite")
    fit = runner._report(spec, trials, store)
    noisy = {t.name for t in trials if t.cfg.model.d_model == 16}
    assert fit.n_runs == len(trials) - len(noisy)
    table = (spec.path / "report.md").read_text().split("Run-to-run noise by model size")[1]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "%" in line]
    assert len(rows) == 4 and rows[0].endswith("| no: too noisy (fit.max_noise) |")
    assert all(r.endswith("| yes |") for r in rows[1:])
    assert all(len(re.findall(r"\de\+\d+: \d", r)) == 3 for r in rows)  # each budget's spread


def test_two_workers_on_postgres_one_killed_mid_trial(finished, postgres, tmp_path):
    """Every trial ends done exactly once, with the losses of the one-worker SQLite run, though
    one worker is killed and every connection to the store is ended every 3 s."""
    import threading

    path, _, _ = finished
    url = fresh_database(postgres)
    # the same trials, without those that fail and the held-out run (and its registration)
    spec = spec_file(tmp_path, recipe=WSD, holdout={})
    args = ["sweep", str(spec), "--worker", "--store", url, "--cpu-devices", "1",
            "--stale-after", "8"]  # a lease of 4 s: no healthy worker fenced on a busy host
    workers = [subprocess.Popen([sys.executable, "-m", "lm.cli", *args],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    store = Store(url)
    victim = None
    deadline = time.time() + 300
    while victim is None and time.time() < deadline and workers[0].poll() is None:
        for row in store.trials():  # a trial far enough in to have logged steps
            if row["status"] == "running" and row["worker"].endswith(f":{workers[0].pid}") \
                    and (tmp_path / "sweep" / "trials" / row["name"] / "metrics.jsonl").exists():
                victim = row["name"]
        time.sleep(0.1)
    assert victim, f"worker 0 never got a trial (exit code {workers[0].poll()})"
    workers[0].kill()
    done = threading.Event()

    def cutting():
        while not done.wait(3):
            cut(url)

    threading.Thread(target=cutting, daemon=True).start()
    try:
        err = workers[1].communicate(timeout=600)[1]
    finally:
        done.set()
    assert "lost the store" in err  # the cuts came while it worked
    assert workers[1].returncode == 0, err[-3000:]
    rows = {r["name"]: r for r in store.trials()}
    assert all(r["status"] == "done" for r in rows.values())
    # claimed once each (no claim whose reply was lost left behind), the victim's reclaimed
    # from the dead worker and resumed once
    assert {n: r["attempts"] for n, r in rows.items()} == {n: 1 + (n == victim) for n in rows}
    metrics = [json.loads(line)["step"] for line in open(
        tmp_path / "sweep" / "trials" / victim / "metrics.jsonl")]
    assert metrics == sorted(set(metrics))  # no step twice
    reference = final_losses(path.parent / "sweep" / "store.sqlite")
    assert final_losses(url) == {name: reference[name] for name in rows}  # bit for bit


def test_bad_stores_fail_before_any_training(finished, postgres, tmp_path, capsys):
    path, _, _ = finished
    spec = spec_file(tmp_path, name="other")
    for url, message in [("postgresql://lm@127.0.0.1:1/postgres", "cannot reach the store"),
                         (postgres.replace("lm@", "intruder@"), "cannot reach the store"),
                         (str(path.parent / "sweep" / "store.sqlite"), "holds sweep 't'")]:
        code, _, err = lm_here(capsys, "sweep", str(spec), "--store", url, "--cpu-devices", "8")
        assert code == 2 and message in err, err[-2000:]
        assert not (tmp_path / "sweep" / "trials").exists()
    other = spec_file(tmp_path, tokens=[5120, 8192, 16384])  # the same sweep, planned otherwise
    store_copy = tmp_path / "copy.sqlite"
    shutil.copy(path.parent / "sweep" / "store.sqlite", store_copy)
    Store(store_copy).db.execute("UPDATE sweep SET value='t' WHERE key='name'")
    code, _, err = lm_here(capsys, "sweep", str(other), "--worker", "--store", str(store_copy),
                           "--cpu-devices", "8")
    assert code == 2 and "planned by another spec" in err
    spec = spec_file(tmp_path, name="other")
    theirs = path.parent / "sweep" / "store.sqlite"  # reading or rebuilding: refused too
    before = theirs.read_bytes()
    for command in (runner.status, runner.rebuild_store):
        with pytest.raises(StoreError, match="holds sweep 't', not 'other'"):
            command(spec, str(theirs))
    assert theirs.read_bytes() == before and not list(theirs.parent.glob("*.damaged-*"))


def test_a_store_new_to_a_sweep_that_has_trained_is_refused(finished, postgres, tmp_path,
                                                            capsys):
    """A mistyped --store would record every trial done again, from its run directory, in a
    store of its own, and rewrite the report: refused, by the runner and by a worker, before
    the file is created."""
    path, _, _ = finished
    sweep_dir = path.parent / "sweep"
    report = (sweep_dir / "report.md").read_bytes()
    typo, database = tmp_path / "stor.sqlite", fresh_database(postgres)
    for url in (str(typo), database):
        for mode in ([], ["--worker"]):
            code, _, err = lm_here(capsys, "sweep", str(path), *mode, "--store", url,
                                   "--cpu-devices", "8")
            assert code == 2, err[-2000:]
            assert f"sweep 't' has trained in {sweep_dir}" in err
            assert f"but {url} holds no sweep" in err
            assert f"--store {url}" not in err  # its rebuild hint: not at the typo
            assert "--store PATH --rebuild-store`" in err
    assert not typo.exists()
    assert (sweep_dir / "report.md").read_bytes() == report
    # the hint holds for PostgreSQL too: a store that holds no trial is filled, once
    rows = runner.status(path)
    done = [r["name"] for r in rows if r["status"] == "done"]
    where = Store(database).path  # the URL without its user and password
    assert runner.rebuild_store(path, database) == \
        f"rebuilt {where}: {len(done)} of {len(rows)} trials done, the rest pending"
    assert [r["name"] for r in runner.status(path, database) if r["status"] == "done"] == done
    with pytest.raises(StoreError, match=re.escape(f"{where} holds the trials of sweep 't'")):
        runner.rebuild_store(path, database)


def test_the_plan_is_refused_where_the_run_would_be(finished, tmp_path, capsys):
    """--plan checks a spec against the sweep's store as the run does, writing nothing."""
    path, _, _ = finished
    spec = yaml.safe_load(path.read_text())
    store = path.parent / "sweep" / "store.sqlite"
    before = store.read_bytes()
    code, out, err = lm_here(capsys, "sweep", "--plan", str(path), "--cpu-devices", "8")
    assert code == 0 and "FLOPs" in out, err[-2000:]
    for changes, message in [({"name": "other"}, "holds sweep 't', not 'other'"),
                             ({"holdout": {**spec["holdout"], "tokens": 65536}},
                              "is not in the prediction registered"),
                             ({"recipe": {**spec["recipe"], "lr": 2e-2}},
                              "was planned with another config")]:
        (tmp_path / "s.yaml").write_text(yaml.safe_dump({**spec, **changes}))
        code, _, err = lm_here(capsys, "sweep", "--plan", str(tmp_path / "s.yaml"),
                               "--cpu-devices", "8")  # this process's devices
        assert code == 2 and message in err, err[-2000:]
    typo = tmp_path / "stor.sqlite"  # a new store beside the trained runs
    with pytest.raises(StoreError, match=f"but {typo} holds no sweep"):
        runner.plan_text(path, 1, url=str(typo))
    assert store.read_bytes() == before and not typo.exists()


def test_the_plan_checks_the_registration_a_run_would_take_from_prediction_json(tmp_path):
    """A store that has not taken prediction.json's registration yet (rebuilt; an older lm's):
    the run registers it first, so the plan checks the held-out runs against it too."""
    path = finished_sweep(tmp_path)
    spec = spec_lib.load_spec(path)
    (held,) = [t.name for t in spec_lib.plan(spec) if t.role == "holdout"]
    (spec.path / runner.PREDICTION).write_text(json.dumps({"runs": [{"run": held}]}))
    runner.plan_text(path, 1)  # the plan as registered
    raw = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**raw, "holdout": {**raw["holdout"], "tokens": 65536}}))
    with pytest.raises(ConfigError, match="is not in the prediction registered"):
        runner.plan_text(path, 1)


def test_the_plan_ignores_a_damaged_prediction_json_as_the_run_does(tmp_path):
    """Where the store holds the registration the run never reads the file: nor does the plan."""
    path = finished_sweep(tmp_path)
    spec = spec_lib.load_spec(path)
    (held,) = [t.name for t in spec_lib.plan(spec) if t.role == "holdout"]
    Store(spec.path / "store.sqlite").register({"runs": [{"run": held}]}, [held])
    (spec.path / runner.PREDICTION).write_text('{"runs": [')
    assert "FLOPs" in runner.plan_text(path, 1)


def test_a_first_runner_s_store_beside_its_runs_is_the_sweep_s_not_a_new_one(tmp_path):
    """The first runner's stores named no sweep; one holding trials is not a new store: a plan
    leaves it as it is (checking it would upgrade it), a rebuild refuses it as intact, and a
    run opens and upgrades it."""
    path = spec_file(tmp_path)
    spec = spec_lib.load_spec(path)
    trial = spec_lib.plan(spec)[0]
    trial.run_dir.mkdir(parents=True)
    config.dump(trial.cfg, trial.run_dir / "config.yaml")
    store = spec.path / "store.sqlite"
    with contextlib.closing(sqlite3.connect(store)) as con:
        con.executescript(V1)
        con.execute("INSERT INTO trials (name, role, config) VALUES (?, 'fit', ?)",
                    (trial.name, json.dumps(config.to_dict(trial.cfg), sort_keys=True)))
        con.commit()
    before = store.read_bytes()
    assert f"not checked against {store}: an older lm's store" in runner.plan_text(path, 1)
    with pytest.raises(StoreError, match="is intact"):
        runner.rebuild_store(path)
    assert store.read_bytes() == before
    opened = runner._open_store(spec, str(store), "lm sweep s.yaml")
    assert opened.current and [t["name"] for t in opened.trials()] == [trial.name]


def test_a_sweep_whose_every_size_is_too_noisy_to_fit_says_so(tmp_path):
    """fit.max_noise below every size's spread leaves no point to fit: said as that (it was an
    IndexError's traceback), with the least spread to set it by."""
    path = finished_sweep(tmp_path, sizes=[{**s, "seeds": 2} for s in SIZES],
                          fit={"bootstrap": 0, "min_tokens_per_param": 0, "max_noise": 1e-6})
    spec = spec_lib.load_spec(path)
    fitting = [t.name for t in spec_lib.plan(spec) if t.role == "fit"]
    with pytest.raises(FitError, match=r"every size's seeds spread by more than fit.max_noise="
                                       r"1e-06 \(the least by 0\.\d+\), so none is left"):
        runner._fitting_points(spec, Store(spec.path / "store.sqlite"), fitting)


def test_a_url_of_another_scheme_is_refused_not_taken_for_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = spec_file(tmp_path)
    for url in ("postgresql+psycopg://nobody@127.0.0.1:1/x", "mysql://x"):
        with pytest.raises(StoreError, match="not a store URL lm reads"):
            runner.status(spec, url)
        with pytest.raises(StoreError, match="not a store URL lm reads"):
            load_points(url)
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.yaml"]  # nothing created


def test_a_damaged_store_is_rebuilt_from_the_run_directories(finished, tmp_path, capsys):
    """...but not by a spec other than the one the trials ran with."""
    path, _, _ = finished
    spec = yaml.safe_load(path.read_text())
    sweep_dir = tmp_path / "sweep"
    shutil.copytree(path.parent / "sweep", sweep_dir)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(dict(spec, dir=str(sweep_dir))))
    (sweep_dir / "store.sqlite").write_bytes(b"")  # emptied
    status = runner.status_text(tmp_path / "s.yaml")
    assert "holds no trials, but its trials have run directories" in status
    assert status.endswith(f"lm sweep {tmp_path / 's.yaml'} --rebuild-store`")
    (sweep_dir / "store.sqlite").write_bytes(b"garbage " * 512)
    code, _, err = lm_here(capsys, "sweep", "--status", str(tmp_path / "s.yaml"))
    assert code == 2 and "not a sweep store" in err
    assert "--rebuild-store" in err
    edited = dict(spec, dir=str(sweep_dir), recipe={**spec["recipe"], "lr": 2e-2})
    (tmp_path / "edited.yaml").write_text(yaml.safe_dump(edited))  # not what the trials ran
    code, _, err = lm_here(capsys, "sweep", str(tmp_path / "edited.yaml"), "--rebuild-store")
    assert code == 2 and "ran with another config than the spec plans" in err
    assert not list(sweep_dir.glob("store.sqlite.damaged-*"))  # nothing moved or written
    code, out, err = lm_here(capsys, "sweep", str(tmp_path / "s.yaml"), "--rebuild-store")
    assert code == 0 and "13 of 17 trials done" in out, err
    assert final_losses(sweep_dir / "store.sqlite") == final_losses(
        path.parent / "sweep" / "store.sqlite")
    assert Store(sweep_dir / "store.sqlite").prediction() is not None  # from prediction.json
    assert list(sweep_dir.glob("store.sqlite.damaged-*"))
    rebuilt = (sweep_dir / "store.sqlite").read_bytes()  # intact now: nothing to mend
    code, _, err = lm_here(capsys, "sweep", str(tmp_path / "s.yaml"), "--rebuild-store")
    assert code == 2 and "is intact (it reads whole and holds sweep 't''s 17 " \
        "trials)" in err and "move it away first" in err, err[-2000:]
    assert (sweep_dir / "store.sqlite").read_bytes() == rebuilt
    assert len(list(sweep_dir.glob("store.sqlite.damaged-*"))) == 1


def test_a_fit_that_fails_registers_nothing_and_the_held_out_runs_wait(tmp_path, monkeypatch):
    """A registration is for ever, so a failed fit registers none: the held-out runs stay
    blocked until a fit succeeds (the cause fixed), which registers and releases them."""
    path = finished_sweep(tmp_path)
    spec = spec_lib.load_spec(path)
    trials = spec_lib.plan(spec)
    store = Store(spec.path / "store.sqlite")
    store.db.execute("UPDATE trials SET status='blocked' WHERE role='holdout'")

    def overflow(*args, **kwargs):
        raise OverflowError("math range error")

    fit = runner.scaling.fit
    monkeypatch.setattr(runner.scaling, "fit", overflow)
    with pytest.raises(FitError, match="OverflowError: math range error.*add sizes"):
        runner.register_when_ready(spec, trials, store)
    assert store.prediction() is None and not (spec.path / "prediction.json").exists()
    assert {r["status"] for r in store.trials() if r["role"] == "holdout"} == {"blocked"}
    monkeypatch.setattr(runner.scaling, "fit", fit)
    assert runner.register_when_ready(spec, trials, store)
    assert {r["status"] for r in store.trials() if r["role"] == "holdout"} == {"pending"}
    assert json.loads((spec.path / "prediction.json").read_text()) == store.prediction()


def test_no_prediction_is_registered_after_a_held_out_run_trained(tmp_path):
    """A store without its registration whose held-out run trained (rebuilt without
    prediction.json) registers none now, and says how to go on; the file put back is read into
    the store. A registration whose file went missing is written out again, and held-out runs
    blocked again after it (a worker's sync racing it on PostgreSQL) are released."""
    path = finished_sweep(tmp_path)  # every trial done, nothing registered
    spec = spec_lib.load_spec(path)
    trials = spec_lib.plan(spec)
    store = Store(spec.path / "store.sqlite")
    file = spec.path / "prediction.json"
    with pytest.raises(StoreError, match="held-out run .* trained without a registered "
                                         "prediction.*put the sweep's prediction.json back"):
        runner.register_when_ready(spec, trials, store)
    assert store.prediction() is None and not file.exists()
    file.write_text(json.dumps({"made": "before", "runs": []}))
    assert not runner.register_when_ready(spec, trials, store)  # registered already: read in
    assert store.prediction() == {"made": "before", "runs": []}
    file.unlink()
    store.db.execute("UPDATE trials SET status='blocked' WHERE role='holdout'")  # as a worker's
    assert not runner.register_when_ready(spec, trials, store)  # sync racing the registration
    assert json.loads(file.read_text()) == store.prediction()
    assert {r["status"] for r in store.trials() if r["role"] == "holdout"} == {"pending"}


def test_a_sweep_whose_every_trial_has_ended_reports_without_starting_a_worker(tmp_path,
                                                                              monkeypatch):
    """Rerun to report again, `lm sweep` starts no worker: one would only start JAX to find
    nothing to claim. A trial not ended yet gets one."""
    path = finished_sweep(tmp_path)
    spawned = []

    class Ended:  # a worker that exits at once
        returncode = 0

        def poll(self):
            return 0

        wait = poll

    monkeypatch.setattr(runner, "_spawn", lambda *args: spawned.append(args) or Ended())
    report = tmp_path / "sweep" / "report.md"
    runner.run(path, cpu_devices=8)
    assert spawned == [] and report.is_file()
    store = Store(tmp_path / "sweep" / "store.sqlite")
    (name,) = [r["name"] for r in store.trials() if r["role"] == "holdout"]
    store.db.execute("UPDATE trials SET status='pending' WHERE name=?", (name,))
    with pytest.raises(Incomplete, match="1 trial not run"):
        runner.run(path, cpu_devices=8)
    assert len(spawned) == 1


def test_a_sweep_whose_fitting_runs_all_failed_fails_and_can_retry_them(tmp_path):
    """No fitting run to fit: `lm sweep` ends with an error that says so and how to go on,
    registers nothing, trains no held-out run; --retry-failed queues the failed trials again."""
    path = finished_sweep(tmp_path)
    store = Store(tmp_path / "sweep" / "store.sqlite")
    store.db.execute("UPDATE trials SET status='blocked' WHERE role='holdout'")
    store.db.execute("UPDATE trials SET status='failed', error='boom', failures=3 "
                     "WHERE role='fit'")
    out = lm("sweep", str(path), "--workers", "1", "--cpu-devices", "1")
    assert out.returncode == 1, out.stderr[-2000:]
    assert "no prediction is registered" in out.stderr and "--retry-failed" in out.stderr
    assert "Traceback" not in out.stderr and store.prediction() is None
    status = runner.status_text(path)
    assert "9 failed" in status and "boom" in status and "--retry-failed" in status
    row = next(r for r in store.trials() if r["role"] == "fit")
    assert f"C={row['flops']:.3g} " in status  # a run's compute, from step 0
    worker = lm("sweep", str(path), "--worker", "--cpu-devices", "1")  # one started elsewhere
    assert worker.returncode == 2 and "no prediction registered" in worker.stderr
    held = {r["name"] for r in store.trials() if r["role"] == "holdout"}
    fitting = {r["name"] for r in store.trials() if r["role"] == "fit"}
    assert {r["status"] for r in store.trials() if r["name"] in held} == {"blocked"}
    assert store.retry_failed(fitting | held) == sorted(fitting)
    assert {(r["status"], r["failures"]) for r in store.trials() if r["name"] in fitting} == {
        ("pending", 0)}
    assert {r["status"] for r in store.trials() if r["name"] in held} == {"blocked"}


def test_a_worker_waiting_for_the_registration_compiles_the_held_out_runs(tmp_path,
                                                                         monkeypatch):
    """While the fitting trials train elsewhere, a worker with nothing to claim compiles the
    held-out runs' programs, once, and trains nothing: the registration's wait hides their
    compile, every program of it."""
    from lm import config, train

    spec = spec_lib.load_spec(spec_file(tmp_path))
    trials = {t.name: t for t in spec_lib.plan(spec)}
    store = Store(spec.path / "store.sqlite")
    store.sync(spec.name, runner.plan_digest(list(trials.values())), list(trials.values()))
    fitting = [n for n, t in trials.items() if t.role == "fit"]
    assert sorted(store.claim("w2", [n]) for n in fitting) == sorted(fitting)
    stop, session, compiled = types.SimpleNamespace(signum=None), train.Session(), []
    prepare = session.prepare
    monkeypatch.setattr(session, "prepare", lambda cfg: compiled.append(cfg) or prepare(cfg))
    monkeypatch.setattr(runner.time, "sleep",  # the worker's first idle wait ends the test
                        lambda s: setattr(stop, "signum", signal.SIGTERM))
    runner._work(spec, trials, store, session, "w1", 60.0, stop)
    held = [t.cfg for t in trials.values() if t.role == "holdout"]
    assert compiled == held
    assert {(r["status"], r["worker"]) for r in store.trials() if r["name"] in fitting} == {
        ("running", "w2")}
    assert {r["status"] for r in store.trials() if r["role"] == "holdout"} == {"blocked"}
    session.seconds.clear()  # its first steps, with its step, init and evaluator (the step's
    # shape, not its length, decides them): all compiled ahead
    train.train(config.replace(held[0], train={"steps": 8}, optim={"warmup_steps": 2}),
                session=session)
    assert session.seconds["steps"] > 0 and "compile" not in session.seconds


@pytest.fixture(scope="module")
def session():
    """One worker's compiled programs, shared by the tests of its trials (one shape)."""
    from lm import train

    return train.Session()


@pytest.fixture
def claimed(tmp_path):
    """A sweep's first fitting trial, claimed by worker w1: (its store, the trial)."""
    spec = spec_lib.load_spec(spec_file(tmp_path))
    trials = spec_lib.plan(spec)
    trial = next(t for t in trials if t.role == "fit")
    store = Store(spec.path / "store.sqlite")
    store.sync(spec.name, runner.plan_digest(trials), trials)
    assert store.claim("w1", [trial.name]) == trial.name
    return store, trial


@pytest.mark.parametrize("beat", ["taken over", "unreachable"])
def test_a_worker_that_lost_its_trial_stops_without_writing_it(claimed, session, monkeypatch,
                                                              caplog, beat):
    """A worker whose trial the store gives to another (its first heartbeat, sent as the trial
    starts, says so), or whose heartbeats have not got through for half the time after which
    others take a trial over (a clock that moves a minute a look), stops before it writes: no
    checkpoint, evaluation or metrics, and nothing of its own in the store."""
    import itertools

    from lm import rundir

    store, trial = claimed

    def lost(self, name, worker):
        if beat == "unreachable":
            raise OSError("connection refused")
        return False

    monkeypatch.setattr(Store, "beat", lost)
    if beat == "unreachable":
        minutes = itertools.count(0.0, 60.0)
        monkeypatch.setattr(runner, "_clock", lambda: next(minutes))
    runner._train_one(trial, session, store, "w1", stale_s=60.0)
    row = {r["name"]: r for r in store.trials()}[trial.name]
    assert (row["status"], row["worker"], row["failures"]) == ("running", "w1", 0)
    assert store.last_losses() == {}
    assert not rundir.checkpoints(trial.run_dir).exists()
    assert not (trial.run_dir / rundir.EVALS).exists()
    assert not (trial.run_dir / rundir.METRICS).exists()
    assert any("stopped before its first step without writing" in r.getMessage()
               for r in caplog.records)


def test_a_run_whose_claim_lapses_mid_way_writes_nothing_after(claimed, session, tmp_path):
    """The lease is checked at every step's end, before logging, evaluating or saving: what
    the run wrote stops at the last step it was valid for, and a save then in flight ends."""
    from lm import config, rundir, train
    from lm.errors import Fenced

    class Lapsing:  # valid for its first `calls` checks
        def __init__(self, calls):
            self.calls = calls

        def valid(self):
            self.calls -= 1
            return self.calls >= 0

    run = tmp_path / "run"
    cfg = config.replace(claimed[1].cfg, train={"steps": 16, "log_every": 1, "run_dir": str(run)},
                         checkpoint={"every_steps": 4, "every_seconds": 0},
                         eval={"every_steps": 4, "log_points": 0})
    session.lease = Lapsing(1 + 8 + 2)  # before the first step, steps 1-8 and their 2 saves
    try:
        with pytest.raises(Fenced, match="after step 9 without writing"):
            train.train(cfg, session=session)
    finally:
        session.lease = None
    assert [r["step"] for r in rundir.metrics(run)] == list(range(1, 9))
    assert max(int(p.name) for p in rundir.checkpoints(run).glob("[0-9]*")) == 8
    assert max(r["step"] for r in rundir.evals(run)) == 8


def test_a_held_out_run_that_failed_is_reported_as_failed(tmp_path):
    """The registered prediction of a held-out run that failed for good is listed as failed,
    not as waiting to train, and the header counts the runs the fit used."""
    from lm import report
    from lm.scaling import Fit
    path = finished_sweep(tmp_path)
    spec = spec_lib.load_spec(path)
    store = Store(spec.path / "store.sqlite")
    store.db.execute("UPDATE trials SET status='blocked' WHERE role='holdout'")
    assert runner.register_when_ready(spec, spec_lib.plan(spec), store)
    store.db.execute("UPDATE trials SET status='failed' WHERE role='holdout'")
    registered = store.prediction()
    prior = Fit.from_json(registered["fit"])
    timing = report.time_split([report.Timing(1, 0.0, 1.0, 1e9)], store.trials())
    text = report.render(report.Results(spec.name, spec.base, None, None, None, store.trials(),
                                        registered, prior, [], timing), [])
    held = next(t.name for t in spec_lib.plan(spec) if t.role == "holdout")
    assert f"- {held}: predicted" in text and "(FAILED: no loss to score)" in text
    assert "not trained yet" not in text
    assert f"from the fit of {prior.n_runs} fitting runs" in text


@pytest.mark.parametrize("exit_code, spawned, announced", [
    (ConfigError.exit_code, 1, 0),  # a refusal: it said why, and the next would refuse too
    (1, 3, 3),  # a crash: announced, and replaced up to twice per worker
])
def test_a_worker_that_refused_is_neither_announced_nor_replaced(claimed, monkeypatch, caplog,
                                                                 exit_code, spawned,
                                                                 announced):
    store, trial = claimed
    procs = []

    def spawn(*args):  # a worker that ends at once, as one refusing after the runner accepted
        procs.append(subprocess.Popen([sys.executable, "-c", f"raise SystemExit({exit_code})"]))
        return procs[-1]

    monkeypatch.setattr(runner, "_spawn", spawn)
    monkeypatch.setattr(runner, "POLL_S", 0.01)
    names = {t["name"] for t in store.trials()}
    runner._supervise("sweep.yaml", (), "unused", 1, 1, 60.0, names, store)
    ended = [r for r in caplog.records if "ended with exit code" in r.getMessage()]
    assert (len(procs), len(ended)) == (spawned, announced)
    assert not any(t["status"] in runner.FINAL for t in store.trials())  # pending throughout


def test_an_interrupted_run_of_the_sweep_is_recorded(tmp_path, monkeypatch):
    """A runner stopped by Ctrl-C (after its workers saved their trials) still records its
    run, so that the study's time split counts the trials it ended."""
    def interrupted(*args):
        store = args[-1]
        name = store.claim("w")
        assert store.finish(name, [], 1.0, {"steps": 1.0}, worker="w")
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "_supervise", interrupted)
    path = spec_file(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        runner.run(path, workers=3, cpu_devices=1)
    (run,) = Store(tmp_path / "sweep" / "store.sqlite").runs()
    assert run["workers"] == 3 and run["started"] <= run["ended"] and run["peak"] > 0


def test_the_time_split_sums_the_runs_that_ended_trials():
    """Two runs of `lm sweep` (a study interrupted and resumed): their wall times, worker-seconds
    and capacity add up; a trial that ended outside both (in a run killed by SIGKILL, which
    leaves no record) is not counted, as that run's time is not; runs at once share their
    wall time."""
    from lm import report

    def row(updated, flops, steps):
        return {"status": "done", "updated": updated, "timings": json.dumps({"steps": steps}),
                "spent_flops": None, "flops": flops, "attempts": 1}

    runs = [report.Timing(2, 0.0, 10.0, 1e12), report.Timing(1, 20.0, 40.0, 2e12)]
    t = report.time_split(runs, [row(5.0, 1e12, 12.0), row(30.0, 4e12, 15.0),
                                 row(15.0, 9e12, 5.0)])
    assert (t["runs"], t["trials"], t["wall_s"], t["worker_s"]) == (2, 2, 30.0, 40.0)
    assert t["phases"]["steps"] == 27.0 and t["idle_s"] == 13.0
    assert t["mfu"] == pytest.approx(5e12 / (10 * 1e12 + 20 * 2e12))
    assert "2 trials ended in 2 runs of `lm sweep`: 30 s of wall time" in "\n".join(
        report._timing(t))
    assert "No run" in "\n".join(report._timing(report.time_split([], [])))
    # runners on two machines at once: their wall time overlaps, their worker-seconds add up
    overlapping = [*runs, report.Timing(1, 30.0, 50.0, 1e12)]
    assert report.time_split(overlapping, [])["wall_s"] == 40.0
    assert report.time_split(overlapping, [])["worker_s"] == 60.0


def test_a_sweep_takes_an_accelerators_data_sheet_peak_and_says_which(monkeypatch):
    """The study MFU and the plan divide by the peak of the workers' devices: an accelerator's
    data-sheet figure for all of them (a CPU matmul would put a GPU study above 100%), a
    measured CPU matmul on CPUs and for an accelerator no data sheet names; the report says
    which."""
    from lm import flops, report

    def host(platform, count, kind):
        monkeypatch.setattr(runner, "devices", lambda cpu_devices: runner.Devices(
            count, 2**30, platform, kind))
        return runner.peak(None)

    assert host("gpu", 8, "NVIDIA H200") == (8 * flops.PEAKS["NVIDIA H200"], "NVIDIA H200")
    measured, name = host("cpu", 1, "cpu")
    assert name == "measured cpu" and 1e8 < measured < 1e14
    measured, name = host("gpu", 1, "Some New GPU")
    assert name == "measured cpu: no data-sheet peak for Some New GPU" and measured < 1e14
    run = report.Timing(1, 0.0, 10.0, 8 * flops.PEAKS["NVIDIA H200"], "NVIDIA H200")
    text = "\n".join(report._timing(report.time_split([run], [])))
    assert f"a peak of {8 * flops.PEAKS['NVIDIA H200'] / 1e9:.0f} GFLOP/s (NVIDIA H200)" in text
    old = report.Timing(**{"workers": 1, "started": 0.0, "ended": 1.0, "peak": 1e11})
    assert old.peak_name == "measured cpu"  # a run recorded before the peak was named


def test_a_study_mfu_over_resumed_trials_says_it_is_an_upper_bound():
    """A trial resumed from an earlier attempt counts whole in the study MFU, though part of
    its FLOPs were spent before this run: the report says so."""
    from lm import report

    row = {"status": "done", "updated": 5.0, "timings": "{}", "spent_flops": 2e13,
           "flops": 2e13, "attempts": 1}
    run = report.Timing(1, 0.0, 10.0, 1e12)
    fresh = report.time_split([run], [row])
    resumed = report.time_split([run], [{**row, "attempts": 2}])
    assert (fresh["resumed"], resumed["resumed"]) == (0, 1)
    assert "upper bound" not in "\n".join(report._timing(fresh))
    assert "1 of the trials resumed an earlier attempt" in "\n".join(report._timing(resumed))


def test_an_override_yaml_cannot_read_is_dumped_as_its_text_in_sweep_yaml(tmp_path):
    """A spec's overrides are untyped dicts: a glob stays the override's own str subclass,
    which sweep.yaml is dumped with (it raised RepresenterError, a traceback)."""
    spec = spec_lib.load_spec(spec_file(tmp_path), ["overrides.data.source=*.txt"])
    assert "'*.txt'" in yaml.safe_dump(dataclasses.asdict(spec))
