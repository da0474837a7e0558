"""Token sources and deterministic, sharded batches.

A batch is a pure function of (seed, step): row i of step s is the same on every mesh and every
process, each process builds only the rows its devices hold, and resuming needs nothing but the
step number. `source` serves the training rows of a config and `validation` its fixed validation
set, from the dataset `lm.corpus` prepared.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
from collections.abc import Iterator
from typing import Protocol

import jax
import numpy as np

from lm import corpus
from lm.config import Config
from lm.errors import DataError


# --------------------------------------------------------------------------- sources


class Source(Protocol):
    def rows(self, step: int, lo: int, hi: int) -> np.ndarray:
        """Rows lo..hi of the global batch of `step`: int32 [hi - lo, seq_len + 1]."""

    def epoch(self, step: int) -> float:
        """How many passes over the data the first `step` steps make (0 if it never repeats)."""


class Synthetic:
    """A learnable built-in language for fast tests: a fixed sparse Markov chain in which each
    token has `branching` possible successors. Its entropy floor is log(branching)."""

    LANGUAGE_SEED = 1234  # the language is fixed; train.seed only picks the samples
    VALIDATION_STEP = 2**62  # validation rows are those of a step no training run reaches
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

    def epoch(self, step: int) -> float:
        return 0.0


class Packed:
    """Training rows from a token stream: windows of seq_len + 1 tokens starting at multiples of
    seq_len (neighbours share one token, so every token is a target once per epoch), visited in
    a fresh shuffled order each epoch. Row i of `step` is row g = step * batch_size + i of the
    run, window g % n_windows of epoch g // n_windows."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int):
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.n_windows = (len(tokens) - 1) // seq_len

    def rows(self, step: int, lo: int, hi: int) -> np.ndarray:
        epoch, index = np.divmod(step * self.batch_size + np.arange(lo, hi), self.n_windows)
        # rows are in run order, so their epochs ascend like np.unique's
        order = [window_order(self.seed, int(e), self.n_windows)[index[epoch == e]]
                 for e in np.unique(epoch)]
        return windows(self.tokens, np.concatenate(order), self.seq_len)

    def epoch(self, step: int) -> float:
        return step * self.batch_size / self.n_windows


@functools.lru_cache(maxsize=4)  # the epochs of the batches in flight
def window_order(seed: int, epoch: int, n_windows: int) -> np.ndarray:
    """The order in which `epoch` visits the windows."""
    return np.random.default_rng((seed, epoch)).permutation(n_windows)


def windows(tokens: np.ndarray, index: np.ndarray, seq_len: int) -> np.ndarray:
    """Windows `index` of seq_len + 1 tokens, window w starting at token w * seq_len: int32."""
    return tokens[index[:, None] * seq_len + np.arange(seq_len + 1)].astype(np.int32)


def source(cfg: Config) -> Source:
    """The training rows of `cfg`, preparing its dataset on first use."""
    if cfg.data.source == "synthetic":
        return Synthetic(cfg.vocab_size, cfg.seq_len, cfg.train.seed)
    tokens = corpus.prepare(cfg).tokens("train", cfg.seq_len)
    return Packed(tokens, cfg.seq_len, cfg.train.batch_size, cfg.train.seed)


def validation(cfg: Config) -> np.ndarray:
    """The fixed validation set, int32 [data.val_sequences, seq_len + 1]: windows spread evenly
    over the validation documents, so that all of them count, identical in every run on the
    same data (synthetic: rows drawn apart from every training row, independent of train.seed)."""
    n, seq_len = cfg.data.val_sequences, cfg.seq_len
    if cfg.data.source == "synthetic":
        return Synthetic(cfg.vocab_size, seq_len, seed=0).rows(Synthetic.VALIDATION_STEP, 0, n)
    dataset = corpus.prepare(cfg)
    tokens = dataset.tokens("val", seq_len)
    have = (len(tokens) - 1) // seq_len
    if have < n:
        raise DataError(
            f"{dataset.dir / 'val.bin'} holds {have} sequences of data.seq_len + 1 = "
            f"{seq_len + 1} tokens, fewer than data.val_sequences={n}: lower "
            f"data.val_sequences or data.seq_len, or raise data.val_fraction")
    return windows(tokens, np.linspace(0, have - 1, n).round().astype(int), seq_len)


def bytes_per_token(cfg: Config) -> float | None:
    """UTF-8 bytes per target token of the validation set, so that bits per byte =
    loss / ln 2 / bytes_per_token; None for synthetic data, which has no bytes."""
    if cfg.data.source == "synthetic":
        return None
    targets = validation(cfg)[:, 1:]
    return float(corpus.token_bytes(corpus.prepare(cfg).tokenizer())[targets].sum() / targets.size)


# --------------------------------------------------------------------------- batches


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


def batches(src: Source, sharding: jax.sharding.Sharding, shape: tuple[int, int], start: int,
            stop: int, prefetch: int = 2) -> Iterator[tuple[int, jax.Array]]:
    """(step, global batch) for steps start..stop-1, each built `prefetch` steps ahead in a
    background thread, so that reading and transfer overlap the device's work."""
    make = functools.partial(global_batch, src, sharding=sharding, shape=shape)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lm-data") as pool:
        ahead = collections.deque(pool.submit(make, s)
                                  for s in range(start, min(start + prefetch, stop)))
        for step in range(start, stop):
            if step + prefetch < stop:
                ahead.append(pool.submit(make, step + prefetch))
            yield step, ahead.popleft().result()
