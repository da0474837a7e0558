"""A sweep recipe's learning-rate rule, checked with seeds before the study relies on it.

    python tools/lr_sweep.py SPEC [--multipliers 0.5,1,2] [--sizes 0,2,5] [--seeds 2]
                                  [--out DIR] [lm sweep flags, e.g. --workers 2]

For each multiplier m, the sweep SPEC's fitting trials (the sizes chosen, every token budget;
no held-out run, no bootstrap) train with the recipe's rule scaled by m (recipe.lr * m, the
width rule unchanged), as an ordinary sweep in DIR/runs/m<m> whose spec is kept in DIR/specs.
The table gives, per size, budget and multiplier, the seed-mean final validation loss and the
seeds' spread (std of log loss). The rule holds at a size where m = 1 has the best seed-mean,
or is within the seeds' noise of it, with a small spread. Written to DIR: results.csv, results.md and
loss_vs_lr.png. Trials already finished are read, not trained again.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

from lm import spec as spec_lib
from lm.store import Store


def derived_spec(raw: dict, m: float, sizes: list[int] | None, seeds: int, out: Path) -> dict:
    """The spec of multiplier m's sweep: SPEC's recipe scaled, reduced to what is compared."""
    # the losses are compared, not fitted: every trial counts towards the design the sweep's
    # own check asks for (a spec's fit.min_tokens_per_param would leave some out)
    raw = dict(raw, name=f"{raw.get('name', 'sweep')}-lr-m{m:g}", holdout={},
               dir=str(out / "runs" / f"m{m:g}"),
               fit=dict(raw.get("fit", {}), bootstrap=0, min_tokens_per_param=0))
    chosen = [raw["sizes"][i] for i in sizes] if sizes else raw["sizes"]
    raw["sizes"] = [dict(s, seeds=seeds) for s in chosen]
    raw["recipe"] = dict(raw.get("recipe", {}))
    raw["recipe"]["lr"] = raw["recipe"].get("lr", spec_lib.Recipe.lr) * m
    return raw


def results(spec_path: Path, m: float) -> list[dict]:
    """One row per fitting trial of a finished sweep: size, seed, LR and final loss."""
    spec = spec_lib.load_spec(spec_path)
    losses = Store(spec.path / "store.sqlite", create=False).last_losses()
    return [{"size": f"d{t.cfg.model.d_model}-l{t.cfg.model.n_layers}", "m": m,
             "params": facts["params"], "tokens": facts["tokens"], "lr": t.cfg.optim.lr,
             "seed": t.cfg.train.seed, "loss": losses[t.name]}
            for t in spec_lib.plan(spec) if t.role == "fit" and t.name in losses
            for facts in [t.facts()]]


def table(rows: list[dict]) -> tuple[list[dict], str]:
    """Per (size, budget, multiplier): seed mean and spread; and the markdown table of them."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["params"], r["tokens"], r["size"], r["m"])].append(r)
    summary = [{"size": size, "params": n, "tokens": d, "m": m, "lr": rs[0]["lr"],
                "seeds": len(rs),
                "mean_loss": float(np.mean([r["loss"] for r in rs])),
                "seed_spread": float(np.std(np.log([r["loss"] for r in rs]), ddof=1))
                if len(rs) > 1 else float("nan")}
               for (n, d, size, m), rs in sorted(groups.items())]
    ms = sorted({s["m"] for s in summary})
    lines = ["| size | params | tokens | " + " | ".join(f"lr x{m:g}" for m in ms) + " | best |",
             "|---|---|---|" + "---|" * (len(ms) + 1)]
    for size, d in dict.fromkeys((s["size"], s["tokens"]) for s in summary):
        cells = {s["m"]: s for s in summary if (s["size"], s["tokens"]) == (size, d)}
        best = min(cells.values(), key=lambda s: s["mean_loss"])
        lines.append(f"| {size} | {best['params']:,} | {d:.3g} | " + " | ".join(
            f"{cells[m]['mean_loss']:.4f} ± {cells[m]['seed_spread']:.2%} "
            f"(lr {cells[m]['lr']:.2e})"
            if m in cells else "" for m in ms) + f" | x{best['m']:g} |")
    return summary, "\n".join(lines)


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for size, d in dict.fromkeys((s["size"], s["tokens"]) for s in summary):
        pts = [s for s in summary if (s["size"], s["tokens"]) == (size, d)]
        ax.errorbar([s["lr"] for s in pts], [s["mean_loss"] for s in pts], fmt="o-",
                    label=f"{size}, {d:.2g} tokens",
                    yerr=[s["mean_loss"] * np.nan_to_num(s["seed_spread"]) for s in pts])
    ax.set(xscale="log", xlabel="learning rate", ylabel="final validation loss (seed mean)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("spec")
    p.add_argument("--multipliers", default="0.5,1,2")
    p.add_argument("--sizes", default="", help="indices into the spec's sizes (default: all)")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--out", default="runs/lr-sweep")
    args, sweep_flags = p.parse_known_args()
    raw = yaml.safe_load(Path(args.spec).read_text())
    out = Path(args.out)
    (out / "specs").mkdir(parents=True, exist_ok=True)
    sizes = [int(i) for i in args.sizes.split(",")] if args.sizes else None
    rows = []
    for m in (float(x) for x in args.multipliers.split(",")):
        path = out / "specs" / f"m{m:g}.yaml"
        path.write_text(yaml.safe_dump(derived_spec(raw, m, sizes, args.seeds, out),
                                       sort_keys=False))
        subprocess.run([sys.executable, "-m", "lm.cli", "sweep", str(path), *sweep_flags],
                       check=True)
        rows += results(path, m)
    summary, md = table(rows)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (out / "results.md").write_text(
        f"Learning-rate rule of {args.spec}: final validation loss, seed mean ± spread (std of "
        f"log loss over {args.seeds} seeds)\n\n    python tools/lr_sweep.py "
        + " ".join(sys.argv[1:]) + f"\n\n{md}\n")
    plot(summary, out / "loss_vs_lr.png")
    print(md)


if __name__ == "__main__":
    sys.exit(main())
