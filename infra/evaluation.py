"""
How a run is measured: val loss per corpus (nats per token and bits per byte, on the same batches at every
evaluation), exact-match arithmetic by level and operation, recall of planted pairs by the distance they are
fetched from, model FLOPs utilisation from the routing actually measured, and a short show of what the model
learned.

Bits per byte (bpb) divides the loss of the tokens that stand for text by the UTF-8 bytes of that text, so
runs with different tokenizers compare: a byte-level model's nats per token and a BPE model's do not.
"""

import json
import math
import os
from collections import defaultdict
from contextlib import nullcontext

import torch

from attention import LOCAL
from data.corpus import DATA_DIR, MixtureLoader


# A training step's numbers, kept as tensors until a log line needs them (reading a GPU tensor waits for the GPU)

def step_stats(loss, parts):
    """{name: tensor} of one micro-step: its loss, cross-entropy and auxiliary loss, and per MoE layer the mean
    routed experts per token and the tokens each expert got."""
    routing = parts.routing
    return {"loss": loss.detach().float(), "ce": parts.ce.detach().float(), "aux": parts.aux.detach().float(),
            "experts_per_token": torch.stack([r.experts_per_token.float().mean() for r in routing])
            if routing else loss.new_zeros(0),
            "tokens_per_expert": torch.stack([r.tokens_per_expert.float() for r in routing])
            if routing else loss.new_zeros(0, 0)}


def read_stats(stats):
    """{name: plain numbers} of a step's stats, read from the device in one transfer."""
    flat = torch.cat([v.flatten() for v in stats.values()]).cpu()
    return {k: v.view_as(stats[k]).tolist() for k, v in zip(stats, flat.split([t.numel() for t in stats.values()]))}


def progress(record):
    """The progress bar's summary of a train record: stage, loss, lr, tokens/s, and where there are MoE layers
    the routed experts per token, the EP ranks' worst load (max over mean rows) and the MFU where known."""
    postfix = {"stage": record["stage"], "loss": f"{record['ce']:.3f}", "lr": f"{record['lr']:.2e}",
               "tok/s": f"{record['tok_s']:,.0f}"}
    experts = record["experts_per_token"]
    if experts:
        postfix["k"] = f"{sum(experts) / len(experts):.2f}"
    loads = [layer for layer in record["tokens_per_expert"] if sum(layer) > 0]
    if loads:  # the busiest expert's load over the mean, in the worst layer: 1.00 is perfectly even
        postfix["load"] = f"{max(max(layer) * len(layer) / sum(layer) for layer in loads):.2f}"
    if "ep_rows" in record:
        postfix["ep max/mean"] = f"{max(max(r) / max(sum(r) / len(r), 1e-9) for r in record['ep_rows']):.2f}"
    if record["mfu"] is not None:
        postfix["mfu"] = f"{100 * record['mfu']:.1f}%"
    return postfix


def bits_per_byte(token_loss, targets, token_bytes):
    """Summed loss (nats) of the targets that stand for text, in bits, over the bytes of that text.
    token_bytes[id] is the byte length of id's text; end-of-text has 0 bytes and counts in neither sum."""
    n_bytes = token_bytes[targets]
    return ((token_loss * (n_bytes > 0)).sum() / (math.log(2) * n_bytes.sum().clamp(min=1))).item()


def val_batches(model, tokenizer, corpus, seq_len, batch_size, iters, autocast=nullcontext()):
    """(targets, LossParts) of the model on `iters` val batches of one corpus: the same batches at every call."""
    loader = MixtureLoader({corpus: 1.0}, tokenizer.name, seq_len, batch_size, split="val", seed=0)
    device = model.wte.weight.device
    for _ in range(iters):
        x, y, _ = loader.next_batch()
        x, y = x.to(device), y.to(device)
        with autocast:
            _, _, parts = model(x, y, parts=True)
        yield y, parts


