"""Data preparation: files -> documents -> SentencePiece -> token files -> manifest.

    files -> documents -> train / validation pieces -> tokenizer.model, train.bin, val.bin
          -> manifest.json

`prepare` builds the tokenizer and token files once per (sources, settings), in a cache
directory keyed by their hash, and reuses them after; each validation set given apart
(data.val_source, data.val_sets) is encoded with that tokenizer into a directory of its own.
Only numpy, SentencePiece and pyarrow: the encoding worker processes never load JAX.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import functools
import glob
import gzip
import hashlib
import heapq
import io
import itertools
import json
import math
import multiprocessing
import os
import re
import sysconfig
import time
import uuid
import warnings
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from lm.config import Config
from lm.errors import ConfigError, DataError

FORMAT = 2  # of prepared datasets; hashed with the settings, so a new format never reuses an old
MANIFEST, TOKENIZER, BUILD_LOCK = "manifest.json", "tokenizer.model", ".build.lock"
SPLITS = ("train", "val")
SPAN_CHARS = 1 << 14  # held-out spans are at most this long, so that they spread through a document
LINE_SLACK = 200  # a span's edge moves back to the start of its line when that is this near
EOD_ID = 1  # end of document: SentencePiece's eos piece, written after every document
BATCH_BYTES = 1 << 20  # text per encoding task
SENTENCE_CHARS = 4096  # the tokenizer trains on runs of lines of at most this many characters
STALE_TMP_S = 3600  # a temporary file untouched this long was left by a killed build

# SentencePiece settings under which decode(encode(text)) == text for any text.
SENTENCEPIECE = dict(
    byte_fallback=True,  # characters outside the vocab become their UTF-8 bytes, never <unk>
    character_coverage=0.9995,  # the rarest characters are left to byte fallback
    normalization_rule_name="identity",  # no NFKC: text is kept as written
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,  # no space is invented at the start of a text
    allow_whitespace_only_pieces=True,  # runs of spaces (code indentation) may be one piece
    unk_id=0, eos_id=EOD_ID, bos_id=-1, pad_id=-1,
    max_sentence_length=4 * SENTENCE_CHARS,  # in bytes
    minloglevel=2,
)


# --------------------------------------------------------------------------- documents


class Document(NamedTuple):
    key: str  # a stable name; its hash decides the document's split and tokenizer sampling
    text: str
    size: int  # UTF-8 bytes


class BadFile(DataError):
    """An input file that cannot be read as what its name says, or `lines` lines of a .jsonl
    file that hold no text (data.on_bad_file decides: skip the file, or those lines; or fail)."""

    def __init__(self, path: Path, reason: str, lines: int = 0):
        super().__init__(f"{path}: {reason}; fix or remove it, or set data.on_bad_file=skip")
        self.path, self.reason, self.lines = path, reason, lines


@functools.cache  # walking the tree takes ~1 s, paid by every trial of a sweep's worker
def default_corpus() -> tuple[tuple[str, Path], ...]:
    """The embedded corpus: every *.py file of this interpreter's standard library (without
    site-packages), keyed and sorted by relative path. Real text (code, comments, docstrings),
    about 30 MB on CPython 3.11, present wherever Python is. Paths are resolved here, once:
    every prepare hashes them, and resolving 1,800 paths took 90% of a prepared dataset's
    lookup."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = ((p.relative_to(root).as_posix(), p.resolve()) for p in root.rglob("*.py")
             if p.is_file())
    return tuple(sorted((key, p) for key, p in files
                        if not {"site-packages", "dist-packages"} & set(key.split("/"))))


