"""
Sample from a trained run, streaming each sample's text as the serving engine produces it.

    python sample.py --out_dir=out/default --start="ROMEO:" --num_samples=2 --max_new_tokens=200
    python sample.py --out_dir=out/default --start=FILE:prompt.txt --temperature=0.8 --top_p=0.9
    python sample.py --out_dir=out/default --start="12+35=" --show_experts     # shade tokens by their experts
    python sample.py --out_dir=out/default --prompts=prompts.txt --num_samples=4  # decoded together, each streamed

Loads out_dir/ckpt.pt (or best.pt with --checkpoint=best), rebuilds the model and the run's tokenizer, and
serves the samples through engine.py: several (num_samples > 1, or a file of prompts, one per line) decode
together in its continuous batch, as many at once as --kv_cache_mib holds, and each prints as its tokens come, one
sample after another; tokens/s and the KV cache's size at the end. With --show_experts, each token of the prompt and the
sample is shaded by how many routed experts it used (the mean over MoE layers): in the terminal with ANSI
colours, and in out_dir/experts.png for slides.
"""

import os
import time
from dataclasses import dataclass
from typing import Optional

import torch

from infra import cli
from infra.cli import need
from infra.checkpoint import load_run
from engine import Engine, Request, check_sampling


@dataclass
class SampleConfig:
    out_dir: str = "out/default"        # the run directory train.py wrote
    checkpoint: str = "ckpt"            # "ckpt" (latest) or "best" (lowest mean val loss)
    start: str = "\n"                   # prompt text, or FILE:path to read it from a file
    num_samples: int = 1                # samples to draw of each prompt
    prompts: Optional[str] = None       # a file of prompts, one per line (instead of --start)
    kv_cache_mib: float = 1024.0        # KV cache for decoding several samples at once: it decides how many
    max_new_tokens: int = 200           # tokens to generate per sample
    temperature: float = 0.8            # 0 is greedy; higher is more random
    top_k: Optional[int] = None         # sample only among the k most likely tokens
    top_p: Optional[float] = None       # sample only among the smallest set of tokens whose probability reaches p
    seed: int = 1337                    # seeds the sampling
    device: str = "auto"                # "auto" (cuda if available), "cpu", "cuda", ...
    show_experts: bool = False          # shade each token by its routed experts (terminal + out_dir/experts.png)

    def __post_init__(self):
        need(self.checkpoint in ("ckpt", "best"), f"checkpoint must be ckpt or best; got {self.checkpoint!r}")
        need(self.num_samples >= 1, f"num_samples must be >= 1; got {self.num_samples}")
        need(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1; got {self.max_new_tokens}")
        sampling = check_sampling(self.temperature, self.top_k, self.top_p)  # (the engine's rule for a request's)
        need(sampling is None, sampling)
        need(self.prompts is None or self.prompts.strip(), "prompts must name a file of prompts; got an empty path")
        need(cli.valid_device(self.device), f"device must be auto, cpu, cuda or cuda:N; got {self.device!r}")
        need(cli.valid_seed(self.seed), f"seed must be a whole number in [0, 2**32); got {self.seed!r}")
        need(self.kv_cache_mib > 0, f"kv_cache_mib must be > 0; got {self.kv_cache_mib}")
        need(not self.show_experts or (self.num_samples == 1 and self.prompts is None),
             "--show_experts shades one sample: use it with num_samples=1 and no --prompts")


# -----------------------------------------------------------------------------------------------------
# Which tokens got more experts: top-p routing gives a token the router is unsure about more of them

@torch.no_grad()
def experts_per_token(model, idx):
    """(T,) routed experts of each token of idx (1, T), averaged over the MoE layers. One pass through a KV
    cache, so the sequence may be longer than block_size; the routing is what decoding saw."""
    cache = model.make_cache(1, idx.shape[1])
    _, _, parts = model(idx, cache=cache, parts=True)
    if not parts.routing:
        raise SystemExit("--show_experts: this model has no MoE layers")
    return torch.stack([r.experts_per_token[0].float() for r in parts.routing]).mean(0)


def shade(value, low, high):
    """An (r, g, b) from white (fewest experts) to deep orange (most)."""
    t = 0.0 if high <= low else (value - low) / (high - low)
    return 255, round(255 - 140 * t), round(255 - 230 * t)


def ansi_shaded(pieces, values):
    low, high = min(values), max(values)
    return "".join(f"\x1b[48;2;{r};{g};{b}m\x1b[38;2;0;0;0m{piece}\x1b[0m" if piece != "\n" else "\n"
                   for piece, (r, g, b) in zip(pieces, (shade(v, low, high) for v in values)))


def png_shaded(pieces, values, path, title, width=64):
    """The same shading as a picture: the text in a grid of character cells, each coloured by its token."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, row = [], []
    for piece, value in zip(pieces, values):
        for ch in piece:
            if ch == "\n" or len(row) == width:
                rows.append(row)
                row = []
            if ch != "\n":
                row.append((ch, value))
    rows.append(row)
    low, high = min(values), max(values)
    fig, ax = plt.subplots(figsize=(width * 0.14 + 1.5, len(rows) * 0.28 + 1))
    for y, row in enumerate(rows):
        for x, (ch, value) in enumerate(row):
            ax.add_patch(plt.Rectangle((x, -y - 1), 1, 1, color=[c / 255 for c in shade(value, low, high)]))
            ax.text(x + 0.5, -y - 0.5, ch, ha="center", va="center", family="monospace", fontsize=9)
    ax.set(xlim=(0, width), ylim=(-len(rows), 0), title=title)
    ax.axis("off")
    mappable = plt.cm.ScalarMappable(norm=plt.Normalize(low, high), cmap=matplotlib.colors.LinearSegmentedColormap
                                     .from_list("experts", [[c / 255 for c in shade(v, 0, 1)] for v in (0, 1)]))
    fig.colorbar(mappable, ax=ax, label="routed experts (mean over MoE layers)", fraction=0.03)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def show_experts(model, tokenizer, ids, path):
    values = experts_per_token(model, torch.tensor([ids], device=model.wte.weight.device)).tolist()
    pieces = [tokenizer.decode([i]) for i in ids]
    keep = [i for i, piece in enumerate(pieces) if piece != "<|endoftext|>"]
    pieces, values = [pieces[i] for i in keep], [values[i] for i in keep]
    print(ansi_shaded(pieces, values))
    print(f"shading: white = {min(values):.2f}, deep orange = {max(values):.2f} routed experts per token")
    png_shaded(pieces, values, path, f"routed experts per token: {min(values):.2f} (white) to {max(values):.2f}")
    print(f"wrote {path}")


def read_prompts(cfg):
    """The prompt texts: --start (or the file it names), or each non-empty line of --prompts."""
    path = cfg.prompts or (cfg.start[5:] if cfg.start.startswith("FILE:") else None)
    if path is None:
        return [cfg.start]
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"cannot read the prompt file {path} ({e})")
    if cfg.prompts is None:
        return [text]
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise SystemExit(f"the prompt file {path} has no prompts (one per line)")
    return [line.replace("\\n", "\n") for line in lines]  # (a prompt of several lines writes \n)


def encode(tokenizer, text):
    try:
        ids = tokenizer.encode(text)
    except ValueError as e:  # a char-level run knows only its training text's characters
        raise SystemExit(f"the prompt cannot be encoded: {e}. Use only characters the run was trained on.")
    if tokenizer.eot is not None:
        ids = [tokenizer.eot] + ids  # documents begin after an end-of-text token in training
    if not ids:
        raise SystemExit(f"the prompt is empty, and the {tokenizer.name} tokenizer has no end-of-text token to start "
                         f"from: give --start=TEXT")
    return ids


def sample_all(model, tokenizer, texts, prompts, cfg):
    """Every prompt num_samples times through engine.py, each sample printed as its tokens come: the sample on
    show streams, the others decode beside it in the same batch and their text waits its turn, so the samples print
    one after another, whole and in order. Each stops at end-of-text or max_new_tokens. Returns the first sample's
    ids, prompt included (for --show_experts)."""
    longest = max(len(ids) for ids in prompts) + cfg.max_new_tokens
    budget = min(cfg.kv_cache_mib * 2 ** 20, cli.free_memory(model.wte.weight.device))
    try:
        engine = Engine(model, budget, max_len=longest, eot=tokenizer.eot, decode=tokenizer.decode,
                        vocab_size=tokenizer.vocab_size, max_batch=len(prompts) * cfg.num_samples)
        order = [(rid, p, n) for p, ids in enumerate(prompts) for n, rid in enumerate(engine.add_request(
            Request(ids, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed + p * cfg.num_samples),
            n=cfg.num_samples))]
    except ValueError as e:  # (a budget too small for one sequence, a prompt the model cannot take)
        raise SystemExit(f"cannot sample: {e}") from None
    several = len(order) > 1
    held, tokens, finished, shown = {rid: [] for rid, _, _ in order}, {rid: [] for rid, _, _ in order}, {}, 0
    t0 = time.time()

    def begin(i):
        rid, p, n = order[i]
        if several:
            print(f"--- prompt {p + 1}/{len(prompts)}, sample {n + 1}/{cfg.num_samples} ---")
        print(texts[p], end="", flush=True)

    begin(0)
    while engine.busy():
        for out in engine.step():
            held[out.id].append(out.text)
            tokens[out.id] += out.tokens
            finished[out.id] = out.finished
        while shown < len(order):  # the sample on show prints what it has; once it ends, the next one's turn
            rid = order[shown][0]
            print("".join(held[rid]), end="", flush=True)
            held[rid] = []
            if not finished.get(rid):
                break
            reason = {"eot": "end-of-text", "length": "max_new_tokens"}[finished[rid]]
            print(f"\n--- {len(tokens[rid])} tokens, {reason} ---" if several else "", flush=True)
            shown += 1
            if shown < len(order):
                begin(shown)
    dt, produced = time.time() - t0, sum(map(len, tokens.values()))
    print(f"--- {len(order)} sample{'s' if several else ''}, {produced} tokens in {dt:.2f}s ({produced / dt:.1f} "
          f"tokens/s), {min(engine.n_rows, len(order))} at once in a KV cache of "
          f"{engine.cache.kv.nbytes() / 2 ** 20:.2f} MiB ---")
    return prompts[0] + tokens[order[0][0]]


def main(argv):
    cfg, = cli.load(argv, SampleConfig)
    device = cli.resolve_device(cfg.device)
    texts = read_prompts(cfg)
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_run(cfg.out_dir, cfg.checkpoint, device)
    prompts = [encode(tokenizer, text) for text in texts]
    longest = max(len(ids) for ids in prompts) + cfg.max_new_tokens
    need_bytes = model.make_cache(1, longest, "meta").nbytes()
    have = cli.free_memory(device)
    if need_bytes > have:
        raise SystemExit(f"--max_new_tokens={cfg.max_new_tokens} needs a KV cache of {need_bytes / 2 ** 30:,.1f} GiB "
                         f"for one sequence; {have / 2 ** 30:,.1f} GiB is free here: ask for fewer tokens")
    ids = sample_all(model, tokenizer, texts, prompts, cfg)
    if cfg.show_experts:
        show_experts(model, tokenizer, ids, os.path.join(cfg.out_dir, "experts.png"))


if __name__ == "__main__":
    cli.run(main)
