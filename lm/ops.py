"""Kernels with hand-written gradients, and the attention paths.

The backward passes here were measured to help on CPU, where XLA's own transposes relay large
arrays (`tools/bench.py`: 1.32x for the projections, 1.06-1.09x for attention). On other
backends XLA's autodiff and `jax.nn.dot_product_attention` are used: on an H200, cuDNN's flash
attention made gpt2-small's step 1.6x faster at context 1024 and 3.0x at 4096 than XLA's
autodiff of the einsum path (experiments/results/h200/). Einsum letters as in `lm.model`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lm import config as config_lib

F32 = jnp.float32


def hand_written_gradients() -> bool:
    """Whether the kernels below use their written-out backward passes: on CPU, where they
    were measured to be faster."""
    return jax.default_backend() == "cpu"


# --------------------------------------------------------------------------- projections


def linear(spec: str, x, w):
    """`einsum(spec, x, w)` of activations x and a weight w (spec like "btd,df->btf")."""
    if hand_written_gradients():
        return _linear(spec, x, w)
    return jnp.einsum(spec, x, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _linear(spec: str, x, w):
    """The einsum with its backward pass written out. XLA's own transpose computes the weight
    gradient as (cotangent^T x)^T and, on CPU, first copies the large cotangent into a
    transposed layout; that copy cost bench a quarter of its step. Here dw puts the smaller of
    x and the cotangent first, so only it is relaid."""
    return jnp.einsum(spec, x, w)


def _linear_fwd(spec, x, w):
    return jnp.einsum(spec, x, w), (x, w)


def _linear_bwd(spec, res, g):
    x, w = res
    inputs, out = spec.split("->")
    xs, ws = inputs.split(",")
    dx = jnp.einsum(f"{out},{ws}->{xs}", g, w)
    if x.size <= g.size:
        return dx, jnp.einsum(f"{xs},{out}->{ws}", x, g)
    free = [a for a in ws if a in out] + [a for a in ws if a in xs]  # dw's axes, g's first
    dw_t = jnp.einsum(f"{out},{xs}->{''.join(free)}", g, x)
    return dx, jnp.transpose(dw_t, [free.index(a) for a in ws])


_linear.defvjp(_linear_fwd, _linear_bwd)


# --------------------------------------------------------------------------- attention


def fused_attention_applies(q_bthk, causal: bool) -> bool:
    """Whether cuDNN's fused flash attention takes this call: on a GPU, 16-bit, causal, with
    a head size it supports. `jax.nn.dot_product_attention` left to choose picks XLA's
    unfused attention, so the choice is made here; sampling's masked calls stay on XLA."""
    return (jax.default_backend() == "gpu" and causal
            and q_bthk.dtype in (jnp.bfloat16, jnp.float16)
            and q_bthk.shape[-1] % 8 == 0 and q_bthk.shape[-1] <= 128)


