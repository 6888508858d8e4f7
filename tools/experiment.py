"""
Does the recipe work? Four experiments that measure its claims at laptop scale, one command each.

    python -m tools.experiment hybrid          # all-global vs 3 local : 1 global with shared K/V: recall, bpb
    python -m tools.experiment routing         # dense vs top-2 vs top-p (controlled, bias-balanced, fixed p) experts
    python -m tools.experiment stages          # three stages vs one stage of the same tokens and peak lr
    python -m tools.experiment long_context    # 32 -> 128 bytes: RoPE base kept, base raised, or no extension: recall
    python -m tools.experiment all
    python -m tools.experiment hybrid --seeds=[1,2,3,4] --scale=0.2   # a fourth seed; a fifth of the steps

Each experiment trains every arm once per seed with train.py. An arm is one or two config files under
config/ (config/experiments/<experiment>.py holds what the arms share), and the exact command of every run is
printed, so any arm can be run alone. Then it measures the trained models and writes out/experiments/<name>/:
results.json (every number, per seed), results.md (the tables and the verdicts) and PNG plots.

Tables give the mean ± half the range over seeds (3 by default). A difference counts only when the arms' seed
ranges do not overlap, which two arms that do not differ at all do one time in 10 at 3 seeds (1 in 3 at 2, 1 in 35
at 4); otherwise the verdict says "no difference at this scale", which is no evidence that they are equal. Each
verdict gives the difference of the means and the range of the per-seed differences. Run again after a kill,
an experiment resumes: every run continues from its checkpoint, and a finished run only loads its own.

Read top to bottom: the settings and the arms, running them, the verdict rule, the four experiments (each
measures its runs and returns its tables), and main.
"""

import json
import math
import os
import shlex
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace

import torch

from infra import cli
from infra.cli import need
from infra import evaluation
from attention import GLOBAL, LOCAL, SHARING
from model import kv_cache_bytes, kv_cache_ratio, preset
from infra.plot import gap_ticks, read_metrics, save_figure, stage_starts
from infra.checkpoint import load_run, save_atomic
from data.recall.prepare import N_VALUES
from sample import show_experts

import matplotlib.pyplot as plt  # noqa: E402  (after plot, which picks the Agg backend)


@dataclass
class ExperimentConfig:
    seeds: list = field(default_factory=lambda: [1, 2, 3])  # one run of every arm per seed (3: see compare)
    scale: float = 1.0                  # every stage's steps (and warmup) times this: < 1 for a quick look
    out_dir: str = "out/experiments"    # an experiment writes <out_dir>/<name>/

    def __post_init__(self):
        need(isinstance(self.seeds, list) and self.seeds and all(cli.valid_seed(s) for s in self.seeds) and
             len(set(self.seeds)) == len(self.seeds),
             f"seeds must be a non-empty list of distinct whole numbers in [0, 2**32), e.g. [1, 2]; got {self.seeds!r}")
        need(math.isfinite(self.scale) and self.scale > 0, f"scale must be > 0; got {self.scale}")
        need(self.out_dir.strip() != "", "out_dir must name a folder; got an empty one (the runs would land in "
             "this folder)")


ARM_DIR = "config/experiments/"
# experiment -> arm -> the config files of its runs, in order (later files build on earlier ones)
ARMS = {
    "hybrid": {"all_global": [ARM_DIR + "hybrid.py", ARM_DIR + "hybrid_all_global.py"],
               "hybrid": [ARM_DIR + "hybrid.py", ARM_DIR + "hybrid_hybrid.py"],
               "hybrid_x0": [ARM_DIR + "hybrid.py", ARM_DIR + "hybrid_hybrid_x0.py"],
               "global_first": [ARM_DIR + "hybrid.py", ARM_DIR + "hybrid_global_first.py"]},
    "routing": {"dense": [ARM_DIR + "routing.py", ARM_DIR + "routing_dense.py"],
                "top2": [ARM_DIR + "routing.py", ARM_DIR + "routing_top2.py"],
                "top_p": [ARM_DIR + "routing.py", ARM_DIR + "routing_top_p.py"],
                "top_p_bias": [ARM_DIR + "routing.py", ARM_DIR + "routing_top_p_bias.py"],
                "top_p_fixed": [ARM_DIR + "routing.py", ARM_DIR + "routing_top_p_fixed.py"]},
    "stages": {"three_stages": ["config/default.py"],  # the quickstart run itself
               "one_stage": ["config/default.py", ARM_DIR + "stages.py"]},
    "hybrid_2layer": {arm: [ARM_DIR + "hybrid_2layer.py", *extra, f"--attn_pattern={arm[:2]}"] for arm, extra in
                      [("GG", []), ("GL", []), ("LG", []), ("LG_global_x0", ["--global_x0=True"]),
                       ("LG_window_1_first", [ARM_DIR + "hybrid_2layer_window.py"]),
                       ("LG_x0_window_1_first", [ARM_DIR + "hybrid_2layer_window.py", "--global_x0=True"]),
                       ("LG_x0_mix", ["--x0_mix=True"]), ("LG_attn_only", ["--n_attn_only=1", "--n_dense_layers=1"])]},
    "long_context": {"none": [ARM_DIR + "long_context.py", ARM_DIR + "long_context_none.py"],
                     "same_base": [ARM_DIR + "long_context.py", ARM_DIR + "long_context_same_base.py"],
                     "raised_base": [ARM_DIR + "long_context.py", ARM_DIR + "long_context_raised_base.py"]},
}
EXTRA_SETTINGS = {"stages": ["--eval_interval=250"]}  # what every run of an experiment adds (an accuracy curve)


# -----------------------------------------------------------------------------------------------------
# Running the arms: one train.py process per arm and seed

def scaled_stages(files, scale):
    """The stages the config files (and --key=value settings) define, with every budget and warmup times scale (at
    least 1 step)."""
    import train  # (train.py is a script; only this helper needs its parser)
    stages = []
    for stage in train.load_config(files)[0].stages:
        s = asdict(stage)
        for budget in ("steps", "tokens"):
            s[budget] = None if s[budget] is None else max(1, round(s[budget] * scale))
        s["warmup"] = min(round(s["warmup"] * scale), (s["steps"] or 2) - 1)
        stages.append(s)
    return stages


