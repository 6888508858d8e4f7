"""Your own data: tokenize text or JSONL files (or a FineWeb-Edu sample, with a network) into data/<name>/.

    python data/text/prepare.py --name=mydata notes.txt more/*.txt corpus.jsonl
    python data/text/prepare.py --name=mydata --workers=8 --tokenizer=gpt2 big/*.jsonl
    python data/text/prepare.py --name=fineweb --fineweb_docs=100000      # needs `pip install datasets`

Each .txt file is one document; each line of a .jsonl file is a document whose "text" field is read. Documents
end with the end-of-text token; every --val_every-th document goes to val (default 20). Written for every
tokenizer (byte and gpt2) unless --tokenizer names one.

It streams: documents are read in order, cut into chunks of about --chunk_mib of text, tokenized by --workers
processes and written to disk in the order they were read, so memory holds a few chunks whatever the corpus's
size and the output is the same for any number of workers. A document larger than a chunk (a big .txt) is read
in pieces cut at a line end before a line that starts with a non-space character, where the GPT-2 tokenizer
starts a new piece of text anyway: its tokens are those of the whole. The corpus is written beside its final
folder and takes its place when finished (data/corpus.py, CorpusWriter); a prepare stopped midway, run again with
the same command and files, continues from its last saved chunk.
"""
import itertools
import json
import os
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from infra import cli  # noqa: E402
from infra.cli import need  # noqa: E402
from data.corpus import DATA_DIR, CorpusWriter, PrepareConfig, Tokenizer, token_dtype, tokenizer_names  # noqa: E402


@dataclass
class TextConfig:
    name: str = ""                       # the corpus name: data/<name>/ (letters, digits and _)
    val_every: int = 20                  # every val_every-th document goes to val
    fineweb_docs: Optional[int] = None   # stream this many FineWeb-Edu documents instead of reading files
    overwrite: bool = False              # allow replacing one of the corpora this repository prepares itself
    workers: int = 0                     # tokenizing processes; 0: one per core
    chunk_mib: float = 4.0               # text per chunk handed to a worker (and per saved step of progress)

    def __post_init__(self):
        need(self.name and self.name.replace("_", "").isalnum(),
             "give the corpus a name of letters, digits and _: --name=mydata")
        need(self.val_every >= 2, f"val_every must be >= 2; got {self.val_every}")
        need(self.fineweb_docs is None or self.fineweb_docs >= 1, f"fineweb_docs must be >= 1; got {self.fineweb_docs}")
        need(self.workers >= 0, f"workers must be >= 0 (0: one per core); got {self.workers}")
        need(0 < self.chunk_mib <= 1024, f"chunk_mib must be in (0, 1024]; got {self.chunk_mib}")


class BadInput(Exception):
    """An input the prepare cannot read: its message names the file (and line)."""


# -----------------------------------------------------------------------------------------------------
# Reading: documents as (index, piece of text, whether it is the document's last piece)

