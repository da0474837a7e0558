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
