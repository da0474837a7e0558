import sqlite3

import numpy as np
import pytest

from lm import points, scaling
from lm.errors import FitError
from lm.points import Points, load_csv


def test_resample_runs_draws_whole_runs():
    run = np.array(["a"] * 3 + ["b"] * 5 + ["c"] + ["d"] * 2)
    sizes = {r: np.sum(run == r) for r in np.unique(run)}
    rng = np.random.default_rng(0)
    for _ in range(50):
        idx = points.resample_runs(run, rng)
        copies = {r: np.sum(run[idx] == r) / sizes[r] for r in sizes}
        assert sum(copies.values()) == len(sizes)  # as many runs as there are
        for r, m in copies.items():  # a run drawn m times brings each of its points m times
            assert np.all(np.bincount(idx, minlength=len(run))[run == r] == m)


def write(tmp_path, text, name="points.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_load_csv_reads_optional_columns(tmp_path):
    path = write(tmp_path, "run,step,params,tokens,loss,flops,annealed,budget,note\n"
                           "a,10,1e8,1e9,3.5,6e17,0,1e18,x\n"
                           "a,20,1e8,2e9,3.1,1.3e18,1,1e18,y\n"
                           "b,,2e8,4e9,2.9,4.8e18,true,5e18,z\n")
    points = load_csv(path, ignore_columns=True)  # `note` is not one of lm's
    assert points.budget.tolist() == [1e18, 1e18, 5e18]
    assert list(points.run) == ["a", "a", "b"] and list(points.step) == [10, 20, -1]
    assert points.flops.tolist() == [6e17, 1.3e18, pytest.approx(4.8e18)]
    assert points.annealed.tolist() == [False, True, True]
    no_runs = load_csv(write(tmp_path, "params,tokens,loss\n1e8,1e9,3\n2e8,1e9,2.9\n", "plain.csv"))
    assert len(np.unique(no_runs.run)) == 2  # each row its own run
    assert no_runs.flops.tolist() == [6e17, 1.2e18]  # 6ND without a flops column
    points.write_csv(tmp_path / "again.csv")  # what a sweep writes beside its report
    again = load_csv(tmp_path / "again.csv")
    for name in ("params", "tokens", "loss", "flops", "run", "step", "annealed", "budget"):
        assert getattr(again, name).tolist() == getattr(points, name).tolist(), name
    no_runs.write_csv(tmp_path / "plain-again.csv")  # no budgets given: no column written
    assert (tmp_path / "plain-again.csv").read_text().startswith(
        "params,tokens,loss,flops,run,step,annealed\n")


HEADER = "params,tokens,loss\n"


@pytest.mark.parametrize("text, message", [
    ("", "empty file; expected a header line with columns params, tokens, loss"),
    (HEADER, "no data rows"),
    ("params,tokens,foo\n1,2,3\n", r"line 1: missing column\(s\) loss; found params, tokens, foo"),
    (HEADER + "1e8,1e9,3\n1e8,1e9,abc\n", r"line 3, column 'loss': 'abc' is not a number"),
    (HEADER + "-5,1e9,3\n", r"line 2, column 'params': '-5' is not a positive finite number"),
    (HEADER + "1e8,inf,3\n", r"line 2, column 'tokens': 'inf' is not a positive finite number"),
    (HEADER + "1e8,1e9,nan\n", r"line 2, column 'loss': 'nan' is not a positive finite number"),
    (HEADER + "1e8,,3\n", r"line 2, column 'tokens': missing value"),
    ("params,tokens,loss,run,step\n1e8,1e9,3,a,1.5\n",
     r"line 2, column 'step': '1.5' is not a step"),
    ("params,tokens,loss,step\n1e8,1e9,3,1\n1e8,2e9,2.9,2\n",  # learning curves of no run
     r"line 1: column step orders the points of a run, but no column run says which rows"),
    ("params,tokens,loss,annealed\n1e8,1e9,3,maybe\n", r"column 'annealed': 'maybe' is not a flag"),
    (HEADER + "1e8,1e9,3\n1e8,2e9,3,52\n", r"line 3: 4 cells for the header's 3 columns"),
    ("params,tokens,loss,flops\n1e8,1e9,3,6.94\n",  # Chinchilla's 6e17 FLOPs in PF-days
     r"line 2, column 'flops': '6.94' is 1.16e-17 x 6 \* params \* tokens: not that run's FLOPs "
     r"\(another unit, PF-days\?"),
    ("params,tokens,loss,budget\n1e8,1e9,3,1e18\n1e8,2e9,2.9,\n",
     r"line 3, column 'budget': missing value, where other rows have one"),
    ("params,tokens,loss,flops\n1e8,1e9,3,7e17\n1e8,2e9,2.9,\n",
     r"line 3, column 'flops': missing value, where other rows have one"),
    ("params,tokens,loss,run,step\n1e8,1e9,3,a,1\n1e8,2e9,2.9,a,2\n1e8,1e9,3,a,1\n",
     r"line 4 repeats line 2 \(run 'a', step 1"),
    (HEADER + "1e8,1e9,3\n2e8,1e9,2.9\n1e8,1e9,3\n",  # no run column: each row its own run
     r"line 4 repeats line 2 \(run 1e\+08 parameters, 1e\+09 tokens, loss 3\): each point "
     r"once.*; if they are separate runs \(seeds\), name them in a column run"),
    ("params,tokens,loss,run\n1e8,1e9,3,a\n2e8,2e9,2.9,a\n",  # runs named by their shape only
     r"line 3: run 'a' has 2e\+08 parameters, but 1e\+08 at .*line 2: a run is one model"),
    ("params,tokens,loss,run,step\n1e8,1e9,3,a,1\n1e8,1e9,3.1,a,1\n",  # seeds under one name
     r"line 3: run 'a' at 1e\+09 tokens has loss 3.1, but 3 at .*line 2: one loss per point"),
])
def test_bad_csv_errors_say_where_and_what(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match=message) as err:
        load_csv(path)
    assert str(path) in str(err.value)


def test_rows_without_runs_that_differ_beyond_six_digits_are_not_repeats(tmp_path):
    points = load_csv(write(tmp_path, HEADER + "123456789,1e9,3\n123456700,1e9,3\n"))
    assert len(points) == 2


def test_budgets_are_given_for_every_point_or_none():
    with pytest.raises(ValueError, match=r"Points.budget\[1\] = nan; .*a budget for every point"):
        Points([1e8, 2e8], [1e9, 1e9], [3.0, 2.9], budget=[1e18, np.nan])
    assert np.isnan(Points([1e8], [1e9], [3.0]).budget).all()


def test_missing_csv_and_bad_rows():
    with pytest.raises(ValueError, match="no such file"):
        load_csv("/nonexistent/points.csv")
    with pytest.raises(ValueError, match="row 1, column 'loss': missing value"):
        Points.from_rows([{"params": 1e8, "tokens": 1e9, "loss": 3.0},
                          {"params": 1e8, "tokens": 2e9}])
    points = Points.from_rows([{"params": 1e8, "tokens": 1e9, "loss": 3.0, "run": "r",
                                "step": None}])
    assert points.run[0] == "r" and points.step[0] == -1 and points.flops[0] == pytest.approx(6e17)


def test_csv_with_a_byte_order_mark_capitals_misspelt_columns_or_not_utf8(tmp_path):
    text = "run,params,tokens,loss\na,1e8,1e9,3.0\na,1e8,2e9,2.9\nb,2e8,1e9,2.8\n"
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())  # as Excel writes it
    assert sorted(set(load_csv(path).run)) == ["a", "b"]
    misspelt = write(tmp_path, text.replace("run,", "runs,"), "misspelt.csv")
    with pytest.raises(ValueError, match=r"unknown column\(s\) runs; .*--ignore-columns"):
        load_csv(misspelt)
    assert len(np.unique(load_csv(misspelt, ignore_columns=True).run)) == 3
    exported = write(tmp_path, "run,params,tokens,loss,\na,1e8,1e9,3.0,\n,,,,\nb,2e8,1e9,2.8,\n",
                     "exported.csv")  # a spreadsheet's trailing commas and blank row
    assert load_csv(exported).loss.tolist() == [3.0, 2.8]
    capitals = write(tmp_path, text.replace("run,params", "Run, Params"), "capitals.csv")
    assert load_csv(capitals).params.tolist() == load_csv(path).params.tolist()
    # two columns that read as one name: a row would keep one of them, silently
    twice = write(tmp_path, "run,params,tokens,loss,Loss\na,1e8,1e9,3.0,9\nb,2e8,1e9,2.8,9\n",
                  "twice.csv")
    with pytest.raises(ValueError, match=r"line 1: columns 'loss' and 'Loss' both read as loss"):
        load_csv(twice, ignore_columns=True)
    utf16 = tmp_path / "utf16.csv"
    utf16.write_text(text, encoding="utf-16")  # as a spreadsheet's "Unicode text" export
    with pytest.raises(ValueError, match=r"utf16.csv: not UTF-8 text \(byte 0: .*\); save it as a "
                                         "UTF-8 CSV"):
        load_csv(utf16)


def test_group_budgets_does_not_chain():
    labels = points.group_budgets(np.array([1.12, 1.0, 1.04, 1.08, 3.0]))
    assert labels.tolist() == [1, 0, 0, 1, 2]


def test_from_rows_accepts_sqlite_rows():
    con = sqlite3.connect(":memory:")
    con.row_factory = sqlite3.Row
    con.execute("create table results (run text, step int, params real, tokens real, loss real)")
    con.execute("insert into results values ('a', 100, 1e8, 1e9, 3.0)")
    points = Points.from_rows(con.execute("select * from results").fetchall())
    assert points.run.tolist() == ["a"] and points.step.tolist() == [100]


def test_no_points_have_no_finals_and_no_fit():
    none = Points(params=[], tokens=[], loss=[])
    assert none.final_mask().shape == (0,) and none.final_mask(annealed=True).shape == (0,)
    with pytest.raises(FitError, match="no points to fit"):
        scaling.fit(none)
