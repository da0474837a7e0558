"""Token sources and deterministic, sharded batches: the same rows on every mesh, every
process and after a restart."""

import json
import math

import jax
import numpy as np
import pytest

from lm import cli, config as config_lib, corpus, data, evaluate, rundir, sharding, train
from lm.errors import DataError

from conftest import small
from corpora import README, files_cfg, real, stdlib_texts, write_corpus


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
    (name, (val, bytes_per_token)), = data.validation_sets(cfg).items()
    assert name == "val" and val.shape == (16, cfg.seq_len + 1) and val.dtype == np.int32
    np.testing.assert_array_equal(val, data.validation_sets(small("data.val_sequences=16",
                                                                  "train.seed=7"))["val"].rows)
    train_rows = {tuple(r) for step in range(20) for r in data.source(cfg).rows(step, 0, 8)}
    assert not train_rows & {tuple(r) for r in val}
    assert bytes_per_token is None and data.source(cfg).epoch(100) == 0.0


def test_sequences_longer_than_the_data_fail(prepared):
    cfg, dataset = prepared
    with pytest.raises(DataError, match=r"train.bin holds \d+ tokens of data.source='default', "
                                        r"fewer than one sequence of data.seq_len"):
        data.source(real(cfg.data.cache_dir, "model.context=1000000"))
    longer = dataset.manifest["splits"]["val"]["tokens"]  # than the validation tokens alone
    with pytest.raises(DataError, match=r"val.bin holds \d+ tokens .* fewer than one sequence "
                                        r".* \(or raise data.val_fraction\)"):
        data.validation_sets(real(cfg.data.cache_dir, f"model.context={longer}"))


def test_a_validation_set_shorter_than_asked_is_all_of_it_with_a_warning(prepared):
    cfg, dataset = prepared
    have = (dataset.manifest["splits"]["val"]["tokens"] - 1) // cfg.seq_len
    with pytest.warns(UserWarning, match=rf"val.bin .* holds {have} sequences .* fewer than the "
                                         r"100000 of data.val_sequences"):
        val = data.validation_sets(real(cfg.data.cache_dir, "data.val_sequences=100000"))["val"]
    every = data.windows(dataset.tokens("val"), np.arange(have), cfg.seq_len)
    np.testing.assert_array_equal(val.rows, every)


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


def test_a_single_file_corpus_trains_and_evaluates_with_the_default_settings(tmp_path):
    (tmp_path / "input.txt").write_text("".join(stdlib_texts(600_000)))
    cfg = small(f"data.source={tmp_path}/input.txt", "model.vocab_size=384",
                f"data.cache_dir={tmp_path}/cache", f"train.run_dir={tmp_path}/run",
                "mesh.data=-1", "eval.log_points=2")
    train.train(cfg)
    rows = rundir.evals(tmp_path / "run")
    assert [(r["step"], r["set"]) for r in rows] == [(1, "val"), (4, "val")]
    # data.val_fraction=0.02 of the one file, in spans, holds all data.val_sequences=128
    assert rows[-1]["eval_tokens"] == 128 * cfg.seq_len and 0 < rows[-1]["bpb"] < 8
    splits = corpus.prepare(cfg).manifest["splits"]
    assert splits["val"]["holdout"] == "positions"
    # The corpus changes under the run: its tokenizer would be trained anew. Resuming,
    # evaluating and sampling refuse, and leave the run as it was.
    run = tmp_path / "run"
    recorded = json.loads((run / rundir.DATA).read_text())
    assert recorded == corpus.identity(cfg)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}
    with pytest.raises(DataError, match="other data"):  # its model, on synthetic tokens
        evaluate.evaluate_run(run, ["data.source=synthetic"])
    synthetic = tmp_path / "synthetic"  # and a synthetic run's, on this text
    train.train(small("model.vocab_size=384", f"train.run_dir={synthetic}", "mesh.data=-1"))
    with pytest.raises(DataError, match="other data"):
        evaluate.evaluate_run(synthetic, [f"data.source={tmp_path}/input.txt",
                                          f"data.cache_dir={tmp_path}/cache"])
    with open(tmp_path / "input.txt", "a") as f:
        f.write("".join(stdlib_texts(300_000, skip=400)))
    with pytest.raises(DataError, match="tokenizer_sha256, train_tokens differ"):
        train.train(config_lib.replace(cfg, train={"steps": 8}))
    with pytest.raises(DataError, match="other data"):
        evaluate.evaluate_run(run)
    assert cli.main(["sample", str(run), "--prompt", "def"]) == 2
    assert {p.name: p.read_bytes() for p in run.iterdir()
            if p.is_file() and p.name != ".lock"} == before


