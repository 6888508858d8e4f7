"""
What hybrid attention buys at serving time, measured: engine.py's continuous batch at a fixed KV budget.

    python -m tools.bench_serving                          # the CPU tables of docs/serving.md (a few minutes)
    python -m tools.bench_serving --device=cuda --budget_mib=4096 --n_embd=512

Three models of one shape and one active size, random weights (speed does not depend on what they learned):
a hybrid MoE (LLLG with paired K/V, as Yi-Lightning), the same MoE with every layer global, and the hybrid
with a dense MLP as wide as the MoE's active experts. For each, the KV budget decides how many sequences fit;
each table row serves N requests of one context (prompt + generated tokens) through engine.Engine and reports
the decoding steps' tokens per second (each step one batched forward of every running sequence) and the time to
first token, mean over requests (all arrive at once, so later ones wait for the prefills before them). Then,
from the cache's own byte count, how many sequences of the yi_lightning_like shape fit in 80 GB of KV memory.
"""

import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from infra import cli
from infra.cli import need
from engine import Engine, Request
from model import GPT, kv_cache_bytes, make_config, preset


@dataclass
class ServingConfig:
    device: str = "cpu"                 # "cpu", "cuda", "cuda:1", ... or "auto"
    budget_mib: float = 16.0            # KV cache budget every layout gets
    n_layer: int = 8                    # the three models' depth
    n_embd: int = 64                    # ... and width (head size 16, 2 K/V heads)
    window: int = 128                   # the local layers' window
    new_tokens: int = 32                # tokens generated per request
    concurrency: list = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])  # table 1: requests served together
    context_1: int = 1024               # table 1's context: prompt + new tokens
    contexts: list = field(default_factory=lambda: [1024, 4096, 16384])  # table 2's contexts
    requests_2: int = 8                 # table 2's requests
    repeats: int = 3                    # each figure is the median of this many serves

    def __post_init__(self):
        need(cli.valid_device(self.device), f"device must be auto, cpu, cuda or cuda:N; got {self.device!r}")
        need(self.budget_mib > 0, f"budget_mib must be > 0; got {self.budget_mib}")
        for name in ("n_layer", "n_embd", "window", "new_tokens", "context_1", "requests_2", "repeats"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1; got {getattr(self, name)}")
        need(self.n_embd % 16 == 0, f"n_embd must be a multiple of 16 (head size 16); got {self.n_embd}")
        for name in ("concurrency", "contexts"):
            values = getattr(self, name)
            need(values and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values),
                 f"{name} must be a non-empty list of whole numbers >= 1, e.g. [1, 4]; got {values!r}")
        need(self.context_1 > self.new_tokens and min(self.contexts) > self.new_tokens,
             f"every context must exceed new_tokens ({self.new_tokens}): a prompt needs a token")


def models(cfg, device):
    """{name: model}: three shapes, the same active parameters per token (top-2 routing + 1 shared expert of
    hidden h, or a dense MLP of hidden 3h), block_size past the longest context (only the all-global one needs it)."""
    longest = max([cfg.context_1, *cfg.contexts])
    h = 2 * cfg.n_embd
    shape = dict(n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_embd // 16, n_kv_head=2, window=cfg.window,
                 block_size=longest, vocab_size=256, n_experts=8, expert_hidden=h, routing="top_k", top_k=2)
    shapes = {"hybrid MoE": dict(attn_pattern="LLLG", share_kv=True),
              "all-global MoE": dict(attn_pattern="G", share_kv=False),
              "hybrid dense": dict(attn_pattern="LLLG", share_kv=True, n_dense_layers=cfg.n_layer, mlp_hidden=3 * h)}
    out = {}
    for name, extra in shapes.items():
        torch.manual_seed(0)
        out[name] = GPT(make_config({**shape, **extra}), verbose=False).to(device).eval()
    return out


