"""Configuration: frozen dataclasses, YAML files with `base:` inheritance, dotted overrides.

Everything a run does is decided here, and every error a config can contain is raised here,
before anything is compiled: unknown keys, wrong types, impossible shapes and meshes.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.resources
import math
import re
import types
import typing
from pathlib import Path
from typing import Literal

import yaml

from lm.errors import ConfigError

# The presets: configs/ in a checkout, lm/configs in an installed wheel.
CONFIG_DIR = Path(str(importlib.resources.files("lm.configs")))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 512
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: as many as query heads (MHA); fewer: grouped-query
    d_ff: int | None = None  # None: 4 * d_model
    context: int = 128  # longest sequence the model is built for (RoPE table)
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    tie_embeddings: bool = True
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype; parameters stay fp32
    remat: Literal["none", "full", "dots"] = "none"
    scan_layers: bool = True  # False unrolls the layer loop: faster steps, compile grows with depth
    loss_chunk: int = 0  # >0: cross-entropy over chunks of this many tokens, never all logits
    # einsum: written-out backward pass (fastest on CPU); dot_product: jax.nn.dot_product_attention
    # (cuDNN flash attention on GPUs); auto: einsum on CPU, dot_product elsewhere
    attention: Literal["auto", "einsum", "dot_product"] = "auto"
    # mup: the maximal update parametrisation (lm.flops.MUP), so that hyperparameters tuned at
    # d_model = base_width hold at every width; sp: the standard one
    parametrization: Literal["sp", "mup"] = "sp"
    base_width: int = 0  # muP: the width its hyperparameters were tuned at
    qk_norm: bool = False  # RMSNorm on each head's queries and keys, before RoPE

    def __post_init__(self):
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.d_ff is None:
            object.__setattr__(self, "d_ff", 4 * self.d_model)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    replica: int = 1  # outermost, slow links: carries only gradient sums
    data: int = -1  # -1: all devices the other axes leave
    model: int = 1
    fsdp: bool = False  # shard the `embed` axis of parameters over `data`


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-3
    warmup_steps: int = 20
    # wsd: warmup, stable, decay over the final decay_fraction (Hagele et al. 2024)
    schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    final_lr_ratio: float | None = None  # decay floor, a fraction of lr; None: 0 for wsd, else 0.1
    decay_fraction: float = 0.2  # wsd: the final fraction of the run whose rate decays
    decay_shape: Literal["linear", "1-sqrt"] = "1-sqrt"  # wsd: the decay's shape
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0  # 0 disables clipping
    z_loss: float = 0.0  # weight of the auxiliary loss mean(log(Z)^2) on the output logits

    @property
    def floor(self) -> float:
        """The learning rate's floor as a fraction of lr: final_lr_ratio, or its default."""
        if self.final_lr_ratio is not None:
            return self.final_lr_ratio
        return 0.0 if self.schedule == "wsd" else 0.1


@dataclasses.dataclass(frozen=True)
class SpikeConfig:
    """Loss spikes (PaLM, Chowdhery et al. 2022): a step whose loss is non-finite or above `factor`
    times the median of the `window` steps before it rolls the run back to its last checkpoint
    and skips the batches from there through the spike's (at least `skip_batches`)."""

    factor: float = 0.0  # > 1; 0: only non-finite losses are spikes
    window: int = 32  # steps in the running median
    start_step: int = 100  # no `factor` spikes before this step: early losses jump about
    skip_batches: int = 0
    max_spikes: int = 0  # rollbacks allowed; one spike more stops the run (0: the first does)


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
    """A jax.profiler trace of `steps` training steps, the first of them step `start_step` + 1,
    written to RUN_DIR/plugins/profile (TensorBoard's profile plugin, XProf, Perfetto)."""

    start_step: int = 10  # the steps before it compile and warm up
    steps: int = 0  # 0: no trace


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    batch_size: int = 16  # global, in sequences
    micro_batches: int = 1  # gradient accumulation: the batch is split into this many parts
    seed: int = 0
    run_dir: str = "runs/default"
    log_every: int = 10
    progress: bool = True
    peak_flops: float = 0.0  # FLOP/s of all devices in use, for MFU; 0: data sheet or measured
    spikes: SpikeConfig = SpikeConfig()
    # a cooldown branch: start from step branch_step of the run in branch_from (its checkpoint
    # there), instead of from scratch, when this run has no checkpoint of its own
    branch_from: str = ""
    branch_step: int = 0
    # metrics rows gain max_attention_logit and output_logit_rms (computed in the step)
    log_stability: bool = False
    # where metrics and evaluations go: metrics.jsonl and eval.jsonl (the run's record: always
    # listed), TensorBoard event files in the run directory, Weights & Biases (lm.trackers)
    trackers: tuple[Literal["jsonl", "tensorboard", "wandb"], ...] = ("jsonl",)
    profile: ProfileConfig = ProfileConfig()