def train_command(cfg, name, arm, seed):
    out = os.path.join(cfg.out_dir, name, arm, f"seed{seed}")
    cmd = [sys.executable, "train.py", *ARMS[name][arm], f"--seed={seed}", f"--out_dir={out}", "--samples=False",
           "--plots=False", *EXTRA_SETTINGS.get(name, [])]
    if cfg.scale != 1:
        cmd.append(f"--stages={scaled_stages(ARMS[name][arm], cfg.scale)!r}")
    return cmd, out


def train_all(cfg, name):
    """{arm: [run directory per seed]}. Seeds outside, arms inside: the arms of a seed run back to back, so a
    machine that slows down during the experiment slows every arm alike."""
    runs = {arm: [] for arm in ARMS[name]}
    for seed in cfg.seeds:
        for arm in ARMS[name]:
            cmd, out = train_command(cfg, name, arm, seed)
            print(f"\n[{name}] arm {arm}, seed {seed}:\n  {' '.join(shlex.quote(c) for c in cmd[1:])}", flush=True)
            code = subprocess.run(cmd).returncode
            if code != 0:
                raise SystemExit(f"[{name}] arm {arm}, seed {seed} stopped with exit code {code}. Run the same "
                                 f"command again to resume it (finished runs are not trained again).")
            runs[arm].append(out)
    return runs


# -----------------------------------------------------------------------------------------------------
# The verdict rule, and the tables

def mean_spread(values):
    """(mean, half the range) over seeds: with two seeds, the range is all the spread there is to see."""
    return sum(values) / len(values), (max(values) - min(values)) / 2


def cell(values, digits=3):
    mean, spread = mean_spread(values)
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def false_positive_rate(n):
    """How often the seed ranges of two arms with n seeds each fail to overlap when the arms do not differ at all:
    of the orderings of 2n exchangeable results, the 2 (n!)^2 that put one arm's n all below the other's.
    1 in 3 at 2 seeds, 1 in 10 at 3, 1 in 35 at 4."""
    return 2 * math.factorial(n) ** 2 / math.factorial(2 * n)


def compare(what, a, a_values, b, b_values, higher_is_better=False, digits=3):
    """One line of verdict. Arm a or b is better only when their seed ranges do not overlap (the ranges rule: at 3
    seeds a false difference one time in 10, false_positive_rate). The line gives the difference of the means and,
    with the seeds paired (seed i of a against seed i of b: the same data order), the range of the per-seed
    differences: its interval."""
    (ma, _), (mb, _) = mean_spread(a_values), mean_spread(b_values)
    both = f"{a} {cell(a_values, digits)}, {b} {cell(b_values, digits)}"
    diffs = [x - y for x, y in zip(a_values, b_values)] if len(a_values) == len(b_values) else []
    interval = (f"{a} - {b} = {ma - mb:+.{digits}f}" +
                (f", per seed {min(diffs):+.{digits}f} to {max(diffs):+.{digits}f}" if len(diffs) > 1 else ""))
    if min(len(a_values), len(b_values)) < 2:  # one seed has no spread to judge a difference against
        return f"{what}: no verdict from one seed per arm ({both}); run two or more, e.g. --seeds=[1,2,3]"
    if max(min(a_values), min(b_values)) <= min(max(a_values), max(b_values)):
        return f"{what}: no difference at this scale ({both}: the seed ranges overlap; {interval})"
    better, worse = (a, b) if (ma > mb) == higher_is_better else (b, a)
    return f"{what}: {better} is better than {worse} ({both}: the seed ranges do not overlap; {interval})"


def markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def last_eval(run):
    return [r for r in read_metrics(run) if r["kind"] == "eval"][-1]


def bpb_rows(runs, corpora):
    """Table rows: each arm's final val bits per byte per corpus, mean ± half-range over seeds."""
    return [[arm] + [cell([last_eval(r)["val_bpb"][c] for r in dirs]) for c in corpora] for arm, dirs in runs.items()]


def error_bars(ax, x, per_seed, **kw):
    """A line through the seed means, with bars from the lowest to the highest seed."""
    means = [sum(v) / len(v) for v in per_seed]
    low = [m - min(v) for m, v in zip(means, per_seed)]
    high = [max(v) - m for m, v in zip(means, per_seed)]
    ax.errorbar(x, means, yerr=[low, high], capsize=3, marker="o", ms=4, **kw)


# -----------------------------------------------------------------------------------------------------
# 1. hybrid: all-global vs 3 local : 1 global with shared K/V

