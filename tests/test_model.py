import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm import config, data, sharding, train
from lm.model import Transformer, cross_entropy, linear, masked_attention

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
        state, metrics = program.step(state, tokens)
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


def test_chunked_cross_entropy_matches_and_handles_ragged_chunks():
    x = jax.random.normal(jax.random.key(2), (3, 7, 16))
    head = jax.random.normal(jax.random.key(3), (16, 50))
    y = jax.random.randint(jax.random.key(4), (3, 7), 0, 50)
    logits = jnp.einsum("btd,dv->btv", x, head)
    expected = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], -1).mean()
    for chunk in (0, 4, 5, 21, 100):
        np.testing.assert_allclose(cross_entropy(x, head, y, chunk).mean(), expected, rtol=1e-6)


def test_initial_loss_is_near_uniform_and_bf16_runs():
    tokens = jax.random.randint(jax.random.key(5), (2, 17), 0, 128)
    for dtype in ("float32", "bfloat16"):
        model = init_model(small(f"model.dtype={dtype}", "model.tie_embeddings=false",
                                 "model.mlp=gelu"))
        loss = float(model.loss(tokens[:, :-1], tokens[:, 1:]))
        assert abs(loss - np.log(128)) < 0.1, (dtype, loss)
        assert model.blocks.wq[...].dtype == jnp.float32  # parameters stay fp32


def grads_of(fn, *args):
    """Gradients of a random projection of fn's output with respect to every argument."""
    out = fn(*args)
    probe = jax.random.normal(jax.random.key(9), out.shape)
    return jax.grad(lambda *a: jnp.sum(fn(*a) * probe), argnums=range(len(args)))(*args)


@pytest.mark.parametrize("spec, x_shape, w_shape", [
    ("btd,df->btf", (2, 5, 8), (8, 3)),  # x larger than the cotangent: dw via its transpose
    ("btd,df->btf", (2, 5, 3), (3, 8)),
    ("btd,dhk->bthk", (2, 5, 8), (8, 2, 3)),
    ("bthk,hkd->btd", (2, 5, 2, 3), (2, 3, 4)),
])
def test_linear_gradients_equal_autodiff(spec, x_shape, w_shape):
    x = jax.random.normal(jax.random.key(0), x_shape)
    w = jax.random.normal(jax.random.key(1), w_shape)
    ours = grads_of(lambda x, w: linear(spec, x, w), x, w)
    ref = grads_of(lambda x, w: jnp.einsum(spec, x, w), x, w)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t, s", [(6, 6), (2, 7)])  # training, and new positions over a cache
def test_attention_gradients_equal_autodiff(t, s):
    b, g, r, k = 2, 2, 3, 4
    q = jax.random.normal(jax.random.key(0), (b, t, g, r, k))
    kk = jax.random.normal(jax.random.key(1), (b, s, g, k))
    v = jax.random.normal(jax.random.key(2), (b, s, g, k))
    mask_ts = jnp.arange(s)[None, :] <= (s - t + jnp.arange(t))[:, None]

    def reference(q, kk, v):
        scores = jnp.where(mask_ts, jnp.einsum("btgrk,bsgk->bgrts", q, kk), -jnp.inf)
        return jnp.einsum("bgrts,bsgk->btgrk", jax.nn.softmax(scores, axis=-1), v)

    ours = lambda q, kk, v: masked_attention(q, kk, v, mask_ts)
    np.testing.assert_allclose(ours(q, kk, v), reference(q, kk, v), rtol=1e-5, atol=1e-6)
    for a, b_ in zip(grads_of(ours, q, kk, v), grads_of(reference, q, kk, v)):
        np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-5)
