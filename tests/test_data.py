import json
import math
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from data.corpus import (BYTE_EOT, DATA_DIR, MixtureLoader, Tokenizer, gpt2_encoding, mixture_tokenizer, read_meta,
                         write_corpus)
from infra.evaluation import arith_accuracy, bits_per_byte, read_problems, scoring_split


@pytest.fixture
def offline(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_gpt2_tokenizer_offline(offline, corpora):
    enc = gpt2_encoding()
    assert enc.encode_ordinary("hello world") == [31373, 995]
    text = "To be, or not to be: that is the question.\n  def f(x): return x ** 2"
    assert enc.decode(enc.encode_ordinary(text)) == text
    with open(os.path.join(corpora, "data", "shakespeare", "input.txt"), encoding="utf-8") as f:
        assert len(enc.encode_ordinary(f.read())) == 338025
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]


def random_unicode(rng, n):
    """Characters from every UTF-8 length: ASCII, Latin, CJK, emoji (surrogates excluded)."""
    ranges = [(0x20, 0x7E), (0xA0, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFD), (0x10000, 0x10FFFF)]
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(n))


def test_byte_tokenizer_is_lossless_and_never_raises():
    tok, rng = Tokenizer("byte"), random.Random(0)
    for _ in range(200):
        text = random_unicode(rng, rng.randint(0, 40))
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8")) and tok.decode(ids) == text
        assert tok.encode_document(text) == ids + [BYTE_EOT]
    cut = tok.encode("naïve 日本")[:-1]                 # sampling stopped inside the last character
    assert tok.decode(cut) == "naïve 日\ufffd"
    assert tok.decode([104, 105, BYTE_EOT, 300, 104]) == "hi<|endoftext|>\ufffdh"  # 300: a padding id
    assert tok.vocab_size == 257 and sum(tok.token_bytes()) == 256


def test_char_and_gpt2_tokenizers_decode_padding_ids(corpora):
    char = Tokenizer.from_meta(read_meta("shakespeare", "char"))
    assert char.vocab_size == 65 and char.decode(char.encode("ROMEO: hi!")) == "ROMEO: hi!"
    assert char.decode([0, 100]) == "\n\ufffd"
    gpt2 = Tokenizer("gpt2")
    assert gpt2.decode([31373, 50300]) == "hello<|endoftext|>"
    assert gpt2.token_bytes()[31373] == 5 and gpt2.token_bytes()[50256] == 0


def test_mixture_shares(corpora):
    loader = MixtureLoader({"shakespeare": 0.6, "code": 0.3, "arith": 0.1}, "gpt2", seq_len=8, batch_size=100)
    counts = np.zeros(3)
    for _ in range(100):  # 10,000 draws
        _, _, source = loader.next_batch()
        counts += np.bincount(source.numpy(), minlength=3)
    shares = counts / counts.sum()
    assert np.all(np.abs(shares - [0.6, 0.3, 0.1]) < 0.02), shares


@pytest.mark.parametrize("tokenizer", ["byte", "gpt2", "char"])
def test_batches_are_shifted_slices_of_the_corpus(corpora, tokenizer):
    loader = MixtureLoader({"shakespeare": 1.0}, tokenizer, seq_len=16, batch_size=4)
    x, y, _ = loader.next_batch()
    assert x.shape == y.shape == (4, 16)
    assert (x[:, 1:] == y[:, :-1]).all()
    with open(os.path.join(corpora, "data", "shakespeare", "input.txt"), encoding="utf-8") as f:
        assert loader.tokenizer.decode(x[0].tolist()) in f.read()


