from pathlib import Path

import pytest

from lm import rundir
from lm.errors import ConfigError, DataError

from conftest import small


def test_eval_and_save_schedules():
    assert rundir.eval_steps(small("train.steps=100")) == set()
    assert rundir.eval_steps(small("train.steps=100", "eval.log_points=1")) == {100}
    curve = sorted(rundir.eval_steps(small("train.steps=320", "eval.log_points=4")))
    assert curve[0] == 10 and curve[-1] == 320 and len(curve) == 4
    ratios = [b / a for a, b in zip(curve, curve[1:])]
    assert max(ratios) / min(ratios) < 1.2  # log-spaced
    assert rundir.eval_steps(small("train.steps=10", "eval.every_steps=4")) == {4, 8, 10}
    assert rundir.eval_steps(small("train.steps=10", "eval.every_steps=50")) == {10}  # the last
    assert rundir.save_steps(small("train.steps=10", "checkpoint.every_steps=4")) == {4, 8, 10}
    assert rundir.save_steps(small("train.steps=10")) == {10}


def test_a_row_cut_short_by_a_kill_gives_way_to_the_next(tmp_path):
    """An eval.jsonl whose last row a killed writer left half-written: `lm eval` appends
    after it. The half row goes; every row appended after it stays readable."""
    log = rundir.Log(tmp_path)
    log.append("eval", {"step": 1, "loss": 3.0})
    with open(tmp_path / rundir.EVALS, "a") as f:
        f.write('{"step": 2, "lo')  # the kill
    log.append("eval", {"step": 2, "loss": 2.5, "set": "val"})
    log.append("eval", {"step": 2, "loss": 2.7, "set": "other"})
    assert rundir.evals(tmp_path) == [{"step": 1, "loss": 3.0},
                                      {"step": 2, "loss": 2.5, "set": "val"},
                                      {"step": 2, "loss": 2.7, "set": "other"}]


@pytest.mark.parametrize("line", ['{"note": "x"}', "5"])
def test_a_row_lm_did_not_write_is_named(tmp_path, line):
    (tmp_path / rundir.EVALS).write_text(f'{{"step": 1, "loss": 3.0}}\n{line}\n{{"step": 2}}\n')
    with pytest.raises(DataError, match=r"row 2 is not one lm wrote \(no step"):
        rundir.evals(tmp_path)


def test_a_run_directory_that_cannot_be_created_or_written_says_so():
    with pytest.raises(ConfigError, match=r"/proc/lm-none/run cannot be created \(.*\); give a "
                                          "directory where this user can write"):
        with rundir.locked(Path("/proc/lm-none/run")):
            pass
    with pytest.raises(ConfigError, match=r"/proc/self: cannot take its lock \(.*\); training "
                                          "and evaluating write into the run directory"):
        with rundir.locked(Path("/proc/self")):  # there, but not writable: a read-only copy
            pass


def test_a_sweeps_directory_is_no_run_directory(tmp_path):
    (tmp_path / "prediction.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"is a sweep's directory \(it holds prediction.json\)"):
        rundir.checked(str(tmp_path))
