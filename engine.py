"""
Serving: requests that arrive at any time, decoded together over one KV cache, with continuous batching.

    engine = Engine(model, kv_budget=2 ** 30, eot=tokenizer.eot, decode=tokenizer.decode)  # rows 1 GiB holds
    rid, = engine.add_request(Request(prompt=ids, max_new_tokens=200, temperature=0.8, stop=["\\n\\n"]))
    while engine.busy():
        for out in engine.step():                      # one admit + decode round: what each request produced
            print(out.text, end="", flush=True)        # (out.finished says when, and why, a request ended)
    for result in engine.serve(requests): ...          # offline: a list in, each request's whole result out

Decoding one sequence leaves a GPU almost idle: each step reads every weight to produce one token. Decoding B
sequences in one batch reads the weights once for B tokens, so throughput grows with B until compute (or the
cache's reads) become the limit. What bounds B is the KV cache: each sequence needs its own keys and values.
That is where hybrid attention pays at serving time: a local layer caches `window` positions, a sharing layer
none, so the same memory holds several times as many sequences (tools/bench_serving.py measures it).

One step of the schedule:

    admit     while a row of the cache is free and requests wait, the next one is prefilled: its prompt goes
              through the model in chunks of at most prefill_chunk tokens per step, so a long prompt never
              stalls the sequences already decoding for more than one chunk. n samples of one prompt are
              prefilled once, and the row is copied to the others
    decode    every running sequence gets one token in one batched forward, each at its own position
    retire    a sequence that produced end-of-text, a stop id or string, or its max_new_tokens, or was cancelled,
              leaves at once, and its row goes to the next waiting request (continuous batching: nobody waits
              for the longest sequence)

The batch is ragged: each row has its own length. RowCache keeps the cache's rows and their lengths, and gives
the model what a KVCache gives (RoPE positions, the K/V to attend to) plus a mask that hides each row's unwritten
slots. Rows are kept packed (rows 0 .. n-1 decode), so a step computes only running sequences. Each row holds
max_len positions: a request too long for one is refused (vLLM's paged cache allocates by the block instead,
so a short request holds only what it uses; that is the next step beyond this file).
"""

import bisect
import itertools
import math
import time
from collections import deque
from dataclasses import dataclass, field, fields
from typing import Optional

import torch

from attention import GLOBAL, LOCAL
from model import next_token


@dataclass
class Request:
    prompt: list                        # token ids, at least one (start with end-of-text where the tokenizer has one)
    max_new_tokens: int = 128           # tokens to generate at most
    temperature: float = 0.0            # 0 is greedy
    top_k: Optional[int] = None         # sample among the k most likely tokens
    top_p: Optional[float] = None       # sample among the smallest set of tokens whose probability reaches p
    seed: int = 0                       # this request's own random stream: its sample does not depend on the others
    stop_ids: list = field(default_factory=list)  # token ids that end it (besides the engine's end-of-text)
    stop: list = field(default_factory=list)      # strings that end it, left out of its text (needs decode)


@dataclass
class Output:
    """What one step produced for one request."""
    id: int                             # the id add_request returned
    tokens: list                        # the new token ids (a stop id or end-of-text not included)
    text: Optional[str]                 # their text, as far as it is final (with the engine's decode; else None)
    finished: Optional[str]             # None while it runs; "eot", "stop", "length" or "cancelled"


@dataclass
class Result:
    """A request served whole (serve)."""
    index: int                          # the request's place in the list given to serve
    tokens: list                        # the generated ids (a stop id or end-of-text not included; with a stop
    text: Optional[str]                 # string, the tokens whose text lies before it), and their text
    finished: str                       # "eot", "stop", "length" or "cancelled"
    first_token_s: float                # seconds from serve() starting to this request's first token
    done_s: float                       # seconds from serve() starting to its last


# -----------------------------------------------------------------------------------------------------
# The ragged cache: rows of one KVCache, each with its own length

