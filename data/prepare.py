"""Prepare every offline corpus (shakespeare, code, arith, recall) in every tokenization it supports, unless it
is prepared already. Run: python data/prepare.py [--force]"""
import os
import runpy
import sys
from dataclasses import dataclass

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(here))
from infra import cli  # noqa: E402


@dataclass
class PrepareAllConfig:
    force: bool = False              # prepare again even the corpora that are prepared already


force = cli.load(sys.argv[1:], PrepareAllConfig)[0].force
PREPARED_FOR = {"shakespeare": ("byte", "gpt2"), "code": ("byte", "gpt2"), "arith": ("byte", "gpt2"),
                "recall": ("byte",)}  # (the tokenizations it checks for; recall's gaps are counted in bytes)
for name, tokenizers in PREPARED_FOR.items():
    if force or not all(os.path.isfile(os.path.join(here, name, t, "meta.json")) for t in tokenizers):
        script = os.path.join(here, name, "prepare.py")
        sys.argv = [script]  # each script's defaults: every tokenizer it supports
        runpy.run_path(script, run_name="__main__")
    else:
        print(f"{name}: already prepared")
