"""A sweep's spec and its plan: YAML -> trials, each an ordinary run's config, with the facts
a fit needs (parameters, tokens, FLOPs) and checks that a bad sweep fails before it trains.

Pure: config and accounting only, no JAX, no store, no processes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import yaml

from lm import config as config_lib, flops, laws, rundir, scaling, schedule
from lm.config import Config
from lm.errors import ConfigError
from lm.points import Points


# --------------------------------------------------------------------------- the spec


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How each size trains: the rules that make small runs comparable (Porian et al. 2024)."""

    lr: float = 3e-3
    lr_ref_width: int = 0  # 0: every size uses `lr`; else lr * (lr_ref_width / d_model)^lr_power
    lr_power: float = 1.0
    # > 0: each size's model.init_std is init_fan_in / sqrt(d_model) (GPT-2's 0.02 at width 768
    # is 0.55), over the spec's overrides but not a size's own; 0: the base config's init_std
    init_fan_in: float = 0.0
    warmup_tokens_per_param: float = 1.0  # warmup scales with model size: N tokens by default
    min_warmup_steps: int = 5
    max_warmup_fraction: float = 0.25
    eval_points: int = 8  # log-spaced evaluations per trial: its learning curve
    min_steps: int = 20  # shorter budgets are an error, not a silently useless run
    # cosine: every budget a run of its own; wsd: per size and seed, one stable run to the
    # largest budget's decay start, and a cooldown branch from it for each budget
    schedule: Literal["cosine", "wsd"] = "cosine"
    decay_fraction: float = 0.2  # wsd
    decay_shape: Literal["linear", "1-sqrt"] = "1-sqrt"  # wsd
    save_every_seconds: float = 60.0  # a killed worker loses at most this much of a run


@dataclasses.dataclass(frozen=True)
class HoldoutSpec:
    size: dict = dataclasses.field(default_factory=dict)
    tokens: float = 0.0


@dataclasses.dataclass(frozen=True)
class FitSpec:
    law: Literal["chinchilla", "kaplan-nd", "kaplan", "isoflop"] = "chinchilla"
    drop_early: float = 0.1  # of each learning curve; annealed points (run ends) need none
    bootstrap: int = 100
    params: Literal["total", "non_embedding", "flops"] = "total"  # N: see fit_params
    metric: str = "val"  # the validation set whose loss is fitted (data.val_sets names more)
    # points of models that saw fewer are not fitted (default: 1; 0 for isoflop)
    min_tokens_per_param: float | None = None
    # sizes whose seeds spread by more than this (std of log loss) leave the fit; 0: none do
    max_noise: float = 0.0


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    name: str = "sweep"
    base: str = "tiny"  # config (preset or file) every trial starts from
    dir: str = ""  # default: runs/sweeps/<name>
    overrides: dict = dataclasses.field(default_factory=dict)  # dotted keys for every trial
    sizes: tuple[dict, ...] = ()  # model shapes, each a dict of dotted overrides
    tokens: tuple[float, ...] = ()  # token budgets: every size trains on each
    # or budgets in proportion to each size: r * N tokens for each r (N counted as fit.params),
    # which keeps every size at like tokens per parameter, where one law describes them all
    tokens_per_param: tuple[float, ...] = ()
    isoflop: tuple[float, ...] = ()  # or compute budgets C: sizes around the optimum of each
    isoflop_points: int = 4
    seeds: tuple[int, ...] = (0,)  # a size may say how many it needs: {..., seeds: 3}
    # Seeds vary the models' initialisation, offset by `seed`: `lm sweep SPEC seed=10` reruns
    # the study afresh, in SWEEP_DIR-seed10. The training data's order is, by `data_order`,
    # `study`: one for every trial, set by `seed` (common random numbers: sizes, budgets and
    # seeds compared on the same batches; what sweeps before it had), or `seed`: each seed's
    # own (data.seed follows train.seed), so that a size's seeds average over data orders too:
    # an order's effect on the loss differs from size to size, and one order for a whole
    # study is noise that no number of its seeds averages.
    seed: int = 0
    data_order: Literal["study", "seed"] = "study"
    recipe: Recipe = Recipe()
    # held-out runs (YAML: one mapping or a list); one seed unless its size says `seeds: k`,
    # and then their mean is scored too: what the law predicts is a size's expected loss
    holdout: tuple[HoldoutSpec, ...] = ()
    fit: FitSpec = FitSpec()

    @property
    def path(self) -> Path:
        """The sweep directory; another seed offset is another study, in another directory."""
        path = self.dir or f"runs/sweeps/{self.name}"
        return Path(f"{path}-seed{self.seed}" if self.seed else path)


