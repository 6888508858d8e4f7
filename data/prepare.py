"""Prepare every offline corpus (shakespeare_char, shakespeare, code, arith) that is not prepared yet.
Run: python data/prepare.py [--force]"""
import os
import runpy
import sys
from dataclasses import dataclass

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(here))
import cli  # noqa: E402


@dataclass
class PrepareConfig:
    force: bool = False              # prepare again even the corpora that are prepared already


try:
    force = cli.build(PrepareConfig, cli.parse(sys.argv[1:], PrepareConfig, allow_file=False)).force
except cli.ConfigError as e:
    sys.exit(f"argument error: {e}")
for name in ("shakespeare_char", "shakespeare", "code", "arith"):
    if force or not os.path.isfile(os.path.join(here, name, "meta.json")):
        script = os.path.join(here, name, "prepare.py")
        sys.argv = [script]  # each script reads its own (default) arguments
        runpy.run_path(script, run_name="__main__")
    else:
        print(f"{name}: already prepared")