class RowCache:
    """A KVCache of n_rows rows whose rows differ in length. Before a batched decoding step over rows 0 ..
    decoding-1 (one new token each) the engine calls begin_step; GPT.forward then calls, as on any cache:
    check_room, positions (each row's own), update (store each row's new K/V at its own slot; return the keys to
    attend to and the mask of those each row may see) and advance. row(b) is a plain KVCache over row b, for
    prefilling one request in chunks."""

    def __init__(self, model, n_rows, max_len, device, dtype):
        self.kv = model.make_cache(n_rows, max_len, device, dtype)
        self.kinds, self.max_len = self.kv.kinds, max_len
        self.size = {GLOBAL: max_len, LOCAL: min(model.window, max_len)}  # slots per row: all, or a ring
        self.lengths = [0] * n_rows  # positions written, per row (on the host: no GPU read per step)
        self.decoding = 0

    def row(self, b, filled):
        """A plain KVCache over row b, filled to `filled` positions (what a chunked prefill continues)."""
        view = self.kv.select(b)
        view.filled = filled
        return view

    def copy_row(self, src, dst):
        """Row src's keys, values and length into row dst (packing the rows after a sequence leaves; sharing a
        prefill)."""
        for t in self.kv.k + self.kv.v:
            if t is not None:
                t[dst] = t[src]
        self.lengths[dst] = self.lengths[src]

    def begin_step(self, decoding, device):
        """Fix the next decoding step: rows 0 .. decoding-1, each writing position L (its length) and seeing its
        slots 0 .. L (position p lives in slot p, or p % ring size: once the ring is full, every slot)."""
        self.decoding = decoding
        self.now = torch.tensor(self.lengths[:decoding], device=device)
        self.spans, self.masks = {}, {}
        for kind, size in self.size.items():
            self.spans[kind] = min(max(self.lengths[:decoding]) + 1, size)
            slot = torch.arange(self.spans[kind], device=device)
            self.masks[kind] = (slot[None, :] <= self.now[:, None]).view(decoding, 1, 1, -1)

    def check_room(self, T):
        assert T == 1 and max(self.lengths[:self.decoding]) < self.max_len, "one token per row, with room for it"

    def positions(self, T, device):
        return self.now[:, None]  # (rows, 1)

    def update(self, layer, k, v):
        K, V, kind = self.kv.k[layer], self.kv.v[layer], self.kinds[layer]
        rows = torch.arange(self.decoding, device=K.device)
        slot = self.now % self.size[kind]
        K[rows, :, slot] = k[:, :, 0]
        V[rows, :, slot] = v[:, :, 0]
        span = self.spans[kind]
        return K[:self.decoding, :, :span], V[:self.decoding, :, :span], self.masks[kind]

    def advance(self, T):
        for b in range(self.decoding):
            self.lengths[b] += T


# -----------------------------------------------------------------------------------------------------
# The engine

