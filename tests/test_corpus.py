"""Data preparation: files -> documents -> SentencePiece -> token files -> manifest."""

import concurrent.futures
import gzip
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lm import cli, corpus, data
from lm.errors import ConfigError, DataError

from conftest import small
from corpora import UNICODE, decoded, files_cfg, real, stdlib_texts, write_corpus


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
    assert train["holdout"] == val["holdout"] == "documents"  # enough documents to draw from
    (name, val_set), = data.validation_sets(cfg).items()
    assert name == "val" and val_set.rows.shape == (8, cfg.seq_len + 1)
    np.testing.assert_array_equal(val_set.rows[0],
                                  dataset.tokens("val", cfg.seq_len)[:cfg.seq_len + 1])
    assert val_set.bytes_per_token == pytest.approx(val["bytes_per_token"], rel=0.3)


def test_splits_share_no_document_and_are_stable_across_runs(tmp_path):
    texts = write_corpus(tmp_path / "corpus")
    cfg = files_cfg(tmp_path)
    dataset = corpus.prepare(cfg)
    found = {}
    for split in corpus.SPLITS:
        found[split] = decoded(dataset, split)
        assert len(found[split]) == dataset.manifest["splits"][split]["documents"]
    assert not set(found["train"]) & set(found["val"])
    assert sorted(found["train"] + found["val"]) == sorted(texts)
    again = corpus.prepare(files_cfg(tmp_path, f"data.cache_dir={tmp_path}/elsewhere"))
    assert again.dir != dataset.dir
    for name in ("train.bin", "val.bin"):  # the same tokenizer and tokens, built from scratch
        assert (again.dir / name).read_bytes() == (dataset.dir / name).read_bytes()
    np.testing.assert_array_equal(data.validation_sets(cfg)["val"].rows, data.validation_sets(
        files_cfg(tmp_path, f"data.cache_dir={tmp_path}/elsewhere"))["val"].rows)


def test_parallel_encoding_writes_the_same_files(prepared, tmp_path, monkeypatch):
    cfg, serial = prepared
    monkeypatch.setattr(corpus, "BATCH_BYTES", 50_000)  # several batches for 2 processes
    parallel = corpus.prepare(real(tmp_path, "data.workers=2"))
    for name in ("train.bin", "val.bin"):
        assert (parallel.dir / name).read_bytes() == (serial.dir / name).read_bytes()
    pieces = [[sp.id_to_piece(i) for i in range(sp.get_piece_size())]
              for sp in (parallel.tokenizer(), serial.tokenizer())]
    assert pieces[0] == pieces[1]  # the files differ only in the recorded num_threads


# --------------------------------------------------------------------------- holding out


def text_cfg(tmp_path, source, *overrides):
    return small(f"data.source={source}", "model.vocab_size=384", "data.workers=1",
                 f"data.cache_dir={tmp_path}/cache", *overrides)


def test_a_single_file_is_held_out_in_spans_that_share_no_token(tmp_path):
    text = "".join(stdlib_texts(300_000))
    (tmp_path / "input.txt").write_text(text)
    dataset = corpus.prepare(text_cfg(tmp_path, tmp_path / "input.txt"))  # data.val_fraction=0.02
    splits = dataset.manifest["splits"]
    assert splits["train"]["holdout"] == splits["val"]["holdout"] == "positions"
    assert splits["val"]["bytes"] / len(text.encode()) == pytest.approx(0.02, rel=0.02)
    found = {split: decoded(dataset, split) for split in corpus.SPLITS}
    assert len(found["val"]) == math.ceil(0.02 * len(text) / corpus.SPAN_CHARS)  # spread out
    # train and validation pieces alternate through the file: every character is in one split
    alternating = itertools.chain(*itertools.zip_longest(found["train"], found["val"],
                                                         fillvalue=""))
    assert "".join(alternating) == text
    assert all(piece.endswith("\n") for piece in found["train"][:-1])  # spans start lines
    again = corpus.prepare(text_cfg(tmp_path, tmp_path / "input.txt",
                                    f"data.cache_dir={tmp_path}/elsewhere"))
    for name in ("train.bin", "val.bin"):  # deterministic
        assert (again.dir / name).read_bytes() == (dataset.dir / name).read_bytes()


def test_each_of_a_few_documents_gives_its_share_to_validation(tmp_path):
    texts = stdlib_texts(100_000, skip=40)[:3]
    for i, text in enumerate(texts):
        (tmp_path / f"doc{i}.py").write_text(text)
    dataset = corpus.prepare(text_cfg(tmp_path, f"{tmp_path}/doc*.py"))  # 2%: no whole one
    assert dataset.manifest["splits"]["val"]["holdout"] == "positions"
    held = decoded(dataset, "val")
    assert {next(i for i, t in enumerate(texts) if piece in t) for piece in held} == {0, 1, 2}
    for text in texts:
        mine = sum(len(piece) for piece in held if piece in text)
        assert mine / len(text) == pytest.approx(0.02, abs=0.01)  # edges moved to line starts


