"""Token sources and deterministic, sharded batches.

A batch is a pure function of (seed, step): row i of step s is the same on every mesh and
every process, and each process builds only the rows its devices hold.
"""

from __future__ import annotations

from typing import Protocol

import jax
import numpy as np

from lm.config import Config


class Source(Protocol):
    def rows(self, step: int, lo: int, hi: int) -> np.ndarray:
        """Rows lo..hi of the global batch of `step`: int32 [hi - lo, seq_len + 1]."""


class Synthetic:
    """A learnable built-in language for fast tests: a fixed sparse Markov chain in which each
    token has `branching` possible successors. Its entropy floor is log(branching)."""

    LANGUAGE_SEED = 1234  # the language is fixed; train.seed only picks the samples
    branching = 4

    def __init__(self, vocab_size: int, seq_len: int, seed: int):
        table_rng = np.random.default_rng(self.LANGUAGE_SEED)
        self.successors = table_rng.integers(0, vocab_size, (vocab_size, self.branching))
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed

    def rows(self, step: int, lo: int, hi: int) -> np.ndarray:
        rngs = [np.random.default_rng((self.seed, step, row)) for row in range(lo, hi)]
        first = np.array([r.integers(self.vocab_size) for r in rngs])
        choice = np.stack([r.integers(self.branching, size=self.seq_len) for r in rngs])
        out = np.empty((hi - lo, self.seq_len + 1), np.int32)
        out[:, 0] = first
        for t in range(self.seq_len):
            out[:, t + 1] = self.successors[out[:, t], choice[:, t]]
        return out


def source(cfg: Config) -> Source:
    if cfg.data.source == "synthetic":
        return Synthetic(cfg.vocab_size, cfg.seq_len, cfg.train.seed)
    raise NotImplementedError(f"data.source={cfg.data.source!r}")


def global_batch(src: Source, step: int, sharding: jax.sharding.Sharding,
                 shape: tuple[int, int]) -> jax.Array:
    """The batch of `step` as one global array; only addressable rows are materialised."""

    built: dict[tuple[int, int], np.ndarray] = {}  # devices along `model` share rows

    def rows(index):
        lo, hi, _ = index[0].indices(shape[0])
        if (lo, hi) not in built:
            built[lo, hi] = src.rows(step, lo, hi)
        return built[lo, hi][:, index[1]]

    return jax.make_array_from_callback(shape, sharding, rows)
