"""Every test sees 8 simulated CPU devices: simulate_cpu_devices(8) puts
--xla_force_host_platform_device_count=8 into XLA_FLAGS (and sizes the thread pools) before
jax is imported.

The environment set here reaches the `lm` subprocesses that tests start, too."""

import atexit
import os
import shutil
import tempfile

from lm.devices import simulate_cpu_devices  # imports no JAX

simulate_cpu_devices(8)
# Tests run tiny models, so compiling dominates: halve it by not optimising the code, and
# nearly halve it again without XLA's newer CPU fusion emitters (a mesh test's programs: 9 s
# against 16 s).
os.environ["XLA_FLAGS"] += (" --xla_backend_optimization_level=0"
                            " --xla_cpu_use_fusion_emitters=false")
# Identical programs (same shapes, any seed) compile once per session, across processes.
os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lm-test-xla-")
atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
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


def lm_here(capsys, *argv: str) -> tuple[int, str, str]:
    """`lm ...` run in this process (its 8 devices; no interpreter to start), where it starts no
    process of its own (a worker forked from a process running JAX could deadlock): its exit
    code, stdout and stderr."""
    from lm import cli

    capsys.readouterr()
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


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


def _postgres_bin(name: str) -> str:
    """A PostgreSQL server program: on PATH, or in Debian's /usr/lib/postgresql/*/bin."""
    import glob

    found = shutil.which(name) or next(iter(sorted(glob.glob(
        f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:  # .ci/run installs the server: its absence is a failure, not a skip
        pytest.fail(f"PostgreSQL's {name} is not installed (apt-get install postgresql)")
    return found


class PostgresServer:
    """A PostgreSQL server of this test session's own, on a Unix socket in a fresh directory
    under /tmp. As root it runs as `nobody` (initdb refuses root)."""

    def __init__(self):
        self.root = tempfile.mkdtemp(prefix="lm-pg-", dir="/tmp")
        os.chmod(self.root, 0o777)
        self.data = os.path.join(self.root, "data")
        self.url = f"postgresql://lm@/postgres?host={self.root}"
        self._run(_postgres_bin("initdb"), "-D", self.data, "-A", "trust", "-U", "lm",
                  "--no-sync")
        self.start()

    def _run(self, *cmd):
        import subprocess

        as_owner = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
        subprocess.run(as_owner + list(cmd), check=True, capture_output=True, timeout=120)

    def start(self):
        self._run(_postgres_bin("pg_ctl"), "-D", self.data, "-w", "-l",
                  os.path.join(self.root, "log"), "-o",
                  f"-k {self.root} -c listen_addresses='' -c fsync=off", "start")

    def stop(self, mode: str = "fast"):
        self._run(_postgres_bin("pg_ctl"), "-D", self.data, "-m", mode, "stop")


@pytest.fixture(scope="session")
def postgres_server():
    """The session's PostgreSQL server, stopped at the end."""
    server = PostgresServer()
    try:
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres(postgres_server):
    """The URL of the session's PostgreSQL server."""
    return postgres_server.url
