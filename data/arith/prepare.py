"""Synthetic arithmetic in graded levels, one problem per document: "48+7=55", "3-12=-9", "27*14=378".

    level  problems                                         train share   val
    1      a+b, a-b, both operands of one digit (200 in all)   10%        the same 200 as train: too few to hold out
    2      + and -, the longer operand of 2 digits              55%        held out from train
    3      + and -, the longer operand of 3 digits              15%        held out from train
    4      + and -, the longer operand of 4 digits               5%        held out from train
    5      a*b, the longer operand of 2 digits                  15%        held out from train

The other operand has 1 to `level` digits, either may come first, and differences may be negative. From level
2 up, one problem string in 8 (by a hash of the string) is val-only: train never contains it, so val accuracy
measures what generalises, not what was memorised. Levels 1-2 are learnable by a small CPU model in minutes;
3-5 stay hard. val_problems.jsonl lists each val problem with its answer, operation and level ("difficulty"),
so runs can score exact match per level and per operation, and study how many experts each level gets.
Run: python data/arith/prepare.py [--n_train=200000] [--n_val=400] [--tokenizer=all|byte|gpt2]"""
import json
import os
import random
import sys
import zlib
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from infra import cli  # noqa: E402
from data.corpus import DATA_DIR, PrepareConfig, Tokenizer, tokenizer_names, write_corpus  # noqa: E402

LEVELS = {1: ("+-", 0.10), 2: ("+-", 0.55), 3: ("+-", 0.15), 4: ("+-", 0.05), 5: ("*", 0.15)}


@dataclass
class ArithConfig:
    n_train: int = 200_000           # train problems, drawn with the level shares above
    n_val: int = 400                 # val problems per level (level 1 has only 200 distinct ones)
    seed: int = 1337                 # seeds the problem generator


def held_out(prompt, level):
    """Whether this problem belongs to val only (never to train)."""
    return level > 1 and zlib.crc32(prompt.encode()) % 8 == 0


def problem(rng, level):
    """(prompt, answer, op): the longer operand has `digits` digits, the other 1 to `digits`."""
    ops, _ = LEVELS[level]
    digits = 2 if level == 5 else level
    lengths = [digits, rng.randint(1, digits)]
    rng.shuffle(lengths)
    a, b = (rng.randint(0 if n == 1 else 10 ** (n - 1), 10 ** n - 1) for n in lengths)
    op = rng.choice(ops)
    return f"{a}{op}{b}=", str({"+": a + b, "-": a - b, "*": a * b}[op]), op


def train_problems(rng, n):
    levels = rng.choices(list(LEVELS), weights=[share for _, share in LEVELS.values()], k=n)
    out = []
    for level in levels:
        while held_out((p := problem(rng, level))[0], level):
            pass
        out.append(p)
    return out


def val_problems(rng, n_per_level):
    out = []
    for level in LEVELS:
        seen = {}
        for _ in range(200 * n_per_level):  # level 1 runs out of distinct problems at 200
            prompt, answer, op = problem(rng, level)
            if level == 1 or held_out(prompt, level):
                seen.setdefault(prompt, {"prompt": prompt, "answer": answer, "op": op, "difficulty": level})
            if len(seen) == n_per_level:
                break
        out += seen.values()
    return out


def main(argv):
    cfg, prepare = cli.load(argv, ArithConfig, PrepareConfig)
    choice = prepare.tokenizer
    rng = random.Random(cfg.seed)
    train = ["".join(p[:2]) for p in train_problems(rng, cfg.n_train)]
    val = val_problems(rng, cfg.n_val)
    for name in tokenizer_names(choice, ("byte", "gpt2"), "arith"):
        write_corpus("arith", Tokenizer(name), train, [p["prompt"] + p["answer"] for p in val],
                     {"n_train": cfg.n_train, "n_val": cfg.n_val, "seed": cfg.seed})
    with open(os.path.join(DATA_DIR, "arith", "val_problems.jsonl"), "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in val)


if __name__ == "__main__":
    main(sys.argv[1:])
