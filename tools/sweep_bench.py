"""The sweep runner against the one it replaced, on the same trials, alternated in one run.

    python tools/sweep_bench.py SWEEP.yaml [--rounds 1] [--workers 2] [--cpu-devices 1]
                                [--old-workers 2] [--old-cpu-devices 1] [--old-rev REV]
                                [--keep DIR]

`old`: what `lm sweep` did before long-lived workers: every trial a fresh `lm train` process
(`--old-workers` at a time, each with `--old-cpu-devices`), the fitting trials first, then the
held-out ones — this checkout's `lm train`, so the two runners train the same bits; or, with
`--old-rev`, the old runner itself: `lm sweep --workers --cpu-devices` of the code at that git
revision (e.g. 3f26cfe, before long-lived workers), whose trials compute what that code did.
`new`: `lm sweep --workers W --cpu-devices N`. Each round runs both from scratch, in fresh
directories and a cold compilation cache, and prints their wall times, their study MFU (model
FLOPs of every trial over the wall time and one peak: the best numpy matmul measured before
and after every run, as the peak of this shared machine swings 2x within an hour), and how far
their final losses differ, trial by trial.
"""

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from lm import flops, rundir, spec as spec_lib

REPO = Path(__file__).resolve().parent.parent


def old(spec_path: Path, workers: int, cpu_devices: int, env: dict) -> float:
    """Wall seconds of every trial as its own `lm train` process, `workers` at a time."""
    trials = spec_lib.plan(spec_lib.load_spec(spec_path))
    start = time.perf_counter()
    for role in ("fit", "holdout"):  # the held-out runs after the fitting ones, as before
        queue, running = [t for t in trials if t.role == role], []
        while queue or running:
            while queue and len(running) < workers:
                t = queue.pop(0)
                t.run_dir.mkdir(parents=True, exist_ok=True)
                path = t.run_dir / "trial.yaml"
                path.write_text(yaml.safe_dump(json.loads(json.dumps(_config(t)))))
                running.append(subprocess.Popen(
                    [sys.executable, "-m", "lm.cli", "train", str(path), "--cpu-devices",
                     str(cpu_devices)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    env=env))
            time.sleep(0.1)
            for p in [p for p in running if p.poll() is not None]:
                if p.returncode:
                    raise SystemExit(f"a trial failed with exit code {p.returncode}")
                running.remove(p)
    return time.perf_counter() - start


@contextlib.contextmanager
def old_code(rev: str, where: Path):
    """old(), but the runner of the code at git revision `rev`, checked out in `where` while
    the benchmark runs."""
    git = ["git", "-C", str(REPO), "worktree"]
    subprocess.run(git + ["add", "--detach", str(where), rev], check=True,
                   stdout=subprocess.DEVNULL)
    try:
        yield lambda spec_path, workers, cpu_devices, env: new(
            spec_path, workers, cpu_devices, {**env, "PYTHONPATH": str(where)}, cwd=where)
    finally:
        subprocess.run(git + ["remove", "--force", str(where)], check=True)


def _config(trial) -> dict:
    from lm import config

    return config.to_dict(trial.cfg)


def new(spec_path: Path, workers: int, cpu_devices: int, env: dict, cwd=None) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lm.cli", "sweep", str(spec_path), "--workers",
                    str(workers), "--cpu-devices", str(cpu_devices)], check=True, env=env,
                   cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def finals(spec_path: Path) -> dict[str, float]:
    """Each trial's final validation loss, from its run directory."""
    return {t.name: rundir.evals(t.run_dir)[-1]["loss"]
            for t in spec_lib.plan(spec_lib.load_spec(spec_path))}


def largest_difference(results: list[dict]) -> tuple[float, str]:
    """The largest relative difference of a trial's final loss from the first run's, and where."""
    first = results[0]["finals"]
    return max((abs(r["finals"][name] / loss - 1), f"{name}, {r['runner']} round {r['round']}")
               for r in results for name, loss in first.items())


def rounds(args, raw: dict, root: Path, old_runner) -> tuple[list[dict], float]:
    """Each round: the old runner, then the new, from scratch; a result per run, and the best
    matmul peak measured before and after each."""
    results, peaks = [], [flops.numpy_matmul_flops_per_s(2048)]
    for i in range(args.rounds):
        for kind, run, w, n in (("old", old_runner, args.old_workers, args.old_cpu_devices),
                                ("new", new, args.workers, args.cpu_devices)):
            where = root / f"{kind}{i}"
            where.mkdir(parents=True)
            spec = where / "sweep.yaml"
            spec.write_text(yaml.safe_dump({**raw, "dir": str(where / "sweep")}))
            env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(where / "xla-cache")}
            seconds = run(spec, w, n, env)
            peaks.append(flops.numpy_matmul_flops_per_s(2048))
            results.append({"round": i, "runner": kind, "workers": w, "cpu_devices": n,
                            "wall_s": seconds, "finals": finals(spec)})
            print(f"round {i} {kind:<3} workers {w} cpu-devices {n}: {seconds:7.1f} s",
                  flush=True)
    return results, max(peaks)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("spec")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cpu-devices", type=int, default=1)
    p.add_argument("--old-workers", type=int, default=2)
    p.add_argument("--old-cpu-devices", type=int, default=1)
    p.add_argument("--old-rev", help="git revision whose own runner is the old one")
    p.add_argument("--keep", help="run the sweeps in this directory (default: a temporary one)")
    args = p.parse_args()
    raw = yaml.safe_load(Path(args.spec).read_text())
    root = Path(args.keep or tempfile.mkdtemp(prefix="lm-sweep-bench-")).resolve()
    total = sum(t.facts()["spent_flops"] for t in spec_lib.plan(spec_lib.load_spec(args.spec)))
    with (old_code(args.old_rev, root / "old-code") if args.old_rev
          else contextlib.nullcontext(old)) as old_runner:
        results, peak = rounds(args, raw, root, old_runner)
    for r in results:
        r["study_mfu"] = total / r["wall_s"] / peak
    olds = [r for r in results if r["runner"] == "old"]
    news = [r for r in results if r["runner"] == "new"]
    differ, where = largest_difference(results)
    same = differ == 0
    ratio = min(r["wall_s"] for r in news) / min(r["wall_s"] for r in olds)
    best_new, best_old = (max(r["study_mfu"] for r in rs) for rs in (news, olds))
    mfu = best_new / best_old
    print(f"{total:.3g} model FLOPs; new / old wall time (best of each): {ratio:.3f}; study MFU "
          f"(at {peak / 1e9:.0f} GFLOP/s) new {best_new:.1%}, old {best_old:.1%}: {mfu:.2f}x; "
          f"the same final losses, trial by trial: {same}"
          + ("" if same else f" (at most {differ:.2%} apart: {where})"))
    print(json.dumps({"flops": total, "peak_flops_per_s": peak, "wall_ratio": ratio,
                      "mfu_ratio": mfu, "same_losses": same,
                      "largest_loss_difference": differ, "old_rev": args.old_rev,
                      "runs": [{k: v for k, v in r.items() if k != "finals"} for r in results]}))


if __name__ == "__main__":
    sys.exit(main())
