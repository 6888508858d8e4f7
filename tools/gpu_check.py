"""
One command that checks the CUDA paths on a GPU and prints their numbers as one table (docs/gpu.md):

    python -m tools.gpu_check                  # on one CUDA GPU
    python -m tools.gpu_check --dry=True       # on a CPU: each part at a tiny size, the CUDA-only ones skipped

The parts, each guarded, so that one that fails is reported and the rest still run:

    tests      the tests that have a CUDA variant (FlexAttention's gradients, bf16 and compiled training steps)
    train      the GPU preset under bf16 autocast, compiled and eager over the same steps: tokens/s, MFU, peak
               memory, and how far the compiled losses are from the eager ones
    attention  a local layer's attention forward + backward: FlexAttention against one masked SDPA call, 4K to 64K
    experts    an MoE layer forward + backward: one grouped GEMM per weight against the loop over experts
    decode     decoding tokens/s after 8K of context, hybrid against all-global
    serving    engine.py in bf16: 16 requests of 4K in one KV budget, hybrid against all-global (rows, decode
               tokens/s), and whether its greedy tokens match generate's on each request alone
    torchrun   a 1-process torchrun of the preset: NCCL on a GPU (gloo on a CPU)

The dry run is what the test suite runs, so that this script cannot rot between the rare times a GPU is lent.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from infra import cli
from infra.cli import need

PRESET_CONFIG = "config/gpt2_trunk_64e.py"


@dataclass
class GpuCheckConfig:
    dry: bool = False                   # tiny sizes on the CPU, CUDA-only parts skipped (what the tests run)
    steps: int = 100                    # train: optimizer steps of each run (compiled, eager)
    repeats: int = 3                    # timings: the median of this many rounds

    def __post_init__(self):
        need(self.steps >= 2, f"steps must be >= 2; got {self.steps}")
        need(self.repeats >= 1, f"repeats must be >= 1; got {self.repeats}")


class Skipped(Exception):
    """A part that cannot run here (it needs CUDA, or a package this machine lacks)."""


def run_part(name, fn):
    """(name, status, what it measured or why not, seconds): a part's failure is reported, not raised."""
    start = time.time()
    try:
        status, result = "ok", fn()
    except Skipped as e:
        status, result = "skipped", str(e)
    except Exception as e:  # (the point of the guard: any failure of one part leaves the others to run)
        status, result = "FAILED", f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    return name, status, result, time.time() - start


def cuda_only(cfg, what):
    if cfg.dry:
        raise Skipped(f"needs CUDA ({what})")


def check_tests(cfg):
    cuda_only(cfg, "on a CPU the suite runs these tests' cpu variants")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda",
                          "tests/test_attention.py", "tests/test_model.py"], capture_output=True, text=True)
    last = (out.stdout.strip().splitlines() or ["(no output)"])[-1]
    if out.returncode != 0:
        raise RuntimeError(f"pytest exit {out.returncode}: {last} {out.stderr.strip()[-200:]}")
    return last