@torch.no_grad()
def val_loss(model, tokenizer, corpora, seq_len, batch_size, iters, autocast):
    """{corpus: mean val cross-entropy in nats per token}, {corpus: bits per byte}, on fixed batches."""
    model.eval()
    token_bytes = torch.tensor(tokenizer.token_bytes(), device=model.wte.weight.device)
    nats, bpb = {}, {}
    for name in corpora:
        ce, bits = 0.0, 0.0
        for y, parts in val_batches(model, tokenizer, name, seq_len, batch_size, iters, autocast):
            ce += parts.ce.item()
            bits += bits_per_byte(parts.token_loss, y, token_bytes)
        nats[name], bpb[name] = ce / iters, bits / iters
    model.train()
    return nats, bpb


# -----------------------------------------------------------------------------------------------------
# Arithmetic: exact match on held-out problems

def read_tasks(corpora, arith_per_level):
    """What evaluation scores beyond the loss, read once before a run starts: {"arith": val problems, "recall": val
    documents}, each empty unless the run trains on that corpus."""
    return {"arith": read_problems(arith_per_level) if "arith" in corpora and arith_per_level > 0 else [],
            "recall": read_recall() if "recall" in corpora else []}


def evaluate(model, tokenizer, corpora, tasks, seq_len, batch_size, iters, autocast):
    """What every evaluation of a run measures: val loss per corpus in nats per token ("val") and bits per byte
    ("val_bpb"), and for the tasks (read_tasks) exact-match arithmetic ("arith_accuracy") and recall by gap
    ("recall")."""
    nats, bpb = val_loss(model, tokenizer, corpora, seq_len, batch_size, iters, autocast)
    measured = {"val": nats, "val_bpb": bpb}
    if tasks["arith"]:
        measured["arith_accuracy"] = arith_accuracy(model, tokenizer, tasks["arith"], autocast)
    if tasks["recall"]:
        measured["recall"] = recall_accuracy(model, tokenizer, tasks["recall"], seq_len, autocast)
        retrieval = retrieval_attention(model, tokenizer, tasks["recall"], seq_len, autocast)
        if retrieval:
            measured["retrieval"] = retrieval
    return measured


def summary(measured):
    """evaluate's numbers in one line: "val shakespeare 1.803 (2.601 bpb), ..., arith exact match 0.28"."""
    nats, bpb = measured["val"], measured["val_bpb"]
    line = "val " + ", ".join(f"{k} {nats[k]:.3f} ({bpb[k]:.3f} bpb)" for k in nats)
    if "arith_accuracy" in measured:
        line += f", arith exact match {measured['arith_accuracy']['all']:.2f}"
    if "recall" in measured:
        line += ", recall by gap " + ", ".join(f"{k} {v:.2f}" for k, v in measured["recall"]["bucket"].items())
    if "retrieval" in measured:
        r = measured["retrieval"]
        best = [max(range(len(p)), key=p.__getitem__) for p in r["pair"]]  # (the head that looks most at the pair)
        line += "; beyond the window, the best head's attention to the pair (to the last window) in layer " + ", ".join(
            f"{i} {p[h]:.2f} ({n[h]:.2f})" for i, p, n, h in zip(r["layers"], r["pair"], r["recent"], best))
    return line


def read_problems(n_per_level=None):
    """The arith val problems (data/arith/val_problems.jsonl), at most n_per_level of each level."""
    taken, problems, path = defaultdict(int), [], os.path.join(DATA_DIR, "arith", "val_problems.jsonl")
    try:
        with open(path) as f:
            for p in map(json.loads, f):
                if not (isinstance(p, dict) and {"prompt", "answer", "difficulty"} <= set(p)):
                    raise ValueError("a line is not a problem (prompt, answer, difficulty)")
                if n_per_level is None or taken[p["difficulty"]] < n_per_level:
                    taken[p["difficulty"]] += 1
                    problems.append(p)
    except (OSError, ValueError) as e:  # (a JSONDecodeError is a ValueError)
        raise SystemExit(f"cannot read the arith val problems {path} ({e}): prepare them again with `python "
                         f"data/arith/prepare.py`, or set --arith_per_level=0 to score none") from None
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
def greedy_answers(model, tokenizer, problems, autocast, batch_size=64):
    """For each problem: (context ids, expected ids, the model's greedy ids, as many as expected). Problems
    whose contexts have the same length decode together, in batches."""
    device = model.wte.weight.device
    splits = [scoring_split(tokenizer, p["prompt"], p["answer"]) for p in problems]
    by_length = defaultdict(list)
    for i, (context, _) in enumerate(splits):
        by_length[len(context)].append(i)
    said = [None] * len(problems)
    for group in by_length.values():
        for start in range(0, len(group), batch_size):
            rows = group[start:start + batch_size]
            idx = torch.tensor([splits[i][0] for i in rows], device=device)
            with autocast:
                out = model.generate(idx, max(len(splits[i][1]) for i in rows), temperature=0,
                                     vocab_size=tokenizer.vocab_size)
            for i, row in zip(rows, out[:, idx.shape[1]:].tolist()):
                said[i] = row[:len(splits[i][1])]
    return [(context, expected, out) for (context, expected), out in zip(splits, said)]


