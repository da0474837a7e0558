"""The accelerator benchmark, run as the README's CPU check of it."""

import importlib.util
import json
from pathlib import Path

from lm import config

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.n_layers=1", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2",
        "model.d_ff=128", "model.context=64", "model.vocab_size=256", "train.batch_size=2"]


def load_gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "tools" / "gpu_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def gpu_bench(bench, monkeypatch, capsys) -> dict:
    """The tool's command line run in this process (no interpreter or JAX to start again): its
    last line, parsed."""
    monkeypatch.setattr("sys.argv", ["gpu_bench.py", *TINY, "--steps", "2"])
    capsys.readouterr()
    bench.main()
    return json.loads(capsys.readouterr().out.splitlines()[-1])


def assert_both_paths_train(result: dict) -> None:
    for path in ("einsum", "dot_product"):
        run = result[path]
        assert not run["cudnn_fmha"]  # cuDNN's kernel is for GPUs
        assert run["step_time_best_s"] <= run["step_time_s"]
        assert run["loss"] < run["first_loss"]  # two steps on one batch learn it
    assert abs(result["einsum"]["first_loss"] - result["dot_product"]["first_loss"]) < 1e-3


def test_gpu_bench_times_both_paths_and_measures_their_attention_against_fp32(monkeypatch,
                                                                              capsys):
    bench = load_gpu_bench()
    result = gpu_bench(bench, monkeypatch, capsys)
    assert result["device"] == "cpu" and result["peak"] == "measured cpu"
    assert_both_paths_train(result)
    for path, errors in result["attention_rel_error"].items():  # bf16: 8 bits of mantissa
        assert set(errors) == {"out", "dq", "dk", "dv"}, path
        assert 1e-4 < min(errors.values()) and max(errors.values()) < 0.02, path
    # fp32, through the tool's own functions (a second run of the tool took 12 s more): both
    # paths train alike, and their attention is rounding apart
    fp32 = {path: config.load("gpt2-small", TINY + bench.FIXED + ["model.dtype=float32",
                                                                   f"model.attention={path}"])
            for path in bench.PATHS}
    assert_both_paths_train({path: bench.time_path(cfg, 2) for path, cfg in fp32.items()})
    for path, errors in bench.attention_errors(fp32["einsum"]).items():
        assert set(errors) == {"out", "dq", "dk", "dv"} and max(errors.values()) < 1e-5, path
