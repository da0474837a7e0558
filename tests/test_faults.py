"""Faults a run survives or refuses: loss spikes (rolled back, their batches skipped), and
configs, checkpoints and run directories that could make it execute or overwrite anything."""

import pickle
import shutil
import types
from pathlib import Path

import numpy as np
import pytest

from lm import checkpoint, config, data, rundir, state, train
from lm.errors import ConfigError, TrainingError

from conftest import small

SPIKES = ("train.steps=24", "optim.lr=2e-2", "optim.warmup_steps=3", "train.log_every=4",
          "checkpoint.every_steps=5", "mesh.data=-1", "train.peak_flops=1e12",
          "train.spikes.factor=1.3", "train.spikes.window=8", "train.spikes.start_step=10")


@pytest.fixture
def garbage(monkeypatch):
    """Synthetic batches become uniformly random tokens at the data positions where
    `garbage.at(position)` holds: to a model that has learnt the language, a loss spike.
    `garbage.read` lists the positions read, once per block of rows."""
    spy = types.SimpleNamespace(at=lambda position: False, read=[])
    rows = data.Synthetic.rows

    def spiky(self, position, lo, hi):
        spy.read.append(position)
        if spy.at(position):
            return np.random.default_rng(position).integers(
                0, self.vocab_size, (hi - lo, self.seq_len + 1), np.int32)
        return rows(self, position, lo, hi)

    monkeypatch.setattr(data.Synthetic, "rows", spiky)
    return spy


def metrics(run_dir):
    return rundir.metrics(run_dir)


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in metrics(run_dir)]


def test_a_spike_rolls_back_skips_its_batches_and_resumes_alike(run_dir, garbage, monkeypatch):
    garbage.at = lambda position: position == 17  # the batch of step 18
    cfg = small(*SPIKES, "train.spikes.max_spikes=2", f"train.run_dir={run_dir}")
    assert train.train(cfg)["step"] == 24
    # found at step 20, the first check after it; the newest checkpoint, 15, predates it
    (event,) = [r for r in metrics(run_dir) if "event" in r]
    assert {k: event[k] for k in ("step", "rolled_back_to", "skipped", "spikes")} == {
        "step": 18, "rolled_back_to": 15, "skipped": [15, 18], "spikes": 1}
    assert event["loss"] > event["threshold"]
    assert [r["step"] for r in metrics(run_dir) if "event" not in r] == [4, 8, 12, 16, 20, 24]
    assert garbage.read.count(17) == garbage.read.count(14)  # read in one pass only
    mngr = checkpoint.manager(run_dir, read_only=True)
    assert sorted(mngr.all_steps()) == [15, 20, 24]
    lay = state.layout(cfg)
    assert checkpoint.restore(mngr, 24, lay.abstract, lay.shardings, ("params",))[1][
        "skipped"] == [[15, 18]]

    # from step 20, a resumed run reads the same batches again: its checkpoint holds the skips
    before = losses(run_dir)
    shutil.rmtree(checkpoint.directory(run_dir) / "24")

    def forbidden(*args, **kwargs):
        raise AssertionError("a checkpoint restore unpickled something")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    train.train(cfg)
    assert losses(run_dir) == before


def test_one_spike_more_than_allowed_stops_the_run(run_dir, garbage):
    garbage.at = lambda position: position >= 17  # every batch from step 18's on
    cfg = small(*SPIKES, "train.spikes.max_spikes=2", f"train.run_dir={run_dir}")
    with pytest.raises(TrainingError, match=r"loss spiked to .* at step 16, .*one spike "
                       r"more than train.spikes.max_spikes=2 allows; lower optim.lr"):
        train.train(cfg)
    events = [r for r in metrics(run_dir) if "event" in r]
    assert [(e["step"], e["rolled_back_to"], e["skipped"]) for e in events] == [
        (18, 15, [15, 18]), (16, 15, [18, 19])]  # the first is kept by the second rollback


def test_non_finite_losses_roll_back_to_the_start_then_stop(run_dir):
    cfg = small("model.init_std=1e20", "train.spikes.max_spikes=1", "checkpoint.every_steps=2",
                "mesh.data=-1", f"train.run_dir={run_dir}")
    with pytest.raises(TrainingError, match=r"non-finite at step \d+, one spike more "
                       r"than train.spikes.max_spikes=1 allows"):
        train.train(cfg)
    (event,) = [r for r in metrics(run_dir) if "event" in r]
    assert event["loss"] is None and event["rolled_back_to"] == 0  # no checkpoint before it
    assert event["skipped"] == [0, event["step"]]


@pytest.mark.parametrize("override, key", [
    ("train.spikes.factor=0.5", "train.spikes.factor"),
    ("train.spikes.window=0", "train.spikes.window"),
    ("train.spikes.skip_batches=-1", "train.spikes.skip_batches"),
    ("train.spikes.max_spikes=2", "train.spikes.max_spikes"),  # and no checkpoint.every_steps
])
def test_bad_spike_settings_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key):
        small(override)


# --------------------------------------------------------------------------- user input


def test_configs_load_without_running_anything(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.yaml"
    path.write_text(f"train: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(path)
    assert not marker.exists()


def test_run_directories_no_run_wrote_are_refused(tmp_path):
    foreign = tmp_path / "project"
    foreign.mkdir()
    (foreign / "config.yaml").write_text("learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="config.yaml is not the config of an lm run"):
        train.train(small(f"train.run_dir={foreign}"))
    assert (foreign / "config.yaml").read_text() == "learning_rate: 0.1\n"  # untouched

    (foreign / "config.yaml").unlink()
    (foreign / "checkpoints").mkdir()
    with pytest.raises(ConfigError, match="holds checkpoints but no config.yaml"):
        rundir.checked(str(foreign))
    (foreign / "notes.txt").write_text("")
    with pytest.raises(ConfigError, match="is not a directory"):
        rundir.checked(str(foreign / "notes.txt"))

    trial = tmp_path / "trial"  # a sweep writes its trial's config and log first
    trial.mkdir()
    (trial / "trial.yaml").write_text("{}\n")
    (trial / "train.log").write_text("")
    assert rundir.checked(str(trial)) == trial.resolve()
    assert rundir.checked("~/x") == Path("~/x").expanduser().resolve()
