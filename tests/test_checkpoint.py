import contextlib
import gc
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from lm import checkpoint, config, data, evaluate, rundir, state, train
from lm.errors import CheckpointError, Interrupted, TrainingError
from lm.processes import StopSignals

from conftest import small


SESSION = train.Session()  # each shape compiled once for the module, as a sweep worker does


def trained(run_dir, *overrides):
    cfg = small("train.steps=8", "checkpoint.every_steps=4", f"train.run_dir={run_dir}",
                "mesh.data=4", "mesh.model=2", *overrides)
    train.train(cfg, session=SESSION)
    return cfg


def losses(run_dir):
    return [r["loss"] for r in rundir.read_rows(Path(run_dir) / "metrics.jsonl")]


def test_restore_onto_other_meshes(tmp_path):
    cfg = trained(tmp_path / "run", "model.n_heads=8", "model.d_model=64")
    mngr = checkpoint.manager(tmp_path / "run", read_only=True)
    assert sorted(mngr.all_steps()) == [4, 8]
    val = data.source(cfg).rows(10_000, 0, 8)
    reference = None
    for data_size, model_size in [(4, 2), (1, 8), (1, 1)]:
        lay = state.layout(config.replace(cfg, mesh={"data": data_size, "model": model_size}),
                           jax.devices()[: data_size * model_size])
        restored, meta = checkpoint.restore(mngr, 8, lay.abstract, lay.shardings, ("params",))
        params = restored["params"]
        assert meta["step"] == 8 and meta["config"]["model"]["d_model"] == 64
        assert params["blocks"]["wq"][...].sharding.mesh.shape["model"] == model_size
        eval_loss = evaluate.Evaluator(lay, val).row(params, 8)["loss"]
        values = jax.device_get(params)
        if reference is None:
            reference = values, eval_loss
            continue
        for a, b in zip(jax.tree.leaves(values), jax.tree.leaves(reference[0])):
            np.testing.assert_array_equal(a, b)
        assert eval_loss == pytest.approx(reference[1], rel=1e-5)


@pytest.mark.parametrize("ending", [None, TrainingError("loss became non-finite"),
                                    Interrupted("stopped by SIGTERM", signal.SIGTERM)],
                         ids=["evaluating", "failed", "stopped"])
def test_a_stop_the_run_did_not_act_on_reaches_the_worker_around_it(ending):
    """A sweep's worker trains runs one after another: a SIGTERM during a run's final
    evaluation, after its loop's last look at the signals, or just before the run ended in an
    error, must still stop the worker; one the run stopped on (Interrupted) is its own."""
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as worker:
        with contextlib.suppress(TrainingError), StopSignals() as run:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # let the handler run
            if ending is not None:
                raise ending
        assert run.signum == signal.SIGTERM
        assert worker.signum == (None if isinstance(ending, Interrupted) else signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) == before


def test_interrupt_and_resume_equals_uninterrupted(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, "lm")
    whole = trained(tmp_path / "whole", "train.steps=12")
    real_batch = data.global_batch

    def batch_then_sigterm(src, step, *args, **kwargs):
        if step == 6:  # the loop saves after the step it is on and stops
            os.kill(os.getpid(), signal.SIGTERM)
        return real_batch(src, step, *args, **kwargs)

    monkeypatch.setattr(data, "global_batch", batch_then_sigterm)
    with pytest.raises(Interrupted, match="SIGTERM at step") as stopped:
        trained(tmp_path / "split", "train.steps=12")
    at = int(str(stopped.value).split("at step ")[1].split(";")[0])
    assert 1 <= at < 12 and at in checkpoint.manager(
        tmp_path / "split", read_only=True).all_steps()
    monkeypatch.setattr(data, "global_batch", real_batch)
    trained(tmp_path / "split", "train.steps=12")
    assert f"restored step {at}" in caplog.text
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")  # bit for bit
    assert len(losses(tmp_path / "whole")) == whole.train.steps


def test_corrupt_and_half_written_checkpoints_are_skipped(tmp_path, caplog):
    caplog.set_level(logging.INFO, "lm")
    cfg = trained(tmp_path / "run")
    root = checkpoint.directory(tmp_path / "run")
    (root / "12.orbax-checkpoint-tmp-1234").mkdir()  # a save killed mid-write
    for f in (root / "8" / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"garbage")
    lay = state.layout(cfg)
    mngr = checkpoint.manager(tmp_path / "run")
    restored, meta = checkpoint.restore_latest(mngr, lay.abstract, lay.shardings)
    err = caplog.text
    assert meta["step"] == 4
    assert "never finished" in err and "step 8 is unreadable" in err and "restored step 4" in err


