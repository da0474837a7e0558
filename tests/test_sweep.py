import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lm import config, sweep
from lm.config import ConfigError

BASE = {"model.vocab_size": 128, "model.context": 32, "train.batch_size": 8,
        "train.log_every": 5, "mesh.data": -1, "mesh.model": 1, "optim.lr": 1e-2,
        "data.source": "synthetic"}
SIZES = [{"model.d_model": 16, "model.n_layers": 1, "model.n_heads": 2},
         {"model.d_model": 32, "model.n_layers": 1, "model.n_heads": 2},
         {"model.d_model": 48, "model.n_layers": 2, "model.n_heads": 2}]


def spec_file(tmp_path, **changes):
    spec = {"name": "t", "base": "tiny", "dir": str(tmp_path / "sweep"), "overrides": BASE,
            "sizes": SIZES, "tokens": [8192], "recipe": {"eval_points": 6, "lr": 1e-2},
            "holdout": {"size": {"model.d_model": 64, "model.n_layers": 2, "model.n_heads": 2},
                        "tokens": 16384},
            "fit": {"bootstrap": 5, "drop_early": 0.1}}
    spec.update(changes)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_plan_applies_the_recipe(tmp_path):
    spec = sweep.load_spec(spec_file(tmp_path, tokens=[8192, 16384],
                                     recipe={"lr": 1e-2, "lr_ref_width": 32, "lr_power": 1.0,
                                             "warmup_tokens_per_param": 0.5}))
    trials = sweep.plan(spec)
    assert len(trials) == 7 and [t.role for t in trials].count("holdout") == 1
    by_width = {(t.cfg.model.d_model, t.cfg.train.steps): t for t in trials}
    assert by_width[16, 32].cfg.optim.lr == pytest.approx(2e-2)  # 1e-2 * 32/16
    assert by_width[48, 64].cfg.optim.lr == pytest.approx(1e-2 * 32 / 48)
    warm = [by_width[w, 64].cfg.optim.warmup_steps for w in (16, 32, 48)]
    assert warm == sorted(warm) and warm[0] < warm[-1]  # warmup grows with model size
    facts = trials[0].facts()
    assert facts["tokens"] == trials[0].cfg.train.steps * 8 * 32
    assert facts["flops"] > facts["flops_6nd"] * 0.9 and facts["params_non_embedding"] > 0


def test_isoflop_plan_spends_each_budget(tmp_path):
    sizes = [{"model.d_model": d, "model.n_layers": 1, "model.n_heads": 2}
             for d in (16, 24, 32, 48, 64)]
    spec = sweep.load_spec(spec_file(tmp_path, tokens=[], isoflop=[3e10, 1e11], sizes=sizes,
                                     isoflop_points=3, holdout={}, fit={"law": "isoflop"}))
    trials = sweep.plan(spec)
    assert len(trials) == 6
    for t in trials:
        assert min(abs(t.facts()["flops"] / c - 1) for c in (3e10, 1e11)) < 0.05


@pytest.mark.parametrize("changes, message", [
    ({"tokens": [100]}, "recipe.min_steps"),
    ({"holdout": {"size": SIZES[0], "tokens": 100_000}}, None),
    ({"holdout": {"size": SIZES[0], "tokens": 8192}}, "held-out run"),
    ({"sizes": []}, "sizes"),
    ({"tokens": [8192], "isoflop": [1e10]}, "exactly one"),
    ({"sizes": SIZES[:2]}, "3 distinct model sizes"),
    ({"recipe": {"lr": 1e-2, "warmup": 3}}, "recipe.warmup"),
    ({"overrides": {**BASE, "train.batch_size": 2**22}, "tokens": [2**22 * 32 * 25],
      "holdout": {}}, "GiB"),
])
def test_bad_specs_fail_before_any_compute(tmp_path, changes, message):
    path = spec_file(tmp_path, **changes)
    if message is None:
        sweep.plan(sweep.load_spec(path))
        return
    with pytest.raises(ConfigError, match=message):
        sweep.check_memory(sweep.plan(sweep.load_spec(path)), cpu_devices=8)
    assert not (tmp_path / "sweep").exists()


