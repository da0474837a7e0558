"""Where a run's metrics and evaluations go besides metrics.jsonl and eval.jsonl, which stay the
record that resuming, `lm eval` and sweeps read (`train.trackers`):

    tensorboard   event files in the run directory (tensorboardX: no TensorFlow); on resuming,
                  the steps after the checkpoint are purged, as they are from metrics.jsonl
    wandb         a Weights & Biases run per run directory, resumed with it; when the package is
                  installed (WANDB_MODE=offline logs without a network, for `wandb sync` later)

A tracker takes the rows `rundir.Log` appends, as scalars named `train/loss`, `eval/val/loss`,
...; process 0 alone writes them. Nothing here imports JAX.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import time
from pathlib import Path

from lm.config import Config, to_dict
from lm.errors import ConfigError


def require(names) -> None:
    """Refuse a tracker that cannot start here, before a run computes anything."""
    if "wandb" in names and importlib.util.find_spec("wandb") is None:
        raise ConfigError("train.trackers lists wandb, but the wandb package is not installed: "
                          "pip install wandb (then wandb login, or set WANDB_MODE=offline), or "
                          "drop wandb from train.trackers")


def scalars(name: str, row: dict) -> tuple[int, dict[str, float]] | None:
    """The step of a metrics.jsonl or eval.jsonl row (`name`: metrics or eval) and its numbers
    as named scalars: `train/loss`, `train/mixture/0`, `eval/val/loss`; None for an event
    (a loss-spike rollback), which metrics.jsonl alone records."""
    if "event" in row:
        return None
    prefix = "train" if name == "metrics" else f"eval/{row['set']}"
    out = {}
    for key, value in row.items():
        if isinstance(value, dict):  # a mixture's shares of the rows
            out |= {f"{prefix}/{key}/{k}": float(v) for k, v in value.items()}
        elif key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}/{key}"] = float(value)  # not None (no bpb), not text (set, peak)
    return row["step"], out


def run_id(path: Path) -> str:
    """A W&B run id fixed by a directory, so that a resumed run (or `lm eval`) continues the
    W&B run that the directory started."""
    return hashlib.blake2b(str(Path(path).resolve()).encode(), digest_size=8).hexdigest()


class TensorBoard:
    """Event files in `log_dir`. A writer opens at the first row after each rewind, so that the
    rewind of a run resuming from its checkpoint costs no extra file."""

    def __init__(self, log_dir: Path):
        self.log_dir, self.writer, self.purge_step = log_dir, None, None

    def log(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            from tensorboardX import SummaryWriter

            # tensorboardX names a file by the second it opens in, and a second file of that
            # second (a rollback soon after a log point) would replace the first: the time in
            # ns keeps them apart, and in the order TensorBoard reads them.
            self.writer = SummaryWriter(str(self.log_dir), purge_step=self.purge_step,
                                        filename_suffix=f".{time.time_ns()}")
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # rows come at log points only: a killed run keeps them

    def rewind(self, step: int) -> None:
        """Hide the events after `step` (TensorBoard purges them when it reads a restart)."""
        self.close()
        self.purge_step = step + 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _wandb_run(directory: Path, config: dict | None = None, job_type: str = "train"):
    import wandb

    return wandb.init(project=os.environ.get("WANDB_PROJECT", "lm"), name=directory.name,
                      id=run_id(directory), resume="allow", dir=str(directory), config=config,
                      job_type=job_type)


class WandB:
    """A W&B run of the run directory. Training and evaluation rows each have their own step
    axis (`train/step`, `eval/step`), so that `lm eval` of an earlier checkpoint after training
    still logs: W&B drops rows whose own `step` goes backwards. A rewind keeps what W&B holds
    (it cannot delete rows); the steps done again are logged again."""

    def __init__(self, run_dir: Path, cfg: Config):
        self.run = _wandb_run(run_dir, to_dict(cfg))
        for axis in ("train", "eval"):
            self.run.define_metric(f"{axis}/step")
            self.run.define_metric(f"{axis}/*", step_metric=f"{axis}/step")

    def log(self, step: int, values: dict[str, float]) -> None:
        axis = next(iter(values)).partition("/")[0]
        self.run.log({f"{axis}/step": step, **values})

    def rewind(self, step: int) -> None:
        pass

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The trackers of a run, as one sink of `rundir.Log`: each row goes to every tracker."""

    def __init__(self, each: list):
        self.each = each

    def append(self, name: str, row: dict) -> None:
        if (found := scalars(name, row)) is not None:
            for tracker in self.each:
                tracker.log(*found)

    def rewind(self, step: int) -> None:
        for tracker in self.each:
            tracker.rewind(step)


@contextlib.contextmanager
def opened(cfg: Config, run_dir: Path, writes: bool = True):
    """The trackers `cfg.train.trackers` names for `run_dir`, open for the block (none in a
    process that does not write the run's files: `writes`)."""
    names = cfg.train.trackers if writes else ()
    require(names)
    each = []
    try:
        if "tensorboard" in names:
            each.append(TensorBoard(Path(run_dir)))
        if "wandb" in names:
            each.append(WandB(Path(run_dir), cfg))
        yield Trackers(each)
    finally:
        for tracker in each:
            tracker.close()


def write_summary(names, directory: str | Path, values: dict[str, float]) -> None:
    """Scalars that sum up a sweep (e.g. the fit's parameters, the held-out prediction and its
    error) to the trackers `names` (a `train.trackers` list) in `directory`, the sweep's:
    TensorBoard scalars `summary/KEY` at step 0, and the summary of a W&B run of the sweep."""
    require(names)
    directory = Path(directory)
    if "tensorboard" in names:
        board = TensorBoard(directory)
        board.log(0, {f"summary/{key}": float(value) for key, value in values.items()})
        board.close()
    if "wandb" in names:
        run = _wandb_run(directory, job_type="sweep")
        run.summary.update(values)
        run.finish()
