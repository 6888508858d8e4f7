"""
How a run is measured: val loss per corpus (nats per token and bits per byte, on the same batches at every
evaluation), exact-match arithmetic by level and operation, and a short show of what the model learned.

Bits per byte (bpb) divides the loss of the tokens that stand for text by the UTF-8 bytes of that text, so
runs with different tokenizers compare: a byte-level model's nats per token and a BPE model's do not.
"""

import json
import math
import os
from collections import defaultdict

import torch

from data.corpus import MixtureLoader, corpus_dir


def bits_per_byte(token_loss, targets, token_bytes):
    """Summed loss (nats) of the targets that stand for text, in bits, over the bytes of that text.
    token_bytes[id] is the byte length of id's text; end-of-text has 0 bytes and counts in neither sum."""
    n_bytes = token_bytes[targets]
    return ((token_loss * (n_bytes > 0)).sum() / (math.log(2) * n_bytes.sum().clamp(min=1))).item()


@torch.no_grad()
def val_loss(model, tokenizer, corpora, seq_len, batch_size, iters, autocast):
    """{corpus: mean val cross-entropy in nats per token}, {corpus: bits per byte}, on fixed batches."""
    model.eval()
    device = model.wte.weight.device
    token_bytes = torch.tensor(tokenizer.token_bytes(), device=device)
    nats, bpb = {}, {}
    for name in corpora:
        loader = MixtureLoader({name: 1.0}, tokenizer.name, seq_len, batch_size, split="val", seed=0)
        ce, bits = 0.0, 0.0
        for _ in range(iters):
            x, y, _ = loader.next_batch()
            x, y = x.to(device), y.to(device)
            with autocast:
                _, _, parts = model(x, y, parts=True)
            ce += parts.ce.item()
            bits += bits_per_byte(parts.token_loss, y, token_bytes)
        nats[name], bpb[name] = ce / iters, bits / iters
    model.train()
    return nats, bpb


# -----------------------------------------------------------------------------------------------------
# Arithmetic: exact match on held-out problems

def read_problems(n_per_level=None):
    """The arith val problems (data/arith/val_problems.jsonl), at most n_per_level of each level."""
    taken, problems = defaultdict(int), []
    with open(os.path.join(corpus_dir("arith"), "val_problems.jsonl")) as f:
        for p in map(json.loads, f):
            if n_per_level is None or taken[p["difficulty"]] < n_per_level:
                taken[p["difficulty"]] += 1
                problems.append(p)
    return problems


def scoring_split(tokenizer, prompt, answer):
    """(context ids, expected ids) for one problem, cut from the document exactly as training tokenized it:
    its tokens up to the last token boundary inside the prompt, after an end-of-text (documents follow one in
    the stream); the rest, end-of-text included, is what the model must produce. (GPT-2's BPE merges "=-" into
    one token: a prompt encoded alone would end in a "=" token that never precedes a minus in training.)"""
    doc = tokenizer.encode_document(prompt + answer)
    cut = max(i for i in range(len(doc) + 1) if prompt.startswith(tokenizer.decode(doc[:i])))
    return [tokenizer.eot] + doc[:cut], doc[cut:]


@torch.no_grad()
def arith_accuracy(model, tokenizer, problems, autocast, batch_size=64):
    """Exact-match accuracy of greedy answers: {"level": {level: acc}, "op": {op: acc}, "level_op": {"2+":
    acc, ...}, "all": acc}.
    Problems whose contexts have the same length decode together, in batches."""
    model.eval()
    device = model.wte.weight.device
    splits = [scoring_split(tokenizer, p["prompt"], p["answer"]) for p in problems]
    by_length = defaultdict(list)
    for i, (context, _) in enumerate(splits):
        by_length[len(context)].append(i)
    right = [False] * len(problems)
    for group in by_length.values():
        for start in range(0, len(group), batch_size):
            rows = group[start:start + batch_size]
            n_new = max(len(splits[i][1]) for i in rows)
            idx = torch.tensor([splits[i][0] for i in rows], device=device)
            with autocast:
                out = model.generate(idx, n_new, temperature=0, vocab_size=tokenizer.vocab_size)
            for i, row in zip(rows, out[:, idx.shape[1]:].tolist()):
                right[i] = row[:len(splits[i][1])] == splits[i][1]
    model.train()
    return summarise(problems, right)


def summarise(problems, right):
    """Accuracy per level, per operation and overall, from one verdict per problem."""
    groups = defaultdict(list)
    for p, ok in zip(problems, right):
        groups["level", str(p["difficulty"])].append(ok)
        groups["op", p["op"]].append(ok)
        groups["level_op", f"{p['difficulty']}{p['op']}"].append(ok)
    acc = {"level": {}, "op": {}, "level_op": {}, "all": sum(right) / max(1, len(right))}
    for (kind, key), oks in sorted(groups.items()):
        acc[kind][key] = sum(oks) / len(oks)
    return acc


# -----------------------------------------------------------------------------------------------------
# What the model learned, shown at the end of a run

PROMPTS = {"shakespeare": "\n\nROMEO:\n", "code": "    def __init__(self, ", "text": "The "}


@torch.no_grad()
def show_samples(model, tokenizer, corpora, problems, autocast, n_tokens=120, seed=0):
    """A short sample per text corpus and a few arithmetic problems marked right or wrong, as lines."""
    model.eval()
    device = model.wte.weight.device
    lines, generator_state = [], torch.random.get_rng_state()
    torch.manual_seed(seed)
    for name in corpora:
        if name == "arith":
            continue
        prompt = PROMPTS.get(name, "\n")  # from the middle of a document, as most training windows start
        idx = torch.tensor([tokenizer.encode(prompt)], device=device)
        with autocast:
            out = model.generate(idx, n_tokens, temperature=0.8, top_k=50, vocab_size=tokenizer.vocab_size)
        text = tokenizer.decode(out[0, idx.shape[1]:].tolist()).split("<|endoftext|>")[0]
        lines += [f"--- {name} ---", (prompt + text).strip("\n")]
    if "arith" in corpora and problems:
        lines.append("--- arith (greedy; held-out problems from level 2 up) ---")
        for p in problems:
            context, expected = scoring_split(tokenizer, p["prompt"], p["answer"])
            with autocast:
                out = model.generate(torch.tensor([context], device=device), len(expected), temperature=0,
                                     vocab_size=tokenizer.vocab_size)[0, len(context):].tolist()
            said = tokenizer.decode(context[1:] + out).split("<|endoftext|>")[0]
            lines.append(f"{'right' if out == expected else 'wrong'}  level {p['difficulty']}: {said}"
                         + ("" if out == expected else f"   (answer {p['answer']})"))
    torch.random.set_rng_state(generator_state)
    model.train()
    return lines
