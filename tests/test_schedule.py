import pytest

from lm import schedule

from conftest import small


def test_warms_up_and_decays_to_the_floor():
    cfg = small("optim.lr=1.0", "optim.warmup_steps=10", "optim.final_lr_ratio=0.1",
                "train.steps=110")

    def lr(step):
        return schedule.learning_rate(cfg.optim, cfg.train.steps, step)

    assert lr(0) == pytest.approx(0.1) and lr(9) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.55)  # cosine midpoint between 1 and 0.1
    assert lr(110) == pytest.approx(0.1) and lr(500) == pytest.approx(0.1)
    linear = small("optim.schedule=linear", "optim.lr=1.0", "optim.warmup_steps=10").optim
    assert schedule.learning_rate(linear, 110, 60) == pytest.approx(1 - 0.9 * 0.5)
