"""Observed points of scaling runs — (params, tokens, loss) with their FLOPs, run, step and
whether each ends a learning-rate decay — read from rows or a CSV, checked, and resampled.

numpy only; every error names the row or line and the column at fault.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from lm.errors import FitError

BUDGET_TOL = 0.05  # without a budget column, FLOPs within 5% of each other are one budget
_COLUMNS = "params, tokens, loss (optional: flops, run, step, annealed, budget)"
_FIELDS = ("params", "tokens", "loss", "flops", "run", "step", "annealed", "budget")


# A run's exact FLOPs over 6ND: less where embeddings are most of N or only some of it is
# active (a mixture of experts), more for attention and, with N counted without embeddings,
# the output head (100x at small widths). Another unit is orders of magnitude off.
FLOPS_OVER_6ND = (0.01, 1e4)


def _own_run(i: int) -> str:
    """Run id of a point that names none: it is a run of its own."""
    return f"#{i}"


@dataclass(frozen=True, eq=False)
class Points:
    """Observed points, one per (run, step): parallel numpy arrays of one length.

    ``flops`` defaults to 6·N·D, ``run`` to one run per point, ``step`` to -1 (unknown),
    ``annealed`` to False: whether the point ends a learning-rate decay (a cosine run's end, a
    WSD cooldown branch's end), so that it sits on the loss a run of that length reaches.
    ``budget`` is the IsoFLOP budget a run was sized for, where given (NaN: not given), which
    its exact FLOPs may stray from by more than BUDGET_TOL.
    """

    params: np.ndarray
    tokens: np.ndarray
    loss: np.ndarray
    flops: np.ndarray | None = None
    run: np.ndarray | None = None
    step: np.ndarray | None = None
    annealed: np.ndarray | None = None
    budget: np.ndarray | None = None

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        for name in ("params", "tokens", "loss"):
            put(name, np.asarray(getattr(self, name), dtype=float).reshape(-1))
        n = len(self.params)
        put("flops", 6 * self.params * self.tokens if self.flops is None
            else np.asarray(self.flops, dtype=float).reshape(-1))
        put("run", np.array([_own_run(i) for i in range(n)]) if self.run is None
            else np.asarray(self.run, dtype=str).reshape(-1))
        put("step", np.full(n, -1) if self.step is None
            else np.asarray(self.step, dtype=int).reshape(-1))
        put("annealed", np.zeros(n, bool) if self.annealed is None
            else np.asarray(self.annealed, dtype=bool).reshape(-1))
        put("budget", np.full(n, np.nan) if self.budget is None
            else np.asarray(self.budget, dtype=float).reshape(-1))
        lengths = {f.name: len(getattr(self, f.name)) for f in fields(self)}
        if len(set(lengths.values())) != 1:
            raise FitError(f"Points arrays differ in length: {lengths}")
        for name in ("params", "tokens", "loss", "flops", "budget"):
            values = getattr(self, name)
            if name == "budget" and np.isnan(values).all():
                continue  # not given
            bad = np.flatnonzero(~(np.isfinite(values) & (values > 0)))
            if bad.size:
                raise FitError(f"Points.{name}[{bad[0]}] = {values[bad[0]]}; "
                               "expected a positive finite number"
                               + (" (a budget for every point, or none)" * (name == "budget")))

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping[str, Any]]) -> Points:
        """Points from dicts (or sqlite3.Rows) with keys params, tokens, loss and optional
        flops, run, step, annealed, budget."""
        if not rows:
            raise FitError(f"no rows; expected dicts with keys {_COLUMNS}")
        return _parse([dict(row) for row in rows], lambda i: f"row {i}")

    def __len__(self) -> int:
        return len(self.loss)

    def write_csv(self, path: str | Path) -> None:
        """The points as a CSV that `load_csv` (and `lm fit`) reads back."""
        names = [f.name for f in fields(Points)
                 if f.name != "budget" or np.isfinite(self.budget).any()]
        cols = {n: getattr(self, n).tolist() for n in names}
        cols["step"] = ["" if s < 0 else s for s in cols["step"]]  # -1: unknown
        if "budget" in cols:
            cols["budget"] = ["" if math.isnan(b) else b for b in cols["budget"]]
        with Path(path).open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(names)
            w.writerows(zip(*cols.values()))

    def select(self, index: np.ndarray) -> Points:
        """The points picked by a boolean mask or an index array (indices may repeat)."""
        return Points(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def _run_groups(self) -> tuple[np.ndarray, np.ndarray]:
        """Each point's run as an integer, and each run's final tokens."""
        _, inv = np.unique(self.run, return_inverse=True)
        last = np.zeros(len(inv))
        np.maximum.at(last, inv, self.tokens)
        return inv, last

    def finals(self) -> Points:
        """Each run's final point: its last annealed one, where the points have any."""
        return self.select(self.final_mask(bool(self.annealed.any())))

    def final_mask(self, annealed: bool = False) -> np.ndarray:
        """True at each run's last point (most tokens, then highest step); with `annealed`,
        at its last annealed point where it has one (a WSD run's last cooldown end, not the
        stable phase it went on with)."""
        inv, _ = self._run_groups()
        keys = (self.step, self.tokens) + ((self.annealed,) if annealed else ()) + (inv,)
        order = np.lexsort(keys)
        is_last = np.r_[inv[order][1:] != inv[order][:-1], True][:len(self)]
        mask = np.zeros(len(self), dtype=bool)
        mask[order[is_last]] = True
        return mask

    def early_mask(self, fraction: float) -> np.ndarray:
        """True at points trained on less than ``fraction`` of their run's final tokens.

        Progress is measured in tokens rather than logged steps so that the cut does not depend
        on how densely a run was logged; a run's final point is never early.
        """
        inv, last = self._run_groups()
        return self.tokens < fraction * last[inv]

    def frontier_mask(self) -> np.ndarray:
        """True at the compute-efficient frontier: points with a lower loss than every point
        that used less compute (the lower envelope of loss against compute over all runs)."""
        order = np.argsort(self.flops, kind="stable")
        best_before = np.minimum.accumulate(np.r_[np.inf, self.loss[order][:-1]])
        mask = np.zeros(len(self), dtype=bool)
        mask[order] = self.loss[order] < best_before
        return mask


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _positive(value: Any, where: str) -> float:
    if _blank(value):
        raise FitError(f"{where}: missing value; expected a positive finite number")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise FitError(f"{where}: {value!r} is not a number; "
                       "expected a positive finite number") from None
    if not (math.isfinite(x) and x > 0):
        raise FitError(f"{where}: {value!r} is not a positive finite number")
    return x


def _step(value: Any, where: str) -> int:
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = math.nan
    if not (x.is_integer() and x >= 0):
        raise FitError(f"{where}: {value!r} is not a step; expected an integer >= 0 (or empty)")
    return int(x)


def _flag(value: Any, where: str) -> bool:
    text = str(value).strip().lower()
    if _blank(value) or text in ("0", "false", "no"):
        return False
    if text in ("1", "true", "yes"):
        return True
    raise FitError(f"{where}: {value!r} is not a flag; expected 1/0 or true/false (or empty)")


def _parse(records: Sequence[Mapping[str, Any]], locate: Callable[[int], str]) -> Points:
    """Records of cells (strings or numbers) → Points; each error names the record and column."""
    cols: dict[str, list] = {f.name: [] for f in fields(Points)}
    blank = {"flops": [], "budget": []}
    for i, rec in enumerate(records):
        where = lambda name: f"{locate(i)}, column '{name}'"  # noqa: E731
        row = {k: _positive(rec.get(k), where(k)) for k in ("params", "tokens", "loss")}
        flops, run, step, budget = (rec.get(k) for k in ("flops", "run", "step", "budget"))
        for k in blank:
            if _blank(rec.get(k)):
                blank[k].append(i)
        row["flops"] = (6 * row["params"] * row["tokens"] if _blank(flops)
                        else _positive(flops, where("flops")))
        ratio = row["flops"] / (6 * row["params"] * row["tokens"])
        if not FLOPS_OVER_6ND[0] <= ratio <= FLOPS_OVER_6ND[1]:
            raise FitError(f"{where('flops')}: {flops!r} is {ratio:.3g} x 6 * params * tokens: "
                           "not that run's FLOPs (another unit, PF-days? params or tokens in "
                           "millions?); give FLOPs, or leave the column out for 6ND")
        row["run"] = _own_run(i) if _blank(run) else str(run).strip()
        row["step"] = -1 if _blank(step) else _step(step, where("step"))
        row["annealed"] = _flag(rec.get("annealed"), where("annealed"))
        row["budget"] = math.nan if _blank(budget) else _positive(budget, where("budget"))
        for k, v in row.items():
            cols[k].append(v)
    if 0 < len(blank["flops"]) < len(records):  # 6ND beside exact FLOPs: FLOPs per token skew
        raise FitError(f"{locate(blank['flops'][0])}, column 'flops': missing value, where "
                       "other rows have one; fill it in every row, or leave the column empty "
                       "to use 6ND throughout")
    if 0 < len(blank["budget"]) < len(records):  # a budget by name beside budgets by FLOPs
        raise FitError(f"{locate(blank['budget'][0])}, column 'budget': missing value, where "
                       "other rows have one; name every run's budget, or none")
    return Points(**cols)


def load_csv(path: str | Path, ignore_columns: bool = False) -> Points:
    """Points from a CSV with columns params, tokens, loss and optional flops, run, step,
    annealed.

    A column of another name is an error (a misspelt `run` would silently make every row a
    run of its own) unless `ignore_columns`. A CSV without ``run`` makes each row its own run.
    """
    path = Path(path)
    if not path.is_file():
        raise FitError(f"{path}: no such file; expected a CSV with columns {_COLUMNS}")
    try:
        records, lines = _read_csv(path, ignore_columns)
    except UnicodeDecodeError as e:  # an Excel UTF-16 export, cp1252, a .csv.gz
        raise FitError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as a "
                       "UTF-8 CSV") from None
    points = _parse(records, lambda i: f"{path}, line {lines[i]}")
    # a file appended to itself, not two measurements; rows that name no run (each a run of
    # its own) repeat one another by their size instead
    own = [r == _own_run(i) for i, r in enumerate(points.run)]
    runs = [n if o else str(r) for o, r, n in zip(own, points.run, points.params)]
    first: dict = {}
    for i, key in enumerate(zip(runs, points.step, points.tokens, points.loss)):
        if first.setdefault(key, i) != i:
            run = f"{key[0]:g} parameters" if own[i] else repr(key[0])
            step = f", step {key[1]}" if key[1] >= 0 else ""
            raise FitError(f"{path}, line {lines[i]} repeats line {lines[first[key]]} (run "
                           f"{run}{step}, {key[2]:g} tokens, loss {key[3]:g}): each point "
                           "once, or it counts twice in the fit"
                           + ("; if they are separate runs (seeds), name them in a column "
                              "run" if own[i] else ""))
    _check_named_runs(points, own, lambda i: f"{path}, line {lines[i]}")
    return points


