"""
Sample from a trained run, streaming tokens as the KV cache produces them.

    python sample.py --out_dir=out/default --start="ROMEO:" --num_samples=2 --max_new_tokens=200
    python sample.py --out_dir=out/default --start=FILE:prompt.txt --temperature=0.8 --top_p=0.9

Loads out_dir/ckpt.pt (or best.pt with --checkpoint=best), rebuilds the model and the run's tokenizer, and
prints tokens/s and the KV cache's size at the end.
"""

import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

import cli
from data.corpus import Tokenizer
from model import GPT, GPTConfig


@dataclass
class SampleConfig:
    out_dir: str = "out/default"        # the run directory train.py wrote
    checkpoint: str = "ckpt"            # "ckpt" (latest) or "best" (lowest mean val loss)
    start: str = "\n"                   # prompt text, or FILE:path to read it from a file
    num_samples: int = 1                # samples to draw, one after another
    max_new_tokens: int = 200           # tokens to generate per sample
    temperature: float = 0.8            # 0 is greedy; higher is more random
    top_k: Optional[int] = None         # sample only among the k most likely tokens
    top_p: Optional[float] = None       # sample only among the smallest set of tokens whose probability reaches p
    seed: int = 1337                    # seeds the sampling
    device: str = "auto"                # "auto" (cuda if available), "cpu", "cuda", ...


def load_run(out_dir, which="ckpt", device="cpu"):
    """(model, tokenizer) from a run directory, or SystemExit with a message that says what is wrong. The
    model routes as it last trained: its router settings travel in its state dict."""
    path = os.path.join(out_dir, f"{which}.pt")
    if not os.path.isfile(path):
        runs = sorted(d for d in os.listdir("out") if os.path.isdir(os.path.join("out", d))) \
            if os.path.isdir("out") else []
        raise SystemExit(f"no checkpoint at {path}. Run directories here: {', '.join(runs) or 'none'} "
                         f"(train one with: python train.py config/default.py)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # data only: no code runs
        config = GPTConfig(**ckpt["model_config"])
        meta = ckpt["meta"]
    except Exception as e:
        raise SystemExit(f"cannot read {path} as a checkpoint ({type(e).__name__}: {e})")
    tokenizer = Tokenizer(meta)
    if tokenizer.vocab_size > config.vocab_size:
        raise SystemExit(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{config.vocab_size}: the checkpoint and its data do not match")
    model = GPT(config, verbose=False)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise SystemExit(f"{path}: the weights do not match the config stored with them:\n{e}")
    return model.to(device).eval(), tokenizer


def main(argv):
    try:
        cfg = cli.build(SampleConfig, cli.parse(argv, SampleConfig, allow_file=False))
    except cli.ConfigError as e:
        raise SystemExit(f"argument error: {e}")
    if cfg.checkpoint not in ("ckpt", "best"):
        raise SystemExit(f"--checkpoint must be ckpt or best; got {cfg.checkpoint!r}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_run(cfg.out_dir, cfg.checkpoint, device)

    start = cfg.start
    if start.startswith("FILE:"):
        with open(start[5:], encoding="utf-8") as f:
            start = f.read()
    prompt = tokenizer.encode(start)
    if tokenizer.eot is not None:
        prompt = [tokenizer.eot] + prompt  # documents begin after an end-of-text token in training
    idx = torch.tensor([prompt], device=device)

    for n in range(cfg.num_samples):
        print(f"--- sample {n + 1}/{cfg.num_samples} ---")
        print(start, end="", flush=True)
        generated = []

        def stream(token):
            # Decode the whole continuation each time so multi-token characters print correctly.
            before = tokenizer.decode(generated)
            generated.append(token[0, 0].item())
            print(tokenizer.decode(generated)[len(before):], end="", flush=True)

        cache = model.make_cache(1, len(prompt) + cfg.max_new_tokens)
        t0 = time.time()
        model.generate(idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, cache=cache, on_token=stream)
        dt = time.time() - t0
        print(f"\n--- {cfg.max_new_tokens} tokens in {dt:.2f}s ({cfg.max_new_tokens / dt:.1f} tokens/s), "
              f"KV cache {cache.nbytes() / 1024:.1f} KiB for {cache.max_len} positions ---")


if __name__ == "__main__":
    main(sys.argv[1:])