def test_ranks_differ_and_state_restores(corpora):
    a = MixtureLoader({"shakespeare": 1.0, "code": 1.0}, "byte", 16, 4, seed=1, rank=0, world_size=2)
    b = MixtureLoader({"shakespeare": 1.0, "code": 1.0}, "byte", 16, 4, seed=1, rank=1, world_size=2)
    xa, xb = a.next_batch()[0], b.next_batch()[0]
    assert not np.array_equal(xa, xb)
    # The two ranks' rows together are the global batch one process draws with world_size=1.
    single = MixtureLoader({"shakespeare": 1.0, "code": 1.0}, "byte", 16, 8, seed=1)
    assert np.array_equal(single.next_batch()[0], np.concatenate([xa, xb]))
    state = a.state_dict()
    expected = a.next_batch()
    c = MixtureLoader({"shakespeare": 1.0, "code": 1.0}, "byte", 16, 4, seed=99, rank=0)
    c.load_state_dict(state)
    got = c.next_batch()
    assert all(np.array_equal(e, g) for e, g in zip(expected, got))


# -----------------------------------------------------------------------------------------------------
# The arithmetic benchmark

def documents(tokenizer, split):
    """The documents of the prepared arith corpus, as training reads them: token lists cut at end-of-text."""
    data = np.fromfile(os.path.join(DATA_DIR, "arith", tokenizer, f"{split}.bin"), dtype=np.uint16).tolist()
    eot = Tokenizer(tokenizer).eot
    docs, start = [], 0
    for i, t in enumerate(data):
        if t == eot:
            docs.append(data[start:i + 1])
            start = i + 1
    return docs


def test_arith_val_problems_are_right_and_graded(corpora):
    problems = read_problems()
    assert {p["difficulty"] for p in problems} == {1, 2, 3, 4, 5}
    for p in problems:
        a, op, b = re.fullmatch(r"(\d+)([-+*])(\d+)=", p["prompt"]).groups()
        a, b = int(a), int(b)
        assert op == p["op"] and str({"+": a + b, "-": a - b, "*": a * b}[op]) == p["answer"]
        longer = max(len(str(a)), len(str(b)))
        assert (op == "*" and p["difficulty"] == 5 and longer == 2) or (op != "*" and p["difficulty"] == longer)
    assert len({p["prompt"] for p in problems}) == len(problems)
    assert sum(p["answer"].startswith("-") for p in problems) > 100  # negative answers are in the benchmark


def test_arith_val_is_held_out_from_train_beyond_level_1(corpora):
    tok = Tokenizer("byte")
    train = {tok.decode(doc[:-1]).split("=")[0] + "=" for doc in documents("byte", "train")}
    problems = read_problems()
    shared = {p["difficulty"] for p in problems if p["prompt"] in train}
    assert shared == {1}  # all 200 one-digit problems are both train and val; nothing else is
    assert len(train) > 50_000


class Oracle:
    """A 'model' that continues any prefix exactly as the corpus's val documents do: it finds the document
    that starts with the context (after its end-of-text) and emits the rest of it."""

    def __init__(self, docs, vocab):
        self.docs, self.wte = docs, torch.nn.Embedding(1, 1)
        self.vocab = vocab

    def eval(self):
        return self

    train = eval

    def generate(self, idx, max_new_tokens, temperature, vocab_size=None):
        rows = []
        for row in idx.tolist():
            doc = next(d for d in self.docs if d[:len(row) - 1] == row[1:])
            rest = doc[len(row) - 1:] + [0] * max_new_tokens
            rows.append(row + rest[:max_new_tokens])
        return torch.tensor(rows)


@pytest.mark.parametrize("tokenizer", ["byte", "gpt2"])
def test_an_oracle_scores_100_percent_at_every_level(corpora, tokenizer):
    tok, problems = Tokenizer(tokenizer), read_problems(60)
    oracle = Oracle(documents(tokenizer, "val"), tok.vocab_size)
    acc = arith_accuracy(oracle, tok, problems, torch.autocast("cpu", enabled=False))
    assert acc["all"] == 1.0 and set(acc["level"].values()) == {1.0} and set(acc["op"].values()) == {1.0}
    # A prompt encoded on its own would not match training under GPT-2: "=-" is one token there.
    if tokenizer == "gpt2":
        context, expected = scoring_split(tok, "3-7=", "-4")
        assert tok.decode(context[1:] + expected) == "3-7=-4<|endoftext|>" and tok.decode(context[1:]) == "3-7"