def _read_csv(path: Path, ignore_columns: bool) -> tuple[list[dict], list[int]]:
    """The data rows of a points CSV (blank rows skipped) and their line numbers, once its
    header is checked."""
    with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: a byte-order mark is no name
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise FitError(f"{path}: empty file; expected a header line with columns {_COLUMNS}")
        given = reader.fieldnames
        reader.fieldnames = header = [h.strip().lower() for h in given]
        twice = sorted({h for h in header if h and header.count(h) > 1})
        if twice:  # a dict row keeps one of them, silently
            raise FitError(f"{path}, line 1: " + "; ".join(
                f"columns {' and '.join(repr(g) for g, h in zip(given, header) if h == name)} "
                f"both read as {name}" for name in twice) + " (names are read in any case): "
                "keep one of each")
        missing = [c for c in ("params", "tokens", "loss") if c not in header]
        if missing:
            raise FitError(f"{path}, line 1: missing column(s) {', '.join(missing)}; "
                           f"found {', '.join(header)}; expected {_COLUMNS}")
        unknown = [c for c in header if c and c not in _FIELDS]  # "": a trailing comma
        if unknown and not ignore_columns:
            raise FitError(f"{path}, line 1: unknown column(s) {', '.join(unknown)}; the columns "
                           f"are {_COLUMNS}: rename a misspelt one, or ignore the others "
                           "(lm fit --ignore-columns)")
        # else the points of a learning curve would count as runs of their own
        if "step" in header and "run" not in header:
            raise FitError(f"{path}, line 1: column step orders the points of a run, but no "
                           "column run says which rows are one run: name each row's run (or, "
                           "one run per row, leave step out)")
        records, lines = [], []
        for rec in reader:
            if None in rec:  # DictReader's key for cells beyond the header's
                raise FitError(f"{path}, line {reader.line_num}: {len(header) + len(rec[None])} "
                               f"cells for the header's {len(header)} columns")
            if any((v or "").strip() for v in rec.values()):  # ",,,": a spreadsheet's blank row
                records.append(rec)
                lines.append(reader.line_num)
    if not records:
        raise FitError(f"{path}: no data rows after the header; expected rows of {_COLUMNS}")
    return records, lines


