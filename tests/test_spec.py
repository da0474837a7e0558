import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from lm import spec as spec_lib
from lm.errors import ConfigError

from sweeps import BASE, SIZES, spec_file


def test_plan_applies_the_recipe(tmp_path):
    own_init = {**SIZES[1], "model.init_std": 0.3}
    spec = spec_lib.load_spec(spec_file(tmp_path, tokens=[16384, 32768, 49152],
                                     sizes=[SIZES[0], own_init, SIZES[2]],
                                     recipe={"lr": 1e-2, "lr_ref_width": 32, "lr_power": 1.0,
                                             "init_fan_in": 0.4, "warmup_tokens_per_param": 0.1}))
    trials = spec_lib.plan(spec)
    assert len(trials) == 10 and [t.role for t in trials].count("holdout") == 1
    by_width = {(t.cfg.model.d_model, t.cfg.train.steps): t for t in trials}
    assert by_width[16, 64].cfg.optim.lr == pytest.approx(2e-2)  # 1e-2 * 32/16
    assert by_width[48, 128].cfg.optim.lr == pytest.approx(1e-2 * 32 / 48)
    assert {w: by_width[w, 128].cfg.model.init_std for w in (16, 32, 48, 64)} == pytest.approx(
        {16: 0.1, 32: 0.3, 48: 0.4 / 48 ** 0.5, 64: 0.05})  # fan-in, or a size's own
    warm = [by_width[w, 128].cfg.optim.warmup_steps for w in (16, 32, 48)]
    assert warm == sorted(warm) and warm[0] < warm[-1]  # warmup grows with model size
    assert {t.cfg.optim.warmup_steps for t in trials if t.cfg.model.d_model == 48} == {warm[-1]}
    facts = trials[0].facts()
    assert facts["tokens"] == trials[0].cfg.train.steps * 8 * 32
    assert facts["flops"] > facts["flops_6nd"] * 0.9 and facts["params_non_embedding"] > 0


def test_a_fan_in_init_is_positive_and_not_stacked_on_mup(tmp_path):
    with pytest.raises(ConfigError, match="init_fan_in=-0.5"):
        spec_lib.load_spec(spec_file(tmp_path, recipe={"lr": 1e-2, "init_fan_in": -0.5}))
    mup = spec_file(tmp_path, recipe={"lr": 1e-2, "init_fan_in": 0.5},
                    overrides={**BASE, "model.parametrization": "mup", "model.base_width": 16})
    with pytest.raises(ConfigError, match="mup already does"):
        spec_lib.plan(spec_lib.load_spec(mup))


def test_held_out_runs_may_be_several_and_a_small_size_trained_longer(tmp_path):
    large = {"size": {**SIZES[2], "model.d_model": 64}, "tokens": 32768}
    trials = spec_lib.plan(spec_lib.load_spec(spec_file(
        tmp_path, holdout=[{"size": SIZES[0], "tokens": 400_000}, large])))
    small, held = [t for t in trials if t.role == "holdout"]
    assert small.cfg.model.d_model == 16 and small.facts()["tokens"] == pytest.approx(4e5, rel=0.01)
    assert held.cfg.model.d_model == 64 and held.facts()["tokens"] == 32768
    assert min(small.facts()["flops"], held.facts()["flops"]) > max(
        t.facts()["flops"] for t in trials if t.role == "fit")
    seeded = spec_lib.plan(spec_lib.load_spec(spec_file(
        tmp_path, seed=3, holdout={"size": {**large["size"], "seeds": 2}, "tokens": 32768})))
    assert [t.cfg.train.seed for t in seeded if t.role == "holdout"] == [3, 4]  # from spec.seed


@pytest.mark.parametrize("params", ["total", "non_embedding", "flops"])
def test_budgets_in_proportion_to_each_size(tmp_path, params):
    spec = spec_lib.load_spec(spec_file(
        tmp_path, tokens=[], tokens_per_param=[2, 3, 6], holdout={},
        fit={"params": params, "min_tokens_per_param": 3}))
    ratios = {}
    for t in spec_lib.plan(spec):
        if t.role == "fit":
            n = spec_lib.fit_params(spec, t.cfg)
            ratios.setdefault(n, []).append(t.facts()["tokens"] / n)
    assert len(ratios) == 3
    for n, r in ratios.items():  # r * N tokens rounded up to a step of 256: the 3 stays in
        assert np.all(np.array(sorted(r)) >= [3, 6]), (n, r)
        assert np.allclose(sorted(r), [3, 6], atol=256 / n), (n, r)


