"""Token sources and deterministic, sharded batches.

A batch is a pure function of (seed, step): row i of step s is the same on every mesh and every
process, each process builds only the rows its devices hold, and resuming needs nothing but the
step number. `source` serves the training rows of a config (a mixture's drawn from its sources by
weight) and `validation_sets` its fixed validation sets, from the datasets `lm.corpus` prepared.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import warnings
from collections.abc import Iterator
from typing import NamedTuple, Protocol

import jax
import numpy as np

from lm import corpus
from lm.config import Config


# --------------------------------------------------------------------------- sources


class Source(Protocol):
    def rows(self, step: int, lo: int, hi: int) -> np.ndarray:
        """Rows lo..hi of the global batch of `step`: int32 [hi - lo, seq_len + 1]."""

    def epoch(self, step: int) -> float:
        """How many passes over the data the first `step` steps make (0 if it never repeats)."""


class Synthetic:
    """A learnable built-in language for fast tests: a fixed sparse Markov chain in which each
    token has `branching` possible successors. Its entropy floor is log(branching)."""

    LANGUAGE_SEED = 1234  # the language is fixed; the data seed only picks the samples
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
        return self.at(step * self.batch_size + np.arange(lo, hi))

    def at(self, rows: np.ndarray) -> np.ndarray:
        """Rows `rows` (ascending) of the run."""
        epoch, index = np.divmod(rows, self.n_windows)
        # rows are in run order, so their epochs ascend like np.unique's
        order = [window_order(self.seed, int(e), self.n_windows)[index[epoch == e]]
                 for e in np.unique(epoch)]
        return windows(self.tokens, np.concatenate(order), self.seq_len)

    def epoch(self, step: int) -> float:
        return step * self.batch_size / self.n_windows


class Mixture:
    """Training rows drawn from several sources by weight: row g of the run is dealt to the
    source whose count `apportion` raises from g to g + 1, and is the next row of that source's
    own stream. The proportions hold to within half a row per source, with no sampling noise,
    and row g's source and place are a pure function of g, like everything else here."""

    def __init__(self, sources: list[Packed], weights: list[float], names: list[str],
                 batch_size: int):
        self.sources, self.weights, self.names = sources, weights, names
        self.batch_size, self.seq_len = batch_size, sources[0].seq_len

    def rows(self, step: int, lo: int, hi: int) -> np.ndarray:
        run_rows = step * self.batch_size + np.arange(lo, hi)
        before = apportion(run_rows, self.weights)
        source = np.argmax(apportion(run_rows + 1, self.weights) - before, axis=-1)
        out = np.empty((hi - lo, self.seq_len + 1), np.int32)
        for k, src in enumerate(self.sources):
            if (mine := source == k).any():
                out[mine] = src.at(before[mine, k])
        return out

    def epoch(self, step: int) -> float:
        """The most passes any source has had: > 1 means one repeats."""
        counts = apportion(step * self.batch_size, self.weights)
        return max(n / src.n_windows for n, src in zip(counts, self.sources))

    def shares(self, step: int) -> dict[str, float]:
        """The fraction of the first `step` steps' rows that each source gave."""
        counts = apportion(step * self.batch_size, self.weights)
        return {name: float(n / max(counts.sum(), 1)) for name, n in zip(self.names, counts)}


def apportion(rows, weights: list[float]) -> np.ndarray:
    """How many of the first `rows` rows each source gets: counts [..., n_sources] that sum to
    `rows`, each within half a row per source of its weight's share. Source k takes its share,
    rounded, of the rows that sources k, k+1, ... share, so no count ever falls as `rows` grows
    and exactly one rises from g to g + 1: that source gets row g."""
    w = np.asarray(weights, float)
    tails = np.cumsum(w[::-1])[::-1]  # the weight of sources k, k+1, ...
    ratios = np.divide(w, tails, out=np.zeros_like(w), where=tails > 0)
    left, counts = np.asarray(rows, np.int64), []
    for ratio in ratios[:-1]:
        counts.append(np.floor(left * ratio + 0.5).astype(np.int64))
        left = left - counts[-1]
    return np.stack([*counts, left], axis=-1)


