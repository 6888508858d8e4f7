"""Long-range recall by distance: key-value pairs planted in Shakespeare, each asked for later, byte-level.

A document is a 128-byte slice of Shakespeare with up to 16 pairs written over it. A pair is one character,
U+0100 + 4 * key + value (Latin Extended-A: 16 keys, values 0-3); its query, later in the same document, is
the key's Greek capital (U+0391 + key) followed by the value's digit:

    ...Give me thy hĉand, I am sorry I beat thee: but, Γ1 while thou liv'st...      (ĉ = key 2, value 1)

In UTF-8 every pair is the byte C4 then one byte 0x80 + 4 * key + value, and every key is CE then 0x91 + key,
so the byte that carries a pair and the byte that asks for it are single bytes: one attention step from the
query to the pair fetches the value. The task tests how far back a layer can fetch, not whether a model can
learn to chain two attention steps (an induction head), which does not form in the minutes this CPU track
allows (docs/experiments.md). The gap of a query is the distance, in bytes, from the pair's last byte to the
key's last byte (where the value is predicted): a local layer with window w sees it only when gap < w. Gaps
are drawn log-uniformly from 2 to the document's length, so they span well below and well beyond a window.

val documents are cut from Shakespeare's val split (train's from its train split) and listed with their queries,
each with its gap, in data/recall/val_docs.jsonl: what infra/evaluation.py scores, bucketed by gap.
Run: python data/recall/prepare.py [--n_train=20000] [--n_val=400] [--doc_len=128] [--n_pairs=16] [--seed=1234]"""
import json
import math
import os
import sys
from dataclasses import dataclass

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from infra import cli  # noqa: E402
from infra.cli import need  # noqa: E402
from data.corpus import DATA_DIR, PrepareConfig, Tokenizer, tokenizer_names, write_corpus  # noqa: E402

N_KEYS, N_VALUES = 16, 4
PAIR, KEY = 0x100, 0x391          # code points of key 0's pairs, and of key 0's query
PAIR_BYTES, QUERY_BYTES = 2, 3    # UTF-8: a pair is 2 bytes, a query 2 (its key) + 1 (the value's digit)


@dataclass
class RecallConfig:
    n_train: int = 20000             # train documents
    n_val: int = 400                 # val documents (listed with their queries in val_docs.jsonl)
    doc_len: int = 128               # bytes per document: dense in pairs, so that recall is learned in minutes
    n_pairs: int = 16                # pairs planted per document (at most 16: one per key)
    seed: int = 1234                 # seeds the documents

    def __post_init__(self):
        need(self.n_train >= 1 and self.n_val >= 1, f"n_train and n_val must be >= 1; got {self.n_train}, "
             f"{self.n_val}")
        need(1 <= self.n_pairs <= N_KEYS, f"n_pairs must be in [1, {N_KEYS}]; got {self.n_pairs}")
        need(self.doc_len >= 4 * PAIR_BYTES * self.n_pairs, f"doc_len must hold the pairs and their queries with "
             f"room to spare: >= {4 * PAIR_BYTES * self.n_pairs} for {self.n_pairs} pairs; got {self.doc_len}")
        need(cli.valid_seed(self.seed), f"seed must be a whole number in [0, 2**32); got {self.seed!r}")


def pair_char(key, value):
    return chr(PAIR + N_VALUES * key + value)


def document(rng, filler, n_pairs):
    """(text, queries): `filler` (ASCII, its length the document's) with n_pairs pairs and their queries written
    over it at distinct keys, each query a log-uniform gap after its pair. Each query is {"key", "value", "gap",
    "at"}: "at" is the byte offset of the key's last byte, whose next byte is the value's digit. A pair that finds
    no free place after 100 draws is left out."""
    n = len(filler)
    chars = list(filler)  # one per byte: filler is ASCII, and a planted character overwrites as many as its bytes
    taken = np.zeros(n, dtype=bool)
    queries = []
    for key in rng.permutation(N_KEYS)[:n_pairs].tolist():
        value = int(rng.integers(N_VALUES))
        for _ in range(100):
            gap = int(round(math.exp(rng.uniform(math.log(PAIR_BYTES), math.log(n - QUERY_BYTES)))))
            start = int(rng.integers(0, n - QUERY_BYTES - gap + 1))  # the pair's first byte
            query = start + gap  # the query's first byte: its key's last byte is `gap` after the pair's last byte
            if taken[start:start + PAIR_BYTES].any() or taken[query:query + QUERY_BYTES].any():
                continue
            taken[start:start + PAIR_BYTES] = taken[query:query + QUERY_BYTES] = True
            chars[start:start + PAIR_BYTES] = [pair_char(key, value), ""]
            chars[query:query + QUERY_BYTES] = [chr(KEY + key), "", str(value)]
            queries.append({"key": key, "value": value, "gap": gap, "at": query + 1})
            break
    return "".join(chars), sorted(queries, key=lambda q: q["at"])


def parse(data):
    """The pairs and queries found in a document's bytes, independently of how it was made: (pairs, queries),
    pairs {key: (value, offset of the pair's last byte)}, queries [{"key", "value", "gap", "at"}] by offset."""
    pairs, queries = {}, []
    for i in range(1, len(data)):
        if data[i - 1] == 0xC4 and 0x80 <= data[i] < 0x80 + N_KEYS * N_VALUES:
            pairs[(data[i] - 0x80) // N_VALUES] = ((data[i] - 0x80) % N_VALUES, i)
        elif data[i - 1] == 0xCE and 0x91 <= data[i] < 0x91 + N_KEYS and i + 1 < len(data):
            key = data[i] - 0x91
            queries.append({"key": key, "value": int(chr(data[i + 1])), "gap": i - pairs[key][1], "at": i})
    return pairs, queries


def documents(rng, text, n_docs, cfg):
    """n_docs documents, each over a random doc_len slice of text."""
    starts = rng.integers(0, len(text) - cfg.doc_len, size=n_docs)
    return [document(rng, text[s:s + cfg.doc_len], cfg.n_pairs) for s in starts.tolist()]


def main(argv):
    cfg, prepare = cli.load(argv, RecallConfig, PrepareConfig)
    names = tokenizer_names(prepare.tokenizer, ("byte",), "recall")  # (gaps are in bytes)
    with open(os.path.join(DATA_DIR, "shakespeare", "input.txt"), encoding="utf-8") as f:
        text = f.read()
    n = int(0.9 * len(text))  # Shakespeare's own train/val split: val filler is text train never saw
    rng = np.random.default_rng(cfg.seed)
    train = documents(rng, text[:n], cfg.n_train, cfg)
    val = documents(rng, text[n:], cfg.n_val, cfg)
    for name in names:
        write_corpus("recall", Tokenizer(name), [t for t, _ in train], [t for t, _ in val],
                     {**vars(cfg), "n_keys": N_KEYS, "n_values": N_VALUES})
    path = os.path.join(DATA_DIR, "recall", "val_docs.jsonl")
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps({"text": t, "queries": q}) + "\n" for t, q in val)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main(sys.argv[1:])
