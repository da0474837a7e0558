"""The `lm` command. JAX is imported only after `--cpu-devices` has set XLA_FLAGS, and used only
after the process has joined a multi-process run (`--coordinator` ..., `--distributed`)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import warnings
from pathlib import Path

from lm.devices import keep_freed_memory, simulate_cpu_devices
from lm.errors import ConfigError, LMError


def _use_cpu_devices(n: int | None) -> None:
    """Simulate `n` CPU devices; must run before jax is imported."""
    if not n:
        return
    if sys.modules.get("jax") is not None:
        import jax

        if jax.device_count() != n:
            raise ConfigError(f"--cpu-devices {n} came after jax started with "
                              f"{jax.device_count()} devices")
        return
    simulate_cpu_devices(n)


def _join_processes(args) -> None:
    """Join a multi-process run (jax.distributed) before JAX computes anything: with the given
    coordinator, process count and index, or with what JAX detects on Cloud TPU, SLURM or Open
    MPI (`--distributed`). Between processes on CPU, collectives go over gloo."""
    given = (args.coordinator, args.num_processes, args.process_id)
    if not args.distributed and given == (None, None, None):
        return
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(*given)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"cannot join the multi-process run ({e}); outside Cloud TPU, "
                          "SLURM and Open MPI give --coordinator HOST:PORT --num-processes P "
                          "--process-id I") from None


class _Progress(logging.Handler):
    """Log records on stderr, written through tqdm so that they never break a progress bar;
    in a multi-process run, by process 0 only."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        if sys.modules.get("jax") is not None:
            import jax

            if jax.process_index() != 0:
                return
        tqdm.write(self.format(record), file=sys.stderr)


@contextlib.contextmanager
def _log_to_stderr():
    """While a command runs: lm's INFO records on stderr, and not again through the root
    logger's handlers (orbax installs one when imported); of absl's (orbax's), errors only:
    its warnings narrate routine reads ("Given directory is read only") that lm reports
    itself."""
    logger, absl = logging.getLogger("lm"), logging.getLogger("absl")
    handler, before = _Progress(), (logger.level, logger.propagate, absl.level)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    absl.setLevel(logging.ERROR)
    shown = warnings.formatwarning  # lm's own warnings are for the user, not a source line
    warnings.formatwarning = lambda message, category, filename, *where: (
        f"warning: {message}\n" if Path(filename).is_relative_to(Path(__file__).parent)
        else shown(message, category, filename, *where))
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.level, logger.propagate, absl.level = before
        warnings.formatwarning = shown


# --------------------------------------------------------------------------- commands


def cmd_train(args) -> int:
    from lm import config, train
    from lm.processes import is_primary

    cfg = config.load(args.config, args.overrides)
    row = train.train(cfg)
    if is_primary():
        loss = f", loss {row['loss']:.4f}" if "loss" in row else ""  # no metrics.jsonl left
        print(f"done: step {row.get('step', cfg.train.steps)}{loss}; run dir {cfg.train.run_dir}")
    return 0


def cmd_info(args) -> int:
    import jax

    from lm import config, flops, sharding

    cfg = config.load(args.config, args.overrides)
    sizes = config.check_devices(cfg, jax.device_count())
    table = sharding.rules(cfg.mesh.fsdp)
    params = [{"name": name, "shape": list(p.shape), "axes": list(p.axes),
               "spec": str(sharding.spec(p.axes, table))}
              for name, p in flops.parameters(cfg.model).items()]
    counts = flops.param_counts(cfg.model)
    info = {"params_total": counts["total"], "params_non_embedding": counts["non_embedding"],
            "params_embedding": counts["embedding"], "mesh": sizes,
            "train_flops_per_token": flops.train_flops_per_token(cfg.model, cfg.seq_len),
            "params": params}
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"parameters: {counts['total']:,} total, {counts['non_embedding']:,} non-embedding")
    print(f"mesh: {sizes}   training FLOPs/token: {info['train_flops_per_token']:.4g}")
    width = max(len(p["name"]) for p in params)
    for p in params:
        print(f"  {p['name']:<{width}}  {str(tuple(p['shape'])):<24} "
              f"{str(tuple(p['axes'])):<40} {p['spec']}")
    return 0