def corpus_files(spec: str, key: str = "data.source") -> list[tuple[str, Path]]:
    """(key, path) of each input file of a source (`key` names its setting): `default`, or
    comma-separated files, globs and saved Hugging Face datasets in the order given (each glob's
    matches sorted), without repeats. A file's key is its path below the glob's fixed
    directories (a named file or dataset: its name), so that moving a corpus keeps every
    document in its split."""
    if spec == "default":
        return list(default_corpus())
    found: dict[Path, tuple[str, Path]] = {}  # by real path, which `_prepared` hashes
    for item in filter(None, (part.strip() for part in spec.split(","))):
        pattern = Path(os.path.expanduser(item))
        magic = [i for i, part in enumerate(pattern.parts) if any(c in part for c in "*?[")]
        if magic:
            root = Path(*pattern.parts[:magic[0]])
            matches = [Path(m) for m in sorted(glob.glob(str(pattern), recursive=True))
                       if os.path.isfile(m)]
            if not matches:
                raise DataError(f"{key}: {item!r} matches no file")
        elif pattern.is_dir():
            root, matches = pattern.parent, saved_dataset(pattern, item, key)
        elif not pattern.is_file():
            raise DataError(f"{key}: no such file {item!r}")
        else:
            root, matches = pattern.parent, [pattern]
        for match in matches:
            real = match.resolve()
            found.setdefault(real, (match.relative_to(root).as_posix(), real))
    return list(found.values())


def saved_dataset(path: Path, item: str, key: str) -> list[Path]:
    """The Arrow files of a Hugging Face dataset saved with `save_to_disk`, in its order (from
    its state.json); any other directory is an error that says what to give instead."""
    if (path / "dataset_dict.json").is_file():
        raise DataError(f"{key}: {item!r} is a saved DatasetDict; give one of its splits, e.g. "
                        f"{os.path.join(item, 'train')!r}")
    state = path / "state.json"
    if not state.is_file():
        raise DataError(f"{key}: {item!r} is a directory; give its files as a glob, e.g. "
                        f"{os.path.join(item, '**', '*.txt')!r}, or a dataset saved with "
                        "save_to_disk")
    try:
        files = [path / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"{key}: {state} is not the state.json of a dataset saved with "
                        "save_to_disk (no _data_files list); save it again") from None
    if missing := [f.name for f in files if not f.is_file()]:
        raise DataError(f"{key}: {item!r} lacks the data files its state.json lists: {missing}")
    return files