# --------------------------------------------------------------------------- formats


def write_formats(root, texts):
    """`texts` as .txt files, .txt.gz files, a .jsonl.gz file, a Parquet file of row groups of
    two and a dataset saved as datasets.save_to_disk does; the source of each."""
    for i, text in enumerate(texts):
        (root / "txt").mkdir(exist_ok=True)
        (root / "txt" / f"doc{i}.txt").write_text(text)
        (root / "gz").mkdir(exist_ok=True)
        (root / "gz" / f"doc{i}.txt.gz").write_bytes(gzip.compress(text.encode()))
    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts)
    (root / "docs.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    table = pa.table({"id": list(range(len(texts))), "text": texts})
    pq.write_table(table, root / "docs.parquet", row_group_size=2)
    saved = root / "saved"
    saved.mkdir()
    with pa.ipc.new_stream(saved / "data-00000-of-00001.arrow", table.schema) as stream:
        for batch in table.to_batches(max_chunksize=2):
            stream.write_batch(batch)
    (saved / "dataset_info.json").write_text(json.dumps(
        {"features": {"id": {"dtype": "int64", "_type": "Value"},
                      "text": {"dtype": "string", "_type": "Value"}}}))
    (saved / "state.json").write_text(json.dumps(
        {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_fingerprint": "0",
         "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
         "_output_all_columns": False, "_split": None}))
    return {"txt": f"{root}/txt/*.txt", "gz": f"{root}/gz/*.txt.gz",
            "jsonl": f"{root}/docs.jsonl.gz", "parquet": f"{root}/docs.parquet", "arrow": saved}


def test_parquet_gzip_and_saved_arrow_give_the_same_tokens_as_text(tmp_path, monkeypatch):
    texts = stdlib_texts(60_000, skip=100)
    sources = write_formats(tmp_path, texts)
    read_groups = []
    monkeypatch.setattr(pq.ParquetFile, "read", None)  # never the whole file at once
    read_group = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, **kw: read_groups.append(i) or read_group(self, i, **kw))
    cfg = text_cfg(tmp_path, sources["txt"], "data.val_fraction=0.25",
                   "data.val_sets={" + ", ".join(f"{k}: '{v}'" for k, v in sources.items()) + "}")
    dataset = corpus.prepare(cfg)
    assert read_groups == list(range(math.ceil(len(texts) / 2)))  # each group of 2 rows, once
    tokens = {name: (d.dir / "val.bin").read_bytes() for name, d in dataset.sets.items()}
    assert set(tokens) == set(sources) and len(set(tokens.values())) == 1
    assert decoded(dataset.sets["parquet"], "val") == texts
    # gzip keeps each document's key, so its split: the same dataset as the text
    zipped = corpus.prepare(text_cfg(tmp_path, sources["gz"], "data.val_fraction=0.25"))
    for name in ("tokenizer.model", "train.bin", "val.bin"):
        assert (zipped.dir / name).read_bytes() == (dataset.dir / name).read_bytes()
    for kind in ("parquet", "arrow"):  # rows are documents to train on, too
        rows = corpus.prepare(text_cfg(tmp_path, sources[kind], "data.val_fraction=0.25"))
        assert sorted(decoded(rows, "train") + decoded(rows, "val")) == sorted(texts)


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
    assert sorted(p.name for p in out.iterdir()) == [corpus.BUILD_LOCK, corpus.TOKENIZER]
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


def test_processes_preparing_a_dataset_at_once_build_it_once(prepared, tmp_path, monkeypatch):
    """A sweep's workers start together on a fresh cache: the first builds, the others wait for
    it and reuse its build (the main job's two workers, each building its own, took 12.7 s where
    one build takes 6.3 s)."""
    cfg = real(tmp_path)
    builds = []
    build = corpus.build

    def slow_build(*args):  # long enough for every other caller to find no manifest
        builds.append(args)
        time.sleep(0.5)
        return build(*args)

    monkeypatch.setattr(corpus, "build", slow_build)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:  # a lock per open file: as processes
        datasets = list(pool.map(lambda _: corpus.prepare(cfg), range(3)))
    assert len(builds) == 1 and datasets[0] == datasets[1] == datasets[2]
    assert (datasets[0].dir / "train.bin").read_bytes() == \
        (prepared[1].dir / "train.bin").read_bytes()


