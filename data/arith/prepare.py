"""Synthetic arithmetic of graded difficulty, GPT-2 BPE: problems like "482+37=519", one per document.

Operations +, - and *; each operand has 1 to --max_digits digits, drawn so that every difficulty (the larger
operand's digit count) is equally common. val_problems.jsonl lists every val problem with its prompt, answer,
operation and difficulty, so a run can measure exact-match accuracy by difficulty and look at how many experts
the router gives the harder ones. Run: python data/arith/prepare.py [--max_digits=4] [--n_train=120000]"""
import dataclasses
import json
import os
import random
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import cli  # noqa: E402
from data.corpus import GPT2_EOT, corpus_dir, gpt2_encoding, write_corpus  # noqa: E402


@dataclass
class ArithConfig:
    max_digits: int = 4              # operands have 1 to max_digits digits
    n_train: int = 120_000           # train problems
    n_val: int = 2_000               # val problems
    seed: int = 1337                 # seeds the problem generator


try:
    settings = dataclasses.asdict(cli.build(ArithConfig, cli.parse(sys.argv[1:], ArithConfig, allow_file=False)))
except cli.ConfigError as e:
    sys.exit(f"argument error: {e}")


def problem(rng, max_digits):
    """One problem: (prompt, answer, op, difficulty). difficulty = digits of the longer operand."""
    difficulty = rng.randint(1, max_digits)
    other = rng.randint(1, difficulty)
    digits = [difficulty, other] if rng.random() < 0.5 else [other, difficulty]
    a, b = (rng.randint(0 if d == 1 else 10 ** (d - 1), 10 ** d - 1) for d in digits)
    op = rng.choice("+-*")
    answer = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"{a}{op}{b}=", str(answer), op, difficulty


rng = random.Random(settings["seed"])
enc = gpt2_encoding()
splits = {}
for split, n in (("train", settings["n_train"]), ("val", settings["n_val"])):
    problems = [problem(rng, settings["max_digits"]) for _ in range(n)]
    ids = []
    for prompt, answer, _, _ in problems:
        ids += enc.encode_ordinary(prompt + answer) + [GPT2_EOT]
    splits[split] = (ids, problems)

write_corpus("arith", splits["train"][0], splits["val"][0],
             {"tokenizer": "gpt2", "vocab_size": enc.n_vocab, **settings})
with open(os.path.join(corpus_dir("arith"), "val_problems.jsonl"), "w") as f:
    for prompt, answer, op, difficulty in splits["val"][1]:
        f.write(json.dumps({"prompt": prompt, "answer": answer, "op": op, "difficulty": difficulty}) + "\n")
