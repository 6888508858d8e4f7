"""
Plots of a training run, from its out_dir/metrics.jsonl, into out_dir/plots/:

    loss.png     train and val loss per corpus over tokens (nats per token, and val bits per byte), stages marked
    arith.png    held-out arithmetic exact match per level over tokens, stages marked
    recall.png   recall of planted values by gap at the last evaluation (window marked), and per gap bucket over tokens
    experts.png  routed experts per token, per MoE layer, over training
    load.png     share of tokens per expert, per MoE layer (the load balance), over the last tenth of training

Run: python -m infra.plot out/<run>   (train.py calls it at the end of a run)
"""

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(out_dir):
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"no metrics.jsonl in {out_dir}: is it a run directory written by train.py?")
    records = []
    with open(path, errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # (a line cut short by a kill during its write)
                continue
            if isinstance(record, dict) and record.get("kind") in ("train", "eval") and "step" in record:
                records.append(record)
    return records


def stage_starts(train):
    """(tokens, stage) at the first logged step of every stage after the first."""
    return [(prev["tokens"], r["stage"]) for prev, r in zip(train, train[1:]) if r["stage"] != prev["stage"]]


def mark_stages(ax, boundaries):
    for tokens, stage in boundaries:
        ax.axvline(tokens, color="k", ls="--", lw=0.8)
        ax.text(tokens, ax.get_ylim()[1], f" stage {stage}", va="top", fontsize=8)


def plot_run(out_dir):
    records = read_metrics(out_dir)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    if not train:
        raise SystemExit(f"{out_dir}/metrics.jsonl has no training records yet")
    folder = os.path.join(out_dir, "plots")
    os.makedirs(folder, exist_ok=True)
    boundaries = stage_starts(train)
    save_figure(plot_loss(train, evals, boundaries), folder, "loss.png")
    if any("arith_accuracy" in r for r in evals):
        save_figure(plot_arith([r for r in evals if "arith_accuracy" in r], boundaries), folder, "arith.png")
    if any("recall" in r for r in evals):
        save_figure(plot_recall([r for r in evals if "recall" in r], boundaries), folder, "recall.png")
    if train[-1]["experts_per_token"]:
        save_figure(plot_experts(train, boundaries), folder, "experts.png")
        save_figure(plot_load(train), folder, "load.png")
    print(f"plots written to {folder}")


def save_figure(fig, folder, name):
    fig.tight_layout()
    fig.savefig(os.path.join(folder, name), dpi=110)
    plt.close(fig)


def plot_loss(train, evals, boundaries):
    fig, (ax, ax_bpb) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax.plot([r["tokens"] for r in train], [r["ce"] for r in train], color="0.7", lw=1, label="train (mixture)")
    for corpus in (evals[0]["val"] if evals else []):
        tokens = [r["tokens"] for r in evals]
        ax.plot(tokens, [r["val"][corpus] for r in evals], marker="o", ms=3, label=f"val {corpus}")
        ax_bpb.plot(tokens, [r["val_bpb"][corpus] for r in evals], marker="o", ms=3, label=f"val {corpus}")
    ax.set(xlabel="tokens", ylabel="cross-entropy (nats/token)", title="Loss per corpus")
    ax_bpb.set(xlabel="tokens", ylabel="bits per byte", title="Val loss in bits per byte (tokenizer-independent)")
    for a in (ax, ax_bpb):
        mark_stages(a, boundaries)
        a.legend(loc="upper right", fontsize=8)
    return fig


def plot_arith(accuracy, boundaries):
    fig, ax = plt.subplots(figsize=(8, 4))
    for level in sorted(accuracy[0]["arith_accuracy"]["level"], key=int):
        ax.plot([r["tokens"] for r in accuracy], [r["arith_accuracy"]["level"][level] for r in accuracy],
                marker="s", ms=3, label=f"level {level}")
    ax.set(xlabel="tokens", ylabel="exact match", ylim=(0, 1.05), title="Held-out arithmetic, exact match per level")
    mark_stages(ax, boundaries)
    ax.legend(fontsize=8)
    return fig


def plot_recall(evals, boundaries):
    fig, (by_gap, over) = plt.subplots(1, 2, figsize=(12, 4))
    last = evals[-1]["recall"]
    by_gap.plot([int(g) for g in last["by_gap"]], list(last["by_gap"].values()), marker="o", ms=4)
    for edge in last["edges"]:  # window, 4 windows, layers x window (evaluation.recall_edges)
        by_gap.axvline(edge, color="k", ls="--", lw=0.8)
    by_gap.set(xscale="log", xlabel="gap in bytes, from (dashed: the bucket edges)", ylabel="exact match",
               ylim=(0, 1.05), title=f"Recall by gap at step {evals[-1]['step']}")
    gap_ticks(by_gap, [int(g) for g in last["by_gap"]])
    for bucket in last["bucket"]:
        over.plot([r["tokens"] for r in evals], [r["recall"]["bucket"].get(bucket) for r in evals], marker="s", ms=3,
                  label=f"gap {bucket}")
    over.set(xlabel="tokens", ylabel="exact match", ylim=(0, 1.05), title="Recall per gap bucket")
    mark_stages(over, boundaries)
    over.legend(fontsize=8)
    return fig


def gap_ticks(ax, gaps):
    """Power-of-two gaps labelled as they are on a log axis."""
    ax.minorticks_off()
    ax.set_xticks(gaps, [str(g) for g in gaps])


def plot_experts(train, boundaries):
    fig, ax = plt.subplots(figsize=(8, 4))
    for layer in range(len(train[-1]["experts_per_token"])):
        ax.plot([r["tokens"] for r in train], [r["experts_per_token"][layer] for r in train],
                label=f"MoE layer {layer}")
    ax.set(xlabel="tokens", ylabel="routed experts per token", title="Experts per token (top-p routing)")
    mark_stages(ax, boundaries)
    ax.legend(fontsize=8)
    return fig


def plot_load(train):
    last = train[-max(1, len(train) // 10):]
    load = [[sum(col) for col in zip(*(r["tokens_per_expert"][layer] for r in last))]
            for layer in range(len(last[0]["tokens_per_expert"]))]
    share = [[c / max(1e-9, sum(row)) for c in row] for row in load]
    fig, ax = plt.subplots(figsize=(8, 1 + 0.5 * len(share)))
    image = ax.imshow(share, aspect="auto", cmap="viridis")
    fig.colorbar(image, ax=ax, label="share of the layer's assignments")
    ax.set(xlabel="expert", ylabel="MoE layer", title="Load per expert (last 10% of training)")
    return fig


def main(argv):
    from infra import cli
    run = cli.one_path(argv, "usage: python -m infra.plot out/<run>   (writes out/<run>/plots/ from its metrics.jsonl)")
    if run is not None:
        plot_run(run)


if __name__ == "__main__":
    from infra import cli
    cli.run(main)
