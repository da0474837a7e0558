"""Learning-rate transfer across widths (SP vs muP) and stability at high learning rates
(with and without QK-norm and the z-loss), on the default corpus.

    python tools/lr_transfer.py [--widths 16,32,64,128] [--lrs 1e-3,...] [--steps 300]
                                [--variants sp,mup,sp-qk-z,mup-qk-z] [--out DIR] [--runs DIR]

Every (variant, width, learning rate) trains in this process with `lm.train.train` and one
`lm.train.Session`, which compiles each shape once for all its learning rates. A run's result
is its final validation loss; one whose loss becomes non-finite counts as diverged. A run
directory that holds a finished run is read, not trained again, so an interrupted benchmark
resumes. Written to --out: results.json and results.csv (a row per run, with the largest
attention logit and the output-logit RMS at the last logged step and the largest over the
run), loss_vs_lr.png (final loss against learning rate, a panel per variant, a line per width)
and stability.png (the largest attention logit against learning rate).

The LR sensitivity of a variant at a width is Wortsman et al. 2023's: the mean over the grid of
min(L(lr), L0) - L*, L0 the loss at initialisation (log of the vocabulary size) and L* the
best loss on the grid.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

BASE = ["data.source=default", "data.max_bytes=8000000", "data.val_sequences=64",
        "model.vocab_size=512", "model.context=128", "model.n_layers=2", "train.batch_size=8",
        "mesh.data=1", "mesh.model=1", "train.log_stability=true", "train.progress=false"]
BASE_WIDTH = 32  # muP's base width: there muP is SP but for the attention scale
VARIANTS = {
    "sp": [],
    "mup": ["model.parametrization=mup", f"model.base_width={BASE_WIDTH}"],
    "sp-qk-z": ["model.qk_norm=true", "optim.z_loss=1e-4"],
    "mup-qk-z": ["model.parametrization=mup", f"model.base_width={BASE_WIDTH}",
                 "model.qk_norm=true", "optim.z_loss=1e-4"],
}
DESCRIPTIONS = {"sp": "standard", "mup": "muP", "sp-qk-z": "standard, QK-norm, z-loss",
                "mup-qk-z": "muP, QK-norm, z-loss"}
HEAD_DIM = 16  # heads grow with width, as in the sweeps of experiments/


def run_config(variant: str, width: int, lr: float, steps: int, run_dir: Path):
    from lm import config

    return config.load("tiny", BASE + VARIANTS[variant] + [
        f"model.d_model={width}", f"model.n_heads={width // HEAD_DIM}", f"optim.lr={lr}",
        f"train.steps={steps}", f"optim.warmup_steps={steps // 10}",
        f"train.log_every={max(steps // 12, 1)}", f"eval.every_steps={steps}",
        f"train.run_dir={run_dir}"])


def result(variant: str, width: int, lr: float, run_dir: Path, diverged: bool) -> dict:
    """A run's row, from its run directory."""
    from lm import rundir

    rows = [r for r in rundir.metrics(run_dir) if "loss" in r]
    evals = rundir.evals(run_dir)
    attention = [r["max_attention_logit"] for r in rows]
    logits = [r["output_logit_rms"] for r in rows]
    return {"variant": variant, "width": width, "lr": lr, "diverged": diverged,
            "val_loss": math.nan if diverged or not evals else evals[-1]["loss"],
            "train_loss": rows[-1]["loss"] if rows else math.nan,
            "steps_logged": rows[-1]["step"] if rows else 0,
            "max_attention_logit": attention[-1] if attention else math.nan,
            "max_attention_logit_peak": max(attention, default=math.nan),
            "output_logit_rms": logits[-1] if logits else math.nan,
            "output_logit_rms_peak": max(logits, default=math.nan)}


def train_one(session, variant: str, width: int, lr: float, steps: int, root: Path) -> dict:
    from lm import rundir, train
    from lm.errors import TrainingError

    run_dir = root / f"{steps}-steps" / variant / f"d{width}" / f"lr{lr:.3g}"
    cfg = run_config(variant, width, lr, steps, run_dir)
    done = [r for r in rundir.metrics(run_dir) if r.get("step") == steps]
    diverged = (run_dir / "diverged").is_file()
    if not (done or diverged):
        try:
            train.train(cfg, session=session)
        except TrainingError as e:  # a non-finite loss: this learning rate diverges
            diverged = True
            (run_dir / "diverged").write_text(str(e) + "\n")
    return result(variant, width, lr, run_dir, diverged)


def sensitivity(rows: list[dict], l0: float) -> float:
    """Wortsman et al.'s LR sensitivity of one (variant, width) over its LR grid."""
    losses = [l0 if r["diverged"] or not math.isfinite(r["val_loss"]) else min(r["val_loss"], l0)
              for r in rows]
    return sum(losses) / len(losses) - min(losses)