def load_spec(path: str | Path, overrides=()) -> SweepSpec:
    """A sweep spec from YAML, with dotted `overrides` (e.g. seed=1, recipe.lr=3e-3)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep spec {path} " + ("is a directory; give the spec's YAML file "
                                                   "(a sweep's own is its sweep.yaml)"
                                                   if path.is_dir() else "not found"))
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a sweep spec must be a mapping, got {type(raw).__name__}")
    raw = config_lib.merge(raw, config_lib.parse_overrides(list(overrides)))
    if isinstance(raw.get("holdout"), dict):  # one held-out run; {}: none
        raw["holdout"] = [raw["holdout"]] if raw["holdout"] else []
    spec = config_lib.build(SweepSpec, raw)
    if not spec.sizes:
        raise ConfigError(f"{path}: `sizes` is empty; list model shapes, e.g. "
                          "[{model.d_model: 64, model.n_layers: 2}]")
    if sum(map(bool, (spec.tokens, spec.tokens_per_param, spec.isoflop))) != 1:
        raise ConfigError(f"{path}: give exactly one of `tokens` (budgets for every size), "
                          "`tokens_per_param` (budgets in proportion to each size) or "
                          "`isoflop` (compute budgets)")
    if spec.fit.law == "isoflop" and not spec.isoflop:
        raise ConfigError(f"{path}: fit.law=isoflop needs `isoflop` compute budgets")
    if spec.holdout and spec.fit.law not in laws.LOSS_LAWS:
        raise ConfigError(f"{path}: fit.law={spec.fit.law} gives the compute-optimal "
                          "allocation, not a loss to predict a held-out run with; use one of "
                          f"{list(laws.LOSS_LAWS)}, or drop `holdout`")
    if spec.recipe.init_fan_in < 0:
        raise ConfigError(f"{path}: recipe.init_fan_in={spec.recipe.init_fan_in}: a scale is "
                          "positive (0: every size keeps the base config's init_std)")
    if spec.recipe.eval_points < 1:
        raise ConfigError(f"{path}: recipe.eval_points={spec.recipe.eval_points}: a trial needs "
                          "at least 1 evaluation (its final loss, which the fit takes)")
    if spec.path.exists() and not spec.path.is_dir():
        raise ConfigError(f"{path}: the sweep's directory {spec.path} is a file; give `dir` (or "
                          "`name`) a directory of its own")
    _check_numbers(path, spec)
    _check_sizes(path, spec.sizes)
    for i, h in enumerate(spec.holdout):
        _check_seeds(path, f"holdout[{i}].size", h.size)
    return spec


def _check_seeds(path: Path, where: str, size: dict) -> None:
    count = size.get("seeds", 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(f"{path}: {where}.seeds={count!r}: a size's `seeds` is how many it "
                          "trains, an integer >= 1 (the spec's `seed` offsets them)")


def _check_numbers(path: Path, spec: SweepSpec) -> None:
    """Budgets and fit settings a sweep cannot run with: refused before anything trains
    (a fit setting would otherwise fail only after every fitting run)."""
    f = spec.fit
    for key, values in (("tokens", spec.tokens), ("tokens_per_param", spec.tokens_per_param),
                        ("isoflop", spec.isoflop)):
        if any(v <= 0 for v in values):
            raise ConfigError(f"{path}: {key}={list(values)}: budgets are positive")
    r = spec.recipe
    for key, value, ok, valid in (
            ("fit.bootstrap", f.bootstrap, f.bootstrap == 0 or f.bootstrap >= scaling.MIN_BOOTSTRAP,
             f"0 (intervals from the fit's curvature) or >= {scaling.MIN_BOOTSTRAP} refits"),
            ("fit.drop_early", f.drop_early, 0 <= f.drop_early < 1, "a fraction in [0, 1)"),
            ("fit.min_tokens_per_param", f.min_tokens_per_param,
             f.min_tokens_per_param is None or f.min_tokens_per_param >= 0, ">= 0 (or null)"),
            ("fit.max_noise", f.max_noise, f.max_noise >= 0, ">= 0 (0: no size leaves the fit)"),
            ("recipe.decay_fraction", r.decay_fraction,
             0 < r.decay_fraction < 1 if r.schedule == "wsd" else 0 < r.decay_fraction <= 1,
             "a fraction of each run in (0, 1) under wsd: a decay over the whole run leaves no "
             "stable run to branch from")):
        if not ok:
            raise ConfigError(f"{path}: {key}={value} is not valid: {valid}")
    if spec.seed < 0 or any(s < 0 for s in spec.seeds):
        raise ConfigError(f"{path}: seed={spec.seed}, seeds={list(spec.seeds)}: seeds are >= 0")


def _check_sizes(path: Path, sizes: tuple[dict, ...]) -> None:
    """Each size listed once, its `seeds` a count >= 1."""
    seen = set()
    for i, size in enumerate(sizes):
        _check_seeds(path, f"sizes[{i}]", size)
        key = json.dumps(size, sort_keys=True)
        if key in seen:
            raise ConfigError(f"{path}: sizes[{i}] repeats an earlier size: list each once "
                              "(`seeds: K` trains one K times)")
        seen.add(key)


# --------------------------------------------------------------------------- trials


@dataclasses.dataclass(frozen=True)
class Trial:
    name: str
    role: Literal["fit", "holdout", "stable"]  # stable: a wsd run its branches start from
    cfg: Config

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.train.run_dir)

    @property
    def parent(self) -> str | None:
        """The trial a cooldown branch starts from (its run directory's name)."""
        return Path(self.cfg.train.branch_from).name if self.cfg.train.branch_from else None

    def facts(self) -> dict:
        """What a fit needs to know of the trial, from its config alone: the run's N, D and
        FLOPs (a branch's count from step 0), and the FLOPs the trial itself spends."""
        t, m, counts = self.cfg.train, self.cfg.model, flops.param_counts(self.cfg.model)
        tokens = t.steps * self.cfg.tokens_per_step
        per_token = flops.train_flops_per_token(m, self.cfg.seq_len)
        return {"params": counts["total"], "params_non_embedding": counts["non_embedding"],
                "tokens": tokens, "flops_per_token": per_token, "flops": per_token * tokens,
                "flops_6nd": 6 * counts["total"] * tokens,
                "spent_flops": per_token * (t.steps - t.branch_step) * self.cfg.tokens_per_step}


def _dotted(mapping: dict) -> list[str]:
    return [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}"
            for k, v in mapping.items()]


