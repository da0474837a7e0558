"""Small real corpora for the data tests: a prefix of the default corpus, and documents of
words written by the tests."""

import json
from pathlib import Path

import numpy as np

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


def stdlib_texts(size, skip=0):
    """Real text: whole Python source files of the default corpus, in order from the `skip`-th,
    until they hold `size` bytes."""
    from lm import corpus

    texts, total = [], 0
    for _, path in corpus.default_corpus()[skip:]:
        if total >= size:
            break
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            continue
        total += len(texts[-1].encode())
    return texts


README = Path(__file__).resolve().parents[1] / "README.md"  # real prose


def decoded(dataset, split):
    """The text of each document (or piece of one) in a split's token stream, in order."""
    from lm import corpus

    stream = np.asarray(dataset.tokens(split)).tolist()
    ends = [i for i, t in enumerate(stream) if t == corpus.EOD_ID]
    sp = dataset.tokenizer()
    return [sp.decode(stream[a + 1:b]) for a, b in zip([-1] + ends, ends)]
