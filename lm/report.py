"""A sweep's written result: fit.json, plots/ and report.md, rendered from what the sweep
holds — the fit, its points, the trials and the registered prediction — and nothing else."""

from __future__ import annotations

import json
from pathlib import Path

from lm import plots, scaling
from lm.scaling import Fit, Points


def _interval(interval) -> str:
    return f" [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else ""


def render(name: str, base: str, fit: Fit, points: Points, trials: list[dict],
           registered: dict | None, figures: list[Path]) -> str:
    """report.md: the law, each held-out run against its registered prediction, every trial."""
    lines = [f"# Sweep `{name}`", "",
             f"{len(trials)} trials from `{base}`. Loss is the validation loss of each run's "
             f"learning curve, the earliest {fit.drop_early:.0%} of its tokens dropped; the "
             "law is fitted on the fitting runs only.", "",
             "## Law", "", "```", scaling.format_fit(fit), "```", ""]
    if fit.holdout:
        largest = max(t["flops"] for t in trials if t["role"] == "fit" and t["status"] == "done")
        made = registered["made"] if registered else "(not registered)"
        lines += ["## Held-out prediction", "",
                  f"Registered in `prediction.json` on {made}, before the held-out run trained; "
                  f"the held-out run uses {max(r.flops for r in fit.holdout) / largest:.1f}x the "
                  "compute of the largest fitting run.", "",
                  "| run | params | tokens | FLOPs | predicted (95% CI) | actual | ARE |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r.run} | {r.params:,.0f} | {r.tokens:.3g} | {r.flops:.3g} | "
                  f"{r.predicted:.4f}{_interval(r.interval)} | {r.loss:.4f} | {r.are:.2%} |"
                  for r in fit.holdout]
        lines.append("")
    final = dict(zip(points.run[points.final_mask()], points.loss[points.final_mask()]))
    lines += ["## Trials", "", "| trial | role | status | params | tokens | FLOPs | final loss |",
              "|---|---|---|---:|---:|---:|---:|"]
    for t in trials:
        loss = f"{final[t['name']]:.4f}" if t["name"] in final else "-"
        lines.append(f"| {t['name']} | {t['role']} | {t['status']} | {t['params']:,} | "
                     f"{t['tokens']:.3g} | {t['flops']:.3g} | {loss} |")
    lines += ["", "## Plots", ""] + [f"![{f.stem}](plots/{f.name})" for f in figures]
    return "\n".join(lines) + "\n"


def write(sweep_dir: Path, name: str, base: str, fit: Fit, points: Points, trials: list[dict],
          registered: dict | None) -> None:
    """fit.json, plots/ and report.md into `sweep_dir`."""
    (sweep_dir / "fit.json").write_text(json.dumps(fit.to_json(), indent=1))
    figures = plots.plot_all(points, fit, sweep_dir / "plots")
    (sweep_dir / "report.md").write_text(render(name, base, fit, points, trials, registered,
                                                figures))
