"""Every test sees 8 simulated CPU devices: XLA_FLAGS must be set before jax is imported."""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split()
     if not f.startswith("--xla_force_host_platform_device_count")]
    + ["--xla_force_host_platform_device_count=8"])
os.environ["JAX_PLATFORMS"] = "cpu"

import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

from lm import config  # noqa: E402

# Identical programs (same shapes, any seed) compile once per session.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="lm-test-xla-"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def small(*overrides: str) -> config.Config:
    """A tiny model, quick to compile, with any overrides applied."""
    base = ["model.vocab_size=128", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
            "model.context=32", "train.batch_size=8", "train.steps=4", "optim.warmup_steps=1",
            "train.progress=false", "train.log_every=1", "mesh.data=1", "mesh.model=1"]
    return config.load(None, base + list(overrides))


@pytest.fixture
def run_dir(tmp_path):
    return str(tmp_path / "run")
