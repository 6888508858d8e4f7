"""
Benchmarks: every figure is a ratio of two things measured side by side in the same run (these machines are
noisy), printed as a table.

    python -m tools.bench                         # on the CPU
    python -m tools.bench --device=cuda --json=bench.json

1. training tokens/s (and MFU on known GPUs) of a preset
2. attention: one local layer vs one global layer, forward + backward, as T grows
3. KV-cache bytes: the hybrid layout with KV sharing vs all-global, for the presets and context lengths
4. MoE layer vs a dense MLP with the same active FLOPs, forward + backward
5. decoding tokens/s with the KV cache vs recomputing the whole context at every token
6. the local-attention kernels' memory per sequence, CPU's and CUDA's
7. graphs Dynamo compiles for a training step, before and after a change of sequence length
8. where a training step's time goes at nanoGPT's CPU shape: attention, dense MLP, MoE, the rest
9. the same step's top ops by self time (torch.profiler)
10. memory per rank (parameters, gradients, Adam state) under DDP, FSDP and FSDP + EP, for the presets
11. decoding tokens/s with the cache at nanoGPT's shape after 1K and 8K of context, hybrid vs all-global
"""

import json
import math
import os
import time
from dataclasses import dataclass, replace
from typing import Optional

import torch

from infra import cli
from infra.cli import need
from attention import GLOBAL, LOCAL, causal_attention, local_blocks, rope_cache, sliding_window_block_mask
from infra.evaluation import flops_per_token, mfu, peak_flops
from model import GPT, PRESETS, compile_model, init_weights, kv_cache_bytes, kv_cache_ratio, preset
from infra.parallel import memory_per_rank
import router
from router import MoE, RouterConfig, SwiGLU


