import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm import cli, config, evaluate, rundir, state, train
from lm.errors import ConfigError

from conftest import small


def greedy_by_recomputing(lay, params, prompt, n):
    """Reference decoder: the full forward pass over the whole sequence at every step."""
    context = lay.cfg.model.context
    forward = jax.jit(lambda p, t: nnx.merge(lay.graphdef, p)(t))
    seq = list(prompt)
    for _ in range(n):
        padded = jnp.asarray(seq + [0] * (context - len(seq)))[None]  # causal: padding is unseen
        seq.append(int(jnp.argmax(forward(params, padded)[0, len(seq) - 1])))
    return seq


def test_kv_cache_greedy_equals_full_recompute_on_any_mesh():
    cfg = small("model.n_kv_heads=2", "model.n_heads=4")
    single = state.layout(cfg, jax.devices()[:1])
    params = train.compile_program(cfg, jax.devices()[:1]).init()["params"]
    prompt = [5, 17, 3, 99]
    expected = greedy_by_recomputing(single, params, prompt, 12)
    assert evaluate.generate(single, params, prompt, 12, temperature=0) == expected
    sharded = state.layout(config.replace(cfg, mesh={"data": 4, "model": 2}))
    on_mesh = jax.device_put(params, sharded.shardings["params"])
    assert evaluate.generate(sharded, on_mesh, prompt, 12, temperature=0) == expected
    # top-1 sampling is greedy; sampling is reproducible by seed
    assert evaluate.generate(single, params, prompt, 12, temperature=1.0, top_k=1) == expected
    a = evaluate.generate(single, params, prompt, 12, temperature=1.0, seed=3)
    assert a == evaluate.generate(single, params, prompt, 12, temperature=1.0, seed=3)
    assert a == evaluate.generate(single, params, prompt, 12, temperature=1.0, seed=3,
                                  top_k=cfg.vocab_size + 1)  # beyond the vocabulary: all of it
    with pytest.raises(ConfigError, match="model.context"):
        evaluate.generate(single, params, prompt, 40)


def test_eval_all_writes_one_row_per_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    train.train(small("train.steps=6", "checkpoint.every_steps=2", "checkpoint.keep=5",
                      f"train.run_dir={run}", "mesh.data=-1"))
    argv = ["eval", str(run), "--all", "--cpu-devices", "8", "mesh.data=2", "mesh.model=4"]
    assert cli.main(argv) == 0
    rows = rundir.read_rows(run / "eval.jsonl")
    assert [r["step"] for r in rows] == [2, 4, 6]
    for key in ("step", "tokens", "loss", "loss_sem", "ppl", "bpb", "eval_tokens"):
        assert key in rows[0]
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[0]["loss_sem"] > 0
    assert rows[0]["ppl"] == pytest.approx(np.exp(rows[0]["loss"]))
    printed = capsys.readouterr().out.splitlines()  # a row per checkpoint under a header
    assert [line.split()[0] for line in printed[1:]] == ["2", "4", "6"]
    assert cli.main(argv) == 0 and len(rundir.read_rows(run / "eval.jsonl")) == 3
    assert "evaluated already" in capsys.readouterr().out


def test_eval_rows_count_the_tokens_the_run_trained_on_whatever_the_overrides(tmp_path, capsys):
    """A mesh the training batch does not divide: the message points at eval.batch_size; a
    train.batch_size override to fit it would have written tokens the run never saw."""
    run = tmp_path / "run"
    train.train(small("train.steps=4", f"train.run_dir={run}", "mesh.data=-1"))
    with pytest.raises(ConfigError, match="set eval.batch_size to a multiple of 3"):
        evaluate.evaluate_run(run, ["mesh.data=3"], devices=jax.devices()[:3])
    for overrides in (["eval.batch_size=6", "mesh.data=3"], ["train.batch_size=6", "mesh.data=3"]):
        (row,) = evaluate.evaluate_run(run, overrides, devices=jax.devices()[:3])
        assert row["step"] == 4 and row["tokens"] == 4 * 8 * 32  # steps x batch x context
    # what it was trained as is not an override's: refused before any data is prepared
    with pytest.raises(ConfigError, match=r"trained with model.n_layers=2, data.vocab_size=128, "
                                          r".* drop the overrides \(model.n_layers=3, "
                                          r"data.vocab_size=100\)"):
        evaluate.evaluate_run(run, ["data.vocab_size=100", "model.n_layers=3"])
    for command in (["sample", str(run), "--prompt", "x"], ["export", str(run), "--out",
                                                            str(tmp_path / "hf")]):
        assert cli.main([*command, "model.rope_theta=500"]) == 2
        assert "drop the override (model.rope_theta=500.0)" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
    # a config today's lm refuses (an older lm took data.vocab_size 0 for the model's): the
    # override that mends it is not refused as a change of what was trained
    stored = run / "config.yaml"
    stored.write_text(stored.read_text().replace("vocab_size: null", "vocab_size: 0", 1))
    with pytest.raises(ConfigError, match="data.vocab_size=0 is not valid"):
        rundir.load_config(run)
    assert rundir.load_config(run, ["data.vocab_size=null"]).vocab_size == 128
    with pytest.raises(ConfigError, match=r"trained with model.rope_theta=10000"):  # still
        rundir.load_config(run, ["data.vocab_size=null", "model.rope_theta=500"])


def test_a_sample_fills_the_trained_length_by_default_and_never_the_context_beyond():
    cfg = small("model.context=32", "data.seq_len=16")
    assert evaluate.sample_length(cfg, [1, 2, 3], None) == 13  # to the trained 16 tokens
    assert evaluate.sample_length(cfg, [1] * 20, None) == 1  # past them: one, if asked nothing
    assert evaluate.sample_length(cfg, [1, 2, 3], 29) == 29  # the context's room, if asked
    for prompt, max_tokens, message in [([1, 2, 3], 30, "exceeds model.context=32"),
                                        ([1] * 32, None, "leaves no room"),
                                        ([], None, "the prompt is empty")]:
        with pytest.raises(ConfigError, match=message):
            evaluate.sample_length(cfg, prompt, max_tokens)
