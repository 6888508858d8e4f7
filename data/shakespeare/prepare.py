"""tiny-shakespeare (1.1M characters, nanoGPT's lecture corpus): the first 90% is train, the last 10% val.
Tokenizations: byte, gpt2 (about 338K tokens) and char (nanoGPT's shakespeare_char: the text's 65 characters).
Run: python data/shakespeare/prepare.py [--tokenizer=all|byte|gpt2|char]"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from infra import cli  # noqa: E402
from data.corpus import DATA_DIR, PrepareConfig, Tokenizer, tokenizer_names, write_corpus  # noqa: E402

choice = cli.load(sys.argv[1:], PrepareConfig)[0].tokenizer
with open(os.path.join(DATA_DIR, "shakespeare", "input.txt"), encoding="utf-8") as f:
    text = f.read()
n = int(0.9 * len(text))
for name in tokenizer_names(choice, ("byte", "gpt2", "char"), "shakespeare"):
    write_corpus("shakespeare", Tokenizer(name, chars=sorted(set(text))), [text[:n]], [text[n:]])
