"""
Serving: many requests decoded together over one KV cache, with continuous batching.

    engine = Engine(model, kv_budget=2 ** 30, eot=tokenizer.eot)     # as many sequences as 1 GiB of cache holds
    for result in engine.serve([Request(prompt=ids, max_new_tokens=200, temperature=0.8) for ids in prompts]):
        print(tokenizer.decode(result.tokens))                       # in the order the requests finish

Decoding one sequence leaves a GPU almost idle: each step reads every weight to produce one token. Decoding B
sequences in one batch reads the weights once for B tokens, so throughput grows with B until compute (or the
cache's reads) become the limit. What bounds B is the KV cache: each sequence needs its own keys and values.
That is where hybrid attention pays at serving time: a local layer caches `window` positions, a shared layer
none, so the same memory holds several times as many sequences (bench_serving.py measures it).

The schedule, one step at a time:

    admit     while a row of the cache is free and requests wait, the next one is prefilled: its prompt goes
              through the model in chunks of at most prefill_chunk tokens per step, so a long prompt never
              stalls the sequences already decoding for more than one chunk
    decode    every running sequence gets one token in one batched forward, each at its own position
    retire    a sequence that produced end-of-text or its max_new_tokens leaves at once, and its row goes to
              the next waiting request (continuous batching: nobody waits for the longest sequence)

The batch is ragged: each row has its own length. SlotCache keeps the cache's rows and their lengths, and gives
the model what a KVCache gives (RoPE positions, the K/V to attend to) plus a mask that hides each row's unwritten
slots. Rows are kept packed (rows 0 .. n-1 decode), so a step computes only running sequences. Each row holds
max_len positions: a request too long for one is refused (vLLM's paged cache allocates by the block instead,
so a short request holds only what it uses; that is the next step beyond this file).
"""

import time
from collections import deque
from dataclasses import dataclass, fields
from typing import Optional

import torch

from attention import GLOBAL, LOCAL, SHARED
from model import kv_cache, kv_cache_bytes, next_token


@dataclass
class Request:
    prompt: list                        # token ids, at least one (start with end-of-text where the tokenizer has one)
    max_new_tokens: int = 128           # tokens to generate at most
    temperature: float = 0.0            # 0 is greedy
    top_k: Optional[int] = None         # sample among the k most likely tokens
    top_p: Optional[float] = None       # sample among the smallest set of tokens whose probability reaches p
    seed: int = 0                       # this request's own random stream: its sample does not depend on the others


@dataclass
class Result:
    index: int                          # the request's place in the list given to serve
    tokens: list                        # the generated ids (end-of-text not included)
    finished: str                       # "eot" or "length"
    first_token_s: float                # seconds from serve() starting to this request's first token
    done_s: float                       # seconds from serve() starting to its last


# -----------------------------------------------------------------------------------------------------
# The ragged cache: rows of one KVCache, each with its own length

class SlotCache:
    """A KVCache of `slots` rows whose rows differ in length. For a batched decoding step over rows 0 .. rows-1
    (one new token each) GPT.forward calls, as on any cache: check_room, positions (each row's own), update (store
    each row's new K/V at its own slot; return the keys to attend to) and advance; Attention adds mask(kind), the
    keys each row may see. row(b) is a plain KVCache over row b, for prefilling one request in chunks."""

    def __init__(self, config, slots, max_len, device, dtype):
        self.cache = kv_cache(config, slots, max_len, device, dtype)
        self.kinds, self.max_len = self.cache.kinds, max_len
        self.size = {GLOBAL: max_len, LOCAL: min(config.window, max_len)}  # slots per row: all, or a ring
        self.lengths = [0] * slots  # positions written, per row (on the host: no GPU read per step)
        self.rows = 0               # rows 0 .. rows-1 decode

    def nbytes(self):
        return self.cache.nbytes()

    def row(self, b):
        return self.cache.select(b)

    def move(self, src, dst):
        """Row src's keys, values and length into row dst (packing the rows after a sequence leaves)."""
        for t in self.cache.k + self.cache.v:
            if t is not None:
                t[dst] = t[src]
        self.lengths[dst] = self.lengths[src]

    def check_room(self, T):
        if T != 1 or max(self.lengths[:self.rows]) + 1 > self.max_len:
            raise ValueError("a batched step takes one token per row, and every row must have room for it")

    def positions(self, T, device):
        """(rows, 1): each row's next position. Also fixes this step's spans and masks, which every layer uses: a
        row of length L writes position L and sees its slots 0 .. L (position p lives in slot p, or p % ring
        size: once the ring is full, every slot)."""
        self.now = torch.tensor(self.lengths[:self.rows], device=device)
        self.spans, self.masks = {}, {}
        for kind, size in self.size.items():
            self.spans[kind] = min(max(self.lengths[:self.rows]) + 1, size)
            slots = torch.arange(self.spans[kind], device=device)
            self.masks[kind] = (slots[None, :] <= self.now[:, None]).view(self.rows, 1, 1, -1)
        self.masks[SHARED] = self.masks[GLOBAL]
        return self.now[:, None]

    def update(self, layer, k, v):
        K, V, kind = self.cache.k[layer], self.cache.v[layer], self.kinds[layer]
        rows = torch.arange(self.rows, device=K.device)
        slot = self.now % self.size[kind]
        K[rows, :, slot] = k[:, :, 0]
        V[rows, :, slot] = v[:, :, 0]
        span = self.spans[kind]
        return K[:self.rows, :, :span], V[:self.rows, :, :span]

    def mask(self, kind):
        return self.masks[kind]

    def advance(self, T):
        for b in range(self.rows):
            self.lengths[b] += T


