"""The data path: corpus -> SentencePiece -> token files -> deterministic, sharded batches."""

import json
import re

import jax
import numpy as np
import pytest

from lm import cli, data, sharding, train
from lm.config import ConfigError

from conftest import small

UNICODE = [
    "def f(x):\n\treturn {'ключ': x ** 2}  # Größe\n",
    "日本語のテキストと中文文本, 한국어도.\n\n\n",
    "emoji 😀👍🏽 and flags 🇫🇷, zero\u200bwidth, e\u0301 vs \u00e9, \ufb01 ligature",
    "   leading spaces, trailing spaces   \r\nwindows line\r\n\x00\x07 control bytes",
    "",
    " ",
    "\u2028line separator\u2029paragraph ¶ § ∑ ∫ ≤ ≥ ≠ — “quotes” ‘single’",
]


def real(cache, *overrides):
    """A small model on a 300 kB prefix of the default corpus, prepared into `cache`."""
    return small("data.source=default", "data.max_bytes=300000", "model.vocab_size=384",
                 "data.val_fraction=0.2", "data.val_sequences=8", "data.workers=1",
                 f"data.cache_dir={cache}", *overrides)


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture(scope="session")
def prepared(cache):
    cfg = real(cache)
    return cfg, data.prepare(cfg)


WORDS = ("the of and to in a data model loss token batch mesh shard step seed epoch window "
         "value naïve café 日本 θ").split()


