"""
Corpora on disk, the offline tokenizers, and the loader that draws a stage's batches from a mixture.

A corpus is a folder data/<name>/ holding train.bin and val.bin (flat uint16 token ids, documents separated
by the end-of-text token) and meta.json (tokenizer, vocab size, token counts). Each folder's prepare.py
writes them. A stage names a mixture, e.g. {"shakespeare": 0.7, "code": 0.3}: every sequence of a batch
comes from one corpus, drawn with those weights, at a uniformly random offset.
"""

import json
import os

import numpy as np
import torch

DATA_DIR = os.path.dirname(os.path.abspath(__file__))

# GPT-2's BPE (tiktoken's "r50k_base"), loaded from the ranks file in this folder: tiktoken.get_encoding
# would download it, which fails without a network.
GPT2_RANKS = os.path.join(DATA_DIR, "gpt2.tiktoken")
GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOT = 50256


def gpt2_encoding():
    import tiktoken
    import tiktoken.load
    ranks = tiktoken.load.load_tiktoken_bpe(GPT2_RANKS, expected_hash=GPT2_SHA256)
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": GPT2_EOT})


class Tokenizer:
    """encode/decode for the tokenizer a corpus's meta.json names: "gpt2" (BPE) or "char" (its alphabet)."""

    def __init__(self, meta):
        self.name = meta["tokenizer"]
        if self.name == "gpt2":
            self.enc = gpt2_encoding()
            self.eot, self.vocab_size = GPT2_EOT, self.enc.n_vocab
        elif self.name == "char":
            self.chars = meta["chars"]
            self.stoi = {ch: i for i, ch in enumerate(self.chars)}
            self.eot, self.vocab_size = None, len(self.chars)
        else:
            raise ValueError(f"unknown tokenizer {self.name!r} in meta.json (known: gpt2, char)")

    def encode(self, text):
        if self.name == "gpt2":
            return self.enc.encode_ordinary(text)
        unknown = sorted(set(text) - set(self.stoi))
        if unknown:
            raise ValueError(f"characters not in this corpus's alphabet: {''.join(unknown)!r}")
        return [self.stoi[ch] for ch in text]

    def decode(self, ids):
        if self.name == "gpt2":
            return self.enc.decode(list(ids))
        return "".join(self.chars[i] for i in ids)


# -----------------------------------------------------------------------------------------------------
# Writing and reading corpora

def corpus_dir(name):
    return os.path.join(DATA_DIR, name)


def write_corpus(name, train_ids, val_ids, meta, directory=None):
    """Write train.bin, val.bin (uint16) and meta.json for a corpus."""
    directory = directory or corpus_dir(name)
    os.makedirs(directory, exist_ok=True)
    for split, ids in (("train", train_ids), ("val", val_ids)):
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= 2 ** 16):
            raise ValueError(f"token ids must fit in uint16; got range [{arr.min()}, {arr.max()}]")
        arr.astype(np.uint16).tofile(os.path.join(directory, f"{split}.bin"))
    meta = {**meta, "train_tokens": len(train_ids), "val_tokens": len(val_ids)}
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"{name}: {len(train_ids):,} train tokens, {len(val_ids):,} val tokens -> {directory}")
    return meta


def available_corpora():
    return sorted(d for d in os.listdir(DATA_DIR)
                  if os.path.isfile(os.path.join(DATA_DIR, d, "prepare.py"))
                  or os.path.isfile(os.path.join(DATA_DIR, d, "meta.json")))


def read_meta(name):
    """meta.json of a prepared corpus, or a clear error saying what to run."""
    directory = corpus_dir(name)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"unknown corpus {name!r}; corpora in {DATA_DIR}: {', '.join(available_corpora())}")
    for file in ("meta.json", "train.bin", "val.bin"):
        if not os.path.isfile(os.path.join(directory, file)):
            how = (f"python data/{name}/prepare.py" if os.path.isfile(os.path.join(directory, "prepare.py"))
                   else f"python data/text/prepare.py --name={name} FILES...")
            raise FileNotFoundError(f"corpus {name!r} is not prepared ({file} is missing): run `{how}` "
                                    f"(or `python data/prepare.py` for all offline corpora)")
    with open(os.path.join(directory, "meta.json")) as f:
        return json.load(f)


def mixture_tokenizer(names):
    """The one meta all corpora of a mixture share; mixing tokenizers is an error."""
    metas = {name: read_meta(name) for name in names}
    kinds = {(m["tokenizer"], m["vocab_size"]) for m in metas.values()}
    if len(kinds) > 1:
        listing = ", ".join(f"{n}: {m['tokenizer']} ({m['vocab_size']})" for n, m in metas.items())
        raise ValueError(f"all corpora of a run must share one tokenizer; got {listing}")
    return next(iter(metas.values()))


# -----------------------------------------------------------------------------------------------------
# Drawing batches

class MixtureLoader:
    """Batches of (x, y) int64 (batch_size, seq_len), y = x shifted by one, from a weighted mixture.

    Every call draws one global micro-batch of batch_size * world_size rows from a stream seeded by
    (seed, stream), row by row, and rank r keeps rows r*batch_size .. (r+1)*batch_size - 1. So the ranks
    see different data, and the global batch does not depend on the world size: 2 ranks with one micro-step
    each see exactly what 1 process sees in two micro-steps. state_dict()/load_state_dict() capture the
    random state, so a resumed run continues with exactly the batch it would have drawn next.
    """

    def __init__(self, mixture, seq_len, batch_size, split="train", seed=0, rank=0, world_size=1, stream=0):
        if not isinstance(mixture, dict) or not mixture:
            raise ValueError(f"a mixture must be a non-empty dict corpus -> weight; got {mixture!r}")
        for name, weight in mixture.items():
            if not isinstance(weight, (int, float)) or not weight > 0:
                raise ValueError(f"mixture weight of {name!r} must be a positive number; got {weight!r}")
        self.meta = mixture_tokenizer(list(mixture))
        self.names = list(mixture)
        weights = np.array([mixture[n] for n in self.names], dtype=np.float64)
        self.weights = weights / weights.sum()
        self.seq_len, self.batch_size, self.rank, self.world_size = seq_len, batch_size, rank, world_size
        self.data = {}
        for name in self.names:
            arr = np.memmap(os.path.join(corpus_dir(name), f"{split}.bin"), dtype=np.uint16, mode="r")
            if len(arr) <= seq_len + 1:
                raise ValueError(f"{split} split of {name!r} has {len(arr)} tokens, too few for seq_len {seq_len}")
            self.data[name] = arr
        self.rng = np.random.default_rng([seed, stream])

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