def arith_accuracy(model, tokenizer, problems, autocast):
    """Exact-match accuracy of greedy answers: {"level": {level: acc}, "op": {op: acc}, "level_op": {"2+":
    acc, ...}, "all": acc}."""
    model.eval()
    answers = greedy_answers(model, tokenizer, problems, autocast)
    model.train()
    return summarise(problems, [out == expected for _, expected, out in answers])


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
# Recall: a planted pair's value, fetched from a distance (data/recall/prepare.py)

def read_recall():
    """The recall val documents (data/recall/val_docs.jsonl): {"text", "queries"}, each query {"key", "value",
    "gap", "at"}."""
    path = os.path.join(DATA_DIR, "recall", "val_docs.jsonl")
    try:
        with open(path, encoding="utf-8") as f:
            docs = [json.loads(line) for line in f]
        if not all(isinstance(d, dict) and isinstance(d.get("text"), str) and isinstance(d.get("queries"), list)
                   for d in docs):
            raise ValueError("a line is not a document (text, queries)")
    except (OSError, ValueError) as e:
        raise SystemExit(f"cannot read the recall val documents {path} ({e}): prepare them again with `python "
                         f"data/recall/prepare.py`") from None
    return docs


def recall_edges(config):
    """A model's gap buckets: within its window, 1-4 windows, 4 windows to layers x window (as far as local layers
    could relay), and beyond. Every arm of an experiment with one window gets the same buckets."""
    return sorted({config.window, 4 * config.window, config.n_layer * config.window})


def bucket_names(edges):
    """["<16", "16-63", "64-127", ">=128"] for edges [16, 64, 128]: gaps in bytes."""
    return ([f"<{edges[0]}"] + [f"{lo}-{hi - 1}" for lo, hi in zip(edges, edges[1:])] + [f">={edges[-1]}"])


def recall_hits(predicted, docs, max_len):
    """(gap, right) of every query whose value lies in the first max_len positions of its row. Row r of
    predicted (the model's greedy next token at each position) read [end-of-text] + docs[r]'s bytes, so the
    value of a query at byte `at` is predicted at position at + 1. A value is one byte, so the greedy
    prediction there with the document as context is what greedy generation after the key would produce."""
    return [(q["gap"], int(predicted[row][q["at"] + 1]) == ord(str(q["value"])))
            for row, doc in enumerate(docs) for q in doc["queries"] if q["at"] + 1 < max_len]


def recall_summary(hits, edges):
    """Exact match per gap bucket ("bucket", with its "count"), per power-of-two gap ("by_gap": {"2": ...,
    "4": ...} for gaps 2-3, 4-7, ...: the plot's points), and over all queries ("all")."""
    names = bucket_names(edges)
    buckets, by_gap = defaultdict(list), defaultdict(list)
    for gap, right in hits:
        buckets[names[sum(gap >= e for e in edges)]].append(right)
        by_gap[str(2 ** int(math.log2(gap)))].append(right)
    return {"bucket": {n: sum(buckets[n]) / len(buckets[n]) for n in names if buckets[n]},
            "count": {n: len(buckets[n]) for n in names}, "edges": edges,
            "by_gap": {g: sum(v) / len(v) for g, v in sorted(by_gap.items(), key=lambda kv: int(kv[0]))},
            "all": sum(r for _, r in hits) / max(1, len(hits))}