def serve(model, budget, context, n, new_tokens):
    """(rows decoding at once, decode tokens/s, end-to-end tokens/s, mean seconds to first token) of n requests of
    `context` positions, all arriving at once. Decode tokens/s: the tokens the batched decoding steps produced over
    the time spent in them; end-to-end: every generated token over the whole serve, the prefills included."""
    engine = Engine(model, budget, max_len=context, max_batch=n)
    g = torch.Generator().manual_seed(n)
    requests = [Request(torch.randint(0, 256, (context - new_tokens + 1,), generator=g).tolist(), new_tokens)
                for _ in range(n)]
    t0 = time.perf_counter()
    results = list(engine.serve(requests))
    whole = time.perf_counter() - t0
    stats = engine.stats
    return (engine.n_rows, stats["decode_tokens"] / stats["decode_s"], n * new_tokens / whole,
            sum(r.first_token_s for r in results) / n)


def prefill_rule(nets, budget, context, n, new_tokens, repeats):
    """{(blocked_from, model): median prefill seconds of n prompts of `context` positions}: the local layers' kernel
    chosen from S > 2 windows (the rule before) and from S > attention.BLOCKED_FROM windows (now), side by side."""
    import attention
    now, out = attention.BLOCKED_FROM, {}
    try:
        for rule in (2, now):
            attention.BLOCKED_FROM = rule
            for name in ("hybrid MoE", "all-global MoE"):
                times = []
                for _ in range(repeats):
                    engine = Engine(nets[name], budget, max_len=context, max_batch=n)
                    g = torch.Generator().manual_seed(n)
                    for _ in range(n):
                        engine.add_request(Request(torch.randint(0, 256, (context - new_tokens + 1,),
                                                                 generator=g).tolist(), 1))
                    while engine.busy():
                        engine.step()
                    times.append(engine.stats["prefill_s"])
                out[rule, name] = sorted(times)[len(times) // 2]
    finally:
        attention.BLOCKED_FROM = now
    return out


def shared_prefill(model, budget, context, n, new_tokens):
    """Seconds to serve n samples of one prompt: added as one request with n samples (one prefill, its rows
    copied), and as n separate requests (n prefills). Sampled at temperature 1, each sample its own seed."""
    prompt = torch.randint(0, 256, (context - new_tokens + 1,), generator=torch.Generator().manual_seed(0)).tolist()
    times = {}
    for way in ("one prefill", "n prefills"):
        engine = Engine(model, budget, max_len=context, max_batch=n)
        t0 = time.perf_counter()
        if way == "one prefill":
            engine.add_request(Request(prompt, new_tokens, temperature=1.0), n=n)
        else:
            for j in range(n):
                engine.add_request(Request(prompt, new_tokens, temperature=1.0, seed=j))
        while engine.busy():
            engine.step()
        times[way] = (time.perf_counter() - t0, engine.stats["prefill_s"])
    return times


def table(rows, header):
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def sweep(cfg, device, nets, budget, points):
    """One table row per (context, requests) point: each model side by side, and the hybrid's ratios."""
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    rows = []
    for context, n in tqdm(points, leave=False):
        cells, speed = [context, n], {}
        for name, model in nets.items():
            fit = int(budget // kv_cache_bytes(model.config, context, dtype))  # (sequences the budget holds)
            if fit < 1:
                cells += ["0 fit", "-", "-", "-"]
                continue
            runs = [serve(model, budget, context, n, cfg.new_tokens) for _ in range(cfg.repeats)]
            rows_, decode, whole, ttft = (sorted(r[i] for r in runs)[len(runs) // 2] for i in range(4))  # (medians)
            speed[name] = (decode, whole)
            cells += [f"{rows_}/{fit}", f"{decode:,.0f}", f"{whole:,.0f}", f"{ttft:.2f}"]
        if "all-global MoE" in speed and "hybrid MoE" in speed:
            cells += [f"{speed['hybrid MoE'][i] / speed['all-global MoE'][i]:.2f}x" for i in range(2)]
        else:
            cells += ["(all-global: none fit)", ""]
        rows.append(cells)
    return rows


def yi_table():
    """Sequences of the yi_lightning_like shape (bf16) whose KV cache fits in 80 GB, hybrid against all-global."""
    hybrid = preset("yi_lightning_like")
    every = preset("yi_lightning_like", attn_pattern="G", share_kv=False)
    rows = []
    for context in (4096, 32768, 65536):
        h, g = (kv_cache_bytes(c, context, torch.bfloat16) for c in (hybrid, every))
        rows.append([context, f"{h / 2 ** 30:.2f} GiB", int(80e9 // h), f"{g / 2 ** 30:.2f} GiB", int(80e9 // g),
                     f"{g / h:.1f}x"])
    return table(rows, ["context", "hybrid KV/seq", "hybrid seqs in 80 GB", "all-global KV/seq",
                        "all-global seqs", "ratio"])


def main(argv):
    try:
        tables(*cli.load(argv, ServingConfig))
    except ValueError as e:  # (a budget too small for one sequence, a context too long for the models)
        raise SystemExit(f"cannot serve: {e}") from None


def tables(cfg):
    device = cli.resolve_device(cfg.device)
    budget = cfg.budget_mib * 2 ** 20
    nets = models(cfg, device)
    for model in nets.values():  # a warm-up serve each: first calls pay for allocations and kernel choices
        serve(model, budget, 2 * cfg.new_tokens, 2, cfg.new_tokens)
    header = ["ctx", "N"] + [f"{m} {c}" for m in nets for c in ("rows", "decode tok/s", "e2e tok/s", "ttft")] + \
        ["hybrid/global decode", "hybrid/global e2e"]
    print(f"bench_serving on {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; KV budget "
          f"{cfg.budget_mib:g} MiB; {cfg.n_layer} layers x {cfg.n_embd}, window {cfg.window}; {cfg.new_tokens} new "
          f"tokens per request; medians of {cfg.repeats} serves.\nrows: sequences decoding at once / that fit in the "
          f"budget; decode tok/s: output tokens per second of the decoding steps (prefills apart); e2e tok/s: output "
          f"tokens per second of the whole serve (prefills included); ttft: mean seconds to first token (all arrive "
          f"at once).")
    active = {name: m.num_params(active=True) for name, m in nets.items()}
    print("active parameters per token:", ", ".join(f"{k} {v:,}" for k, v in active.items()))
    print(f"\n1. N requests of {cfg.context_1} positions")
    print(table(sweep(cfg, device, nets, budget, [(cfg.context_1, n) for n in cfg.concurrency]),
                header))
    print(f"\n2. {cfg.requests_2} requests, longer contexts")
    print(table(sweep(cfg, device, nets, budget, [(c, cfg.requests_2) for c in cfg.contexts]),
                header))
    print(f"\n3. {cfg.requests_2} samples of one prompt of {cfg.context_1} positions (hybrid MoE): one shared prefill "
          f"against one per sample")
    times = shared_prefill(nets["hybrid MoE"], budget, cfg.context_1, cfg.requests_2, cfg.new_tokens)
    print(table([[way, f"{t:.2f} s", f"{p:.2f} s"] for way, (t, p) in times.items()], ["", "serve", "of it prefill"]))
    print(f"\n4. prefill of {cfg.requests_2} prompts of {cfg.context_1} positions (chunks of 512): the local layers' "
          f"kernel, blocked from S > 2 windows (before) or from S > 4 (now)")
    pre = prefill_rule(nets, budget, cfg.context_1, cfg.requests_2, cfg.new_tokens, cfg.repeats)
    print(table([[f"S > {rule} windows", f"{pre[rule, 'hybrid MoE']:.2f} s", f"{pre[rule, 'all-global MoE']:.2f} s",
                  f"{pre[rule, 'hybrid MoE'] / pre[rule, 'all-global MoE']:.2f}x"] for rule in (2, 4)],
                ["blocked kernel from", "hybrid MoE prefill", "all-global MoE prefill", "hybrid / all-global"]))
    print("\n5. the yi_lightning_like shape, KV cache only (bf16), from the cache's byte count")
    print(yi_table())


if __name__ == "__main__":
    cli.run(main)
