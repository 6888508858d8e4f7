"""Python source from the local standard library (present on every machine).

Files are taken in sorted path order (tests and vendored packages skipped) until --max_bytes; each file is one
document; every 10th file goes to val. Deterministic for a given Python.
Run: python data/code/prepare.py [--max_bytes=3000000] [--tokenizer=all|byte|gpt2]"""
import os
import sys
import sysconfig
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from infra import cli  # noqa: E402
from data.corpus import PrepareConfig, Tokenizer, tokenizer_names, write_corpus  # noqa: E402


@dataclass
class CodeConfig:
    max_bytes: int = 3_000_000       # stop adding source files after this many bytes


code, prepare = cli.load(sys.argv[1:], CodeConfig, PrepareConfig)
max_bytes, choice = code.max_bytes, prepare.tokenizer

stdlib = sysconfig.get_paths()["stdlib"]
skip = {"test", "tests", "idlelib", "site-packages", "lib2to3", "ensurepip", "__pycache__", "turtledemo"}
paths = []
for root, dirs, files in os.walk(stdlib):
    dirs[:] = sorted(d for d in dirs if d not in skip)
    paths += [os.path.join(root, f) for f in sorted(files) if f.endswith(".py")]
paths.sort()

train, val, total = [], [], 0
for i, path in enumerate(paths):
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    (val if i % 10 == 9 else train).append(text)
    total += len(text)
    if total >= max_bytes:
        break
if not train or not val:
    sys.exit(f"found too little Python source under {stdlib} to build the code corpus")
for name in tokenizer_names(choice, ("byte", "gpt2"), "code"):
    write_corpus("code", Tokenizer(name), train, val, {"source": stdlib, "files": len(train) + len(val)})