def cmd_data(args) -> int:
    from lm import config, corpus, data

    cfg = config.load(args.config, args.overrides)
    dataset = corpus.prepare(cfg)
    m = dataset.manifest
    print(f"dataset   {dataset.dir}")
    lines = sum(s.get("lines", 0) for s in m["skipped"])
    print(f"source    {m['source']}: {m['files']} files used, "
          f"{sum(not s.get('lines') for s in m['skipped'])} skipped"
          + (f", {lines} lines of .jsonl files skipped" if lines else ""))
    print(f"tokenizer {m['settings']['tokenizer']}, {m['vocab_size']} pieces, "
          f"{m['dtype']} token files, prepared in {m['prepare_seconds']:.1f} s")
    for split, s in m["splits"].items():
        print(f"{split:<9} {s['documents']:>9,} documents {s['bytes']:>15,} bytes "
              f"{s['tokens']:>15,} tokens {s['bytes_per_token']:>7.3f} bytes/token")
    # what evaluation will read, drawn now: a set too short for a sequence fails here, not at
    # the end of a run's first evaluation interval
    for name, v in data.validation_sets(cfg).items():
        print(f"eval {name:<4} {len(v.rows):>9,} sequences of {v.rows.shape[1] - 1} tokens, "
              f"{v.bytes_per_token:.3f} bytes/token")
    return 0


def cmd_eval(args) -> int:
    from lm import evaluate

    rows = evaluate.evaluate_run(args.run_dir, args.overrides, step=args.step, every=args.all)
    if not rows:
        print(f"every checkpoint of {args.run_dir} is evaluated already (see eval.jsonl)")
        return 0
    width = max(len("set"), *(len(r["set"]) for r in rows))
    print(f"{'step':>8} {'set':<{width}} {'tokens':>12} {'loss':>8} {'± sem':>8} {'ppl':>9} "
          f"{'bpb':>7}")
    for r in rows:
        bpb = f"{r['bpb']:.4f}" if r["bpb"] is not None else "-"
        print(f"{r['step']:>8} {r['set']:<{width}} {r['tokens']:>12,} {r['loss']:>8.4f} "
              f"{r['loss_sem'] or 0:>8.4f} {r['ppl']:>9.2f} {bpb:>7}")
    return 0


def cmd_sample(args) -> int:
    from lm import checkpoint, corpus, evaluate, rundir, state
    from lm.errors import CheckpointError

    cfg = rundir.load_config(args.run_dir, args.overrides)
    tokenizer = corpus.tokenizer(cfg)
    rundir.bind_data(Path(args.run_dir), corpus.identity(cfg), training=False)
    prompt = tokenizer.encode(args.prompt)
    max_tokens = evaluate.sample_length(cfg, prompt, args.max_tokens)  # before the restore
    lay = state.layout(cfg)
    mngr = checkpoint.manager(args.run_dir, read_only=True)
    restored = checkpoint.restore_latest(mngr, lay.abstract, lay.shardings, ("params",))
    if restored is None:
        raise CheckpointError(f"no checkpoints in {checkpoint.directory(args.run_dir)}")
    tokens = evaluate.generate(lay, restored[0]["params"], prompt, max_tokens,
                               args.temperature, args.top_k, args.seed)
    print(tokenizer.decode(tokens))
    return 0


def cmd_export(args) -> int:
    from lm import export

    done = export.export_hf(args.run_dir, args.out, args.step, args.overrides, args.max_shard_gb)
    tokenizer = "" if done["tokenizer"] else "; no tokenizer: the run trained on synthetic tokens"
    print(f"exported step {done['step']} of {args.run_dir} ({done['parameters']:,} parameters) "
          f"as {done['architecture']} to {done['out']}: {', '.join(done['files'])}{tokenizer}")
    return 0


def cmd_sweep(args) -> int:
    from lm import runner

    spec, o = args.spec, args.overrides
    if args.json and not args.status:
        raise ConfigError("--json is --status's output; give --status --json")
    if args.plan:
        print(runner.plan_text(spec, args.cpu_devices, o, args.store))
    elif args.status:
        rows = runner.status(spec, args.store, o)
        print(json.dumps(rows) if args.json else runner.status_text(spec, args.store, o))
    elif args.rebuild_store:
        print(runner.rebuild_store(spec, args.store, o))
    elif args.worker:
        runner.work(spec, args.store, args.stale_after, o)
    else:
        runner.run(spec, workers=args.workers, cpu_devices=args.cpu_devices, url=args.store,
                   stale_s=args.stale_after, overrides=o, retry_failed=args.retry_failed)
    return 0


