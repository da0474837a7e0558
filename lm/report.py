"""A sweep's written result: fit.json, plots/ and report.md, stating the law, the held-out
prediction (registered in prediction.json before that run trained) and its error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lm import plots, scaling


def _interval(interval) -> str:
    return f" [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else ""


def write(sweep_dir: Path, spec, store, held: list[str]) -> dict:
    """Fit every finished fitting run, score the held-out runs, write the report."""
    from lm.sweep import points_of

    points = points_of(store, spec)
    trained_held = sorted(set(held) & set(points.run))
    if spec.fit.law in scaling.LOSS_LAWS:
        fit = scaling.fit(points, spec.fit.law, holdout=trained_held or None,
                          bootstrap=spec.fit.bootstrap, drop_early=spec.fit.drop_early)
    else:  # an isoflop fit predicts no loss: just leave the held-out runs out
        fit = scaling.fit(points.select(~np.isin(points.run, held)), spec.fit.law,
                          bootstrap=spec.fit.bootstrap, drop_early=spec.fit.drop_early)
    (sweep_dir / "fit.json").write_text(json.dumps(fit, indent=1))
    figures = plots.plot_all(points, fit, sweep_dir / "plots")
    registered = sweep_dir / "prediction.json"
    made = json.loads(registered.read_text())["made"] if registered.exists() else None
    runs = fit.get("holdout", {}).get("runs", [])
    trials = store.trials()

    lines = [f"# Sweep `{spec.name}`", "",
             f"{len(trials)} trials from `{spec.base}`. Loss is the validation loss of each run's "
             f"learning curve, the earliest {spec.fit.drop_early:.0%} of its tokens dropped; the "
             "law is fitted on the fitting runs only.", "",
             "## Law", "", "```", scaling.format_fit(fit), "```", ""]
    if runs:
        largest = max(t["flops"] for t in trials if t["role"] == "fit" and t["status"] == "done")
        lines += ["## Held-out prediction", "",
                  f"Registered in `prediction.json` on {made}, before the held-out run trained; "
                  f"the held-out run uses {max(r['flops'] for r in runs) / largest:.1f}x the "
                  "compute of the largest fitting run.", "",
                  "| run | params | tokens | FLOPs | predicted (95% CI) | actual | ARE |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['run']} | {r['params']:,.0f} | {r['tokens']:.3g} | {r['flops']:.3g} | "
                  f"{r['predicted']:.4f}{_interval(r.get('interval'))} | {r['loss']:.4f} | "
                  f"{r['are']:.2%} |" for r in runs]
        lines.append("")
    final = {r: loss for r, loss in zip(points.run[points.final_mask()],
                                        points.loss[points.final_mask()])}
    lines += ["## Trials", "", "| trial | role | status | params | tokens | FLOPs | final loss |",
              "|---|---|---|---:|---:|---:|---:|"]
    for t in trials:
        loss = f"{final[t['name']]:.4f}" if t["name"] in final else "-"
        lines.append(f"| {t['name']} | {t['role']} | {t['status']} | {t['params']:,} | "
                     f"{t['tokens']:.3g} | {t['flops']:.3g} | {loss} |")
    lines += ["", "## Plots", ""] + [f"![{f.stem}](plots/{f.name})" for f in figures]
    (sweep_dir / "report.md").write_text("\n".join(lines) + "\n")

    print(scaling.format_fit(fit))
    for r in runs:
        print(f"held-out {r['run']}: predicted {r['predicted']:.4f}{_interval(r.get('interval'))}"
              f", actual {r['loss']:.4f}, ARE {r['are']:.2%}")
    print(f"report: {sweep_dir / 'report.md'}")
    return {"fit": fit, "held_out": runs, "are": fit.get("are")}
