"""
Preparing your own corpus at scale, measured: data/text/prepare.py on a generated JSONL corpus, side by side with
tiktoken's own batch encoding of the same text in one process.

    python -m tools.bench_data                       # 100 MiB and 1 GiB, 1 and 2 workers, GPT-2 tokens (minutes)
    python -m tools.bench_data --sizes_mib=[20] --workers=[1]

For each corpus size it writes a JSONL file of documents (Shakespeare's lines, shuffled, 200 to 4,000 bytes each),
then times the prepare command with each worker count while sampling the resident memory of its whole process tree
(the main process and its workers) every 50 ms, and times tiktoken's encode_ordinary_batch over the same documents
in this process (its own threads, as many as the cores). Everything it writes goes to --work (removed at the end).
"""

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from infra import cli
from infra.cli import need


@dataclass
class DataBenchConfig:
    sizes_mib: list = field(default_factory=lambda: [100, 1024])  # corpus sizes to generate and prepare
    workers: list = field(default_factory=lambda: [1, 2])          # worker counts to prepare each with
    tokenizer: str = "gpt2"             # "gpt2" or "byte"
    work: str = ""                      # a folder for the corpora (default: a new temporary one)

    def __post_init__(self):
        for name in ("sizes_mib", "workers"):
            values = getattr(self, name)
            need(values and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values),
                 f"{name} must be a non-empty list of whole numbers >= 1; got {values!r}")
        need(self.tokenizer in ("gpt2", "byte"), f"tokenizer must be gpt2 or byte; got {self.tokenizer!r}")


def make_corpus(path, mib, seed=0):
    """A JSONL file of about mib MiB: documents of Shakespeare's lines, shuffled. Returns the number of documents."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    lines = open(os.path.join(here, "data", "shakespeare", "input.txt"), encoding="utf-8").read().splitlines()
    rng, size, n = random.Random(seed), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < mib * 2 ** 20:
            target, doc = rng.randint(200, 4000), []
            while sum(map(len, doc)) < target:
                doc.append(rng.choice(lines))
            line = json.dumps({"text": "\n".join(doc)}) + "\n"
            f.write(line)
            size, n = size + len(line.encode("utf-8")), n + 1
    return n


def tree_rss(pid):
    """Resident bytes of a process and its descendants (Linux /proc), 0 for any that ended meanwhile."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += int(next(line for line in f if line.startswith("VmRSS")).split()[1]) * 1024
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except (OSError, StopIteration, ValueError):
            pass
    return total


def timed_prepare(corpus, name, workers, tokenizer):
    """(seconds, peak resident bytes of the process tree, tokens written) of one prepare."""
    cmd = [sys.executable, "data/text/prepare.py", f"--name={name}", f"--tokenizer={tokenizer}",
           f"--workers={workers}", corpus]
    t0, peak = time.perf_counter(), 0
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.05)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed (exit {proc.returncode}): {proc.stderr.read().strip()[-300:]}")
    meta = json.load(open(os.path.join("data", name, tokenizer, "meta.json")))
    return seconds, peak, meta["train_tokens"] + meta["val_tokens"]


def tiktoken_speed(corpus, tokenizer):
    """(tokens, seconds) of tiktoken's encode_ordinary_batch over the corpus's documents, in this process."""
    from data.corpus import Tokenizer
    texts = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
    tok = Tokenizer(tokenizer)
    t0 = time.perf_counter()
    if tokenizer == "gpt2":
        tokens = sum(map(len, tok.enc.encode_ordinary_batch(texts)))
    else:
        tokens = sum(len(tok.encode(t)) for t in texts)
    return tokens + len(texts), time.perf_counter() - t0  # (+ one end-of-text per document, as the prepare writes)


def main(argv):
    cfg, = cli.load(argv, DataBenchConfig)
    os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    work = cfg.work or tempfile.mkdtemp(prefix="bench-data-")
    os.makedirs(work, exist_ok=True)
    print(f"bench_data: {cfg.tokenizer} tokens, {os.cpu_count()} cores; peak RSS of the prepare's process tree")
    rows = []
    try:
        for mib in cfg.sizes_mib:
            corpus = os.path.join(work, f"corpus_{mib}.jsonl")
            docs = make_corpus(corpus, mib)
            tokens, seconds = tiktoken_speed(corpus, cfg.tokenizer)
            rows.append([f"{mib} MiB", f"{docs:,}", "tiktoken batch, in process", f"{seconds:.1f} s",
                         f"{tokens / seconds / 1e6:.2f}M", "-"])
            for workers in cfg.workers:
                name = f"bench_data_{mib}_{workers}"
                try:
                    s, peak, written = timed_prepare(corpus, name, workers, cfg.tokenizer)
                finally:
                    shutil.rmtree(os.path.join("data", name), ignore_errors=True)
                rows.append([f"{mib} MiB", f"{docs:,}", f"prepare.py, {workers} worker{'s' * (workers > 1)}",
                             f"{s:.1f} s", f"{written / s / 1e6:.2f}M", f"{peak / 2 ** 20:,.0f} MiB"])
    finally:
        if not cfg.work:
            shutil.rmtree(work, ignore_errors=True)
    header = ["corpus", "documents", "how", "time", "tokens/s", "peak RSS"]
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths]] + rows:
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    cli.run(main)