# -----------------------------------------------------------------------------------------------------
# The engine

class Engine:
    """Serves lists of Requests with one model. kv_budget: bytes of KV cache; the rows it buys (each of max_len
    positions, default block_size; at most max_batch of them) are how many sequences decode at once. vocab_size:
    the tokenizer's, when the model's is padded beyond it. prefill_chunk: prompt tokens fed per step, over all the
    requests being admitted."""

    def __init__(self, model, kv_budget, max_len=None, eot=None, vocab_size=None, prefill_chunk=512, max_batch=None):
        self.model, self.eot, self.vocab_size, self.prefill_chunk = model.eval(), eot, vocab_size, prefill_chunk
        self.max_len = max_len or model.config.block_size
        self.device = model.wte.weight.device
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else model.wte.weight.dtype
        self.row_bytes = kv_cache_bytes(model.config, self.max_len, self.dtype)  # (the cache's own count)
        self.slots = min(int(kv_budget // self.row_bytes), max_batch or float("inf"))
        if self.slots < 1:
            raise ValueError(f"a KV budget of {int(kv_budget):,} bytes holds no sequence: one of {self.max_len} "
                             f"positions needs {self.row_bytes:,} bytes")
        self.cache = SlotCache(model.config, self.slots, self.max_len, self.device, self.dtype)

    def serve(self, requests):
        """Yields a Result per request as each finishes (the order they finish in). self.stats then holds the
        seconds spent prefilling and decoding, and the tokens the decoding steps produced."""
        for i, request in enumerate(requests):
            error = check_request(request, self.model, self.max_len)
            if error:
                raise ValueError(f"request {i}: {error}")
        requests = [Request(**r) if isinstance(r, dict) else r for r in requests]
        self.start, waiting, running, admitting = time.perf_counter(), deque(enumerate(requests)), [], None
        self.stats = {"prefill_s": 0.0, "decode_s": 0.0, "decode_tokens": 0, "steps": 0}
        while waiting or running or admitting:
            with torch.inference_mode(), self.autocast():  # (left between steps: the caller's code runs outside)
                t0 = time.perf_counter()
                admitting, done = self.admit(waiting, running, admitting)
                t1 = time.perf_counter()
                if running:
                    self.decode(running)  # (it reads the sampled tokens back: the time is the GPU's too)
                self.stats["prefill_s"] += t1 - t0
                self.stats["decode_s"] += time.perf_counter() - t1
                self.stats["decode_tokens"] += len(running)
                self.stats["steps"] += 1
                done += [seq for seq in running if seq.finished]
                for seq in done:
                    self.retire(seq, running, admitting)
            yield from (seq.result() for seq in done)

    def admit(self, waiting, running, admitting):
        """Prefill up to prefill_chunk prompt tokens, request after request while rows are free, each in the row
        after the running ones. Returns (the request still being prefilled or None, those that finished at once)."""
        budget, done = self.prefill_chunk, []
        while budget > 0 and (admitting or waiting and len(running) < self.slots):
            seq = admitting or Sequence(*waiting.popleft(), self.device)
            view = self.cache.row(len(running))
            view.filled = seq.fed
            chunk = seq.request.prompt[seq.fed:seq.fed + budget]
            logits, _ = self.model(torch.tensor([chunk], device=self.device), cache=view)
            seq.fed, budget = seq.fed + len(chunk), budget - len(chunk)
            admitting = seq if seq.fed < len(seq.request.prompt) else None
            if admitting is None:  # prompt done: its first token, from the prompt's last position
                seq.add(self.sample(logits[:, -1], [seq])[0], self.eot, self.start)
                self.cache.lengths[len(running)] = seq.fed
                (done if seq.finished else running).append(seq)
        return admitting, done

    def decode(self, running):
        """One token for every running sequence: one batched forward, each row at its own position."""
        self.cache.rows = len(running)
        idx = torch.tensor([[seq.tokens[-1]] for seq in running], device=self.device)
        logits, _ = self.model(idx, cache=self.cache)
        for seq, token in zip(running, self.sample(logits[:, -1], running)):
            seq.add(token, self.eot, self.start)

    def sample(self, logits, seqs):
        """Each row's next token, by its own request's settings (greedy rows together, in one argmax)."""
        logits = logits[:, :self.vocab_size].float()
        tokens = logits.argmax(-1).tolist()
        for i, seq in enumerate(seqs):
            r = seq.request
            if r.temperature > 0 and r.top_k != 1:
                tokens[i] = next_token(logits[i:i + 1], r.temperature, r.top_k, r.top_p, seq.generator).item()
        return tokens

    def retire(self, seq, running, admitting):
        """seq leaves; the last running row moves into its row, and a prompt being prefilled moves down one."""
        if seq not in running:
            return
        row, last = running.index(seq), len(running) - 1
        if row != last:
            self.cache.move(last, row)
            running[row] = running[last]
        running.pop()
        if admitting is not None:
            self.cache.move(last + 1, last)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")


class Sequence:
    """A request in flight: what it has produced, and its own random stream."""

    def __init__(self, index, request, device):
        self.index, self.request, self.fed, self.tokens, self.finished = index, request, 0, [], None
        self.generator = torch.Generator(device).manual_seed(request.seed)
        self.first_token_s = None

    def add(self, token, eot, start):
        now = time.perf_counter() - start
        self.first_token_s = self.first_token_s if self.first_token_s is not None else now
        self.done_s = now
        if token == eot:
            self.finished = "eot"
            return
        self.tokens.append(token)
        if len(self.tokens) == self.request.max_new_tokens:
            self.finished = "length"

    def result(self):
        return Result(self.index, self.tokens, self.finished, self.first_token_s, self.done_s)


# -----------------------------------------------------------------------------------------------------
# What a request must be

def check_request(request, model, max_len):
    """What is wrong with a request (a Request, or a dict of its settings), or None. max_len: a cache row's
    positions."""
    if isinstance(request, dict):
        known = {f.name for f in fields(Request)}
        if set(request) - known or "prompt" not in request:
            return (f"unknown request setting(s) {sorted(set(request) - known)}; known: {sorted(known)}" if
                    set(request) - known else "a request needs a prompt")
        request = Request(**request)
    if not isinstance(request, Request):
        return f"a request must be an engine.Request or a dict of its settings; got {type(request).__name__}"
    vocab = model.config.vocab_size
    if not (isinstance(request.prompt, list) and request.prompt and
            all(isinstance(t, int) and 0 <= t < vocab for t in request.prompt)):
        return f"prompt must be a non-empty list of token ids below {vocab}"
    if not (isinstance(request.max_new_tokens, int) and request.max_new_tokens >= 1):
        return f"max_new_tokens must be a whole number >= 1; got {request.max_new_tokens!r}"
    if not (isinstance(request.temperature, (int, float)) and 0 <= request.temperature < float("inf")):
        return f"temperature must be a finite number >= 0; got {request.temperature!r}"
    if request.top_k is not None and not (isinstance(request.top_k, int) and request.top_k >= 1):
        return f"top_k must be a whole number >= 1 (or None); got {request.top_k!r}"
    if request.top_p is not None and not (isinstance(request.top_p, float) and 0 < request.top_p <= 1):
        return f"top_p must be in (0, 1] (or None); got {request.top_p!r}"
    need = len(request.prompt) + request.max_new_tokens - 1  # (the last token is never fed back)
    if need > max_len:
        return f"prompt ({len(request.prompt)}) + max_new_tokens ({request.max_new_tokens}) needs {need} positions; " \
               f"a row of this engine's cache holds {max_len}"
    if LOCAL not in model.config.layout() and need > model.config.block_size:
        return f"prompt + max_new_tokens needs {need} positions, past block_size ({model.config.block_size}), and " \
               f"a model without local layers has never seen a position past it"
    return None