@torch.no_grad()
def recall_accuracy(model, tokenizer, docs, seq_len, autocast, edges=None, batch_size=32):
    """Exact-match recall of the val documents' queries, each document read from its start in one row of
    seq_len positions, by gap (recall_summary); edges default to the model's (recall_edges)."""
    model.eval()
    device, hits = model.wte.weight.device, []
    for start in range(0, len(docs), batch_size):
        group = docs[start:start + batch_size]
        rows = [([tokenizer.eot] + tokenizer.encode(d["text"]))[:seq_len + 1] for d in group]
        T = min(len(r) for r in rows) - 1
        ids = torch.tensor([r[:T + 1] for r in rows], device=device)
        with autocast:
            logits, _ = model(ids[:, :-1], ids[:, 1:])
        hits += recall_hits(logits.argmax(-1).tolist(), group, T)
    model.train()
    return recall_summary(hits, edges or recall_edges(model.config))


# -----------------------------------------------------------------------------------------------------
# Retrieval: where a global layer looks when the pair a query asks for lies beyond the window

def retrieval_masses(probs, queries, window):
    """Per head, the mean attention mass from each query to its planted pair and to the last `window` positions:
    (pair (H,), recent (H,)). probs (B, H, T, T): one layer's attention over rows that read [end-of-text] + a
    document's bytes; queries: (row, at, gap) each, the key's last byte at byte `at` (row position at + 1, where the
    value is predicted) and the pair's two bytes at row positions at - gap and at - gap + 1."""
    rows, at, gap = (torch.tensor(v, device=probs.device) for v in zip(*queries))
    t = at + 1                                                 # (row position = byte offset + 1: the end-of-text)
    seen = probs[rows, :, t]                                   # (Q, H, T): each query's attention
    pair = seen.gather(-1, torch.stack([at - gap, at - gap + 1], -1)[:, None].expand(-1, seen.shape[1], -1)).sum(-1)
    upto = seen.cumsum(-1)                                     # mass on positions t - window + 1 .. t
    index = torch.stack([t, t - window], -1)[:, None].expand(-1, seen.shape[1], -1)
    ends = upto.gather(-1, index.clamp(min=0))
    recent = ends[..., 0] - torch.where(index[..., 1] >= 0, ends[..., 1], 0)
    return pair.mean(0), recent.mean(0)


@torch.no_grad()
def retrieval_attention(model, tokenizer, docs, seq_len, autocast, batch_size=32):
    """For the recall val documents' queries beyond the window (gap >= the model's window): per global and sharing
    layer and per head, the mean attention mass on the planted pair and on the last `window` positions
    (retrieval_masses). A layer that has learned the lookup puts its mass on the pair; one that attends to recent
    positions puts it there. {"layers", "kinds", "pair", "recent", "queries"}, or None without global layers."""
    layers = [(i, b.attn) for i, b in enumerate(model.blocks) if b.attn.kind != LOCAL]
    if not layers:
        return None
    model.eval()
    device, window = model.wte.weight.device, model.window
    sums = {i: [0, 0] for i, _ in layers}
    count, probs = 0, {}

    def keep(i):
        def hook(attn, args, output):  # args (x, cos, sin, kv, cache, layer); output (y, (k, v, mask))
            q, k = attn.queries(*args[:3]).float(), output[1][0].float()
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            T = q.shape[2]
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
            probs[i] = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), float("-inf"))\
                .softmax(-1)
        return hook

    handles = [attn.register_forward_hook(keep(i)) for i, attn in layers]
    try:
        for start in range(0, len(docs), batch_size):
            group = docs[start:start + batch_size]
            rows = [([tokenizer.eot] + tokenizer.encode(d["text"]))[:seq_len] for d in group]
            T = min(len(r) for r in rows)
            queries = [(row, q["at"], q["gap"]) for row, d in enumerate(group) for q in d["queries"]
                       if q["gap"] >= window and q["at"] + 1 < T]
            if not queries:
                continue
            with autocast:
                model(torch.tensor([r[:T] for r in rows], device=device))
            for i, _ in layers:
                pair, recent = retrieval_masses(probs[i], queries, window)
                sums[i][0] += pair * len(queries)
                sums[i][1] += recent * len(queries)
            count += len(queries)
    finally:
        for h in handles:
            h.remove()
        model.train()
    if not count:
        return None
    return {"layers": [i for i, _ in layers], "kinds": [attn.kind for _, attn in layers], "queries": count,
            "pair": [(sums[i][0] / count).tolist() for i, _ in layers],
            "recent": [(sums[i][1] / count).tolist() for i, _ in layers]}


