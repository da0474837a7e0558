"""The `lm` command as a user meets it: the study commands run where JAX cannot be imported,
and the presets ship inside the package."""

import csv
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from lm import cli, scaling

from sweeps import finished_sweep

ROOT = Path(__file__).resolve().parents[1]

# Runs `lm` commands in one process in which importing JAX, Flax, Optax or Orbax fails.
WITHOUT_JAX = """
import json, sys
for name in ("jax", "jaxlib", "flax", "optax", "orbax", "orbax.checkpoint"):
    sys.modules[name] = None
from lm import cli
codes = [cli.main(argv) for argv in json.loads(sys.argv[1])]
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "flax", "optax", "orbax")
                and sys.modules[m] is not None)
print(json.dumps({"codes": codes, "loaded": loaded}))
"""


def test_study_commands_run_without_jax(tmp_path):
    path = finished_sweep(tmp_path)
    sweep_dir, fit_json = tmp_path / "sweep", tmp_path / "fit.json"
    commands = [["sweep", "--plan", str(path), "--cpu-devices", "2"],
                ["sweep", "--status", str(path)],
                ["sweep", str(path), "--cpu-devices", "2"],  # nothing to train: fit and report
                ["fit", str(sweep_dir), "--out", str(fit_json), "--min-tokens-per-param", "0",
                 "--bootstrap", "10"],
                ["predict", str(fit_json), "--flops", "1e15"],
                ["predict", str(fit_json), "--params", "1e5", "--tokens", "1e7"],
                ["predict", str(fit_json), "--params", "1e5", "--tokens", "1e7", "--flops", "7e12"]]
    out = subprocess.run([sys.executable, "-c", WITHOUT_JAX, json.dumps(commands)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"codes": [0] * len(commands), "loaded": []}, out.stderr
    assert "10 done" in out.stdout and "held-out" in out.stdout and "loss=" in out.stdout
    assert "tokens=1e+07 -> flops~" in out.stdout  # derived from the fit's FLOPs per token
    assert "tokens=1e+07 flops=7e+12 -> loss=" in out.stdout  # a run's exact FLOPs, given
    for name in ("report.md", "fit.json", "plots/loss_vs_compute.png"):
        assert (sweep_dir / name).is_file(), name
    # its held-out run was recorded done with nothing registered: none is registered now
    assert not (sweep_dir / "prediction.json").exists()
    assert "None registered, and none can be" in (sweep_dir / "report.md").read_text()
    assert json.loads(fit_json.read_text())["law"] == "chinchilla"


def test_the_wheel_ships_the_presets(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True,
                           timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("lm-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(tmp_path / "site")
    assert {"lm/configs/tiny.yaml", "lm/configs/gpt3-175b.yaml", "lm/cli.py"} <= names
    # From another directory, the installed package alone resolves a preset by name.
    probe = "from lm import config; c = config.load('tiny'); print(config.find('tiny'))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "site"),
                                            "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / "site" / "lm" / "configs" / "tiny.yaml")


# `lm info` that writes 100 MB, as `lm ... | head` meets it: the reader goes before lm is done.
CHATTY = """
import sys
from lm import cli
def chatty(args):
    for _ in range(10**6):
        print("x" * 100)
    return 0
cli.cmd_info = chatty
sys.exit(cli.main(["info", "tiny"]))
"""


def test_an_interrupt_or_a_reader_gone_ends_in_a_line_not_a_traceback(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt  # Ctrl-C while a command starts up, before any run can save

    monkeypatch.setattr(cli, "cmd_info", interrupted)
    assert cli.main(["info", "tiny"]) == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        "interrupted; a run keeps its checkpoints up to its last save"]
    proc = subprocess.Popen([sys.executable, "-c", CHATTY], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout.read(50) == b"x" * 50
    proc.stdout.close()
    assert proc.wait(timeout=120) == 141
    assert proc.stderr.read() == b""  # nor an "Exception ignored" as Python exits


def test_fit_checks_where_it_will_write_before_fitting(tmp_path, capsys, monkeypatch):
    from lm import cli, scaling

    csv = tmp_path / "points.csv"
    csv.write_text("params,tokens,loss\n1e6,2e7,3.0\n")
    monkeypatch.setattr(scaling, "fit", lambda *a, **k: pytest.fail("fitted before the check"))
    assert cli.main(["fit", str(csv), "--out", str(tmp_path / "nodir" / "fit.json")]) == 2
    assert "no directory" in capsys.readouterr().err
    assert cli.main(["fit", str(csv), "--out", str(tmp_path)]) == 2
    assert "is a directory; give a file" in capsys.readouterr().err
    registered = tmp_path / "prediction.json"  # holds a fit too, and is never to be edited
    registered.write_text(json.dumps({"made": "then", "law": "chinchilla", "runs": [],
                                      "fit": {"law": "chinchilla", "objective": 1.0}}))
    for out in (csv, registered):
        before = out.read_bytes()
        assert cli.main(["fit", str(csv), "--out", str(out)]) == 2
        assert "is not a fit lm wrote" in capsys.readouterr().err and out.read_bytes() == before


def test_holdout_takes_a_run_whose_name_holds_commas_else_a_list_never_none(tmp_path, capsys):
    from lm import cli

    rows = [(n, n * r, 1.8 + 400 * n ** -0.34 + 1500 * (n * r) ** -0.3, f"N{n:g}-r{r}")
            for n in (1e6, 2e6, 4e6, 8e6) for r in (10, 20, 40)]
    rows[-1] = (*rows[-1][:3], "N=8e+06, r=40")
    path = tmp_path / "points.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([("params", "tokens", "loss", "run"), *rows])
    out = tmp_path / "fit.json"
    for value, held in [("N=8e+06, r=40", ["N=8e+06, r=40"]),
                        ("N8e+06-r20, N8e+06-r10", ["N8e+06-r10", "N8e+06-r20"])]:
        assert cli.main(["fit", str(path), "--bootstrap", "0", "--holdout", value,
                         "--out", str(out)]) == 0
        assert [r["run"] for r in json.loads(out.read_text())["holdout"]["runs"]] == held
    rows[0] = (*rows[0][:3], "N8e+06-r10,N8e+06-r20")  # a name that is also a list of names
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([("params", "tokens", "loss", "run"), *rows])
    assert cli.main(["fit", str(path), "--holdout", " N8e+06-r10,N8e+06-r20",
                     "--out", str(out)]) == 2
    assert "is one run's name and also a list of runs" in capsys.readouterr().err
    for value in ("", " , "):  # a shell variable left empty holds out nothing: said, not done
        assert cli.main(["fit", str(path), "--holdout", value, "--out", str(out)]) == 2
        assert f"--holdout {value!r} names no run" in capsys.readouterr().err


def test_fitting_a_sweep_directory_takes_its_own_fit_settings(tmp_path, capsys):
    """`lm fit SWEEP_DIR` fits as the sweep's report did (its sweep.yaml's `fit`), unless told
    otherwise."""
    finished_sweep(tmp_path)
    sweep_dir = tmp_path / "sweep"
    (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump(
        {"name": "t", "fit": {"law": "kaplan-nd", "min_tokens_per_param": 0}}))
    out = tmp_path / "fit.json"
    assert cli.main(["fit", str(sweep_dir), "--bootstrap", "0", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["law"] == "kaplan-nd"
    assert "law=kaplan-nd" in capsys.readouterr().out
    assert cli.main(["fit", str(sweep_dir / "store.sqlite"), "--bootstrap", "0", "--out",
                     str(out)]) == 0  # its store file, too
    assert json.loads(out.read_text())["law"] == "kaplan-nd"
    assert cli.main(["fit", str(sweep_dir), "--bootstrap", "0", "--law", "chinchilla",
                     "--out", str(out)]) == 0
    assert json.loads(out.read_text())["law"] == "chinchilla"
    for damaged in ("fit: [unclosed", "fit: 3"):
        (sweep_dir / "sweep.yaml").write_text(damaged)
        assert cli.main(["fit", str(sweep_dir), "--out", str(out)]) == 2
        assert "its fit settings cannot be read" in capsys.readouterr().err


def test_predict_refuses_what_cannot_be_a_run_and_reads_a_registration(tmp_path, capsys):
    """--flops far from 6ND of --params and --tokens, or missing arguments, are usage errors;
    a query beyond the fitting runs says how far; a sweep's prediction.json predicts with the
    fit registered in it."""
    path = finished_sweep(tmp_path)
    fit_json = tmp_path / "fit.json"
    assert cli.main(["fit", str(tmp_path / "sweep"), "--out", str(fit_json), "--bootstrap", "0",
                     "--min-tokens-per-param", "0"]) == 0
    for argv, message in [(["--params", "1e5", "--tokens", "1e7", "--flops", "5"],
                           "x 6ND of --params 100000 --tokens 1e+07: not that run's FLOPs"),
                          (["--params", "1e5"], "give --params N --tokens D"),
                          (["--params", "0", "--tokens", "1e7", "--flops", "1e13"],
                           "params=0.0; expected positive finite")]:
        capsys.readouterr()
        assert cli.main(["predict", str(fit_json), *argv]) == 2
        assert message in capsys.readouterr().err
    registered = tmp_path / "prediction.json"
    registered.write_text(json.dumps({"made": "then", "runs": [],
                                      "fit": json.loads(fit_json.read_text())}))
    query = ["--params", "1e5", "--tokens", "1e7"]
    capsys.readouterr()
    assert cli.main(["predict", str(fit_json), *query]) == 0
    direct = capsys.readouterr().out
    fitted = scaling.Fit.from_json(json.loads(fit_json.read_text()))
    reach = scaling.predict(fitted, params=1e5, tokens=1e7)["flops"] / fitted.max_fit_flops
    assert f"up to {reach:.3g}x the largest fitting run's compute" in direct
    frontier = tmp_path / "kaplan.json"
    assert cli.main(["fit", str(tmp_path / "sweep"), "--law", "kaplan", "--out", str(frontier),
                     "--bootstrap", "0", "--min-tokens-per-param", "0"]) == 0
    capsys.readouterr()
    assert cli.main(["predict", str(frontier), *query]) == 0
    assert "not this N and D's" in capsys.readouterr().out  # the frontier, said so
    older = ROOT / "experiments/results/stdlib-chinchilla/fit.json"  # no max_fit_flops in it
    assert cli.main(["predict", str(older), *query]) == 0 and "loss=" in capsys.readouterr().out
    assert cli.main(["predict", str(registered), *query]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"the fit registered in {registered}") and out.endswith(direct)
    assert cli.main(["sweep", str(path), "--json"]) == 2
    assert "--json is --status's output" in capsys.readouterr().err


def test_predict_off_a_one_ladder_fit_s_line_says_so(tmp_path, capsys):
    """Runs at one tokens-per-parameter ratio pin the loss along that line only: a query says
    how far off the line it lies, and the fit's warning, on it or off."""
    rows = [{"run": f"n{n:g}", "params": n, "tokens": 20 * n,
             "loss": 1.8 + 400 * n ** -0.34 + 1500 * (20 * n) ** -0.3}
            for n in (1e6, 3e6, 1e7, 3e7, 1e8)]
    points = tmp_path / "points.csv"
    with open(points, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    fit_json = tmp_path / "fit.json"
    assert cli.main(["fit", str(points), "--bootstrap", "0", "--out", str(fit_json)]) == 0
    for tokens, where in (("4e9", "is 1x the D that line gives for N=2e+08, on it"),
                          ("4e10", "is 10x the D that line gives for N=2e+08, off it")):
        capsys.readouterr()
        assert cli.main(["predict", str(fit_json), "--params", "2e8", "--tokens", tokens]) == 0
        out = capsys.readouterr().out
        assert "WARNING N and D moved together in the fitted runs" in out and where in out


@pytest.mark.parametrize("argv, message", [
    (["sweep", "s.yaml", "--workers", "abc"], "--workers: 'abc' is not an integer"),
    (["sweep", "s.yaml", "--workers", "0"], "--workers: 0 is not a number >= 1"),
    (["fit", "p.csv", "--holdout-above", "x"], "--holdout-above: 'x' is not a number"),
    (["sample", "run", "--seed", "-1"], "--seed: -1 is not a number from 0 to 4294967295"),
])
def test_a_number_option_says_what_it_takes(capsys, argv, message):
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    assert exit.value.code == 2 and message in capsys.readouterr().err
