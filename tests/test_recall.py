import json
import os
import re

import numpy as np
import torch

from data.corpus import BYTE_EOT, DATA_DIR, Tokenizer
from data.recall.prepare import N_KEYS, N_VALUES, document, parse
from infra.evaluation import bucket_names, read_recall, recall_accuracy, recall_edges, recall_summary
from model import preset

FILLER = ("Now is the winter of our discontent\nMade glorious summer by this sun of York;\n" * 20)[:512]


def test_every_planted_pair_is_found_in_the_bytes_where_the_record_says():
    for seed in range(20):
        text, queries = document(np.random.default_rng(seed), FILLER, 16)
        data = text.encode("utf-8")
        assert len(data) == len(FILLER)  # (a planted character overwrites as many filler bytes as it has)
        pairs, found = parse(data)
        assert found == queries and len(queries) >= 12  # (a crowded document may leave a few pairs out)
        assert len({q["key"] for q in queries}) == len(queries) == len(pairs)
        for q in queries:
            value, last_byte = pairs[q["key"]]
            assert value == q["value"] and q["gap"] == q["at"] - last_byte >= 2
            assert data[q["at"] + 1] == ord(str(q["value"]))  # the byte after the key is the value's digit
        planted = {i for q in queries for i in (pairs[q["key"]][1] - 1, pairs[q["key"]][1], q["at"] - 1, q["at"],
                                                q["at"] + 1)}
        assert len(planted) == 5 * len(queries)  # (no two overlap)
        assert all(data[i] == ord(FILLER[i]) for i in range(len(data)) if i not in planted)  # the rest is filler


def test_gaps_span_below_and_beyond_a_window():
    gaps = [q["gap"] for seed in range(50) for q in document(np.random.default_rng(seed), FILLER, 16)[1]]
    assert min(gaps) == 2 and max(gaps) > 400
    assert sum(g < 16 for g in gaps) > 100 and sum(g >= 256 for g in gaps) > 50


def test_the_prepared_corpus_val_docs_are_val_bin_and_share_nothing_with_train(corpora):
    docs = read_recall()
    val = np.fromfile(os.path.join(DATA_DIR, "recall", "byte", "val.bin"), dtype=np.uint16)
    assert val.tolist() == [b for d in docs for b in list(d["text"].encode("utf-8")) + [BYTE_EOT]]
    for d in docs[:50]:
        assert parse(d["text"].encode("utf-8"))[1] == d["queries"]
    train = np.fromfile(os.path.join(DATA_DIR, "recall", "byte", "train.bin"), dtype=np.uint16)
    cuts = np.flatnonzero(train == BYTE_EOT)
    train_docs = {bytes(train[a + 1:b].astype(np.uint8)) for a, b in zip(np.r_[-1, cuts[:-1]], cuts)}
    assert len(train_docs) > 1000 and not train_docs & {d["text"].encode("utf-8") for d in docs}
    with open(os.path.join(corpora, "data", "shakespeare", "input.txt"), encoding="utf-8") as f:
        text = f.read()
    cut = int(0.9 * len(text))
    for d in docs[:20]:  # the filler of a val document is a slice of Shakespeare's val split, not of its train split
        data = d["text"].encode("utf-8")
        planted = {i for i in range(len(data)) if data[i] >= 0x80} | {q["at"] + 1 for q in d["queries"]}
        pattern = re.compile("".join("." if i in planted else re.escape(chr(b)) for i, b in enumerate(data)), re.S)
        assert pattern.search(text, cut) and not pattern.search(text[:cut])


