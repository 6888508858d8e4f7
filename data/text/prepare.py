"""Your own data: tokenize text or JSONL files (or a FineWeb-Edu sample, with a network) into data/<name>/.

    python data/text/prepare.py --name=mydata notes.txt more/*.txt corpus.jsonl
    python data/text/prepare.py --name=fineweb --fineweb_docs=100000      # needs `pip install datasets`

Each .txt file is one document; each line of a .jsonl file is a document whose "text" field is read. Documents
end with the end-of-text token; every --val_every-th document goes to val (default 20). Written for every
tokenizer (byte and gpt2) unless --tokenizer names one."""
import json
import os
import sys
from dataclasses import dataclass
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from infra import cli  # noqa: E402
from data.corpus import DATA_DIR, PrepareConfig, Tokenizer, tokenizer_names, write_corpus  # noqa: E402


@dataclass
class TextConfig:
    name: str = ""                       # the corpus name: data/<name>/ (letters, digits and _)
    val_every: int = 20                  # every val_every-th document goes to val
    fineweb_docs: Optional[int] = None   # stream this many FineWeb-Edu documents instead of reading files
    overwrite: bool = False              # allow replacing one of the corpora this repository prepares itself


def documents_from_files(paths):
    for path in paths:
        if not os.path.isfile(path):
            sys.exit(f"no such file: {path}")
        with open(path, encoding="utf-8", errors="replace") as f:
            if path.endswith(".jsonl"):
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            text = json.loads(line)["text"]
                        except (json.JSONDecodeError, KeyError, TypeError):
                            text = None
                        if not isinstance(text, str):
                            sys.exit(f"{path}:{n}: expected a JSON object with a \"text\" field holding a string")
                        yield text
            else:
                yield f.read()


def documents_from_fineweb(n_docs):
    try:
        from datasets import load_dataset
    except ImportError:
        sys.exit("the FineWeb-Edu path needs the `datasets` package: pip install datasets")
    try:
        stream = load_dataset("HuggingFaceFW/fineweb-edu", name="sample-10BT", split="train", streaming=True)
        for i, row in enumerate(stream):
            if i >= n_docs:
                break
            yield row["text"]
    except Exception as e:  # the hub raises many types; all mean the same thing to a user here
        sys.exit(f"could not stream FineWeb-Edu from the Hugging Face hub ({type(e).__name__}: {e}); "
                 f"this needs a network. Offline, pass local .txt/.jsonl files instead.")


def main(argv):
    files = [arg for arg in argv if not arg.startswith("-")]  # the rest are settings
    cfg, prepare = cli.load([a for a in argv if a not in files], TextConfig, PrepareConfig)
    choice = prepare.tokenizer
    name = cfg.name
    if not name or not name.replace("_", "").isalnum():
        sys.exit("give the corpus a name of letters, digits and _: --name=mydata")
    if os.path.isfile(os.path.join(DATA_DIR, name, "prepare.py")) and not cfg.overwrite:
        sys.exit(f"{name!r} is a corpus this repository prepares with data/{name}/prepare.py: choose another "
                 f"--name (or pass --overwrite to replace it)")
    if cfg.val_every < 2:
        sys.exit(f"--val_every must be >= 2; got {cfg.val_every}")
    if not files and not cfg.fineweb_docs:
        sys.exit("give text/JSONL files to tokenize, or --fineweb_docs=N to stream FineWeb-Edu")
    tokenizers = tokenizer_names(choice, ("byte", "gpt2"), name)
    docs = documents_from_fineweb(cfg.fineweb_docs) if cfg.fineweb_docs else documents_from_files(files)
    train, val = [], []
    for n, doc in enumerate(docs, 1):
        (val if n % cfg.val_every == 0 else train).append(doc)
    if not train or not val:
        sys.exit(f"{len(train) + len(val)} document(s) give an empty train or val split; give at least "
                 f"{cfg.val_every} documents or a smaller --val_every")
    for tokenizer in tokenizers:
        write_corpus(name, Tokenizer(tokenizer), train, val, {"documents": len(train) + len(val)})


if __name__ == "__main__":
    main(sys.argv[1:])
