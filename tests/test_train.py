import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm import cli, data, state, train
from lm.errors import TrainingError
from lm.model import Transformer

from conftest import small


def one_step(cfg, devices):
    program = train.compile_program(cfg, devices)
    state = program.init()
    tokens = data.global_batch(data.source(cfg), 0, program.layout.batch_sharding,
                               program.layout.batch_shape)
    state, metrics = program.step(state, tokens, np.float32(cfg.optim.lr))
    return jax.device_get(state["params"]), jax.device_get(metrics)


def test_gradient_accumulation_equals_the_full_batch():
    cfg = small()
    params = train.compile_program(cfg, jax.devices()[:1]).init()["params"]
    tokens = data.source(cfg).rows(0, 0, 8)
    grad_fn = jax.value_and_grad(lambda p, t: nnx.merge(graphdef, p).loss(t[:, :-1], t[:, 1:]))
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0))))
    full_loss, full_grads = jax.jit(grad_fn)(params, tokens)
    acc_loss, acc_grads = jax.jit(lambda p, t: train.accumulate(grad_fn, p, t, 4))(params, tokens)
    np.testing.assert_allclose(acc_loss, full_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(acc_grads), jax.tree.leaves(full_grads)):
        np.testing.assert_allclose(a, b, atol=1e-7, rtol=1e-5)


def test_accumulating_step_on_a_mesh_matches():
    full_params, full = one_step(small("mesh.data=4", "mesh.model=2"), jax.devices())
    acc_params, acc = one_step(small("mesh.data=4", "mesh.model=2", "train.micro_batches=2"),
                               jax.devices())
    np.testing.assert_allclose(acc["loss"], full["loss"], rtol=1e-6)
    np.testing.assert_allclose(acc["grad_norm"], full["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(acc_params), jax.tree.leaves(full_params)):
        np.testing.assert_allclose(a, b, atol=1e-5)  # Adam's first step is ~lr * sign(g)


def test_loss_falls_and_metrics_are_logged(run_dir):
    cfg = small("train.steps=40", "train.log_every=5", "optim.lr=2e-2", "optim.warmup_steps=5",
                f"train.run_dir={run_dir}", "mesh.data=-1")
    last = train.train(cfg)
    rows = [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(5, 41, 5))
    for key in ("step", "tokens", "loss", "lr", "grad_norm", "step_time_s", "tokens_per_s"):
        assert key in rows[0]
    assert rows[-1]["tokens"] == 40 * cfg.train.batch_size * cfg.seq_len
    assert last == rows[-1]
    assert rows[-1]["loss"] < 0.6 * np.log(cfg.vocab_size)  # from log(V) towards log(4)
    assert (Path(run_dir) / "config.yaml").is_file()


def test_non_finite_loss_stops_the_run(run_dir):
    cfg = small("model.init_std=1e20", f"train.run_dir={run_dir}", "mesh.data=-1")
    with pytest.raises(TrainingError, match=r"non-finite at step \d+; lower optim.lr"):
        train.train(cfg)


def test_weight_decay_skips_norms():
    cfg = small("optim.weight_decay=0.5", "optim.lr=0.1", "optim.warmup_steps=0",
                "optim.clip_norm=0")
    program = train.compile_program(cfg, jax.devices()[:1])
    params = program.init()["params"]
    tx = state.optimizer(cfg)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    assert np.all(np.asarray(updates["final_norm"][...]) == 0)
    assert np.all(np.asarray(updates["blocks"]["attn_norm"][...]) == 0)
    assert np.any(np.asarray(updates["blocks"]["wq"][...]) != 0)
    assert np.any(np.asarray(updates["embed"][...]) != 0)


def test_cli_train_on_simulated_mesh(tmp_path, capsys):
    argv = ["train", "tiny", "--cpu-devices", "8", "train.steps=4", "train.log_every=2",
            f"train.run_dir={tmp_path}/run", "data.source=synthetic"]
    assert cli.main(argv) == 0
    rows = [json.loads(line) for line in open(tmp_path / "run/metrics.jsonl")]
    assert [r["step"] for r in rows] == [2, 4]
    assert f"done: step 4, loss {rows[-1]['loss']:.4f}" in capsys.readouterr().out
