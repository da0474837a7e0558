"""Data preparation: files -> documents -> SentencePiece -> token files -> manifest."""

import json
import re

import numpy as np
import pytest

from lm import cli, corpus, data
from lm.errors import ConfigError, DataError

from conftest import small
from corpora import UNICODE, files_cfg, real, write_corpus


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_any_text(prepared):
    cfg, dataset = prepared
    sp = dataset.tokenizer()
    lengths = corpus.token_bytes(sp)
    for text in UNICODE:
        ids = sp.encode(text)
        assert sp.decode(ids) == text
        assert lengths[ids].sum() == len(text.encode())
    assert sp.vocab_size() == cfg.vocab_size and sp.eos_id() == corpus.EOD_ID
    assert corpus.tokenizer(cfg).encode(UNICODE[0]) == sp.encode(UNICODE[0])
    with pytest.raises(ConfigError, match="synthetic has no tokenizer"):
        corpus.tokenizer(small())


def test_prepared_default_corpus_and_its_validation_set(prepared):
    cfg, dataset = prepared
    m = dataset.manifest
    assert m["dtype"] == "uint16" and m["vocab_size"] == 384
    train, val = m["splits"]["train"], m["splits"]["val"]
    assert train["documents"] > 0 and val["documents"] > 0
    assert train["bytes"] + val["bytes"] >= cfg.data.max_bytes
    tokens = dataset.tokens("train", cfg.seq_len)
    assert len(tokens) == train["tokens"] and tokens[-1] == corpus.EOD_ID
    assert 1.2 < train["bytes_per_token"] < 4
    val_set = data.validation(cfg)
    assert val_set.shape == (8, cfg.seq_len + 1)
    np.testing.assert_array_equal(val_set[0], dataset.tokens("val", cfg.seq_len)[:cfg.seq_len + 1])
    assert data.bytes_per_token(cfg) == pytest.approx(val["bytes_per_token"], rel=0.3)


def test_splits_share_no_document_and_are_stable_across_runs(tmp_path):
    texts = write_corpus(tmp_path / "corpus")
    cfg = files_cfg(tmp_path)
    dataset = corpus.prepare(cfg)
    sp = dataset.tokenizer()
    found = {}
    for split in corpus.SPLITS:
        stream = np.asarray(dataset.tokens(split, 1)).tolist()
        ends = [i for i, t in enumerate(stream) if t == corpus.EOD_ID]
        found[split] = [sp.decode(stream[a + 1:b]) for a, b in zip([-1] + ends, ends)]
        assert len(found[split]) == dataset.manifest["splits"][split]["documents"]
    assert not set(found["train"]) & set(found["val"])
    assert sorted(found["train"] + found["val"]) == sorted(texts)
    again = corpus.prepare(files_cfg(tmp_path, f"data.cache_dir={tmp_path}/elsewhere"))
    assert again.dir != dataset.dir
    for name in ("train.bin", "val.bin"):  # the same tokenizer and tokens, built from scratch
        assert (again.dir / name).read_bytes() == (dataset.dir / name).read_bytes()
    np.testing.assert_array_equal(data.validation(cfg), data.validation(
        files_cfg(tmp_path, f"data.cache_dir={tmp_path}/elsewhere")))


def test_parallel_encoding_writes_the_same_files(prepared, tmp_path, monkeypatch):
    cfg, serial = prepared
    monkeypatch.setattr(corpus, "BATCH_BYTES", 50_000)  # several batches for 2 processes
    parallel = corpus.prepare(real(tmp_path, "data.workers=2"))
    for name in ("train.bin", "val.bin"):
        assert (parallel.dir / name).read_bytes() == (serial.dir / name).read_bytes()
    pieces = [[sp.id_to_piece(i) for i in range(sp.get_piece_size())]
              for sp in (parallel.tokenizer(), serial.tokenizer())]
    assert pieces[0] == pieces[1]  # the files differ only in the recorded num_threads


# --------------------------------------------------------------------------- prepare, reuse


def test_an_interrupted_prepare_leaves_no_manifest_and_is_redone(prepared, tmp_path,
                                                                 monkeypatch):
    cfg = real(tmp_path)
    monkeypatch.setattr(corpus, "BATCH_BYTES", 20_000)
    calls = []
    encode = corpus.Encoder.__call__

    def fail_midway(self, docs):
        calls.append(len(docs))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return encode(self, docs)

    monkeypatch.setattr(corpus.Encoder, "__call__", fail_midway)
    with pytest.raises(KeyboardInterrupt):
        corpus.prepare(cfg)
    (out,) = tmp_path.iterdir()
    assert sorted(p.name for p in out.iterdir()) == [corpus.TOKENIZER]  # no manifest, no tmp files
    monkeypatch.setattr(corpus.Encoder, "__call__", encode)
    redone = corpus.prepare(cfg)
    assert redone.dir == out
    for name in ("train.bin", "val.bin", corpus.MANIFEST):
        assert (out / name).is_file()
    assert (out / "train.bin").read_bytes() == (prepared[1].dir / "train.bin").read_bytes()