@dataclass
class BenchConfig:
    device: str = "cpu"                 # "cpu", "cuda", "cuda:1", ... or "auto" (cuda if there is one)
    preset: str = "tiny_8x64"           # model for sections 1 and 5 (a name from model.PRESETS)
    batch_size: int = 8                 # section 1: sequences per training step
    seq_len: int = 128                  # section 1: tokens per sequence
    window: int = 256                   # section 2: the local layer's window
    max_T: Optional[int] = None         # section 2: longest T (default 8192 on CPU, 32768 on CUDA)
    repeats: int = 5                    # timings are the median of this many runs
    json: str = ""                      # also write the figures to this file

    def __post_init__(self):
        need(self.preset in PRESETS, f"unknown preset {self.preset!r}; known: {', '.join(PRESETS)}")
        for name in ("batch_size", "seq_len", "window", "repeats"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1; got {getattr(self, name)}")
        need(self.max_T is None or self.max_T >= 1024, f"max_T must be >= 1024 (T runs from 1024); got {self.max_T}")
        need(cli.valid_device(self.device), f"device must be auto, cpu, cuda or cuda:N; got {self.device!r}")
        folder = os.path.dirname(os.path.abspath(self.json)) if self.json else "."
        need(os.path.isdir(folder) and os.access(folder, os.W_OK),
             f"json: the folder {folder} does not exist or cannot be written; make it first (the figures "
             f"would otherwise be lost after every section has run)")


def timed(fns, repeats, device):
    """Median wall time of each function in the dict fns. They take turns, `repeats` rounds after a warm-up
    round, so a slow spell of a noisy machine hits them all alike."""
    times = {name: [] for name in fns}
    for round in range(repeats + 1):
        for name, fn in fns.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if round > 0:
                times[name].append(time.perf_counter() - t0)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def cuda_autocast(dtype):
    """bf16 autocast where the bench runs in bf16 (CUDA); a no-op otherwise."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


# nanoGPT's CPU shape: nanogpt_4x128, 12 sequences of 64, the 65 characters (padded to 128)
NANO_STEP = dict(config=preset("nanogpt_4x128", vocab_size=128), batch_size=12, seq_len=64, n_ids=65)


def training_step(cfg, config, batch_size, seq_len, dtype, n_ids=None):
    """A model of `config` and one training step of it as train.py takes it (forward, backward, clip, AdamW)
    on a fixed random batch of ids below n_ids (default: the vocabulary). Returns (model, step, experts per
    token of the last step, per MoE layer)."""
    torch.manual_seed(0)
    model = GPT(config, verbose=False).to(cfg.device)
    opt = model.configure_optimizer(0.1, 1e-4, (0.9, 0.95), cfg.device.split(":")[0])
    idx = torch.randint(0, n_ids or config.vocab_size, (batch_size, seq_len + 1), device=cfg.device)
    experts = []

    def step():
        with cuda_autocast(dtype):
            _, loss, parts = model(idx[:, :-1], idx[:, 1:], parts=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        experts[:] = [r.experts_per_token.float().mean().item() for r in parts.routing]
    return model, step, experts


def bench_training(cfg, dtype):
    model, step, experts = training_step(cfg, preset(cfg.preset), cfg.batch_size, cfg.seq_len, dtype)
    dt = timed({"step": step}, cfg.repeats, cfg.device)["step"]
    tok_s = cfg.batch_size * cfg.seq_len / dt
    row = {"preset": cfg.preset, "ms_per_step": 1000 * dt, "tokens_per_s": tok_s,
           "experts_per_token": sum(experts) / max(1, len(experts))}
    if cfg.device.startswith("cuda"):
        active = model.num_params(active=True, experts_per_token=experts)
        row["mfu"] = mfu(flops_per_token(model.config, active, cfg.seq_len), tok_s,
                         peak_flops(torch.cuda.get_device_name()))
    return row


def bench_step_parts(cfg, dtype):
    """Where a training step at nanoGPT's CPU shape (NANO_STEP) spends its time: the attention layers, the dense
    and the MoE feed-forward layers,
    each group timed forward + backward on its own input, in turns with the whole step. The rest (embedding,
    norms, residuals, loss, clip, AdamW) is the step minus the three. The router starts near uniform, so an
    untrained MoE layer runs more experts per token (printed) than a trained one (about 1.7)."""
    model, step, experts = training_step(cfg, dtype=dtype, **NANO_STEP)
    config = model.config
    h = torch.randn(12, config.block_size, config.n_embd, device=cfg.device, requires_grad=True)
    cos, sin = rope_cache(torch.arange(config.block_size, device=cfg.device), config.n_embd // config.n_head)

    def layers(kind):  # every layer of a kind, forward + backward, each on h
        with cuda_autocast(dtype):
            out, kv = 0, None
            for block in model.blocks:
                if kind == "attention":
                    y, layer_kv = block.attn(h, cos, sin, kv)
                    kv = layer_kv if block.attn.kind == GLOBAL else kv
                elif isinstance(block.ffn, MoE) == (kind == "MoE"):
                    y = block.ffn(h)
                    y = y[0] + y[1] if kind == "MoE" else y  # (output and aux loss)
                else:
                    continue
                out = out + y.float().sum()
        out.backward()
        model.zero_grad(set_to_none=True)

    t = timed({"step": step, "attention": lambda: layers("attention"), "dense": lambda: layers("dense"),
               "MoE": lambda: layers("MoE")}, 4 * cfg.repeats, cfg.device)
    n_moe = len(model.moe_layers())
    parts = [(f"attention, layers {''.join(config.layout())}", t["attention"]),
             (f"dense SwiGLU, layers: {config.n_layer - n_moe}", t["dense"]),
             (f"MoE, layers: {n_moe}, {sum(experts) / len(experts):.2f} experts/token", t["MoE"]),
             ("rest: embedding, norms, loss, clip, AdamW", t["step"] - t["attention"] - t["dense"] - t["MoE"])]
    return [{"part": name, "ms": 1000 * s, "share": f"{100 * s / t['step']:.0f}%"} for name, s in parts] + \
        [{"part": "whole step", "ms": 1000 * t["step"], "share": "100%"}]


def profile_top_ops(cfg, dtype, n=12, steps=10):
    """torch.profiler over a few training steps at nanoGPT's CPU shape (after a warm-up): the n ops with the most
    self time, per step."""
    from torch.profiler import profile
    _, step, _ = training_step(cfg, dtype=dtype, **NANO_STEP)
    step()
    with profile() as prof:
        for _ in range(steps):
            step()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key[:48], "ms_per_step": e.self_cpu_time_total / steps / 1000, "calls_per_step": e.count // steps,
             "share": f"{100 * e.self_cpu_time_total / total:.1f}%"} for e in events[:n]]


def bench_attention(cfg, dtype):
    max_T = cfg.max_T or (32768 if cfg.device.startswith("cuda") else 8192)
    rows, T = [], 1024
    while T <= max_T:
        q, k, v = (torch.randn(1, 4, T, 64, device=cfg.device, dtype=dtype, requires_grad=True) for _ in range(3))

        def run(window):
            causal_attention(q, k, v, window).sum().backward()

        t = timed({"local": lambda: run(cfg.window), "global": lambda: run(None)}, cfg.repeats, cfg.device)
        rows.append({"T": T, "local_ms": 1000 * t["local"], "global_ms": 1000 * t["global"]})
        T *= 2
    for r in rows:
        r["local_growth"] = r["local_ms"] / rows[0]["local_ms"]
        r["global_growth"] = r["global_ms"] / rows[0]["global_ms"]
    return rows


def bench_kv_cache():
    rows = []
    shapes = {name: preset(name) for name in ("tiny_8x64", "gpt2_trunk_64e", "yi_lightning_like")}
    # 12 layers, 3 local : 1 global, window 4096, sharing between global pairs: pairs that do not divide evenly.
    shapes["12L_w4096"] = preset("gpt2_trunk_64e", window=4096, block_size=65536)
    for name, config in shapes.items():
        for context in (4096, 16384, 65536):
            hybrid, ratio = kv_cache_bytes(config, context), kv_cache_ratio(config, context)
            kinds = config.layout()
            formula = (kinds.count(GLOBAL) + kinds.count(LOCAL) * min(1, config.window / context)) / len(kinds)
            layout = "".join(kinds) if len(kinds) <= 12 else "".join(kinds[:8]) + f"...({len(kinds)})"
            rows.append({"model": name, "layout": layout, "context": context, "hybrid_MiB": hybrid / 2 ** 20,
                         "all_global_MiB": hybrid / ratio / 2 ** 20, "ratio": ratio, "formula": formula})
    return rows


def bench_moe(cfg, dtype):
    torch.manual_seed(0)
    n_embd, n_experts, hidden, tokens = 256, 16, 256, 4096
    x = torch.randn(tokens, n_embd, device=cfg.device, dtype=dtype, requires_grad=True)
    moe = MoE(n_embd, n_experts, hidden, n_shared=0, config=RouterConfig(routing="top_k", top_k=2)).to(cfg.device)
    init_weights(moe, n_layer=1)
    dense = SwiGLU(n_embd, 2 * hidden).to(cfg.device)  # the same active FLOPs as two experts
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def run(layer, path=None):  # path: "grouped" or "loop" for the experts; None: the one the device takes
        chosen = router.use_grouped_mm
        if path:
            router.use_grouped_mm = lambda xs, w1: path == "grouped"
        try:
            with autocast:
                out = layer(x)
            (out[0] if isinstance(out, tuple) else out).float().sum().backward()
        finally:
            router.use_grouped_mm = chosen

    # The MoE as the model runs it against the dense MLP. Each run is short and the ratio is what matters, so
    # this pair takes three times the rounds. Then the two expert GEMM paths against each other.
    t = timed({"moe": lambda: run(moe), "dense": lambda: run(dense)}, 3 * cfg.repeats, cfg.device)
    paths = timed({"grouped": lambda: run(moe, "grouped"), "loop": lambda: run(moe, "loop")}, cfg.repeats, cfg.device)
    top_p = MoE(n_embd, n_experts, hidden, n_shared=0, config=RouterConfig(routing="top_p", top_p=0.4)).to(cfg.device)
    init_weights(top_p, n_layer=1)
    routing = top_p(x.detach())[2]
    return {"tokens": tokens, "n_embd": n_embd, "experts": n_experts, "dense_ms": 1000 * t["dense"],
            "moe_ms": 1000 * t["moe"], "moe_vs_dense": t["moe"] / t["dense"],
            "path_taken": "grouped" if router.use_grouped_mm(x, moe.experts.w1) else "loop",
            "grouped_vs_loop": paths["grouped"] / paths["loop"],
            "top_p_0.4_experts_per_token_at_init": routing.experts_per_token.float().mean().item()}


@torch.inference_mode()  # the mode generate() runs in, for both sides of the comparison
def bench_decode(cfg, name, vocab_size, context=1024, new_tokens=64):
    """Greedy decoding after a `context`-token prompt. The cache side is timed as generate() for 1 token
    (the prefill: one forward over the prompt) and for new_tokens + 1; the difference is the decode phase.
    The recompute side runs the whole context through the model for every new token, as nanoGPT does."""
    torch.manual_seed(0)
    config = preset(name, block_size=context + new_tokens, vocab_size=vocab_size)
    model = GPT(config, verbose=False).to(cfg.device).eval()
    prompt = torch.randint(0, config.vocab_size, (1, context), device=cfg.device)

    def recompute():
        idx = prompt
        for _ in range(new_tokens):
            logits, _ = model(idx[:, -config.block_size:])
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)

    t = timed({"prefill": lambda: model.generate(prompt, 1, temperature=0),
               "cache": lambda: model.generate(prompt, new_tokens + 1, temperature=0),
               "recompute": recompute}, min(cfg.repeats, 3), cfg.device)
    decode = t["cache"] - t["prefill"]
    return {"preset": name, "vocab": vocab_size, "context": context, "new_tokens": new_tokens,
            "prefill_ms": 1000 * t["prefill"], "cache_tokens_per_s": new_tokens / decode,
            "recompute_tokens_per_s": new_tokens / t["recompute"], "decode_speedup": t["recompute"] / decode,
            "with_prefill_speedup": t["recompute"] / t["cache"]}


def bench_decode_layouts(cfg, contexts=(1024, 8192), new_tokens=64):
    """Decoding with the cache after a 1K and an 8K prompt at nanoGPT's shape (nanogpt_4x128: LLLG, window 32), hybrid
    vs all-global, side by side: decode tokens/s (the prefill timed apart and taken off) and cache bytes. Random
    weights: this measures speed, not text."""
    rows = []
    for context in contexts:
        models = {}
        for layout, override in (("hybrid", {}), ("all_global", {"attn_pattern": "G"})):
            torch.manual_seed(0)
            config = preset("nanogpt_4x128", block_size=context + new_tokens, vocab_size=65, **override)
            models[layout] = GPT(config, verbose=False).to(cfg.device).eval()
        prompt = torch.randint(0, 65, (1, context), device=cfg.device)
        fns = {}
        for layout, model in models.items():
            fns[f"{layout} prefill"] = lambda m=model: m.generate(prompt, 1, temperature=0)
            fns[f"{layout} all"] = lambda m=model: m.generate(prompt, new_tokens + 1, temperature=0)
        t = timed(fns, min(cfg.repeats, 3), cfg.device)
        speed = {k: new_tokens / (t[f"{k} all"] - t[f"{k} prefill"]) for k in models}
        for layout, model in models.items():
            rows.append({"context": context, "layout": layout, "decode_tokens_per_s": speed[layout],
                         "vs_all_global": speed[layout] / speed["all_global"],
                         "prefill_ms": 1000 * t[f"{layout} prefill"],
                         "kv_cache_KiB": kv_cache_bytes(model.config, context + new_tokens, torch.float32) / 1024})
    return rows


def local_attention_bytes(config, context, batch_size=1):
    """The memory each local-attention kernel builds for one full-length sequence. CPU's blocked SDPA kernel
    (attention._local_attention), worked out from its shapes: the banded mask over every query block (bool,
    built once) and the scores of one call (fp32, a few blocks per call); had CUDA kept that kernel, its one
    masked-SDPA call would also turn the mask into a bf16 bias padded to 16. CUDA's FlexAttention kernel:
    the block mask, measured (its tensors built here), and no scores at all."""
    w, g, d = config.window, config.n_head // config.n_kv_head, config.n_embd // config.n_head
    c, nb, span, per_call = local_blocks(context, w, batch_size, config.n_kv_head, g)
    mask = nb * g * c * span
    block_mask = sliding_window_block_mask(context, context, w, "cpu")
    flex = sum(t.numel() * t.element_size() for t in vars(block_mask).values() if isinstance(t, torch.Tensor))
    return {"shape": f"T={context} w={w} {config.n_head}/{config.n_kv_head} heads of {d}", "mask_GiB": mask / 2 ** 30,
            "cpu_scores_per_call_MiB": batch_size * config.n_kv_head * per_call * g * c * span * 4 / 2 ** 20,
            "sdpa_bias_if_cuda_GiB": batch_size * nb * g * c * 16 * math.ceil(span / 16) * 2 / 2 ** 30,
            "flex_block_mask_MiB": flex / 2 ** 20,
            "flex_tiles_computed": f"{block_mask.sparsity():.1f}% skipped"}


def compiled_step_graphs(cfg):
    """Frames Dynamo compiles for training steps of the preset (aot_eager): 1 means no graph breaks; then the
    sequence length doubles, as a stage may do, which should cost exactly one more."""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(preset(cfg.preset), verbose=False).to(cfg.device)
    counter = CompileCounterWithBackend("aot_eager")
    forward, rows = compile_model(model, backend=counter), []
    for T in (cfg.seq_len // 2, cfg.seq_len):
        x = torch.randint(0, model.config.vocab_size, (2, T), device=cfg.device)
        _, loss, _ = forward(x, x.roll(-1, 1), parts=True)
        loss.backward()
        rows.append({"preset": cfg.preset, "seq_len": T, "frames_compiled_so_far": counter.frame_count})
    return rows


def memory_rows(worlds=(8, 64, 2048)):
    """parallel.memory_per_rank for the presets, with ep = gcd(world, n_experts): the most ranks that split
    the experts evenly (the model is built on the meta device: no memory)."""
    rows = []
    for name in ("nanogpt_4x128", "gpt2_trunk_64e", "yi_lightning_like"):
        config = preset(name)
        with torch.device("meta"):
            model = GPT(config, verbose=False)
        n_params = model.num_params()
        n_experts = n_params - model.num_params(active=True, experts_per_token=0)  # (the routed experts)
        for world in worlds:
            ep = math.gcd(world, config.n_experts)
            for layout, parallel, e in (("DDP", "ddp", 1), ("FSDP", "fsdp", 1), (f"FSDP+EP{ep}", "fsdp", ep)):
                params, grads, adam = memory_per_rank(n_params, n_experts, world, parallel, e)
                rows.append({"preset": name, "params_B": n_params / 1e9, "ranks": world, "layout": layout,
                             "params_GiB": params / 2 ** 30, "grads_GiB": grads / 2 ** 30, "adam_GiB": adam / 2 ** 30,
                             "total_GiB": (params + grads + adam) / 2 ** 30})
    return rows


def table(title, rows):
    rows = rows if isinstance(rows, list) else [rows]
    keys = list(rows[0])
    cells = [[f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print(f"\n## {title}")
    print("  ".join(k.rjust(w) for k, w in zip(keys, widths)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths)))


def main(argv):
    cfg, = cli.load(argv, BenchConfig)
    cfg = replace(cfg, device=cli.resolve_device(cfg.device))
    dtype = torch.bfloat16 if cfg.device.startswith("cuda") else torch.float32
    name = torch.cuda.get_device_name() if cfg.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"lightning bench: {name}, torch {torch.__version__}, {dtype}")
    results = {"device": name, "torch": torch.__version__}
    sections = [("1. training step", "training", lambda: bench_training(cfg, dtype)),
                (f"2. attention fwd+bwd, window {cfg.window}, 4 heads of 64", "attention",
                 lambda: bench_attention(cfg, dtype)),
                ("3. KV cache (bf16, one sequence): hybrid vs all-global", "kv_cache", bench_kv_cache),
                ("4. MoE (16 experts, top-2) vs dense MLP of the same active FLOPs, fwd+bwd", "moe",
                 lambda: bench_moe(cfg, dtype)),
                ("5. decoding at a 1024-token context: KV cache vs recomputing", "decode",
                 lambda: [bench_decode(cfg, cfg.preset, 50304), bench_decode(cfg, "nanogpt_4x128", 65)]),
                ("6. local attention kernels: memory each builds per sequence (CPU: blocked SDPA; CUDA: FlexAttention)",
                 "local_attention_bytes", lambda: [local_attention_bytes(preset("gpt2_trunk_64e"), 1024),
                                                   local_attention_bytes(preset("yi_lightning_like"), 65536)]),
                ("7. compiled training step (aot_eager): frames Dynamo compiles, then after seq_len doubles",
                 "compiled_graphs", lambda: compiled_step_graphs(cfg)),
                ("8. nanoGPT's shape (nanogpt_4x128, 12 x 64 tokens): where a training step's time goes", "step_parts",
                 lambda: bench_step_parts(cfg, dtype)),
                ("9. the same step under torch.profiler: top ops by self time (profiler overhead included)",
                 "top_ops", lambda: profile_top_ops(cfg, dtype)),
                ("10. memory per rank, fp32 parameters, gradients and AdamW state (parallel.memory_per_rank)",
                 "memory_per_rank", memory_rows),
                ("11. decoding with the cache at nanoGPT's shape after 1K and 8K of context: hybrid vs all-global",
                 "decode_layouts", lambda: bench_decode_layouts(cfg))]
    for title, key, fn in sections:
        t0 = time.time()
        results[key] = fn()
        table(f"{title}  ({time.time() - t0:.0f}s)", results[key])
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"\nwrote {cfg.json}")


if __name__ == "__main__":
    cli.run(main)
