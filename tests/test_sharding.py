import json

import jax
import pytest
from jax.sharding import PartitionSpec as P

from lm import cli, config, flops, sharding, state, train

from conftest import small


def test_rule_table():
    plain, fsdp = sharding.rules(False), sharding.rules(True)
    assert sharding.spec(("embed", "heads", "kv"), plain) == P(None, "model", None)
    assert sharding.spec(("embed", "mlp"), fsdp) == P("data", "model")
    # activations keep their width whole under FSDP: `data` is taken by the batch
    assert sharding.spec(("batch", "length", "act_embed"), fsdp) == P(("replica", "data"), None, None)
    with pytest.raises(ValueError, match="two dims onto one mesh axis"):  # the old ambiguity
        sharding.spec(("batch", "length", "embed"), fsdp)
    assert sharding.spec(("layers", "vocab", "embed"), plain) == P(None, "model", None)


@pytest.mark.parametrize("fsdp", [False, True])
def test_parameters_are_sharded_by_the_rules(fsdp):
    cfg = small("model.d_model=64", "model.n_heads=8", "mesh.data=2", "mesh.model=4",
                f"mesh.fsdp={str(fsdp).lower()}")
    program = train.compile_program(cfg)
    fresh = program.init()
    params = fresh["params"]
    embed = "data" if fsdp else None
    expected = {
        "wq": P(None, embed, "model", None),
        "wk": P(None, embed, "model", None),
        "wo": P(None, "model", None, embed),
        "w_up": P(None, embed, "model"),
        "w_down": P(None, "model", embed),
    }
    for name, spec in expected.items():
        array = params["blocks"][name][...]
        assert array.sharding.spec == spec, name
        # each device really holds only its shard
        shard = array.addressable_shards[0].data.shape
        assert shard != array.shape and len(array.addressable_shards) == 8
    assert params["embed"][...].sharding.spec == P("model", embed)
    # Adam moments mirror the parameters' layout
    mu = fresh["opt"][1].mu  # chain(clip, scale_by_adam, add_decayed_weights)
    assert mu["blocks"]["w_up"][...].sharding.spec == expected["w_up"]


def test_qk_norm_scales_are_replicated_and_lm_info_lists_them(capsys):
    """Under muP with QK-norm the per-head norm scales (and their Adam moments) are whole on
    every device, the matrices sharded as ever; `lm info` counts and lists them."""
    overrides = ["model.qk_norm=true", "model.parametrization=mup", "model.base_width=16",
                 "model.d_model=64", "model.n_heads=8", "mesh.data=2", "mesh.model=4",
                 "mesh.fsdp=true"]
    lay = state.layout(small(*overrides))
    mu = lay.shardings["opt"][1].mu  # chain(clip, scale_by_adam, add_decayed_weights, muP)
    for tree in (lay.shardings["params"], mu):
        for name in ("q_norm", "k_norm"):
            assert tree["blocks"][name].get_value().spec == P(None, None), name
        assert tree["blocks"]["wq"].get_value().spec == P(None, "data", "model", None)
    base = ["info", "tiny", "--json", *overrides[:3]]
    assert cli.main(base) == 0
    info = json.loads(capsys.readouterr().out)
    specs = {p["name"]: p["spec"] for p in info["params"]}
    assert specs["blocks.q_norm"] == specs["blocks.k_norm"] == str(P(None, None))
    tiny = config.load("tiny", overrides[:3])
    assert info["params_total"] == flops.param_counts(tiny.model)["total"]
    assert info["params_total"] - flops.param_counts(config.load("tiny").model)["total"] == (
        2 * tiny.model.n_layers * tiny.model.head_dim)


def test_replica_axis_only_splits_the_batch():
    cfg = small("mesh.replica=2", "mesh.data=2", "mesh.model=2")
    lay = state.layout(cfg)
    assert lay.batch_sharding.spec == P(("replica", "data"), None)
    for leaf in jax.tree.leaves(lay.shardings):
        assert "replica" not in str(leaf.spec)


def test_collectives_appear_only_when_sharded():
    sharded = train.compile_program(small("mesh.data=4", "mesh.model=2"))
    single = train.compile_program(small(), jax.devices()[:1])
    counts = sharding.collectives(sharded.step.as_text())
    assert counts.get("all-reduce", 0) + counts.get("reduce-scatter", 0) > 0
    assert sharding.collectives(single.step.as_text()) == {}