def lm(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "lm.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_sweep_runs_fits_predicts_and_survives_its_own_death(tmp_path):
    path = spec_file(tmp_path, sizes=SIZES + [{"model.d_model": 24, "model.n_layers": 1,
                                               "model.n_heads": 2, "model.init_std": 1e20}])
    runner = subprocess.Popen([sys.executable, "-m", "lm.cli", "sweep", str(path),
                               "--cpu-devices", "2"], stdout=subprocess.PIPE, text=True)
    store_path = tmp_path / "sweep" / "store.sqlite"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill -9 once the first trial is done
        if store_path.exists() and any(t["status"] == "done"
                                       for t in sweep.Store(store_path).trials()):
            break
        time.sleep(0.5)
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    first_done = {t["name"] for t in sweep.Store(store_path).trials() if t["status"] == "done"}
    assert first_done

    out = lm("sweep", str(path), "--cpu-devices", "2")
    assert out.returncode == 0, out.stderr + out.stdout
    for name in first_done:  # not redone
        assert f"started {name}" not in out.stdout
    trials = {t["name"]: t for t in sweep.Store(store_path).trials()}
    failed = [t for t in trials.values() if t["status"] == "failed"]
    assert len(failed) == 1 and "non-finite" in failed[0]["error"]
    assert sum(t["status"] == "done" for t in trials.values()) == 4
    sweep_dir = tmp_path / "sweep"
    fit = json.loads((sweep_dir / "fit.json").read_text())
    assert {"E", "A", "B", "alpha", "beta", "are"} <= set(fit)
    registered = json.loads((sweep_dir / "prediction.json").read_text())
    (held,) = registered["runs"].values()
    assert held["loss"] == pytest.approx(fit["holdout"]["runs"][0]["predicted"], rel=1e-6)
    report = (sweep_dir / "report.md").read_text()
    assert "Held-out prediction" in report and "ARE" in report and "plots/" in report
    assert "ARE" in out.stdout

    status = lm("sweep", "--status", str(path))
    assert "4 done" in status.stdout and "1 failed" in status.stdout
    again = lm("sweep", str(path), "--cpu-devices", "2")  # only the failed trial is retried
    assert again.returncode == 0
    assert again.stdout.count("started") == 1 and f"started {failed[0]['name']}" in again.stdout
    refit = lm("fit", str(sweep_dir), "--out", str(tmp_path / "refit.json"))
    assert refit.returncode == 0, refit.stderr
    assert json.loads((tmp_path / "refit.json").read_text())["are"] == pytest.approx(fit["are"])


def test_store_accepts_trials_stored_before_a_new_config_key(tmp_path):
    trials = sweep.plan(sweep.load_spec(spec_file(tmp_path)))
    store = sweep.Store(tmp_path / "store.sqlite")
    store.sync(trials)
    old = config.to_dict(trials[0].cfg)
    del old["train"]["spikes"]  # as written by an lm without train.spikes
    store.db.execute("UPDATE trials SET config=? WHERE name=?", (json.dumps(old), trials[0].name))
    store.sync(trials)  # same trials: accepted
    changed = config.replace(trials[0].cfg, train={"steps": 7})
    with pytest.raises(ConfigError, match="another config"):
        store.sync([sweep.Trial(trials[0].name, "fit", changed)])


@pytest.mark.parametrize("name", ["quick", "stdlib-chinchilla"])
def test_committed_experiments_plan(name):
    """The README's main job and the fuller study stay valid sweeps as the code moves, and hold
    out a run with at least 4x the compute of the largest fitting run."""
    spec_path = Path(__file__).resolve().parents[1] / "experiments" / f"{name}.yaml"
    trials = sweep.plan(sweep.load_spec(spec_path))
    flops = {t.role: [] for t in trials}
    for t in trials:
        flops[t.role].append(t.facts()["flops"])
    assert len(flops["fit"]) >= 12 and len(flops["holdout"]) == 1
    assert min(flops["holdout"]) >= 4 * max(flops["fit"])
