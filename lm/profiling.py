"""A jax.profiler trace of a stretch of training steps (`train.profile`), written into the run
directory where TensorBoard's profile plugin finds it: RUN_DIR/plugins/profile/<time>/.
XProf and Perfetto read the same files."""

from __future__ import annotations

from pathlib import Path

import jax

from lm.config import ProfileConfig


class Trace:
    """Traces steps start_step + 1 .. start_step + steps, once per run: a run resumed past
    them, or rolled back over them after a trace, takes none."""

    def __init__(self, p: ProfileConfig, run_dir: Path):
        self.start, self.stop = p.start_step, p.start_step + p.steps
        self.dir = run_dir
        self.taken = p.steps == 0
        self.tracing = False

    def before_step(self, done: int, state) -> None:
        """Call before each step, with the number of steps `done` and the state they left."""
        if not self.taken and done == self.start:
            jax.profiler.start_trace(str(self.dir))
            self.tracing = self.taken = True
        elif self.tracing and done == self.stop:
            jax.block_until_ready(state)  # the traced steps run asynchronously until here
            self.end()

    def end(self) -> None:
        """Stop a trace still running: the run ended, or rolled back, within the window."""
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False
