import functools
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm import (checkpoint, cli, config, data, evaluate, flops, rundir, runner, schedule,
                spec, state, train)
from lm.errors import Busy, CheckpointError, ConfigError, DataError, TrainingError
from lm.model import Transformer

from conftest import small
from test_trackers import read_scalars


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


def test_accumulation_averages_metrics_but_takes_the_largest_of_maxima():
    def grad_fn(params, tokens_bt):
        mean = tokens_bt.astype(jnp.float32).mean()
        return (mean, {"loss": mean, "max_token": tokens_bt.max().astype(jnp.float32)}), params

    tokens = jnp.arange(24).reshape(8, 3)
    (objective, metrics), grads = train.accumulate(grad_fn, {"w": jnp.ones(2)}, tokens, 4)
    assert objective == metrics["loss"] == pytest.approx(11.5) and metrics["max_token"] == 23
    np.testing.assert_array_equal(grads["w"], np.ones(2))


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


def test_a_run_far_beyond_the_devices_memory_is_refused_before_its_directory(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"the run needs at least [\d,.]+ GiB, and its devices "
                                          r"have [\d,.]+ GiB; lower model.context"):
        train.train(small("model.context=100000", "mesh.data=-1", f"train.run_dir={run}"))
    assert not run.exists()


def test_a_sessions_fresh_state_is_compiled_once_in_its_compile_phase():
    """A sweep worker's report splits its time by phase: its first fresh state of a shape
    compiles the init, which is compiling, not restoring (the phase around it); the next seed
    reuses it."""
    session = train.Session(jax.devices()[:1])
    program = session.program(small())
    before = session.seconds["compile"]
    with session.timed("restore"):
        program.init(0)
    compiled = session.seconds["compile"]
    assert compiled > before
    with session.timed("restore"):
        program.init(1)
    assert session.seconds["compile"] == compiled


def test_the_fresh_state_is_the_fully_optimised_init_programs_bit_for_bit():
    """The init compiles with less of LLVM's optimisation on CPU, which must change no bit.
    (The tests' own XLA_FLAGS optimise nothing, which does change the last bit.)"""
    program = train.compile_program(small("model.n_kv_heads=2"), jax.devices()[:1])
    lay = program.layout
    full = jax.jit(state.init_fn(lay.cfg, lay.tx), out_shardings=lay.shardings).lower(
        state.SEED).compile(compiler_options={"xla_backend_optimization_level": 3})
    for seed in (0, 7):
        ours, theirs = jax.device_get((program.init(seed), full(np.uint32(seed))))
        assert jax.tree.structure(ours) == jax.tree.structure(theirs)
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
            np.testing.assert_array_equal(a, b)


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


# --------------------------------------------------------------------------- muP, QK-norm, z-loss

OPTIONS = ("model.parametrization=mup", "model.base_width=32", "model.qk_norm=true",
           "optim.z_loss=1e-3", "train.log_stability=true")


