"""A sweep's spec and its plan: YAML -> trials, each an ordinary run's config, with the facts
a fit needs (parameters, tokens, FLOPs) and checks that a bad sweep fails before it trains.

Pure: config and accounting only, no JAX, no store, no processes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Literal

import yaml

from lm import config as config_lib, flops, rundir, scaling, schedule
from lm.config import Config
from lm.errors import ConfigError


# --------------------------------------------------------------------------- the spec


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How each size trains: the rules that make small runs comparable (Porian et al. 2024)."""

    lr: float = 3e-3
    lr_ref_width: int = 0  # 0: every size uses `lr`; else lr * (lr_ref_width / d_model)^lr_power
    lr_power: float = 1.0
    warmup_tokens_per_param: float = 1.0  # warmup scales with model size: N tokens by default
    min_warmup_steps: int = 5
    max_warmup_fraction: float = 0.25
    eval_points: int = 8  # log-spaced evaluations per trial: its learning curve
    min_steps: int = 20  # shorter budgets are an error, not a silently useless run


@dataclasses.dataclass(frozen=True)
class HoldoutSpec:
    size: dict = dataclasses.field(default_factory=dict)  # empty: no held-out run
    tokens: float = 0.0


@dataclasses.dataclass(frozen=True)
class FitSpec:
    law: Literal["chinchilla", "kaplan", "isoflop"] = "chinchilla"
    drop_early: float = 0.1  # of each learning curve; annealed points (run ends) need none
    bootstrap: int = 100
    params: Literal["total", "non_embedding"] = "total"
    metric: str = "val"  # the validation set whose loss is fitted (data.val_sets names more)
    min_tokens_per_param: float = 1.0  # points of models that saw fewer are not fitted


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    name: str = "sweep"
    base: str = "tiny"  # config (preset or file) every trial starts from
    dir: str = ""  # default: runs/sweeps/<name>
    overrides: dict = dataclasses.field(default_factory=dict)  # dotted keys for every trial
    sizes: tuple[dict, ...] = ()  # model shapes, each a dict of dotted overrides
    tokens: tuple[float, ...] = ()  # token budgets: every size trains on each
    isoflop: tuple[float, ...] = ()  # or compute budgets C: sizes around the optimum of each
    isoflop_points: int = 4
    seeds: tuple[int, ...] = (0,)
    recipe: Recipe = Recipe()
    holdout: HoldoutSpec = HoldoutSpec()
    fit: FitSpec = FitSpec()

    @property
    def path(self) -> Path:
        return Path(self.dir or f"runs/sweeps/{self.name}")


def load_spec(path: str | Path) -> SweepSpec:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep spec {path} not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    spec = config_lib.build(SweepSpec, raw)
    if not spec.sizes:
        raise ConfigError(f"{path}: `sizes` is empty; list model shapes, e.g. "
                          "[{model.d_model: 64, model.n_layers: 2}]")
    if bool(spec.tokens) == bool(spec.isoflop):
        raise ConfigError(f"{path}: give exactly one of `tokens` (budgets per size) or "
                          "`isoflop` (compute budgets)")
    if spec.fit.law == "isoflop" and not spec.isoflop:
        raise ConfigError(f"{path}: fit.law=isoflop needs `isoflop` compute budgets")
    return spec


# --------------------------------------------------------------------------- trials


@dataclasses.dataclass(frozen=True)
class Trial:
    name: str
    role: Literal["fit", "holdout"]
    cfg: Config

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.train.run_dir)

    def facts(self) -> dict:
        """What a fit needs to know of the trial, from its config alone."""
        m, counts = self.cfg.model, flops.param_counts(self.cfg.model)
        tokens = self.cfg.train.steps * self.cfg.tokens_per_step
        per_token = flops.train_flops_per_token(m, self.cfg.seq_len)
        return {"params": counts["total"], "params_non_embedding": counts["non_embedding"],
                "tokens": tokens, "flops_per_token": per_token, "flops": per_token * tokens,
                "flops_6nd": 6 * counts["total"] * tokens}


