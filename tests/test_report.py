"""report.md from a sweep's record, without a sweep: the committed main-job study of seed 1
(registered before the law's misfit was measured) and the same points refitted now."""

import json
from pathlib import Path

import numpy as np

from lm import report, scaling
from lm.points import load_csv

STUDY = Path(__file__).resolve().parents[1] / "experiments" / "results" / "quick" / "seed1"
TIMING = {"runs": 0, "wall_s": 0.0, "worker_s": 0.0, "trials": 0, "resumed": 0, "phases": {},
          "idle_s": 0.0, "flops": 0.0, "peak_flops_per_s": 0.0, "mfu": 0.0}


def rendered(prior: scaling.Fit, registered: dict, points) -> str:
    held = [r["run"] for r in registered["runs"]]
    prior = scaling.score(prior, points, held)
    results = report.Results("quick", "tiny", prior, None, points, [], registered, prior, [],
                             TIMING)
    return report.render(results, [])


def test_the_report_says_what_its_interval_holds_misfit_or_not():
    registered = json.loads((STUDY / "prediction.json").read_text())
    points = load_csv(STUDY / "points.csv")
    old = scaling.Fit.from_json(registered["fit"])
    assert old.misfit is None  # registered before lm measured it
    text = rendered(old, registered, points)
    assert "its misfit on its own runs" not in text
    assert "The law's misfit on its own runs (refitted on the smaller, predicting the larger): " \
           "none in this fit" in text
    refit = scaling.fit(points, "kaplan-nd", holdout=[r["run"] for r in registered["runs"]],
                        min_tokens_per_param=4)
    assert refit.misfit and refit.misfit.per_efold > 0  # this study's runs show one
    text = rendered(refit, registered, points)
    assert "its misfit on its own runs at that reach (below)" in text
    assert f"larger): {refit.misfit.describe()}; in the interval." in text
    (held,) = refit.holdout
    assert f"{held.predicted:.4f} [{held.interval[0]:.4f}, {held.interval[1]:.4f}]" in text
    assert np.isfinite(held.interval).all()