def _size_config(spec: SweepSpec, size: dict) -> Config:
    return config_lib.load(spec.base, _dotted(spec.overrides) + _dotted(size))


_NAMED = ("model.d_model", "model.n_layers", "model.n_heads")  # in every trial's name
_UNSAFE = re.compile(r"[^\w.]+")  # in a setting's value, where a trial's name is a path


def _name(cfg: Config, tokens: int, seed: int, kind: str = "", tag: str = "") -> str:
    m = cfg.model
    return (f"d{m.d_model}-l{m.n_layers}-h{m.n_heads}{tag}-{kind}t{tokens:.3g}-s{seed}"
            .replace("+", ""))


def _tag(size: dict) -> str:
    """A size's settings besides width, depth and heads, as a name part (`-d_ff512`)."""
    return "".join(f"-{k.split('.')[-1]}{_UNSAFE.sub('_', str(v))}"
                   for k, v in sorted(size.items()) if k not in _NAMED)


def _named_apart(groups: list[tuple[dict, Callable[[str], list[Trial]]]]) -> list[Trial]:
    """Each size's trials (`build(tag)`), in order. A size whose trials would take the names
    of an earlier, different size's (alike in width, depth and heads, not in other settings)
    carries its other settings in its names; the earlier size keeps its names, and so does
    every size of a sweep that needed no such tag: sweeps of earlier versions resume, and a
    size added to a spec renames no trial. A size whose seeds overlap another listing of it
    still repeats its trials, and is refused for it."""
    trials, owner = [], {}
    for size, build in groups:
        runs, key = build(""), json.dumps(size, sort_keys=True)
        if any(owner.get(t.name, key) != key for t in runs):
            runs = build(_tag(size))
        owner.update((t.name, key) for t in runs)
        trials += runs
    return trials