def test_isoflop_plan_spends_each_budget(tmp_path):
    sizes = [{"model.d_model": d, "model.n_layers": 1, "model.n_heads": 2}
             for d in (16, 24, 32, 48)] + [
             {"model.d_model": 64, "model.n_layers": 1, "model.n_heads": 2, "seeds": 1}]
    spec = spec_lib.load_spec(spec_file(tmp_path, tokens=[], isoflop=[3e10, 1e11], sizes=sizes,
                                     isoflop_points=3, holdout={}, fit={"law": "isoflop"}))
    trials = spec_lib.plan(spec)
    assert len(trials) == 6
    for t in trials:
        assert min(abs(t.facts()["flops"] / c - 1) for c in (3e10, 1e11)) < 0.05


@pytest.mark.parametrize("changes, message", [
    ({"tokens": [100]}, "recipe.min_steps"),
    ({"holdout": {"size": SIZES[0], "tokens": 8192}}, "held-out run"),
    ({"holdout": [{"size": SIZES[0]}]}, r"holdout\[0\] needs"),
    ({"sizes": []}, "sizes"),
    ({"tokens": [8192], "isoflop": [1e10]}, "exactly one"),
    ({"tokens": [8192], "tokens_per_param": [4]}, "exactly one"),
    ({"sizes": SIZES[:2]}, "3 distinct model sizes"),
    ({"recipe": {"lr": 1e-2, "warmup": 3}}, "recipe.warmup"),
    ({"recipe": {"lr": 1e-2, "eval_points": 0}}, "recipe.eval_points=0"),
    ({"overrides": {**BASE, "train.batch_size": 2**22},
      "tokens": [2**22 * 32 * k for k in (25, 30, 35)], "holdout": {}}, "GiB"),
])
def test_bad_specs_fail_before_any_compute(tmp_path, changes, message):
    path = spec_file(tmp_path, **changes)
    with pytest.raises(ConfigError, match=message):
        spec_lib.check_memory(spec_lib.plan(spec_lib.load_spec(path)), 24 * 2**30, "cpu")
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("attention, platform, refused", [
    ("auto", "cpu", True), ("auto", "gpu", False), ("einsum", "gpu", True),
    ("dot_product", "cpu", False)])
def test_the_sweep_counts_attention_scores_where_the_attention_path_keeps_them(
        tmp_path, attention, platform, refused):
    """A long context: its attention scores (~2.7 GB over 2 layers) need more than 1 GiB, the
    rest far less. The sweep refuses its trials exactly where `lm train` would (the einsum
    path: `auto` on CPU), not where flash attention runs."""
    tokens = 8 * 4096 * 40
    path = spec_file(tmp_path, overrides={**BASE, "model.context": 4096, "model.attention":
                                          attention}, tokens=[tokens, 2 * tokens, 3 * tokens],
                     holdout={})
    trials = spec_lib.plan(spec_lib.load_spec(path))
    check = lambda: spec_lib.check_memory(trials, 2**30, platform)  # noqa: E731
    if refused:
        with pytest.raises(ConfigError, match=r"trial \S+ needs at least [\d.]+ GiB, and its devices "
                                              r"have 1.0 GiB"):
            check()
    else:
        check()


@pytest.mark.parametrize("name, ratio", [("quick", 4), ("reference", 30)])
def test_committed_experiments_plan(name, ratio):
    """The README's main job and the studies stay valid sweeps as the code moves: >= 6 sizes
    over >= 10x in parameters, and a held-out run with `ratio` x the compute of the largest
    fitting run."""
    spec_path = Path(__file__).resolve().parents[1] / "experiments" / f"{name}.yaml"
    trials = spec_lib.plan(spec_lib.load_spec(spec_path))
    fit = [t.facts() for t in trials if t.role == "fit"]
    held = [t.facts()["flops"] for t in trials if t.role == "holdout"]
    params = sorted({f["params"] for f in fit})
    assert len(fit) >= 12 and len(params) >= 6 and params[-1] >= 10 * params[0]
    assert max(held) >= ratio * max(f["flops"] for f in fit)