@dataclasses.dataclass(frozen=True)
class MixtureSource:
    source: str = ""  # as data.source: default, or files/globs
    weight: float = 1.0  # relative share of the training rows


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "default"  # default (the embedded corpus) | synthetic | files/globs, comma-separated
    seed: int | None = None  # the order of the training data; None: train.seed's
    # the validation set `val` from these files/globs, instead of holding out part of data.source
    val_source: str = ""
    # more validation sets, name -> files/globs: each evaluated and reported on its own
    val_sets: dict[str, str] = dataclasses.field(default_factory=dict)
    mixture: tuple[MixtureSource, ...] = ()  # train on these sources by weight, not data.source
    vocab_size: int | None = None  # tokenizer vocab; None: the model's
    seq_len: int | None = None  # None: the model's context
    tokenizer: Literal["bpe", "unigram"] = "bpe"  # SentencePiece model type
    text_field: str = "text"  # the document field of .jsonl lines, the text column of Parquet/Arrow
    cache_dir: str = "~/.cache/lm/data"  # prepared datasets, one directory per sources+settings
    tokenizer_sample_bytes: int = 10_000_000  # about this much text trains the tokenizer
    val_fraction: float = 0.02  # text held out for validation: whole documents, or spans in each
    val_sequences: int = 128  # size of the fixed validation set, in sequences of seq_len + 1
    on_bad_file: Literal["skip", "fail"] = "skip"  # a file that is not UTF-8 text: warn or stop
    max_bytes: int = 0  # >0: only the documents that start within this prefix of each source
    workers: int = 0  # encoding processes; 0: one per CPU

    @property
    def set_names(self) -> list[str]:
        """The validation sets' names, in the order they are evaluated: `val`, data.val_sets."""
        return ["val", *self.val_sets]

    def __hash__(self):  # as a frozen dataclass's, with the dict val_sets hashed as its items
        return hash(tuple(tuple(sorted(v.items())) if isinstance(v, dict) else v
                          for v in (getattr(self, f.name) for f in dataclasses.fields(self))))


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 0  # 0: only at the end (and on SIGTERM/SIGINT)
    keep: int = 3  # the newest K are kept ...
    keep_every: int = 0  # ... plus every M-th step, permanently (0: none)
    steps: tuple[int, ...] = ()  # ... plus these, saved and kept (cooldown branches start there)
    every_seconds: float = 0.0  # also save at the first log point this long after the last save


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    every_steps: int = 0  # evaluate the validation set during training every N steps (0: off)
    log_points: int = 0  # and/or at this many log-spaced steps: a learning curve per run
    batch_size: int = 0  # sequences per eval batch; 0: train.batch_size / micro_batches


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()

    @property
    def seq_len(self) -> int:
        return self.data.seq_len or self.model.context

    @property
    def vocab_size(self) -> int:
        """Tokens the data can contain (the model's table may be padded beyond it)."""
        return self.data.vocab_size or self.model.vocab_size

    @property
    def data_seed(self) -> int:
        """The seed of the training data's order: data.seed, else train.seed. Runs that share
        it see the same batches, whatever their models' seeds."""
        return self.train.seed if self.data.seed is None else self.data.seed

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one global batch, counted as targets (each sequence holds seq_len)."""
        return self.train.batch_size * self.seq_len


# --------------------------------------------------------------------------- loading


def find(name: str | Path) -> Path:
    """A config path, or the name of a preset in configs/ (`tiny` or `tiny.yaml`)."""
    path = Path(name)
    if path.is_file():
        return path
    preset = CONFIG_DIR / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if path.parent == Path(".") and preset.is_file():
        return preset
    presets = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config {str(name)!r} not found: give a YAML file or one of {presets}")


def read_yaml(path: Path, extending: tuple[Path, ...] = ()) -> dict:
    """A YAML mapping; a `base:` key names a file (or preset) it extends (`extending`: the
    files that extend this one, which it may not extend in turn)."""
    if path.resolve() in extending:
        chain = " -> ".join(str(p) for p in (*extending, path.resolve()))
        raise ConfigError(f"configs extend each other in a loop ({chain}); fix their `base:`")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML (UTF-8): {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: {base!r} must name a config (a preset or a file)")
    base_path = path.parent / f"{base}.yaml"
    return merge(read_yaml(base_path if base_path.is_file() else find(base),
                           (*extending, path.resolve())), raw)


class _Emptied(dict):
    """An override's mapping that began as `{}`: it replaces the one it meets, with whatever
    later overrides put into it (`'data.val_sets={}' data.val_sets.b=X`: b alone)."""


def merge(base: dict, update: dict) -> dict:
    """`update` over `base`: a mapping merges into the one it meets, key by key, except an
    empty one, which empties it (`data.val_sets={}` drops the file's validation sets)."""
    out = dict(base)
    for key, value in update.items():
        if (isinstance(value, dict) and value and not isinstance(value, _Emptied)
                and isinstance(out.get(key), dict)):
            out[key] = merge(out[key], value)
        else:
            out[key] = dict(value) if isinstance(value, dict) else value
    return out


def parse_overrides(overrides: list[str]) -> dict:
    """`["model.d_model=256", "train.steps=10"]` -> nested dict; values are parsed as YAML.
    Later overrides merge into earlier ones: `train.run_dir=X 'train={steps: 3}'` keeps X."""
    tree: dict = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or "" in key.split("."):
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError as e:
            value = _NotYAML(text)  # a string to a str key (a glob); the type check decides
            value.problem = str(getattr(e, "problem", None) or e)
        for part in reversed(key.split(".")):
            value = {part: value}
        _merge_override(tree, value, item)
    return tree


class _NotYAML(str):
    """An override's text that YAML could not read (`problem`: why), taken as a string."""

    problem = ""


# dumped as the string it is: trial.yaml, sweep.yaml and a run's config.yaml hold such overrides
yaml.SafeDumper.add_representer(_NotYAML, yaml.SafeDumper.represent_str)


def _merge_override(tree: dict, update: dict, item: str, prefix: str = "") -> None:
    for key, value in update.items():
        old = tree.get(key)
        if key in tree and isinstance(old, dict) != isinstance(value, dict):
            raise ConfigError(f"override {item!r} and an earlier one give {prefix}{key} both a "
                              "value and keys; a section takes keys (e.g. model.d_model=64)")
        if value == {}:  # empties the mapping, what earlier overrides put into it included
            tree[key] = _Emptied()
        elif isinstance(value, dict):  # key by key, so that a {} inside is seen
            _merge_override(tree.setdefault(key, {}), value, item, f"{prefix}{key}.")
        else:
            tree[key] = value


def load(name: str | Path | None = None, overrides: list[str] = ()) -> Config:
    raw = read_yaml(find(name)) if name is not None else {}
    return from_dict(merge(raw, parse_overrides(list(overrides))))


def from_dict(raw: dict) -> Config:
    cfg = build(Config, raw)
    check(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def replace(cfg: Config, **sections: dict) -> Config:
    """A copy with some keys changed, e.g. replace(cfg, train={"steps": 5}); re-checked."""
    return from_dict(merge(to_dict(cfg), sections))


def build(cls, raw, prefix: str = ""):
    """An instance of dataclass `cls` from a nested mapping: unknown keys and wrong types are
    ConfigErrors naming the dotted key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields), key=str)  # YAML keys may be numbers
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]}; valid keys in "
            f"{prefix.rstrip('.') or 'the top level'}: {sorted(fields)}"
        )
    hints = typing.get_type_hints(cls)
    return cls(**{name: _coerce(value, hints[name], prefix + name) for name, value in raw.items()})


def _coerce(value, kind, key: str):
    """`value` as type `kind`, or a ConfigError naming `key`."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}={value!r} is not valid; choose one of {list(args)}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if dataclasses.is_dataclass(kind):  # a section, or an entry of data.mixture
        return build(kind, value, key + ".")
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if (kind is dict or origin is dict) and isinstance(value, dict):
        if not args:
            return dict(value)
        return {_coerce(k, args[0], key): _coerce(v, args[1], f"{key}.{k}")
                for k, v in value.items()}
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and not isinstance(value, bool):
        try:  # YAML reads `1e-3` as a string
            out = float(value)
        except (TypeError, ValueError):
            pass
        else:
            if not math.isfinite(out):
                raise ConfigError(f"{key}={value!r} is not valid: a finite number")
            return out
    if kind is str and isinstance(value, str):
        return value
    expected = f"a list, e.g. [{_example(args[0])}]" if origin is tuple else getattr(
        kind, "__name__", kind)
    quote = (f" (YAML read the value as a {type(value).__name__}: quote it)"
             if kind is str and isinstance(value, (int, float, bool, datetime.date)) else
             f" (nor is it YAML: {value.problem}; check its brackets and quotes)"
             if isinstance(value, _NotYAML) else "")
    raise ConfigError(f"{key}={value!r} has the wrong type; expected {expected}{quote}")


def _example(kind) -> str:
    return {int: "0, 1", float: "1.0e6, 2.0e6"}.get(kind, "...")


# --------------------------------------------------------------------------- checks


def _require(ok: bool, key: str, value, valid: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not valid: {valid}")


def check(cfg: Config) -> None:
    """Checks that need no devices: shapes and settings that can never work."""
    for part in (_check_model, _check_data, _check_train, _check_optim, _check_branch,
                 _check_saves_and_mesh):
        part(cfg)


def _check_model(cfg: Config) -> None:
    m = cfg.model
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "context",
                "rope_theta", "norm_eps"):
        _require(getattr(m, key) > 0, f"model.{key}", getattr(m, key), "must be positive")
    _require(m.d_model % m.n_heads == 0, "model.d_model", m.d_model,
             f"must be divisible by model.n_heads={m.n_heads}")
    _require(m.head_dim % 2 == 0, "model.d_model", m.d_model,
             f"d_model / n_heads = {m.head_dim} must be even for rotary embeddings")
    _require(m.n_heads % m.n_kv_heads == 0, "model.n_kv_heads", m.n_kv_heads,
             f"must divide model.n_heads={m.n_heads}")
    _require(m.loss_chunk >= 0, "model.loss_chunk", m.loss_chunk, "0 (off) or a positive chunk")
    _require(m.parametrization == "sp" or m.base_width > 0, "model.base_width", m.base_width,
             "model.parametrization=mup needs the width its hyperparameters were tuned at, "
             "e.g. model.base_width=32")
    _require(cfg.seq_len <= m.context, "data.seq_len", cfg.seq_len,
             f"must not exceed model.context={m.context}")
    _require(cfg.seq_len > 0, "data.seq_len", cfg.seq_len, "must be positive")
    _require(cfg.vocab_size <= m.vocab_size, "data.vocab_size", cfg.vocab_size,
             f"must not exceed model.vocab_size={m.vocab_size} (the embedding table)")


def _check_data(cfg: Config) -> None:
    d = cfg.data
    _require(d.vocab_size is None or d.vocab_size > 0, "data.vocab_size", d.vocab_size,
             "must be positive (or null: model.vocab_size)")
    _require(d.source.strip(" ,") != "", "data.source", d.source,
             "give synthetic, default, or comma-separated files/globs")
    _require(d.source == "synthetic" or cfg.vocab_size > 258, "data.vocab_size", cfg.vocab_size,
             "a SentencePiece vocab needs 258 pieces (256 bytes, <unk>, end-of-document) plus "
             "the corpus's characters; try 512")
    _check_sources(d)
    _require(d.text_field != "", "data.text_field", d.text_field,
             "must name a .jsonl field or a Parquet/Arrow column")
    _require(d.cache_dir != "", "data.cache_dir", d.cache_dir, "must name a directory")
    _require(d.tokenizer_sample_bytes > 0, "data.tokenizer_sample_bytes",
             d.tokenizer_sample_bytes, "must be positive")
    _require(0 < d.val_fraction < 1, "data.val_fraction", d.val_fraction, "must be in (0, 1)")
    _require(d.val_sequences > 0, "data.val_sequences", d.val_sequences, "must be positive")
    _require(d.max_bytes >= 0, "data.max_bytes", d.max_bytes, "must be >= 0 (0: all)")
    _require(d.workers >= 0, "data.workers", d.workers, "must be >= 0 (0: one per CPU)")


def _check_train(cfg: Config) -> None:
    t = cfg.train
    _require(t.run_dir.strip() != "", "train.run_dir", t.run_dir,
             "must name the run's directory, e.g. runs/my-run")
    for key in ("steps", "batch_size", "micro_batches", "log_every"):
        _require(getattr(t, key) > 0, f"train.{key}", getattr(t, key), "must be positive")
    _require(t.peak_flops >= 0, "train.peak_flops", t.peak_flops,
             "must be >= 0 (0: the data sheet's, or measured on CPU)")
    for key, seed in (("train.seed", t.seed), ("data.seed", cfg.data.seed or 0)):
        _require(0 <= seed < 2**32, key, seed, "must be in [0, 2^32): it seeds uint32 keys")
    _require(t.batch_size % t.micro_batches == 0, "train.micro_batches", t.micro_batches,
             f"must divide train.batch_size={t.batch_size}")
    _require("jsonl" in t.trackers and len(set(t.trackers)) == len(t.trackers), "train.trackers",
             list(t.trackers), "list each tracker once, jsonl among them: metrics.jsonl is the "
             "run's record, which resuming and sweeps read")
    for key in ("start_step", "steps"):
        _require(getattr(t.profile, key) >= 0, f"train.profile.{key}", getattr(t.profile, key),
                 "must be >= 0 (steps=0: no trace)")
    s = t.spikes
    _require(s.factor == 0 or s.factor > 1, "train.spikes.factor", s.factor,
             "0 (only non-finite losses are spikes) or > 1")
    _require(s.window > 0, "train.spikes.window", s.window, "must be positive")
    for key in ("start_step", "skip_batches", "max_spikes"):
        _require(getattr(s, key) >= 0, f"train.spikes.{key}", getattr(s, key), "must be >= 0")
    _require(not s.max_spikes or cfg.checkpoint.every_steps > 0, "train.spikes.max_spikes",
             s.max_spikes, "rolling back needs checkpoints: set checkpoint.every_steps")


def _check_optim(cfg: Config) -> None:
    o, t = cfg.optim, cfg.train
    _require(o.clip_norm >= 0, "optim.clip_norm", o.clip_norm, "must be >= 0 (0 disables)")
    _require(o.z_loss >= 0, "optim.z_loss", o.z_loss, "must be >= 0 (0: off; 1e-4 is usual)")
    _require(o.lr > 0, "optim.lr", o.lr, "must be positive")
    for key in ("b1", "b2"):  # AdamW's moment decays: 1 never forgets, above it diverges
        _require(0 <= getattr(o, key) < 1, f"optim.{key}", getattr(o, key), "must be in [0, 1)")
    _require(o.eps > 0, "optim.eps", o.eps, "must be positive")
    _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0")
    _require(o.final_lr_ratio is None or 0 <= o.final_lr_ratio <= 1, "optim.final_lr_ratio",
             o.final_lr_ratio, "must be in [0, 1]")
    _require(0 < o.decay_fraction <= 1, "optim.decay_fraction", o.decay_fraction,
             "must be in (0, 1]")
    _require(o.schedule != "wsd" or o.warmup_steps <= t.steps - round(o.decay_fraction * t.steps),
             "optim.warmup_steps", o.warmup_steps, "must end before the wsd decay starts (at "
             f"{t.steps - round(o.decay_fraction * t.steps)}); lower it or optim.decay_fraction")


def _check_branch(cfg: Config) -> None:
    """After the schedule's own checks, which name the setting a branch step derives from."""
    t = cfg.train
    _require((t.branch_step > 0) == bool(t.branch_from) and t.branch_step < t.steps,
             "train.branch_step", t.branch_step, "a branch needs both train.branch_from (a run "
             "directory) and a branch_step below train.steps")


def _check_saves_and_mesh(cfg: Config) -> None:
    t = cfg.train
    _require(cfg.checkpoint.every_seconds >= 0, "checkpoint.every_seconds",
             cfg.checkpoint.every_seconds, "must be >= 0 (0: off)")
    for step in cfg.checkpoint.steps:
        _require(0 < step <= t.steps, "checkpoint.steps", list(cfg.checkpoint.steps),
                 f"must be steps within 1..train.steps={t.steps}")
    for section, keys in (("checkpoint", ("every_steps", "keep_every")),
                          ("eval", ("every_steps", "log_points"))):
        for key in keys:
            value = getattr(getattr(cfg, section), key)
            _require(value >= 0, f"{section}.{key}", value, "must be >= 0 (0: off)")
    _require(cfg.eval.batch_size >= 0, "eval.batch_size", cfg.eval.batch_size,
             "must be >= 0 (0: the training micro-batch)")
    _require(cfg.checkpoint.keep > 0, "checkpoint.keep", cfg.checkpoint.keep, "must be positive")
    mesh = cfg.mesh
    for key in ("replica", "data", "model"):
        size = getattr(mesh, key)
        _require(size == -1 or size > 0, f"mesh.{key}", size, "must be positive or -1 (fill)")
    _require([mesh.replica, mesh.data, mesh.model].count(-1) <= 1, "mesh", mesh,
             "at most one of replica, data, model may be -1")


def _check_sources(d: DataConfig) -> None:
    """data.val_source, data.val_sets and data.mixture: real text, named and weighted sensibly."""
    files = "default or comma-separated files/globs"
    real = {f"data.val_sets.{name}": spec for name, spec in d.val_sets.items()}
    real |= {f"data.mixture[{i}].source": m.source for i, m in enumerate(d.mixture)}
    if d.val_source:
        real["data.val_source"] = d.val_source
    for key, spec in real.items():
        _require(spec.strip(" ,") not in ("", "synthetic"), key, spec, f"give {files}")
        _require(d.source != "synthetic", "data.source", d.source,
                 f"synthetic data has no text to validate or mix with; drop {key}")
    for name in d.val_sets:
        _require(re.fullmatch(r"[\w-]+", name) is not None and name != "val",
                 f"data.val_sets.{name}", d.val_sets[name], "name it with letters, digits, _ or - "
                 "and not `val` (the default set's name; data.val_source replaces that)")
    if not d.mixture:
        return
    _require(d.source == "default", "data.source", d.source,
             "data.mixture names the training sources; drop data.source (or data.mixture)")
    for i, m in enumerate(d.mixture):
        _require(m.weight >= 0, f"data.mixture[{i}].weight", m.weight, "must be >= 0")
        _require(m.source not in [n.source for n in d.mixture[:i]], f"data.mixture[{i}].source",
                 m.source, "is already in data.mixture; give each source once")
    _require(sum(m.weight for m in d.mixture) > 0, "data.mixture", [m.weight for m in d.mixture],
             "the weights are all 0: give at least one source a positive weight")


def eval_batch_size(cfg: Config) -> int:
    return cfg.eval.batch_size or cfg.train.batch_size // cfg.train.micro_batches


def attention_path(attention: str, platform: str) -> str:
    """model.attention as it runs on `platform`: `auto` is einsum on CPU, where the kernels'
    written-out backward passes were measured faster (lm.ops), dot_product elsewhere."""
    if attention != "auto":
        return attention
    return "einsum" if platform == "cpu" else "dot_product"


def check_devices(cfg: Config, n_devices: int) -> dict[str, int]:
    """The mesh sizes of `cfg` on `n_devices`, once the mesh and the training batch fit them."""
    sizes = mesh_shape(cfg, n_devices)
    check_train_batch(cfg, sizes)
    return sizes


def check_train_batch(cfg: Config, sizes: dict[str, int]) -> None:
    """Training shards each micro-batch over replica*data (evaluating a run on another mesh
    needs only its eval batch to divide)."""
    t, batch_shards = cfg.train, sizes["replica"] * sizes["data"]
    micro = t.batch_size // t.micro_batches
    _require(micro % batch_shards == 0, "train.batch_size", t.batch_size,
             f"batch_size / micro_batches = {micro} must be divisible by "
             f"replica*data = {batch_shards}")


def mesh_shape(cfg: Config, n_devices: int) -> dict[str, int]:
    """The (replica, data, model) sizes for `n_devices`, with -1 filled in, checked against
    the device count, the model's shapes and the eval batch."""
    mesh, m, t = cfg.mesh, cfg.model, cfg.train
    sizes = {"replica": mesh.replica, "data": mesh.data, "model": mesh.model}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    for axis, size in sizes.items():
        if size == -1:
            _require(n_devices % fixed == 0, f"mesh.{axis}", -1,
                     f"the other axes use {fixed} devices, which does not divide the "
                     f"{n_devices} available; give the other axes sizes that do (e.g. "
                     f"mesh.model=1), or use --cpu-devices {fixed} on a CPU")
            sizes[axis] = n_devices // fixed
    total = math.prod(sizes.values())
    _require(total == n_devices, "mesh", sizes,
             f"replica*data*model = {total} but there are {n_devices} devices; "
             f"set one axis to -1 to fill, or use --cpu-devices {total} on a CPU")
    model = sizes["model"]
    for key in ("n_heads", "n_kv_heads", "d_ff", "vocab_size"):
        _require(getattr(m, key) % model == 0, f"model.{key}", getattr(m, key),
                 f"must be divisible by mesh.model={model}")
    batch_shards = sizes["replica"] * sizes["data"]
    follows = cfg.eval.batch_size == 0  # the eval batch is the training batch
    _require(eval_batch_size(cfg) % batch_shards == 0,
             "train.batch_size" if follows else "eval.batch_size", eval_batch_size(cfg),
             f"must be divisible by replica*data = {batch_shards}"
             + (" (it is the eval batch too, while eval.batch_size=0: to evaluate on this "
                f"mesh, set eval.batch_size to a multiple of {batch_shards})" if follows else ""))
    if mesh.fsdp:
        _require(m.d_model % sizes["data"] == 0, "model.d_model", m.d_model,
                 f"with mesh.fsdp, must be divisible by mesh.data={sizes['data']}")
    return sizes