class Engine:
    """Serves Requests with one model and one KV cache. kv_budget: bytes of KV cache; the rows it buys (each of
    max_len positions, default block_size; at most max_batch of them) are how many sequences decode at once.
    eot: the end-of-text id, which ends every request. decode: ids -> text (tokenizer.decode), for stop strings
    and the text of each output. vocab_size: the tokenizer's, when the model's is padded beyond it.
    prefill_chunk: prompt tokens fed per step, over all the requests being admitted."""

    def __init__(self, model, kv_budget, max_len=None, eot=None, decode=None, vocab_size=None, prefill_chunk=512,
                 max_batch=None):
        error = check_engine(model, kv_budget, max_len, prefill_chunk, max_batch)
        if error:
            raise ValueError(error)
        self.model, self.eot, self.decode, self.vocab_size = model.eval(), eot, decode, vocab_size
        self.max_len, self.prefill_chunk = max_len or model.config.block_size, prefill_chunk
        self.device = model.wte.weight.device
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else model.wte.weight.dtype
        self.row_bytes = model.make_cache(1, self.max_len, "meta", self.dtype).nbytes()  # (the cache's own count)
        self.n_rows = min(int(kv_budget // self.row_bytes), max_batch or math.inf)
        if self.n_rows < 1:
            raise ValueError(f"a KV budget of {int(kv_budget):,} bytes holds no sequence: one of {self.max_len} "
                             f"positions needs {self.row_bytes:,} bytes")
        self.cache = RowCache(model, self.n_rows, self.max_len, self.device, self.dtype)
        self.waiting = deque()   # groups: [Sequence, ...] sharing one prompt, first come first served
        self.admitting = None    # the group whose prompt is being prefilled, in the row after the running ones
        self.running = []        # row b holds running[b]
        self.cancelled = []      # cancelled since the last step: reported by the next
        self.ids = itertools.count()
        self.serving = False     # serve() owns the engine while it runs
        self.start = time.perf_counter()
        self.stats = {"prefill_s": 0.0, "decode_s": 0.0, "decode_tokens": 0, "steps": 0}

    def add_request(self, request, n=1):
        """Queue request (a Request, or a dict of its settings) n times (n samples: seed, seed + 1, ...; the
        prompt is prefilled once for as many as find a row together); returns their ids. ValueError in one line
        if the request cannot be served."""
        if self.serving:
            raise ValueError("this engine is inside serve(): add requests there, or to another engine")
        return [seq.id for seq in self.queue(request, n)]

    def queue(self, request, n):
        """The n Sequences of request, queued as one group."""
        error = check_request(request, self.model, self.max_len, self.decode)
        if error or not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
            raise ValueError(error or f"n must be a whole number >= 1; got {n!r}")
        request = Request(**request) if isinstance(request, dict) else request
        group = [Sequence(next(self.ids), request, request.seed + i, self.device) for i in range(n)]
        self.waiting.append(group)
        return group

    def cancel(self, id):
        """Stop request `id` wherever it is (waiting, being prefilled, decoding); its row goes to the next request.
        The next step reports it, finished "cancelled". False if no such request is unfinished."""
        for seq in [s for g in self.waiting for s in g] + (self.admitting or []) + self.running:
            if seq.id == id:
                seq.finished = "cancelled"
                self.cancelled.append(seq)
                if seq in self.running:
                    self.retire(seq)
                self.waiting = deque(kept for g in self.waiting if (kept := [s for s in g if s is not seq]))
                if self.admitting is not None and seq in self.admitting:
                    self.admitting.remove(seq)  # (the prefill goes on for the rest of its group, if any)
                    self.admitting = self.admitting or None
                return True
        return False

    def busy(self):
        """Whether any request is unfinished (or a cancellation is still to be reported)."""
        return bool(self.waiting or self.admitting or self.running or self.cancelled)

    def step(self):
        """One round: prefill up to prefill_chunk prompt tokens into free rows, decode one token for every running
        sequence, retire those that finished. Returns an Output for each request that produced a token or ended."""
        touched, self.cancelled = list(self.cancelled), []
        with torch.inference_mode(), torch.autocast(self.device.type, torch.bfloat16,
                                                    enabled=self.device.type == "cuda"):
            t0 = time.perf_counter()
            touched += self.admit()
            t1 = time.perf_counter()
            if self.running:
                touched += self.decode_step()  # (it reads the sampled tokens back: the time is the GPU's too)
                self.stats["decode_tokens"] += len(self.running)
            self.stats["prefill_s"] += t1 - t0
            self.stats["decode_s"] += time.perf_counter() - t1
            self.stats["steps"] += 1
            for seq in [s for s in self.running if s.finished]:
                self.retire(seq)
        return [seq.output(self.decode is not None) for seq in dict.fromkeys(touched)]

    def serve(self, requests):
        """Yields a Result per request (any iterable of Requests or dicts) as each finishes: the offline API, built
        on step. Every request is checked first: a bad one is refused (ValueError naming it) before any is run."""
        if self.serving or self.busy():
            raise ValueError("this engine is already serving requests: one serve() at a time, on an idle engine")
        requests = list(requests)
        for i, request in enumerate(requests):
            error = check_request(request, self.model, self.max_len, self.decode)
            if error:
                raise ValueError(f"request {i}: {error}")
        self.serving, self.start = True, time.perf_counter()
        self.stats = {"prefill_s": 0.0, "decode_s": 0.0, "decode_tokens": 0, "steps": 0}
        seqs = {}
        try:
            for i, request in enumerate(requests):
                seq, = self.queue(request, 1)
                seqs[seq.id] = (i, seq)
            while self.busy():
                for out in self.step():
                    if out.finished:
                        i, seq = seqs.pop(out.id)
                        yield Result(i, seq.kept_tokens(self.decode), seq.text if self.decode else None, seq.finished,
                                     seq.first_token_s, seq.done_s)
        finally:  # (also when the caller stops early: what it left unfinished goes, and the engine is idle again)
            for id in seqs:
                self.cancel(id)
            self.cancelled, self.serving = [], False

    # -------------------------------------------------------------------------------------------------
    def admit(self):
        """Prefill up to prefill_chunk prompt tokens, group after group while rows are free, each in the row after
        the running ones. A group whose prompt is done gets its first tokens and starts running. Returns the
        sequences that produced a token."""
        budget, touched = self.prefill_chunk, []
        while budget > 0 and (self.admitting or self.waiting and len(self.running) < self.n_rows):
            group = self.admitting or self.waiting.popleft()
            first, row = group[0], len(self.running)
            chunk = first.request.prompt[first.fed:first.fed + budget]
            logits, _ = self.model(torch.tensor([chunk], device=self.device), cache=self.cache.row(row, first.fed))
            budget -= len(chunk)
            for seq in group:  # (the group's samples share one prompt, and this prefill)
                seq.fed += len(chunk)
            self.admitting = group if first.fed < len(first.request.prompt) else None
            if self.admitting:
                break
            self.cache.lengths[row] = first.fed
            fits = min(len(group), self.n_rows - row)  # the samples that find a row now: copies of this one
            for j in range(1, fits):
                self.cache.copy_row(row, row + j)
            if fits < len(group):
                for seq in group[fits:]:
                    seq.fed = 0
                self.waiting.appendleft(group[fits:])  # (the rest wait for rows, and prefill again)
            for seq, token in zip(group[:fits], self.sample(logits[:, -1].expand(fits, -1), group[:fits])):
                seq.add(token, self.eot, self.decode, self.start)
                self.running.append(seq)
                touched.append(seq)
            for seq in [s for s in group[:fits] if s.finished]:  # (done at its first token: its row is free again)
                self.retire(seq)
        return touched

    def decode_step(self):
        """One token for every running sequence: one batched forward, each row at its own position."""
        self.cache.begin_step(len(self.running), self.device)
        idx = torch.tensor([[seq.tokens[-1]] for seq in self.running], device=self.device)
        logits, _ = self.model(idx, cache=self.cache)
        for seq, token in zip(self.running, self.sample(logits[:, -1], self.running)):
            seq.add(token, self.eot, self.decode, self.start)
        return list(self.running)

    def sample(self, logits, seqs):
        """Each row's next token, by its own request's settings (greedy rows together, in one argmax)."""
        logits = logits[:, :self.vocab_size].float()
        tokens = logits.argmax(-1).tolist()
        for i, seq in enumerate(seqs):
            r = seq.request
            if r.temperature > 0 and r.top_k != 1:
                tokens[i] = next_token(logits[i:i + 1], r.temperature, r.top_k, r.top_p, seq.generator).item()
        return tokens

    def retire(self, seq):
        """seq leaves its row; the last running row moves into it, and a prompt being prefilled moves down one."""
        row, last = self.running.index(seq), len(self.running) - 1
        if row != last:
            self.cache.copy_row(last, row)
            self.running[row] = self.running[last]
        self.running.pop()
        if self.admitting is not None:
            self.cache.copy_row(last + 1, last)


class Sequence:
    """A request in flight (one sample of it): what it has produced, its text so far, and its own random stream."""

    def __init__(self, id, request, seed, device):
        self.id, self.request, self.fed, self.tokens, self.finished = id, request, 0, [], None
        self.generator = torch.Generator(device).manual_seed(seed)
        self.first_token_s = self.done_s = None
        self.text, self.decoded = "", 0    # the text of tokens[:decoded] (a cut multi-byte character waits)
        self.sent_tokens, self.sent_text = 0, 0

    def add(self, token, eot, decode, start):
        now = time.perf_counter() - start
        self.first_token_s = self.first_token_s if self.first_token_s is not None else now
        self.done_s = now
        if token == eot or token in self.request.stop_ids:
            self.finished = "eot" if token == eot else "stop"
            return
        self.tokens.append(token)
        if decode is not None:
            tail = decode(self.tokens[self.decoded:])
            if not tail.endswith("\ufffd"):
                searched = max(0, len(self.text) - max(map(len, self.request.stop), default=0))
                self.text, self.decoded = self.text + tail, len(self.tokens)
                cut = min((i for i in (self.text.find(s, searched) for s in self.request.stop) if i >= 0), default=-1)
                if cut >= 0:
                    self.text, self.finished = self.text[:cut], "stop"
                    return
        if len(self.tokens) == self.request.max_new_tokens:
            self.finished = "length"

    def final_text(self):
        """How much of the text no later token can change: all of it once finished; else up to a cut character
        (held in tokens[decoded:]) or a tail that could still become a stop string."""
        if self.finished:
            return len(self.text)
        held = max((n for s in self.request.stop for n in range(1, len(s)) if self.text.endswith(s[:n])), default=0)
        return len(self.text) - held

    def output(self, with_text):
        """What this sequence produced since its last output."""
        end = self.final_text()
        out = Output(self.id, self.tokens[self.sent_tokens:], self.text[self.sent_text:end] if with_text else None,
                     self.finished)
        self.sent_tokens, self.sent_text = len(self.tokens), max(self.sent_text, end)
        return out

    def kept_tokens(self, decode):
        """The generated tokens, or, where a stop string ended the request, those whose text lies before it."""
        if self.finished != "stop" or decode is None or not self.request.stop:
            return list(self.tokens)
        k = bisect.bisect_right(range(len(self.tokens) + 1), len(self.text), key=lambda k: len(decode(self.tokens[:k])))
        return self.tokens[:k - 1] if k > 0 else []


# -----------------------------------------------------------------------------------------------------
# What an engine and a request must be: checked once, where they enter

def check_engine(model, kv_budget, max_len, prefill_chunk, max_batch):
    whole = lambda v, low: isinstance(v, int) and not isinstance(v, bool) and v >= low  # noqa: E731
    if not (isinstance(kv_budget, (int, float)) and not isinstance(kv_budget, bool) and
            math.isfinite(kv_budget) and kv_budget > 0):
        return f"kv_budget must be a finite number of bytes > 0; got {kv_budget!r}"
    if max_len is not None and not whole(max_len, 1):
        return f"max_len must be a whole number >= 1 (or None: block_size); got {max_len!r}"
    if not whole(prefill_chunk, 1):
        return f"prefill_chunk must be a whole number >= 1; got {prefill_chunk!r}"
    if max_batch is not None and not whole(max_batch, 1):
        return f"max_batch must be a whole number >= 1 (or None); got {max_batch!r}"
    return None


def check_sampling(temperature, top_k, top_p):
    """What is wrong with these sampling settings, or None (sample.py's settings are checked here too)."""
    if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and
            0 <= temperature < math.inf):
        return f"temperature must be a finite number >= 0; got {temperature!r}"
    if top_k is not None and not (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 1):
        return f"top_k must be a whole number >= 1 (or None); got {top_k!r}"
    if top_p is not None and not (isinstance(top_p, (int, float)) and not isinstance(top_p, bool) and 0 < top_p <= 1):
        return f"top_p must be in (0, 1] (or None); got {top_p!r}"
    return None


def check_request(request, model, max_len, decode=None):
    """What is wrong with a request (a Request, or a dict of its settings), or None. max_len: a cache row's
    positions; decode: the engine's (stop strings need one)."""
    if isinstance(request, dict):
        known = {f.name for f in fields(Request)}
        if set(request) - known or "prompt" not in request:
            return (f"unknown request setting(s) {sorted(set(request) - known)}; known: {sorted(known)}" if
                    set(request) - known else "a request needs a prompt")
        request = Request(**request)
    if not isinstance(request, Request):
        return f"a request must be an engine.Request or a dict of its settings; got {type(request).__name__}"
    vocab = model.config.vocab_size
    ids = lambda v: isinstance(v, list) and all(isinstance(t, int) and 0 <= t < vocab for t in v)  # noqa: E731
    if not (ids(request.prompt) and request.prompt):
        return f"prompt must be a non-empty list of token ids below {vocab}"
    if not (isinstance(request.max_new_tokens, int) and not isinstance(request.max_new_tokens, bool) and
            request.max_new_tokens >= 1):
        return f"max_new_tokens must be a whole number >= 1; got {request.max_new_tokens!r}"
    error = check_sampling(request.temperature, request.top_k, request.top_p)
    if error:
        return error
    if not (isinstance(request.seed, int) and not isinstance(request.seed, bool) and 0 <= request.seed < 2 ** 63):
        return f"seed must be a whole number in [0, 2**63); got {request.seed!r}"
    if not ids(request.stop_ids):
        return f"stop_ids must be a list of token ids below {vocab}; got {request.stop_ids!r}"
    if not (isinstance(request.stop, list) and all(isinstance(s, str) and s for s in request.stop)):
        return f"stop must be a list of non-empty strings; got {request.stop!r}"
    if request.stop and decode is None:
        return "stop strings need the engine's decode (Engine(..., decode=tokenizer.decode))"
    need = len(request.prompt) + request.max_new_tokens - 1  # (the last token is never fed back)
    if need > max_len:
        return f"prompt ({len(request.prompt)}) + max_new_tokens ({request.max_new_tokens}) needs {need} positions; " \
               f"a row of this engine's cache holds {max_len}"
    if LOCAL not in model.config.layout() and need > model.config.block_size:
        return f"prompt + max_new_tokens needs {need} positions, past block_size ({model.config.block_size}), and " \
               f"a model without local layers has never seen a position past it"
    return None
