import json
import signal
import subprocess
import sys
import time

import pytest

from lm.store import Store

from sweeps import SIZES, spec_file


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
                                       for t in Store(store_path).trials()):
            break
        time.sleep(0.5)
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    first_done = {t["name"] for t in Store(store_path).trials() if t["status"] == "done"}
    assert first_done

    out = lm("sweep", str(path), "--cpu-devices", "2")
    assert out.returncode == 0, out.stderr + out.stdout
    for name in first_done:  # not redone
        assert f"started {name}" not in out.stderr
    trials = {t["name"]: t for t in Store(store_path).trials()}
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
    assert again.stderr.count("started") == 1 and f"started {failed[0]['name']}" in again.stderr
    refit = lm("fit", str(sweep_dir), "--out", str(tmp_path / "refit.json"))
    assert refit.returncode == 0, refit.stderr
    assert json.loads((tmp_path / "refit.json").read_text())["are"] == pytest.approx(fit["are"])
