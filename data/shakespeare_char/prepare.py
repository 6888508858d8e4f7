"""tiny-shakespeare at character level, nanoGPT's lecture corpus: 65 characters, first 90% train, last 10% val.
Run: python data/shakespeare_char/prepare.py"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import cli  # noqa: E402

from data.corpus import corpus_dir, write_corpus  # noqa: E402

try:
    cli.parse(sys.argv[1:], allow_file=False)  # no settings: --help says so, anything else is an error
except cli.ConfigError as e:
    sys.exit(f"argument error: {e}")

with open(os.path.join(corpus_dir("shakespeare_char"), "input.txt"), encoding="utf-8") as f:
    text = f.read()
chars = sorted(set(text))
stoi = {ch: i for i, ch in enumerate(chars)}
ids = [stoi[ch] for ch in text]
n = int(0.9 * len(ids))
write_corpus("shakespeare_char", ids[:n], ids[n:], {"tokenizer": "char", "vocab_size": len(chars), "chars": chars})