def test_a_mismatching_manifest_is_rebuilt_in_place(tmp_path):
    write_corpus(tmp_path / "corpus")
    cfg = files_cfg(tmp_path)
    first = corpus.prepare(cfg)
    (first.dir / corpus.MANIFEST).write_text(json.dumps({**first.manifest, "hash": "stale"}))
    # a build killed by SIGKILL left its temporary token file; another builder's is in progress
    left, writing = first.dir / ".train.bin.dead.tmp", first.dir / ".train.bin.live.tmp"
    left.write_bytes(b"\0" * 4096)
    writing.write_bytes(b"\0" * 4096)
    hours_ago = time.time() - 2 * 3600
    os.utime(left, (hours_ago, hours_ago))
    again = corpus.prepare(cfg)
    assert again.dir == first.dir and again.manifest["hash"] == first.manifest["hash"]
    assert not left.exists() and writing.exists()


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


def test_a_cache_dir_that_cannot_be_written_is_named(tmp_path):
    (tmp_path / "a.txt").write_text("text " * 1000)
    (tmp_path / "file").write_text("")
    for cache in ("/proc/lm-none", f"{tmp_path}/file"):
        with pytest.raises(ConfigError, match=r"data.cache_dir: cannot write the prepared dataset "
                                              r"into .*; give a directory this user can write"):
            corpus.prepare(small(f"data.source={tmp_path}/a.txt", "model.vocab_size=320",
                                 f"data.cache_dir={cache}"))


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
    lines = ['{"text": "fine"}', '{"body": "no text"}', "not JSON", '{"text": "kept too"}']
    (tmp_path / "corpus" / "bad.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl: 2 lines \(2, 3\) are not .*'text' "
                                        r"\(data.text_field\)"):
        corpus.prepare(files_cfg(tmp_path, "data.on_bad_file=fail"))
    # skipped: those lines, not the file (read three times, it is counted once); a file of
    # nothing but bad lines is skipped whole
    (tmp_path / "corpus" / "nothing.jsonl").write_text("\n".join(lines[1:3]) + "\n")
    with pytest.warns(UserWarning, match=r"skipped 1 of 23 input files and 2 lines of 1 .jsonl "
                                         r"file \(data.on_bad_file=skip\): .*bad.jsonl: 2 lines "
                                         r"\(2, 3\) .*nothing.jsonl: all 2 lines are not"):
        dataset = corpus.prepare(files_cfg(tmp_path))
    assert dataset.manifest["files"] == 22
    assert [(s["file"], s["lines"]) for s in dataset.manifest["skipped"]] == [
        (str(tmp_path / "corpus" / "bad.jsonl"), 2), (str(tmp_path / "corpus" /
                                                         "nothing.jsonl"), 0)]
    (tmp_path / "corpus" / "nothing.jsonl").unlink()
    with pytest.warns(UserWarning, match="skipped 2 lines of 1 .jsonl file"):
        kept = sum(s["documents"] for s in corpus.prepare(files_cfg(tmp_path)).manifest[
            "splits"].values())
    (tmp_path / "corpus" / "bad.jsonl").write_text("\n".join(lines[::3]) + "\n")
    assert sum(s["documents"] for s in corpus.prepare(files_cfg(tmp_path)).manifest[
        "splits"].values()) == kept  # the good lines' documents, all of them
    (tmp_path / "only.jsonl").write_text('{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"holds no text to train on: skipped 1 of 1 input files "
                                        r".*only.jsonl: line 1 is not"):
        corpus.prepare(text_cfg(tmp_path, tmp_path / "only.jsonl"))