def pieces_of_file(path, piece_bytes):
    """A .txt file as one document, in pieces of about piece_bytes cut at safe line ends (see the top)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        held = ""
        for line in f:
            if len(held) >= piece_bytes and line[:1] and not line[:1].isspace():
                yield held
                held = ""
            held += line
        yield held


def documents_from_files(paths, piece_bytes):
    """(text piece, last piece of its document) for every document of the files, in order."""
    for path in paths:
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8", errors="replace") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            text = json.loads(line)["text"]
                        except (json.JSONDecodeError, KeyError, TypeError):
                            text = None
                        if not isinstance(text, str):
                            raise BadInput(f"{path}:{n}: expected a JSON object with a \"text\" field holding a string")
                        yield text, True
        else:
            previous = None
            for piece in pieces_of_file(path, piece_bytes):
                if previous is not None:
                    yield previous, False
                previous = piece
            yield previous, True


def documents_from_fineweb(n_docs):
    try:
        from datasets import load_dataset
    except ImportError:
        raise BadInput("the FineWeb-Edu path needs the `datasets` package: pip install datasets") from None
    try:
        stream = load_dataset("HuggingFaceFW/fineweb-edu", name="sample-10BT", split="train", streaming=True)
        for row in itertools.islice(stream, n_docs):
            yield row["text"], True
    except Exception as e:  # the hub raises many types; all mean the same thing to a user here
        raise BadInput(f"could not stream FineWeb-Edu from the Hugging Face hub ({type(e).__name__}: {e}); this "
                       f"needs a network. Offline, pass local .txt/.jsonl files instead.") from None


def chunks(pieces, chunk_bytes, skip_docs):
    """[(document index, piece, last piece)] lists of about chunk_bytes of text, the first skip_docs documents left
    out (a resumed prepare wrote them already). A chunk may end inside a document (a big .txt's pieces)."""
    chunk, size, index = [], 0, 0
    for piece, last in pieces:
        if index >= skip_docs:
            chunk.append((index, piece, last))
            size += len(piece)
        index += last
        if size >= chunk_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


# -----------------------------------------------------------------------------------------------------
# Tokenizing, in worker processes

_tokenizer = None


def start_worker(name):
    global _tokenizer
    _tokenizer = Tokenizer(name)


def tokenize(chunk, val_every):
    """({split: (ids, bytes, documents ended)}, whether the chunk ends a document) of one chunk: each piece's
    tokens, then end-of-text after a document's last, in the split its document's index (1-based, in the order
    read) puts it in."""
    out = {"train": ([], 0, 0), "val": ([], 0, 0)}
    for index, piece, last in chunk:
        split = "val" if (index + 1) % val_every == 0 else "train"
        ids, n_bytes, n_docs = out[split]
        ids += _tokenizer.encode(piece) + ([_tokenizer.eot] if last else [])
        out[split] = (ids, n_bytes + len(piece.encode("utf-8")), n_docs + last)
    dtype = token_dtype(_tokenizer.vocab_size)
    return {split: (np.asarray(ids, dtype=np.int64).astype(dtype), n, d) for split, (ids, n, d) in out.items()}, \
        chunk[-1][2]


def in_order(fn, items, workers, name):
    """fn over items, results in the items' order, with at most 2 * workers chunks in flight: the reading waits for
    the tokenizing, so memory does not grow with the corpus."""
    if workers == 1:
        start_worker(name)
        yield from map(fn, items)
        return
    with ProcessPoolExecutor(workers, initializer=start_worker, initargs=(name,)) as pool:
        flight = deque()
        for item in items:
            flight.append(pool.submit(fn, item))
            if len(flight) >= 2 * workers:
                yield flight.popleft().result()
        while flight:
            yield flight.popleft().result()


# -----------------------------------------------------------------------------------------------------

def signature(cfg, tokenizer, files):
    """What the input was: a prepare continues a stopped one only if this is the same."""
    return {"tokenizer": tokenizer, "val_every": cfg.val_every, "fineweb_docs": cfg.fineweb_docs,
            "files": [[os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns] for p in files]}


def prepare(cfg, tokenizer, files, workers):
    """Write one tokenization of the corpus; returns its meta. BadInput or OSError: nothing is left behind."""
    from tqdm import tqdm
    writer = CorpusWriter(os.path.join(DATA_DIR, cfg.name, tokenizer), Tokenizer(tokenizer),
                          signature(cfg, tokenizer, files))
    if writer.resumed_docs:
        print(f"{cfg.name} ({tokenizer}): continuing after the {writer.resumed_docs:,} documents already written")
    chunk_bytes = int(cfg.chunk_mib * 2 ** 20)
    pieces = (documents_from_fineweb(cfg.fineweb_docs) if cfg.fineweb_docs else
              documents_from_files(files, chunk_bytes))
    total = None if cfg.fineweb_docs else sum(os.path.getsize(p) for p in files)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"{cfg.name} ({tokenizer})", dynamic_ncols=True)
    done, t0 = writer.resumed_docs, time.time()
    try:
        work = chunks(pieces, chunk_bytes, writer.resumed_docs)
        for result, ends_a_document in in_order(partial(tokenize, val_every=cfg.val_every), work, workers, tokenizer):
            for split, (ids, n_bytes, n_docs) in result.items():
                writer.add(split, ids, n_bytes, n_docs)
                bar.update(n_bytes)
                done += n_docs
            if ends_a_document:  # (progress is a whole number of documents)
                writer.save_progress(done)
            tokens = writer.counts["train_tokens"] + writer.counts["val_tokens"]
            bar.set_postfix(docs=f"{done:,}", tokens=f"{tokens:,}", tok_s=f"{tokens / (time.time() - t0):,.0f}",
                            refresh=False)
        if not writer.counts["train_documents"] or not writer.counts["val_documents"]:
            raise BadInput(f"{done} document(s) give an empty train or val split; give at least {cfg.val_every} "
                           f"documents or a smaller --val_every")
        meta = writer.finish({"documents": done})
    except (BadInput, OSError, ValueError) as e:
        bar.close()
        writer.abort()
        raise SystemExit(str(e) if isinstance(e, BadInput) else f"could not prepare {cfg.name} ({tokenizer}): "
                         f"{type(e).__name__}: {e}. Nothing was written; fix that and run the same command again")
    bar.close()
    print(f"{cfg.name} ({tokenizer}): {done:,} documents, {meta['train_tokens']:,} train and {meta['val_tokens']:,} "
          f"val tokens ({meta['dtype']}) -> {writer.final}")
    return meta


def main(argv):
    files = [arg for arg in argv if not arg.startswith("-")]  # the rest are settings
    cfg, choice = cli.load([a for a in argv if a not in files], TextConfig, PrepareConfig)
    if os.path.isfile(os.path.join(DATA_DIR, cfg.name, "prepare.py")) and not cfg.overwrite:
        sys.exit(f"{cfg.name!r} is a corpus this repository prepares with data/{cfg.name}/prepare.py: choose another "
                 f"--name (or pass --overwrite to replace it)")
    if not files and not cfg.fineweb_docs:
        sys.exit("give text/JSONL files to tokenize, or --fineweb_docs=N to stream FineWeb-Edu")
    missing = [p for p in files if not os.path.isfile(p)]
    if missing:
        sys.exit(f"no such file: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    workers = cfg.workers or os.cpu_count() or 1
    for tokenizer in tokenizer_names(choice.tokenizer, ("byte", "gpt2"), cfg.name):
        prepare(cfg, tokenizer, files, workers)


if __name__ == "__main__":
    cli.run(main)