def test_a_matching_dataset_is_reused_and_a_change_rebuilds(prepared, tmp_path, monkeypatch):
    cfg, dataset = prepared
    write_corpus(tmp_path / "corpus")
    corpus.prepare(files_cfg(tmp_path))

    def no_build(*args):
        raise AssertionError("rebuilt")

    monkeypatch.setattr(corpus, "build", no_build)
    assert corpus.prepare(cfg) == dataset
    assert corpus.prepare(real(cfg.data.cache_dir, "data.seq_len=16", "data.workers=2")) == dataset
    assert corpus.prepare(files_cfg(tmp_path)).dir.parent == tmp_path / "cache"
    (tmp_path / "corpus" / "doc00.txt").write_text("an edited document\n")
    for changed in (real(cfg.data.cache_dir, "data.tokenizer=unigram"),
                    real(cfg.data.cache_dir, "data.val_fraction=0.3"),
                    files_cfg(tmp_path)):
        with pytest.raises(AssertionError, match="rebuilt"):
            corpus.prepare(changed)


def test_a_mismatching_manifest_is_rebuilt_in_place(tmp_path):
    write_corpus(tmp_path / "corpus")
    cfg = files_cfg(tmp_path)
    first = corpus.prepare(cfg)
    (first.dir / corpus.MANIFEST).write_text(json.dumps({**first.manifest, "hash": "stale"}))
    again = corpus.prepare(cfg)
    assert again.dir == first.dir and again.manifest["hash"] == first.manifest["hash"]


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("source, message", [
    ("{tmp}/missing.txt", "no such file"),
    ("{tmp}/*.nothing", "matches no file"),
    ("{tmp}", "is a directory"),
])
def test_missing_inputs_are_named(tmp_path, source, message):
    with pytest.raises(DataError, match=message):
        corpus.prepare(small(f"data.source={source.format(tmp=tmp_path)}", "model.vocab_size=320",
                           f"data.cache_dir={tmp_path}/cache"))


def test_empty_inputs_fail(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="holds no text"):
        corpus.prepare(small(f"data.source={tmp_path}/empty.txt", "model.vocab_size=320",
                           f"data.cache_dir={tmp_path}/cache"))


def test_bad_files_are_skipped_with_a_warning_or_fail(tmp_path):
    write_corpus(tmp_path / "corpus")
    (tmp_path / "corpus" / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    with pytest.warns(UserWarning, match=r"skipped 1 of 22 input files .*latin1.txt: not UTF-8"):
        dataset = corpus.prepare(files_cfg(tmp_path))
    assert [s["file"] for s in dataset.manifest["skipped"]] == [
        str(tmp_path / "corpus" / "latin1.txt")]
    with pytest.raises(DataError, match=r"latin1.txt: not UTF-8 .*data.on_bad_file=skip"):
        corpus.prepare(files_cfg(tmp_path, "data.on_bad_file=fail"))
    (tmp_path / "corpus" / "latin1.txt").unlink()
    (tmp_path / "corpus" / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 2 .*'text' \(data.text_field\)"):
        corpus.prepare(files_cfg(tmp_path, "data.on_bad_file=fail"))


def test_a_vocab_too_small_for_the_characters_says_what_would_work(tmp_path):
    cjk = "".join(chr(0x4E00 + i) for i in range(300))
    for i in range(4):
        (tmp_path / f"cjk{i}.txt").write_text((cjk + "\n") * 5)
    overrides = [f"data.source={tmp_path}/cjk*.txt", f"data.cache_dir={tmp_path}/cache",
                 "data.val_fraction=0.5"]
    with pytest.raises(DataError, match=r"data.vocab_size=320 is too small") as error:
        corpus.prepare(small("model.vocab_size=320", *overrides))
    need = int(re.search(r"at least (\d+)", str(error.value))[1])
    dataset = corpus.prepare(small(f"model.vocab_size={need}", *overrides))  # the advice works
    assert dataset.manifest["vocab_size"] == need


def test_a_vocab_too_large_for_the_text_says_what_would_work(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n")
    with pytest.raises(DataError, match=r"data.vocab_size=512 is more than .* <= \d+"):
        corpus.prepare(small("model.vocab_size=512", f"data.source={tmp_path}/a.txt",
                           f"data.cache_dir={tmp_path}/cache", "data.val_fraction=0.01"))


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