def test_a_failed_restore_says_why_in_a_line_and_silences_only_its_abandoned_reads(
        tmp_path, monkeypatch):
    cfg = trained(tmp_path / "run")
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: reported.append(str(u.exc_value)))
    report = sys.unraisablehook
    lay = state.layout(cfg)
    checkpoint.restore(checkpoint.manager(tmp_path / "run", read_only=True), 8,
                       lay.abstract, lay.shardings)
    assert sys.unraisablehook is report  # a restore that succeeds leaves no filter behind
    # Cut every file of array values in half, not only the largest: some hold values a later
    # write superseded, which no restore reads (a largest file of those made this test flaky).
    for values in (checkpoint.directory(tmp_path / "run") / "8" / "params").glob("ocdbt.*/d/*"):
        values.write_bytes(values.read_bytes()[: values.stat().st_size // 2])
    with pytest.raises(Exception) as failed:
        checkpoint.restore(checkpoint.manager(tmp_path / "run", read_only=True), 8,
                           lay.abstract, lay.shardings)
    # orbax's own message prints TensorStore's whole spec; the innermost error names the fault
    assert "TensorStore details" in str(failed.value)
    reason = checkpoint.why(failed.value)
    assert "byte range" in reason and "\n" not in reason and len(reason) < 440
    # the other arrays' reads, abandoned, report into a closed event loop: those are dropped
    for message in ("Event loop is closed", "Encountered error while reading array index: (1,)",
                    "another failure"):
        sys.unraisablehook(type("Unraisable", (), {"exc_value": RuntimeError(message)}))
    assert reported[-1:] == ["another failure"] and "Event loop is closed" not in reported
    del failed  # its traceback holds the abandoned reads' coroutines, in a reference cycle
    gc.collect()  # free them while this test's hook holds: later, pytest's would warn


def test_shape_mismatch_lists_parameters(tmp_path):
    trained(tmp_path / "run")
    cfg = small("model.d_model=64", "mesh.data=-1")
    lay = state.layout(cfg)
    mngr = checkpoint.manager(tmp_path / "run", read_only=True)
    with pytest.raises(CheckpointError, match=r"blocks.*wq.*\(2, 32, 4, 8\).*\(2, 64, 4, 16\)"):
        checkpoint.restore(mngr, 8, lay.abstract, lay.shardings)


def test_a_changed_optimiser_is_refused_and_its_run_left_whole(tmp_path):
    """optim.clip_norm=0 drops the clipping stage, so the optimiser state's structure changes:
    resuming so must stop before writing, not take the checkpoints for damaged, move them
    aside and restart the run from step 0. So must a run shortened below its checkpoint."""
    run = tmp_path / "run"
    trained(run)
    before = (sorted(checkpoint.manager(run, read_only=True).all_steps()), losses(run))
    with pytest.raises(CheckpointError, match=r"optimiser.*\n  opt "):
        trained(run, "optim.clip_norm=0", "train.steps=12")
    with pytest.raises(CheckpointError, match=r"checkpoint at step 8, beyond train.steps=4"):
        trained(run, "train.steps=4")  # a run is not shortened
    assert (sorted(checkpoint.manager(run, read_only=True).all_steps()), losses(run)) == before
    assert not list((run / "checkpoints").glob("*corrupt*"))
    cfg = config.load(run / "config.yaml")
    assert (cfg.optim.clip_norm, cfg.train.steps) == (1.0, 8)


def test_a_save_killed_before_it_commits_leaves_the_last_complete_checkpoint(tmp_path,
                                                                             monkeypatch):
    """With checkpoint.keep=1 the policy keeps only the step being saved; the step before it
    must survive until that save has committed (here the save dies, as in a kill -9)."""
    run = tmp_path / "run"
    cfg = trained(run, "checkpoint.keep=1")
    mngr = checkpoint.manager(run)
    assert sorted(mngr.all_steps()) == [8]  # the policy, once the last save committed
    lay = state.layout(cfg)
    restored, meta = checkpoint.restore(mngr, 8, lay.abstract, lay.shardings)

    def killed(*args, **kwargs):
        raise SystemExit("killed during the save")

    monkeypatch.setattr(mngr, "save", killed)
    with pytest.raises(SystemExit):
        checkpoint.save(mngr, restored, {**meta, "step": 12}, cfg.checkpoint)
    assert sorted(checkpoint.manager(run, read_only=True).all_steps()) == [8]


def test_missing_or_empty_run_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a run directory"):
        evaluate.evaluate_run(tmp_path / "nothing")
    run = tmp_path / "empty"
    run.mkdir()
    config.dump(small(), run / "config.yaml")
    with pytest.raises(CheckpointError, match="no checkpoints"):
        evaluate.evaluate_run(run)


def test_sigterm_saves_and_the_run_resumes(tmp_path):
    run = tmp_path / "run"

    def cmd(steps):
        return [sys.executable, "-m", "lm.cli", "train", "tiny", "--cpu-devices", "1",
                "mesh.model=1", f"train.steps={steps}", "train.log_every=1",
                f"train.run_dir={run}", "data.source=synthetic"]

    proc = subprocess.Popen(cmd(100_000), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 240
    while len(losses(run)) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    steps = checkpoint.manager(run, read_only=True).all_steps()
    assert len(steps) == 1 and steps[0] >= 3 and "Run the same command again" in err
    done = subprocess.run(cmd(steps[0] + 2), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"restored step {steps[0]}" in done.stderr
    rows = rundir.read_rows(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps[0] + 3))


@pytest.mark.parametrize("seconds, steps", [(1e-9, [2, 4, 6]), (1e9, [6])])
def test_saves_by_the_clock_at_log_points(tmp_path, seconds, steps):
    run = tmp_path / "run"
    train.train(small("train.steps=6", "train.log_every=2", "checkpoint.keep=10",
                      f"checkpoint.every_seconds={seconds}", f"train.run_dir={run}", "mesh.data=-1"))
    assert sorted(checkpoint.manager(run, read_only=True).all_steps()) == steps
