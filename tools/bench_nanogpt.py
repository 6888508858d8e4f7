"""
This project against nanoGPT on nanoGPT's own CPU recipe, side by side on one machine, in one command:

    git clone https://github.com/karpathy/nanoGPT /tmp/nanoGPT && git -C /tmp/nanoGPT checkout 3adf61e
    python -m tools.bench_nanogpt --nanogpt=/tmp/nanoGPT

nanoGPT trains its shakespeare_char recipe for CPUs (4 layers, 4 heads, 128 wide, block 64, batch 12, 2,000
steps, eager fp32: the command in its README), then this project trains config/shakespeare_char.py (the same
shape and schedule, made hybrid and top-p MoE), one after the other, never at once: two heavy jobs on one machine
slow each other. Both read the same text (data/shakespeare/input.txt, split 90/10 as nanoGPT's prepare.py does).
Then both trained models decode 500 tokens from one, batch 1, taking turns in this process: nanoGPT's `generate`
(which crops the context to the block and re-runs it at every token) against ours with the KV cache. It prints
one table of both sides and their ratios.

The nanoGPT checkout is copied to a scratch folder and never written to; nothing of it is part of this project.
"""

import hashlib
import importlib.util
import json
import os
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from infra import cli
from infra.cli import need
from infra.checkpoint import load_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
RECIPE = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
          "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128",
          "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]  # nanoGPT's README, "I only have a macbook"
NEEDED = ("train.py", "model.py", "configurator.py", "config/train_shakespeare_char.py")