def _fit_settings(args) -> None:
    """Fill the fit settings not given: a sweep's own (the `fit` of the sweep.yaml beside its
    store, as its report used them), else the spec's defaults."""
    from lm import spec

    defaults = dataclasses.asdict(spec.FitSpec())
    source = Path(args.source)
    path = (source.parent if source.suffix == ".sqlite" else source) / "sweep.yaml"
    own = _fit_section(path) if path.is_file() else {}
    missing = [k for k in defaults if getattr(args, k, "") is None]  # the spec's `fit` keys
    for key in missing:
        setattr(args, key, own.get(key, defaults[key]))
    if args.min_tokens_per_param is None:  # the law's own
        from lm import scaling

        args.min_tokens_per_param = scaling.tokens_per_param_floor(args.law)
    if own and missing:
        print(f"fit settings of {path}: " + ", ".join(f"{k}={getattr(args, k)}"
                                                      for k in missing))


def _fit_section(path: Path) -> dict:
    """The `fit` settings of a sweep's own sweep.yaml."""
    import yaml

    try:
        fit = (yaml.safe_load(path.read_text()) or {}).get("fit") or {}
        if not isinstance(fit, dict):
            raise ValueError(f"`fit` is {fit!r}, not a mapping")
    except (yaml.YAMLError, ValueError, AttributeError) as e:
        raise ConfigError(f"{path}: the sweep's spec as it ran, but its fit settings cannot "
                          f"be read ({' '.join(str(e).split())}); repair it") from None
    return fit


def holdout_names(value: str, runs: set[str]) -> list[str]:
    """--holdout's runs: comma-separated names, or one run's whole name that holds commas."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    if value not in runs:
        return names
    if len(names) > 1 and all(name in runs for name in names):
        raise ConfigError(f"--holdout {value!r} is one run's name and also a list of runs "
                          f"({', '.join(names)}); hold them out by --holdout-above, or rename")
    return [value]


def _a_fit_file(path: Path) -> bool:
    """Whether `path` holds a fit.json (not a prediction.json, which also holds a fit)."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(raw, dict) and {"law", "objective"} <= raw.keys() and "runs" not in raw


def cmd_fit(args) -> int:
    from lm import backtest, scaling, store

    _fit_settings(args)
    points, designated = store.load_points(args.source, args.ignore_columns, args.metric,
                                           args.params)
    out = Path(args.out)
    if not out.parent.is_dir():  # before the fit, whose bootstrap may take minutes
        raise ConfigError(f"--out {out}: no directory {out.parent}; create it first")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give a file, e.g. {out / 'fit.json'}")
    if out.exists() and out.stat().st_size and not _a_fit_file(out):
        raise ConfigError(f"--out {out} exists and is not a fit lm wrote (lm fit replaces only "
                          "its own fit.json files: not its data, not a registered prediction); "
                          "give another path")
    holdout = {"designated": designated, "none": None}.get(args.holdout, args.holdout)
    if isinstance(holdout, str) and holdout != "largest":
        holdout = holdout_names(holdout.strip(), set(points.run.tolist()))
        if not holdout:
            raise ConfigError(f"--holdout {args.holdout!r} names no run; give run names "
                              "(comma-separated), `largest`, or leave --holdout out")
    options = {"holdout": holdout or None, "holdout_above": args.holdout_above,
               "drop_early": args.drop_early, "min_tokens_per_param": args.min_tokens_per_param,
               "loss": args.loss, "huber_delta": args.huber_delta}
    result = scaling.fit(points, args.law, **options, bootstrap=args.bootstrap, seed=args.seed)
    result = dataclasses.replace(result, n_counted=args.params)
    written = result.to_json()
    summary = scaling.format_fit(result)
    if result.holdout:  # the same reach, tried on the fitting runs
        tried = backtest.farthest(result, points, [r.compute_ratio for r in result.holdout])
        written["backtest"] = dataclasses.asdict(tried)
        summary += "\n  " + backtest.describe(tried)
    if spread := backtest.other_law(result, points, **options):
        written["law_spread"] = dataclasses.asdict(spread)
        summary += "\n  " + backtest.describe_spread(spread)
    out.write_text(json.dumps(written, indent=1))
    print(summary)
    print(f"wrote {args.out}")
    return 0