def _check_named_runs(points: Points, own: list[bool], locate: Callable[[int], str]) -> None:
    """A named run is one model measured once per point: rows that give it two sizes, or two
    losses at one step and token count, are separate runs under one name."""
    size: dict = {}
    loss: dict = {}
    for i in (i for i, o in enumerate(own) if not o):
        run = str(points.run[i])
        j = size.setdefault(run, i)
        if points.params[j] != points.params[i]:
            raise FitError(f"{locate(i)}: run {run!r} has {points.params[i]:g} parameters, but "
                           f"{points.params[j]:g} at {locate(j)}: a run is one model; give "
                           "each model's runs names of their own")
        j = loss.setdefault((run, points.step[i], points.tokens[i]), i)
        if points.loss[j] != points.loss[i]:
            raise FitError(f"{locate(i)}: run {run!r} at {points.tokens[i]:g} tokens has loss "
                           f"{points.loss[i]:g}, but {points.loss[j]:g} at {locate(j)}: one "
                           "loss per point; give separate runs (seeds) names of their own")


def resample_runs(run: np.ndarray, rng: np.random.Generator,
                  strata: np.ndarray | None = None) -> np.ndarray:
    """Point indices of one bootstrap sample: as many runs as there are, drawn with
    replacement, each contributing all of its points; with `strata` (a label per point, one
    per run), as many from each stratum as it has."""
    if strata is not None:
        return np.concatenate([np.flatnonzero(strata == s)[resample_runs(run[strata == s], rng)]
                               for s in np.unique(strata)])
    _, inv, counts = np.unique(run, return_inverse=True, return_counts=True)
    order = np.argsort(inv, kind="stable")  # points grouped by run
    starts = np.cumsum(counts) - counts
    drawn = rng.integers(len(counts), size=len(counts))
    lengths = counts[drawn]
    within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return order[np.repeat(starts[drawn], lengths) + within]


def budget_labels(points: Points) -> np.ndarray:
    """IsoFLOP budget label per point: by its budget column where given, else by its FLOPs
    (`group_budgets`)."""
    if np.all(np.isfinite(points.budget)):
        return np.unique(points.budget, return_inverse=True)[1]
    return group_budgets(points.flops)


def group_budgets(flops: np.ndarray, tol: float = BUDGET_TOL) -> np.ndarray:
    """Budget label per point. Sweeping up from the smallest FLOPs, each budget takes every point
    within ``tol`` of its first, so no budget spans more than ``tol`` (no chaining)."""
    order = np.argsort(flops)
    sorted_flops = flops[order]
    labels = np.empty(len(flops), dtype=int)
    start, label = 0, 0
    while start < len(flops):
        end = np.searchsorted(sorted_flops, sorted_flops[start] * (1 + tol), side="right")
        labels[order[start:end]] = label
        start, label = end, label + 1
    return labels