def kv_formula(config, context, bytes_per_value=2):
    """KV-cache bytes of one sequence, from the layout alone: K and V of n_kv_head heads per position kept,
    which is every position for a global layer, the last `window` for a local one, none for a sharing one."""
    kept = {GLOBAL: context, LOCAL: min(config.window, context), SHARING: 0}
    return sum(2 * config.n_kv_head * (config.n_embd // config.n_head) * bytes_per_value * kept[kind]
               for kind in config.layout())


def hybrid(cfg, runs, folder):
    evals = {arm: [last_eval(r) for r in dirs] for arm, dirs in runs.items()}
    corpora = [c for c in evals["all_global"][0]["val_bpb"] if c != "recall"]  # (recall is scored by exact match)
    models = {arm: load_run(dirs[0])[0] for arm, dirs in runs.items()}  # (the seeds share a shape)
    configs = {arm: model.config for arm, model in models.items()}
    configs["yi_lightning_like"] = preset("yi_lightning_like")
    contexts = [2 ** i for i in range(7, 17)]
    kv = {arm: {n: kv_cache_bytes(c, n) for n in contexts} for arm, c in configs.items()}
    for arm, c in configs.items():
        if any(kv[arm][n] != kv_formula(c, n) for n in contexts):
            raise RuntimeError(f"{arm}: the KV cache's size differs from the formula: a bug in one of them")
    results = {"arms": {}, "kv_bytes_bf16": kv, "recall_counts": evals["all_global"][0]["recall"]["count"]}
    for arm, dirs in runs.items():
        model = models[arm]
        results["arms"][arm] = {
            "layout": "".join(model.config.layout()), "params": model.num_params(),
            "val_bpb": {c: [e["val_bpb"][c] for e in evals[arm]] for c in corpora},
            "recall": {b: [e["recall"]["bucket"][b] for e in evals[arm]] for b in evals[arm][0]["recall"]["bucket"]},
            "recall_by_gap": [e["recall"]["by_gap"] for e in evals[arm]],
            "pair": [max(max(p) for p in e["retrieval"]["pair"]) for e in evals[arm]],
            "pair_curve": [pair_attention_curve(r) for r in dirs],
            "train_tokens_per_s": [median_tok_s(r) for r in dirs]}
    plot_kv(kv, configs, contexts, folder)
    plot_recall_by_gap({arm: r["recall_by_gap"] for arm, r in results["arms"].items()}, configs["hybrid"], folder)
    plot_pair_attention(results["arms"], folder)
    return results, hybrid_tables(results, configs["hybrid"]), hybrid_verdicts(results, configs["hybrid"])


def hybrid_tables(results, config):
    a, kv, counts = results["arms"], results["kv_bytes_bf16"], results["recall_counts"]
    corpora = list(a["hybrid"]["val_bpb"])
    lines = [f"Recall at the end: exact match of a planted value by its gap in bytes (window {config.window}, "
             f"{config.n_layer} layers: local layers reach {config.n_layer * config.window}; chance is "
             f"{1 / N_VALUES}), and the global layers' best head's attention to the pair beyond the window:", ""]
    lines += markdown(["arm", "layout", "params"] + [f"gap {b} ({counts[b]} queries)" for b in a["hybrid"]["recall"]]
                      + ["attention to the pair"],
                      [[arm, r["layout"], f"{r['params']:,}"] + [cell(v, 2) for v in r["recall"].values()] +
                       [cell(r["pair"], 2)] for arm, r in a.items()])
    lines += ["", f"Val bits per byte at the end (seq_len {config.block_size}):", ""]
    lines += markdown(["arm"] + corpora + ["train tokens/s"],
                      [[arm] + [cell(r["val_bpb"][c]) for c in corpora] + [cell(r["train_tokens_per_s"], 0)]
                       for arm, r in a.items()])
    lines += ["", "bf16 KV-cache bytes per sequence (measured on the cache object; equal to the formula):", ""]
    yi = kv["yi_lightning_like"]
    return lines + markdown(["arm", "KV at 128", "KV at 4K", "KV at 64K"],
                            [[arm, mib(kv[arm][128]), mib(kv[arm][4096]), mib(kv[arm][65536])] for arm in a]
                            + [["yi_lightning_like (hybrid)", mib(yi[128]), mib(yi[4096]), mib(yi[65536])]])


def hybrid_verdicts(results, config):
    """Each arm against the plain hybrid and all-global; and the bar a remedy must clear: recall beyond the window
    at >= 80% of all-global's accuracy above chance, with no worse text bpb."""
    a, kv, n, chance = results["arms"], results["kv_bytes_bf16"], config.block_size, 1 / N_VALUES
    far = list(a["hybrid"]["recall"])[1:]
    verdicts = [compare(f"recall, gap {b}", arm, a[arm]["recall"][b], other, a[other]["recall"][b],
                        higher_is_better=True, digits=2)
                for arm in a if arm not in ("hybrid", "all_global") for other in ("hybrid", "all_global") for b in far]
    verdicts += [compare(f"recall, gap {b}", "hybrid", a["hybrid"]["recall"][b], "all_global",
                         a["all_global"]["recall"][b], higher_is_better=True, digits=2) for b in far]
    verdicts += [compare(f"val bpb {c}", arm, a[arm]["val_bpb"][c], "all_global", a["all_global"]["val_bpb"][c])
                 for arm in a if arm != "all_global" for c in a["hybrid"]["val_bpb"]]
    for arm in a:
        if arm in ("hybrid", "all_global"):
            continue
        share = [(sum(a[arm]["recall"][b]) / len(a[arm]["recall"][b]) - chance) /
                 max(1e-9, sum(a["all_global"]["recall"][b]) / len(a["all_global"]["recall"][b]) - chance) for b in far]
        verdicts.append(f"{arm}: recall above chance beyond the window at " + ", ".join(
            f"{s:.0%}" for s in share) + " of all-global's (gaps " + ", ".join(far) + "; the bar is 80% in each)")
    ratio = {arm: a[arm]["params"] / a["all_global"]["params"] for arm in a}
    return verdicts + [
        "parameters against all-global's: " + ", ".join(f"{arm} {r:.3f}" for arm, r in ratio.items()),
        f"KV cache: hybrid / all-global = {kv['hybrid'][n] / kv['all_global'][n]:.3f} at the trained {n} bytes, "
        f"{kv_cache_ratio(config, 65536):.3f} at 64K (global_first and hybrid_x0 hold the same cache as hybrid)"]


def plot_pair_attention(arms, folder):
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for arm, r in arms.items():
        tokens = [t for t, _ in r["pair_curve"][0]]
        error_bars(ax, tokens, [[c[i][1] for c in r["pair_curve"]] for i in range(len(tokens))], label=arm)
    ax.set(xlabel="tokens", ylabel="attention to the planted pair", ylim=(0, None),
           title="Beyond the window: the global layers' best head's attention to the pair")
    ax.legend(fontsize=8)
    save_figure(fig, folder, "pair_attention.png")


def recall_curves(ax, by_gap):
    """Recall against gap on ax, one line per arm through the seed means (bars: lowest to highest seed), over the
    power-of-two gaps every seed has; chance dotted. by_gap: {arm: [evaluation's "by_gap" of each seed]}."""
    for arm, seeds in by_gap.items():
        gaps = sorted(set.intersection(*(set(s) for s in seeds)), key=int)
        error_bars(ax, [int(g) for g in gaps], [[s[g] for s in seeds] for g in gaps], label=arm.replace("_", " "))
    ax.axhline(1 / N_VALUES, color="grey", ls=":", lw=0.8)
    ax.set(xscale="log", xlabel="gap in bytes, from (bins: 2-3, 4-7, 8-15, ...)", ylabel="exact match", ylim=(0, 1.02))
    gap_ticks(ax, [int(g) for g in gaps])
    ax.legend(fontsize=8)


def plot_recall_by_gap(by_gap, config, folder):
    """Recall against gap per arm, the window and the local layers' reach marked."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    recall_curves(ax, by_gap)
    for x, what in ((config.window, "window"), (config.n_layer * config.window, "layers x window")):
        ax.axvline(x, color="k", ls="--", lw=0.8)
        ax.text(x * 1.05, 0.03, what, fontsize=8)
    ax.set_title("Recall of a planted value by how far back it is (dotted: chance)")
    save_figure(fig, folder, "recall_by_gap.png")


def mib(n):
    return "n/a" if n is None else f"{n / 2 ** 20:.2f} MiB"


def median_tok_s(run):
    """Median training tokens/s over the run's log lines (the first is left out: it times the warm-up)."""
    rates = sorted(r["tok_s"] for r in read_metrics(run) if r["kind"] == "train")[1:] or [float("nan")]
    return rates[len(rates) // 2]


def plot_kv(kv, configs, contexts, folder):
    full_yi = replace(configs["yi_lightning_like"], attn_pattern="G", share_kv=False)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, style in (("all_global", "C0--"), ("hybrid", "C0-"), ("yi_lightning_like", "C3-")):
        ax.plot(contexts, [kv[arm][n] for n in contexts], style, marker="o", ms=3,
                label=f"{arm.replace('_', ' ')}: {''.join(configs[arm].layout()[:8])}")
    ax.plot(contexts, [kv_cache_bytes(full_yi, n) for n in contexts], "C3--", marker="o", ms=3,
            label="yi lightning like, all global")
    ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="KV cache per sequence (bytes, bf16)",
           title="KV cache vs context: the trained shapes (blue) and a Yi-Lightning-like shape (red)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    save_figure(fig, folder, "kv_cache.png")


# -----------------------------------------------------------------------------------------------------
# 1b. hybrid_2layer: why the global layer after a local one does not look the pair up (the mechanism)

@torch.no_grad()
def stream_at_global_input(model, tokenizer, docs, seq_len=128):
    """What the first global layer reads at each planted pair's last byte: (share, probe). share: the mean cosine
    of the stream entering that block with the token's own embedding (1 when nothing was added before it); probe:
    how well a linear map reads the pair's key out of the normalised stream (ridge_probe_accuracy, fit on half the
    documents, scored on the other half; chance 1/16)."""
    from data.recall.prepare import parse
    layer = next(i for i, b in enumerate(model.blocks) if b.attn.kind != LOCAL)
    seen = {}
    hook = model.blocks[layer].register_forward_pre_hook(lambda block, args: seen.update(x=args[0], x0=args[1]))
    features, keys, halves, shares = [], [], [], []
    try:
        for start in range(0, len(docs), 32):
            group = docs[start:start + 32]
            rows = [([tokenizer.eot] + tokenizer.encode(d["text"]))[:seq_len] for d in group]
            T = min(len(r) for r in rows)
            model(torch.tensor([r[:T] for r in rows]))
            for row, doc in enumerate(group):
                for key, (_, last) in parse(doc["text"].encode("utf-8")[:T - 1])[0].items():
                    x, x0 = seen["x"][row, last + 1], seen["x0"][row, last + 1]  # (position = byte + 1)
                    shares.append(torch.nn.functional.cosine_similarity(x, x0, dim=0).item())
                    features.append(x / x.norm())
                    keys.append(key)
                    halves.append(start + row < len(docs) // 2)
    finally:
        hook.remove()
    probe = evaluation.ridge_probe_accuracy(torch.stack(features), torch.tensor(keys), torch.tensor(halves))
    return sum(shares) / len(shares), probe


def pair_attention_curve(run):
    """[(tokens, the best head's attention to the pair beyond the window, over the global layers)] of a run."""
    return [(r["tokens"], max(max(p) for p in r["retrieval"]["pair"])) for r in read_metrics(run)
            if r["kind"] == "eval" and r.get("retrieval")]


# Each remedy against LG (does it help?) and GL (how far from it?)
REMEDIES_2LAYER = ("LG_global_x0", "LG_window_1_first", "LG_x0_window_1_first", "LG_x0_mix", "LG_attn_only")


def hybrid_2layer(cfg, runs, folder):
    docs = evaluation.read_recall()
    results = {"arms": {}}
    for arm, dirs in runs.items():
        ends = [last_eval(r) for r in dirs]
        stream = [stream_at_global_input(*load_run(r), docs) for r in dirs]
        results["arms"][arm] = {
            "recall": {b: [e["recall"]["bucket"][b] for e in ends] for b in ends[0]["recall"]["bucket"]},
            "pair": [max(max(p) for p in e["retrieval"]["pair"]) for e in ends],
            "recent": [max(max(n) for n in e["retrieval"]["recent"]) for e in ends],
            "share": [s for s, _ in stream], "probe": [p for _, p in stream],
            "pair_curve": [pair_attention_curve(r) for r in dirs]}
    a, buckets = results["arms"], list(next(iter(results["arms"].values()))["recall"])
    lines = [f"Recall at the end by gap (window 8; chance {1 / N_VALUES}), the global layers' best head's attention "
             f"beyond the window to the pair and to the last 8 positions, and what the first global layer reads at a "
             f"pair: the cosine of its input with the token's embedding, and a linear probe's accuracy for the "
             f"pair's key (chance 1/16):", ""]
    lines += markdown(["arm"] + [f"gap {b}" for b in buckets] + ["to the pair", "to the last 8", "embedding cosine",
                                                                 "key probe"],
                      [[arm] + [cell(r["recall"][b], 2) for b in buckets] +
                       [cell(r[k], 2) for k in ("pair", "recent", "share", "probe")] for arm, r in a.items()])
    far = buckets[1:]
    verdicts = [compare(f"recall, gap {b}", x, a[x]["recall"][b], y, a[y]["recall"][b], higher_is_better=True,
                        digits=2) for x, y in (("GL", "LG"), *((remedy, other) for remedy in REMEDIES_2LAYER
                                                                  for other in ("LG", "GL"))) for b in far]
    verdicts += [compare("attention to the pair", x, a[x]["pair"], y, a[y]["pair"], higher_is_better=True, digits=2)
                 for x, y in (("GL", "LG"), *((remedy, "LG") for remedy in REMEDIES_2LAYER))]
    plot_pair_attention(a, folder)
    return results, lines, verdicts


# -----------------------------------------------------------------------------------------------------
# 2. routing: dense vs top-2 vs top-p, and which tokens top-p gives more experts

# A passage shaded token by token by its experts: Shakespeare, arithmetic of rising difficulty, and code.
PASSAGE = ("ROMEO:\nBut soft, what light through yonder window breaks?\n\n3+4=7\n52+37=89\n604-219=385\n"
           "17*23=391\n\n    def __init__(self, name):\n        self.name = name\n")


@torch.no_grad()
def routing_stats(model, tokenizer, corpora, seq_len=128, batch_size=8, iters=8):
    """What an MoE model's routing did on the val data: experts per token overall, by corpus, by MoE layer and by
    loss decile; the load (the busiest expert's tokens over the mean, per layer); the rank correlation of a token's
    loss with its experts pooled, within each corpus, and within each kind of token (the token it predicts a digit
    or not: a digit costs about ln 10 whatever the problem); and on arithmetic answers by difficulty level."""
    digits = torch.tensor(tokenizer.encode("0123456789"))
    losses, experts, is_digit, by_corpus, within, by_layer, load = [], [], [], {}, {}, [], 0
    for name in corpora:
        seen, lost, kinds = [], [], []
        for y, parts in evaluation.val_batches(model, tokenizer, name, seq_len, batch_size, iters):
            per_layer = torch.stack([r.experts_per_token.float() for r in parts.routing])  # (layers, B, T)
            by_layer.append(per_layer.mean((1, 2)))
            load = load + torch.stack([r.tokens_per_expert.float() for r in parts.routing])
            lost.append(parts.token_loss.flatten())
            seen.append(per_layer.mean(0).flatten())
            kinds.append(torch.isin(y.flatten(), digits))
        by_corpus[name] = torch.cat(seen).mean().item()
        within[name] = evaluation.spearman(torch.cat(lost), torch.cat(seen))
        losses, experts, is_digit = losses + lost, experts + seen, is_digit + kinds
    loss, experts, is_digit = torch.cat(losses), torch.cat(experts), torch.cat(is_digit)
    order = loss.argsort()
    deciles = [(loss[i].mean().item(), experts[i].mean().item()) for i in order.chunk(10)]
    return {"experts_per_token": experts.mean().item(), "by_corpus": by_corpus,
            "by_layer": torch.stack(by_layer).mean(0).tolist(),
            "load_max_mean": (load.max(1).values / load.mean(1)).tolist(),
            "spearman_loss_experts": evaluation.spearman(loss, experts),
            "spearman_within_corpus": within,
            "spearman_within_kind": {"digit": evaluation.spearman(loss[is_digit], experts[is_digit]),
                                     "not digit": evaluation.spearman(loss[~is_digit], experts[~is_digit])},
            "by_loss_decile": deciles, **answers_by_level(model, tokenizer)}


def answer_batch(tokenizer, problems):
    """Inputs, targets and the answer mask for held-out problems, right-padded (later positions cannot change
    earlier ones). The mask marks the positions whose next token is part of the answer: where it is computed."""
    splits = [evaluation.scoring_split(tokenizer, p["prompt"], p["answer"]) for p in problems]
    T = max(len(c) + len(e) for c, e in splits) - 1
    idx = torch.full((len(splits), T), tokenizer.eot)
    targets = torch.full((len(splits), T), -1)
    for row, (context, expected) in enumerate(splits):
        seq = context + expected
        idx[row, :len(seq) - 1] = torch.tensor(seq[:-1])
        targets[row, len(context) - 1:len(seq) - 1] = torch.tensor(expected)
    return idx, targets, targets != -1


def answers_by_level(model, tokenizer, per_level=100):
    """Experts and loss on arithmetic answers by level: over every answer position, and at the first one alone
    (the same position in every problem: where the answer's first digit is computed)."""
    problems = evaluation.read_problems(per_level)
    idx, targets, mask = answer_batch(tokenizer, problems)
    _, _, parts = model(idx, targets, parts=True)
    experts = torch.stack([r.experts_per_token.float() for r in parts.routing]).mean(0)
    levels, first = [p["difficulty"] for p in problems], mask & (mask.cumsum(1) == 1)
    return {"answer_experts_by_level": evaluation.mean_by_group(experts, mask, levels),
            "answer_loss_by_level": evaluation.mean_by_group(parts.token_loss, mask, levels),
            "first_answer_experts_by_level": evaluation.mean_by_group(experts, first, levels),
            "first_answer_loss_by_level": evaluation.mean_by_group(parts.token_loss, first, levels)}


# The top-p arms whose routing is read, and the difficulty question's headline, fixed before the runs: in the arm
# whose mean experts nothing holds (fixed p), (1) the within-corpus rank correlation of loss and experts, averaged
# over the corpora, and (2) experts at the first answer token of held-out problems, level 4 against level 2.
TOP_P_ARMS = ("top_p", "top_p_bias", "top_p_fixed")
HEADLINE_ARM, HEADLINE_LEVELS = "top_p_fixed", (2, 4)


def routing(cfg, runs, folder):
    corpora = list(last_eval(runs["dense"][0])["val_bpb"])
    results, models = {"arms": {}}, {arm: [load_run(r) for r in dirs] for arm, dirs in runs.items()}
    for arm, dirs in runs.items():
        stats = [routing_stats(m, t, corpora) if m.moe_layers() else None for m, t in models[arm]]
        results["arms"][arm] = {
            "val_bpb": {c: [last_eval(r)["val_bpb"][c] for r in dirs] for c in corpora},
            "params": models[arm][0][0].num_params(),
            "active_params": [m.num_params(True, s["by_layer"]) if s else m.num_params(True) for (m, _), s in
                              zip(models[arm], stats)],
            "experts_per_token": [s["experts_per_token"] if s else None for s in stats],
            "load_max_mean": [max(s["load_max_mean"]) if s else None for s in stats], "routing": stats}
    a = results["arms"]
    moe = lambda arm, key, digits: cell(a[arm][key], digits) if a[arm]["routing"][0] else "dense"  # noqa: E731
    lines = ["Val bits per byte at the end, what a token uses, and how evenly the experts are loaded (the busiest "
             "expert's tokens over the mean, in the worst MoE layer; 1.00 is even):", ""]
    lines += markdown(["arm", "params", "active params/token", "routed experts/token", "load max/mean"] + corpora,
                      [[arm, f"{a[arm]['params']:,}", cell(a[arm]["active_params"], 0),
                        moe(arm, "experts_per_token", 2), moe(arm, "load_max_mean", 2)] + row[1:]
                       for arm, row in zip(runs, bpb_rows(runs, corpora))])
    lines += difficulty_table({arm: a[arm]["routing"] for arm in TOP_P_ARMS})
    pairs = [("top_p", "top2"), ("top_p", "dense"), ("top_p_bias", "top_p"), ("top_p_fixed", "top_p")]
    verdicts = [compare(f"val bpb {c}", x, a[x]["val_bpb"][c], y, a[y]["val_bpb"][c]) for x, y in pairs
                for c in corpora]
    verdicts += [compare("load max/mean, worst MoE layer", "top_p_bias", a["top_p_bias"]["load_max_mean"], other,
                         a[other]["load_max_mean"], digits=2) for other in ("top_p", "top2")]
    verdicts += difficulty_verdicts({arm: a[arm]["routing"] for arm in TOP_P_ARMS})
    plot_difficulty({arm: a[arm]["routing"] for arm in TOP_P_ARMS}, folder)
    model, tokenizer = models[HEADLINE_ARM][0]
    show_experts(model, tokenizer, [tokenizer.eot] + tokenizer.encode(PASSAGE), os.path.join(folder, "passage.png"))
    return results, lines, verdicts


def level_name(lv):
    return f"level {lv}" + (" (val problems seen in training)" if int(lv) == 1 else "")


def difficulty_table(arms):
    """Each top-p arm's experts per token by what the token is, and the rank correlations, mean ± half-range."""
    first = next(iter(arms.values()))[0]
    layers, levels = range(len(first["by_layer"])), list(first["answer_experts_by_level"])
    rows = [("all val tokens", lambda s: s["experts_per_token"], 2)]
    rows += [(f"val {c}", lambda s, c=c: s["by_corpus"][c], 2) for c in first["by_corpus"]]
    rows += [(f"MoE layer {i + 1} (of {len(layers)})", lambda s, i=i: s["by_layer"][i], 2) for i in layers]
    rows += [(f"MoE layer {i + 1}: load max/mean", lambda s, i=i: s["load_max_mean"][i], 2) for i in layers]
    rows += [(f"arith answers, {level_name(lv)}", lambda s, lv=lv: s["answer_experts_by_level"][lv], 2)
             for lv in levels]
    rows += [(f"first answer token, {level_name(lv)}", lambda s, lv=lv: s["first_answer_experts_by_level"][lv], 2)
             for lv in levels]
    rows += [(f"first answer token's loss, {level_name(lv)}", lambda s, lv=lv: s["first_answer_loss_by_level"][lv],
              2) for lv in levels]
    rows += [("Spearman(token loss, experts), all val tokens", lambda s: s["spearman_loss_experts"], 3)]
    rows += [(f"Spearman within {c}", lambda s, c=c: s["spearman_within_corpus"][c], 3) for c in first["by_corpus"]]
    rows += [(f"Spearman within tokens predicting {k}", lambda s, k=k: s["spearman_within_kind"][k], 3)
             for k in first["spearman_within_kind"]]
    return ["", "The top-p arms: routed experts per token (mean over MoE layers) by what the token is, and the rank "
            "correlation of a token's loss with its experts:", ""] + markdown(
        ["tokens"] + list(arms), [[label] + [cell([get(s) for s in stats], d) for stats in arms.values()]
                                  for label, get, d in rows])


def sign_over_seeds(values):
    return ("undefined: every token got the same number of experts" if any(math.isnan(v) for v in values) else
            "positive in every seed" if min(values) > 0 else "negative in every seed" if max(values) < 0 else
            "its sign varies with the seed")


def difficulty_verdicts(arms):
    """Do harder tokens get more experts? The headline (HEADLINE_ARM, fixed before the runs) first."""
    lo, hi = HEADLINE_LEVELS
    verdicts = []
    for arm in sorted(arms, key=lambda arm: arm != HEADLINE_ARM):
        stats, tag = arms[arm], "headline, " if arm == HEADLINE_ARM else ""
        within = [sum(s["spearman_within_corpus"].values()) / len(s["spearman_within_corpus"]) for s in stats]
        pooled = [s["spearman_loss_experts"] for s in stats]
        verdicts += [f"{arm} ({tag}harder tokens, more experts?): Spearman(token loss, experts) within a corpus, "
                     f"mean over corpora = {cell(within, 3)} ({sign_over_seeds(within)}); pooled over corpora "
                     f"{cell(pooled, 3)} ({sign_over_seeds(pooled)})",
                     compare(f"{arm} ({tag}experts at the first answer token, held out): level {hi} vs level {lo}",
                             f"level {hi}", [s["first_answer_experts_by_level"][hi] for s in stats], f"level {lo}",
                             [s["first_answer_experts_by_level"][lo] for s in stats], higher_is_better=True,
                             digits=2).replace("is better than", "gets more experts than")]
    return verdicts


def plot_difficulty(arms, folder):
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    for arm, stats in arms.items():
        n = len(stats[0]["by_loss_decile"])
        error_bars(axes[0], range(1, n + 1), [[s["by_loss_decile"][i][1] for s in stats] for i in range(n)], label=arm)
        levels = list(stats[0]["first_answer_experts_by_level"])
        error_bars(axes[1], levels, [[s["first_answer_experts_by_level"][lv] for s in stats] for lv in levels])
        names = list(stats[0]["by_corpus"])
        error_bars(axes[2], names, [[s["by_corpus"][c] for s in stats] for c in names], ls="none")
        layers = range(1, len(stats[0]["by_layer"]) + 1)
        error_bars(axes[3], list(layers), [[s["by_layer"][i - 1] for s in stats] for i in layers])
    axes[0].set(xlabel="token loss decile (1 = easiest)", ylabel="routed experts per token", title="Experts by loss")
    axes[0].legend(fontsize=8)
    axes[1].set(xlabel="arith level (1: seen in training; 2-4: more digits; 5: products)",
                title="Experts at the first answer token")
    axes[2].set(title="Experts by corpus")
    axes[3].set(xlabel="MoE layer (1 = lowest)", title="Experts by layer")
    for ax in axes:
        ax.title.set_fontsize(10)
    save_figure(fig, folder, "routing_difficulty.png")


# -----------------------------------------------------------------------------------------------------
# 3. stages: three stages vs one stage of the same tokens and peak lr

def stages(cfg, runs, folder):
    first = last_eval(runs["three_stages"][0])
    corpora, levels = list(first["val_bpb"]), list(first["arith_accuracy"]["level"])
    results = {"arms": {}}
    for arm, dirs in runs.items():
        ends = [last_eval(r) for r in dirs]
        curves = [[(r["tokens"], r["arith_accuracy"]["all"]) for r in read_metrics(d) if "arith_accuracy" in r]
                  for d in dirs]
        results["arms"][arm] = {
            "val_bpb": {c: [e["val_bpb"][c] for e in ends] for c in corpora},
            "arith_by_level": {lv: [e["arith_accuracy"]["level"][lv] for e in ends] for lv in levels},
            "arith_all": [e["arith_accuracy"]["all"] for e in ends], "curves": curves}
    a = results["arms"]
    lines = ["Held-out arithmetic exact match at the end, by level (1: 1-digit +-, 2-4: 2- to 4-digit +-, "
             "5: 2-digit products):", ""]
    lines += markdown(["arm"] + [f"level {lv}" for lv in levels] + ["all"],
                      [[arm] + [cell(a[arm]["arith_by_level"][lv], 2) for lv in levels] + [cell(a[arm]["arith_all"], 2)]
                       for arm in runs])
    lines += ["", "Val bits per byte at the end:", ""] + markdown(["arm"] + corpora, bpb_rows(runs, corpora))
    verdicts = [compare("arith exact match, all levels", "three_stages", a["three_stages"]["arith_all"], "one_stage",
                        a["one_stage"]["arith_all"], higher_is_better=True)]
    verdicts += [compare(f"arith exact match, level {lv}", "three_stages", a["three_stages"]["arith_by_level"][lv],
                         "one_stage", a["one_stage"]["arith_by_level"][lv], higher_is_better=True) for lv in levels]
    verdicts += [compare(f"val bpb {c}", "three_stages", a["three_stages"]["val_bpb"][c], "one_stage",
                         a["one_stage"]["val_bpb"][c]) for c in corpora]
    boundaries = stage_starts([r for r in read_metrics(runs["three_stages"][0]) if r["kind"] == "train"])
    plot_curves(a, boundaries, folder)
    return results, lines, verdicts


def plot_curves(arms, boundaries, folder):
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for i, (arm, r) in enumerate(arms.items()):
        for seed, curve in enumerate(r["curves"]):
            ax.plot(*zip(*curve), color=f"C{i}", lw=1.8 if seed == 0 else 1, alpha=1 if seed == 0 else 0.6,
                    marker="o", ms=3, label=arm if seed == 0 else None)
    ax.set(xlabel="tokens", ylabel="exact match, all levels", ylim=(0, 1.02),
           title="Held-out arithmetic over training (one line per seed); dashed: three_stages' stage starts")
    ax.title.set_fontsize(9)
    for tokens, stage in boundaries:
        ax.axvline(tokens, color="k", ls="--", lw=0.8)
    ax.legend(fontsize=8)
    save_figure(fig, folder, "stages_accuracy.png")


# -----------------------------------------------------------------------------------------------------
# 4. long_context: train at 32 bytes, extend to 128 with the RoPE base kept or raised, or not at all

@torch.no_grad()
def position_bpb(model, tokenizer, corpora, seq_len, n_buckets=4, batch_size=16, iters=16):
    """{corpus: val bits per byte in n_buckets spans of positions of seq_len-token sequences}."""
    token_bytes = torch.tensor(tokenizer.token_bytes())
    out = {}
    for name in corpora:
        per_batch = []
        for y, parts in evaluation.val_batches(model, tokenizer, name, seq_len, batch_size, iters):
            per_batch.append(evaluation.bpb_by_position(parts.token_loss, y, token_bytes, n_buckets))
        out[name] = [sum(col) / iters for col in zip(*per_batch)]
    return out


def long_context(cfg, runs, folder):
    corpora = [c for c in last_eval(runs["none"][0])["val_bpb"] if c != "recall"]
    loaded = {arm: [load_run(r) for r in dirs] for arm, dirs in runs.items()}  # (model, tokenizer) per seed
    seq_len, n_buckets = loaded["none"][0][0].config.block_size, 4
    trained = scaled_stages(ARMS["long_context"]["none"], cfg.scale)[0]["seq_len"]  # the first stage's context: L
    edges, docs = [trained, 2 * trained], evaluation.read_recall()  # gaps < L, L-2L, 2L-4L
    buckets = [f"{i * seq_len // n_buckets}-{(i + 1) * seq_len // n_buckets - 1}" for i in range(n_buckets)]
    results = {"positions": buckets, "trained_seq_len": trained, "arms": {}}
    for arm, seeds in loaded.items():
        per_seed = [position_bpb(m, tok, corpora, seq_len, n_buckets) for m, tok in seeds]
        recall = [evaluation.recall_accuracy(m, tok, docs, seq_len, nullcontext(), edges) for m, tok in seeds]
        results["arms"][arm] = {
            "bpb_by_position": per_seed,
            "bpb_by_position_mean_of_corpora": [[sum(s[c][i] for c in corpora) / len(corpora) for i in range(n_buckets)]
                                                for s in per_seed],
            "recall": {b: [r["bucket"][b] for r in recall] for b in recall[0]["bucket"]},
            "recall_by_gap": [r["by_gap"] for r in recall], "recall_counts": recall[0]["count"]}
    a = results["arms"]
    lines = [f"Recall of planted values at {seq_len} bytes, by gap (trained at {trained}; chance is "
             f"{1 / N_VALUES}):", ""]
    lines += markdown(["arm"] + [f"gap {b} ({n} queries)" for b, n in a["none"]["recall_counts"].items()],
                      [[arm] + [cell(v, 2) for v in r["recall"].values()] for arm, r in a.items()])
    lines += ["", f"Val bits per byte of {seq_len}-byte sequences by position (mean of {', '.join(corpora)}):", ""]
    lines += markdown(["arm"] + [f"positions {b}" for b in buckets],
                      [[arm] + [cell([m[i] for m in r["bpb_by_position_mean_of_corpora"]]) for i in range(n_buckets)]
                       for arm, r in a.items()])
    last = {arm: [m[-1] for m in r["bpb_by_position_mean_of_corpora"]] for arm, r in a.items()}
    pairs = [("raised_base", "same_base"), ("same_base", "none"), ("raised_base", "none")]
    verdicts = [compare(f"recall, gap {b}", x, a[x]["recall"][b], y, a[y]["recall"][b], higher_is_better=True,
                        digits=2) for x, y in pairs for b in list(a["none"]["recall"])[1:]]
    verdicts += [compare(f"bpb at positions {buckets[-1]}", x, last[x], y, last[y]) for x, y in pairs]
    plot_long_context(a, buckets, trained, folder)
    return results, lines, verdicts


def plot_long_context(arms, buckets, trained, folder):
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    recall_curves(left, {arm: r["recall_by_gap"] for arm, r in arms.items()})
    left.axvline(trained, color="k", ls="--", lw=0.8)
    left.set(xlabel=f"gap in bytes, from (dashed: the first stage's {trained})",
             title="Recall by gap, after the second stage (dotted: chance)")
    for arm, r in arms.items():
        error_bars(right, buckets, [[m[i] for m in r["bpb_by_position_mean_of_corpora"]] for i in range(len(buckets))],
                   label=arm)
    right.set(xlabel=f"positions (first stage trained at {trained})", ylabel="val bits per byte",
              title="Text loss by position")
    save_figure(fig, folder, "long_context.png")


EXPERIMENTS = {"hybrid": hybrid, "hybrid_2layer": hybrid_2layer, "routing": routing, "stages": stages,
               "long_context": long_context}


def json_ready(x):
    """JSON-ready: NaN (a correlation with a constant) becomes None; tuples become lists."""
    if isinstance(x, float):
        return None if math.isnan(x) else x
    if isinstance(x, dict):
        return {str(k): json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
    return x


def write_text(text, path):
    with open(path, "w") as f:
        f.write(text)


def training_minutes(run):
    """Minutes a run spent in train.py, from its own clock (wall_s in metrics.jsonl, which restarts at each resume):
    an experiment run again after its runs finished reports their training time, not the time it took to load them."""
    total = last = 0
    for r in read_metrics(run):
        total, last = total + (r["wall_s"] - last if r["wall_s"] >= last else r["wall_s"]), r["wall_s"]
    return total / 60


def run_experiment(cfg, name):
    runs = train_all(cfg, name)
    folder = os.path.join(cfg.out_dir, name)
    print(f"\n[{name}] measuring the trained models", flush=True)
    t0 = time.time()
    results, lines, verdicts = EXPERIMENTS[name](cfg, runs, folder)
    minutes = {"training": sum(training_minutes(r) for dirs in runs.values() for r in dirs),
               "measuring": (time.time() - t0) / 60}
    default = ExperimentConfig()
    changed = [f"--{k}={v}".replace(" ", "") for k, v in asdict(cfg).items() if v != getattr(default, k)]
    command = " ".join(["python -m tools.experiment", name] + changed)
    results.update(command=command, seeds=cfg.seeds, scale=cfg.scale, minutes=minutes,
                   runs={arm: [" ".join(shlex.quote(c) for c in train_command(cfg, name, arm, s)[0][1:])
                               for s in cfg.seeds] for arm in runs}, verdicts=verdicts)
    save_atomic(json.dumps(json_ready(results), indent=1), os.path.join(folder, "results.json"), write=write_text)
    report = ([f"# Experiment: {name}", "", f"`{command}`: {len(cfg.seeds)} seed{'s' * (len(cfg.seeds) > 1)} ({', '.join(map(str, cfg.seeds))}) "
               f"per arm, {sum(minutes.values()):.1f} minutes on this machine ({minutes['training']:.1f} training, "
               f"{minutes['measuring']:.1f} measuring). Cells: mean ± half the range over seeds.", ""]
              + lines + ["", f"Verdicts (a difference counts only when the seed ranges do not overlap, which two arms "
                         f"that do not differ do {false_positive_rate(len(cfg.seeds)):.0%} of the time at "
                         f"{len(cfg.seeds)} seeds each):", ""]
              + [f"- {v}" for v in verdicts])
    save_atomic("\n".join(report) + "\n", os.path.join(folder, "results.md"), write=write_text)
    print("\n".join(report))
    print(f"\nwritten to {folder}/: results.json, results.md and " +
          ", ".join(sorted(f for f in os.listdir(folder) if f.endswith(".png"))))


def main(argv):
    names = list(EXPERIMENTS) + ["all"]
    if not argv or argv[0] not in names:
        print(__doc__.strip().split("\n\n")[1])
        if argv and argv[0] in ("-h", "--help"):
            cli.parse(argv, ExperimentConfig, allow_file=False)
        raise SystemExit(f"usage: python -m tools.experiment {{{'|'.join(names)}}} [--key=value ...]"
                         + (f"; unknown experiment {argv[0]!r}" if argv else ""))
    cfg, = cli.load(argv[1:], ExperimentConfig)
    subprocess.run([sys.executable, os.path.join("data", "prepare.py")], check=True, stdout=subprocess.DEVNULL)
    for name in EXPERIMENTS if argv[0] == "all" else [argv[0]]:
        run_experiment(cfg, name)


if __name__ == "__main__":
    os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # config paths are relative to the repository
    cli.run(main)