def cmd_predict(args) -> int:
    from lm import scaling
    from lm.errors import FitError
    from lm.points import FLOPS_OVER_6ND

    pair = args.params is not None and args.tokens is not None
    if not pair and (args.flops is None or args.params is not None or args.tokens is not None):
        raise ConfigError("give --params N --tokens D (and --flops C, that run's exact FLOPs, "
                          "if known), or --flops C alone")
    given = (args.params, args.tokens, args.flops)
    valid = all(v is not None and 0 < v < float("inf") for v in given)  # else predict says so
    ratio = args.flops / (6 * args.params * args.tokens) if valid else 1.0
    if not FLOPS_OVER_6ND[0] <= ratio <= FLOPS_OVER_6ND[1]:
        raise ConfigError(f"--flops {args.flops:g} is {ratio:.3g} x 6ND of --params "
                          f"{args.params:g} --tokens {args.tokens:g}: not that run's FLOPs; "
                          "check the numbers, or leave --flops out")
    try:
        raw = json.loads(Path(args.fit).read_text())
    except (OSError, ValueError) as e:
        raise FitError(f"{args.fit}: cannot be read as a fit.json ({e})") from None
    if isinstance(raw, dict) and {"runs", "fit"} <= raw.keys():  # a sweep's prediction.json
        print(f"the fit registered in {args.fit}")
        raw = raw["fit"]
    fit = scaling.Fit.from_json(raw, args.fit)
    pred = scaling.predict(fit, params=args.params, tokens=args.tokens, flops=args.flops)
    if fit.n_counted != "total":
        print(f"N counts {scaling.N_COUNTS[fit.n_counted]}, as in {args.fit}")
    print(scaling.format_prediction(pred))
    flops = pred["flops"]  # every query's compute, given or from the fit's FLOPs per token
    largest = max(flops if isinstance(flops, list) else [flops])
    # an older fit.json does not say how far its runs went: any query may be beyond them
    reach = largest / fit.max_fit_flops if fit.max_fit_flops else float("inf")
    beyond = reach > 1
    if 1 < reach < float("inf"):
        print(f"up to {reach:.3g}x the largest fitting run's compute ({fit.max_fit_flops:.3g} "
              "FLOPs): the farther, the more it rests on the law's form")
    if fit.allocation.note == scaling.ONE_LADDER and args.params is not None:
        off = scaling.off_ladder(fit, args.params, args.tokens)
        where = "" if off is None else (
            f": D={args.tokens:g} is {off:.3g}x the D that line gives for "
            f"N={args.params:g}, " + ("off it" if abs(math.log(off)) > scaling.ND_SPREAD_MIN
                                      else "on it"))
        print(f"WARNING {scaling.ONE_LADDER}; predictions hold along that line only{where}")
    if fit.law == "kaplan" and args.params is not None:
        print("kaplan's L(C) is the compute-efficient frontier: the loss above is the best a run "
              "of this compute reaches, not this N and D's")
    if "run_interval" in pred and fit.misfit is None and beyond:  # what the interval leaves out
        print("the law's misfit on its own runs is not in this fit (lm fit says why): the "
              "interval for an actual run beyond the fitting runs holds the law's sampling "
              "error and a run's noise only")
    return 0


# --------------------------------------------------------------------------- parser