def test_bits_per_byte_by_hand():
    token_bytes = torch.tensor([1, 2, 0])             # id 2 is end-of-text: no bytes, not counted
    loss = torch.tensor([[1.0, 2.0, 5.0], [3.0, 0.5, 0.5]])
    targets = torch.tensor([[0, 1, 2], [1, 0, 0]])
    expected = (1.0 + 2.0 + 3.0 + 0.5 + 0.5) / math.log(2) / (1 + 2 + 2 + 1 + 1)
    assert bits_per_byte(loss, targets, token_bytes) == pytest.approx(expected)


# -----------------------------------------------------------------------------------------------------
# Bad input

def test_bad_inputs(corpora, tmp_path):
    with pytest.raises(FileNotFoundError, match="unknown corpus"):
        MixtureLoader({"no_such_corpus": 1.0}, "byte", 8, 2)
    with pytest.raises(ValueError, match="positive"):
        MixtureLoader({"shakespeare": 0}, "byte", 8, 2)
    with pytest.raises(ValueError, match="non-empty"):
        MixtureLoader({}, "byte", 8, 2)
    with pytest.raises(FileNotFoundError, match="not prepared for the char tokenizer"):
        mixture_tokenizer(["shakespeare", "code"], "char")  # one tokenization per run, by construction
    with pytest.raises(ValueError, match="unknown tokenizer"):
        MixtureLoader({"shakespeare": 1.0}, "bpe", 8, 2)
    with pytest.raises(FileNotFoundError, match="prepare.py"):
        read_meta("text", "byte")  # has a prepare.py but no prepared files


def test_a_truncated_or_tiny_split_is_refused(corpora, tmp_path, monkeypatch):
    import data.corpus as corpus
    monkeypatch.setattr(corpus, "DATA_DIR", str(tmp_path))
    os.makedirs(tmp_path / "tiny")
    write_corpus("tiny", Tokenizer("byte"), ["a long enough training document"], ["short"])
    with pytest.raises(ValueError, match="too few for seq_len 8"):
        MixtureLoader({"tiny": 1.0}, "byte", 8, 2, split="val")
    path = tmp_path / "tiny" / "byte" / "train.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(ValueError, match="truncated"):
        MixtureLoader({"tiny": 1.0}, "byte", 8, 2)


