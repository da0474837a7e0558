"""Parameter and FLOP accounting from a model config alone (nothing is allocated).

FLOPs count multiply-adds as 2 and follow the matmul shapes the model really runs:
projections, attention scores and values over the full T x T square (the causal mask halves
the useful work, not the computed work), MLP and output head; backward = 2 x forward.
"""

from __future__ import annotations

from lm.config import ModelConfig


def param_counts(m: ModelConfig) -> dict[str, int]:
    d, h, g, k, f = m.d_model, m.n_heads, m.n_kv_heads, m.head_dim, m.d_ff
    per_layer = (2 * d  # two norm scales
                 + d * h * k + 2 * d * g * k + h * k * d  # q, k, v, o
                 + (3 if m.mlp == "swiglu" else 2) * d * f)
    embedding = m.vocab_size * d * (1 if m.tie_embeddings else 2)
    non_embedding = m.n_layers * per_layer + d  # + final norm
    return {"total": embedding + non_embedding, "non_embedding": non_embedding,
            "embedding": embedding}


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

# Dense bf16 peak FLOP/s per chip, by jax `device_kind` prefix (vendor data sheets).
PEAKS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "NVIDIA H200": 989e12, "NVIDIA H100": 989e12, "NVIDIA A100": 312e12,
    "NVIDIA L4": 121e12, "NVIDIA A10": 125e12,
}


def matmul_flops_per_s(n: int = 2048, repeats: int = 3) -> float:
    """Best measured FLOP/s of an n^3 fp32 matmul on the default device."""
    import time

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
    for prefix, peak in PEAKS.items():
        if kind.startswith(prefix):
            return peak * len(devices)
    raise KeyError(f"no peak FLOP/s known for device kind {kind!r}; set train.peak_flops")
