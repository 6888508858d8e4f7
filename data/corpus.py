"""
Corpora on disk, the offline tokenizers, and the loader that draws a stage's batches from a mixture.

A corpus is a folder data/<name>/ whose prepare.py writes one tokenization per tokenizer it supports:
data/<name>/<tokenizer>/ holds train.bin and val.bin (flat token ids, uint16, or uint32 for a vocabulary of more
than 65,536, each document followed by the end-of-text token) and meta.json (the tokenizer, the ids' type, the
counts of documents, tokens and bytes). A run names its tokenizer once and
its stages name corpora, so every corpus of a run is read in the same tokenization: two can never mix.

    byte   UTF-8 bytes: ids 0-255, end-of-text 256. Lossless for any text, 257 ids: the CPU track.
    gpt2   GPT-2's BPE (50257 ids, end-of-text 50256), from data/gpt2.tiktoken: the GPU configs.
    char   nanoGPT's shakespeare_char alphabet (65 characters, no end-of-text): the shakespeare corpus only.

A stage names a mixture, e.g. {"shakespeare": 0.7, "code": 0.3}: every sequence of a batch comes from one
corpus, drawn with those weights, at a uniformly random offset.
"""

import json
import math
import os
import shutil
from dataclasses import dataclass

import numpy as np
import torch

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
TOKENIZERS = ("byte", "gpt2", "char")

# GPT-2's BPE (tiktoken's "r50k_base"), loaded from the ranks file in this folder: tiktoken.get_encoding
# would download it, which fails without a network.
GPT2_RANKS = os.path.join(DATA_DIR, "gpt2.tiktoken")
GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOT = 50256
BYTE_EOT = 256


def gpt2_encoding():
    import tiktoken
    import tiktoken.load
    ranks = tiktoken.load.load_tiktoken_bpe(GPT2_RANKS, expected_hash=GPT2_SHA256)
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": GPT2_EOT})


class Tokenizer:
    """encode/decode for one of TOKENIZERS. decode never raises: an id the tokenizer does not have, or a
    multi-byte character cut off by sampling, shows as the replacement character U+FFFD."""

    def __init__(self, name, chars=None):
        if name not in TOKENIZERS:
            raise ValueError(f"unknown tokenizer {name!r}; known: {', '.join(TOKENIZERS)}")
        self.name = name
        if name == "byte":
            self.eot, self.vocab_size = BYTE_EOT, BYTE_EOT + 1
        elif name == "gpt2":
            self.enc = gpt2_encoding()
            self.eot, self.vocab_size = GPT2_EOT, self.enc.n_vocab
        else:
            if not chars:
                raise ValueError("the char tokenizer needs its alphabet (chars)")
            self.chars, self.stoi = list(chars), {ch: i for i, ch in enumerate(chars)}
            self.eot, self.vocab_size = None, len(self.chars)

    @classmethod
    def from_meta(cls, meta):
        return cls(meta["tokenizer"], meta.get("chars"))

    def meta(self):
        """What meta.json and checkpoints record to rebuild this tokenizer."""
        return {"tokenizer": self.name, "vocab_size": self.vocab_size,
                **({"chars": self.chars} if self.name == "char" else {})}

    def encode(self, text):
        if self.name == "byte":
            return list(text.encode("utf-8"))
        if self.name == "gpt2":
            return self.enc.encode_ordinary(text)
        unknown = sorted(set(text) - set(self.stoi))
        if unknown:
            raise ValueError(f"characters not in the char tokenizer's alphabet: {''.join(unknown)!r}")
        return [self.stoi[ch] for ch in text]

    def encode_document(self, text):
        """A document as training sees it: its tokens, then end-of-text (if the tokenizer has one)."""
        return self.encode(text) + ([self.eot] if self.eot is not None else [])

    def decode(self, ids):
        ids = [int(i) for i in ids]
        if self.name == "byte":  # end-of-text shows as GPT-2 shows it; a cut UTF-8 sequence as U+FFFD
            text, run = [], bytearray()
            for i in ids:
                if 0 <= i < 256:
                    run.append(i)
                    continue
                text += [run.decode("utf-8", errors="replace"), "<|endoftext|>" if i == BYTE_EOT else "\ufffd"]
                run = bytearray()
            return "".join(text) + run.decode("utf-8", errors="replace")
        if self.name == "gpt2":
            return self.enc.decode([i if 0 <= i < self.vocab_size else GPT2_EOT for i in ids], errors="replace")
        return "".join(self.chars[i] if 0 <= i < self.vocab_size else "\ufffd" for i in ids)

    def token_bytes(self):
        """UTF-8 bytes of each id's text (0 for end-of-text): the denominator of bits per byte."""
        if self.name == "byte":
            return [1] * 256 + [0]
        if self.name == "gpt2":
            return [len(self.enc.decode_single_token_bytes(i)) if i != GPT2_EOT else 0 for i in range(self.vocab_size)]
        return [len(ch.encode("utf-8")) for ch in self.chars]