# -----------------------------------------------------------------------------------------------------
# Throughput: FLOPs per token from the routing actually measured, and the GPU's peak

def flops_per_token(model_cfg, active_params, seq_len):
    """Training FLOPs per token (forward + backward): 6 per active parameter plus the attention scores,
    12 * n_embd * (keys attended) per layer (nanoGPT's estimate, with a window's keys for local layers).
    active_params: GPT.num_params(active=True, experts_per_token=<measured>)."""
    keys = [min(model_cfg.window, seq_len) if kind == LOCAL else seq_len for kind in model_cfg.layout()]
    return 6 * active_params + sum(12 * model_cfg.n_embd * k for k in keys)


# Dense bf16 tensor-core peaks from NVIDIA's datasheets (the sparsity figures halved), keyed by the words
# of torch.cuda.get_device_name(). The longest key whose words all appear in the name wins, so an "H100 NVL"
# is not taken for an SXM H100 and an "A10G" or "L40S" is not taken for an "A10" or "L40".
PEAK_BF16_FLOPS = {"H100": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H200": 989e12, "A100": 312e12,
                   "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10": 125e12}


def peak_flops(device_name):
    words = device_name.split()
    keys = [k for k in PEAK_BF16_FLOPS if all(w in words for w in k.split())]
    return PEAK_BF16_FLOPS[max(keys, key=len)] if keys else None


def mfu(flops_token, tokens_per_s, peak, world_size=1):
    """Model FLOPs utilisation: the share of the GPUs' peak that the model's useful FLOPs reach."""
    return flops_token * tokens_per_s / (peak * world_size) if peak else None


# -----------------------------------------------------------------------------------------------------
# What the model learned, shown at the end of a run

PROMPTS = {"shakespeare": "\n\nROMEO:\n", "code": "    def __init__(self, ", "text": "The "}


@torch.no_grad()
def show_samples(model, tokenizer, corpora, problems, autocast, n_tokens=120, seed=0):
    """A short sample per text corpus and the first two arithmetic problems of each level marked right or wrong,
    as lines."""
    problems = [p for level in sorted({p["difficulty"] for p in problems})
                for p in [q for q in problems if q["difficulty"] == level][:2]]
    model.eval()
    device = model.wte.weight.device
    lines, generator_state = [], torch.random.get_rng_state()
    torch.manual_seed(seed)
    for name in corpora:
        if name in ("arith", "recall"):  # (scored, not sampled)
            continue
        prompt = PROMPTS.get(name, "\n")  # from the middle of a document, as most training windows start
        idx = torch.tensor([tokenizer.encode(prompt)], device=device)
        with autocast:
            out = model.generate(idx, n_tokens, temperature=0.8, top_k=50, vocab_size=tokenizer.vocab_size)
        text = tokenizer.decode(out[0, idx.shape[1]:].tolist()).split("<|endoftext|>")[0]
        lines += [f"--- {name} ---", (prompt + text).strip("\n")]
    if "arith" in corpora and problems:
        lines.append("--- arith (greedy; held-out problems from level 2 up) ---")
        for p, (context, expected, out) in zip(problems, greedy_answers(model, tokenizer, problems, autocast)):
            said = tokenizer.decode(context[1:] + out).split("<|endoftext|>")[0]
            lines.append(f"{'right' if out == expected else 'wrong'}  level {p['difficulty']}: {said}"
                         + ("" if out == expected else f"   (answer {p['answer']})"))
    torch.random.set_rng_state(generator_state)
    model.train()
    return lines


