"""Orbax checkpoints: asynchronous saves, a keep policy that deletes only what lm wrote,
restores onto any mesh, and a fallback past checkpoints that are incomplete, unreadable or
damaged.

A checkpoint holds three items: `params`, `opt` (optimiser state) and `meta` (JSON: the step,
the seed, the resolved config, a fingerprint of every array, and for loss-spike handling the
data positions skipped so far and the recent losses). Evaluation restores `params` alone.
Nothing is pickled: arrays are tensorstore files, the rest JSON.

A restore recomputes the fingerprints and compares them with those saved, so a flipped byte is
caught, not trained on. A step that cannot be restored is moved aside by training
(`checkpoints/100.corrupt-<time>`), kept for inspection, and the run goes on from an older one.

In a multi-process run every process makes the same calls: each writes and reads the shards its
devices hold, process 0 the metadata, all into one directory they share (a network filesystem).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from lm.config import CheckpointConfig
from lm.errors import CheckpointError
from lm.processes import is_primary, sync
from lm.rundir import checkpoints as directory

log = logging.getLogger("lm")
ITEMS = ("params", "opt", "meta")
# What orbax writes into a step directory (or a save in progress) for lm's items.
ORBAX_FILES = {"_CHECKPOINT_METADATA", "commit_success.txt", *ITEMS}


class _Damaged(Exception):
    """A checkpoint whose arrays do not match the fingerprints saved with them."""


def manager(run_dir: str | Path, *, read_only: bool = False) -> ocp.CheckpointManager:
    """A manager for the run's checkpoints. Orbax deletes nothing itself: `save` keeps the
    policy, deleting only step directories that hold nothing but what lm writes."""
    root = directory(run_dir)
    if not read_only and root.is_symlink() and not root.resolve().is_relative_to(
            root.parent.resolve()):
        raise CheckpointError(
            f"{root} is a symlink to {root.resolve()}, outside the run directory, where lm "
            "would delete old checkpoints; replace it by a directory, or set train.run_dir to "
            "a directory on that filesystem")
    if not read_only and is_primary():
        for tmp in root.glob("*.orbax-checkpoint-tmp*") if root.is_dir() else ():
            _remove(tmp, "a save that never finished")
    sync("incomplete saves removed")
    options = ocp.CheckpointManagerOptions(create=not read_only, read_only=read_only,
                                           enable_async_checkpointing=True)
    handlers = {"params": ocp.StandardCheckpointHandler(), "opt": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(root, options=options, item_handlers=handlers)


def _lm_wrote(path: Path, step: int | None) -> bool:
    """Whether lm wrote `path` and nothing else is in it: a real directory (not a link)
    holding only what orbax writes for lm's items and, for a finished save of `step`, lm's
    meta recording that step."""
    if not path.is_dir() or path.is_symlink() or not {p.name for p in path.iterdir()
                                                      } <= ORBAX_FILES:
        return False
    if step is None:  # a save in progress holds whatever it got to
        return True
    try:
        return json.loads((path / "meta" / "metadata").read_text())["step"] == step
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _remove(path: Path, why: str, step: int | None = None) -> None:
    if not _lm_wrote(path, step):
        log.warning("checkpoint: leaving %s (%s): it holds files lm did not write", path, why)
        return
    log.info("checkpoint: removing %s: %s", path.name, why)
    shutil.rmtree(path)


def kept(steps: list[int], cfg: CheckpointConfig) -> set[int]:
    """The steps the policy keeps: the newest `keep`, every `keep_every`-th, and those of
    `checkpoint.steps`."""
    steps = sorted(steps)
    return set(steps[-cfg.keep:]) | {s for s in steps if cfg.keep_every and s % cfg.keep_every == 0
                                     or s in cfg.steps}


def save(mngr: ocp.CheckpointManager, state: dict, meta: dict, cfg: CheckpointConfig) -> None:
    """Start an asynchronous save of `state` at `meta["step"]`, with the fingerprint of every
    array, after deleting the steps the keep policy lets go. The device-to-host copy happens
    before this returns, so the caller may donate `state` to the next step."""
    mngr.wait_until_finished()  # the previous save: long done, one save interval ago
    prune(mngr, cfg, meta["step"])
    step = meta["step"]
    meta = {**meta, "fingerprints": {name: fingerprints(state[name]) for name in ("params", "opt")}}
    mngr.save(step, force=True, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state["params"]), opt=ocp.args.StandardSave(state["opt"]),
        meta=ocp.args.JsonSave(meta)))


def prune(mngr: ocp.CheckpointManager, cfg: CheckpointConfig, saving: int | None = None
          ) -> None:
    """Delete the committed steps the keep policy lets go once step `saving` is saved, but
    never the newest committed one before that save has committed: a kill during it must
    leave a complete checkpoint (with checkpoint.keep=1 the policy keeps the new step only)."""
    done = sorted(mngr.all_steps())
    if is_primary():
        keep = kept(done + ([saving] if saving is not None else []), cfg) | set(done[-1:])
        for old in done:
            if old not in keep:
                _remove(Path(mngr.directory) / str(old), "beyond checkpoint.keep", old)
    sync("old checkpoints removed")
    mngr.reload()


# --------------------------------------------------------------------------- fingerprints


def _path_name(path) -> str:
    parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    return ".".join(p for p in parts if p != "value")


def _fingerprint(x):
    """A 32-bit fingerprint of an array's bits: their sum, each word weighted by an odd number
    set by its position. Any single flipped bit changes it, and since integer sums are exact,
    so is it on every mesh."""
    words = x.reshape(-1)
    if words.dtype.itemsize == 2:
        words = jax.lax.bitcast_convert_type(words, jnp.uint16).astype(jnp.uint32)
    else:
        words = jax.lax.bitcast_convert_type(words, jnp.uint32)
    weights = jnp.arange(words.size, dtype=jnp.uint32) * jnp.uint32(2654435761) | 1
    return jnp.sum(words * weights, dtype=jnp.uint32)


_fingerprint_tree = jax.jit(lambda tree: jax.tree.map(_fingerprint, tree))  # one program a tree


def fingerprints(tree) -> dict[str, int]:
    """{"blocks.wq": fingerprint, ...} of every array in `tree`."""
    values = jax.device_get(_fingerprint_tree(tree))
    return {_path_name(path): int(v)
            for path, v in jax.tree_util.tree_flatten_with_path(values)[0]}


# --------------------------------------------------------------------------- restore


def _shapes(tree) -> dict[str, tuple]:
    """{"blocks.wq": shape, ...}; Variables' `value` level is dropped."""
    return {_path_name(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def mismatches(mngr: ocp.CheckpointManager, step: int, abstract: dict,
               items=("params", "opt")) -> list[str]:
    """'item name: checkpoint shape vs model shape' for every array of `items` that differs:
    the parameters, and the optimiser state, whose structure follows the optimiser's settings
    (optim.clip_norm=0 drops the clipping stage)."""
    metadata = mngr.item_metadata(step)
    out = []
    for item in items:
        stored, wanted = _shapes(metadata[item].tree), _shapes(abstract[item])
        for name in sorted(set(stored) | set(wanted)):
            if stored.get(name) != wanted.get(name):
                out.append(f"{item} {name}: checkpoint {stored.get(name, 'absent')} vs "
                           f"configured {wanted.get(name, 'absent')}")
    return out


def _check_fits(mngr: ocp.CheckpointManager, step: int, abstract: dict, items) -> None:
    bad = mismatches(mngr, step, abstract, items)
    if bad:
        raise CheckpointError(
            f"checkpoint {step} in {mngr.directory} does not fit the configured model and "
            "optimiser (changed since it was saved? train into a new run directory):\n  "
            + "\n  ".join(bad[:20]) + (f"\n  ... {len(bad) - 20} more" if len(bad) > 20 else ""))


def restore(mngr: ocp.CheckpointManager, step: int, abstract: dict, shardings: dict,
            items=("params", "opt")) -> tuple[dict, dict]:
    """The `items` of checkpoint `step`, placed with `shardings` (the current mesh's, whatever
    mesh wrote them), and its meta, once their fingerprints match those saved."""
    _check_fits(mngr, step, abstract, items)
    targets = {name: jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract[name], shardings[name]) for name in items}
    args = {name: ocp.args.StandardRestore(target) for name, target in targets.items()}
    with _quiet_abandoned_reads():
        restored = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(),
                                                              **args))
    saved = restored["meta"].get("fingerprints", {})  # none in checkpoints of older lm versions
    for name in items:
        if name in saved and fingerprints(restored[name]) != saved[name]:
            raise _Damaged(f"the {name} arrays do not match the fingerprints saved with them")
    return {name: restored[name] for name in items}, restored["meta"]