# -----------------------------------------------------------------------------------------------------
# Writing and reading corpora

@dataclass
class PrepareConfig:
    tokenizer: str = "all"               # "byte", "gpt2", "char", or "all" that the corpus supports


def tokenizer_names(choice, supported, corpus):
    """The tokenizers a prepare script writes for --tokenizer=choice."""
    if choice == "all":
        return list(supported)
    if choice not in supported:
        raise SystemExit(f"corpus {corpus!r} has no {choice!r} tokenization; it supports {', '.join(supported)}")
    return [choice]


def token_dtype(vocab_size):
    """The narrowest unsigned type that holds every id of a vocabulary: uint16 up to 65,536 ids, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2 ** 16 else np.uint32)


class CorpusWriter:
    """One tokenization of a corpus written as its documents come, in bounded memory: train.bin and val.bin grow in
    a folder beside the final one (<tokenizer>.tmp/), which takes the final one's place only once finish() has
    written its meta.json. A reader never sees a half-written corpus: the folder it reads is whole or absent.

    progress.json in the folder records how far the writing got (documents done, the files' sizes, the counts),
    updated by save_progress after the data it names is on disk; a writer made again with the same `signature`
    (what the input was) truncates the files to those sizes and carries on from `resumed_docs`. A different
    signature, or none, starts over."""

    def __init__(self, directory, tokenizer, signature=None):
        self.final, self.folder, self.tokenizer = directory, directory + ".tmp", tokenizer
        self.dtype = token_dtype(tokenizer.vocab_size)
        self.counts = {f"{split}_{what}": 0 for split in ("train", "val") for what in ("tokens", "bytes", "documents")}
        self.resumed_docs, progress = 0, os.path.join(self.folder, "progress.json")
        try:
            with open(progress) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            saved = None
        if saved is not None and signature is not None and saved.get("signature") == signature:
            self.resumed_docs, self.counts = saved["documents"], saved["counts"]
        else:
            shutil.rmtree(self.folder, ignore_errors=True)
            os.makedirs(self.folder)
        self.files = {}
        for split in ("train", "val"):
            path = os.path.join(self.folder, f"{split}.bin")
            self.files[split] = open(path, "r+b" if os.path.exists(path) else "wb")
            self.files[split].truncate(self.counts[f"{split}_tokens"] * self.dtype.itemsize)
            self.files[split].seek(0, os.SEEK_END)
        self.signature = signature

    def add(self, split, ids, n_bytes, n_docs):
        """Append the token ids (a sequence or array, end-of-text tokens included) of n_docs documents of n_bytes
        bytes of text to a split."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.tokenizer.vocab_size):
            raise ValueError(f"token id {int(ids.max()) if ids.max() >= 0 else int(ids.min())} is outside the "
                             f"{self.tokenizer.name} tokenizer's {self.tokenizer.vocab_size} ids")
        self.files[split].write(ids.astype(self.dtype).tobytes())
        for what, n in (("tokens", ids.size), ("bytes", n_bytes), ("documents", n_docs)):
            self.counts[f"{split}_{what}"] += int(n)

    def save_progress(self, documents):
        """Record that the first `documents` input documents are written (the files flushed to disk first)."""
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
        write_json({"signature": self.signature, "documents": documents, "counts": self.counts},
                   os.path.join(self.folder, "progress.json"))

    def finish(self, meta=None):
        """meta.json written, then the folder takes the final one's place (an older corpus there goes)."""
        for f in self.files.values():
            f.close()
        meta = {**self.tokenizer.meta(), **(meta or {}), "dtype": self.dtype.name, **self.counts}
        write_json(meta, os.path.join(self.folder, "meta.json"))
        os.remove(os.path.join(self.folder, "progress.json")) if os.path.exists(
            os.path.join(self.folder, "progress.json")) else None
        old = self.final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(self.final):
            os.replace(self.final, old)
        os.replace(self.folder, self.final)
        shutil.rmtree(old, ignore_errors=True)
        return meta

    def abort(self):
        """Nothing of this writing left behind (a bad input, a full disk): the folder goes."""
        for f in self.files.values():
            f.close()
        shutil.rmtree(self.folder, ignore_errors=True)
        try:
            os.rmdir(os.path.dirname(self.folder))  # (the corpus's own folder, if this writing made it)
        except OSError:
            pass


def write_json(obj, path):
    """path written whole or not at all (a .tmp renamed over it)."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def write_corpus(name, tokenizer, train_docs, val_docs, meta=None, directory=None):
    """Tokenize documents with `tokenizer` (a Tokenizer) and write train.bin, val.bin and meta.json to
    data/<name>/<tokenizer>/ (or `directory`): the small corpora this repository builds, in one go."""
    writer = CorpusWriter(directory or os.path.join(DATA_DIR, name, tokenizer.name), tokenizer)
    try:
        for split, docs in (("train", train_docs), ("val", val_docs)):
            for doc in docs:
                writer.add(split, tokenizer.encode_document(doc), len(doc.encode("utf-8")), 1)
        meta = writer.finish(meta)
    except BaseException:
        writer.abort()
        raise
    print(f"{name} ({tokenizer.name}): {meta['train_tokens']:,} train tokens, {meta['val_tokens']:,} val "
          f"tokens -> {writer.final}")
    return meta


def read_tokens(path, meta, split):
    """A split's token ids as written (uint16 or uint32, as meta.json says), memory-mapped: nothing is loaded."""
    dtype = np.dtype(meta.get("dtype", "uint16"))
    n = meta[f"{split}_tokens"]
    if os.path.getsize(path) != n * dtype.itemsize:
        raise ValueError(f"{path} holds {os.path.getsize(path)} bytes but meta.json counts {n} tokens of {dtype.name} "
                         f"({n * dtype.itemsize} bytes): the file is truncated or stale; prepare the corpus again")
    return np.memmap(path, dtype=dtype, mode="r") if n else np.zeros(0, dtype)


def available_corpora():
    return sorted(d for d in os.listdir(DATA_DIR) if os.path.isfile(os.path.join(DATA_DIR, d, "prepare.py"))
                  or any(os.path.isfile(os.path.join(DATA_DIR, d, t, "meta.json")) for t in TOKENIZERS))


def read_meta(name, tokenizer):
    """meta.json of a corpus prepared for `tokenizer`, or a clear error saying what to run."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; known: {', '.join(TOKENIZERS)}")
    if not os.path.isdir(os.path.join(DATA_DIR, name)):
        raise FileNotFoundError(f"unknown corpus {name!r}; corpora in {DATA_DIR}: {', '.join(available_corpora())}")
    directory = os.path.join(DATA_DIR, name, tokenizer)
    how = (f"python data/{name}/prepare.py --tokenizer={tokenizer}"
           if os.path.isfile(os.path.join(DATA_DIR, name, "prepare.py"))
           else f"python data/text/prepare.py --name={name} --tokenizer={tokenizer} FILES...")
    for file in ("meta.json", "train.bin", "val.bin"):
        if not os.path.isfile(os.path.join(directory, file)):
            raise FileNotFoundError(f"corpus {name!r} is not prepared for the {tokenizer} tokenizer ({file} is "
                                    f"missing): run `{how}` (or `python data/prepare.py` for all offline corpora)")
    path = os.path.join(directory, "meta.json")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        counts = [k for k in ("train_tokens", "val_tokens")
                  if not isinstance(meta.get(k), int) or isinstance(meta.get(k), bool) or meta[k] < 0]
        if counts:
            raise ValueError(f"{' and '.join(counts)} must be a count of tokens")
        if meta.get("dtype", "uint16") not in ("uint16", "uint32"):
            raise ValueError(f"dtype must be uint16 or uint32; got {meta.get('dtype')!r}")
        if meta.get("tokenizer") != tokenizer:
            raise ValueError(f"it names the tokenizer {meta.get('tokenizer')!r}, and it is in the {tokenizer} folder")
        if tokenizer == "char" and not (isinstance(meta.get("chars"), list) and meta["chars"]):
            raise ValueError("the char tokenizer's alphabet (chars) is missing")
    except ValueError as e:  # (JSONDecodeError and UnicodeDecodeError are ValueErrors)
        raise ValueError(f"{path} is not a corpus's meta.json ({e}): prepare the corpus again with `{how}`") from None
    return meta


def check_token_ids(name, tokenizer, vocab_size):
    """Every token id of both splits is below vocab_size: a .bin written by another tokenizer, or damaged, is
    found at startup rather than as an index error deep in the model. Reads the files in chunks (about a
    second per GB)."""
    for split in ("train", "val"):
        path = os.path.join(DATA_DIR, name, tokenizer, f"{split}.bin")
        data = read_tokens(path, read_meta(name, tokenizer), split)
        largest = max((int(data[i:i + 2 ** 24].max()) for i in range(0, len(data), 2 ** 24)), default=-1)
        if largest >= vocab_size:
            raise ValueError(f"{path} holds token id {largest}, beyond the {tokenizer} tokenizer's {vocab_size} "
                             f"ids: it was written by another tokenizer or is damaged; prepare the corpus again")


def check_prepared(stages, tokenizer, eval_seq_len):
    """Before a run starts, what its data must be, so that a bad corpus stops it now rather than mid-run: each
    stage's mixture (its weights, and train splits long enough and whole for its seq_len), each corpus's val split
    for eval_seq_len, and every token id within the tokenizer. stages: (name, mixture, seq_len) of each stage."""
    for name, mixture, seq_len in stages:
        try:
            MixtureLoader(mixture, tokenizer.name, seq_len, 1)
        except ValueError as e:
            raise ValueError(f"stage {name!r}: {e}") from None
    for corpus in dict.fromkeys(c for _, mixture, _ in stages for c in mixture):
        MixtureLoader({corpus: 1.0}, tokenizer.name, eval_seq_len, 1, split="val")
        check_token_ids(corpus, tokenizer.name, tokenizer.vocab_size)


def mixture_tokenizer(names, tokenizer):
    """The one Tokenizer the corpora of a run share (char alphabets, made per corpus, must agree)."""
    metas = {name: read_meta(name, tokenizer) for name in names}
    alphabets = {tuple(m.get("chars", ())) for m in metas.values()}
    if len(alphabets) > 1:
        raise ValueError(f"the char tokenizer's alphabet differs between corpora {', '.join(metas)}: "
                         f"use the byte tokenizer to mix them")
    return Tokenizer.from_meta(next(iter(metas.values())))


# -----------------------------------------------------------------------------------------------------
# Drawing batches

class MixtureLoader:
    """Batches of (x, y) int64 (batch_size, seq_len), y = x shifted by one, from a weighted mixture of
    corpora in one tokenization.

    Every call draws one global micro-batch of batch_size * world_size rows from a stream seeded by
    (seed, stream), row by row, and rank r keeps rows r*batch_size .. (r+1)*batch_size - 1. So the ranks
    see different data, and the global batch does not depend on the world size: 2 ranks with one micro-step
    each see exactly what 1 process sees in two micro-steps. state_dict()/load_state_dict() capture the
    random state, so a resumed run continues with exactly the batch it would have drawn next.
    """

    def __init__(self, mixture, tokenizer, seq_len, batch_size, split="train", seed=0, rank=0, world_size=1,
                 stream=0):
        if not isinstance(mixture, dict) or not mixture:
            raise ValueError(f"a mixture must be a non-empty dict corpus -> weight; got {mixture!r}")
        for name, weight in mixture.items():
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not 0 < weight < math.inf:
                raise ValueError(f"mixture weight of {name!r} must be a positive finite number; got {weight!r}")
        if not math.isfinite(sum(mixture.values())):
            raise ValueError(f"the mixture's weights must sum to a finite number (they are relative: 0.7 and 0.3, "
                             f"or 7 and 3); got {mixture!r}")
        self.tokenizer = mixture_tokenizer(list(mixture), tokenizer)
        self.names = list(mixture)
        weights = np.array([mixture[n] for n in self.names], dtype=np.float64)
        self.weights = weights / weights.sum()
        self.seq_len, self.batch_size, self.rank, self.world_size = seq_len, batch_size, rank, world_size
        self.data = {name: self.open(name, tokenizer, split) for name in self.names}
        self.rng = np.random.default_rng([seed, stream])

    def open(self, name, tokenizer, split):
        data = read_tokens(os.path.join(DATA_DIR, name, tokenizer, f"{split}.bin"), read_meta(name, tokenizer), split)
        if len(data) <= self.seq_len + 1:
            raise ValueError(f"the {split} split of {name!r} has {len(data)} tokens, too few for seq_len "
                             f"{self.seq_len}: it needs at least {self.seq_len + 2}")
        return data

    def next_batch(self):
        """Returns x, y and the index (into self.names) of the corpus each row came from."""
        draws = []
        for _ in range(self.batch_size * self.world_size):
            source = int(self.rng.choice(len(self.names), p=self.weights))
            draws.append((source, int(self.rng.integers(0, len(self.data[self.names[source]]) - self.seq_len - 1))))
        mine = draws[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        batch = torch.from_numpy(np.stack([np.asarray(self.data[self.names[s]][i:i + self.seq_len + 1], dtype=np.int64)
                                           for s, i in mine]))
        return batch[:, :-1], batch[:, 1:], torch.tensor([s for s, _ in mine])

    def state_dict(self):
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state["rng"]
