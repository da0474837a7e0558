"""lm.flops against the parameter tree the model really builds, XLA's count of the compiled
train step, and the GPT-3 175B figure."""

import math
import types

import jax
import pytest

from conftest import small
from lm import config, flops, state, train

VARIANTS = {  # every way the parameter tree can change shape
    "swiglu-tied": [],
    "gelu-tied": ["model.mlp=gelu"],
    "swiglu-untied": ["model.tie_embeddings=false"],
    "gelu-untied-gqa": ["model.mlp=gelu", "model.tie_embeddings=false", "model.n_kv_heads=2"],
    "gqa-odd-sizes": ["model.n_kv_heads=1", "model.d_ff=72", "model.n_layers=3",
                      "model.vocab_size=100"],
    "gelu-qk-norm-mup": ["model.mlp=gelu", "model.qk_norm=true", "model.parametrization=mup",
                         "model.base_width=16"],
}


def real_counts(cfg):
    """Parameters of the abstract train state (shapes only, nothing allocated), split into the
    embedding tables (`embed`, and `unembed` when untied) and the rest."""
    params = state.layout(cfg, jax.devices()[:1]).abstract["params"]
    counts = {"embedding": 0, "non_embedding": 0}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        part = "embedding" if path[0].key in ("embed", "unembed") else "non_embedding"
        counts[part] += math.prod(leaf.shape)
    return counts | {"total": counts["embedding"] + counts["non_embedding"]}


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_param_counts_match_the_model(overrides):
    cfg = small(*overrides)
    counted = flops.param_counts(cfg.model)
    assert counted == real_counts(cfg)
    assert counted["non_embedding"] == counted["total"] - counted["embedding"]


def test_grouped_query_and_untied_heads_change_the_count():
    """The variants above are really different trees (a count ignoring them would fail)."""
    totals = {name: flops.param_counts(small(*o).model)["total"] for name, o in VARIANTS.items()}
    assert len(set(totals.values())) == len(totals), totals


# --------------------------------------------------------------------------- against XLA

# Matmuls dominate: d_model 128, vocab 512, T=64. XLA also counts elementwise work (norms,
# softmax, AdamW), which lm.flops leaves out: XLA measured 1.017x and 1.026x (jax 0.10.2).
XLA_BASE = ["model.vocab_size=512", "model.d_model=128", "model.n_heads=4", "model.context=64",
            "train.batch_size=8"]


def xla_flops(cfg) -> float:
    """FLOPs of one compiled train step by XLA's cost analysis (a dict in jax 0.10.2; older
    versions returned a list of one dict per computation)."""
    analysis = train.compile_program(cfg, jax.devices()[:1]).step.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0]
    return analysis["flops"]


def counted_flops(cfg) -> float:
    return flops.step_flops(cfg)


@pytest.mark.parametrize("overrides", [
    ["model.n_layers=2"],
    ["model.n_layers=2", "model.mlp=gelu", "model.n_kv_heads=2", "model.tie_embeddings=false"],
    # norms, multipliers and the z-loss add no matmul
    ["model.n_layers=2", "model.qk_norm=true", "model.parametrization=mup",
     "model.base_width=32", "optim.z_loss=1e-4"],
], ids=["swiglu-tied", "gelu-gqa-untied", "mup-qk-norm-z-loss"])
def test_train_flops_agree_with_xla_on_unrolled_layers(overrides):
    cfg = small(*XLA_BASE, *overrides, "model.scan_layers=false")
    ratio = xla_flops(cfg) / counted_flops(cfg)
    assert 0.9 <= ratio <= 1.1, f"XLA counts {ratio:.4f} x lm.flops' train FLOPs"


