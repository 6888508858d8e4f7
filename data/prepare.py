"""Prepare every offline corpus (shakespeare_char, shakespeare, code, arith) that is not prepared yet.
Run: python data/prepare.py [--force]"""
import os
import runpy
import sys

here = os.path.dirname(os.path.abspath(__file__))
force = "--force" in sys.argv
for name in ("shakespeare_char", "shakespeare", "code", "arith"):
    if force or not os.path.isfile(os.path.join(here, name, "meta.json")):
        script = os.path.join(here, name, "prepare.py")
        sys.argv = [script]  # each script reads its own (default) arguments
        runpy.run_path(script, run_name="__main__")
    else:
        print(f"{name}: already prepared")