def attention(q_bthk, k_bsgk, v_bsgk, positions_t, scale: float, path: str = "auto"):
    """Causal grouped-query attention of t query positions (`positions_t`, their indices
    among the s keys) over keys and values of g heads; query head i uses kv head i // (h/g).
    `path`: `einsum` (the written-out backward pass), `dot_product`
    (jax.nn.dot_product_attention), or `auto`: einsum on CPU, dot_product elsewhere."""
    path = config_lib.attention_path(path, jax.default_backend())
    b, t, h, k = q_bthk.shape
    s, g = k_bsgk.shape[1], k_bsgk.shape[2]
    mask_ts = jnp.arange(s)[None, :] <= positions_t[:, None]
    if path == "dot_product":
        causal = t == s  # training: the keys are the queries' own positions
        return jax.nn.dot_product_attention(
            q_bthk, k_bsgk, v_bsgk, scale=scale, is_causal=causal,
            mask=None if causal else mask_ts[None, None],
            implementation="cudnn" if fused_attention_applies(q_bthk, causal) else "xla")
    q_btgrk = q_bthk.reshape(b, t, g, h // g, k) * jnp.asarray(scale, q_bthk.dtype)
    return masked_attention(q_btgrk, k_bsgk, v_bsgk, mask_ts).reshape(b, t, h, k)


def max_attention_logit(q_bthk, k_bsgk, positions_t, scale: float):
    """The largest |scale * q.k| over the pairs the causal mask allows, outside the gradient:
    its growth is the attention instability of Wortsman et al. 2023. It recomputes the scores
    (about a quarter of attention's FLOPs), so the step computes it only when asked."""
    b, t, h, k = q_bthk.shape
    s, g = k_bsgk.shape[1], k_bsgk.shape[2]
    q_btgrk = jax.lax.stop_gradient(q_bthk).reshape(b, t, g, h // g, k)
    scores = jnp.einsum("btgrk,bsgk->bgrts", q_btgrk, jax.lax.stop_gradient(k_bsgk))
    mask_ts = jnp.arange(s)[None, :] <= positions_t[:, None]
    return jnp.max(jnp.where(mask_ts, jnp.abs(scores.astype(F32)), 0.0)) * scale


def _attention_probs(q_btgrk, k_bsgk, mask_ts):
    """Softmax probabilities [b, g, r, t, s] over the allowed keys, and their log-sum-exp."""
    scores = jnp.einsum("btgrk,bsgk->bgrts", q_btgrk, k_bsgk).astype(F32)
    scores = jnp.where(mask_ts, scores, jnp.finfo(F32).min)
    lse_bgrt = jax.nn.logsumexp(scores, axis=-1)
    return jnp.exp(scores - lse_bgrt[..., None]), lse_bgrt


@jax.custom_vjp
def masked_attention(q_btgrk, k_bsgk, v_bsgk, mask_ts):
    """softmax(q k^T over the keys `mask_ts` allows) v, with q already scaled; fp32 softmax.

    The backward pass is FlashAttention's: probabilities are recomputed from the saved
    log-sum-exp instead of being kept for every layer, and the softmax gradient uses
    rowsum(dO * O) for rowsum(dP * P), so fewer passes run over the [t, s] scores
    (1.06-1.09x on the bench configs)."""
    return _masked_attention_fwd(q_btgrk, k_bsgk, v_bsgk, mask_ts)[0]


def _masked_attention_fwd(q_btgrk, k_bsgk, v_bsgk, mask_ts):
    probs, lse_bgrt = _attention_probs(q_btgrk, k_bsgk, mask_ts)
    o_btgrk = jnp.einsum("bgrts,bsgk->btgrk", probs.astype(q_btgrk.dtype), v_bsgk)
    return o_btgrk, (q_btgrk, k_bsgk, v_bsgk, mask_ts, o_btgrk, lse_bgrt)


def _masked_attention_bwd(res, do_btgrk):
    q_btgrk, k_bsgk, v_bsgk, mask_ts, o_btgrk, lse_bgrt = res
    scores = jnp.einsum("btgrk,bsgk->bgrts", q_btgrk, k_bsgk).astype(F32)
    probs = jnp.where(mask_ts, jnp.exp(scores - lse_bgrt[..., None]), 0.0)
    dv_bsgk = jnp.einsum("bgrts,btgrk->bsgk", probs.astype(do_btgrk.dtype), do_btgrk)
    dp = jnp.einsum("btgrk,bsgk->bgrts", do_btgrk, v_bsgk).astype(F32)
    delta_btgr = jnp.sum(do_btgrk.astype(F32) * o_btgrk.astype(F32), axis=-1)
    ds = (probs * (dp - jnp.moveaxis(delta_btgr, 1, -1)[..., None])).astype(q_btgrk.dtype)
    dq_btgrk = jnp.einsum("bgrts,bsgk->btgrk", ds, k_bsgk)
    dk_bsgk = jnp.einsum("bgrts,btgrk->bsgk", ds, q_btgrk)
    return dq_btgrk, dk_bsgk, dv_bsgk, None


masked_attention.defvjp(_masked_attention_fwd, _masked_attention_bwd)


# --------------------------------------------------------------------------- loss


def cross_entropy(x_btd, head_dv, targets_bt, chunk: int = 0):
    """Per-token cross-entropy [n = b*t] of logits x @ head against targets (fp32 log-sum-exp)."""
    return logit_terms(x_btd, head_dv, targets_bt, chunk)[0]


def logit_terms(x_btd, head_dv, targets_bt, chunk: int = 0):
    """Per token [n = b*t], from the logits x @ head (fp32): the cross-entropy against targets,
    the log-sum-exp log Z (the z-loss's term) and the mean square logit. Under jit what the
    caller leaves unused is never computed.

    With `chunk` > 0 the n tokens are processed `chunk` at a time under remat (c chunks), so
    neither the forward nor the backward pass holds more than one chunk's logits."""
    head_dv = head_dv.astype(x_btd.dtype)

    def terms(x_nd, y_n):
        logits_nv = linear("nd,dv->nv", x_nd, head_dv).astype(F32)
        picked = jnp.take_along_axis(logits_nv, y_n[:, None], axis=-1)[:, 0]
        lse_n = jax.nn.logsumexp(logits_nv, axis=-1)
        return lse_n - picked, lse_n, jnp.mean(jnp.square(logits_nv), axis=-1)

    x_nd = x_btd.reshape(-1, x_btd.shape[-1])
    y_n = targets_bt.reshape(-1)
    n = y_n.shape[0]
    if chunk <= 0 or chunk >= n:
        return terms(x_nd, y_n)
    pad = -n % chunk
    x_cnd = jnp.pad(x_nd, ((0, pad), (0, 0))).reshape(-1, chunk, x_nd.shape[-1])
    y_cn = jnp.pad(y_n, (0, pad)).reshape(-1, chunk)
    terms_cn = jax.lax.map(lambda xy: jax.checkpoint(terms)(*xy), (x_cnd, y_cn))
    return tuple(t_cn.reshape(-1)[:n] for t_cn in terms_cn)
