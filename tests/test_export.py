import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

from lm import checkpoint, cli, corpus, export, rundir, sharding, state as state_lib

from conftest import small
from corpora import UNICODE, files_cfg, stdlib_texts, write_corpus


def saved_run(cfg, run_dir, step=3, seed=1):
    """A run directory holding a checkpoint of `cfg` at `step`, written from the mesh of its
    mesh config (all 8 devices for a sharded one); the parameters are perturbed, norm scales
    too, so that a weight put in the wrong place changes the logits. Returns lm's logits of
    `tokens` [2, 12] under those parameters."""
    n = cfg.mesh.data * cfg.mesh.model
    lay = state_lib.layout(cfg, jax.devices()[:n])
    state = jax.jit(state_lib.init_fn(cfg, lay.tx), out_shardings=lay.shardings)(np.uint32(0))
    rng = np.random.default_rng(seed)
    state["params"] = jax.tree.map(
        lambda w, s: jax.device_put(np.asarray(w) + 0.05 * rng.standard_normal(w.shape, "f4"), s),
        state["params"], lay.shardings["params"])
    mngr = checkpoint.manager(run_dir)
    checkpoint.save(mngr, state, {"step": step}, cfg.checkpoint)
    mngr.wait_until_finished()
    rundir.write_config(run_dir, cfg)
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 12))
    with sharding.use(lay.mesh, lay.table):
        logits = jax.jit(lambda p, t: nnx.merge(lay.graphdef, p)(t))(state["params"], tokens)
    return tokens, np.asarray(logits)


def hf_logits(out, tokens):
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def test_transformers_loads_an_untied_gqa_model_from_a_sharded_checkpoint(tmp_path, capsys):
    """FSDP and tensor parallel shards of an untied, grouped-query model, exported into
    several safetensors files: transformers' logits equal lm's."""
    cfg = small("model.tie_embeddings=false", "model.n_kv_heads=2", "mesh.data=4",
                "mesh.model=2", "mesh.fsdp=true")
    tokens, expected = saved_run(cfg, tmp_path / "run")
    out = tmp_path / "hf"
    umask = os.umask(0o022)  # the common one, whatever this process's
    try:
        assert cli.main(["export", str(tmp_path / "run"), "--format", "hf", "--out", str(out),
                         "--max-shard-gb", "1e-4"]) == 0
    finally:
        os.umask(umask)
    assert "no tokenizer" in capsys.readouterr().out
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # 100 kB files
    assert "lm_head.weight" in index["weight_map"]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_key_value_heads"], config["tie_word_embeddings"]) == (2, False)
    np.testing.assert_allclose(hf_logits(out, tokens), expected, atol=1e-4, rtol=0)
    # readable by others, as the umask allows (safetensors alone writes 0600): for a server
    assert {(out / name).stat().st_mode & 0o777 for name in index["weight_map"].values()} == {
        0o644}


def test_transformers_loads_a_tied_mup_qk_norm_model_and_its_tokenizer(tmp_path):
    """A tied model on text, with QK-norm (Qwen3's architecture) and muP at twice its base
    width (attention scaled by 1/head_dim, logits by 1/2: folded into the weights):
    transformers' logits equal lm's, and AutoTokenizer encodes and decodes as the run's
    SentencePiece model does."""
    write_corpus(tmp_path / "corpus")
    cfg = files_cfg(tmp_path, "model.qk_norm=true", "model.parametrization=mup",
                    "model.base_width=16")
    tokens, expected = saved_run(cfg, tmp_path / "run", step=5)
    saved_run(cfg, tmp_path / "run", step=7, seed=2)  # the newest; --step 5 exports the other
    out = tmp_path / "hf"
    assert cli.main(["export", str(tmp_path / "run"), "--step", "5", "--out", str(out)]) == 0
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    np.testing.assert_allclose(hf_logits(out, tokens), expected, atol=1e-4, rtol=0)

    sp = corpus.prepare(cfg).tokenizer()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == tok.eos_token_id == 1
    for text in UNICODE + stdlib_texts(20_000) + ["  two  spaces\n\tand a tab"]:
        ids = tok.encode(text)
        assert ids == sp.encode(text)
        assert tok.decode(ids) == text


@pytest.mark.parametrize("override, refusal", [
    ("model.mlp=gelu", "model.mlp=gelu: no matching transformers architecture"),
    ("model.qk_norm=true", "model.qk_norm=True: no matching transformers architecture"),
])
def test_models_no_architecture_expresses_are_refused(tmp_path, capsys, monkeypatch, override,
                                                      refusal):
    # as a model feature the exporter has not mapped yet is: qk_norm, were it not mapped
    monkeypatch.setattr(export, "MAPPED", export.MAPPED - {"qk_norm"})
    rundir.write_config(tmp_path, small(override))
    assert cli.main(["export", str(tmp_path), "--out", str(tmp_path / "hf")]) == 2
    assert refusal in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_a_missing_step_or_a_used_directory_is_refused(tmp_path, capsys):
    rundir.write_config(tmp_path / "run", small())
    assert cli.main(["export", str(tmp_path / "run"), "--step", "9", "--out",
                     str(tmp_path / "new" / "hf")]) == 2
    assert "no checkpoint at step 9 in" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # a failed export leaves no directory it made...
    (tmp_path / "empty").mkdir()
    assert cli.main(["export", str(tmp_path / "run"), "--step", "9", "--out",
                     str(tmp_path / "empty")]) == 2
    assert not any((tmp_path / "empty").iterdir())  # ...and one it was given as it was
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    assert cli.main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "used")]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert cli.main(["export", str(tmp_path / "run"), "--out", "/proc/lm-none/hf"]) == 2
    assert "--out /proc/lm-none/hf cannot be created (" in capsys.readouterr().err
    too_long = tmp_path / "made" / "parent" / ("x" * 300)  # mkdir fails after two levels
    assert cli.main(["export", str(tmp_path / "run"), "--out", str(too_long)]) == 2
    assert "cannot be created (File name too long)" in capsys.readouterr().err
    assert not (tmp_path / "made").exists()
