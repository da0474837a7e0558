"""Token sources and deterministic, sharded batches: the same rows on every mesh, every
process and after a restart."""

import json

import jax
import numpy as np
import pytest

from lm import corpus, data, sharding, train
from lm.errors import DataError

from conftest import small
from corpora import files_cfg, real, write_corpus


def test_batches_are_the_same_on_every_mesh_and_after_a_restart(prepared):
    cfg, _ = prepared
    shape = (cfg.train.batch_size, cfg.seq_len + 1)
    first = data.source(cfg)
    expected = {step: first.rows(step, 0, shape[0]) for step in (0, 7, 2000)}
    assert first.epoch(2000) > 1  # the last one is from a later, reshuffled epoch
    for n_data, n_model in ((1, 1), (8, 1), (2, 4)):
        mesh_cfg = real(cfg.data.cache_dir, f"mesh.data={n_data}", f"mesh.model={n_model}")
        mesh = sharding.make_mesh(mesh_cfg, jax.devices()[: n_data * n_model])
        batch_sharding = sharding.named(mesh, sharding.rules(False), ("batch", None))
        restarted = data.source(mesh_cfg)  # a fresh loader, as after a restart
        for step, rows in expected.items():
            batch = data.global_batch(restarted, step, batch_sharding, shape)
            np.testing.assert_array_equal(np.asarray(batch), rows)
    assert not np.array_equal(expected[0], expected[7])


def test_prefetched_batches_equal_direct_ones_and_pass_on_errors(prepared):
    cfg, _ = prepared
    mesh = sharding.make_mesh(real(cfg.data.cache_dir, "mesh.data=4", "mesh.model=2"))
    batch_sharding = sharding.named(mesh, sharding.rules(False), ("batch", None))
    shape = (cfg.train.batch_size, cfg.seq_len + 1)
    src = data.source(cfg)
    got = list(data.batches(src, batch_sharding, shape, start=3, stop=9, prefetch=2))
    assert [step for step, _ in got] == list(range(3, 9))
    for step, batch in got:
        np.testing.assert_array_equal(np.asarray(batch), src.rows(step, 0, shape[0]))

    class Broken:
        def rows(self, step, lo, hi):
            raise RuntimeError(f"bad step {step}")

    with pytest.raises(RuntimeError, match="bad step 0"):
        next(data.batches(Broken(), batch_sharding, shape, 0, 5))


def test_windows_cover_every_token_once_per_epoch_in_a_new_order():
    tokens = np.arange(101)  # 10 windows of 10 + 1 tokens
    src = data.Packed(tokens, seq_len=10, batch_size=4, seed=3)
    rows = np.concatenate([src.rows(step, 0, 4) for step in range(5)])  # 2 epochs
    np.testing.assert_array_equal(rows[:, 1:] - rows[:, :-1], 1)  # contiguous windows
    assert np.all(rows[:, 0] % 10 == 0)
    for epoch in (rows[:10], rows[10:]):
        np.testing.assert_array_equal(np.sort(epoch[:, 1:].ravel()), np.arange(1, 101))
    assert not np.array_equal(rows[:10], rows[10:])
    np.testing.assert_array_equal(src.rows(2, 1, 3), rows[9:11])  # a batch across epochs
    assert src.epoch(5) == 2.0 and src.epoch(1) == 0.4


def test_synthetic_validation_is_fixed_and_apart_from_training():
    cfg = small("data.val_sequences=16")
    val = data.validation(cfg)
    assert val.shape == (16, cfg.seq_len + 1) and val.dtype == np.int32
    np.testing.assert_array_equal(val, data.validation(small("data.val_sequences=16",
                                                             "train.seed=7")))
    train_rows = {tuple(r) for step in range(20) for r in data.source(cfg).rows(step, 0, 8)}
    assert not train_rows & {tuple(r) for r in val}
    assert data.bytes_per_token(cfg) is None and data.source(cfg).epoch(100) == 0.0


def test_sequences_longer_than_the_data_fail(prepared):
    cfg, _ = prepared
    with pytest.raises(DataError, match=r"train.bin holds \d+ tokens, fewer than one "
                                             r"sequence of data.seq_len"):
        data.source(real(cfg.data.cache_dir, "model.context=1000000"))
    with pytest.raises(DataError, match=r"val.bin holds \d+ sequences .* fewer than "
                                             r"data.val_sequences=100000"):
        data.validation(real(cfg.data.cache_dir, "data.val_sequences=100000"))


def test_a_token_file_that_does_not_match_its_manifest_fails(tmp_path):
    write_corpus(tmp_path / "corpus")
    cfg = files_cfg(tmp_path)
    path = corpus.prepare(cfg).dir / "train.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"train.bin has [\d,]+ bytes but .* Delete .* again"):
        data.source(cfg)


def test_short_training_on_the_default_corpus_reduces_validation_loss(prepared, tmp_path):
    cfg, _ = prepared
    run = tmp_path / "run"
    last = train.train(real(cfg.data.cache_dir, "train.steps=30", "optim.lr=1e-2",
                            "optim.warmup_steps=3", "eval.log_points=2", "data.val_sequences=16",
                            f"train.run_dir={run}", "mesh.data=-1", "train.log_every=10"))
    rows = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 30]
    assert rows[1]["loss"] < rows[0]["loss"] - 5 * rows[0]["loss_sem"]
    assert rows[1]["bpb"] < rows[0]["bpb"] and 0 < last["epoch"]
