"""Decoder-only Transformer, written in einsums over logically named axes.

Einsum letters, used by every einsum and every shape suffix in the project:
    b batch        t query position    s key position    d model width (embed)
    h query heads  g key/value heads   r query heads per kv head (h = g*r)
    k head dim     f MLP hidden        v vocabulary      l layers
    n tokens (b*t, flattened)          c chunks of tokens

Every parameter comes from the one table `lm.flops.parameters` and carries its logical axes in
the `axes` metadata of its `nnx.Param`; `lm.sharding.rules` turns them into mesh placements.
Activations are pinned at layer boundaries with names of their own where they must shard
differently (`act_embed`). Layers are stored stacked (a leading `layers` axis) and applied with
`lax.scan`, so compile time does not grow with depth. Under `model.parametrization=mup` the
roles' rules (`lm.flops.MUP`) set the initialisation, the attention scale and the logits'
multiplier; the learning rates follow them in `lm.state`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lm import flops
from lm.config import ModelConfig
from lm.ops import attention, cross_entropy, linear, logit_terms, max_attention_logit
from lm.sharding import constrain

F32 = jnp.float32
BTD = ("batch", "length", "act_embed")
BTHK = ("batch", "length", "heads", "kv")
BTGK = ("batch", "length", "kv_heads", "kv")
BTF = ("batch", "length", "mlp")
BTV = ("batch", "length", "vocab")


def _init(rngs: nnx.Rngs, p: flops.Param, cfg: ModelConfig) -> nnx.Param:
    """Norm scales start at one; matrices are normal with `init_std` (under muP times their
    role's width multiplier), the residual branches' outputs scaled down by depth (GPT-2) so
    that the residual stream stays O(1)."""
    if p.role == flops.NORM:
        return nnx.Param(jnp.ones(p.shape, F32), axes=p.axes)
    std = cfg.init_std * flops.scales(cfg, p.role).init
    if p.role == flops.RESIDUAL_OUT:
        std /= (2 * cfg.n_layers) ** 0.5
    return nnx.Param(std * jax.random.normal(rngs.params(), p.shape, F32), axes=p.axes)


class Blocks(nnx.Module):
    """All Transformer layers, parameters stacked along a leading `layers` axis."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        table = flops.parameters(cfg)
        self.names = tuple(path.removeprefix("blocks.") for path in table
                           if path.startswith("blocks."))
        for name in self.names:
            setattr(self, name, _init(rngs, table[f"blocks.{name}"], cfg))

    def __call__(self, x_btd, cfg: ModelConfig, start=0, cache=None, stats=False):
        """Apply every layer to hidden states of positions start..start+t. With a KV cache
        ({"k", "v"}: [l, b, s, g, k]) the new keys/values are written into it at `start` and
        attention covers everything cached so far. Returns (x, (updated cache, each layer's
        largest |attention logit| [l] with `stats`, else None))."""
        if cache is None and not (isinstance(start, int) and start == 0):
            raise ValueError("positions after 0 attend to the keys before them: pass the KV "
                             "cache that holds them")
        layers = {name: getattr(self, name)[...] for name in self.names}
        positions_t = start + jnp.arange(x_btd.shape[1])
        sin_tk, cos_tk = rope_table(positions_t, cfg.head_dim, cfg.rope_theta)

        def layer(x_btd, p_and_kv):
            p, kv = p_and_kv
            return block(p, x_btd, cfg, sin_tk, cos_tk, positions_t, kv, stats)

        if cfg.remat != "none":
            policy = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
            layer = jax.checkpoint(layer, policy=policy[cfg.remat])
        unroll = 1 if cfg.scan_layers else cfg.n_layers
        return jax.lax.scan(layer, x_btd, (layers, cache), unroll=unroll)


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        table = flops.parameters(cfg)
        self.embed = _init(rngs, table["embed"], cfg)
        self.blocks = Blocks(cfg, rngs)
        self.final_norm = _init(rngs, table["final_norm"], cfg)
        if "unembed" in table:
            self.unembed = _init(rngs, table["unembed"], cfg)

    def hidden(self, tokens_bt, start=0, cache=None, stats=False):
        """Final-normed hidden states [b, t, d] in the compute dtype, the updated cache, and
        with `stats` each layer's largest |attention logit| [l] (else None)."""
        cfg = self.cfg
        x_btd = constrain(self.embed[...].astype(cfg.dtype)[tokens_bt], BTD)
        x_btd, (cache, max_logit_l) = self.blocks(x_btd, cfg, start, cache, stats)
        return rms_norm(x_btd, self.final_norm[...], cfg.norm_eps), cache, max_logit_l

    def head_dv(self):
        """The output projection as [d, v] (the transposed embedding when tied), times muP's
        output multiplier: the logits' 1/m comes with the head's weights."""
        w_dv = self.embed[...].T if self.cfg.tie_embeddings else self.unembed[...]
        multiplier = flops.scales(self.cfg, flops.UNEMBEDDING).output
        return w_dv if multiplier == 1 else w_dv * multiplier

    def __call__(self, tokens_bt):
        """Logits [b, t, v] in fp32."""
        return self.decode(tokens_bt)[0]

    def decode(self, tokens_bt, start=0, cache=None):
        """Logits [b, t, v] (fp32) of tokens at positions start..start+t, and the cache."""
        x_btd, cache, _ = self.hidden(tokens_bt, start, cache)
        logits_btv = jnp.einsum("btd,dv->btv", x_btd, self.head_dv().astype(x_btd.dtype))
        return constrain(logits_btv.astype(F32), BTV), cache

    def token_losses(self, tokens_bt, targets_bt):
        """Next-token cross-entropy of every position, [b, t]."""
        x_btd, _, _ = self.hidden(tokens_bt)
        losses_n = cross_entropy(x_btd, self.head_dv(), targets_bt, self.cfg.loss_chunk)
        return losses_n.reshape(targets_bt.shape)

    def loss(self, tokens_bt, targets_bt):
        """Mean next-token cross-entropy."""
        return self.token_losses(tokens_bt, targets_bt).mean()

    def objective(self, tokens_bt, targets_bt, z_loss: float = 0.0, stats: bool = False):
        """What training minimises — the mean cross-entropy, plus with `z_loss` that weight
        times the mean log(Z)^2 of the output logits (PaLM; Wortsman et al. 2023), which keeps
        log Z near 0 — and metrics: `loss`, the cross-entropy alone, and with `stats`
        `max_attention_logit` and `output_logit_ms` (the logits' mean square)."""
        x_btd, _, max_logit_l = self.hidden(tokens_bt, stats=stats)
        ce_n, lse_n, square_n = logit_terms(x_btd, self.head_dv(), targets_bt,
                                            self.cfg.loss_chunk)
        loss = ce_n.mean()
        metrics = {"loss": loss}
        if stats:
            metrics |= {"max_attention_logit": max_logit_l.max(),
                        "output_logit_ms": square_n.mean()}
        return (loss + z_loss * jnp.mean(lse_n * lse_n) if z_loss else loss), metrics


def init_cache(cfg: ModelConfig, batch: int, length: int) -> dict:
    """An empty KV cache for `length` positions: {"k", "v"} of shape [l, b, s, g, k]."""
    shape = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, cfg.dtype), "v": jnp.zeros(shape, cfg.dtype)}


