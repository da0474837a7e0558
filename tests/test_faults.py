"""Faults a run survives or refuses: loss spikes (rolled back, their batches skipped), and
configs, checkpoints and run directories that could make it execute or overwrite anything."""

import contextlib
import pickle
import shutil
import subprocess
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from lm import checkpoint, cli, config, data, rundir, state, train
from lm.errors import ConfigError, TrainingError

from conftest import lm_here, small

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
    path.write_bytes(b"train:\n  steps: 10\xff\n")  # not UTF-8
    with pytest.raises(ConfigError, match=r"evil.yaml: not valid YAML \(UTF-8\)"):
        config.load(path)
    for text, message in [("base: 5\n", "base: 5 must name a config"),
                          ("base: tiny\n1: x\nfoo: y\n", "unknown key 1; valid keys")]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            config.load(path)


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
    for inside in ("notes.txt", "notes.txt/run"):  # the directory, or one on its way
        with pytest.raises(ConfigError, match="notes.txt is a file, not a directory"):
            rundir.checked(str(foreign / inside))
    with pytest.raises(ConfigError, match=r"replica\*data\*model = 3"):  # not the devices
        train.train(small(f"train.run_dir={tmp_path / 'new'}", "mesh.model=3"))
    assert not (tmp_path / "new").exists()  # refused before the directory was made

    trial = tmp_path / "trial"  # a sweep writes its trial's config and log first
    trial.mkdir()
    (trial / "trial.yaml").write_text("{}\n")
    (trial / "train.log").write_text("")
    assert rundir.checked(str(trial)) == trial.resolve()
    assert rundir.checked("~/x") == Path("~/x").expanduser().resolve()


# --------------------------------------------------------------------------- damaged runs


def run_args(run, *overrides):
    return ["train", "tiny", "data.source=synthetic", "train.steps=8", "checkpoint.every_steps=4",
            "train.log_every=2", "train.progress=false", f"train.run_dir={run}", *overrides]


def curve(run):
    """What a run computed at each logged step (not how fast)."""
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in rundir.metrics(run)]


def params_at(run, step):
    cfg = rundir.load_config(run)
    lay = state.layout(cfg)
    restored, _ = checkpoint.restore(checkpoint.manager(run, read_only=True), step, lay.abstract,
                                     lay.shardings, ("params",))
    return jax.tree.leaves(jax.device_get(restored["params"]))


def data_file(run, step, item="params"):
    """The largest array file of a checkpoint item."""
    files = (checkpoint.directory(run) / str(step) / item).rglob("*")
    return max((f for f in files if f.is_file()), key=lambda f: f.stat().st_size)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """An uninterrupted 8-step run with checkpoints at steps 4 and 8."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main(run_args(run)) == 0
    return run


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_run_finishes_alike(
        finished, tmp_path, capsys, damage):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    path = data_file(run, 8)
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:  # bytes inside the array data: decodes fine, but to other values
        raw[1000:1004] = bytes(b ^ 0xFF for b in raw[1000:1004])
    path.write_bytes(bytes(raw))
    code, out, err = lm_here(capsys, *run_args(run))
    assert code == 0, err
    assert "step 8 is unreadable" in err and "restored step 4" in err
    assert "TensorStore details" not in err and "Traceback" not in err  # the reason, in a line
    (aside,) = checkpoint.directory(run).glob("8.corrupt-*")  # kept for inspection
    assert (aside / path.relative_to(checkpoint.directory(run) / "8")).read_bytes() == raw
    assert curve(run) == curve(finished)  # as if never interrupted
    for a, b in zip(params_at(run, 8), params_at(finished, 8)):
        np.testing.assert_array_equal(a, b)  # bit for bit
    assert lm_here(capsys, *run_args(run))[0] == 0  # and again: nothing left to trip over


def test_a_run_none_of_whose_checkpoints_restores_is_refused_and_loses_nothing(
        finished, tmp_path, capsys):
    """Every checkpoint damaged: starting afresh would rewind metrics.jsonl and eval.jsonl to
    step 0; the run is refused instead, checkpoints and logs as they were."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    for step in (4, 8):
        path = data_file(run, step)
        path.write_bytes(path.read_bytes()[:100])
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    code, _, err = lm_here(capsys, *run_args(run, "train.steps=12"))
    assert code == 2 and "no checkpoint in" in err and "steps [4, 8]" in err
    assert {p: p.read_bytes() for p in run.rglob("*")
            if p.is_file() and p.name != ".lock"} == before


@pytest.mark.parametrize("override, changed", [
    ("train.batch_size=32", "train.batch_size 16 -> 32"), ("data.seed=5", "data.seed 0 -> 5")])