def realised(src: Source, step: int) -> dict:
    """What a metrics row reports of the data besides its epoch: a mixture's realised shares."""
    return {"mixture": src.shares(step)} if isinstance(src, Mixture) else {}


@functools.lru_cache(maxsize=16)  # the epochs of the batches in flight, of every source
def window_order(seed: int, epoch: int, n_windows: int) -> np.ndarray:
    """The order in which `epoch` visits the windows."""
    return np.random.default_rng((seed, epoch)).permutation(n_windows)


def windows(tokens: np.ndarray, index: np.ndarray, seq_len: int) -> np.ndarray:
    """Windows `index` of seq_len + 1 tokens, window w starting at token w * seq_len: int32."""
    return tokens[index[:, None] * seq_len + np.arange(seq_len + 1)].astype(np.int32)


def source(cfg: Config) -> Source:
    """The training rows of `cfg`, preparing its datasets on first use."""
    t = cfg.train
    if cfg.data.source == "synthetic":
        return Synthetic(cfg.vocab_size, cfg.seq_len, cfg.data_seed)
    dataset = corpus.prepare(cfg)
    streams = [Packed(dataset.tokens(name, cfg.seq_len), cfg.seq_len, t.batch_size, cfg.data_seed)
               for name in dataset.splits("train")]
    mixture = cfg.data.mixture
    if not mixture:
        return streams[0]
    return Mixture(streams, [m.weight for m in mixture], [m.source for m in mixture],
                   t.batch_size)


class ValidationSet(NamedTuple):
    rows: np.ndarray  # int32 [sequences, seq_len + 1], the same in every run on the same data
    bytes_per_token: float | None  # UTF-8 bytes per target token (None: synthetic), for bpb


def validation_sets(cfg: Config) -> dict[str, ValidationSet]:
    """The fixed validation sets of `cfg` by name: `val` (the text held out of data.source, or
    of each data.mixture source in proportion to its weight, or data.val_source) and each of
    data.val_sets. Each is data.val_sequences windows spread evenly over its tokens, so that all
    of its documents count; bits per byte use its own bytes per token. Synthetic data: rows
    drawn apart from every training row, independent of train.seed."""
    n, seq_len = cfg.data.val_sequences, cfg.seq_len
    if cfg.data.source == "synthetic":
        rows = Synthetic(cfg.vocab_size, seq_len, seed=0).rows(Synthetic.VALIDATION_STEP, 0, n)
        return {"val": ValidationSet(rows, None)}
    dataset = corpus.prepare(cfg)
    parts = {name: [(given, "val", n)] for name, given in dataset.sets.items()}
    if "val" not in parts:  # held out of the training sources
        weights = [m.weight for m in cfg.data.mixture] or [1.0]
        counts = apportion(n, weights)
        parts["val"] = [(dataset, split, int(c))
                        for split, c in zip(dataset.splits("val"), counts) if c]
    lengths = corpus.token_bytes(dataset.tokenizer())
    sets = {}
    for name in cfg.data.set_names:
        rows = np.concatenate([spread(ds, split, count, seq_len)
                               for ds, split, count in parts[name]])
        targets = rows[:, 1:]
        sets[name] = ValidationSet(rows, float(lengths[targets].sum() / targets.size))
    return sets


def spread(dataset: corpus.Dataset, split: str, n: int, seq_len: int) -> np.ndarray:
    """`n` windows spread evenly over the token stream `split`, or all it holds if fewer."""
    tokens = dataset.tokens(split, seq_len)
    have = (len(tokens) - 1) // seq_len
    if have < n:
        warnings.warn(
            f"{dataset.dir / dataset.manifest['splits'][split]['file']} ({dataset.key}) holds "
            f"{have} sequences of data.seq_len + 1 = {seq_len + 1} tokens, fewer than the "
            f"{n} of data.val_sequences: its validation loss is the mean of {have}. Give it more "
            "text, or lower data.val_sequences or data.seq_len", stacklevel=3)
    return windows(tokens, np.linspace(0, have - 1, min(n, have)).round().astype(int), seq_len)


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