def _at_least(kind: type, low: float, high: float = float("inf")):
    """An argparse type: a number of `kind` from `low` to `high` (a usage error otherwise;
    inf is one where `high` allows it: --stale-after inf never reclaims)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not low <= value <= high:  # also refuses nan
            span = f">= {low}" if high == float("inf") else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"{text} is not a number {span}")
        return value

    return parse


def parser() -> argparse.ArgumentParser:
    """The `lm` command line: the run commands here, the study's in functions of their own."""
    common = argparse.ArgumentParser(add_help=False)
    # (XLA's CPU client starts threads per device: 2048 took minutes, 4096 never came up)
    common.add_argument("--cpu-devices", type=_at_least(int, 1, 1024), metavar="N",
                        help="simulate N CPU devices (e.g. 8 for a 2x4 mesh on a laptop; "
                        "in a multi-process run, N per process; at most 1024)")
    processes = argparse.ArgumentParser(add_help=False)
    group = processes.add_argument_group(
        "multi-process runs", "one process per host; every process runs the same command")
    env = os.environ.get
    group.add_argument("--coordinator", metavar="HOST:PORT", default=env("LM_COORDINATOR"),
                       help="process 0's address, where the others find it (env LM_COORDINATOR)")
    group.add_argument("--num-processes", type=int, metavar="P",
                       default=env("LM_NUM_PROCESSES"),
                       help="how many processes there are (env LM_NUM_PROCESSES)")
    group.add_argument("--process-id", type=int, metavar="I", default=env("LM_PROCESS_ID"),
                       help="this process's index, 0 .. P-1 (env LM_PROCESS_ID)")
    group.add_argument("--distributed", action="store_true",
                       help="join a multi-process run, detecting what is not given (Cloud TPU, "
                       "SLURM, Open MPI)")
    top = argparse.ArgumentParser(prog="lm", description=__doc__)
    top.set_defaults(coordinator=None, num_processes=None, process_id=None, distributed=False)
    sub = top.add_subparsers(dest="command", required=True)

    def command(name, func, help, first="config"):
        p = sub.add_parser(name, parents=[common, processes], help=help, description=help)
        if first == "action":
            p.add_argument("action", choices=["prepare"])
        if first == "run_dir":
            p.add_argument("run_dir", help="a run directory (the train.run_dir of a run)")
        else:
            p.add_argument("config", help="YAML file or preset name in configs/ (e.g. tiny)")
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="dotted overrides, e.g. train.steps=100 mesh.model=2")
        p.set_defaults(func=func)
        return p

    command("train", cmd_train, "train a model into train.run_dir (resumes if it has checkpoints)")
    command("info", cmd_info, "parameter counts and per-parameter sharding").add_argument(
        "--json", action="store_true", help="print one JSON object")
    command("data", cmd_data, "prepare a config's dataset (tokenizer, token files) or reuse the "
            "prepared copy", first="action")
    p = command("eval", cmd_eval, "evaluate checkpoints of a run on the current mesh; rows are "
                "appended to RUN_DIR/eval.jsonl", first="run_dir")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, help="this checkpoint (default: the newest)")
    which.add_argument("--all", action="store_true", help="every checkpoint not yet evaluated")
    p = command("sample", cmd_sample, "generate text from a run's newest checkpoint",
                first="run_dir")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=_at_least(int, 1),
                   help="default: as many as the context leaves after the prompt")
    p.add_argument("--temperature", type=_at_least(float, 0), default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=_at_least(int, 0), default=0, help="0: the whole vocabulary")
    p.add_argument("--seed", type=_at_least(int, 0, 2**32 - 1), default=0)
    p = command("export", cmd_export, "write a checkpoint as a Hugging Face model directory "
                "(safetensors, config.json, tokenizer) for transformers and lm-evaluation-harness",
                first="run_dir")
    p.add_argument("--step", type=int, help="this checkpoint (default: the newest)")
    p.add_argument("--format", choices=["hf"], default="hf",
                   help="hf: transformers' LlamaForCausalLM (Qwen3ForCausalLM with qk_norm)")
    p.add_argument("--out", required=True, help="a new or empty directory")
    p.add_argument("--max-shard-gb", type=_at_least(float, 1e-9), default=5.0, metavar="GB",
                   help="split the weights into safetensors files of at most this size")

    _add_sweep(sub, common)
    _add_fit(sub)
    _add_predict(sub)
    return top


def _add_sweep(sub, common) -> None:
    p = sub.add_parser("sweep", parents=[common], help="run a scaling sweep, fit, predict, report",
                       description="train every trial of a sweep (resuming), fit the law, "
                       "predict the held-out run before training it, and write a report")
    p.add_argument("spec", help="sweep YAML (see experiments/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides of the spec, e.g. seed=1 (another study, in "
                   "SWEEP_DIR-seed1) or recipe.lr=3e-3")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--plan", action="store_true", help="list trials, FLOPs, estimated time")
    mode.add_argument("--status", action="store_true", help="show progress")
    mode.add_argument("--worker", action="store_true",
                      help="be one more worker of a running sweep (any machine; with --store)")
    mode.add_argument("--rebuild-store", action="store_true",
                      help="rebuild a damaged or lost store from the trials' run directories")
    mode.add_argument("--retry-failed", action="store_true",
                      help="run the sweep, training again the trials that failed for good "
                      "(after fixing what made them fail)")
    p.add_argument("--workers", type=_at_least(int, 1), default=2,
                   help="worker processes, each training trials one after another")
    p.add_argument("--store", metavar="URL",
                   help="the sweep's store: a SQLite file (default: SWEEP_DIR/store.sqlite) or "
                   "postgresql://user:password@host:port/database, shared by many machines")
    p.add_argument("--stale-after", type=_at_least(float, 1), default=120, metavar="S",
                   help="a worker not heard of for S seconds has died: its trial is taken over")
    p.add_argument("--json", action="store_true", help="with --status: one JSON list")
    p.set_defaults(func=cmd_sweep)