def set_aside(mngr: ocp.CheckpointManager, step: int) -> Path:
    """Move step `step` out of the way (never delete it): checkpoints/<step>.corrupt-<time>."""
    path = Path(mngr.directory) / str(step)
    aside = path.with_name(f"{step}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
    if is_primary():
        path.rename(aside)
    sync("damaged checkpoint set aside")
    mngr.reload()
    return aside


@contextlib.contextmanager
def _quiet_abandoned_reads():
    """When a restore fails, orbax's reads of the checkpoint's other arrays still end in
    TensorStore's threads and, their event loop gone, print their errors as "unraisable"
    tracebacks (dozens, at random, some before the failure reaches lm). Drop those, and only
    those, from before the reads start: for the rest of the process if the restore fails,
    until it returns if it succeeds (then no read was abandoned)."""
    previous = sys.unraisablehook
    if getattr(previous, "quiets_abandoned_reads", False):
        yield
        return

    def hook(unraisable):
        message = str(unraisable.exc_value)
        if not (message == "Event loop is closed"
                or message.startswith("Encountered error while reading array index")):
            previous(unraisable)

    hook.quiets_abandoned_reads = True
    sys.unraisablehook = hook
    yield  # a failure raises here, leaving the hook in place
    sys.unraisablehook = previous


def why(e: BaseException) -> str:
    """What made a read fail, in a line: the innermost exception of the chain (orbax wraps
    TensorStore's precise error, "byte range ... not valid for value of size ...", in one that
    prints the store's whole spec)."""
    while (inner := e.__cause__ or e.__context__) is not None:
        e = inner
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:400]}"


