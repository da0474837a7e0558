import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm import config, data, sharding, train
from lm.model import Transformer

from conftest import small

MESHES = [(1, 1), (8, 1), (4, 2), (2, 4), (1, 8)]


def wide(*overrides):
    """Eight heads, so that every mesh above divides them."""
    return small("model.d_model=64", "model.n_heads=8", "optim.lr=1e-2", *overrides)


def run_on_mesh(cfg, data_size, model_size, state, steps=3):
    """Logits of `state`'s model, then the losses of `steps` training steps from it."""
    cfg = config.replace(cfg, mesh={"data": data_size, "model": model_size})
    program = train.compile_program(cfg, jax.devices()[: data_size * model_size])
    lay = program.layout
    state = jax.device_put(state, lay.shardings)
    src = data.source(cfg)
    tokens = data.global_batch(src, 0, lay.batch_sharding, lay.batch_shape)
    with sharding.use(lay.mesh, lay.table):
        logits = jax.jit(lambda p, t: nnx.merge(lay.graphdef, p)(t[:, :-1]))(
            state["params"], tokens)
    losses = []
    for step in range(steps):
        tokens = data.global_batch(src, step, lay.batch_sharding, lay.batch_shape)
        state, metrics = program.step(state, tokens, np.float32(cfg.optim.lr))
        losses.append(float(metrics["loss"]))
    return np.asarray(logits), np.asarray(losses)


@pytest.mark.parametrize("fsdp", [False, True])
def test_meshes_agree(fsdp):
    cfg = wide(f"mesh.fsdp={str(fsdp).lower()}")
    state = jax.device_get(train.compile_program(cfg, jax.devices()[:1]).init())
    ref_logits, ref_losses = run_on_mesh(cfg, 1, 1, state)
    assert ref_losses[-1] < ref_losses[0]
    for data_size, model_size in MESHES[1:]:
        logits, losses = run_on_mesh(cfg, data_size, model_size, state)
        np.testing.assert_allclose(logits, ref_logits, atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)


def init_model(cfg):
    return Transformer(cfg.model, rngs=nnx.Rngs(0))


def test_causal():
    model = init_model(small("model.n_kv_heads=2"))
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 128)
    changed = tokens.at[:, 9:].set((tokens[:, 9:] + 1) % 128)
    forward = nnx.jit(lambda m, t: m(t))
    a, b = forward(model, tokens), forward(model, changed)
    np.testing.assert_allclose(a[:, :9], b[:, :9], atol=1e-6)
    assert not np.allclose(a[:, 9:], b[:, 9:])


@pytest.mark.parametrize("variant", ["model.scan_layers=false", "model.remat=full",
                                     "model.remat=dots", "model.loss_chunk=24"])
def test_variants_compute_the_same_loss_and_grads(variant):
    tokens = jax.random.randint(jax.random.key(1), (4, 33), 0, 128)

    def loss_and_grads(cfg):
        model = init_model(cfg)
        graphdef, params = nnx.split(model)
        loss_fn = lambda p: nnx.merge(graphdef, p).loss(tokens[:, :-1], tokens[:, 1:])
        return jax.jit(jax.value_and_grad(loss_fn))(params)

    ref_loss, ref_grads = loss_and_grads(small())
    loss, grads = loss_and_grads(small(variant))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, atol=1e-6, rtol=1e-4)


def test_initial_loss_is_near_uniform_and_bf16_runs():
    tokens = jax.random.randint(jax.random.key(5), (2, 17), 0, 128)
    for dtype in ("float32", "bfloat16"):
        model = init_model(small(f"model.dtype={dtype}", "model.tie_embeddings=false",
                                 "model.mlp=gelu"))
        loss = float(model.loss(tokens[:, :-1], tokens[:, 1:]))
        assert abs(loss - np.log(128)) < 0.1, (dtype, loss)
        assert model.blocks.wq[...].dtype == jnp.float32  # parameters stay fp32
