"""A small synthetic sweep spec for the study-layer tests."""

import numpy as np
import yaml

from lm import spec as spec_lib
from lm.store import Store

BASE = {"model.vocab_size": 128, "model.context": 32, "train.batch_size": 8,
        "train.log_every": 5, "mesh.data": -1, "mesh.model": 1, "optim.lr": 1e-2,
        "data.source": "synthetic"}
SIZES = [{"model.d_model": 16, "model.n_layers": 1, "model.n_heads": 2},
         {"model.d_model": 32, "model.n_layers": 1, "model.n_heads": 2},
         {"model.d_model": 48, "model.n_layers": 2, "model.n_heads": 2}]


def spec_file(tmp_path, **changes):
    spec = {"name": "t", "base": "tiny", "dir": str(tmp_path / "sweep"), "overrides": BASE,
            "sizes": SIZES, "tokens": [5120, 8192, 12288],
            "recipe": {"eval_points": 6, "lr": 1e-2},
            "holdout": {"size": {"model.d_model": 64, "model.n_layers": 2, "model.n_heads": 2},
                        "tokens": 32768},
            "fit": {"bootstrap": 6, "drop_early": 0.1, "min_tokens_per_param": 0}}
    spec.update(changes)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def finished_sweep(tmp_path, noise=lambda trial: 0.002, **changes):
    """A sweep spec (`spec_file` with `changes`) whose every trial is recorded done in its
    store, with learning curves that follow a known law, each point off it by a relative
    `noise(trial)`: what `lm sweep` finds when the training is over."""
    path = spec_file(tmp_path, **changes)
    spec = spec_lib.load_spec(path)
    trials = spec_lib.plan(spec)
    spec.path.mkdir(parents=True)
    store = Store(spec.path / "store.sqlite")
    store.sync(spec.name, "test", trials)
    rng = np.random.default_rng(0)
    for t in trials:
        f = t.facts()
        points = [{"step": k, "tokens": f["tokens"] * k // 4, "flops": f["flops"] * k / 4,
                   "train_loss": None, "val_loss_sem": 0.01, "bpb": None,
                   "val_loss": (2 + 50 * f["params"] ** -0.3 + 300 * (f["tokens"] * k / 4) ** -0.3)
                   * (1 + noise(t) * rng.standard_normal())} for k in (1, 2, 3, 4)]
        store.finish(t.name, points, wall_s=1.0)
    return path
