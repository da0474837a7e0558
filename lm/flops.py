"""The model's parameters, and FLOP accounting, from a model config alone (nothing is
allocated, nothing here imports JAX).

`parameters` is the one table of parameter shapes and logical axes: the model builds itself
from it, `lm info` prints it, and the counts below sum it. Each parameter's role decides its
initialisation and, under muP (`MUP`), how its initialisation, learning rate and output scale
with width.

`memory_bytes` is a rough estimate of a training step's peak memory, to refuse runs that
cannot fit before they start.

FLOPs count multiply-adds as 2 and follow the matmul shapes the model really runs:
projections, attention scores and values over the full T x T square (the causal mask halves
the useful work, not the computed work), MLP and output head; backward = 2 x forward.
"""

from __future__ import annotations

import math
import time
from typing import NamedTuple

from lm.config import Config, ModelConfig, attention_path
from lm.errors import ConfigError

# What a parameter does, which decides its initialisation (and its parametrisation).
EMBEDDING, UNEMBEDDING, NORM, HIDDEN, RESIDUAL_OUT = (
    "embedding", "unembedding", "norm", "hidden", "residual_out")


class Param(NamedTuple):
    shape: tuple[int, ...]
    axes: tuple[str, ...]  # logical axis names, one per dim
    role: str


class Rule(NamedTuple):
    """How a role's parameters scale with width: their initial std, their Adam learning rate,
    and the output they produce (the logits, for the output head) are multiplied by these."""

    init: float
    lr: float
    output: float


# The maximal update parametrisation (muP; Yang et al. 2022, "Tensor Programs V", Table 3 for
# Adam; the output layer in its equivalent multiplier form, as the `mup` package's MuReadout)
# as exponents of the width multiplier m = d_model / base_width. It assumes that every hidden
# size grows with d_model (d_ff and n_heads * head_dim as multiples of it), so that each
# matrix's fan-in grows as m. At m = 1 it is SP but for the attention scale (1/head_dim).
# Weight decay is decoupled and scaled with each parameter's LR (lm.state.optimizer).
MUP = {
    EMBEDDING: Rule(init=0, lr=0, output=0),  # fan-in is the vocabulary: input-layer rules
    # the head's logits x 1/m with init and Adam LR kept: the same as init std 1/fan_in and
    # LR 1/fan_in (Table 3), and consistent with a tied head, which *is* the embedding
    UNEMBEDDING: Rule(init=0, lr=0, output=-1),
    NORM: Rule(init=0, lr=0, output=0),  # scales are vectors, like biases
    HIDDEN: Rule(init=-0.5, lr=-1, output=0),  # matrices: std 1/sqrt(fan_in), Adam LR 1/fan_in
    RESIDUAL_OUT: Rule(init=-0.5, lr=-1, output=0),  # as hidden (the depth scaling stays)
}
SP = Rule(init=1.0, lr=1.0, output=1.0)


def scales(m: ModelConfig, role: str) -> Rule:
    """The multipliers of a role's parameters at this width: all 1 under SP."""
    if m.parametrization == "sp":
        return SP
    width = m.d_model / m.base_width
    return Rule(*(width ** e for e in MUP[role]))


def attention_scale(m: ModelConfig) -> float:
    """What q.k is multiplied by: 1/head_dim under muP (q and k become correlated as they
    train, so q.k grows as head_dim, not its square root), 1/sqrt(head_dim) under SP."""
    return 1 / m.head_dim if m.parametrization == "mup" else m.head_dim ** -0.5


def parameters(m: ModelConfig) -> dict[str, Param]:
    """Every parameter by its path in the model (`blocks.wq`): shape, logical axes and role.
    Layers are stacked along a leading `layers` axis."""
    d, h, g, k, f, v = m.d_model, m.n_heads, m.n_kv_heads, m.head_dim, m.d_ff, m.vocab_size
    block = {
        "attn_norm": Param((d,), ("embed",), NORM),
        "wq": Param((d, h, k), ("embed", "heads", "kv"), HIDDEN),
        "wk": Param((d, g, k), ("embed", "kv_heads", "kv"), HIDDEN),
        **({"q_norm": Param((k,), ("kv",), NORM), "k_norm": Param((k,), ("kv",), NORM)}
           if m.qk_norm else {}),  # per-head RMSNorm scales, shared by the heads
        "wv": Param((d, g, k), ("embed", "kv_heads", "kv"), HIDDEN),
        "wo": Param((h, k, d), ("heads", "kv", "embed"), RESIDUAL_OUT),
        "mlp_norm": Param((d,), ("embed",), NORM),
        "w_up": Param((d, f), ("embed", "mlp"), HIDDEN),
        "w_down": Param((f, d), ("mlp", "embed"), RESIDUAL_OUT),
    }
    if m.mlp == "swiglu":
        block["w_gate"] = Param((d, f), ("embed", "mlp"), HIDDEN)
    table = {"embed": Param((v, d), ("vocab", "embed"), EMBEDDING)}
    table |= {f"blocks.{name}": Param((m.n_layers, *p.shape), ("layers", *p.axes), p.role)
              for name, p in block.items()}
    table["final_norm"] = Param((d,), ("embed",), NORM)
    if not m.tie_embeddings:
        table["unembed"] = Param((d, v), ("embed", "vocab"), UNEMBEDDING)
    return table


def param_counts(m: ModelConfig) -> dict[str, int]:
    counts = {"embedding": 0, "non_embedding": 0}
    for p in parameters(m).values():
        part = "embedding" if p.role in (EMBEDDING, UNEMBEDDING) else "non_embedding"
        counts[part] += math.prod(p.shape)
    return {"total": counts["embedding"] + counts["non_embedding"], **counts}