def restore_latest(mngr: ocp.CheckpointManager, abstract: dict, shardings: dict,
                   items=("params", "opt"), *, steps=None,
                   aside: bool = False) -> tuple[dict, dict] | None:
    """The newest checkpoint (of `steps`, default all) that restores, saying which and why;
    None when there is none. A step that is unreadable or damaged is skipped, and once an
    older one restores, moved aside (`aside`: a run that will save again, and must not meet
    it; where none restores, all stay as they were); one that does not fit the model raises."""
    failed = []
    for step in sorted(mngr.all_steps() if steps is None else steps, reverse=True):
        try:
            state, meta = restore(mngr, step, abstract, shardings, items)
        except CheckpointError:
            raise
        except Exception as e:  # unreadable or damaged: fall back to an older one
            if _out_of_memory(e):  # the checkpoint is sound: this mesh cannot hold it
                raise CheckpointError(f"restoring checkpoint {step} from {mngr.directory} ran "
                                      f"out of memory ({why(e)}); use more devices or a mesh "
                                      "that shards it further") from e
            log.warning("checkpoint: step %d is unreadable (%s); trying an older one", step,
                        why(e))
            failed.append(step)
            continue
        for bad in failed if aside else ():
            log.warning("checkpoint: step %d moved to %s", bad, set_aside(mngr, bad).name)
        newest = steps is None or len(steps) > 1  # else the one step asked for
        log.info("checkpoint: restored step %d%s in %s", step,
                 ", the newest complete checkpoint" * newest, mngr.directory)
        return state, meta
    return None


def _out_of_memory(e: Exception) -> bool:
    return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e)


def branch_point(run_dir: str | Path, step: int) -> int | None:
    """The checkpoint of run `run_dir` that a branch at `step` starts from: its latest at or
    before the step (a budget added after the run ended finds none at it); None if none is
    (the branch starts afresh). A run without any checkpoint has not trained yet: an error."""
    steps = manager(run_dir, read_only=True).all_steps()
    if not steps:
        raise CheckpointError(f"train.branch_from={run_dir} has no checkpoint; train that run "
                              "first")
    return max((s for s in steps if s <= step), default=None)


def newest_fitting(run_dir: str | Path, abstract: dict) -> int | None:
    """The step of `run_dir`'s newest checkpoint with readable metadata (None: none), once its
    arrays fit the model and optimiser of `abstract`; raises where they do not."""
    if not directory(run_dir).is_dir():
        return None
    mngr = manager(run_dir, read_only=True)
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            _check_fits(mngr, step, abstract, ("params", "opt"))
        except CheckpointError:
            raise
        except Exception:  # unreadable metadata: the restore will move it aside
            continue
        return step
    return None


def check_fits(run_dir: str | Path, abstract: dict, steps: int) -> None:
    """Refuse a run directory whose newest readable checkpoint does not fit the model and
    optimiser, or lies beyond the run's `steps` (a run is not shortened), before the run writes
    anything into it."""
    step = newest_fitting(run_dir, abstract)
    if step is not None and step > steps:
        raise CheckpointError(
            f"{run_dir} has a checkpoint at step {step}, beyond train.steps={steps}: a run is "
            f"not shortened; give train.steps >= {step}, or another train.run_dir")
