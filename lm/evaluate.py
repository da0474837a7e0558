"""Evaluation on the fixed validation sets — mean loss, its standard error, perplexity, bits per
byte, a row per set — for live parameters or any checkpoint on any mesh; and sampling with a KV
cache."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lm import (checkpoint, config as config_lib, corpus, data, rundir, sharding,
                state as state_lib, trackers)
from lm.errors import CheckpointError, ConfigError
from lm.model import init_cache
from lm.processes import is_primary


class Evaluator:
    """One validation set `name`, evaluated whole by `row(params, step)`: compiled once per
    layout, or sharing `fn`, another evaluator's compiled function for the same layout."""

    def __init__(self, lay: state_lib.Layout, val_bt1: np.ndarray,
                 bytes_per_token: float | None = None, name: str = "val", fn=None):
        self.lay, self.bytes_per_token, self.name = lay, bytes_per_token, name
        self.batch = config_lib.eval_batch_size(lay.cfg)
        n = len(val_bt1)
        # pad to whole batches with copies of row 0; their losses are dropped
        self.val_bt1 = np.concatenate([val_bt1, np.repeat(val_bt1[:1], -n % self.batch, 0)])
        self.n = n
        self.fn = fn or _compile(lay, self.batch, val_bt1.shape[1])

    def losses(self, params) -> np.ndarray:
        """Mean token loss of every validation sequence."""
        out = []
        for lo in range(0, len(self.val_bt1), self.batch):
            rows = self.val_bt1[lo:lo + self.batch]
            tokens = jax.make_array_from_callback(rows.shape, self.lay.batch_sharding,
                                                  lambda index: rows[index])
            out.append(self.fn(params, tokens))
        return np.concatenate(jax.device_get(out))[: self.n]

    def row(self, params, step: int) -> dict:
        per_sequence = self.losses(params)
        loss = float(per_sequence.mean())  # equal-length sequences: the token mean
        cfg = self.lay.cfg
        return {
            "step": step,
            "set": self.name,
            "tokens": step * cfg.tokens_per_step,
            "loss": loss,
            # sequences, not tokens, are the independent units
            "loss_sem": float(per_sequence.std(ddof=1) / math.sqrt(self.n)) if self.n > 1 else None,
            "ppl": math.exp(loss),
            "bpb": loss / math.log(2) / self.bytes_per_token if self.bytes_per_token else None,
            "eval_tokens": self.n * cfg.seq_len,
        }


def _compile(lay: state_lib.Layout, batch: int, width: int):
    """params, tokens [batch, width] -> the mean token loss of each sequence, compiled."""

    def sequence_losses(params, tokens_bt1):
        model = nnx.merge(lay.graphdef, params)
        return model.token_losses(tokens_bt1[:, :-1], tokens_bt1[:, 1:]).mean(-1)

    tokens = jax.ShapeDtypeStruct((batch, width), jnp.int32, sharding=lay.batch_sharding)
    with sharding.use(lay.mesh, lay.table):
        return jax.jit(sequence_losses, in_shardings=(lay.shardings["params"],
                                                      lay.batch_sharding),
                       out_shardings=NamedSharding(lay.mesh, P())).lower(
            lay.abstract["params"], tokens).compile()


@dataclasses.dataclass(frozen=True)
class Evaluators:
    """Evaluators of several validation sets: `rows(params, step)` gives a row per set."""

    each: list[Evaluator]

    def rows(self, params, step: int) -> list[dict]:
        return [ev.row(params, step) for ev in self.each]


def evaluator(lay: state_lib.Layout) -> Evaluators:
    """Every validation set of the layout's config (`data.validation_sets`), compiled once."""
    each = []
    for name, (val_bt1, bytes_per_token) in data.validation_sets(lay.cfg).items():
        each.append(Evaluator(lay, val_bt1, bytes_per_token, name, each[0].fn if each else None))
    return Evaluators(each)


# --------------------------------------------------------------------------- run directories


