"""Data preparation: files -> documents -> SentencePiece -> token files -> manifest.

    files -> documents -> tokenizer.model, train.bin, val.bin -> manifest.json

`prepare` builds the tokenizer and token files once per (sources, settings), in a cache
directory keyed by their hash, and reuses them after. Only numpy and SentencePiece: the
encoding worker processes never load JAX.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import glob
import hashlib
import heapq
import io
import json
import math
import multiprocessing
import os
import re
import sysconfig
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from lm.config import Config
from lm.errors import ConfigError, DataError

FORMAT = 1  # of prepared datasets; hashed with the settings, so a new format never reuses an old
MANIFEST, TOKENIZER = "manifest.json", "tokenizer.model"
SPLITS = ("train", "val")
EOD_ID = 1  # end of document: SentencePiece's eos piece, written after every document
BATCH_BYTES = 1 << 20  # text per encoding task
SENTENCE_CHARS = 4096  # the tokenizer trains on runs of lines of at most this many characters

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
    """An input file that cannot be read as UTF-8 text (data.on_bad_file decides)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}; fix or remove it, or set data.on_bad_file=skip")
        self.path, self.reason = path, reason


def default_corpus() -> list[tuple[str, Path]]:
    """The embedded corpus: every *.py file of this interpreter's standard library (without
    site-packages), keyed and sorted by relative path. Real text (code, comments, docstrings),
    about 30 MB on CPython 3.11, present wherever Python is."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = ((p.relative_to(root).as_posix(), p) for p in root.rglob("*.py") if p.is_file())
    return sorted((key, p) for key, p in files
                  if not {"site-packages", "dist-packages"} & set(key.split("/")))


def corpus_files(spec: str) -> list[tuple[str, Path]]:
    """(key, path) of each input file of data.source: `default`, or comma-separated files and
    globs in the order given (each glob's matches sorted), without repeats. A file's key is its
    path below the glob's fixed directories (a named file: its name), so that moving a corpus
    keeps every document in its split."""
    if spec == "default":
        return default_corpus()
    found: dict[Path, tuple[str, Path]] = {}  # by real path
    for item in filter(None, (part.strip() for part in spec.split(","))):
        pattern = Path(os.path.expanduser(item))
        magic = [i for i, part in enumerate(pattern.parts) if any(c in part for c in "*?[")]
        if magic:
            root = Path(*pattern.parts[:magic[0]])
            matches = [Path(m) for m in sorted(glob.glob(str(pattern), recursive=True))
                       if os.path.isfile(m)]
            if not matches:
                raise DataError(f"data.source: {item!r} matches no file")
        elif pattern.is_dir():
            raise DataError(f"data.source: {item!r} is a directory; give its files as a glob, "
                            f"e.g. {os.path.join(item, '**', '*.txt')!r}")
        elif not pattern.is_file():
            raise DataError(f"data.source: no such file {item!r}")
        else:
            root, matches = pattern.parent, [pattern]
        for match in matches:
            found.setdefault(match.resolve(), (match.relative_to(root).as_posix(), match))
    return list(found.values())


def read_documents(key: str, path: Path, text_field: str) -> list[Document]:
    """The documents of one file: all of it, or for .jsonl the field `text_field` of each line."""
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except OSError as e:
        raise BadFile(path, f"cannot be read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise BadFile(path, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix != ".jsonl":
        return [Document(key, text, len(raw))]
    docs = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)[text_field]
            size = len(value.encode()) if isinstance(value, str) else None
        except (ValueError, KeyError, TypeError):  # not JSON, not an object, lone surrogates
            size = None
        if size is None:
            raise BadFile(path, f"line {number} is not a JSON object with a string field "
                                f"{text_field!r} (data.text_field)")
        docs.append(Document(f"{key}:{number}", value, size))
    return docs


def documents(files: Iterable[tuple[str, Path]], text_field: str, max_bytes: int = 0,
              skipped: list[BadFile] | None = None) -> Iterator[Document]:
    """The non-empty documents of `files` in order, up to the one that reaches `max_bytes`
    (0: all). A file that cannot be read raises BadFile, or with a `skipped` list joins it."""
    total = 0
    for key, path in files:
        try:
            docs = read_documents(key, path, text_field)
        except BadFile as e:
            if skipped is None:
                raise
            skipped.append(e)
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
    """Documents -> token arrays, each ending with end-of-document."""

    def __init__(self, model_file: Path, dtype: str):
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.dtype = dtype

    def __call__(self, docs: list[Document]) -> list[np.ndarray]:
        return [np.array(ids + [EOD_ID], self.dtype)
                for ids in self.sp.encode([doc.text for doc in docs], num_threads=1)]


_worker_encoder: Encoder | None = None  # in an encoding process: its tokenizer, loaded once


def _start_worker(model_file: Path, dtype: str) -> None:
    global _worker_encoder
    _worker_encoder = Encoder(model_file, dtype)


def _encode_in_worker(docs: list[Document]) -> list[np.ndarray]:
    return _worker_encoder(docs)


def encoded(batches: Iterable[list[Document]], model_file: Path, dtype: str,
            workers: int) -> Iterator[tuple[list[Document], list[np.ndarray]]]:
    """(batch, its token arrays) in order, encoded by `workers` processes with a bounded number
    of batches in flight."""
    if workers == 1:
        encode = Encoder(model_file, dtype)
        yield from ((batch, encode(batch)) for batch in batches)
        return
    spawn = multiprocessing.get_context("spawn")  # forking a process that runs JAX can hang
    with concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=spawn, initializer=_start_worker,
            initargs=(model_file, dtype)) as pool:
        pending = collections.deque()
        for batch in batches:
            pending.append((batch, pool.submit(_encode_in_worker, batch)))
            if len(pending) > 2 * workers:
                done, future = pending.popleft()
                yield done, future.result()
        for done, future in pending:
            yield done, future.result()


def _batched(docs: Iterable[Document], size: int) -> Iterator[list[Document]]:
    batch, total = [], 0
    for doc in docs:
        batch.append(doc)
        total += doc.size
        if total >= size:
            yield batch
            batch, total = [], 0
    if batch:
        yield batch


# --------------------------------------------------------------------------- prepared datasets


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A prepared dataset: tokenizer.model, train.bin, val.bin and manifest.json in `dir`."""

    dir: Path
    manifest: dict

    def tokens(self, split: str, seq_len: int = 0) -> np.memmap:
        """The token stream of `split`, checked against the manifest and to hold a sequence."""
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
            raise DataError(
                f"{path} holds {meta['tokens']} tokens, fewer than one sequence of "
                f"data.seq_len + 1 = {seq_len + 1}: lower data.seq_len (or model.context) or "
                f"give more text{' (or raise data.val_fraction)' if split == 'val' else ''}")
        return np.memmap(path, dtype, mode="r")

    def tokenizer(self) -> spm.SentencePieceProcessor:
        return spm.SentencePieceProcessor(model_file=str(self.dir / self.manifest["tokenizer"]))


def prepare(cfg: Config) -> Dataset:
    """The prepared dataset of `cfg`: reused when a manifest matches its sources and settings,
    built otherwise (tokenizer, token files, and the manifest last)."""
    d = cfg.data
    if d.source == "synthetic":
        raise ConfigError("data.source=synthetic is generated on the fly and needs no preparing; "
                          "set data.source=default or to files")
    files = corpus_files(d.source)
    settings = {"format": FORMAT, "sentencepiece": spm.__version__, "tokenizer": d.tokenizer,
                "vocab_size": cfg.vocab_size, "text_field": d.text_field,
                "tokenizer_sample_bytes": d.tokenizer_sample_bytes,
                "val_fraction": d.val_fraction, "max_bytes": d.max_bytes,
                "on_bad_file": d.on_bad_file}
    stats = [(key, str(path.resolve()), *_size_and_mtime(path)) for key, path in files]
    digest = hashlib.sha256(json.dumps([settings, stats]).encode()).hexdigest()
    label = "default" if d.source == "default" else "files"
    out = Path(d.cache_dir).expanduser() / f"{label}-{d.tokenizer}{cfg.vocab_size}-{digest[:12]}"
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        manifest = {}
    if manifest.get("hash") == digest:
        return Dataset(out, manifest)
    text_bytes = sum(s[2] for s in stats)
    return build(cfg, files, out, {"hash": digest, "source": d.source, "settings": settings},
                 min(text_bytes, d.max_bytes or text_bytes))


def _size_and_mtime(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def build(cfg: Config, files: list[tuple[str, Path]], out: Path, header: dict,
          text_bytes: int) -> Dataset:
    """Prepare `files` into `out`. Each output is written under a temporary name and renamed;
    the manifest goes last, so an interrupted build is never taken for a finished one."""
    d, start = cfg.data, time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    skipped = [] if d.on_bad_file == "skip" else None
    train_docs = (doc for doc in documents(files, d.text_field, d.max_bytes, skipped)
                  if split_of(doc.key, d.val_fraction) == "train")
    tokenizer_docs = sample(train_docs, d.tokenizer_sample_bytes)
    if skipped:
        shown = "; ".join(f"{e.path}: {e.reason}" for e in skipped[:5])
        warnings.warn(f"skipped {len(skipped)} of {len(files)} input files (data.on_bad_file="
                      f"skip): {shown}{' ...' if len(skipped) > 5 else ''}", stacklevel=2)
        bad = {e.path for e in skipped}
        files = [(key, path) for key, path in files if path not in bad]
    if not tokenizer_docs:
        raise DataError(f"data.source={d.source!r} holds no text to train on: "
                        + ("every file was skipped" if not files else
                           "its files are empty, or its few documents all went to validation "
                           f"(data.val_fraction={d.val_fraction})"))
    workers = min(d.workers or _cpus(), math.ceil(text_bytes / BATCH_BYTES))
    model = train_tokenizer(tokenizer_docs, d.tokenizer, cfg.vocab_size, workers)
    with _atomic(out / TOKENIZER) as f:
        f.write(model)
    dtype = "uint16" if cfg.vocab_size <= 2**16 else "uint32"
    with (_atomic(out / "train.bin") as train, _atomic(out / "val.bin") as val,
          tqdm(total=text_bytes, unit="B", unit_scale=True, desc="encode",
               disable=not cfg.train.progress) as bar):
        counts = write_splits(documents(files, d.text_field, d.max_bytes),
                              {"train": train, "val": val}, d.val_fraction,
                              out / TOKENIZER, dtype, workers, bar.update)
        if not counts["val"]["documents"]:
            raise DataError(f"no document of data.source={d.source!r} went to validation: raise "
                            f"data.val_fraction={d.val_fraction} or give more documents")
    for count in counts.values():
        count["bytes_per_token"] = count["bytes"] / count["tokens"]
    manifest = {**header, "tokenizer": TOKENIZER, "vocab_size": cfg.vocab_size,
                "eod_id": EOD_ID, "dtype": dtype, "splits": counts, "files": len(files),
                "skipped": [{"file": str(e.path), "reason": e.reason} for e in skipped or []],
                "tokenizer_sample_bytes": sum(doc.size for doc in tokenizer_docs),
                "prepare_seconds": round(time.perf_counter() - start, 2)}
    with _atomic(out / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
    return Dataset(out, manifest)


def write_splits(docs: Iterable[Document], streams: dict, val_fraction: float, model_file: Path,
                 dtype: str, workers: int, progress) -> dict[str, dict]:
    """Encode `docs` into the stream of each one's split, each followed by end-of-document;
    the manifest's counts per split."""
    counts = {split: {"file": f"{split}.bin", "documents": 0, "bytes": 0, "tokens": 0}
              for split in streams}
    for batch, arrays in encoded(_batched(docs, BATCH_BYTES), model_file, dtype, workers):
        for doc, ids in zip(batch, arrays):
            split = split_of(doc.key, val_fraction)
            streams[split].write(ids)
            count = counts[split]
            count["documents"] += 1
            count["bytes"] += doc.size
            count["tokens"] += len(ids)
        progress(sum(doc.size for doc in batch))
    return counts


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


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


def tokenizer(cfg: Config) -> spm.SentencePieceProcessor:
    """The tokenizer of `cfg`'s dataset (prepared on first use): text <-> token ids."""
    if cfg.data.source == "synthetic":
        raise ConfigError("data.source=synthetic has no tokenizer: its tokens are not text")
    return prepare(cfg).tokenizer()


def token_bytes(sp: spm.SentencePieceProcessor) -> np.ndarray:
    """The UTF-8 length of the text each token stands for (0 for end-of-document)."""

    def length(i: int) -> int:
        if sp.is_byte(i):
            return 1
        if sp.is_control(i) or sp.is_unknown(i):
            return 0
        return len(sp.id_to_piece(i).replace("\u2581", " ").encode())

    return np.array([length(i) for i in range(sp.get_piece_size())])