def test_a_wsd_recipe_plans_stable_runs_and_their_cooldown_branches(tmp_path):
    spec = spec_lib.load_spec(spec_file(tmp_path, seeds=[0, 1], sizes=SIZES[:2] + [
        {**SIZES[2], "seeds": 1}], recipe={"lr": 1e-2, "schedule": "wsd", "decay_fraction": 0.25}),
        ["seed=3"])
    trials = spec_lib.plan(spec)
    stables = [t for t in trials if t.role == "stable"]
    assert len(stables) == 2 + 2 + 1  # per size and seed; the last size asks for one seed
    assert {t.cfg.train.seed for t in trials} == {3, 4} and spec.path.name == "sweep-seed3"
    assert {t.cfg.data_seed for t in trials} == {3}  # one data order for the study...
    own = spec_lib.plan(spec_lib.load_spec(spec.path.parent / "sweep.yaml",
                                           ["seed=3", "data_order=seed"]))
    assert [t.name for t in own] == [t.name for t in trials]
    assert all(t.cfg.data_seed == t.cfg.train.seed for t in own)  # ...or each seed its own
    with pytest.raises(ConfigError, match=r"data_order='size' is not valid; choose one of \["):
        spec_lib.load_spec(spec.path.parent / "sweep.yaml", ["data_order=size"])
    for stable in stables:
        branches = [t for t in trials if t.parent == stable.name]
        assert len(branches) == 3 and stable.cfg.optim.schedule == "constant"
        starts = [b.cfg.train.branch_step for b in branches]
        assert stable.cfg.train.steps == max(starts)  # to the largest budget's decay start
        assert sorted(stable.cfg.checkpoint.steps) == sorted(starts)
        for b in branches:
            t = b.cfg.train
            assert b.cfg.optim.schedule == "wsd" and t.branch_step == t.steps - round(0.25 * t.steps)
            assert b.cfg.optim.warmup_steps == stable.cfg.optim.warmup_steps  # one warmup a size
            assert b.facts()["spent_flops"] == pytest.approx(
                b.facts()["flops"] * (t.steps - t.branch_step) / t.steps)
    text = spec_lib.plan_text(spec, trials, 1e11, "measured cpu")
    assert "25% of a peak of 100 GFLOP/s, measured cpu;" in text.splitlines()[0]
    assert "if every budget trained from scratch" in text and "saved" in text
    b = branches[0]  # a branch's row: the FLOPs it trains, not its run's from step 0
    (row,) = [line for line in text.splitlines() if line.startswith(b.name + " ")]
    assert f"{b.facts()['spent_flops']:.3g}" in row.split()
    assert f"{b.facts()['flops']:.3g}" not in row.split()
    # a worker compiles a model shape once, for every seed, budget and branch of it
    shapes = {t.cfg.model for t in trials}
    assert 1 < len(shapes) < len(trials)
    assert sum(spec_lib.estimated_seconds(trials, peak=math.inf)) == pytest.approx(
        len(shapes) * spec_lib.PLAN_COMPILE_S + len(trials) * spec_lib.PLAN_TRIAL_S)


def test_budgets_the_fit_leaves_out_train_nothing_and_change_no_other_run(tmp_path):
    spec = spec_lib.load_spec(spec_file(tmp_path, recipe={"lr": 1e-2, "schedule": "wsd"}))
    every = {t.name: t for t in spec_lib.plan(spec)}
    fitting = [t.facts() for t in every.values() if t.role == "fit"]
    shortest = min(f["tokens"] for f in fitting)
    largest = max(f["params"] for f in fitting)  # its shortest budget falls under the rule
    rule = 1.01 * shortest / largest
    strict = dataclasses.replace(spec, fit=dataclasses.replace(spec.fit, min_tokens_per_param=rule))
    kept = spec_lib.plan(strict)
    under = {name for name, t in every.items()
             if t.role == "fit" and t.facts()["tokens"] < rule * t.facts()["params"]}
    assert under and set(every) - {t.name for t in kept} == under
    for t in kept:  # the same runs, warmup included; a stable run saves fewer branch points
        assert t.name in every and dataclasses.replace(
            t.cfg, checkpoint=every[t.name].cfg.checkpoint) == every[t.name].cfg
        if t.role == "stable":
            assert sorted(t.cfg.checkpoint.steps) == sorted(
                b.cfg.train.branch_step for b in kept if b.parent == t.name)
    none_left = dataclasses.replace(spec, fit=dataclasses.replace(spec.fit,
                                                                  min_tokens_per_param=1e9))
    with pytest.raises(ConfigError, match="every budget"):
        spec_lib.plan(none_left)


