from lm import rundir

from conftest import small


def test_eval_and_save_schedules():
    assert rundir.eval_steps(small("train.steps=100")) == set()
    assert rundir.eval_steps(small("train.steps=100", "eval.log_points=1")) == {100}
    curve = sorted(rundir.eval_steps(small("train.steps=320", "eval.log_points=4")))
    assert curve[0] == 10 and curve[-1] == 320 and len(curve) == 4
    ratios = [b / a for a, b in zip(curve, curve[1:])]
    assert max(ratios) / min(ratios) < 1.2  # log-spaced
    assert rundir.eval_steps(small("train.steps=10", "eval.every_steps=4")) == {4, 8, 10}
    assert rundir.save_steps(small("train.steps=10", "checkpoint.every_steps=4")) == {4, 8, 10}
    assert rundir.save_steps(small("train.steps=10")) == {10}
