"""The processes of a run: which one writes, waiting for each other, and stopping together.

Every process of a multi-process run (one per host) computes and takes part in checkpoints;
process 0 alone writes the run's files and prints.
"""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

from lm.errors import Interrupted


def is_primary() -> bool:
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Wait until every process gets here (at once when there is only one)."""
    multihost_utils.sync_global_devices(f"lm: {name}")


def primary_first(make):
    """`make()` on process 0 and then on the others, which find what it left in shared storage
    (a prepared dataset) instead of all building it at the same time."""
    out = make() if is_primary() else None
    sync("process 0 went first")
    return out if is_primary() else make()


def agree(flag: bool) -> bool:
    """Process 0's `flag`, in every process (a decision all must take together, say to save
    now because its clock says so)."""
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


class StopSignals:
    """SIGTERM/SIGINT ask the loop to save and stop after the current step; a second one
    aborts at once. Only the main thread can own signal handlers. Nested (a run inside a
    sweep's worker), a signal the inner loop did not act on (it came during the final
    evaluation, or the run ended in an error first) is passed on to the outer one on leaving,
    not forgotten."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def agreed(self, can_sync: bool) -> int | None:
        """The signal to stop on after this step, the same in every process (they must save
        together). Processes that may have got different signals compare them only where the
        loop waits for the device anyway (`can_sync`): a step later, not a sync per step."""
        if jax.process_count() == 1:
            return self.signum
        if not can_sync:
            return None
        return int(multihost_utils.process_allgather(np.int32(self.signum or 0)).max()) or None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        outer = getattr(self._previous.get(self.signum), "__self__", None)
        if isinstance(outer, StopSignals) and not (exc_type and issubclass(exc_type, Interrupted)):
            outer._handle(self.signum, None)
