import os
import re
import socket

import numpy as np
import pytest

from data.corpus import MixtureLoader, Tokenizer, gpt2_encoding, read_meta, write_corpus


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
    with open(os.path.join(corpora, "data", "shakespeare_char", "input.txt"), encoding="utf-8") as f:
        assert len(enc.encode_ordinary(f.read())) == 338025
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]


def test_char_tokenizer_round_trip(corpora):
    tok = Tokenizer(read_meta("shakespeare_char"))
    assert tok.vocab_size == 65 and tok.decode(tok.encode("ROMEO: hi!")) == "ROMEO: hi!"


def test_mixture_shares(corpora):
    loader = MixtureLoader({"shakespeare": 0.6, "code": 0.3, "arith": 0.1}, seq_len=8, batch_size=100)
    counts = np.zeros(3)
    for _ in range(100):  # 10,000 draws
        _, _, source = loader.next_batch()
        counts += np.bincount(source.numpy(), minlength=3)
    shares = counts / counts.sum()
    assert np.all(np.abs(shares - [0.6, 0.3, 0.1]) < 0.02), shares


def test_batches_are_shifted_slices_of_the_corpus(corpora):
    loader = MixtureLoader({"shakespeare": 1.0}, seq_len=16, batch_size=4)
    x, y, _ = loader.next_batch()
    assert x.shape == y.shape == (4, 16)
    assert (x[:, 1:] == y[:, :-1]).all()
    data = np.memmap(os.path.join(corpora, "data", "shakespeare", "train.bin"), dtype=np.uint16, mode="r")
    row = x[0].numpy()
    starts = np.flatnonzero(data[:-16] == row[0])
    assert any((data[s:s + 16] == row).all() for s in starts)


def test_ranks_differ_and_state_restores(corpora):
    a = MixtureLoader({"shakespeare": 1.0, "code": 1.0}, 16, 4, seed=1, rank=0, world_size=2)
    b = MixtureLoader({"shakespeare": 1.0, "code": 1.0}, 16, 4, seed=1, rank=1, world_size=2)
    xa, xb = a.next_batch()[0], b.next_batch()[0]
    assert not np.array_equal(xa, xb)
    # The two ranks' rows together are the global batch one process draws with world_size=1.
    single = MixtureLoader({"shakespeare": 1.0, "code": 1.0}, 16, 8, seed=1)
    assert np.array_equal(single.next_batch()[0], np.concatenate([xa, xb]))
    state = a.state_dict()
    expected = a.next_batch()
    c = MixtureLoader({"shakespeare": 1.0, "code": 1.0}, 16, 4, seed=99, rank=0)
    c.load_state_dict(state)
    got = c.next_batch()
    assert all(np.array_equal(e, g) for e, g in zip(expected, got))


def test_arith_answers_and_difficulty(corpora):
    import json
    with open(os.path.join(corpora, "data", "arith", "val_problems.jsonl")) as f:
        problems = [json.loads(line) for line in f]
    assert len(problems) > 100
    for p in problems:
        a, op, b = re.fullmatch(r"(\d+)([-+*])(\d+)=", p["prompt"]).groups()
        assert op == p["op"]
        a, b = int(a), int(b)
        assert str({"+": a + b, "-": a - b, "*": a * b}[p["op"]]) == p["answer"]
        assert p["difficulty"] == max(len(str(a)), len(str(b)))
    assert {p["difficulty"] for p in problems} == {1, 2, 3, 4}
    tok = Tokenizer(read_meta("arith"))
    data = np.fromfile(os.path.join(corpora, "data", "arith", "val.bin"), dtype=np.uint16)
    first = tok.decode(data[:list(data).index(tok.eot)].tolist())
    assert first == problems[0]["prompt"] + problems[0]["answer"]


def test_bad_inputs(corpora, tmp_path):
    with pytest.raises(FileNotFoundError, match="unknown corpus"):
        MixtureLoader({"no_such_corpus": 1.0}, 8, 2)
    with pytest.raises(ValueError, match="positive"):
        MixtureLoader({"shakespeare": 0}, 8, 2)
    with pytest.raises(ValueError, match="non-empty"):
        MixtureLoader({}, 8, 2)
    with pytest.raises(ValueError, match="one tokenizer"):
        MixtureLoader({"shakespeare": 1.0, "shakespeare_char": 1.0}, 8, 2)
    os.makedirs(os.path.join(corpora, "data", "text"), exist_ok=True)
    with pytest.raises(FileNotFoundError, match="prepare.py"):
        read_meta("text")  # has a prepare.py but no prepared files


def test_generic_text_prepare(corpora, tmp_path):
    import json
    import shutil
    import subprocess
    import sys
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": f"document number {i}"}) for i in range(40)))
    name = "pytest_tmp_corpus"
    try:
        subprocess.run([sys.executable, "data/text/prepare.py", f"--name={name}", str(docs)], cwd=corpora,
                       check=True, capture_output=True)
        meta = read_meta(name)
        assert meta["documents"] == 40 and meta["tokenizer"] == "gpt2"
        x, _, _ = MixtureLoader({name: 1.0}, 4, 2).next_batch()
        assert x.shape == (2, 4)
        bad = subprocess.run([sys.executable, "data/text/prepare.py", "--name=x", str(tmp_path / "none.txt")],
                             cwd=corpora, capture_output=True, text=True)
        assert bad.returncode != 0 and "no such file" in bad.stderr
    finally:
        shutil.rmtree(os.path.join(corpora, "data", name), ignore_errors=True)


def test_write_corpus_rejects_large_ids(tmp_path):
    with pytest.raises(ValueError, match="uint16"):
        write_corpus("x", [70000], [1], {"tokenizer": "gpt2", "vocab_size": 1}, directory=str(tmp_path))