def _add_fit(sub) -> None:
    p = sub.add_parser("fit", help="fit a scaling law to a sweep store or a CSV",
                       description="fit a scaling law to a sweep (its directory, store.sqlite or "
                       "a postgresql:// URL) or a CSV with columns params, tokens, loss [, flops, "
                       "run, step, annealed]")
    p.add_argument("source")
    p.add_argument("--law", choices=["chinchilla", "kaplan-nd", "kaplan", "isoflop"],
                   help="default: a sweep directory's own (its sweep.yaml), as are the "
                   "other fit settings; else chinchilla")
    p.add_argument("--holdout", default="designated",
                   help="largest: hold out the largest-compute run; RUN[,RUN...]: those runs "
                   "(a value that is one run's whole name, commas and all, is that run); "
                   "none; designated (default): a sweep's held-out runs")
    p.add_argument("--holdout-above", type=_at_least(float, 0), metavar="FLOPS",
                   help="also hold out every run with more FLOPs than this")
    p.add_argument("--bootstrap", type=_at_least(int, 0), metavar="B",
                   help="B >= 6 bootstrap refits over runs, for intervals (0: from the "
                   "curvature, which understates them when E is not identified)")
    p.add_argument("--drop-early", type=float, metavar="F",
                   help="drop points before this fraction of each run's tokens (not needed for "
                   "points marked annealed: when there are any, only they are fitted)")
    p.add_argument("--min-tokens-per-param", type=_at_least(float, 0), metavar="R",
                   help="drop points of models that saw fewer than R tokens per parameter")
    p.add_argument("--loss", choices=["huber", "lsq"], default="huber",
                   help="on log loss: Huber (delta from the noise) or least squares")
    p.add_argument("--huber-delta", type=_at_least(float, 1e-9), metavar="D",
                   help="Huber's delta instead of one set from the noise (Besiroglu: 1e-3)")
    p.add_argument("--metric",
                   help="a sweep's validation set to fit (data.val_sets names more)")
    p.add_argument("--params", choices=["total", "non_embedding", "flops"],
                   help="N: all parameters, the non-embedding ones (a sweep's; a CSV's N is "
                   "its params column), or the training FLOPs per token / 6")
    p.add_argument("--seed", type=_at_least(int, 0, 2**32 - 1), default=0)
    p.add_argument("--ignore-columns", action="store_true",
                   help="ignore CSV columns other than the known ones (default: an error)")
    p.add_argument("--out", default="fit.json")
    p.set_defaults(func=cmd_fit, cpu_devices=None)


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="predicted loss (and allocation) from a fit.json")
    p.add_argument("fit")
    p.add_argument("--params", type=float, metavar="N")
    p.add_argument("--tokens", type=float, metavar="D")
    p.add_argument("--flops", type=float, metavar="C",
                   help="compute-optimal N, D and loss at C; with --params and --tokens, that "
                   "run's exact FLOPs (Kaplan's compute law reads them)")
    p.set_defaults(func=cmd_predict, cpu_devices=None)


def main(argv: list[str] | None = None) -> int:
    top = parser()
    # Overrides may follow flags (`lm train tiny --cpu-devices 8 train.steps=5`).
    args, extra = top.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray or (extra and not hasattr(args, "overrides")):
        top.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides += extra
    keep_freed_memory()
    try:
        _use_cpu_devices(args.cpu_devices)
        _join_processes(args)
        with _log_to_stderr():
            return args.func(args)
    except LMError as e:
        from lm.errors import Interrupted

        print(e if isinstance(e, Interrupted) else f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # before a run could save (start-up), or a second Ctrl-C
        print("interrupted; a run keeps its checkpoints up to its last save", file=sys.stderr)
        return 128 + signal.SIGINT
    except BrokenPipeError:  # `lm info | head`: the reader has gone; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
