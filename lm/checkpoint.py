"""Orbax checkpoints: asynchronous saves with a keep policy, restores onto any mesh, and a
fallback past checkpoints that are incomplete or unreadable.

A checkpoint holds three items: `params`, `opt` (optimiser state) and `meta` (JSON: the step,
the seed, the resolved config, and for loss-spike handling the data positions skipped so far and
the recent losses). Evaluation restores `params` alone. Nothing is pickled: arrays are
tensorstore files, the rest JSON.

In a multi-process run every process makes the same calls: each writes and reads the shards its
devices hold, process 0 the metadata, all into one directory they share (a network filesystem).
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from lm.config import CheckpointConfig
from lm.errors import CheckpointError
from lm.rundir import checkpoints as directory

log = logging.getLogger("lm")


def manager(run_dir: str | Path, cfg: CheckpointConfig = CheckpointConfig(), *,
            read_only: bool = False) -> ocp.CheckpointManager:
    """A manager for the run's checkpoints; a writable one removes saves that never finished
    (they are never mistaken for checkpoints: orbax renames a save into place when done)."""
    if not read_only:
        for tmp in incomplete(run_dir):
            log.warning("checkpoint: removing %s: a save that never finished", tmp.name)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep, keep_period=cfg.keep_every or None, create=not read_only,
        read_only=read_only, enable_async_checkpointing=True, cleanup_tmp_directories=True)
    handlers = {"params": ocp.StandardCheckpointHandler(), "opt": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(directory(run_dir), options=options, item_handlers=handlers)


def save(mngr: ocp.CheckpointManager, state: dict, meta: dict) -> None:
    """Start an asynchronous save of `state` at `meta["step"]`. The device-to-host copy
    happens before this returns, so the caller may donate `state` to the next step."""
    mngr.save(meta["step"], force=True, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state["params"]), opt=ocp.args.StandardSave(state["opt"]),
        meta=ocp.args.JsonSave(meta)))


def incomplete(run_dir: str | Path) -> list[Path]:
    """Step directories of saves that never finished (e.g. killed mid-write)."""
    root = directory(run_dir)
    return sorted(p for p in root.glob("*.orbax-checkpoint-tmp*")) if root.is_dir() else []


def _shapes(tree) -> dict[str, tuple]:
    """{"blocks.wq": shape, ...}; Variables' `value` level is dropped."""

    def name(path):
        parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        return ".".join(p for p in parts if p != "value")

    return {name(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def mismatches(mngr: ocp.CheckpointManager, step: int, abstract_params) -> list[str]:
    """'name: checkpoint shape vs model shape' for every parameter that differs."""
    stored = _shapes(mngr.item_metadata(step)["params"].tree)
    wanted = _shapes(abstract_params)
    out = []
    for name in sorted(set(stored) | set(wanted)):
        if stored.get(name) != wanted.get(name):
            out.append(f"{name}: checkpoint {stored.get(name, 'absent')} vs model "
                       f"{wanted.get(name, 'absent')}")
    return out


def restore(mngr: ocp.CheckpointManager, step: int, abstract: dict, shardings: dict,
            items=("params", "opt")) -> tuple[dict, dict]:
    """The `items` of checkpoint `step`, placed with `shardings` (the current mesh's, whatever
    mesh wrote them), and its meta."""
    bad = mismatches(mngr, step, abstract["params"])
    if bad:
        raise CheckpointError(f"checkpoint {step} in {mngr.directory} does not fit the configured "
                              "model:\n  " + "\n  ".join(bad))
    targets = {name: jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract[name], shardings[name]) for name in items}
    args = {name: ocp.args.StandardRestore(target) for name, target in targets.items()}
    restored = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), **args))
    return {name: restored[name] for name in items}, restored["meta"]


def restore_latest(mngr: ocp.CheckpointManager, abstract: dict, shardings: dict,
                   items=("params", "opt")) -> tuple[dict, dict] | None:
    """The newest checkpoint that restores, saying which and why; None when there is none."""
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            state, meta = restore(mngr, step, abstract, shardings, items)
        except CheckpointError:
            raise
        except Exception as e:  # unreadable: fall back to an older one
            log.warning("checkpoint: step %d is unreadable (%s: %s); trying an older one",
                        step, type(e).__name__, str(e)[:200])
            continue
        log.info("checkpoint: restored step %d, the newest complete checkpoint in %s", step,
                 mngr.directory)
        return state, meta
    return None