def write_corpus(root, n_txt=20, n_jsonl=20):
    """Distinct documents of words: `n_txt` .txt files and one .jsonl file of `n_jsonl` lines."""
    rng = np.random.default_rng(0)

    def text(i):
        return f"document {i}: " + " ".join(rng.choice(WORDS, 80)) + ".\n"

    root.mkdir(parents=True, exist_ok=True)
    texts = [text(i) for i in range(n_txt + n_jsonl)]
    for i, t in enumerate(texts[:n_txt]):
        (root / f"doc{i:02d}.txt").write_text(t)
    (root / "more.jsonl").write_text(
        "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts[n_txt:])))
    return texts


def files_cfg(tmp_path, *overrides):
    return small(f"data.source={tmp_path}/corpus/*.txt,{tmp_path}/corpus/*.jsonl",
                 "model.vocab_size=320", "data.val_fraction=0.25", "data.val_sequences=2",
                 "data.workers=1", f"data.cache_dir={tmp_path}/cache", *overrides)


# --------------------------------------------------------------------------- batches


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


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_any_text(prepared):
    cfg, dataset = prepared
    sp = dataset.tokenizer()
    lengths = data.token_bytes(sp)
    for text in UNICODE:
        ids = sp.encode(text)
        assert sp.decode(ids) == text
        assert lengths[ids].sum() == len(text.encode())
    assert sp.vocab_size() == cfg.vocab_size and sp.eos_id() == data.EOD_ID
    assert data.tokenizer(cfg).encode(UNICODE[0]) == sp.encode(UNICODE[0])
    with pytest.raises(ConfigError, match="synthetic has no tokenizer"):
        data.tokenizer(small())


def test_prepared_default_corpus_and_its_validation_set(prepared):
    cfg, dataset = prepared
    m = dataset.manifest
    assert m["dtype"] == "uint16" and m["vocab_size"] == 384
    train, val = m["splits"]["train"], m["splits"]["val"]
    assert train["documents"] > 0 and val["documents"] > 0
    assert train["bytes"] + val["bytes"] >= cfg.data.max_bytes
    tokens = dataset.tokens("train", cfg.seq_len)
    assert len(tokens) == train["tokens"] and tokens[-1] == data.EOD_ID
    assert 1.2 < train["bytes_per_token"] < 4
    val_set = data.validation(cfg)
    assert val_set.shape == (8, cfg.seq_len + 1)
    np.testing.assert_array_equal(val_set[0], dataset.tokens("val", cfg.seq_len)[:cfg.seq_len + 1])
    assert data.bytes_per_token(cfg) == pytest.approx(val["bytes_per_token"], rel=0.3)


def test_splits_share_no_document_and_are_stable_across_runs(tmp_path):
    texts = write_corpus(tmp_path / "corpus")
    cfg = files_cfg(tmp_path)
    dataset = data.prepare(cfg)
    sp = dataset.tokenizer()
    found = {}
    for split in data.SPLITS:
        stream = np.asarray(dataset.tokens(split, 1)).tolist()
        ends = [i for i, t in enumerate(stream) if t == data.EOD_ID]
        found[split] = [sp.decode(stream[a + 1:b]) for a, b in zip([-1] + ends, ends)]
        assert len(found[split]) == dataset.manifest["splits"][split]["documents"]
    assert not set(found["train"]) & set(found["val"])
    assert sorted(found["train"] + found["val"]) == sorted(texts)
    again = data.prepare(files_cfg(tmp_path, f"data.cache_dir={tmp_path}/elsewhere"))
    assert again.dir != dataset.dir
    for name in ("train.bin", "val.bin"):  # the same tokenizer and tokens, built from scratch
        assert (again.dir / name).read_bytes() == (dataset.dir / name).read_bytes()
    np.testing.assert_array_equal(data.validation(cfg), data.validation(
        files_cfg(tmp_path, f"data.cache_dir={tmp_path}/elsewhere")))


def test_parallel_encoding_writes_the_same_files(prepared, tmp_path, monkeypatch):
    cfg, serial = prepared
    monkeypatch.setattr(data, "BATCH_BYTES", 50_000)  # several batches for 2 processes
    parallel = data.prepare(real(tmp_path, "data.workers=2"))
    for name in ("train.bin", "val.bin"):
        assert (parallel.dir / name).read_bytes() == (serial.dir / name).read_bytes()
    pieces = [[sp.id_to_piece(i) for i in range(sp.get_piece_size())]
              for sp in (parallel.tokenizer(), serial.tokenizer())]
    assert pieces[0] == pieces[1]  # the files differ only in the recorded num_threads


# --------------------------------------------------------------------------- prepare, reuse


def test_an_interrupted_prepare_leaves_no_manifest_and_is_redone(prepared, tmp_path,
                                                                 monkeypatch):
    cfg = real(tmp_path)
    monkeypatch.setattr(data, "BATCH_BYTES", 20_000)
    calls = []
    encode = data.Encoder.__call__

    def fail_midway(self, docs):
        calls.append(len(docs))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return encode(self, docs)

    monkeypatch.setattr(data.Encoder, "__call__", fail_midway)
    with pytest.raises(KeyboardInterrupt):
        data.prepare(cfg)
    (out,) = tmp_path.iterdir()
    assert sorted(p.name for p in out.iterdir()) == [data.TOKENIZER]  # no manifest, no tmp files
    monkeypatch.setattr(data.Encoder, "__call__", encode)
    redone = data.prepare(cfg)
    assert redone.dir == out
    for name in ("train.bin", "val.bin", data.MANIFEST):
        assert (out / name).is_file()
    assert (out / "train.bin").read_bytes() == (prepared[1].dir / "train.bin").read_bytes()


def test_a_matching_dataset_is_reused_and_a_change_rebuilds(prepared, tmp_path, monkeypatch):
    cfg, dataset = prepared
    write_corpus(tmp_path / "corpus")
    data.prepare(files_cfg(tmp_path))

    def no_build(*args):
        raise AssertionError("rebuilt")

    monkeypatch.setattr(data, "build", no_build)
    assert data.prepare(cfg) == dataset
    assert data.prepare(real(cfg.data.cache_dir, "data.seq_len=16", "data.workers=2")) == dataset
    assert data.prepare(files_cfg(tmp_path)).dir.parent == tmp_path / "cache"
    (tmp_path / "corpus" / "doc00.txt").write_text("an edited document\n")
    for changed in (real(cfg.data.cache_dir, "data.tokenizer=unigram"),
                    real(cfg.data.cache_dir, "data.val_fraction=0.3"),
                    files_cfg(tmp_path)):
        with pytest.raises(AssertionError, match="rebuilt"):
            data.prepare(changed)


def test_a_mismatching_manifest_is_rebuilt_in_place(tmp_path):
    write_corpus(tmp_path / "corpus")
    cfg = files_cfg(tmp_path)
    first = data.prepare(cfg)
    (first.dir / data.MANIFEST).write_text(json.dumps({**first.manifest, "hash": "stale"}))
    again = data.prepare(cfg)
    assert again.dir == first.dir and again.manifest["hash"] == first.manifest["hash"]


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("source, message", [
    ("{tmp}/missing.txt", "no such file"),
    ("{tmp}/*.nothing", "matches no file"),
    ("{tmp}", "is a directory"),
])
def test_missing_inputs_are_named(tmp_path, source, message):
    with pytest.raises(data.DataError, match=message):
        data.prepare(small(f"data.source={source.format(tmp=tmp_path)}", "model.vocab_size=320",
                           f"data.cache_dir={tmp_path}/cache"))


def test_empty_inputs_fail(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(data.DataError, match="holds no text"):
        data.prepare(small(f"data.source={tmp_path}/empty.txt", "model.vocab_size=320",
                           f"data.cache_dir={tmp_path}/cache"))


def test_bad_files_are_skipped_with_a_warning_or_fail(tmp_path):
    write_corpus(tmp_path / "corpus")
    (tmp_path / "corpus" / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    with pytest.warns(UserWarning, match=r"skipped 1 of 22 input files .*latin1.txt: not UTF-8"):
        dataset = data.prepare(files_cfg(tmp_path))
    assert [s["file"] for s in dataset.manifest["skipped"]] == [
        str(tmp_path / "corpus" / "latin1.txt")]
    with pytest.raises(data.DataError, match=r"latin1.txt: not UTF-8 .*data.on_bad_file=skip"):
        data.prepare(files_cfg(tmp_path, "data.on_bad_file=fail"))
    (tmp_path / "corpus" / "latin1.txt").unlink()
    (tmp_path / "corpus" / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(data.DataError, match=r"bad.jsonl: line 2 .*'text' \(data.text_field\)"):
        data.prepare(files_cfg(tmp_path, "data.on_bad_file=fail"))


def test_a_vocab_too_small_for_the_characters_says_what_would_work(tmp_path):
    cjk = "".join(chr(0x4E00 + i) for i in range(300))
    for i in range(4):
        (tmp_path / f"cjk{i}.txt").write_text((cjk + "\n") * 5)
    overrides = [f"data.source={tmp_path}/cjk*.txt", f"data.cache_dir={tmp_path}/cache",
                 "data.val_fraction=0.5"]
    with pytest.raises(data.DataError, match=r"data.vocab_size=320 is too small") as error:
        data.prepare(small("model.vocab_size=320", *overrides))
    need = int(re.search(r"at least (\d+)", str(error.value))[1])
    dataset = data.prepare(small(f"model.vocab_size={need}", *overrides))  # the advice works
    assert dataset.manifest["vocab_size"] == need


def test_a_vocab_too_large_for_the_text_says_what_would_work(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n")
    with pytest.raises(data.DataError, match=r"data.vocab_size=512 is more than .* <= \d+"):
        data.prepare(small("model.vocab_size=512", f"data.source={tmp_path}/a.txt",
                           f"data.cache_dir={tmp_path}/cache", "data.val_fraction=0.01"))


def test_sequences_longer_than_the_data_fail(prepared):
    cfg, _ = prepared
    with pytest.raises(data.DataError, match=r"train.bin holds \d+ tokens, fewer than one "
                                             r"sequence of data.seq_len"):
        data.source(real(cfg.data.cache_dir, "model.context=1000000"))
    with pytest.raises(data.DataError, match=r"val.bin holds \d+ sequences .* fewer than "
                                             r"data.val_sequences=100000"):
        data.validation(real(cfg.data.cache_dir, "data.val_sequences=100000"))


def test_a_token_file_that_does_not_match_its_manifest_fails(tmp_path):
    write_corpus(tmp_path / "corpus")
    cfg = files_cfg(tmp_path)
    path = data.prepare(cfg).dir / "train.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(data.DataError, match=r"train.bin has [\d,]+ bytes but .* Delete .* again"):
        data.source(cfg)


@pytest.mark.parametrize("override, key", [
    ("data.val_fraction=1.5", "data.val_fraction"),
    ("data.workers=-1", "data.workers"),
    ("data.max_bytes=-5", "data.max_bytes"),
    ("data.val_sequences=0", "data.val_sequences"),
    ("data.tokenizer=wordpiece", "data.tokenizer"),
    ("data.on_bad_file=ignore", "data.on_bad_file"),
    ("data.source=' , '", "data.source"),
    ("data.source=default", "data.vocab_size"),  # small(): vocab 128, too few for bytes
])
def test_bad_settings_name_their_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        small(override)


def test_cli_prepares_and_reports(prepared, capsys):
    cfg, dataset = prepared
    argv = ["data", "prepare", "tiny", "data.source=default", "data.max_bytes=300000",
            "data.vocab_size=384", "data.val_fraction=0.2", f"data.cache_dir={cfg.data.cache_dir}"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert str(dataset.dir) in out and "bytes/token" in out
    assert cli.main(["data", "prepare", "tiny", "data.source=/no/such.txt"]) == 2
    assert "no such file" in capsys.readouterr().err


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