class Oracle(torch.nn.Module):
    """Reads the document it is given and predicts, after each key, the value planted for it (or, wrong=True, the
    next value round): logits over the byte vocabulary, one-hot."""

    def __init__(self, wrong=False):
        super().__init__()
        self.wte, self.wrong, self.config = torch.nn.Embedding(1, 1), wrong, preset("tiny_8x64", window=16)

    def forward(self, idx, targets):
        logits = torch.zeros(*idx.shape, 257)
        for row, ids in enumerate(idx.tolist()):
            planted = {}
            for i in range(1, len(ids)):
                if ids[i - 1] == 0xC4:  # a pair: remember its value
                    planted[(ids[i] - 0x80) // N_VALUES] = (ids[i] - 0x80) % N_VALUES
                elif ids[i - 1] == 0xCE and ids[i] - 0x91 in planted:  # a key: say its value
                    logits[row, i, ord(str((planted[ids[i] - 0x91] + self.wrong) % N_VALUES))] = 1
        return logits, None


def test_scoring_gives_the_oracle_everything_and_a_wrong_copier_nothing(corpora):
    docs, tokenizer = read_recall()[:40], Tokenizer("byte")
    right = recall_accuracy(Oracle(), tokenizer, docs, 64, torch.autocast("cpu", enabled=False))
    wrong = recall_accuracy(Oracle(wrong=True), tokenizer, docs, 64, torch.autocast("cpu", enabled=False))
    assert right["all"] == 1 and set(right["bucket"].values()) == {1.0} and set(right["by_gap"].values()) == {1.0}
    assert wrong["all"] == 0 and set(wrong["bucket"].values()) == {0.0}
    in_view = sum(q["at"] + 1 < 64 for d in docs for q in d["queries"])  # (a value past the row is not scored)
    assert sum(right["count"].values()) == in_view < sum(len(d["queries"]) for d in docs)
    assert right["edges"] == [16, 64, 128] and list(right["count"]) == ["<16", "16-63", "64-127", ">=128"]


def test_recall_buckets_by_hand():
    assert recall_edges(preset("tiny_8x64", window=16)) == [16, 64, 128]
    four_layers = preset("tiny_8x64", window=64, n_layer=4, share_kv=False)
    assert recall_edges(four_layers) == [64, 256]  # (4 windows = layers x window: one edge)
    assert bucket_names([16, 64]) == ["<16", "16-63", ">=64"]
    hits = [(2, True), (15, False), (16, True), (63, True), (64, False), (500, True), (3, True)]
    s = recall_summary(hits, [16, 64])
    assert s["bucket"] == {"<16": 2 / 3, "16-63": 1.0, ">=64": 0.5} and s["count"] == {"<16": 3, "16-63": 2, ">=64": 2}
    assert s["by_gap"] == {"2": 1.0, "8": 0.0, "16": 1.0, "32": 1.0, "64": 0.0, "256": 1.0} and s["all"] == 5 / 7
    assert N_KEYS * N_VALUES == 64  # (every pair is one continuation byte after 0xC4: 0x80-0xBF)
    assert json.dumps(s)  # (it goes to metrics.jsonl as it is)


def test_the_retrieval_diagnostic_reads_a_hand_built_attention_pattern():
    """Two heads over rows of 12 positions: head 0 puts 0.6 on the query's pair (0.25 and 0.35 on its two bytes)
    and spreads the rest evenly over the earlier positions; head 1 puts everything on the query itself. For a
    window of 3 the mass on the last window is what the hand puts there."""
    from infra.evaluation import retrieval_masses
    T, window = 12, 3
    probs = torch.zeros(2, 2, T, T)
    queries = [(0, 8, 5), (1, 9, 7)]  # (row, at, gap): the query's key at byte `at` = position at + 1
    expected_recent = []
    for row, at, gap in queries:
        t = at + 1  # (row position = byte offset + 1: each row starts with the end-of-text)
        pair = [at - gap - 1 + 1, at - gap + 1]  # the pair's two bytes end `gap` bytes before the key's last byte
        rest = [j for j in range(t + 1) if j not in pair]
        probs[row, 0, t, pair] = torch.tensor([0.25, 0.35])
        probs[row, 0, t, rest] = 0.4 / len(rest)
        probs[row, 1, t, t] = 1.0
        expected_recent.append(sum(probs[row, 0, t, j].item() for j in range(t - window + 1, t + 1)))
    pair, recent = retrieval_masses(probs, queries, window)
    torch.testing.assert_close(pair, torch.tensor([0.6, 0.0]))
    torch.testing.assert_close(recent, torch.tensor([sum(expected_recent) / 2, 1.0]))
    # a window longer than the row so far: everything up to the query is recent
    torch.testing.assert_close(retrieval_masses(probs, [(0, 8, 5)], 50)[1], torch.tensor([1.0, 1.0]))
