"""One hierarchy of errors the `lm` command reports as a single line, with an exit code.

Every error a user can meet through bad input or a failed run derives from `LMError` and says
what was wrong and how to fix it; anything else is a bug and keeps its traceback. The kinds are
siblings: a corrupt checkpoint is not a config error, a data file is not a store.
"""

from __future__ import annotations


def listed(items, sep: str = ", ", most: int = 5) -> str:
    """The first `most` of `items` for a message, and how many more there are."""
    more = f"{sep}... ({len(items) - most} more)" if len(items) > most else ""
    return sep.join(items[:most]) + more


class LMError(Exception):
    """Base: the message names the key, file or value at fault and the fix."""

    exit_code = 1


class ConfigError(LMError, ValueError):
    """A config, override or sweep spec that cannot work."""

    exit_code = 2


class DataError(LMError, ValueError):
    """Input data that cannot work: a missing or unreadable file, too little text."""

    exit_code = 2


class CheckpointError(LMError):
    """No usable checkpoint, or one that does not fit the configured model."""

    exit_code = 2


class Busy(LMError):
    """A run directory or sweep that another process is using: wait, or stop it."""

    exit_code = 2


class StoreError(LMError):
    """A sweep store that cannot be reached, is not a sweep store, or holds another sweep."""

    exit_code = 2


class FitError(LMError, ValueError):
    """Points that cannot pin a scaling law down, or a fit file that is not one."""

    exit_code = 2


class TrainingError(LMError):
    """The run cannot go on (e.g. the loss became non-finite)."""

    exit_code = 1


class Incomplete(LMError):
    """A sweep that ended without what it is for: its fit, or a held-out run's score."""

    exit_code = 1


class Interrupted(TrainingError):
    """SIGTERM/SIGINT stopped the run after saving a checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class Fenced(LMError):
    """A sweep worker's claim on its trial lapsed (another worker may hold it now): the run
    stopped at a step's end without writing anything more."""