def read_documents(key: str, path: Path, text_field: str,
                   skipped: dict[Path, BadFile] | None = None) -> Iterable[Document]:
    """The documents of one file: all of it; for .jsonl the field `text_field` of each line; for
    .parquet and .arrow (the Arrow stream files of a saved Hugging Face dataset) the column
    `text_field` of each row, read a row group or record batch at a time. A .gz file is
    decompressed first and keeps the key it would have uncompressed, so that compressing a
    corpus keeps every document in its split. A file that is not what its name says raises
    BadFile before it yields a document; so do .jsonl lines without text, unless a `skipped`
    dict is given: then the other lines are its documents, and the file's BadFile joins it."""
    key = key.removesuffix(".gz")
    suffix = Path(key).suffix
    if suffix in (".parquet", ".arrow"):
        return table_documents(key, path, text_field)
    raw = _read(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadFile(path, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    if suffix != ".jsonl":
        return [Document(key, text, len(raw))]
    docs, bad = [], []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)[text_field]
            size = len(value.encode()) if isinstance(value, str) else None
        except (ValueError, KeyError, TypeError):  # not JSON, not an object, lone surrogates
            size = None
        if size is None:
            bad.append(number)
        else:
            docs.append(Document(f"{key}:{number}", value, size))
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        lines = (f"line {bad[0]} is" if len(bad) == 1 else f"{len(bad)} lines ({shown}) are"
                 if docs else f"all {len(bad)} lines are")
        error = BadFile(path, f"{lines} not a JSON object with a string field {text_field!r} "
                              "(data.text_field)", lines=len(bad) if docs else 0)  # 0: whole
        if skipped is None:
            raise error
        skipped[path] = error
    return docs


def _read(path: Path) -> bytes:
    """The bytes of `path`, decompressed if it is a .gz file."""
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise BadFile(path, f"not gzip data ({e})") from None
    except OSError as e:
        raise BadFile(path, f"cannot be read ({e.strerror})") from None


def table_documents(key: str, path: Path, text_field: str) -> Iterator[Document]:
    """The rows of a Parquet or Arrow stream file as documents keyed by their row number; the
    file is opened, and its column `text_field` checked to hold text, before the first."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    parquet = path.suffix == ".parquet"
    try:
        if parquet:
            table = pq.ParquetFile(path)
            schema = table.schema_arrow
        else:  # what datasets.save_to_disk writes; memory-mapped, so read a batch at a time
            table = pa.ipc.open_stream(pa.memory_map(str(path)))
            schema = table.schema
    except (OSError, pa.ArrowException) as e:
        raise BadFile(path, f"cannot be read as {'Parquet' if parquet else 'an Arrow stream'} "
                            f"({e})") from None
    if text_field not in schema.names:
        raise BadFile(path, f"has no column {text_field!r} (data.text_field); its columns are "
                            f"{schema.names}")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise BadFile(path, f"its column {text_field!r} (data.text_field) holds {kind}, not text")
    if parquet:
        columns = (table.read_row_group(i, columns=[text_field]).column(0)
                   for i in range(table.num_row_groups))
    else:
        columns = (batch.column(text_field) for batch in table)

    def rows() -> Iterator[Document]:
        row = 0
        try:
            for column in columns:
                for text, size in zip(column.to_pylist(), pc.binary_length(column).to_pylist()):
                    row += 1
                    if text:  # a null row is an empty document
                        yield Document(f"{key}:{row}", text, size)
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{path}: damaged after row {row} ({e}); fix or remove it") from None

    return rows()


def documents(files: Iterable[tuple[str, Path]], text_field: str, max_bytes: int = 0,
              skipped: dict[Path, BadFile] | None = None) -> Iterator[Document]:
    """The non-empty documents of `files` in order, up to the one that reaches `max_bytes`
    (0: all). A file that cannot be read raises BadFile, or with a `skipped` dict joins it (by
    its path: a file read again is counted once), as do a .jsonl file's lines without text."""
    total = 0
    for key, path in files:
        try:
            docs = read_documents(key, path, text_field, skipped)
        except BadFile as e:
            if skipped is None:
                raise
            skipped[path] = e
            continue
        for doc in docs:
            if max_bytes and total >= max_bytes:
                return
            if doc.size:
                total += doc.size
                yield doc


def draw(key: str, purpose: str) -> float:
    """A number in [0, 1) fixed by a document's key: the same document gets the same draws in
    every run, whatever else the corpus holds."""
    digest = hashlib.blake2b(f"{purpose}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def split_of(key: str, val_fraction: float) -> str:
    return "val" if draw(key, "val") < val_fraction else "train"


def holdout(docs: Iterable[Document], val_fraction: float) -> str:
    """How a source holds out its validation text: `documents` (whole documents, drawn by key)
    when that holds out within a factor of 2 of `val_fraction` of its bytes; otherwise
    `positions` (`val_fraction` of every document, in spans spread through it): a source of
    one or a few documents, or one whose few drawn documents are far too large or small."""
    total = held = 0
    for doc in docs:
        total += doc.size
        held += doc.size if split_of(doc.key, val_fraction) == "val" else 0
    near = val_fraction / 2 <= held / max(total, 1) <= 2 * val_fraction
    return "documents" if near else "positions"


def spans(doc: Document, val_fraction: float) -> list[int]:
    """The edges [start, end, start, end, ...] of the held-out spans of `doc`, in characters:
    the document is cut into k equal parts, each with one span of `val_fraction` of it at an
    offset drawn from the key, so that exactly that fraction is held out, spread through it;
    each edge moves back to the start of its line if that is near."""
    n = len(doc.text)
    k = max(1, math.ceil(val_fraction * n / SPAN_CHARS))
    offset = draw(doc.key, "span") * (1 - val_fraction)
    edges = ((i + offset + part) * n / k for i in range(k) for part in (0, val_fraction))
    return list(itertools.accumulate((_line_start(doc.text, round(e)) for e in edges), max))


def _line_start(text: str, position: int) -> int:
    newline = text.rfind("\n", max(0, position - LINE_SLACK), position)
    return newline + 1 if newline >= 0 else position


def pieces(docs: Iterable[Document], mode: str, val_fraction: float
           ) -> Iterator[tuple[str, Document]]:
    """(split, piece) of each document under the holdout `mode`: `documents` (each whole, in its
    drawn split), `positions` (its text between held-out spans trains, each span validates;
    the pieces are keyed by their offset), or `train` / `val` (all of it in that split)."""
    for doc in docs:
        if mode != "positions":
            yield (split_of(doc.key, val_fraction) if mode == "documents" else mode), doc
            continue
        edges = [0, *spans(doc, val_fraction), len(doc.text)]
        for i, (start, end) in enumerate(itertools.pairwise(edges)):
            if end > start:
                text = doc.text[start:end]
                yield SPLITS[i % 2], Document(f"{doc.key}@{start}", text, len(text.encode()))


def sample(docs: Iterable[Document], budget: int) -> list[Document]:
    """The documents of least draw whose sizes first reach `budget` bytes (all, if they never
    do): a sample spread over the whole corpus, independent of the documents' order."""
    heap: list[tuple[float, str, Document]] = []  # max-heap on the draw
    total = 0
    for doc in docs:
        heapq.heappush(heap, (-draw(doc.key, "sample"), doc.key, doc))
        total += doc.size
        while total - heap[0][2].size >= budget:
            total -= heapq.heappop(heap)[2].size
    return [doc for _, _, doc in sorted(heap, reverse=True)]


# --------------------------------------------------------------------------- tokenizer


def sentences(text: str, size: int = SENTENCE_CHARS) -> Iterator[str]:
    """`text` in pieces of at most `size` characters, cut after a newline where one is near:
    SentencePiece's trainer drops longer 'sentences' and never merges across them."""
    start = 0
    while start < len(text):
        end = start + size
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut >= start else end
        yield text[start:end]
        start = end


def train_tokenizer(docs: Iterable[Document], model_type: str, vocab_size: int,
                    threads: int) -> bytes:
    """A serialised SentencePiece model trained on `docs`; SentencePiece's complaints about the
    vocab size become DataErrors that say which value would work."""
    model = io.BytesIO()
    spm.set_random_generator_seed(0)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=(s for doc in docs for s in sentences(doc.text)), model_writer=model,
            model_type=model_type, vocab_size=vocab_size, num_threads=threads, **SENTENCEPIECE)
    except RuntimeError as e:
        raise _vocab_error(str(e), vocab_size) from None
    return model.getvalue()


def _vocab_error(message: str, vocab_size: int) -> DataError:
    if m := re.search(r"smaller than required_chars\. \d+ vs (\d+)", message):
        return DataError(
            f"data.vocab_size={vocab_size} is too small for this text: its characters alone "
            f"need {m[1]} pieces (with 256 bytes, <unk> and end-of-document); set "
            f"data.vocab_size (and model.vocab_size) to at least {m[1]}, better more")
    if m := re.search(r"Please set it to a value <= (\d+)", message):
        return DataError(
            f"data.vocab_size={vocab_size} is more than the tokenizer sample can fill: set "
            f"data.vocab_size <= {m[1]}, or give more text (data.source, data.max_bytes, "
            "data.tokenizer_sample_bytes)")
    return DataError(f"SentencePiece could not train the tokenizer: {message}")


class Encoder:
    """Texts -> token arrays, each ending with end-of-document."""

    def __init__(self, model_file: Path, dtype: str):
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.dtype = dtype

    def __call__(self, texts: list[str]) -> list[np.ndarray]:
        return [np.array(ids + [EOD_ID], self.dtype)
                for ids in self.sp.encode(texts, num_threads=1)]


_worker_encoder: Encoder | None = None  # in an encoding process: its tokenizer, loaded once


def _start_worker(model_file: Path, dtype: str) -> None:
    global _worker_encoder
    _worker_encoder = Encoder(model_file, dtype)


def _encode_in_worker(texts: list[str]) -> list[np.ndarray]:
    return _worker_encoder(texts)


def encoded(batches: Iterable[list[tuple[str, Document]]], model_file: Path, dtype: str,
            workers: int) -> Iterator[tuple[list[tuple[str, Document]], list[np.ndarray]]]:
    """(batch of (split, document), their token arrays) in order, encoded by `workers`
    processes with a bounded number of batches in flight."""
    if workers == 1:
        encode = Encoder(model_file, dtype)
        yield from ((batch, encode([doc.text for _, doc in batch])) for batch in batches)
        return
    spawn = multiprocessing.get_context("spawn")  # forking a process that runs JAX can hang
    with concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=spawn, initializer=_start_worker,
            initargs=(model_file, dtype)) as pool:
        pending = collections.deque()
        for batch in batches:
            texts = [doc.text for _, doc in batch]
            pending.append((batch, pool.submit(_encode_in_worker, texts)))
            if len(pending) > 2 * workers:
                done, future = pending.popleft()
                yield done, future.result()
        for done, future in pending:
            yield done, future.result()