def forward_flops_per_token(m: ModelConfig, seq_len: int) -> dict[str, int]:
    """Forward FLOPs per token by part, for sequences of `seq_len` tokens."""
    d, h, g, k, f, L = m.d_model, m.n_heads, m.n_kv_heads, m.head_dim, m.d_ff, m.n_layers
    return {
        "qkvo": L * 2 * (2 * d * h * k + 2 * d * g * k),
        "attention": L * 2 * 2 * seq_len * h * k,  # q.k scores and probs.v, full square
        "mlp": L * 2 * (3 if m.mlp == "swiglu" else 2) * d * f,
        "head": 2 * d * m.vocab_size,
    }


def train_flops_per_token(m: ModelConfig, seq_len: int) -> int:
    """Exact matmul FLOPs of one training token: forward + backward (2 x forward)."""
    return 3 * sum(forward_flops_per_token(m, seq_len).values())


def six_n(m: ModelConfig) -> dict[str, int]:
    """The 6·N conventions (Kaplan: non-embedding N; Chinchilla/Hoffmann: all N)."""
    counts = param_counts(m)
    return {"6N": 6 * counts["total"], "6N_non_embedding": 6 * counts["non_embedding"]}


# --------------------------------------------------------------------------- peaks and MFU

# Dense bf16 peak FLOP/s per chip, by jax `device_kind` prefix (vendor data sheets); the
# longest matching prefix wins. JAX calls a v5e "TPU v5 lite", a v5p "TPU v5", a v6e "TPU v6
# lite"; an SXM H100 "NVIDIA H100 80GB HBM3".
PEAKS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "NVIDIA H200": 989e12, "NVIDIA GH200": 989e12, "NVIDIA H100": 989e12,
    "NVIDIA H100 NVL": 835e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA A100": 312e12,
    "NVIDIA L4": 121e12, "NVIDIA A10": 125e12,
}


def step_flops(cfg: Config) -> int:
    """Model FLOPs of one training step (a global batch)."""
    return train_flops_per_token(cfg.model, cfg.seq_len) * cfg.tokens_per_step


def mfu(cfg: Config, seconds_per_step: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation: the step's model FLOPs per second over the devices' peak."""
    return step_flops(cfg) / seconds_per_step / peak_flops_per_s


def numpy_matmul_flops_per_s(n: int = 1024, repeats: int = 3) -> float:
    """Best measured FLOP/s of an n^3 fp32 matmul in numpy: a peak for estimates made without
    starting JAX (a sweep's plan)."""
    import numpy as np

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    a @ a
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def matmul_flops_per_s(n: int = 2048, repeats: int = 3) -> float:
    """Best measured FLOP/s of an n^3 fp32 matmul on the default device."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


_measured: dict[str, float] = {}


def data_sheet_entry(kind: str) -> str:
    """The PEAKS entry of a jax device kind: its longest matching prefix."""
    matches = [prefix for prefix in PEAKS if kind.startswith(prefix)]
    if not matches:
        raise KeyError(f"no peak FLOP/s known for device kind {kind!r}; set train.peak_flops")
    return max(matches, key=len)


def peak_name(devices) -> str:
    """Which peak `peak_flops_per_s` takes for `devices`: a PEAKS entry, or `measured cpu`."""
    return "measured cpu" if devices[0].platform == "cpu" else data_sheet_entry(
        devices[0].device_kind)


def peak_flops_per_s(devices) -> float:
    """Peak FLOP/s of `devices`: the data-sheet figure per accelerator; on CPU a measured
    fp32 matmul (once per process) times the processes that own `devices`."""
    kind = devices[0].device_kind
    if devices[0].platform == "cpu":
        if "cpu" not in _measured:
            _measured["cpu"] = matmul_flops_per_s()
        # The measurement covers this process's cores, which all its simulated devices share,
        # so it counts once per process, not per device. In a multi-process run each process
        # (a host) has its own cores: assume each measures about what this one does.
        return _measured["cpu"] * len({d.process_index for d in devices})
    return PEAKS[data_sheet_entry(kind)] * len(devices)


def memory_bytes(cfg: Config, platform: str) -> int:
    """Rough peak training memory on `platform`: fp32 parameters, gradients and two Adam
    moments, plus activations kept for the backward pass (about 34·d bytes per token and
    layer, Korthikanti et al. 2022, and the attention scores where the einsum path keeps them;
    flash attention may not) and the logits. A lower bound more than a forecast."""
    m = cfg.model
    tokens = cfg.train.batch_size // cfg.train.micro_batches * cfg.seq_len
    keeps_scores = attention_path(m.attention, platform) == "einsum"
    scores = 5 * m.n_heads * cfg.seq_len if keeps_scores else 0
    layer = tokens * (34 * m.d_model + scores)
    remat = {"none": 1.0, "dots": 0.5, "full": 0.1}[m.remat]
    logits = 4 * tokens * m.vocab_size * (1 if m.loss_chunk else 3)
    return int(16 * param_counts(m)["total"] + remat * m.n_layers * layer + logits)


def check_memory(cfg: Config, have: int, platform: str, who: str = "the run") -> None:
    """Refuse `cfg` where `memory_bytes` exceeds the `have` bytes of its devices together (0:
    unknown): a context or batch off by orders of magnitude, caught before anything is
    written."""
    need = memory_bytes(cfg, platform)
    if have and need > have:
        raise ConfigError(f"{who} needs at least {need / 2**30:,.1f} GiB, and its devices have "
                          f"{have / 2**30:,.1f} GiB; lower model.context or train.batch_size, "
                          "raise train.micro_batches or set model.remat")
