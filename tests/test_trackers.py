import importlib.machinery
import struct
import sys
import types
from pathlib import Path

import pytest
from tensorboardX.proto import event_pb2

from lm import rundir, train, trackers
from lm.errors import ConfigError

from conftest import small


def read_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} as TensorBoard shows them: event files read in order (TFRecords:
    length, its CRC, the Event, its CRC), and a restart (SessionLog START at step s) purging
    the steps from s on that earlier files logged."""
    out: dict[str, dict[int, float]] = {}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            if event.session_log.status == event_pb2.SessionLog.START:
                for series in out.values():
                    for step in [s for s in series if s >= event.step]:
                        del series[step]
            for value in event.summary.value:
                out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


def test_a_rewind_hides_the_steps_after_it(tmp_path):
    """As a resumed run rewinds metrics.jsonl to its checkpoint, TensorBoard's view drops the
    steps after it, and the steps done again replace them."""
    cfg = small("train.trackers=[jsonl, tensorboard]")
    with trackers.opened(cfg, tmp_path) as tracked:
        log = rundir.Log(tmp_path, sinks=[tracked])
        for step in (1, 2, 3, 4):
            log.append("metrics", {"step": step, "loss": 10.0 + step})
    with trackers.opened(cfg, tmp_path) as tracked:
        log = rundir.Log(tmp_path, sinks=[tracked])
        log.rewind(2, [])
        log.append("metrics", {"step": 3, "loss": 1.0})
    assert read_scalars(tmp_path)["train/loss"] == {1: 11.0, 2: 12.0, 3: 1.0}
    assert [r["loss"] for r in rundir.metrics(tmp_path)] == [11.0, 12.0, 1.0]


def test_rows_become_named_scalars():
    row = {"step": 7, "loss": 2.5, "peak": "measured cpu", "mixture": {"0": 0.75, "1": 0.25}}
    assert trackers.scalars("metrics", row) == (
        7, {"train/loss": 2.5, "train/mixture/0": 0.75, "train/mixture/1": 0.25})
    assert trackers.scalars("eval", {"step": 7, "set": "code", "loss": 2.0, "bpb": None}) == (
        7, {"eval/code/loss": 2.0})
    assert trackers.scalars("metrics", {"step": 7, "event": "loss_spike", "loss": 9.0}) is None


class FakeRun:
    def __init__(self, **init):
        self.init, self.logged, self.metrics, self.summary, self.finished = init, [], {}, {}, False

    def define_metric(self, name, step_metric=None):
        self.metrics[name] = step_metric

    def log(self, row):
        self.logged.append(row)

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    """A stand-in for the wandb package (not a dependency): the runs it started."""
    runs = []
    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    module.init = lambda **init: runs.append(FakeRun(**init)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", module)
    return runs


def test_wandb_gets_rows_on_their_own_step_axes(tmp_path, fake_wandb):
    cfg = small("train.trackers=[jsonl, wandb]")
    for _ in range(2):  # the second, as `lm eval` later: the same W&B run, resumed
        with trackers.opened(cfg, tmp_path) as tracked:
            rundir.Log(tmp_path, sinks=[tracked]).append("eval", {"step": 4, "set": "val",
                                                                  "loss": 3.0})
    first, again = fake_wandb
    assert first.init["id"] == again.init["id"] == trackers.run_id(tmp_path)
    assert first.init["resume"] == "allow" and first.init["config"]["train"]["steps"] == 4
    assert first.metrics["eval/*"] == "eval/step" and first.finished
    assert first.logged == [{"eval/step": 4, "eval/val/loss": 3.0}]


def test_sweep_summaries_go_to_the_trackers(tmp_path, fake_wandb):
    trackers.write_summary(["jsonl", "tensorboard", "wandb"], tmp_path,
                           {"are": 0.015, "E": 1.32})
    assert read_scalars(tmp_path) == {"summary/are": {0: pytest.approx(0.015)},
                                      "summary/E": {0: pytest.approx(1.32)}}
    (run,) = fake_wandb
    assert run.summary == {"are": 0.015, "E": 1.32} and run.finished


def test_wandb_without_its_package_is_a_config_error(run_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ConfigError, match="pip install wandb .* or drop wandb from "
                                          "train.trackers"):
        train.train(small(f"train.run_dir={run_dir}", "train.trackers=[jsonl, wandb]"))
    assert not Path(run_dir).exists()  # refused before anything was written