def _fitting_runs(spec: SweepSpec, size: dict, budgets: list[float], seeds: list[int],
                  tag: str) -> list[Trial]:
    return [t for seed in seeds for t in _runs(spec, size, budgets, seed, "fit", tag)]


def _held_out_runs(spec: SweepSpec, size: dict, tokens: float, seeds: list[int],
                   tag: str) -> list[Trial]:
    base = _size_config(spec, size)
    steps = _steps(spec, base, size, tokens)
    return [_trial(spec, size, steps, seed, "holdout", _warmup(spec, base, steps),
                   spec.recipe.schedule, tag=tag) for seed in seeds]


def _steps(spec: SweepSpec, base: Config, size: dict, tokens: float) -> int:
    steps = round(tokens / base.tokens_per_step)
    if steps < spec.recipe.min_steps:
        raise ConfigError(
            f"a budget of {tokens:.3g} tokens is {steps} steps of {base.tokens_per_step} tokens "
            f"for size {size}; recipe.min_steps={spec.recipe.min_steps}: raise the budget or "
            "lower train.batch_size")
    return steps


def _warmup(spec: SweepSpec, base: Config, shortest: int) -> int:
    """Warmup in proportion to the model's size, within the recipe's bounds, and no longer than
    its share of the shortest run it must serve."""
    r = spec.recipe
    n = flops.param_counts(base.model)["total"]
    warmup = round(r.warmup_tokens_per_param * n / base.tokens_per_step)
    return min(max(warmup, r.min_warmup_steps), int(r.max_warmup_fraction * shortest))


def _trial(spec: SweepSpec, size: dict, steps: int, seed: int, role: str, warmup: int,
           schedule: str, kind: str = "", tag: str = "", **settings) -> Trial:
    """One run of `size` for `steps` steps, with the recipe's per-size LR."""
    base, r = _size_config(spec, size), spec.recipe
    lr = r.lr * (r.lr_ref_width / base.model.d_model) ** r.lr_power if r.lr_ref_width else r.lr
    name = _name(base, steps * base.tokens_per_step, seed, kind, tag)
    order = {"data.seed": spec.seed} if spec.data_order == "study" else {}  # else train.seed's
    settings = {"train.steps": steps, "train.seed": seed, **order,
                "optim.warmup_steps": warmup,
                "optim.schedule": schedule, "optim.decay_fraction": r.decay_fraction,
                "optim.decay_shape": r.decay_shape, "train.run_dir": str(spec.path / "trials" / name),
                "train.progress": False, "eval.log_points": r.eval_points,
                "checkpoint.every_seconds": r.save_every_seconds, **settings}
    if "optim.lr" not in size:  # a size may state its own tuned LR
        settings["optim.lr"] = lr
    if r.init_fan_in and "model.init_std" not in size:
        if base.model.parametrization == "mup":
            raise ConfigError("recipe.init_fan_in scales init_std with width, as "
                              "model.parametrization=mup already does: set one or the other")
        settings["model.init_std"] = r.init_fan_in / base.model.d_model ** 0.5
    cfg = config_lib.load(spec.base, _dotted(spec.overrides) + _dotted(size) + _dotted(settings))
    return Trial(name, role, cfg)


