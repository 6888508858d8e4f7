"""tiny-shakespeare with the GPT-2 BPE (the text lives in data/shakespeare_char/input.txt): about 338K tokens,
first 90% train, last 10% val. Run: python data/shakespeare/prepare.py"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import cli  # noqa: E402

from data.corpus import GPT2_EOT, corpus_dir, gpt2_encoding, write_corpus  # noqa: E402

try:
    cli.parse(sys.argv[1:], allow_file=False)  # no settings: --help says so, anything else is an error
except cli.ConfigError as e:
    sys.exit(f"argument error: {e}")

with open(os.path.join(corpus_dir("shakespeare_char"), "input.txt"), encoding="utf-8") as f:
    text = f.read()
n = int(0.9 * len(text))
enc = gpt2_encoding()
train, val = enc.encode_ordinary(text[:n]) + [GPT2_EOT], enc.encode_ordinary(text[n:]) + [GPT2_EOT]
write_corpus("shakespeare", train, val, {"tokenizer": "gpt2", "vocab_size": enc.n_vocab})