def stage_end_accuracy(records, stages):
    """Lines of a table: arithmetic exact match per level at the end of each stage, from the eval records."""
    last = {r["stage"]: r for r in records if r["kind"] == "eval" and "arith_accuracy" in r}
    if not last:
        return []
    levels = sorted(next(iter(last.values()))["arith_accuracy"]["level"], key=int)
    lines = ["arith exact match on held-out problems, at the end of each stage:",
             f"  {'stage':<16}" + "".join(f"{'level ' + k:>9}" for k in levels) + f"{'all':>7}"]
    for s, r in sorted(last.items()):
        acc = r["arith_accuracy"]
        lines.append(f"  {stages[s].name:<16}" + "".join(f"{acc['level'][k]:>9.0%}" for k in levels) +
                     f"{acc['all']:>7.0%}")
    return lines


# -----------------------------------------------------------------------------------------------------
# The statistics of the evidence experiments (tools/experiment.py): pure functions of tensors

def ranks(x):
    """1-based ranks of the values of x (flattened), ties sharing the mean of their ranks."""
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    order = x.argsort()
    _, group, counts = torch.unique_consecutive(x[order], return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()
    mean_rank = last - (counts.double() - 1) / 2  # a tie group holding ranks a..b gets (a + b) / 2
    r = torch.empty_like(x)
    r[order] = mean_rank[group]
    return r


def spearman(x, y):
    """Spearman's rank correlation of two equally long sequences: the Pearson correlation of their ranks
    (ties averaged). NaN when either is constant: ranks that do not vary correlate with nothing."""
    rx, ry = ranks(x), ranks(y)
    if rx.numel() != ry.numel():
        raise ValueError(f"spearman needs sequences of one length; got {rx.numel()} and {ry.numel()}")
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = (rx.square().sum() * ry.square().sum()).sqrt()
    return float("nan") if denom == 0 else ((rx * ry).sum() / denom).item()


def mean_by_group(values, mask, groups):
    """{group: mean of values where mask is true, over the rows of that group}. values, mask: (N, T); groups:
    N labels, one per row. (Experts on the answer tokens of arithmetic problems, by difficulty level.)"""
    values, mask = torch.as_tensor(values, dtype=torch.float64), torch.as_tensor(mask, dtype=torch.bool)
    sums, counts = defaultdict(float), defaultdict(int)
    for row, group in enumerate(groups):
        sums[group] += values[row][mask[row]].sum().item()
        counts[group] += int(mask[row].sum())
    return {g: sums[g] / counts[g] for g in sorted(sums) if counts[g]}


def ridge_probe_accuracy(features, labels, fit, penalty=1e-3):
    """How well a linear map reads labels out of features: ridge regression of one-hot labels on the features of
    the rows where fit is true, scored (argmax) on the others. features (N, C), labels (N,) ints, fit (N,) bool."""
    x = torch.as_tensor(features, dtype=torch.float64)
    x = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)  # (a bias column)
    labels = torch.as_tensor(labels)
    y = torch.nn.functional.one_hot(labels).double()
    a, b = x[fit], y[fit]
    w = torch.linalg.solve(a.T @ a + penalty * len(a) * torch.eye(a.shape[1], dtype=torch.float64), a.T @ b)
    return ((x[~fit] @ w).argmax(-1) == labels[~fit]).double().mean().item()


def bpb_by_position(token_loss, targets, token_bytes, n_buckets):
    """Bits per byte in n_buckets equal spans of positions: [bpb of positions 0 .. T/n - 1, ...]. How well
    a model uses context it has (or has not) been trained on. token_loss, targets: (B, T), T divisible."""
    T = token_loss.shape[1]
    if T % n_buckets:
        raise ValueError(f"{T} positions do not split into {n_buckets} equal buckets")
    size = T // n_buckets
    return [bits_per_byte(token_loss[:, i:i + size], targets[:, i:i + size], token_bytes)
            for i in range(0, T, size)]