def test_a_resume_on_other_batches_is_refused_and_changes_nothing(finished, tmp_path, capsys,
                                                                  override, changed):
    """Its steps would read other data and log tokens it never saw (step x the new batch)."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    code, _, err = lm_here(capsys, *run_args(run, "train.steps=12", override))
    assert code == 2 and f"trained on other batches ({changed})" in err
    assert {p: p.read_bytes() for p in run.rglob("*")
            if p.is_file() and p.name != ".lock"} == before


def test_eval_never_scores_a_damaged_checkpoint(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    path = data_file(run, 8)
    raw = bytearray(path.read_bytes())
    raw[2000] ^= 0x10
    path.write_bytes(bytes(raw))
    (checkpoint.directory(run) / "999999").mkdir()  # an empty step directory, too
    code, _, err = lm_here(capsys, "eval", str(run), "--step", "8")
    assert code == 2 and "checkpoint 8" in err and "damaged" in err and "Traceback" not in err
    code, out, err = lm_here(capsys, "eval", str(run))  # the newest that restores
    assert code == 0 and "step 999999 is unreadable" in err and "step 8 is unreadable" in err
    assert [r["step"] for r in rundir.evals(run)] == [4]  # the newest that restores
    assert (checkpoint.directory(run) / "8").is_dir()  # eval moves nothing


def test_a_second_process_on_a_run_directory_is_refused(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, pathlib\n"
                               "from lm import rundir\n"
                               "with rundir.locked(pathlib.Path(sys.argv[1])):\n"
                               "    print('held', flush=True); time.sleep(600)", str(run)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        before = (run / "metrics.jsonl").read_text()
        code, _, err = lm_here(capsys, *run_args(run, "train.steps=12"))
        assert code == 2 and f"is in use by lm (pid {holder.pid}" in err
        assert (run / "metrics.jsonl").read_text() == before
        code, _, err = lm_here(capsys, "eval", str(run))
        assert code == 2 and "is in use" in err
    finally:
        holder.kill()  # SIGKILL: the lock goes with the process
        holder.wait()
    assert lm_here(capsys, *run_args(run, "train.steps=12"))[0] == 0


@pytest.mark.parametrize("override, message", [
    ("model.d_model=128", "does not fit the configured model"),
    ("mesh.model=3", "mesh.data"),
])
def test_a_rejected_resume_writes_nothing(finished, tmp_path, capsys, override, message):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    def files():  # what the run holds (the lock only names its latest holder)
        return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}

    before = files()
    code, _, err = lm_here(capsys, *run_args(run, override))
    assert code == 2 and message in err
    assert files() == before
    assert lm_here(capsys, "eval", str(run))[0] == 0  # still a good run


def test_a_row_cut_short_by_a_crash_is_dropped_on_resume(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    shutil.rmtree(checkpoint.directory(run) / "8")  # the crash came before the last save
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "lo')
    code, _, err = lm_here(capsys, *run_args(run))
    assert code == 0 and "dropping its last line" in err
    assert curve(run) == curve(finished)


def test_retention_deletes_only_what_lm_wrote(tmp_path, capsys):
    run = tmp_path / "run"
    root = checkpoint.directory(run)
    root.mkdir(parents=True)
    config.dump(config.load("tiny", run_args(run)[2:]), run / "config.yaml")
    (root / "3.orbax-checkpoint-tmp-99").mkdir()  # not a save of lm's: it holds notes
    (root / "3.orbax-checkpoint-tmp-99" / "notes.txt").write_text("mine")
    args = run_args(run, "checkpoint.every_steps=2", "checkpoint.keep=1")
    code, _, err = lm_here(capsys, *args, "train.steps=6")
    assert code == 0, err
    assert sorted(p.name for p in root.iterdir()) == ["3.orbax-checkpoint-tmp-99", "6"]
    (root / "6" / "precious.txt").write_text("keep me")
    code, _, err = lm_here(capsys, *args, "train.steps=10")
    assert code == 0 and "leaving" in err and "holds files lm did not write" in err
    assert sorted(p.name for p in root.iterdir()) == ["10", "3.orbax-checkpoint-tmp-99", "6"]
    assert (root / "6" / "precious.txt").read_text() == "keep me"

    outside = tmp_path / "elsewhere"
    (outside / "2").mkdir(parents=True)
    link = tmp_path / "linked"
    link.mkdir()
    config.dump(config.load("tiny", run_args(link)[2:]), link / "config.yaml")
    (link / "checkpoints").symlink_to(outside)
    code, _, err = lm_here(capsys, *run_args(link))
    assert code == 2 and "outside the run directory" in err
    assert [p.name for p in outside.iterdir()] == ["2"]


@pytest.mark.parametrize("argv, message", [
    (["sample", "RUN", "--prompt", "x", "--top-k", "-1"], "--top-k"),
    (["sample", "RUN", "--prompt", "x", "--max-tokens", "0"], "--max-tokens"),
    (["sample", "RUN", "--prompt", "x", "--temperature", "-0.5"], "--temperature"),
    (["sample", "RUN", "--prompt", "x", "--seed", str(2**64)], "from 0 to 4294967295"),
    (["train", "tiny", "model=5", "model.d_model=3"], "both a value and keys"),
    (["train", "tiny", "train.run_dir=/"], "a directory of its own"),
    (["train", "tiny", "train.run_dir=~/"], "a directory of its own"),
    (["train", "tiny", "train.seed=-1"], "train.seed"),
    (["train", "tiny", "data.seed=4294967296"], "data.seed"),
    (["sample", "RUN", "--prompt", "x", "--cpu-devices", "0"], "--cpu-devices"),
    (["sample", "RUN", "--prompt", "x", "--cpu-devices", "4096"], "from 1 to 1024"),
    (["info", "tiny", "--cpu-devices", "4"], "--cpu-devices 4 came after jax started with 8"),
])
def test_bad_arguments_are_errors_not_tracebacks(finished, capsys, argv, message):
    argv = [str(finished) if a == "RUN" else a for a in argv]
    with pytest.raises(SystemExit) if argv[0] == "sample" else contextlib.nullcontext():
        assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
