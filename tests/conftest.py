"""Every test sees 8 simulated CPU devices: simulate_cpu_devices(8) puts
--xla_force_host_platform_device_count=8 into XLA_FLAGS (and sizes the thread pools) before
jax is imported.

The environment set here reaches the `lm` subprocesses that tests start, too."""

import os
import tempfile

from lm.devices import simulate_cpu_devices  # imports no JAX

simulate_cpu_devices(8)
# Tests run tiny models, so compiling dominates: halve it by not optimising the code.
os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
# Identical programs (same shapes, any seed) compile once per session, across processes.
os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lm-test-xla-")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import pytest  # noqa: E402

from lm import config  # noqa: E402


def small(*overrides: str) -> config.Config:
    """A tiny model on the synthetic source, quick to compile, with any overrides applied."""
    base = ["model.vocab_size=128", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
            "model.context=32", "train.batch_size=8", "train.steps=4", "optim.warmup_steps=1",
            "train.progress=false", "train.log_every=1", "mesh.data=1", "mesh.model=1",
            "data.source=synthetic"]
    return config.load(None, base + list(overrides))


@pytest.fixture
def run_dir(tmp_path):
    return str(tmp_path / "run")


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture(scope="session")
def prepared(cache):
    """A small model's config on a 300 kB prefix of the default corpus, and its dataset."""
    from corpora import real
    from lm import corpus

    cfg = real(cache)
    return cfg, corpus.prepare(cfg)
