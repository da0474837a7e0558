"""The mesh, the one table of logical-axis rules, and `constrain` for activations.

Model code names axes logically (`batch`, `embed`, `heads`, ...). `RULES` maps each name onto
mesh axes; XLA's SPMD partitioner then inserts the collectives. The mesh always has the axes
(replica, data, model), some of size 1, so the same code runs on one device or a pod.
"""

from __future__ import annotations

import contextlib
import contextvars
import re

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lm.config import Config, mesh_shape

AXES = ("replica", "data", "model")


def rules(fsdp: bool) -> dict[str, tuple[str, ...]]:
    """Logical axis -> mesh axes. Parameters never use `replica`, so only gradient sums cross
    it; the batch is split over replica x data."""
    return {
        "batch": ("replica", "data"),
        "embed": ("data",) if fsdp else (),
        "heads": ("model",),
        "kv_heads": ("model",),
        "mlp": ("model",),
        "vocab": ("model",),
        "length": (),
        "kv": (),
        "layers": (),
    }


def spec(names: tuple[str | None, ...], table: dict[str, tuple[str, ...]]) -> P:
    """PartitionSpec for an array whose dims carry `names`. A mesh axis already taken by an
    earlier dim is skipped, so activations (batch, length, embed) keep embed unsharded under
    FSDP while parameters (embed, mlp) shard it."""
    used: set[str] = set()
    out = []
    for name in names:
        axes = tuple(a for a in table[name] if a not in used) if name else ()
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else (axes or None))
    return P(*out)


def make_mesh(cfg: Config, devices=None) -> Mesh:
    """The configured mesh over `devices` (default: all), with Auto axes so that sharded
    contractions are left to the SPMD partitioner (jax.make_mesh defaults to Explicit)."""
    devices = jax.devices() if devices is None else list(devices)
    sizes = mesh_shape(cfg, len(devices))
    return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(AXES), devices=devices)


# The rule table in force while tracing model code; None: no mesh, constrain is a no-op.
_active: contextvars.ContextVar[tuple[Mesh, dict] | None] = contextvars.ContextVar(
    "lm_sharding", default=None)


@contextlib.contextmanager
def use(mesh: Mesh, table: dict[str, tuple[str, ...]]):
    token = _active.set((mesh, table))
    try:
        yield
    finally:
        _active.reset(token)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Pin an activation's layout at a layer boundary (no-op outside `use`)."""
    active = _active.get()
    if active is None:
        return x
    mesh, table = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec(names, table)))


def named(mesh: Mesh, table: dict, names: tuple[str | None, ...]) -> NamedSharding:
    return NamedSharding(mesh, spec(names, table))


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def collectives(hlo_text: str) -> dict[str, int]:
    """Count the collective ops in optimised HLO text (async pairs counted once)."""
    counts = {}
    for op in COLLECTIVES:
        n = len(re.findall(rf" {op}(?:-start)?\(", hlo_text))
        if n:
            counts[op] = n
    return counts
