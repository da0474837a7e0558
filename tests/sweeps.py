"""A small synthetic sweep spec for the study-layer tests."""

import yaml

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
            "fit": {"bootstrap": 5, "drop_early": 0.1, "min_tokens_per_param": 0}}
    spec.update(changes)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path
