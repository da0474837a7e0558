"""The train state — parameters, optimiser state, step — and where it lives on a mesh.

Nothing here compiles: `layout` gives the abstract shapes and a sharding for every leaf, from
which training creates the state sharded at birth and checkpoints restore onto any mesh.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lm import flops, sharding
from lm.config import Config
from lm.model import Transformer


def _name(path) -> str:
    """A parameter's name in `lm.flops.parameters` (`blocks.wq`) from its path in the state."""
    return ".".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def _by_name(fn, tree):
    """`fn(name, leaf)` for every leaf of a tree of parameters (or of their updates)."""
    return jax.tree_util.tree_map_with_path(lambda path, x: fn(_name(path), x), tree)


def optimizer(cfg: Config) -> optax.GradientTransformation:
    """AdamW without its learning rate: the update direction (clipping, Adam, decoupled weight
    decay, not on norm scales), which the step scales by the step's learning rate, an input of
    the step. Under muP each parameter's direction is then multiplied by its role's LR
    multiplier (`lm.flops.MUP`): the decay too, so that it scales with the LR as in AdamW with
    per-group learning rates (the `mup` package's MuAdamW)."""
    o, table = cfg.optim, flops.parameters(cfg.model)
    decays = {name: p.role != flops.NORM for name, p in table.items()}
    parts = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm else []
    parts += [optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps),
              optax.add_decayed_weights(o.weight_decay, mask=lambda params: _by_name(
                  lambda name, _: decays[name], params))]
    if cfg.model.parametrization == "mup":
        lr = {name: flops.scales(cfg.model, p.role).lr for name, p in table.items()}
        parts.append(optax.stateless(lambda updates, _: _by_name(
            lambda name, u: u * lr[name], updates)))
    return optax.chain(*parts)


def shardings_of(abstract, mesh: Mesh, table: dict):
    """A sharding for every leaf: parameters (and the Adam moments that mirror them) from
    their logical axes, everything else (counters) replicated."""

    def leaf(x):
        if isinstance(x, nnx.Variable):
            return x.replace(sharding.named(mesh, table, x.axes))
        return NamedSharding(mesh, P())

    return jax.tree.map(leaf, abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))


@dataclasses.dataclass(frozen=True)
class Layout:
    """The train state of one config on one mesh: shapes and shardings, nothing allocated."""

    cfg: Config
    mesh: Mesh
    table: dict
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    abstract: dict  # {"params", "opt", "step"} as ShapeDtypeStructs
    shardings: dict
    batch_sharding: NamedSharding

    @property
    def batch_shape(self) -> tuple[int, int]:
        return self.cfg.train.batch_size, self.cfg.seq_len + 1


SEED = jax.ShapeDtypeStruct((), jnp.uint32)


def init_fn(cfg: Config, tx: optax.GradientTransformation):
    """seed -> fresh state. The seed is traced, so one compiled program serves every seed."""

    def init(seed):
        params = nnx.state(Transformer(cfg.model, rngs=nnx.Rngs(jax.random.key(seed))))
        return {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    return init


def layout(cfg: Config, devices=None) -> Layout:
    mesh = sharding.make_mesh(cfg, devices)
    table = sharding.rules(cfg.mesh.fsdp)
    tx = optimizer(cfg)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0))))
    abstract = jax.eval_shape(init_fn(cfg, tx), SEED)
    return Layout(cfg, mesh, table, graphdef, tx, abstract, shardings_of(abstract, mesh, table),
                  sharding.named(mesh, table, ("batch", None)))