def test_mup_learning_rates_and_weight_decay_follow_the_roles():
    """At 4x the base width Adam's first direction (the gradient's sign) is 1/4 for hidden
    and residual-output matrices, 1 for the embedding and the norm scales; the decoupled
    weight decay is scaled alike (and still skips the norm scales)."""
    cfg = small("model.d_model=128", *OPTIONS[:2], "optim.clip_norm=0", "optim.weight_decay=0.5")
    tx = state.optimizer(cfg)

    def directions(seed):
        params = state.init_fn(cfg, tx)(seed)["params"]
        opt = tx.init(params)
        return (params, tx.update(jax.tree.map(jnp.zeros_like, params), opt, params)[0],
                tx.update(jax.tree.map(jnp.ones_like, params), opt, params)[0])

    params, decay, both = jax.jit(directions)(np.uint32(0))
    expected = {"blocks.wq": 0.25, "blocks.w_down": 0.25, "blocks.wo": 0.25, "embed": 1.0,
                "final_norm": 1.0, "blocks.attn_norm": 1.0}
    for name, multiplier in expected.items():
        p, d, b = (np.asarray(functools.reduce(lambda t, k: t[k], name.split("."), tree)[...])
                   for tree in (params, decay, both))
        decays = not name.endswith("norm")
        np.testing.assert_allclose(d, 0.5 * p * multiplier * decays, rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(b - d, multiplier, rtol=1e-5, err_msg=name)


def coordinates(cfg, steps=3, lr=1e-2):
    """After `steps` steps of the real train step at `lr` from a fresh state, on a new batch:
    the RMS of the residual stream (the blocks' output) and of the output logits, and the
    largest |attention logit|. One compiled program: init, steps, measurement."""
    lay = state.layout(cfg, jax.devices()[:1])
    step = train.make_step(lay)
    src, b = data.source(cfg), cfg.train.batch_size
    tokens = jnp.stack([src.rows(i * b, 0, b) for i in range(steps + 1)])

    def run(tokens):
        fresh = state.init_fn(cfg, lay.tx)(jnp.uint32(0))
        trained, _ = jax.lax.scan(lambda s, t: step(s, t, jnp.float32(lr)), fresh, tokens[:-1])
        model = nnx.merge(lay.graphdef, trained["params"])
        x_btd, _ = model.blocks(model.embed[...][tokens[-1, :, :-1]], cfg.model)
        _, stats = model.objective(tokens[-1, :, :-1], tokens[-1, :, 1:], stats=True)
        return {"residual": jnp.sqrt(jnp.mean(x_btd * x_btd)),
                "logits": jnp.sqrt(stats["output_logit_ms"]),
                "attention": stats["max_attention_logit"]}

    return {k: float(v) for k, v in jax.jit(run)(tokens).items()}


def test_coordinate_check_mup_is_flat_in_width_and_sp_is_not():
    """Yang et al.'s coordinate check, 3 Adam steps at lr 1e-2, widths 64 to 1024 (4 heads:
    head_dim 16 to 256, d_ff = d_model), base width 64. Under muP the residual stream's and
    the logits' RMS stay within 1.5x of each other at every width (measured: 1.11x for both)
    and the attention logits below 1 (0.21 at 64 falling to 0.04 at 1024: at initialisation
    they shrink as 1/sqrt(head_dim), what training adds is O(1)). Under SP at 1024 — at the
    base width SP is muP but for the attention scale (measured there: the same RMS to 3%) — the
    residual stream is > 20x muP's (measured 168x), the logits > 3x (7.3x), and the largest
    attention logit passes 50 (205)."""
    def at(width, parametrization):
        return coordinates(small(
            f"model.d_model={width}", f"model.d_ff={width}", "model.n_heads=4", "model.n_layers=1",
            "model.mlp=gelu", "model.vocab_size=64", "model.context=8", "train.batch_size=2",
            f"model.parametrization={parametrization}", "model.base_width=64"))

    mup = [at(width, "mup") for width in (64, 256, 1024)]
    for key in ("residual", "logits"):
        values = [c[key] for c in mup]
        assert max(values) < 1.5 * min(values), (key, values)
    assert max(c["attention"] for c in mup) < 1
    sp = at(1024, "sp")
    assert sp["residual"] > 20 * mup[0]["residual"] and sp["logits"] > 3 * mup[0]["logits"]
    assert sp["attention"] > 50


def test_mup_qk_norm_and_z_loss_log_resume_and_sample(tmp_path):
    """Under every new option a run logs the stability metrics, resumes from a checkpoint
    (muP's optimiser state included) to the same losses as a run that went straight on, and
    samples from its checkpoint with the KV cache as a full recompute does."""
    from test_evaluate import greedy_by_recomputing

    def cfg(run):
        return small(*OPTIONS, "checkpoint.every_steps=2", f"train.run_dir={tmp_path / run}")

    session = train.Session(jax.devices()[:1])
    train.train(cfg("whole"), session=session)
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed/checkpoints/4")
    train.train(cfg("resumed"), session=session)  # from step 2
    whole, resumed = (rundir.metrics(tmp_path / run) for run in ("whole", "resumed"))
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for key in ("loss", "max_attention_logit", "output_logit_rms"):
        assert [r[key] for r in resumed] == [r[key] for r in whole], key
    # QK-norm under muP: |q.k| / head_dim is at most the product of the norm scales (from 1)
    assert 0 < whole[-1]["max_attention_logit"] < 1.1 and whole[-1]["output_logit_rms"] > 0
    lay = state.layout(cfg("whole"), jax.devices()[:1])
    restored, _ = checkpoint.restore_latest(checkpoint.manager(tmp_path / "whole", read_only=True),
                                            lay.abstract, lay.shardings, ("params",))
    params = restored["params"]
    prompt = [5, 17, 3, 99]
    assert (evaluate.generate(lay, params, prompt, 8, temperature=0)
            == greedy_by_recomputing(lay, params, prompt, 8))


def test_cli_train_on_simulated_mesh(tmp_path, capsys):
    argv = ["train", "tiny", "--cpu-devices", "8", "train.steps=4", "train.log_every=2",
            f"train.run_dir={tmp_path}/run", "data.source=synthetic"]
    assert cli.main(argv) == 0
    rows = [json.loads(line) for line in open(tmp_path / "run/metrics.jsonl")]
    assert [r["step"] for r in rows] == [2, 4]
    assert f"done: step 4, loss {rows[-1]['loss']:.4f}" in capsys.readouterr().out


def test_bf16_compute_learns_with_fp32_parameters_and_optimiser_state():
    cfg = small("model.dtype=bfloat16", "optim.lr=2e-2", "optim.warmup_steps=5",
                "train.steps=40")
    program = train.compile_program(cfg, jax.devices()[:1])
    lay, run, src = program.layout, program.init(), data.source(cfg)
    losses = []
    for step in range(cfg.train.steps):
        tokens = data.global_batch(src, step, lay.batch_sharding, lay.batch_shape)
        lr = np.float32(schedule.learning_rate(cfg.optim, cfg.train.steps, step))
        run, metrics = program.step(run, tokens, lr)
        losses.append(metrics["loss"])
    floats = [x for x in jax.tree.leaves((run["params"], run["opt"]))
              if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats)
    assert losses[-1].dtype == jnp.float32
    assert float(losses[-1]) < 0.6 * np.log(cfg.vocab_size)  # from log(V) towards log(4)


def test_a_run_reports_to_tensorboard_traces_its_steps_and_names_its_peak(run_dir):
    cfg = small(f"train.run_dir={run_dir}", "train.trackers=[jsonl, tensorboard]",
                "eval.every_steps=4", "checkpoint.every_steps=2", "train.profile.start_step=1",
                "train.profile.steps=2", "mesh.data=-1")
    train.train(cfg)  # evaluates step 4
    evaluate.evaluate_run(run_dir, step=2)  # `lm eval` reports to the run's trackers too
    metrics, evals = rundir.metrics(run_dir), rundir.evals(run_dir)
    board = read_scalars(Path(run_dir))
    for key in ("loss", "mfu", "peak_flops_per_s"):
        assert board[f"train/{key}"] == {r["step"]: pytest.approx(r[key]) for r in metrics}
    assert board["eval/val/loss"] == {r["step"]: pytest.approx(r["loss"]) for r in evals}
    assert set(board["eval/val/loss"]) == {2, 4}
    assert {r["peak"] for r in metrics} == {"measured cpu"}
    (trace,) = Path(run_dir).glob("plugins/profile/*/*.xplane.pb")  # TensorBoard's layout
    assert trace.stat().st_size > 0


def test_a_cooldown_branch_trains_exactly_as_a_run_of_its_length(tmp_path):
    """A stable run to step 18 and a branch from there decaying to step 24 give, bit for bit,
    the losses and parameters of a 24-step wsd run trained from scratch; so do branches from
    steps the stable run did not save."""
    common = ["train.log_every=1", "optim.warmup_steps=4", "optim.lr=1e-2", "mesh.data=-1",
              "optim.decay_fraction=0.25", "train.peak_flops=1e12"]
    scratch = small(*common, "train.steps=24", "optim.schedule=wsd",
                    f"train.run_dir={tmp_path}/scratch")
    stable = small(*common, "train.steps=30", "optim.schedule=constant",
                   "checkpoint.steps=[18, 30]", f"train.run_dir={tmp_path}/stable")
    branch = small(*common, "train.steps=24", "optim.schedule=wsd",
                   f"train.branch_from={tmp_path}/stable", "train.branch_step=18",
                   f"train.run_dir={tmp_path}/branch")
    session = train.Session()  # one compiled program for the three runs
    for cfg in (scratch, stable, branch):
        train.train(cfg, session=session)

    def curve(cfg, steps):
        return [(r["step"], r["loss"], r["grad_norm"], r["lr"])
                for r in rundir.metrics(cfg.train.run_dir) if r["step"] in steps]

    assert curve(stable, range(19)) + curve(branch, range(19, 25)) == curve(scratch, range(25))
    assert [r["step"] for r in rundir.metrics(branch.train.run_dir)] == list(range(19, 25))

    def final(cfg, step):
        lay = state.layout(cfg)
        mngr = checkpoint.manager(cfg.train.run_dir, read_only=True)
        return jax.tree.leaves(jax.device_get(checkpoint.restore(
            mngr, step, lay.abstract, lay.shardings, ("params",))[0]))

    for a, b in zip(final(branch, 24), final(scratch, 24)):
        np.testing.assert_array_equal(a, b)
    planned = spec.Trial("branch", "fit", branch)
    assert runner._spent_flops(planned) == planned.facts()["spent_flops"]  # its decay alone
    assert sorted(checkpoint.manager(stable.train.run_dir, read_only=True).all_steps()) == [18, 30]
    # refused before anything compiles or is written: a parent that is no run, or still in use
    for parent, error in ((tmp_path / "nowhere", ConfigError), (tmp_path / "stable", Busy)):
        later = config.replace(branch, train={"branch_from": str(parent),
                                              "run_dir": str(tmp_path / "later")})
        with rundir.locked(tmp_path / "stable"):
            with pytest.raises(error, match=f"train.branch_from={parent}"):
                train.train(later, session=session)
        assert not (tmp_path / "later").exists()
    # ... and before anything compiles: a parent of another model (before the run's directory
    # is made), data that is not there (a lock file made, no run file)
    fresh = train.Session()
    wider = config.replace(branch, model={"d_model": 48},
                           train={"run_dir": str(tmp_path / "later")})
    with pytest.raises(CheckpointError, match="trained another model"):
        train.train(wider, session=fresh)
    assert not (tmp_path / "later").exists()
    nodata = config.replace(scratch, data={"source": str(tmp_path / "*.nothing")},
                            model={"vocab_size": 512}, train={"run_dir": str(tmp_path / "later")})
    with pytest.raises(DataError, match="matches no file"):
        train.train(nodata, session=fresh)
    assert [p.name for p in (tmp_path / "later").iterdir()] == [rundir.LOCK]
    assert not fresh.compiled(wider) and not fresh.compiled(nodata)
    assert fresh.seconds["compile"] == 0

    # Budgets added after the stable run ended: it saved no checkpoint at their branch steps.
    # One branches from its latest checkpoint before (18) and trains the stable steps up to 21
    # itself, one with none before starts afresh; each ends as its run from scratch does.
    for steps, branch_step, first in ((28, 21, 19), (16, 12, 1)):
        late, alone = (small(*common, f"train.steps={steps}", "optim.schedule=wsd", *more,
                             f"train.run_dir={tmp_path}/{name}{steps}")
                       for name, more in (("branch", [f"train.branch_from={tmp_path}/stable",
                                                      f"train.branch_step={branch_step}"]),
                                          ("scratch", [])))
        for cfg in (late, alone):
            train.train(cfg, session=session)
        assert curve(late, range(steps + 1)) == curve(alone, range(first, steps + 1))
        for a, b in zip(final(late, steps), final(alone, steps)):
            np.testing.assert_array_equal(a, b)
        # what a sweep records it spent: the steps it trained, not only its decay
        spent = runner._spent_flops(spec.Trial("late", "fit", late))
        assert spent == (late.tokens_per_step * (steps + 1 - first)
                         * flops.train_flops_per_token(late.model, late.seq_len))