def test_generic_text_prepare(corpora, tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": f"document number {i}"}) for i in range(40)))
    name = "pytest_tmp_corpus"
    try:
        subprocess.run([sys.executable, "data/text/prepare.py", f"--name={name}", str(docs)], cwd=corpora,
                       check=True, capture_output=True)
        for tokenizer in ("byte", "gpt2"):
            meta = read_meta(name, tokenizer)
            assert meta["documents"] == 40 and meta["tokenizer"] == tokenizer
            x, _, _ = MixtureLoader({name: 1.0}, tokenizer, 4, 2).next_batch()
            assert x.shape == (2, 4)
        bad = subprocess.run([sys.executable, "data/text/prepare.py", "--name=x", str(tmp_path / "none.txt")],
                             cwd=corpora, capture_output=True, text=True)
        assert bad.returncode != 0 and "no such file" in bad.stderr
        for line in ('{"text": 5}', '["text"]'):  # (nothing is written: the corpus folder never appears)
            (tmp_path / "odd.jsonl").write_text(docs.read_text() + "\n" + line + "\n")
            bad = subprocess.run([sys.executable, "data/text/prepare.py", "--name=pytest_odd",
                                  str(tmp_path / "odd.jsonl")], cwd=corpora, capture_output=True, text=True)
            assert bad.returncode == 1 and 'odd.jsonl:41: expected a JSON object with a "text" field holding a string' \
                in bad.stderr and "Traceback" not in bad.stderr
            assert not os.path.exists(os.path.join(corpora, "data", "pytest_odd"))
        builtin = subprocess.run([sys.executable, "data/text/prepare.py", "--name=shakespeare", str(docs)],
                                 cwd=corpora, capture_output=True, text=True)
        assert builtin.returncode != 0 and "--overwrite" in builtin.stderr
    finally:
        shutil.rmtree(os.path.join(corpora, "data", name), ignore_errors=True)


def test_token_ids_past_65535_are_stored_wide_and_come_back_whole(tmp_path):
    from data.corpus import CorpusWriter, read_tokens

    class Wide(Tokenizer):  # a vocabulary of 100,000 ids
        def __init__(self):
            super().__init__("byte")
            self.vocab_size, self.eot = 100_000, 99_999

        def encode(self, text):
            return [70_000 + ord(c) for c in text]
    wide = Wide()
    meta = write_corpus("x", wide, ["ab", "c"], ["d"], directory=str(tmp_path / "x"))
    assert meta["dtype"] == "uint32"
    assert read_tokens(str(tmp_path / "x" / "train.bin"), meta, "train").tolist() == [70097, 70098, 99999, 70099, 99999]
    writer = CorpusWriter(str(tmp_path / "y"), Tokenizer("byte"))  # an id beyond the tokenizer's is refused
    with pytest.raises(ValueError, match="token id 300 is outside the byte tokenizer's 257 ids"):
        writer.add("train", [1, 300], 2, 1)


PREPARE = [sys.executable, "data/text/prepare.py", "--tokenizer=byte"]


def text_inputs(folder, n_docs=300):
    """A JSONL file of n_docs documents and a .txt document of about 60 KB whose lines (some indented) are read
    in pieces, with a CRLF line ending (read as \\n, as the whole-file read did)."""
    rng = random.Random(0)
    words = ["the", "king", "ε", "données", "\u2603", "Σ", "and", "2+2=4", "x"]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 80))) for _ in range(n_docs)]
    (folder / "a.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n", encoding="utf-8")
    lines = [("  " if i % 3 == 0 else "") + " ".join(rng.choice(words) for _ in range(12)) for i in range(2000)]
    (folder / "b.txt").write_bytes(("\n".join(lines) + "\r\nend\n").encode("utf-8"))
    return docs + [("\n".join(lines) + "\nend\n")], [str(folder / "a.jsonl"), str(folder / "b.txt")]


def prepared(corpora, name):
    folder = os.path.join(corpora, "data", name, "byte")
    return {f: open(os.path.join(folder, f), "rb").read() for f in ("train.bin", "val.bin")}, \
        json.load(open(os.path.join(folder, "meta.json")))


