"""Two processes of 4 simulated CPU devices, joined by jax.distributed on loopback, against this
process's 8 devices: the same (data=4, model=2) mesh, the same losses and evaluations,
checkpoints that move between one process and two, and a signal that stops both together."""

import collections
import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from lm import checkpoint, config, data, rundir, state, train

from conftest import small

# `lm train` through the CLI, logging (step, first row, end row) of every block of a batch
# the process builds. Patched inside the command: importing lm.data imports jax, which must
# wait for --cpu-devices.
DRIVER = """
import json, sys
from lm import cli

log, argv = sys.argv[1], sys.argv[2:]
cmd_train = cli.cmd_train

def logging_rows(args):
    from lm import data
    rows = data.Synthetic.rows

    def logged(self, step, lo, hi):
        with open(log, "a") as f:
            f.write(json.dumps([step, lo, hi]) + "\\n")
        return rows(self, step, lo, hi)

    data.Synthetic.rows = logged
    return cmd_train(args)

cli.cmd_train = logging_rows
sys.exit(cli.main(argv))
"""


def run_config(run_dir):
    return small("train.steps=4", "checkpoint.every_steps=2", "eval.every_steps=2",
                 "data.val_sequences=16", "mesh.data=4", "mesh.model=2",
                 "train.peak_flops=1e12",  # not measured: the processes share two cores
                 f"train.run_dir={run_dir}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def two_processes(cfg, tmp_path):
    """`lm train` of `cfg` in two processes of 4 devices each, on loopback; any still running
    at the end are killed."""
    path = tmp_path / "two.yaml"
    config.dump(cfg, path)
    port, procs = free_port(), []
    try:
        for i in range(2):
            with open(tmp_path / f"out{i}.txt", "w") as out:
                procs.append(subprocess.Popen(
                    [sys.executable, "-c", DRIVER, str(tmp_path / f"rows{i}.jsonl"), "train",
                     str(path), "--cpu-devices", "4", "--coordinator", f"127.0.0.1:{port}",
                     "--num-processes", "2", "--process-id", str(i)],
                    stdout=out, stderr=subprocess.STDOUT))
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def finish(procs, tmp_path, timeout=240) -> list[str]:
    """The processes' output once they have ended (within `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.wait(timeout=max(deadline - time.monotonic(), 1))
    return [(tmp_path / f"out{i}.txt").read_text() for i in range(2)]


def train_in_two(cfg, tmp_path) -> list[str]:
    with two_processes(cfg, tmp_path) as procs:
        outs = finish(procs, tmp_path)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
    return outs


def rows(path, name="metrics.jsonl"):
    return rundir.read_rows(Path(path) / name)


def params(cfg, step):
    """The parameters of checkpoint `step` of `cfg`'s run, restored onto this process's mesh."""
    lay = state.layout(cfg)
    mngr = checkpoint.manager(cfg.train.run_dir, read_only=True)
    restored, _ = checkpoint.restore(mngr, step, lay.abstract, lay.shardings, ("params",))
    return jax.tree.leaves(jax.device_get(restored["params"]))


def assert_same_rows(got, want, keys):
    assert [r["step"] for r in got] == [r["step"] for r in want]  # one row each, not one a process
    for key in keys:  # the processes sum gradients over gloo: in another order, to rounding
        np.testing.assert_allclose([r[key] for r in got], [r[key] for r in want], rtol=1e-5)


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """The reference: the run trained in this one process on its 8 devices."""
    cfg = run_config(tmp_path_factory.mktemp("one") / "run")
    train.train(cfg)
    return cfg


def test_two_processes_train_evaluate_and_save_like_one(one, tmp_path):
    two = run_config(tmp_path / "run")
    train_in_two(two, tmp_path)
    run_one, run_two = one.train.run_dir, two.train.run_dir
    assert_same_rows(rows(run_two), rows(run_one), ["loss", "grad_norm"])
    assert_same_rows(rows(run_two, "eval.jsonl"), rows(run_one, "eval.jsonl"), ["loss"])

    # each process built only the rows its devices hold: half of every batch, each row once
    built = [collections.defaultdict(list) for _ in range(2)]
    for i in range(2):
        for step, lo, hi in rows(tmp_path, f"rows{i}.jsonl"):
            if step < data.Synthetic.VALIDATION_STEP:
                built[i][step] += range(lo, hi)
    for step in range(4):
        mine, theirs = built[0][step], built[1][step]
        assert len(mine) == len(theirs) == 4 and sorted(mine + theirs) == list(range(8))

    # the checkpoint the two processes wrote restores here, equal to this process's own
    for a, b in zip(params(two, 4), params(one, 4)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_two_processes_resume_a_checkpoint_of_one(one, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(one.train.run_dir, run)
    shutil.rmtree(checkpoint.directory(run) / "4")  # resume from step 2, which one process wrote
    two = config.replace(one, train={"run_dir": str(run)})
    outs = train_in_two(two, tmp_path)
    assert "restored step 2" in outs[0]  # both restore; process 0 alone says so
    assert_same_rows(rows(run), rows(one.train.run_dir), ["loss", "grad_norm"])
    for a, b in zip(params(two, 4), params(one, 4)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_a_signal_to_one_process_stops_both_at_the_same_step(tmp_path):
    run = tmp_path / "run"
    cfg = config.replace(run_config(run), train={"steps": 10_000, "log_every": 3},
                         eval={"every_steps": 0}, checkpoint={"every_steps": 0})
    with two_processes(cfg, tmp_path) as procs:
        deadline = time.monotonic() + 240
        while (len(rows(run)) < 2 and time.monotonic() < deadline
               and all(p.poll() is None for p in procs)):
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)  # process 0 learns of it at the next log point
        outs = finish(procs, tmp_path)
    assert [p.returncode for p in procs] == [128 + signal.SIGTERM] * 2, "\n".join(outs)
    (step,) = checkpoint.manager(run, read_only=True).all_steps()
    assert step % 3 == 0 and all(f"SIGTERM at step {step};" in out for out in outs)