def test_lm_data_says_what_it_skipped_as_a_warning_not_a_source_line(tmp_path):
    write_corpus(tmp_path / "corpus")
    (tmp_path / "corpus" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    out = subprocess.run([sys.executable, "-m", "lm.cli", "data", "prepare", "tiny",
                          f"data.source={tmp_path}/corpus/*.txt", "model.vocab_size=320",
                          "data.workers=1", f"data.cache_dir={tmp_path}/cache"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "warning: skipped 1 of 21 input files (data.on_bad_file=skip): " in out.stderr
    assert "UserWarning" not in out.stderr and "warnings.warn" not in out.stderr
    assert "21 files used" not in out.stdout and "20 files used, 1 skipped" in out.stdout


@pytest.mark.parametrize("name, content, message", [
    ("fake.parquet", b"plain text\n", r"fake.parquet: cannot be read as Parquet"),
    ("fake.arrow", b"plain text\n", r"fake.arrow: cannot be read as an Arrow stream"),
    ("fake.txt.gz", b"plain text\n", r"fake.txt.gz: not gzip data"),
])
def test_a_file_that_is_not_what_its_name_says_is_named(tmp_path, name, content, message):
    write_corpus(tmp_path / "corpus")
    (tmp_path / "corpus" / name).write_bytes(content)
    root = tmp_path / "corpus"
    source = f"data.source={root}/*.txt,{root}/*.jsonl,{root}/{name}"
    with pytest.raises(DataError, match=message + r" .*data.on_bad_file=skip"):
        corpus.prepare(files_cfg(tmp_path, source, "data.on_bad_file=fail"))
    with pytest.warns(UserWarning, match=r"skipped 1 of 22 input files .*" + message):
        corpus.prepare(files_cfg(tmp_path, source))


def test_a_parquet_file_without_the_text_column_names_those_it_has(tmp_path):
    pq.write_table(pa.table({"body": stdlib_texts(50_000)}), tmp_path / "docs.parquet")
    with pytest.raises(DataError, match=r"docs.parquet: has no column 'text' \(data.text_field\); "
                                        r"its columns are \['body'\]"):
        corpus.prepare(text_cfg(tmp_path, tmp_path / "docs.parquet", "data.on_bad_file=fail"))
    corpus.prepare(text_cfg(tmp_path, tmp_path / "docs.parquet", "data.text_field=body"))


def test_bad_validation_sets_are_named_and_nothing_prepared_is_lost(tmp_path, monkeypatch):
    write_corpus(tmp_path / "corpus")
    good = corpus.prepare(files_cfg(tmp_path))
    files = {p: p.read_bytes() for p in good.dir.iterdir()}
    (tmp_path / "few.txt").write_text("a few words\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "dd" / "train").mkdir(parents=True)
    (tmp_path / "dd" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    with pytest.raises(DataError, match=r"holds \d+ tokens of data.val_sets.few='.*few.txt', "
                                        r"fewer than one sequence .* give it more text"):
        data.validation_sets(files_cfg(tmp_path, f"data.val_sets.few={tmp_path}/few.txt"))
    with pytest.raises(DataError, match=r"data.val_sets.none='.*empty.txt' holds no text"):
        corpus.prepare(files_cfg(tmp_path, f"data.val_sets.none={tmp_path}/empty.txt"))
    with pytest.raises(DataError, match=r"data.val_source: '.*dd' is a saved DatasetDict; give "
                                        r"one of its splits, e.g. '.*dd/train'"):
        corpus.prepare(files_cfg(tmp_path, f"data.val_source={tmp_path}/dd"))

    def no_build(*args):
        raise AssertionError("rebuilt")

    monkeypatch.setattr(corpus, "build", no_build)
    assert corpus.prepare(files_cfg(tmp_path)) == good
    assert {p: p.read_bytes() for p in good.dir.iterdir()} == files


@pytest.mark.parametrize("overrides, message", [
    (["data.mixture=[{source: a.txt, weight: -0.5}, {source: b.txt}]"],
     "data.mixture[0].weight=-0.5 is not valid: must be >= 0"),
    (["data.mixture=[{source: a.txt, weight: 0}, {source: b.txt, weight: 0}]"],
     "data.mixture=[0.0, 0.0] is not valid: the weights are all 0"),
    (["data.mixture=[{source: a.txt}, {source: a.txt}]"], "data.mixture[1].source='a.txt'"),
    (["data.mixture=[{path: a.txt}]"], "unknown key data.mixture[0].path"),
    (["data.mixture=[{source: a.txt}]", "data.source=b.txt"], "drop data.source"),
    (["data.val_sets.val=a.txt"], "data.val_sets.val='a.txt' is not valid: name it"),
    (["data.val_sets.code=' , '"], "data.val_sets.code=' , ' is not valid"),
    (["data.val_sets.code=a.txt", "data.source=synthetic"], "drop data.val_sets.code"),
    (["data.val_source=synthetic"], "data.val_source='synthetic' is not valid"),
])
def test_bad_validation_and_mixture_settings_name_their_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        small("data.source=default", "model.vocab_size=320", *overrides)


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


def test_cli_prepares_and_reports(prepared, capsys, tmp_path):
    cfg, dataset = prepared
    argv = ["data", "prepare", "tiny", "data.source=default", "data.max_bytes=300000",
            "data.vocab_size=384", "data.val_fraction=0.2", f"data.cache_dir={cfg.data.cache_dir}"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert str(dataset.dir) in out and "bytes/token" in out
    assert re.search(r"eval val +128 sequences of 64 tokens", out)  # what evaluation reads
    short = tmp_path / "short.py"
    short.write_text("def f(): pass\n")
    assert cli.main([*argv, f"data.val_sets={{short: '{short}'}}"]) == 2
    assert "fewer than one sequence" in capsys.readouterr().err  # now, not at a first eval
    assert cli.main(["data", "prepare", "tiny", "data.source=/no/such.txt"]) == 2
    assert "no such file" in capsys.readouterr().err