def _dotted(mapping: dict) -> list[str]:
    return [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}"
            for k, v in mapping.items()]


def _size_config(spec: SweepSpec, size: dict) -> Config:
    return config_lib.load(spec.base, _dotted(spec.overrides) + _dotted(size))


def _name(cfg: Config, tokens: int, seed: int) -> str:
    m = cfg.model
    return f"d{m.d_model}-l{m.n_layers}-h{m.n_heads}-t{tokens:.3g}-s{seed}".replace("+", "")


def _trial(spec: SweepSpec, size: dict, tokens: float, seed: int, role: str) -> Trial:
    """One run of `size` on about `tokens` tokens, with the recipe's per-size LR and warmup."""
    base, r = _size_config(spec, size), spec.recipe
    per_step = base.tokens_per_step
    steps = round(tokens / per_step)
    if steps < r.min_steps:
        raise ConfigError(
            f"a budget of {tokens:.3g} tokens is {steps} steps of {per_step} tokens for size "
            f"{size}; recipe.min_steps={r.min_steps}: raise the budget or lower train.batch_size")
    n = flops.param_counts(base.model)["total"]
    warmup = round(r.warmup_tokens_per_param * n / per_step)
    warmup = min(max(warmup, r.min_warmup_steps), int(r.max_warmup_fraction * steps))
    lr = r.lr * (r.lr_ref_width / base.model.d_model) ** r.lr_power if r.lr_ref_width else r.lr
    name = _name(base, steps * per_step, seed)
    settings = {"train.steps": steps, "train.seed": seed, "optim.warmup_steps": warmup,
                "train.run_dir": str(spec.path / "trials" / name), "train.progress": False,
                "eval.log_points": r.eval_points,
                "checkpoint.every_steps": max(steps // 4, 1)}  # resumable, not too chatty
    if "optim.lr" not in size:  # a size may state its own tuned LR
        settings["optim.lr"] = lr
    cfg = config_lib.load(spec.base, _dotted(spec.overrides) + _dotted(size) + _dotted(settings))
    return Trial(name, role, cfg)


def _isoflop_sizes(spec: SweepSpec, budget: float) -> list[tuple[dict, float]]:
    """`isoflop_points` sizes around the expected optimum of `budget` (D = 20 N, Chinchilla's
    rule of thumb), each with the tokens that spend the budget exactly."""
    cfgs = [(size, _size_config(spec, size)) for size in spec.sizes]
    cfgs.sort(key=lambda sc: flops.param_counts(sc[1].model)["total"])
    guess = math.sqrt(budget / (6 * 20))
    logs = [abs(math.log(flops.param_counts(c.model)["total"] / guess)) for _, c in cfgs]
    k = min(spec.isoflop_points, len(cfgs))
    centre = min(range(len(cfgs)), key=logs.__getitem__)
    lo = min(max(centre - k // 2, 0), len(cfgs) - k)
    return [(size, budget / flops.train_flops_per_token(c.model, c.seq_len))
            for size, c in cfgs[lo:lo + k]]


def plan(spec: SweepSpec) -> list[Trial]:
    """Every trial of the sweep: the fitting grid, then the held-out run(s)."""
    grid = ([(size, tokens) for size in spec.sizes for tokens in spec.tokens] if spec.tokens
            else [pair for budget in spec.isoflop for pair in _isoflop_sizes(spec, budget)])
    trials = [_trial(spec, size, tokens, seed, "fit") for size, tokens in grid
              for seed in spec.seeds]
    if spec.holdout.size:
        trials.append(_trial(spec, spec.holdout.size, spec.holdout.tokens, spec.seeds[0],
                             "holdout"))
        largest = max(t.facts()["flops"] for t in trials if t.role == "fit")
        if trials[-1].facts()["flops"] <= largest:
            raise ConfigError(
                f"the held-out run ({trials[-1].facts()['flops']:.3g} FLOPs) must use more "
                f"compute than the largest fitting run ({largest:.3g}); raise holdout.tokens "
                "or holdout.size")
    names = [t.name for t in trials]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    sets = trials[0].cfg.data.set_names
    if spec.fit.metric not in sets:
        raise ConfigError(f"fit.metric={spec.fit.metric!r} is not a validation set of the "
                          f"trials; choose one of {sets} (data.val_sets names more)")
    if duplicates:
        raise ConfigError(f"the sweep repeats trials {duplicates}: sizes and budgets must differ")
    try:
        scaling.check_design(planned_points([t for t in trials if t.role == "fit"], spec),
                             spec.fit.law, spec.fit.drop_early, spec.fit.min_tokens_per_param)
    except ValueError as e:
        raise ConfigError(f"the sweep as planned cannot be fitted: {e}; add sizes or budgets")
    return trials


def planned_points(trials: list[Trial], spec: SweepSpec) -> scaling.Points:
    """The evaluations the trials will make, with a placeholder loss: what a fit will see."""
    rows = []
    for t in trials:
        facts, per_step = t.facts(), t.cfg.tokens_per_step
        params = facts["params"] if spec.fit.params == "total" else facts["params_non_embedding"]
        for step in sorted(rundir.eval_steps(t.cfg) or {t.cfg.train.steps}):
            rows.append({"params": params, "tokens": step * per_step, "loss": 1.0, "run": t.name,
                         "flops": step * per_step * facts["flops_per_token"], "step": step,
                         "annealed": schedule.annealed(t.cfg.optim, t.cfg.train.steps, step)})
    return scaling.Points.from_rows(rows)


def memory_bytes(cfg: Config) -> int:
    """Rough peak training memory: fp32 parameters, gradients and two Adam moments, plus
    activations kept for the backward pass (about 34·d bytes per token and layer, Korthikanti
    et al. 2022, and the attention scores) and the logits."""
    m = cfg.model
    tokens = cfg.train.batch_size // cfg.train.micro_batches * cfg.seq_len
    layer = tokens * (34 * m.d_model + 5 * m.n_heads * cfg.seq_len)
    remat = {"none": 1.0, "dots": 0.5, "full": 0.1}[m.remat]
    logits = 4 * tokens * m.vocab_size * (1 if m.loss_chunk else 3)
    return int(16 * flops.param_counts(m)["total"] + remat * m.n_layers * layer + logits)


def check_memory(trials: list[Trial], limit: int) -> None:
    """Refuse trials that would not fit in `limit` bytes of device memory (0: unknown)."""
    for t in trials:
        need = memory_bytes(t.cfg)
        if limit and need > 0.8 * limit:
            raise ConfigError(
                f"trial {t.name} needs about {need / 2**30:.1f} GiB but the devices have "
                f"{limit / 2**30:.1f} GiB; lower train.batch_size, raise train.micro_batches "
                "or set model.remat")


def plan_text(spec: SweepSpec, trials: list[Trial], peak: float) -> str:
    """The `lm sweep --plan` table: every trial with its size, tokens, FLOPs and an estimated
    time at a typical small-model MFU of a measured `peak`."""
    mfu, compile_s = 0.25, 15.0  # typical of small models on CPU; compile per trial
    lines = [f"sweep {spec.name}: {len(trials)} trials into {spec.path} (time assumes "
             f"{mfu:.0%} of a measured {peak / 1e9:.0f} GFLOP/s, +{compile_s:.0f} s per trial)",
             f"{'trial':<34} {'role':<8} {'params':>10} {'tokens':>10} {'FLOPs':>10} "
             f"{'steps':>6} {'lr':>8} {'~time':>8}"]
    total = 0.0
    for t in trials:
        f = t.facts()
        seconds = f["flops"] / (mfu * peak) + compile_s
        total += seconds
        lines.append(f"{t.name:<34} {t.role:<8} {f['params']:>10,} {f['tokens']:>10.3g} "
                     f"{f['flops']:>10.3g} {t.cfg.train.steps:>6} {t.cfg.optim.lr:>8.2e} "
                     f"{seconds / 60:>7.1f}m")
    lines.append(f"total: {sum(t.facts()['flops'] for t in trials):.3g} FLOPs, about "
                 f"{total / 60:.0f} minutes on this machine with one worker")
    return "\n".join(lines)