@dataclass
class CompareConfig:
    nanogpt: str = ""                   # a nanoGPT checkout (the figures in docs/results.md used commit 3adf61e)
    work_dir: str = ""                  # scratch folder for both runs; empty: a new temporary folder
    decode_tokens: int = 500            # tokens each model decodes from one, batch 1
    rounds: int = 4                     # timed decoding rounds (after one warm-up round); the median is reported

    def __post_init__(self):
        missing = [f for f in NEEDED if not os.path.isfile(os.path.join(self.nanogpt, f))]
        lacks = f"; {self.nanogpt} lacks {', '.join(missing)}" if self.nanogpt else ""
        need(self.nanogpt and not missing,
             f"--nanogpt must name a nanoGPT checkout (git clone https://github.com/karpathy/nanoGPT){lacks}")
        need(not (self.work_dir and os.path.exists(self.work_dir)),
             f"work_dir {self.work_dir} exists: name a new folder (or none, for a temporary one)")
        for name in ("decode_tokens", "rounds"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1; got {getattr(self, name)}")


def git_blob(path):
    """The id git gives a file's contents: matches `git rev-parse COMMIT:train.py` for the commit it came from."""
    with open(path, "rb") as f:
        data = f.read()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def write_nanogpt_data(folder):
    """nanoGPT's data/shakespeare_char files from our copy of the text: ids of the sorted characters, the first
    90% for train, the rest for val, and meta.pkl with the alphabet (what its prepare.py writes)."""
    with open(os.path.join(ROOT, "data", "shakespeare", "input.txt")) as f:
        text = f.read()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = int(0.9 * len(ids))
    os.makedirs(folder)
    ids[:n].tofile(os.path.join(folder, "train.bin"))
    ids[n:].tofile(os.path.join(folder, "val.bin"))
    with open(os.path.join(folder, "meta.pkl"), "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)


def run_timed(args, cwd, log):
    """Run args in cwd with output to log; wall seconds, or SystemExit naming the log if it failed."""
    start = time.time()
    with open(log, "w") as f:
        code = subprocess.run(args, cwd=cwd, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"{' '.join(args[:2])} in {cwd} failed (exit {code}); its output is in {log}")
    return time.time() - start


def nanogpt_numbers(log):
    """(final val loss, median step ms) from nanoGPT's log lines "step N: train X, val Y" and "iter N: ... time Tms"."""
    text = open(log).read()
    vals = [float(v) for v in re.findall(r"val loss ([0-9.]+)", text)]
    steps = [float(t) for t in re.findall(r"^iter \d+: loss [0-9.]+, time ([0-9.]+)ms", text, flags=re.M)]
    return vals[-1], statistics.median(steps)


def our_numbers(out_dir, target):
    """(final shakespeare val loss, median step ms, wall_s of the first evaluation at or below target or None)."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    evals = [r for r in records if r["kind"] == "eval"]
    steps = [1000 * r["batch_size"] * r["seq_len"] / r["tok_s"] for r in records if r["kind"] == "train"]
    reached = next((r["wall_s"] for r in evals if r["val"]["shakespeare"] <= target), None)
    return evals[-1]["val"]["shakespeare"], statistics.median(steps), reached


def nanogpt_model(work):
    """nanoGPT's trained model from work/out/ckpt.pt, through its own model.py (loaded under another name, as
    ours is also called model)."""
    spec = importlib.util.spec_from_file_location("nanogpt_model", os.path.join(work, "model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ckpt = torch.load(os.path.join(work, "out", "ckpt.pt"), map_location="cpu", weights_only=False)  # (made here)
    model = module.GPT(module.GPTConfig(**ckpt["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    return model.eval()


@torch.no_grad()
def decoding(decoders, tokens, rounds):
    """{name: median tokens/s}: the decoders take turns, after one warm-up round."""
    times = {name: [] for name in decoders}
    for r in range(rounds + 1):
        for name, decode in decoders.items():
            start = time.perf_counter()
            decode(tokens)
            if r > 0:
                times[name].append(time.perf_counter() - start)
    return {name: tokens / statistics.median(t) for name, t in times.items()}


def main(argv):
    cfg, = cli.load(argv, CompareConfig)
    blobs = {f: git_blob(os.path.join(cfg.nanogpt, f)) for f in ("train.py", "model.py")}
    work = cfg.work_dir or tempfile.mkdtemp(prefix="nanogpt-compare-")
    shutil.copytree(cfg.nanogpt, work, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".git", "out*", "data"))
    write_nanogpt_data(os.path.join(work, "data", "shakespeare_char"))
    print(f"nanoGPT from {cfg.nanogpt} (git blobs: train.py {blobs['train.py'][:10]}, model.py "
          f"{blobs['model.py'][:10]}), torch {torch.__version__}, {os.cpu_count()} CPUs; logs in {work}")
    t_nano = run_timed([sys.executable, "train.py", *RECIPE, f"--out_dir={work}/out"], work, f"{work}/nanogpt.log")
    val_nano, step_nano = nanogpt_numbers(f"{work}/nanogpt.log")
    ours_dir = os.path.join(work, "ours")
    t_ours = run_timed([sys.executable, "train.py", "config/shakespeare_char.py", f"--out_dir={ours_dir}",
                    "--samples=False", "--plots=False"], ROOT, f"{work}/ours.log")
    val_ours, step_ours, reached = our_numbers(ours_dir, val_nano)

    ours, _ = load_run(ours_dir)
    theirs = nanogpt_model(work)
    one = torch.zeros(1, 1, dtype=torch.long)
    speeds = decoding({"nanoGPT generate": lambda n: theirs.generate(one, n, top_k=1),
                       "ours": lambda n: ours.generate(one, n, top_k=1)},
                      cfg.decode_tokens, cfg.rounds)

    rows = [("median step (ms)", f"{step_nano:.1f}", f"{step_ours:.1f}", f"{step_ours / step_nano:.2f}x"),
            ("whole run, wall (s)", f"{t_nano:.0f}", f"{t_ours:.0f}", f"{t_ours / t_nano:.2f}x"),
            ("final val loss (nats/char)", f"{val_nano:.4f}", f"{val_ours:.4f}", ""),
            (f"time to val {val_nano:.3f} (s)", f"{t_nano:.0f}", "not reached" if reached is None else
             f"{reached:.0f}", "" if reached is None else f"{reached / t_nano:.2f}x")]
    tok_nano, tok_ours = speeds["nanoGPT generate"], speeds["ours"]
    rows.append(("decode tokens/s", f"{tok_nano:,.0f}", f"{tok_ours:,.0f}", f"{tok_ours / tok_nano:.2f}x"))
    print("\n| what | nanoGPT | ours | ours / nanoGPT |\n|---|---|---|---|")
    print("\n".join(f"| {' | '.join(row)} |" for row in rows))


if __name__ == "__main__":
    cli.run(main)
