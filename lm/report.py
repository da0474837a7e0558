"""A sweep's written result: fit.json, plots/ and report.md, rendered from what the sweep
holds — the fit, its points, the trials, the registered prediction and where the time went —
and nothing else."""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path

from lm import backtest, plots, scaling
from lm.points import Points
from lm.scaling import Fit

PHASES = ("startup", "compile", "data", "restore", "steps", "eval", "checkpoint")


@dataclasses.dataclass(frozen=True)
class Timing:
    """One run of `lm sweep`: its workers, when it started and ended, the machine's peak."""

    workers: int
    started: float  # time.time()
    ended: float
    peak: float  # FLOP/s
    peak_name: str = "measured cpu"  # `runner.peak`'s: which peak (runs recorded before: CPU)

    @property
    def wall_s(self) -> float:
        return self.ended - self.started


def ended_in(runs: list[Timing], trials: list[dict]) -> list[dict]:
    """The trials that ended (done or failed) while one of `runs` ran."""
    return [t for t in trials if t["status"] in ("done", "failed")
            and any(r.started <= (t["updated"] or 0) <= r.ended for r in runs)]


def _covered_s(runs: list[Timing]) -> float:
    """Seconds during which at least one of `runs` ran: runners on several machines at once
    share their wall time."""
    covered, until = 0.0, float("-inf")
    for r in sorted(runs, key=lambda r: r.started):
        covered += max(r.ended - max(r.started, until), 0.0)
        until = max(until, r.ended)
    return covered


def time_split(runs: list[Timing], trials: list[dict]) -> dict:
    """Where the study's time went over `runs` (the runs of `lm sweep` that ended trials; a
    rerun that trains nothing adds none): the wall time split by phase over the trials they
    ended, the workers' idle time, and the study MFU: model FLOPs of the trials done / the
    FLOPs the machines could have done (each run's wall x peak, summed)."""
    ran = ended_in(runs, trials)
    phases = collections.Counter()
    for t in ran:
        phases.update(json.loads(t.get("timings") or "{}"))
    wall = _covered_s(runs)
    capacity = sum(r.wall_s * r.peak for r in runs)
    worker_s = sum(r.wall_s * r.workers for r in runs)
    done_flops = sum(t["spent_flops"] or t["flops"] for t in ran if t["status"] == "done")
    return {"runs": len(runs), "wall_s": wall, "worker_s": worker_s, "trials": len(ran),
            "resumed": sum(t["attempts"] > 1 for t in ran if t["status"] == "done"),
            "phases": {p: phases.get(p, 0.0) for p in PHASES},
            "idle_s": max(worker_s - sum(phases.values()), 0.0),
            "flops": done_flops, "peak_flops_per_s": capacity / wall if wall > 0 else 0.0,
            "peak_names": sorted({r.peak_name for r in runs}),
            "mfu": done_flops / capacity if capacity > 0 else 0.0}


@dataclasses.dataclass(frozen=True)
class Results:
    name: str
    base: str
    fit: Fit | None  # of the fitting runs in the spec now
    fit_error: str | None
    points: Points | None
    trials: list[dict]  # store rows of the spec's trials
    registered: dict | None  # the registered prediction (prediction.json)
    prior: Fit | None  # the fit it was made from, scored on the held-out runs
    orphans: list[str]  # trials in the store the spec no longer has
    timing: dict
    sensitivity: dict | None = None  # the law refitted with N counted the other way
    noise: list[dict] = dataclasses.field(default_factory=list)  # per size, across seeds
    other_law: dict | None = None  # the other law of N and D, fitted alike


def _interval(interval) -> str:
    return f" [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else ""


