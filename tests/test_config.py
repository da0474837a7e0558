import json
import re

import pytest

from lm import cli, config
from lm.errors import ConfigError

from conftest import small


def test_presets_load_and_tiny_is_complete():
    for path in sorted(config.CONFIG_DIR.glob("*.yaml")):
        config.load(path)
    tiny = config.load("tiny")
    assert tiny.train.run_dir and tiny.train.steps > 0


def test_overrides_apply_with_types():
    cfg = config.load("tiny", ["train.steps=7", "optim.lr=1e-3", "mesh.fsdp=true",
                               "model.d_model=128", "model.n_heads=8", "train.seed=3"])
    assert (cfg.train.steps, cfg.optim.lr, cfg.mesh.fsdp, cfg.model.d_model) == (7, 1e-3, True, 128)
    assert cfg.model.head_dim == 16 and cfg.model.d_ff == 4 * 128


def test_base_inheritance(tmp_path):
    (tmp_path / "child.yaml").write_text("base: tiny\ntrain:\n  steps: 3\n")
    cfg = config.load(tmp_path / "child.yaml")
    assert cfg.train.steps == 3 and cfg.model == config.load("tiny").model
    (tmp_path / "a.yaml").write_text("base: b\n")
    (tmp_path / "b.yaml").write_text("base: a\n")
    with pytest.raises(ConfigError, match=r"extend each other in a loop \(.*a.yaml -> "
                                          r".*b.yaml -> .*a.yaml\)"):
        config.load(tmp_path / "a.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = config.load("tiny", ["model.n_kv_heads=2", "data.source=*.txt"])  # not YAML: a glob
    config.dump(cfg, tmp_path / "c.yaml")
    assert config.load(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("overrides, key", [
    (["model.widht=3"], "model.widht"),
    (["trian.steps=3"], "trian"),
    (["train.steps=ten"], "train.steps"),
    (["train.steps=1.5"], "train.steps"),
    (["mesh.fsdp=3"], "mesh.fsdp"),
    (["model.mlp=relu"], "model.mlp"),
    (["model.d_model=100", "model.n_heads=3"], "model.d_model"),
    (["model.n_kv_heads=3"], "model.n_kv_heads"),
    (["train.micro_batches=3"], "train.micro_batches"),
    (["optim.warmup_steps=-1"], "optim.warmup_steps"),
    (["data.seq_len=4096"], "data.seq_len"),
    (["mesh.data=-1", "mesh.model=-1"], "mesh"),
    (["model.parametrization=mup"], "model.base_width"),  # muP needs the width it was tuned at
    (["model.parametrization=mu"], "model.parametrization"),
    (["optim.z_loss=-1e-4"], "optim.z_loss"),
    (["train.run_dir="], "train.run_dir"),  # an unset shell variable: not the cwd
    (["train.steps=0"], "train.steps"),  # not the branch step derived from it
    (["optim.b1=1.0"], "optim.b1"), (["optim.b2=1.5"], "optim.b2"), (["optim.eps=-1"], "optim.eps"),
    (["optim.weight_decay=-5"], "optim.weight_decay"), (["model.rope_theta=0"], "model.rope_theta"),
    (["model.norm_eps=-1"], "model.norm_eps"), (["train.peak_flops=-1"], "train.peak_flops"),
    (["train.run_dir=2024-01-01"], "train.run_dir=datetime.date(2024, 1, 1) has the wrong "
                                   "type; expected str (YAML read the value as a date: quote it)"),
    (["optim.lr=.inf"], "optim.lr=inf is not valid: a finite number"),
    (["optim.lr=nan"], "optim.lr='nan' is not valid: a finite number"),
    (["model.d_model=[64"], "model.d_model='[64' has the wrong type; expected int (nor is it "
                            "YAML: expected ',' or ']'"),
    (["data.vocab_size=0"], "data.vocab_size=0 is not valid: must be positive"),
    (["eval.batch_size=-1"], "eval.batch_size=-1 is not valid: must be >= 0 (0: the training "
                             "micro-batch)"),
])
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        small(*overrides)


@pytest.mark.parametrize("overrides, key, n_devices", [
    (["mesh.data=4", "mesh.model=1"], "mesh", 8),  # 4 devices used of 8
    (["mesh.data=1", "mesh.model=8"], "model.n_heads", 8),  # 4 heads over 8
    (["mesh.data=8", "mesh.model=1", "train.batch_size=4"], "train.batch_size", 8),
    (["mesh.data=8", "mesh.model=1", "train.micro_batches=2"], "train.batch_size", 8),
    (["mesh.data=-1", "mesh.model=3"], "mesh.data", 8),
    (["mesh.data=8", "mesh.fsdp=true", "model.d_model=36", "model.n_heads=2"], "model.d_model", 8),
])
def test_mesh_errors_name_the_key(overrides, key, n_devices):
    cfg = small(*overrides)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config.check_train_batch(cfg, config.mesh_shape(cfg, n_devices))


def test_a_run_evaluates_on_a_mesh_its_training_batch_does_not_divide():
    cfg = small("mesh.data=8", "mesh.model=1", "train.batch_size=12", "eval.batch_size=8")
    sizes = config.mesh_shape(cfg, 8)  # what eval and sample build
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        config.check_train_batch(cfg, sizes)  # what training adds


def test_mesh_fill():
    cfg = small("mesh.replica=2", "mesh.data=-1", "mesh.model=2")
    assert config.mesh_shape(cfg, 8) == {"replica": 2, "data": 2, "model": 2}


def test_info_gpt3_175b_counts_without_allocating(capsys):
    assert cli.main(["info", "gpt3-175b", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert abs(info["params_total"] / 175e9 - 1) < 0.01
    assert info["params_non_embedding"] < info["params_total"]
    specs = {p["name"]: p["spec"] for p in info["params"]}
    assert specs["blocks.w_up"] == "P(None, 'data', 'model')"  # fsdp on in the preset


def test_cli_reports_config_errors(capsys):
    assert cli.main(["info", "tiny", "model.n_heads=5"]) == 2
    err = capsys.readouterr().err
    assert "model.d_model" in err and "Traceback" not in err


def test_a_section_override_merges_into_earlier_dotted_ones_and_an_empty_one_empties(tmp_path):
    cfg = config.load("tiny", ["train.run_dir=runs/x", "train={steps: 3}", "train.seed=2"])
    assert (cfg.train.run_dir, cfg.train.steps, cfg.train.seed) == ("runs/x", 3, 2)
    path = tmp_path / "sets.yaml"  # a run's validation sets, one of which has moved since
    path.write_text(f"base: tiny\ndata:\n  val_sets: {{moved: {path}}}\n")
    assert config.load(path).data.val_sets == {"moved": str(path)}
    assert config.load(path, ["data.val_sets={}"]).data.val_sets == {}
    assert config.load(path, [f"data.val_sets.b={path}", "data.val_sets={}"]).data.val_sets == {}
    assert config.load(path, ["data.val_sets={}", f"data.val_sets.b={path}"]).data.val_sets == {
        "b": str(path)}  # emptied, then given one
    assert config.load(path, [f"data.val_sets.b={path}"]).data.val_sets == {
        "moved": str(path), "b": str(path)}
    with pytest.raises(ConfigError, match="both a value and keys"):
        config.load("tiny", ["model=5", "model.d_model=3"])