def _runs(spec: SweepSpec, size: dict, budgets: list[float], seed: int, role: str, tag: str
          ) -> list[Trial]:
    """The trials that give `size` its loss at each token budget the fit will use: a cosine
    run each, or one stable run to the largest budget's decay start with a cooldown branch per
    budget, each starting from its own decay start. A budget of fewer tokens per parameter than
    fit.min_tokens_per_param trains nothing, but still bounds the size's warmup, so that the
    runs that do train follow the recipe whatever the fit leaves out."""
    base = _size_config(spec, size)
    steps = sorted(_steps(spec, base, size, tokens) for tokens in budgets)
    warmup = _warmup(spec, base, steps[0])
    n = fit_params(spec, base)
    floor = scaling.tokens_per_param_floor(spec.fit.law, spec.fit.min_tokens_per_param)
    steps = [s for s in steps if not scaling.too_few_tokens(s * base.tokens_per_step, n, floor)]
    if not steps:
        return []
    if spec.recipe.schedule == "cosine":
        return [_trial(spec, size, s, seed, role, warmup, "cosine", tag=tag) for s in steps]
    o = dataclasses.replace(base.optim, decay_fraction=spec.recipe.decay_fraction)
    starts = [schedule.decay_start(o, s) for s in steps]
    stable = _trial(spec, size, starts[-1], seed, "stable", warmup, "constant", "stable-", tag,
                    **{"checkpoint.steps": sorted(set(starts))})
    return [stable] + [_trial(spec, size, s, seed, role, warmup, "wsd", tag=tag, **{
        "train.branch_from": str(stable.run_dir), "train.branch_step": start})
        for s, start in zip(steps, starts)]