def summary(rows: list[dict], l0: float) -> dict:
    """Per variant and width: the best LR on the grid, its loss and the LR sensitivity."""
    out = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        for width in sorted({r["width"] for r in rows if r["variant"] == variant}):
            grid = sorted((r for r in rows if (r["variant"], r["width"]) == (variant, width)),
                          key=lambda r: r["lr"])
            finite = [r for r in grid if math.isfinite(r["val_loss"])]
            best = min(finite, key=lambda r: r["val_loss"]) if finite else None
            out[f"{variant}/d{width}"] = {
                "variant": variant, "width": width,
                "best_lr": best["lr"] if best else None,
                "best_loss": best["val_loss"] if best else None,
                "sensitivity": sensitivity(grid, l0),
                "diverged_lrs": [r["lr"] for r in grid if r["diverged"]]}
    return out


def plot(rows: list[dict], out: Path, key: str, ylabel: str, name: str, log_y: bool) -> Path:
    """A panel per variant, a line per width, `key` against the learning rate."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    variants = list(dict.fromkeys(r["variant"] for r in rows))
    widths = sorted({r["width"] for r in rows})
    columns = min(len(variants), 2)
    panel_rows = math.ceil(len(variants) / columns)
    fig = Figure(figsize=(5.0 * columns, 3.8 * panel_rows), layout="constrained")
    axes = fig.subplots(panel_rows, columns, sharex=True, sharey=True, squeeze=False).flat
    colours = colormaps["viridis"]([i / max(len(widths) - 1, 1) for i in range(len(widths))])
    for ax, variant in zip(axes, variants):
        for width, colour in zip(widths, colours):
            grid = sorted((r for r in rows if (r["variant"], r["width"]) == (variant, width)),
                          key=lambda r: r["lr"])
            ax.plot([r["lr"] for r in grid], [r[key] for r in grid], "o-", color=colour,
                    label=f"d{width}")
            bad = [r["lr"] for r in grid if r["diverged"]]
            ax.plot(bad, [ax.get_ylim()[1]] * len(bad), "x", color=colour, markersize=9)
        ax.set_xscale("log")
        if log_y:
            ax.set_yscale("log")
        ax.set_title(f"{variant}: {DESCRIPTIONS[variant]}")
        ax.set_xlabel("learning rate" + (f" (at width {BASE_WIDTH})" if "mup" in variant else ""))
        ax.set_ylabel(ylabel)
    ax.legend(title="width (x: diverged)")
    path = out / name
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
    return path


def write(rows: list[dict], table: dict, out: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({**meta, "summary": table, "runs": rows},
                                                 indent=1) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out, "val_loss", "final validation loss", "loss_vs_lr.png", log_y=False)
    plot(rows, out, "max_attention_logit_peak", "largest attention logit over the run",
         "stability.png", log_y=True)


def print_table(table: dict, rows: list[dict]) -> None:
    print(f"{'variant':<10} {'width':>5} {'best lr':>9} {'loss':>7} {'sensitivity':>11}  "
          "largest attention logit / output-logit RMS at each lr")
    for s in table.values():
        grid = sorted((r for r in rows if (r["variant"], r["width"]) == (s["variant"], s["width"])),
                      key=lambda r: r["lr"])
        stability = "  ".join(f"{r['max_attention_logit_peak']:.3g}/{r['output_logit_rms']:.3g}"
                              for r in grid)
        best = f"{s['best_lr']:.3g}" if s["best_lr"] else "-"
        loss = f"{s['best_loss']:.4f}" if s["best_loss"] else "-"
        print(f"{s['variant']:<10} {s['width']:>5} {best:>9} {loss:>7} {s['sensitivity']:>11.4f}"
              f"  {stability}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--widths", default="16,32,64,128")
    p.add_argument("--lrs", default="1e-3,3.16e-3,1e-2,3.16e-2,1e-1,3.16e-1")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default="experiments/results/lr-transfer")
    p.add_argument("--runs", default="runs/lr-transfer", help="the run directories")
    args = p.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")]
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")

    from lm import train

    session, start, rows = train.Session(), time.perf_counter(), []
    for variant in variants:
        for width in widths:
            for lr in lrs:
                rows.append(train_one(session, variant, width, lr, args.steps, Path(args.runs)))
                r = rows[-1]
                print(f"{variant:<9} d{width:<4} lr {lr:<8.3g} val {r['val_loss']:.4f}  "
                      f"attention {r['max_attention_logit_peak']:.3g}  "
                      f"{time.perf_counter() - start:.0f}s", flush=True)
    l0 = math.log(run_config(variants[0], widths[0], lrs[0], args.steps, Path()).vocab_size)
    table = summary(rows, l0)
    meta = {"command": " ".join(sys.argv), "base_overrides": BASE, "variants":
            {v: VARIANTS[v] for v in variants}, "steps": args.steps, "loss_at_init": l0,
            "wall_s": time.perf_counter() - start, "session_seconds": dict(session.seconds)}
    write(rows, table, Path(args.out), meta)
    print_table(table, rows)
    print(f"wrote {args.out}/results.json, results.csv, loss_vs_lr.png, stability.png "
          f"({meta['wall_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