def stages_arg(steps, seq_len, batch_size):
    stage = {"name": "check", "mixture": {"shakespeare": 0.5, "code": 0.5}, "steps": steps, "seq_len": seq_len,
             "batch_size": batch_size, "warmup": max(1, steps // 10)}
    return f"--stages=[{stage!r}]"


def preset_args(cfg, steps, out_dir):
    """train.py's arguments for the GPU preset (the tiny_8x64 shape in a dry run), one short stage."""
    shape = ["--preset=tiny_8x64", "--block_size=128", stages_arg(steps, 64, 2)] if cfg.dry else \
        [stages_arg(steps, 1024, 8)]
    return [PRESET_CONFIG, *shape, f"--out_dir={out_dir}", "--samples=False", "--plots=False", "--log_interval=1",
            f"--eval_interval={steps}", f"--ckpt_interval={steps}", "--eval_iters=2", "--arith_per_level=0"]


def train_once(cfg, compile_, out_dir):
    """(train records, peak GiB) of one in-process run of train.py's Trainer."""
    import train
    from infra.plot import read_metrics
    train_cfg, model_cfg, tokenizer = train.load_config(preset_args(cfg, cfg.steps, out_dir) +
                                                        [f"--compile={compile_}"])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    code = train.Trainer(train_cfg, model_cfg, tokenizer).run()
    if code != 0:
        raise RuntimeError(f"the run exited {code}")
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None
    return [r for r in read_metrics(out_dir) if r["kind"] == "train"], peak


def check_train(cfg):
    work = tempfile.mkdtemp(prefix="gpu-check-train-")
    try:
        runs = {"eager": train_once(cfg, False, os.path.join(work, "eager"))}
        if not cfg.dry:  # (inductor on a CPU compiles for minutes: the suite tests compile with aot_eager)
            runs["compiled"] = train_once(cfg, True, os.path.join(work, "compiled"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    parts = []
    for name, (records, peak) in runs.items():
        later = records[len(records) // 5:]  # (past warmup and the first steps' compilation)
        tok_s = sorted(r["tok_s"] for r in later)[len(later) // 2]
        mfu = sorted(r["mfu"] for r in later)[len(later) // 2] if later[0]["mfu"] is not None else None
        parts.append(f"{name}: {tok_s:,.0f} tokens/s, MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}, peak "
                     f"{'n/a' if peak is None else f'{peak:.1f} GiB'}, loss {records[0]['loss']:.3f} -> "
                     f"{records[-1]['loss']:.3f}")
    if "compiled" in runs:
        pairs = zip(runs["eager"][0], runs["compiled"][0])
        diff = max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in pairs)
        parts.append(f"compiled vs eager loss: max relative difference {diff:.1e} over {cfg.steps} steps")
    return "; ".join(parts)


def check_attention(cfg):
    """FlexAttention (what a local layer runs on CUDA) against one SDPA call with the sliding-window mask; in a
    dry run the CPU's blocked kernel stands in for FlexAttention, which has no CPU backward."""
    from attention import causal_attention
    from tools.bench import timed
    device = "cpu" if cfg.dry else "cuda"
    dtype = torch.float32 if cfg.dry else torch.bfloat16
    heads, head_dim, window = (2, 32, 64) if cfg.dry else (8, 128, 4096)
    lengths = (256, 512) if cfg.dry else (4096, 16384, 65536)
    rows = []
    for T in lengths:
        q, k, v = (torch.randn(1, heads, T, head_dim, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        i = torch.arange(T, device=device)
        mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)  # (T, T): what SDPA needs

        def local():
            causal_attention(q, k, v, window).float().sum().backward()

        def sdpa():
            torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).float().sum().backward()

        t = timed({"local": local, "sdpa": sdpa}, cfg.repeats, device)
        rows.append(f"T={T}: {1000 * t['local']:.1f} vs {1000 * t['sdpa']:.1f} ms ({t['sdpa'] / t['local']:.1f}x)")
    kernel = "blocked (CPU)" if cfg.dry else "FlexAttention"
    return f"{kernel} vs masked SDPA, {heads} heads of {head_dim}, window {window}, fwd+bwd: " + "; ".join(rows)


def check_experts(cfg):
    from tools.bench import bench_moe
    device = "cpu" if cfg.dry else "cuda"
    moe = bench_moe(SimpleNamespace(device=device, repeats=cfg.repeats), torch.float32 if cfg.dry else torch.bfloat16)
    return (f"grouped GEMM / expert loop time {moe['grouped_vs_loop']:.2f}x ({moe['tokens']} tokens, "
            f"{moe['experts']} experts, top-2); the model's default path here: {moe['path_taken']}")


def check_decode(cfg):
    from tools.bench import bench_decode_layouts
    device = "cpu" if cfg.dry else "cuda"
    context = 256 if cfg.dry else 8192
    rows = bench_decode_layouts(SimpleNamespace(device=device, repeats=cfg.repeats), contexts=(context,),
                                new_tokens=16 if cfg.dry else 64)
    speed = {r["layout"]: r["decode_tokens_per_s"] for r in rows}
    return (f"after {context} tokens: hybrid {speed['hybrid']:,.0f}, all-global {speed['all_global']:,.0f} tokens/s "
            f"({speed['hybrid'] / speed['all_global']:.2f}x)")


def check_serving(cfg):
    from tools.bench_serving import ServingConfig, models, serve
    from engine import Engine, Request
    from model import kv_cache_bytes
    device = "cpu" if cfg.dry else "cuda"
    context, n = (256, 4) if cfg.dry else (4096, 16)
    bench = ServingConfig(context_1=context, contexts=[context], n_embd=64 if cfg.dry else 512)
    nets = models(bench, device)
    dtype = torch.float32 if cfg.dry else torch.bfloat16
    budget = 4 * kv_cache_bytes(nets["all-global MoE"].config, context, dtype)  # (4 all-global rows; n requests)
    got = {name: serve(nets[name], budget, context, n, bench.new_tokens) for name in ("hybrid MoE", "all-global MoE")}
    model, prompt = nets["hybrid MoE"], list(range(1, 200))  # greedy: the engine's rows against generate alone
    served = {r.index: r.tokens for r in Engine(model, budget, max_len=260).serve([Request(prompt[i:], 48)
                                                                                  for i in range(4)])}
    with torch.autocast(device, dtype=torch.bfloat16, enabled=not cfg.dry):
        alone = [model.generate(torch.tensor([prompt[i:]], device=device), 48, temperature=0)[0, 199 - i:].tolist()
                 for i in range(4)]
    same = sum(a == b for i in range(4) for a, b in zip(served[i], alone[i]))
    (h_rows, h_tok, h_e2e, _), (g_rows, g_tok, g_e2e, _) = got.values()
    return (f"{n} x {context}: hybrid {h_rows} rows {h_tok:,.0f} decode tokens/s ({h_e2e:,.0f} end to end), "
            f"all-global {g_rows} rows {g_tok:,.0f} ({g_e2e:,.0f}): {h_tok / g_tok:.2f}x decode, {h_e2e / g_e2e:.2f}x "
            f"end to end; greedy tokens equal to generate's: {same}/{4 * 48}")


def check_torchrun(cfg):
    work = tempfile.mkdtemp(prefix="gpu-check-torchrun-")
    try:
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                              "train.py", *preset_args(cfg, 3 if cfg.dry else 20, work), "--compile=False"],
                             capture_output=True, text=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if out.returncode != 0 or "run complete" not in out.stdout:
        raise RuntimeError(f"exit {out.returncode}: {(out.stderr.strip().splitlines() or [''])[-1][:300]}")
    backend = "gloo" if cfg.dry else "nccl"
    return f"{backend}, 1 rank: {re.search(r'run complete: [^.]*', out.stdout).group(0)}"


def machine():
    if not torch.cuda.is_available():
        return f"torch {torch.__version__}, Python {sys.version.split()[0]}, no CUDA GPU"
    props = torch.cuda.get_device_properties(0)
    return (f"torch {torch.__version__} (CUDA {torch.version.cuda}), Python {sys.version.split()[0]}, {props.name}, "
            f"compute capability {props.major}.{props.minor}, {props.total_memory / 2 ** 30:.0f} GiB")


def main(argv):
    cfg, = cli.load(argv, GpuCheckConfig)
    if not cfg.dry and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run with --dry=True for the CPU's tiny version of every part")
    subprocess.run([sys.executable, os.path.join("data", "prepare.py")], check=True, stdout=subprocess.DEVNULL)
    print(machine() + (" (dry run: tiny sizes)" if cfg.dry else ""))
    parts = [("tests", check_tests), ("train", check_train), ("attention", check_attention),
             ("experts", check_experts), ("decode", check_decode), ("serving", check_serving),
             ("torchrun", check_torchrun)]
    rows = []
    for name, fn in parts:
        rows.append(run_part(name, lambda fn=fn: fn(cfg)))
        print(f"[{name}] {rows[-1][1]} in {rows[-1][3]:.0f} s", flush=True)
    print("\n| part | status | result | seconds |\n|---|---|---|---|")
    for name, status, result, seconds in rows:
        print(f"| {name} | {status} | {result} | {seconds:.0f} |")
    return 1 if any(status == "FAILED" for _, status, _, _ in rows) else 0


if __name__ == "__main__":
    cli.run(main)