def test_sizes_that_share_width_depth_and_heads_are_named_apart(tmp_path):
    """A size alike an earlier one but for d_ff (or n_kv_heads, ...) gets its settings in its
    trials' names; every earlier size keeps its names (adding a size renames nothing), and so
    does a held-out run of that shape whose names do not collide; repeated trials are refused."""
    kv = {**SIZES[2], "model.n_kv_heads": 1}
    ff = {**SIZES[2], "model.d_ff": 256}

    def names(**changes):
        return {t.name: t for t in spec_lib.plan(spec_lib.load_spec(spec_file(tmp_path,
                                                                              **changes)))}

    before, with_kv, both = names(), names(sizes=SIZES + [kv]), names(sizes=SIZES + [kv, ff])
    assert set(before) < set(with_kv) < set(both)  # nothing renamed
    added = set(both) - set(before)
    assert len(added) == 2 * 3 and all(n.startswith("d48-l2-h2-") for n in added)
    assert {both[n].cfg.model.d_ff for n in added if "-d_ff256-" in n} == {256}
    assert {both[n].cfg.model.n_kv_heads for n in added if "-n_kv_heads1-" in n} == {1}
    held = names(holdout={"size": ff, "tokens": 32768})
    assert "d48-l2-h2-t3.28e04-s0" in held  # its own budget: no collision, no tag
    with pytest.raises(ConfigError, match="repeats trials"):
        names(sizes=SIZES + [{**SIZES[2], "seeds": 2}])


def test_a_frontier_law_plans_on_every_point_that_may_reach_its_envelope(tmp_path):
    """kaplan fits the compute-efficient envelope, which the losses decide: before training,
    every planned point may be on it (a placeholder loss equal everywhere left one point, and
    refused every kaplan sweep); a design with too few compute values is still refused."""
    fit = {"law": "kaplan", "bootstrap": 6, "min_tokens_per_param": 0}
    trials = spec_lib.plan(spec_lib.load_spec(spec_file(tmp_path, fit=fit)))
    assert len({t.facts()["flops"] for t in trials if t.role == "fit"}) == 9
    one_budget = spec_file(tmp_path, fit=fit, sizes=SIZES[:1], tokens=[5120],
                           recipe={"eval_points": 1, "lr": 1e-2})
    with pytest.raises(ConfigError, match="cannot be fitted.*compute values"):
        spec_lib.plan(spec_lib.load_spec(one_budget))


def test_trials_whose_mesh_does_not_fit_a_workers_devices_are_refused_before_any_trains(
        tmp_path):
    from lm import runner

    path = spec_file(tmp_path, overrides={**BASE, "mesh.model": 2})
    trials = spec_lib.plan(spec_lib.load_spec(path))
    spec_lib.check_devices(trials, 2)  # data 1 x model 2
    spec_lib.check_devices(trials, 0)  # not known here: each worker checks its own
    with pytest.raises(ConfigError, match=r"trial d16\S* on a worker's 1 device\(s\): mesh.data"):
        runner.planned(path, cpu_devices=1)  # what `lm sweep` and `--plan` check first
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("changes, message", [
    ({"sizes": [{**SIZES[0], "seeds": [0, 1]}]}, r"sizes\[0\].seeds=\[0, 1\]: .* integer >= 1"),
    ({"sizes": [{**SIZES[0], "seeds": 0}]}, r"sizes\[0\].seeds=0"),
    ({"sizes": SIZES + [SIZES[1]]}, r"sizes\[3\] repeats an earlier size"),
    ({"seeds": 2}, r"seeds=2 has the wrong type; expected a list, e.g. \[0, 1\]"),
    ({"fit": {"bootstrap": -5}}, r"fit.bootstrap=-5 is not valid"),
    ({"fit": {"bootstrap": 3}}, r"fit.bootstrap=3 is not valid.* or >= 6 refits"),
    ({"fit": {"min_tokens_per_param": -1}}, r"fit.min_tokens_per_param=-1.0 is not valid"),
    ({"fit": {"max_noise": -0.1}}, r"fit.max_noise=-0.1 is not valid"),
    ({"fit": {"drop_early": 1.0}}, r"fit.drop_early=1.0 is not valid"),
    ({"tokens": [-1, 8192]}, r"tokens=\[-1.0, 8192.0\]: budgets are positive"),
    ({"recipe": {"lr": 1e-2, "decay_fraction": 1.5}}, r"recipe.decay_fraction=1.5 is not valid"),
    ({"recipe": {"lr": 1e-2, "schedule": "wsd", "decay_fraction": 1.0}},
     r"decay_fraction=1.0 .* no stable run"),
    ({"dir": "/dev/null"}, r"the sweep's directory /dev/null is a file"),
    ({"holdout": {"size": {**SIZES[2], "seeds": 0}, "tokens": 32768}}, r"holdout\[0\].size.seeds=0"),
    ({"fit": {"law": "isoflop"}, "tokens": [], "isoflop": [1e12]},  # its held-out run: no loss
     r"fit.law=isoflop gives the compute-optimal allocation, not a loss")])
def test_a_spec_that_cannot_run_is_refused_when_loaded(tmp_path, changes, message):
    """Caught at load (and by --plan), not after the fitting runs trained, nor as a traceback."""
    with pytest.raises(ConfigError, match=message):
        spec_lib.load_spec(spec_file(tmp_path, **changes))
