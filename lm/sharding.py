"""The mesh, the one table of logical-axis rules, and `constrain` for activations.

Model code names axes logically (`batch`, `embed`, `heads`, ...). `rules` maps each name onto
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
    it; the batch is split over replica x data. Activations name their width `act_embed`: under
    FSDP the parameters' `embed` is split over `data`, which the activations' batch holds."""
    return {
        "batch": ("replica", "data"),
        "embed": ("data",) if fsdp else (),
        "act_embed": (),
        "heads": ("model",),
        "kv_heads": ("model",),
        "mlp": ("model",),
        "vocab": ("model",),
        "length": (),
        "kv": (),
        "layers": (),
    }


def spec(names: tuple[str | None, ...], table: dict[str, tuple[str, ...]]) -> P:
    """PartitionSpec for an array whose dims carry `names` (None: not sharded)."""
    axes = [table[name] if name else () for name in names]
    used = [a for dim in axes for a in dim]
    if len(used) != len(set(used)):
        raise ValueError(f"logical axes {names} map two dims onto one mesh axis: {axes}")
    return P(*(dim[0] if len(dim) == 1 else (dim or None) for dim in axes))


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