def test_val_source_and_named_sets_are_evaluated_and_reported_apart(tmp_path, capsys):
    code = stdlib_texts(200_000, skip=300)
    (tmp_path / "train.py").write_text("".join(code[:-3]))
    (tmp_path / "heldout.py").write_text(code[-3])
    (tmp_path / "code").mkdir()
    for i, text in enumerate(code[-2:]):
        (tmp_path / "code" / f"{i}.py").write_text(text)
    run = tmp_path / "run"
    cfg = small(f"data.source={tmp_path}/train.py", f"data.val_source={tmp_path}/heldout.py",
                f"data.val_sets={{code: '{tmp_path}/code/*.py', prose: '{README}'}}",
                "model.vocab_size=384", "data.val_sequences=8", f"data.cache_dir={tmp_path}/c",
                f"train.run_dir={run}", "mesh.data=-1", "eval.log_points=2")
    train.train(cfg)
    dataset = corpus.prepare(cfg)
    assert list(dataset.manifest["splits"]) == ["train"]  # nothing held out of data.source
    sets = data.validation_sets(cfg)
    np.testing.assert_array_equal(sets["val"].rows[0],
                                  dataset.sets["val"].tokens("val")[:cfg.seq_len + 1])
    rows = rundir.evals(run)
    assert [(r["step"], r["set"]) for r in rows] == [
        (step, name) for step in (1, 4) for name in ("val", "code", "prose")]
    for r in rows:  # each set's bits per byte with its own bytes per token
        assert r["bpb"] == pytest.approx(r["loss"] / math.log(2) / sets[r["set"]].bytes_per_token)
        assert r["loss_sem"] > 0 and r["eval_tokens"] == 8 * cfg.seq_len
    assert sets["code"].bytes_per_token != pytest.approx(sets["prose"].bytes_per_token, rel=0.05)
    # lm eval prints a row per set, and appends only the rows of a set added later
    argv = ["eval", str(run), "--all", "--cpu-devices", "8", f"data.val_sets.more={README}"]
    assert cli.main(argv) == 0
    printed = [line.split()[:2] for line in capsys.readouterr().out.splitlines()[1:]]
    assert printed == [["4", name] for name in ("val", "code", "prose", "more")]
    assert [(r["step"], r["set"]) for r in rundir.evals(run)[6:]] == [(4, "more")]
    # sampling needs the tokenizer, not validation files moved since; by default it fills
    # the context the prompt leaves (32 - 1 tokens here)
    (tmp_path / "code").rename(tmp_path / "code-moved")
    assert cli.main(["sample", str(run), "--prompt", "d", "--temperature", "0"]) == 0
    assert len(corpus.tokenizer(cfg).encode(capsys.readouterr().out.strip())) >= 16


# --------------------------------------------------------------------------- mixtures


def mixture_cfg(tmp_path, weights=(0.7, 0.3), *overrides):
    """Python source and prose, mixed by `weights`."""
    sources = tmp_path / "code.py", tmp_path / "prose.md"
    if not sources[0].exists():
        sources[0].write_text("".join(stdlib_texts(150_000)))
        sources[1].write_text(README.read_text()[:20_000])  # a fixed, small prose source
    entries = ", ".join(f"{{source: '{p}', weight: {w}}}" for p, w in zip(sources, weights))
    return small(f"data.mixture=[{entries}]", "data.source=default", "model.vocab_size=384",
                 "data.workers=1", "data.val_sequences=8", f"data.cache_dir={tmp_path}/cache",
                 *overrides)


def test_a_mixture_draws_rows_by_weight_the_same_on_every_mesh(tmp_path, monkeypatch):
    cfg = mixture_cfg(tmp_path)
    dataset = corpus.prepare(cfg)
    origin = {split: {} for split in corpus.SPLITS}  # every window of a split -> its source
    for split in corpus.SPLITS:
        for k, name in enumerate(dataset.splits(split)):
            tokens = dataset.tokens(name)
            index = np.arange((len(tokens) - 1) // cfg.seq_len)
            origin[split] |= {tuple(w): k for w in data.windows(tokens, index, cfg.seq_len)}
    src, steps = data.source(cfg), 300
    rows = np.concatenate([src.rows(step, 0, 8) for step in range(steps)])
    code = np.mean([origin["train"][tuple(r)] == 0 for r in rows])
    assert abs(code - 0.7) < 3 * math.sqrt(0.7 * 0.3 / len(rows))  # within sampling error
    assert list(src.shares(steps).values()) == pytest.approx([code, 1 - code])
    assert src.epoch(steps) > 1  # the small prose repeats, in a new order
    mesh = sharding.make_mesh(mixture_cfg(tmp_path, (0.7, 0.3), "mesh.data=4", "mesh.model=2"))
    batch_sharding = sharding.named(mesh, sharding.rules(False), ("batch", None))
    restarted = data.source(cfg)
    for step in (0, 7, 250):
        batch = data.global_batch(restarted, step, batch_sharding, (8, cfg.seq_len + 1))
        np.testing.assert_array_equal(np.asarray(batch), rows[8 * step:8 * step + 8])
    val = data.validation_sets(cfg)["val"].rows  # 8 sequences, 6 and 2 held out of each
    assert [origin["val"][tuple(r)] for r in val] == [0] * 6 + [1] * 2

    def no_build(*args):
        raise AssertionError("rebuilt")

    monkeypatch.setattr(corpus, "build", no_build)  # new weights use the prepared sources
    assert corpus.prepare(mixture_cfg(tmp_path, (0.5, 0.5))) == dataset


def test_training_on_a_mixture_logs_its_realised_shares(tmp_path):
    cfg = mixture_cfg(tmp_path, (0.7, 0.3), f"train.run_dir={tmp_path}/run", "mesh.data=-1")
    train.train(cfg)
    shares = [r["mixture"] for r in rundir.metrics(tmp_path / "run")]
    assert shares == [data.source(cfg).shares(step) for step in range(1, 5)]
    assert list(shares[-1].values()) == pytest.approx([0.7, 0.3], abs=1 / 32)