# --------------------------------------------------------------------------- layers


def rms_norm(x, scale, eps):
    x32 = x.astype(F32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * scale).astype(x.dtype)


def rope_table(positions_t, head_dim: int, theta: float):
    """sin, cos of shape [t, k/2] for rotary embeddings."""
    freqs = theta ** (-jnp.arange(0, head_dim, 2, dtype=F32) / head_dim)
    angles_tk = positions_t.astype(F32)[:, None] * freqs[None, :]
    return jnp.sin(angles_tk), jnp.cos(angles_tk)


def rope(x_bthk, sin_tk, cos_tk):
    """Rotate the two halves of each head's vector by position-dependent angles (any number
    of heads h)."""
    x1, x2 = jnp.split(x_bthk.astype(F32), 2, axis=-1)
    sin, cos = sin_tk[:, None, :], cos_tk[:, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x_bthk.dtype)


def attention_block(p, x_btd, cfg: ModelConfig, sin_tk, cos_tk, positions_t, kv=None,
                    stats=False):
    """Causal attention of the t new positions; with a cache `kv` ({"k","v"}: [b, s, g, k])
    over every cached position too. Returns (output, updated kv, with `stats` the largest
    |attention logit|, else None)."""
    q_bthk = constrain(linear("btd,dhk->bthk", x_btd, p["wq"]), BTHK)
    k_btgk = constrain(linear("btd,dgk->btgk", x_btd, p["wk"]), BTGK)
    v_btgk = constrain(linear("btd,dgk->btgk", x_btd, p["wv"]), BTGK)
    if cfg.qk_norm:  # bounds |q.k| by head_dim times the scales: no runaway attention logits
        q_bthk = rms_norm(q_bthk, p["q_norm"], cfg.norm_eps)
        k_btgk = rms_norm(k_btgk, p["k_norm"], cfg.norm_eps)
    q_bthk, k_btgk = rope(q_bthk, sin_tk, cos_tk), rope(k_btgk, sin_tk, cos_tk)
    if kv is None:
        k_bsgk, v_bsgk = k_btgk, v_btgk
    else:
        at = (0, positions_t[0], 0, 0)
        kv = {"k": jax.lax.dynamic_update_slice(kv["k"], k_btgk.astype(kv["k"].dtype), at),
              "v": jax.lax.dynamic_update_slice(kv["v"], v_btgk.astype(kv["v"].dtype), at)}
        k_bsgk, v_bsgk = kv["k"].astype(x_btd.dtype), kv["v"].astype(x_btd.dtype)
    scale = flops.attention_scale(cfg)
    o_bthk = attention(q_bthk, k_bsgk, v_bsgk, positions_t, scale, cfg.attention)
    max_logit = max_attention_logit(q_bthk, k_bsgk, positions_t, scale) if stats else None
    return linear("bthk,hkd->btd", constrain(o_bthk, BTHK), p["wo"]), kv, max_logit


def mlp(p, x_btd, cfg: ModelConfig):
    up_btf = linear("btd,df->btf", x_btd, p["w_up"])
    if cfg.mlp == "swiglu":
        h_btf = jax.nn.silu(linear("btd,df->btf", x_btd, p["w_gate"])) * up_btf
    else:
        h_btf = jax.nn.gelu(up_btf)
    h_btf = constrain(h_btf, BTF)
    return linear("btf,fd->btd", h_btf, p["w_down"])


def block(p, x_btd, cfg: ModelConfig, sin_tk, cos_tk, positions_t, kv=None, stats=False):
    """One layer: (x, (kv, max |attention logit| or None))."""
    p = jax.tree.map(lambda w: w.astype(cfg.dtype), p)
    h_btd, kv, max_logit = attention_block(p, rms_norm(x_btd, p["attn_norm"], cfg.norm_eps),
                                           cfg, sin_tk, cos_tk, positions_t, kv, stats)
    x_btd = x_btd + h_btd
    x_btd = x_btd + mlp(p, rms_norm(x_btd, p["mlp_norm"], cfg.norm_eps), cfg)
    return constrain(x_btd, BTD), (kv, max_logit)
