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


@pytest.mark.parametrize("shape", ["linear", "1-sqrt"])
def test_wsd_warms_up_holds_then_decays_over_its_final_fraction(shape):
    o = small("optim.schedule=wsd", "optim.lr=1.0", "optim.warmup_steps=10",
              "optim.decay_fraction=0.2", f"optim.decay_shape={shape}", "train.steps=100").optim
    lr = [schedule.learning_rate(o, 100, step) for step in range(100)]
    assert schedule.decay_start(o, 100) == 80 and o.floor == 0.0  # wsd decays to 0 by default
    assert lr[0] == pytest.approx(0.1) and lr[9] == 1.0 and lr[10:81] == [1.0] * 71
    decayed = 0.5 if shape == "linear" else 0.5 ** 0.5  # half way through the decay
    assert lr[90] == pytest.approx(1 - decayed) and lr[99] < 0.25 and all(
        a > b for a, b in zip(lr[80:], lr[81:]))
    longer = [schedule.learning_rate(o, 200, step) for step in range(160)]
    assert longer[:80] == lr[:80]  # runs of any length agree until their own decay starts
    assert schedule.annealed(o, 100, 100) and not schedule.annealed(o, 100, 99)
    assert not schedule.annealed(small("optim.schedule=constant").optim, 100, 100)
    short = small("optim.schedule=wsd", "optim.lr=1.0", "optim.warmup_steps=0").optim
    assert not schedule.annealed(short, 5, 5)  # one decay step, run at the peak rate
    assert schedule.annealed(short, 10, 10)  # two: the last at 1 - sqrt(1/2)
    cosine = small("optim.lr=1.0", "optim.warmup_steps=20").optim
    assert not schedule.annealed(cosine, 20, 20) and not schedule.annealed(cosine, 21, 21)
    assert schedule.annealed(cosine, 22, 22)
