import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import ops
from lm.ops import attention, cross_entropy, linear, masked_attention


def test_chunked_cross_entropy_matches_and_handles_ragged_chunks():
    x = jax.random.normal(jax.random.key(2), (3, 7, 16))
    head = jax.random.normal(jax.random.key(3), (16, 50))
    y = jax.random.randint(jax.random.key(4), (3, 7), 0, 50)
    logits = jnp.einsum("btd,dv->btv", x, head)
    expected = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], -1).mean()
    for chunk in (0, 4, 5, 21, 100):
        np.testing.assert_allclose(cross_entropy(x, head, y, chunk).mean(), expected, rtol=1e-6)


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


@pytest.mark.parametrize("t, s", [(6, 6), (2, 7)])  # training, and new positions over a cache
def test_attention_paths_agree_with_grouped_heads(t, s):
    b, h, g, k = 2, 6, 2, 4
    q = jax.random.normal(jax.random.key(0), (b, t, h, k))
    kk = jax.random.normal(jax.random.key(1), (b, s, g, k))
    v = jax.random.normal(jax.random.key(2), (b, s, g, k))
    positions = s - t + jnp.arange(t)

    def out(path):
        return lambda q, kk, v: attention(q, kk, v, positions, k ** -0.5, path)

    einsum, dot = out("einsum"), out("dot_product")
    np.testing.assert_allclose(einsum(q, kk, v), dot(q, kk, v), rtol=1e-5, atol=1e-6)
    for a, b_ in zip(grads_of(einsum, q, kk, v), grads_of(dot, q, kk, v)):
        np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-5)
    # query head i attends with kv head i // (h / g): permuting kv heads changes the output
    assert not np.allclose(einsum(q, kk[:, :, ::-1], v[:, :, ::-1]), einsum(q, kk, v))


def test_fused_attention_only_where_cudnn_takes_it(monkeypatch):
    """cuDNN's flash attention on GPUs for 16-bit causal calls with a supported head size;
    XLA for fp32, sampling's masked calls, large heads, and every call off a GPU."""
    def applies(dtype=jnp.bfloat16, head=64, causal=True):
        return ops.fused_attention_applies(jnp.zeros((1, 4, 2, head), dtype), causal)

    assert not applies()  # this suite runs on CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert applies() and applies(jnp.float16) and applies(head=128)
    assert not applies(jnp.float32)
    assert not applies(causal=False)
    assert not applies(head=256) and not applies(head=60)