def _batched(items: Iterable[tuple[str, Document]], size: int
             ) -> Iterator[list[tuple[str, Document]]]:
    batch, total = [], 0
    for item in items:
        batch.append(item)
        total += item[1].size
        if total >= size:
            yield batch
            batch, total = [], 0
    if batch:
        yield batch


# --------------------------------------------------------------------------- prepared datasets


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A prepared dataset: tokenizer.model, token files and manifest.json in `dir`, prepared from
    the setting `key`. A training dataset carries the validation sets given apart (`val` from
    data.val_source, and data.val_sets by name), each a Dataset of its own."""

    dir: Path
    manifest: dict
    key: str = "data.source"
    sets: dict[str, Dataset] = dataclasses.field(default_factory=dict)

    def splits(self, split: str) -> list[str]:
        """The token streams of `split` (train or val), one per source: `train`, or for a
        mixture `train.0`, `train.1`, ...; none for text that was not held out."""
        return [name for name in self.manifest["splits"] if name.partition(".")[0] == split]

    def tokens(self, split: str, seq_len: int = 0) -> np.memmap:
        """The token stream `split`, checked against the manifest and to hold a sequence."""
        meta = self.manifest["splits"][split]
        path, dtype = self.dir / meta["file"], np.dtype(self.manifest["dtype"])
        expected = meta["tokens"] * dtype.itemsize
        size = path.stat().st_size if path.is_file() else None
        if size != expected:
            found = "is missing" if size is None else f"has {size:,} bytes"
            raise DataError(
                f"{path} {found} but {self.dir / MANIFEST} says {meta['tokens']:,} {dtype} "
                f"tokens ({expected:,} bytes): it changed after it was prepared. Delete "
                f"{self.dir} and prepare again (lm data prepare CONFIG)")
        if meta["tokens"] < seq_len + 1:
            held_out = split.startswith("val") and meta["holdout"] != "val"
            raise DataError(
                f"{path} holds {meta['tokens']} tokens of {self.key}={meta['source']!r}, fewer "
                f"than one sequence of data.seq_len + 1 = {seq_len + 1}: lower data.seq_len (or "
                f"model.context) or give it more text"
                f"{' (or raise data.val_fraction)' if held_out else ''}")
        return np.memmap(path, dtype, mode="r")

    def tokenizer(self) -> spm.SentencePieceProcessor:
        return spm.SentencePieceProcessor(model_file=str(self.dir / self.manifest["tokenizer"]))


class Input(NamedTuple):
    """One source of a dataset, as its setting `key` gives it."""

    key: str
    source: str
    files: list[tuple[str, Path]]
    mode: str  # split (into `documents` or `positions` when built), or all in `train` or `val`
    suffix: str = ""  # of its token streams' names: `.i` for the i-th source of a mixture


def _input(key: str, source: str, mode: str, suffix: str = "") -> Input:
    return Input(key, source, corpus_files(source, key), mode, suffix)


def prepare(cfg: Config, validation: bool = True) -> Dataset:
    """The prepared training dataset of `cfg` — a tokenizer, and the training and held-out
    validation tokens of data.source or of each data.mixture source — with the validation sets
    given apart, encoded by that tokenizer (unless `validation` is False: what sampling and
    exporting need is the tokenizer, not validation files that may have moved since). Each is
    reused when a manifest matches its sources and settings, built otherwise (tokenizer, token
    files, and the manifest last)."""
    d = cfg.data
    if d.source == "synthetic":
        raise ConfigError("data.source=synthetic is generated on the fly and needs no preparing; "
                          "set data.source=default or to files")
    mode = "train" if d.val_source else "split"  # data.val_source replaces the held-out text
    if d.mixture:
        inputs = [_input(f"data.mixture[{i}].source", m.source, mode, f".{i}")
                  for i, m in enumerate(d.mixture)]
    else:
        inputs = [_input("data.source", d.source, mode)]
    label = "mixture" if d.mixture else "default" if d.source == "default" else "files"
    dataset = _prepared(cfg, inputs, label, "data.mixture" if d.mixture else "data.source")
    if not validation:
        return dataset
    given = {"val": ("data.val_source", d.val_source)} if d.val_source else {}
    given |= {name: (f"data.val_sets.{name}", spec) for name, spec in d.val_sets.items()}
    sets = {name: _prepared(cfg, [_input(key, spec, "val")], "val", key, dataset)
            for name, (key, spec) in given.items()}
    return dataclasses.replace(dataset, sets=sets)


def _prepared(cfg: Config, inputs: list[Input], label: str, key: str,
              tokenized_by: Dataset | None = None) -> Dataset:
    """`inputs` prepared under `cfg`'s settings, found by their hash or built: encoded by the
    tokenizer of `tokenized_by` (a validation set given apart), or by one trained on them."""
    d = cfg.data
    settings = {"format": FORMAT, "sentencepiece": spm.__version__, "tokenizer": d.tokenizer,
                "vocab_size": cfg.vocab_size, "text_field": d.text_field,
                "tokenizer_sample_bytes": d.tokenizer_sample_bytes,
                "val_fraction": d.val_fraction, "max_bytes": d.max_bytes,
                "on_bad_file": d.on_bad_file}
    tokenizer = (tokenized_by.dir / TOKENIZER).read_bytes() if tokenized_by else None
    files = [[inp.mode, [(k, str(p), *_size_and_mtime(p)) for k, p in inp.files]]  # resolved
             for inp in inputs]
    given = tokenizer and hashlib.sha256(tokenizer).hexdigest()
    digest = hashlib.sha256(json.dumps([settings, files, given]).encode()).hexdigest()
    out = Path(d.cache_dir).expanduser() / f"{label}-{d.tokenizer}{cfg.vocab_size}-{digest[:12]}"
    manifest = _manifest(out)
    if manifest.get("hash") != digest:
        with _building(out):  # by one process: others preparing it at once wait, then reuse it
            manifest = _manifest(out)
            if manifest.get("hash") != digest:
                header = {"hash": digest, "source": " + ".join(inp.source for inp in inputs),
                          "settings": settings}
                manifest = build(cfg, inputs, out, header, tokenizer)
    return Dataset(out, manifest, key)


def _manifest(out: Path) -> dict:
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def _building(out: Path):
    """Hold `out`'s build lock (the OS releases it however the process ends), so that a sweep's
    workers starting together build a dataset once, not once each. Builds at once are safe,
    only wasted: where the filesystem has no locks, they go ahead."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / BUILD_LOCK, "a")
    except OSError as e:
        raise ConfigError(f"data.cache_dir: cannot write the prepared dataset into {out} "
                          f"({e.strerror}); give a directory this user can write") from None
    with lock as f:
        with contextlib.suppress(OSError):
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _size_and_mtime(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def build(cfg: Config, inputs: list[Input], out: Path, header: dict,
          tokenizer: bytes | None = None) -> dict:
    """Prepare `inputs` into `out` and return its manifest: decide how each holds out its
    validation text, train the tokenizer on the training text of all (unless `tokenizer` is
    given), and encode each into its token streams. Each output is written under a temporary
    name and renamed, and the manifest goes last, so that an interrupted or failed build is
    never taken for a finished one; it writes nothing outside `out`."""
    d, start = cfg.data, time.perf_counter()
    skipped = {} if d.on_bad_file == "skip" else None

    def read(inp: Input) -> Iterator[Document]:  # a file found bad once is passed over after
        kept = [(key, path) for key, path in inp.files
                if (e := (skipped or {}).get(path)) is None or e.lines]
        return documents(kept, d.text_field, d.max_bytes, skipped)

    inputs = [inp._replace(mode=holdout(read(inp), d.val_fraction)) if inp.mode == "split"
              else inp for inp in inputs]
    tokenizer_docs = [] if tokenizer else sample(
        (doc for inp in inputs for split, doc in pieces(read(inp), inp.mode, d.val_fraction)
         if split == "train"), d.tokenizer_sample_bytes)
    n_files = sum(len(inp.files) for inp in inputs)
    if not (tokenizer or tokenizer_docs):
        raise DataError(f"{header['source']!r} holds no text to train on: "
                        + (_skipped(skipped, n_files) if skipped else "its files are empty"))
    text_bytes = sum(min(sum(p.stat().st_size for _, p in inp.files), d.max_bytes or math.inf)
                     for inp in inputs)
    workers = max(1, min(d.workers or _cpus(), math.ceil(text_bytes / BATCH_BYTES)))
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    _remove_stale_temporaries(out)
    with _atomic(out / TOKENIZER) as f:
        f.write(tokenizer or train_tokenizer(tokenizer_docs, d.tokenizer, cfg.vocab_size, workers))
    dtype = "uint16" if cfg.vocab_size <= 2**16 else "uint32"
    splits = {}
    with tqdm(total=text_bytes, unit="B", unit_scale=True, desc="encode",
              disable=not cfg.train.progress) as bar:
        for inp in inputs:
            splits |= encode(inp, read(inp), out, dtype, workers, bar.update, d.val_fraction)
    if skipped:
        warnings.warn(_skipped(skipped, n_files), stacklevel=3)
    skipped = list((skipped or {}).values())
    manifest = {**header, "tokenizer": TOKENIZER, "vocab_size": cfg.vocab_size,
                "eod_id": EOD_ID, "dtype": dtype, "splits": splits,
                "files": n_files - sum(not e.lines for e in skipped),
                "skipped": [{"file": str(e.path), "reason": e.reason, "lines": e.lines}
                            for e in skipped],
                "tokenizer_sample_bytes": sum(doc.size for doc in tokenizer_docs),  # 0: given
                "prepare_seconds": round(time.perf_counter() - start, 2)}
    with _atomic(out / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def encode(inp: Input, docs: Iterable[Document], out: Path, dtype: str, workers: int, progress,
           val_fraction: float) -> dict[str, dict]:
    """Encode `docs`, the documents of `inp`, into the token streams of its splits; the
    manifest's entry of each."""
    names = {split: split + inp.suffix for split in ((inp.mode,) if inp.mode in SPLITS else SPLITS)}
    with contextlib.ExitStack() as stack:
        streams = {split: stack.enter_context(_atomic(out / f"{name}.bin"))
                   for split, name in names.items()}
        counts = write_splits(pieces(docs, inp.mode, val_fraction), streams, out / TOKENIZER,
                              dtype, workers, progress)
        for split, count in counts.items():
            if not count["tokens"]:
                raise _no_text(inp, split, val_fraction)
    return {names[split]: {"file": f"{names[split]}.bin", "source": inp.source,
                           "holdout": inp.mode, **count,
                           "bytes_per_token": count["bytes"] / count["tokens"]}
            for split, count in counts.items()}


def _skipped(skipped: dict[Path, BadFile], n_files: int) -> str:
    """What data.on_bad_file=skip passed over, the first five files with their reasons."""
    whole = sum(not e.lines for e in skipped.values())
    lines, partly = sum(e.lines for e in skipped.values()), len(skipped) - whole
    what = " and ".join(([f"{whole} of {n_files} input files"] if whole else []) + (
        [f"{lines} line{'s' * (lines > 1)} of {partly} .jsonl file{'s' * (partly > 1)}"]
        if lines else []))
    shown = "; ".join(f"{e.path}: {e.reason}" for e in list(skipped.values())[:5])
    return (f"skipped {what} (data.on_bad_file=skip): {shown}"
            f"{' ...' if len(skipped) > 5 else ''}")


def _no_text(inp: Input, split: str, val_fraction: float) -> DataError:
    if split == "val" and inp.mode != "val":
        return DataError(f"no text of {inp.key}={inp.source!r} went to validation: raise "
                         f"data.val_fraction={val_fraction}, or set data.val_source")
    return DataError(f"{inp.key}={inp.source!r} holds no text: its files are empty or were "
                     "skipped (data.on_bad_file)")


def write_splits(items: Iterable[tuple[str, Document]], streams: dict, model_file: Path,
                 dtype: str, workers: int, progress) -> dict[str, dict]:
    """Encode each (split, document) into the stream of its split, followed by end-of-document;
    the documents, bytes and tokens of each split."""
    counts = {split: {"documents": 0, "bytes": 0, "tokens": 0} for split in streams}
    for batch, arrays in encoded(_batched(items, BATCH_BYTES), model_file, dtype, workers):
        for (split, doc), ids in zip(batch, arrays):
            streams[split].write(ids)
            count = counts[split]
            count["documents"] += 1
            count["bytes"] += doc.size
            count["tokens"] += len(ids)
        progress(sum(doc.size for _, doc in batch))
    return counts


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary files a killed build left (token files can be gigabytes), once untouched for
    STALE_TMP_S: a build in progress elsewhere writes to its own all along."""
    for tmp in out.glob(".*.tmp"):
        with contextlib.suppress(OSError):  # another builder removed or renamed it meanwhile
            if time.time() - tmp.stat().st_mtime > STALE_TMP_S:
                tmp.unlink()


@contextlib.contextmanager
def _atomic(path: Path, mode: str = "wb"):
    """A file written under a temporary name, renamed to `path` only when the block completes
    and removed if it fails: no reader ever sees part of a file."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # unique across processes
    try:
        with open(tmp, mode) as f:
            yield f
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- tokens <-> text


def identity(cfg: Config) -> dict:
    """What a run's token ids and batches depend on: its tokenizer's bytes and the length of
    each training stream (the dataset's own hash also covers file times, which a copy to
    another machine changes without changing a token); synthetic tokens have neither."""
    if cfg.data.source == "synthetic":
        return {"tokenizer_sha256": None, "train_tokens": None, "dataset": "synthetic"}
    dataset = prepare(cfg, validation=False)
    tokenizer = (dataset.dir / dataset.manifest["tokenizer"]).read_bytes()
    return {"tokenizer_sha256": hashlib.sha256(tokenizer).hexdigest(),
            "train_tokens": {name: dataset.manifest["splits"][name]["tokens"]
                             for name in dataset.splits("train")},
            "dataset": str(dataset.dir)}


def tokenizer(cfg: Config) -> spm.SentencePieceProcessor:
    """The tokenizer of `cfg`'s dataset (prepared on first use): text <-> token ids."""
    if cfg.data.source == "synthetic":
        raise ConfigError("data.source=synthetic has no tokenizer: its tokens are not text")
    return prepare(cfg, validation=False).tokenizer()


def token_bytes(sp: spm.SentencePieceProcessor) -> np.ndarray:
    """The UTF-8 length of the text each token stands for (0 for end-of-document)."""

    def length(i: int) -> int:
        if sp.is_byte(i):
            return 1
        if sp.is_control(i) or sp.is_unknown(i):
            return 0
        return len(sp.id_to_piece(i).replace("\u2581", " ").encode())

    return np.array([length(i) for i in range(sp.get_piece_size())])