def test_xla_counts_a_scanned_layer_stack_once():
    """XLA's HloCostAnalysis counts a while loop's body once, whatever its trip count, so with
    `model.scan_layers=true` the compiled step reports the embedding, head and *one* layer: the
    count of the same model with n_layers=1 (measured with jax 0.10.2: 1.04x of it at 4 layers,
    the extra 4% being elementwise work lm.flops leaves out, e.g. AdamW on all 4 layers). MFU
    therefore uses lm.flops, never cost_analysis; the same holds for micro-batches, which
    accumulate inside a scan."""
    cfg = small(*XLA_BASE, "model.n_layers=4", "model.scan_layers=true")
    one_layer = config.replace(cfg, model={"n_layers": 1})
    measured = xla_flops(cfg)
    ratio = measured / counted_flops(one_layer)
    assert 0.9 <= ratio <= 1.1, f"XLA counts {ratio:.4f} x the FLOPs of a 1-layer model"
    assert measured < 0.5 * counted_flops(cfg)


# --------------------------------------------------------------------------- GPT-3 175B


def test_gpt3_175b_training_flops():
    """Brown et al. 2020, table D.1: 3.14e23 FLOPs for 300B tokens. From the config alone."""
    cfg = config.load("gpt3-175b")
    tokens = 300e9
    counts = flops.param_counts(cfg.model)
    assert counts["total"] == pytest.approx(175e9, rel=0.01)
    six_n = flops.six_n(cfg.model)["6N"] * tokens
    assert six_n == pytest.approx(3.1e23, rel=0.02)
    exact = flops.train_flops_per_token(cfg.model, cfg.seq_len) * tokens
    assert 1.0 <= exact / six_n <= 1.1, f"exact {exact:.3g} vs 6N {six_n:.3g}"  # ~3.23e23
    assert flops.six_n(cfg.model)["6N_non_embedding"] < flops.six_n(cfg.model)["6N"]


# --------------------------------------------------------------------------- peaks


def fake_devices(platform: str, kind: str, processes: int, per_process: int = 4):
    return [types.SimpleNamespace(platform=platform, device_kind=kind, process_index=p, id=i)
            for p in range(processes) for i in range(per_process)]


def test_cpu_peak_is_measured_per_process(monkeypatch):
    """Simulated CPU devices of one process share its cores: one measured peak per process,
    however many devices; several processes (one per host) add theirs up."""
    monkeypatch.setitem(flops._measured, "cpu", 1e11)  # as if measured once already
    assert flops.peak_flops_per_s(fake_devices("cpu", "cpu", 1)) == 1e11
    assert flops.peak_flops_per_s(fake_devices("cpu", "cpu", 2)) == 2e11
    assert flops.peak_flops_per_s(fake_devices("cpu", "cpu", 2)[:4]) == 1e11  # one process's


def test_accelerator_peak_comes_from_the_table():
    assert flops.peak_flops_per_s(fake_devices("gpu", "NVIDIA H100 80GB HBM3", 2)) == 8 * 989e12
    with pytest.raises(KeyError, match="train.peak_flops"):
        flops.peak_flops_per_s(fake_devices("gpu", "Mystery GPU", 1))


@pytest.mark.parametrize("platform, kind, entry, peak", [  # device_kind as JAX reports it
    ("gpu", "NVIDIA H200", "NVIDIA H200", 989e12),
    ("gpu", "NVIDIA H100 80GB HBM3", "NVIDIA H100", 989e12),
    ("gpu", "NVIDIA H100 PCIe", "NVIDIA H100 PCIe", 756e12),
    ("gpu", "NVIDIA A100-SXM4-80GB", "NVIDIA A100", 312e12),
    ("tpu", "TPU v4", "TPU v4", 275e12),
    ("tpu", "TPU v5 lite", "TPU v5 lite", 197e12),  # v5e
    ("tpu", "TPU v5", "TPU v5", 459e12),  # v5p
    ("tpu", "TPU v6 lite", "TPU v6 lite", 918e12),  # v6e
    ("cpu", "cpu", "measured cpu", 1e11),
])
def test_each_chip_has_its_peak_and_says_which(monkeypatch, platform, kind, entry, peak):
    monkeypatch.setitem(flops._measured, "cpu", 1e11)
    devices = fake_devices(platform, kind, 1, per_process=1)
    assert flops.peak_name(devices) == entry
    assert flops.peak_flops_per_s(devices) == peak