def _held_out_table(fit: Fit) -> list[str]:
    """Each held-out run: its prediction with the 95% interval for an actual run (the law's
    uncertainty, its misfit and the run's own noise), and what it reached; seeds of one run
    together."""
    rows = ["| run | N | tokens | FLOPs | x largest fitting run | predicted [95% for a run] | "
            "actual | ARE | inside |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in fit.scored:
        inside = "yes" if r.interval and r.interval[0] <= r.loss <= r.interval[1] else "no"
        rows.append(f"| {r.label} | {r.params:,.0f} | {r.tokens:.3g} | {r.flops:.3g} | "
                    f"{r.compute_ratio:.1f} | {r.predicted:.4f}{_interval(r.interval)} | "
                    f"{r.loss:.4f} | {r.are:.2%} | {inside} |")
    return rows + [""]


def _prediction(r: Results) -> list[str]:
    reg = r.registered
    if reg is None:
        held = [t for t in r.trials if t["role"] == "holdout"]
        trained = [t["name"] for t in held if t["status"] != "blocked"]
        return ["## Held-out prediction", "", (
            f"None registered, and none can be: {', '.join(trained)} trained without one (a "
            "store rebuilt without its prediction.json?). Any score of it here is a fit's made "
            "after it trained, not a prediction." if trained else "Not registered yet."
            if held else "The spec holds out no run."), ""]
    if "failed" in reg:
        return ["## Held-out prediction", "", f"None could be registered ({reg['made']}): "
                f"{reg['failed']}", ""]
    fitted = reg.get("fit", {}).get("n_runs", len(reg.get("fitted_runs", [])))
    lines = ["## Held-out prediction (registered)", "",
             f"Registered in `prediction.json` on {reg['made']}, from the fit of {fitted} "
             "fitting runs, before any held-out run trained. It is never edited; a later refit "
             "appears below, labelled as such.", ""]
    if r.prior and r.fit and r.prior.n_counted != r.fit.n_counted:
        lines += [f"It counted N as {scaling.N_COUNTS[r.prior.n_counted]} (the spec now counts "
                  f"{scaling.N_COUNTS[r.fit.n_counted]}), and is scored so.", ""]
    scored = {h.run for h in r.prior.holdout} if r.prior else set()
    if scored:
        lines += _held_out_table(r.prior)
    status = {t["name"]: t["status"] for t in r.trials}
    waiting = [f"- {p['run']}: predicted {p['predicted']:.4f}{_interval(p['interval'])} ("
               + ("FAILED: no loss to score" if status.get(p["run"]) == "failed" else
                  "not trained yet") + ")" for p in reg["runs"] if p["run"] not in scored]
    lines += waiting + ([""] if waiting else [])
    misfit = r.prior.misfit if r.prior else None
    lines += ["The interval is for an actual run: the law's uncertainty (bootstrap over runs), "
              + ("its misfit on its own runs at that reach (below) " if misfit else "")
              + "and a run's own noise (measured across seeds where the sweep has them). A "
              "prediction outside it is a miss, not bad luck.", ""]
    if r.fit and r.fit is not r.prior and r.fit.holdout:
        lines += ["### Refit after registration (not a pre-registered prediction)", "",
                  "The fitting runs, the fit's settings or the held-out runs changed since the "
                  "registration; this is the law of the runs in the spec now, scored on its "
                  "held-out runs.", ""]
        lines += _held_out_table(r.fit)
    return lines


def _refitted(refit: dict) -> str:
    """A refit's law and what it predicts for the held-out runs (runner._refit)."""
    law = ", ".join(f"{k} {v:.4g}" for k, v in refit.items()
                    if k not in ("params", "law", "held_out"))
    moved = "; ".join(f"{run}: {h['predicted']:.4f} (ARE {h['are']:.2%})"
                      for run, h in refit["held_out"].items())
    return law + (f"; held-out {moved}" if moved else "")


def _trust(r: Results) -> list[str]:
    """How far to trust the law: its noise, whether E is identified, which runs are outliers,
    and how much it hangs on counting N with or without embeddings."""
    fit = r.prior or r.fit
    if fit is None or fit.identifiability is None:
        return []
    ident, noise = fit.identifiability, fit.noise
    lines = ["## How far to trust it", "",
             f"- Run-to-run noise: {noise.describe()}; the Huber loss's delta is set from it.",
             f"- Irreducible loss: the fit is as good, within that noise, for E from "
             f"{ident.allowed[0]:.3f} to {ident.allowed[1]:.3f}; E is "
             + ("identified." if ident.identified else
                "NOT identified: the data cannot tell this law from one with a very different "
                "floor, and extrapolations far beyond the fitted compute hang on it.")]
    for h in fit.holdout:
        span = scaling.held_out_range(fit, h)
        if span:
            lines.append(f"- Across those E, the prediction for {h.run} moves from {span[0]:.4f} "
                         f"to {span[1]:.4f}.")
    lines.append("- The law's misfit on its own runs (refitted on the smaller, predicting the "
                 "larger): " + (f"{fit.misfit.describe()}; in the interval." if fit.misfit else
                                "none in this fit (too few runs, or sizes, below half the "
                                "largest one's compute to refit the law — or a fit made before "
                                "lm measured it); the interval holds sampling error and noise "
                                "only."))
    tried = (r.registered or {}).get("backtest")
    if tried:  # registered with the prediction: what the law's reach looked like beforehand
        line = backtest.describe(backtest.Backtest(**tried)).removeprefix("backtest: ")
        lines.append(f"- Its reach, tried on the fitting runs when the prediction was registered: "
                     f"{line}. This tries the held-out run's own reach, with fewer runs than "
                     "the fit: a check on the misfit above, not part of the interval.")
    if fit.outliers:
        lines.append(f"- Outliers (more than 3 noise sigmas off the law): "
                     f"{', '.join(fit.outliers)}.")
    if s := r.sensitivity:
        lines.append(f"- With N counted as {s['params'].replace('_', '-')} parameters: "
                     f"{_refitted(s)}.")
    if o := r.other_law:
        lines.append(f"- With the other law of N and D, `{o['law']}`, fitted alike: "
                     f"{_refitted(o)}. The gap between the laws is a part of the error that "
                     "neither interval holds where the runs cannot tell their shapes apart.")
    if r.noise:
        lines += ["", "Run-to-run noise by model size (std of the final log loss across seeds, "
                  "pooled over budgets, then at each budget), against the evaluation's own "
                  "standard error:", "",
                  "| N | seed std | d.o.f. | by budget (tokens: std) | eval SEM | fitted |",
                  "|---:|---:|---:|---|---:|---|"]
        lines += [f"| {n['params']:,.0f} | {n['seed_std']:.2%} | {n['df']} | "
                  + ", ".join(f"{d:.3g}: {std:.2%}" for d, std in n["by_budget"])
                  + f" | {n['eval_sem']:.2%} "
                  f"| {'no: too noisy (fit.max_noise)' if n['left_out'] else 'yes'} |"
                  for n in r.noise]
    return lines + [""]


def _timing(t: dict) -> list[str]:
    if not t["runs"]:
        return ["## Where the time went", "", "No run of `lm sweep` recorded in the store has "
                "ended a trial (a store rebuilt from run directories, or written before runs were "
                "recorded, has none).", ""]
    runs = "one run" if t["runs"] == 1 else f"{t['runs']} runs"
    lines = ["## Where the time went", "",
             f"{t['trials']} trials ended in {runs} of `lm sweep`: {t['wall_s']:.0f} s of wall "
             f"time, {t['worker_s']:.0f} worker-seconds. Study MFU {t['mfu']:.1%}: "
             f"{t['flops']:.3g} model FLOPs over the wall time and a peak of "
             f"{t['peak_flops_per_s'] / 1e9:.0f} GFLOP/s ({'; '.join(t['peak_names'])})"
             + (f" ({t['resumed']} of the trials resumed an earlier attempt and count whole: "
                "an upper bound)" if t.get("resumed") else "") + ".",
             "", "| phase | seconds (all workers) | share |", "|---|---:|---:|"]
    rows = [*t["phases"].items(), ("idle (a worker waiting)", t["idle_s"])]
    lines += [f"| {phase} | {s:.1f} | {s / t['worker_s']:.1%} |" for phase, s in rows
              if t["worker_s"] > 0]
    return lines + [""]


def render(r: Results, figures: list[Path]) -> str:
    """report.md."""
    lines = [f"# Sweep `{r.name}`", "",
             f"{len(r.trials)} trials from `{r.base}`. Loss is the validation loss of each "
             "run's learning curve; the law is fitted on the fitting runs only.", ""]
    if r.fit:
        lines += ["## Law", "", f"N counts {scaling.N_COUNTS[r.fit.n_counted]}.", "", "```",
                  scaling.format_fit(r.fit), "```", ""]
    if r.fit_error:
        lines += ["## The fit failed", "", r.fit_error, ""]
    lines += _prediction(r) + _trust(r)
    if r.orphans:
        lines += ["## Kept, not fitted", "", f"{len(r.orphans)} trials in the store are no "
                  "longer in the spec; their results are kept but not fitted: "
                  + ", ".join(f"`{n}`" for n in r.orphans), ""]
    lines += _timing(r.timing)
    final = {}
    if r.points is not None:
        mask = r.points.final_mask()
        final = dict(zip(r.points.run[mask], r.points.loss[mask]))
    lines += ["## Trials", "",
              "| trial | role | status | params (all) | tokens | FLOPs | final loss |",
              "|---|---|---|---:|---:|---:|---:|"]
    for t in r.trials:
        loss = f"{final[t['name']]:.4f}" if t["name"] in final else "-"
        lines.append(f"| {t['name']} | {t['role']} | {t['status']} | {t['params']:,} | "
                     f"{t['tokens']:.3g} | {t['flops']:.3g} | {loss} |")
    lines += ["", "## Plots", ""] + [f"![{f.stem}](plots/{f.name})" for f in figures]
    return "\n".join(lines) + "\n"


def write(sweep_dir: Path, r: Results) -> None:
    """fit.json (when there is a fit), points.csv, plots/ and report.md into `sweep_dir`."""
    figures = []
    if r.points is not None:
        r.points.write_csv(sweep_dir / "points.csv")
    if r.fit:
        (sweep_dir / "fit.json").write_text(json.dumps(r.fit.to_json(), indent=1))
        figures = plots.plot_all(r.points, r.fit, sweep_dir / "plots")
    (sweep_dir / "report.md").write_text(render(r, figures))