def evaluate_run(run_dir: str | Path, overrides=(), step: int | None = None,
                 every: bool = False, devices=None) -> list[dict]:
    """Evaluate checkpoints of a run on the current mesh, a row per validation set, appending
    new rows to eval.jsonl: the newest by default, `step`, or (`every`) each one not evaluated
    on every set yet."""
    run_dir = Path(run_dir)
    cfg = rundir.load_config(run_dir, overrides)
    tokens_per_step = rundir.load_config(run_dir).tokens_per_step  # as trained, overrides aside
    rundir.bind_data(run_dir, corpus.identity(cfg), training=False)
    mngr = checkpoint.manager(run_dir, read_only=True)
    available = sorted(mngr.all_steps())
    if not available:
        raise CheckpointError(
            f"no checkpoints in {checkpoint.directory(run_dir)}; train first "
            f"(lm train {run_dir / rundir.CONFIG})")
    done = {(r["step"], r.get("set", "val")) for r in rundir.evals(run_dir)}  # per set
    if step is not None:
        if step not in available:
            raise CheckpointError(
                f"no checkpoint at step {step} in {run_dir}; available: {available}")
        chosen = [step]
    elif every:
        chosen = [s for s in available if any((s, name) not in done for name in cfg.data.set_names)]
    else:
        chosen = available[-1:]
    if not chosen:
        return []
    lay = state_lib.layout(cfg, devices)
    ev = evaluator(lay)
    rows = []
    newest = step is None and not every  # the newest that restores, if the newest does not
    with (rundir.locked(run_dir) if is_primary() else contextlib.nullcontext(),
          trackers.opened(cfg, run_dir, writes=is_primary()) as tracked):
        # one row a set, however many processes
        log = rundir.Log(run_dir, writes=is_primary(), sinks=[tracked])
        for s in chosen:
            restored = checkpoint.restore_latest(mngr, lay.abstract, lay.shardings, ("params",),
                                                 steps=available if newest else [s])
            if restored is None and step is not None:
                raise CheckpointError(
                    f"checkpoint {step} in {checkpoint.directory(run_dir)} is unreadable or "
                    f"damaged; evaluate another step ({available}), or train again: lm train "
                    f"{run_dir / rundir.CONFIG} resumes from the newest good one")
            if restored is None:
                continue
            params, meta = restored
            for row in ev.rows(params["params"], meta["step"]):
                row["tokens"] = meta["step"] * tokens_per_step
                rows.append(row)
                if (row["step"], row["set"]) not in done:
                    log.append("eval", row)
    if not rows:
        raise CheckpointError(f"no checkpoint in {checkpoint.directory(run_dir)} restores; "
                              f"train again: lm train {run_dir / rundir.CONFIG}")
    return rows


# --------------------------------------------------------------------------- sampling


def sample_length(cfg: config_lib.Config, prompt: list[int], max_tokens: int | None) -> int:
    """`max_tokens`, or (None) as many as the trained sequence length leaves after `prompt`
    (at least one), once the prompt and they fit in the context."""
    if not prompt:
        raise ConfigError("the prompt is empty; give at least one token")
    room = cfg.model.context - len(prompt)
    if room < 1:
        raise ConfigError(f"the prompt ({len(prompt)} tokens) leaves no room in "
                          f"model.context={cfg.model.context}; shorten it")
    if max_tokens is not None and max_tokens > room:
        raise ConfigError(f"prompt ({len(prompt)} tokens) + --max-tokens {max_tokens} = "
                          f"{len(prompt) + max_tokens} exceeds model.context="
                          f"{cfg.model.context}")
    return max(min(room, cfg.seq_len - len(prompt)), 1) if max_tokens is None else max_tokens


def generate(lay: state_lib.Layout, params, prompt: list[int], max_tokens: int,
             temperature: float = 1.0, top_k: int = 0, seed: int = 0) -> list[int]:
    """Continue `prompt` by `max_tokens` tokens with a KV cache, in one jitted decode loop.
    temperature 0 is greedy; top_k > 0 samples among the k likeliest tokens."""
    cfg = lay.cfg
    total = len(prompt) + sample_length(cfg, prompt, max_tokens)

    def pick(logits_v, key):
        logits_v = jnp.where(jnp.arange(logits_v.shape[-1]) < cfg.vocab_size, logits_v, -jnp.inf)
        if temperature == 0:
            return jnp.argmax(logits_v).astype(jnp.int32)
        logits_v = logits_v / temperature
        if 0 < top_k < cfg.vocab_size:  # a k beyond the vocabulary: the whole of it
            logits_v = jnp.where(logits_v < jax.lax.top_k(logits_v, top_k)[0][-1], -jnp.inf,
                                 logits_v)
        return jax.random.categorical(key, logits_v).astype(jnp.int32)

    def run(params, prompt_t, key):
        model = nnx.merge(lay.graphdef, params)
        t = prompt_t.shape[0]
        logits, cache = model.decode(prompt_t[None], 0, init_cache(cfg.model, 1, total))
        out = jnp.zeros((total,), jnp.int32).at[:t].set(prompt_t)
        key, sub = jax.random.split(key)
        out = out.at[t].set(pick(logits[0, -1], sub))

        def step(i, carry):
            out, cache, key = carry
            logits, cache = model.decode(out[i][None, None], i, cache)
            key, sub = jax.random.split(key)
            return out.at[i + 1].set(pick(logits[0, -1], sub)), cache, key

        out, _, _ = jax.lax.fori_loop(t, total - 1, step, (out, cache, key))
        return out

    table = dict(lay.table, batch=())  # one sequence: replicate it rather than split it
    with sharding.use(lay.mesh, table):
        out = jax.jit(run)(params, jnp.asarray(prompt, jnp.int32), jax.random.key(seed))
    return [int(x) for x in jax.device_get(out)]