def _isoflop_sizes(spec: SweepSpec, budget: float) -> list[tuple[dict, float]]:
    """`isoflop_points` sizes around the expected optimum of `budget` (D = 20 N, Chinchilla's
    rule of thumb), each with the tokens that spend the budget exactly."""
    cfgs = [(size, _size_config(spec, _seeds(spec, size)[0])) for size in spec.sizes]
    cfgs.sort(key=lambda sc: flops.param_counts(sc[1].model)["total"])
    guess = math.sqrt(budget / (6 * 20))
    logs = [abs(math.log(flops.param_counts(c.model)["total"] / guess)) for _, c in cfgs]
    k = min(spec.isoflop_points, len(cfgs))
    centre = min(range(len(cfgs)), key=logs.__getitem__)
    lo = min(max(centre - k // 2, 0), len(cfgs) - k)
    return [(size, budget / flops.train_flops_per_token(c.model, c.seq_len))
            for size, c in cfgs[lo:lo + k]]


def _seeds(spec: SweepSpec, size: dict) -> tuple[dict, list[int]]:
    """A size's overrides without its `seeds` count, and its seeds (offset by spec.seed)."""
    size = dict(size)
    count = size.pop("seeds", None)
    seeds = range(count) if count is not None else spec.seeds
    return size, [spec.seed + s for s in seeds]


def plan(spec: SweepSpec) -> list[Trial]:
    """Every trial of the sweep: the fitting grid (with wsd, stable runs and their branches),
    then the held-out run(s)."""
    grid: dict[str, tuple[dict, list[float]]] = {}  # budgets by size
    for size in spec.sizes if spec.tokens or spec.tokens_per_param else ():
        base = _size_config(spec, _seeds(spec, size)[0])
        n, per_step = fit_params(spec, base), base.tokens_per_step
        # whole steps, rounded up: a budget of exactly fit.min_tokens_per_param stays in the fit
        grid[json.dumps(size, sort_keys=True)] = (size, list(spec.tokens) or [
            math.ceil(r * n / per_step) * per_step for r in spec.tokens_per_param])
    for budget in spec.isoflop:
        for size, tokens in _isoflop_sizes(spec, budget):
            grid.setdefault(json.dumps(size, sort_keys=True), (size, []))[1].append(tokens)
    groups = []
    for size, budgets in grid.values():
        size, seeds = _seeds(spec, size)
        groups.append((size, functools.partial(_fitting_runs, spec, size, budgets, seeds)))
    for i, h in enumerate(spec.holdout):
        if not h.size or h.tokens <= 0:
            raise ConfigError(f"holdout[{i}] needs a `size` (dotted model overrides) and "
                              f"`tokens` > 0, got {h}")
        held, seeds = _seeds(spec, h.size)
        groups.append((held, functools.partial(_held_out_runs, spec, held, h.tokens,
                                               seeds if "seeds" in h.size else seeds[:1])))
    trials = _named_apart(groups)
    if not any(t.role == "fit" for t in trials):
        floor = scaling.tokens_per_param_floor(spec.fit.law, spec.fit.min_tokens_per_param)
        raise ConfigError("the sweep as planned cannot be fitted: every budget gives its size "
                          f"fewer than fit.min_tokens_per_param={floor:g}"
                          " tokens per parameter; lower it or raise the budgets")
    largest = max(t.facts()["flops"] for t in trials if t.role == "fit")
    for t in trials:
        if t.role == "holdout" and t.facts()["flops"] <= largest:
            raise ConfigError(
                f"held-out run {t.name} ({t.facts()['flops']:.3g} FLOPs) must use more compute "
                f"than the largest fitting run ({largest:.3g}); raise its tokens or size")
    names = [t.name for t in trials]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"the sweep repeats trials {duplicates}: sizes, seeds and budgets "
                          "must differ (budgets in their first 3 significant digits, which name "
                          "them; a held-out run may not be one of the fitting runs)")
    sets = trials[0].cfg.data.set_names
    if spec.fit.metric not in sets:
        raise ConfigError(f"fit.metric={spec.fit.metric!r} is not a validation set of the "
                          f"trials; choose one of {sets} (data.val_sets names more)")
    try:
        scaling.check_design(planned_points([t for t in trials if t.role == "fit"], spec),
                             spec.fit.law, spec.fit.drop_early, spec.fit.min_tokens_per_param)
    except ValueError as e:
        raise ConfigError(f"the sweep as planned cannot be fitted: {e}; add sizes or budgets")
    return trials


def fit_params(spec: SweepSpec, cfg: Config) -> int:
    """A config's N as the spec's fit counts it (fit.params)."""
    return counted_params(cfg, spec.fit.params)


def counted_params(cfg: Config, counted: str) -> int:
    """A config's N counted as `counted`: all parameters (`total`), the non-embedding ones, or
    `flops`: the training FLOPs per token / 6, the N for which C = 6ND holds exactly,
    counting the attention over the context and the output head as the model spends them (at
    small widths they are a large share of its compute; DeepSeek-AI 2024 measure model scale
    by FLOPs per token for that reason)."""
    if counted == "flops":
        return flops.train_flops_per_token(cfg.model, cfg.seq_len) // 6
    return flops.param_counts(cfg.model)[counted]


def planned_points(trials: list[Trial], spec: SweepSpec) -> Points:
    """The evaluations the trials will make, with a placeholder loss: what a fit will see. The
    placeholder falls with compute, so that a frontier law (kaplan) counts every point as one
    that may lie on its envelope: which ones do is known only once the losses are."""
    rows = []
    for t in trials:
        facts, per_step = t.facts(), t.cfg.tokens_per_step
        params = fit_params(spec, t.cfg)
        evaluated = rundir.eval_steps(t.cfg) or {t.cfg.train.steps}
        for step in sorted(s for s in evaluated if s > t.cfg.train.branch_step):
            flops = step * per_step * facts["flops_per_token"]
            rows.append({"params": params, "tokens": step * per_step, "loss": flops ** -0.05,
                         "run": t.name, "flops": flops, "step": step,
                         "annealed": schedule.annealed(t.cfg.optim, t.cfg.train.steps, step)})
    return Points.from_rows(rows)


def check_devices(trials: list[Trial], count: int) -> None:
    """Refuse trials whose mesh does not fit `count` devices (0: unknown), before any trains."""
    for t in trials if count else ():
        try:
            config_lib.check_devices(t.cfg, count)
        except ConfigError as e:
            raise ConfigError(f"trial {t.name} on a worker's {count} device(s): {e}") from None


def check_memory(trials: list[Trial], limit: int, platform: str) -> None:
    """Refuse trials that would not fit in the `limit` bytes of a worker's devices on
    `platform` (0: unknown), as `lm train` would (`flops.check_memory`)."""
    for t in trials:
        flops.check_memory(t.cfg, limit, platform, f"trial {t.name}")


# What a trial's time is estimated from: a typical small-model MFU on CPU, compiling a model
# shape's programs once (workers share them through the compilation cache), and each trial's
# evaluations, checkpoints and restores.
PLAN_MFU, PLAN_COMPILE_S, PLAN_TRIAL_S = 0.25, 15.0, 1.0


def estimated_seconds(trials: list[Trial], peak: float) -> list[float]:
    """Each trial's estimated time at PLAN_MFU of `peak`, the first of each model shape's
    compiling included."""
    shapes, seconds = set(), []
    for t in trials:
        new = t.cfg.model not in shapes
        shapes.add(t.cfg.model)
        seconds.append(t.facts()["spent_flops"] / (PLAN_MFU * peak) + PLAN_TRIAL_S
                       + PLAN_COMPILE_S * new)
    return seconds


def plan_text(spec: SweepSpec, trials: list[Trial], peak: float, peak_name: str) -> str:
    """The `lm sweep --plan` table: every trial with its size, tokens, the FLOPs it spends and
    an estimated time (`estimated_seconds`); the study's FLOPs, and what cooldown branches save
    against training every budget from scratch."""
    lines = [f"sweep {spec.name}: {len(trials)} trials into {spec.path} (time assumes "
             f"{PLAN_MFU:.0%} of a peak of {peak / 1e9:.0f} GFLOP/s, {peak_name}; +{PLAN_COMPILE_S:.0f} s "
             f"to compile each model shape, +{PLAN_TRIAL_S:.0f} s a trial)",
             f"{'trial':<40} {'role':<8} {'params':>10} {'tokens':>10} {'FLOPs':>10} "
             f"{'steps':>6} {'lr':>8} {'~time':>8}   (FLOPs: those it trains, a cooldown "
             "branch's from its branch point)"]
    estimates = estimated_seconds(trials, peak)
    for t, seconds in zip(trials, estimates):
        f = t.facts()
        steps = t.cfg.train.steps - t.cfg.train.branch_step
        lines.append(f"{t.name:<40} {t.role:<8} {f['params']:>10,} {f['tokens']:>10.3g} "
                     f"{f['spent_flops']:>10.3g} {steps:>6} {t.cfg.optim.lr:>8.2e} "
                     f"{seconds / 60:>7.1f}m")
    spent = sum(t.facts()["spent_flops"] for t in trials)
    scratch = sum(t.facts()["flops"] for t in trials if t.role != "stable")
    lines.append(f"total: {spent:.3g} FLOPs ({scratch:.3g} if every budget trained from "
                 f"scratch: {1 - spent / scratch:+.0%} saved), about {sum(estimates) / 60:.0f} "
                 "minutes on this machine")
    return "\n".join(lines)