def test_the_streaming_prepare_is_the_same_for_any_worker_count_and_equals_one_write(corpora, tmp_path):
    docs, files = text_inputs(tmp_path)
    names = ["pytest_w1", "pytest_w2"]
    try:
        for name, workers in zip(names, (1, 2)):
            done = subprocess.run(PREPARE + [f"--name={name}", f"--workers={workers}", "--chunk_mib=0.01", *files],
                                  cwd=corpora, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr[-2000:]
        (one, meta1), (two, meta2) = prepared(corpora, names[0]), prepared(corpora, names[1])
        assert one == two and meta1 == meta2
        val = [d for i, d in enumerate(docs, 1) if i % 20 == 0]
        train = [d for i, d in enumerate(docs, 1) if i % 20]
        reference = write_corpus("r", Tokenizer("byte"), train, val, directory=str(tmp_path / "r"))
        assert one == {f: (tmp_path / "r" / f).read_bytes() for f in ("train.bin", "val.bin")}
        assert {k: meta1[k] for k in reference} == reference and meta1["documents"] == len(docs)
        assert meta1["train_bytes"] + meta1["val_bytes"] == sum(len(d.encode()) for d in docs)
        x, _, _ = MixtureLoader({names[1]: 1.0}, "byte", 16, 2).next_batch()
        assert x.shape == (2, 16)
    finally:
        for name in names:
            shutil.rmtree(os.path.join(corpora, "data", name), ignore_errors=True)


def test_a_prepare_killed_midway_continues_to_the_same_files(corpora, tmp_path):
    _, files = text_inputs(tmp_path, n_docs=20_000)
    names, args = ["pytest_whole", "pytest_killed"], ["--workers=1", "--chunk_mib=0.02", *files]
    progress = os.path.join(corpora, "data", names[1], "byte.tmp", "progress.json")
    try:
        assert subprocess.run(PREPARE + [f"--name={names[0]}", *args], cwd=corpora, capture_output=True).returncode == 0
        proc = subprocess.Popen(PREPARE + [f"--name={names[1]}", *args], cwd=corpora, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while not os.path.exists(progress) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.01)
        proc.kill()
        proc.wait()
        assert os.path.exists(progress) and not os.path.exists(os.path.join(corpora, "data", names[1], "byte")), \
            "the kill should land midway: no finished corpus yet"
        again = subprocess.run(PREPARE + [f"--name={names[1]}", *args], cwd=corpora, capture_output=True, text=True)
        assert again.returncode == 0 and "continuing after the" in again.stdout, again.stdout + again.stderr
        assert prepared(corpora, names[0]) == prepared(corpora, names[1])
        assert not os.path.exists(os.path.dirname(progress))
    finally:
        for name in names:
            shutil.rmtree(os.path.join(corpora, "data", name), ignore_errors=True)


def test_a_full_disk_is_one_line_and_leaves_nothing(corpora, tmp_path, monkeypatch, capsys):
    import errno
    import importlib.util
    import data.corpus as corpus
    _, files = text_inputs(tmp_path)
    monkeypatch.setattr(corpus, "DATA_DIR", str(tmp_path / "data"))

    def full(self, *args):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(corpus.CorpusWriter, "add", full)
    spec = importlib.util.spec_from_file_location("text_prepare", os.path.join(corpora, "data", "text", "prepare.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "DATA_DIR", str(tmp_path / "data"))
    with pytest.raises(SystemExit, match=r"could not prepare disk \(byte\): OSError: .*No space left on device"):
        module.main(["--name=disk", "--tokenizer=byte", "--workers=1", *files])
    assert not os.path.exists(tmp_path / "data" / "disk")  # not even the folder it was writing in


def test_a_damaged_meta_or_foreign_token_ids_are_named(corpora, tmp_path, monkeypatch):
    import data.corpus as corpus
    monkeypatch.setattr(corpus, "DATA_DIR", str(tmp_path))
    os.makedirs(tmp_path / "tiny")
    write_corpus("tiny", Tokenizer("byte"), ["a long enough training document"], ["a long enough val document"])
    corpus.check_token_ids("tiny", "byte", 257)  # every id of a byte corpus is below 257
    train = tmp_path / "tiny" / "byte" / "train.bin"
    ids = np.fromfile(train, dtype=np.uint16)
    ids[3] = 300  # an id only a wider tokenizer has
    ids.tofile(train)
    with pytest.raises(ValueError, match=r"train.bin holds token id 300, beyond the byte tokenizer's 257 ids"):
        corpus.check_token_ids("tiny", "byte", 257)
    meta = tmp_path / "tiny" / "byte" / "meta.json"
    good = json.loads(meta.read_text())
    for text, why in [('{"tokenizer": "byte", ', "Expecting"),  # cut short
                      ("{}", "train_tokens and val_tokens must be a count of tokens"),
                      (json.dumps({**good, "val_tokens": "many"}), "val_tokens must be a count"),
                      (json.dumps({**good, "tokenizer": "gpt2"}), "it names the tokenizer 'gpt2', and it is in"),
                      ("[1]", "not a JSON object")]:
        meta.write_text(text)
        with pytest.raises(ValueError, match=rf"meta.json is not a corpus's meta.json \({why}.*prepare the corpus"):
            read_meta("tiny", "byte")


def test_missing_or_damaged_arith_problems_are_named(tmp_path, monkeypatch):
    from infra import evaluation
    monkeypatch.setattr(evaluation, "DATA_DIR", str(tmp_path))
    with pytest.raises(SystemExit, match=r"cannot read the arith val problems .*No such file.*arith_per_level=0"):
        evaluation.read_problems(2)
    (tmp_path / "arith").mkdir()
    (tmp_path / "arith" / "val_problems.jsonl").write_text('{"prompt": "1+1=", "answer": "2", "difficulty": 1}\n[1]\n')
    with pytest.raises(SystemExit, match=r"a line is not a problem"):
        evaluation.read_problems(2)
