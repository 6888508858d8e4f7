"""
Hybrid attention: sliding-window (local) and full (global) causal attention, cross-layer KV sharing,
and the KV cache that makes the hybrid pay off at inference time.

Yi-Lightning's layout: in each block of four layers, three attend only to the last `window` positions and
one attends to everything; consecutive global layers share one set of keys and values. With a 4096 window
at 64K context the KV cache shrinks by 1 - (1/4 * 1/2 + 3/4 * 4096/65536) = 82.8%, and the cost of the
local layers grows linearly with context instead of quadratically.

Read top to bottom: the math (`causal_attention` and its two linear-cost local kernels: blocked SDPA on
CPU, FlexAttention with a sliding-window block mask on CUDA), then RoPE, then the layer, then the cache.
Imports only torch.
"""

import copy
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention


# -----------------------------------------------------------------------------------------------------
# The math

def causal_attention(q, k, v, window=None, mask=None):
    """Causal attention, full (window=None) or sliding-window (window=w: query i sees keys i-w+1 .. i).

    q: (B, Hq, T, D); k, v: (B, Hkv, S, D) with Hq a multiple of Hkv (grouped-query attention) and S >= T.
    The T queries are the last T of the S positions (S > T when decoding after a cache).
    Returns (B, Hq, T, D). Scale 1/sqrt(D). mask (B, 1, T, S), which keys each query sees, replaces the rule
    above: a cache whose rows differ in length gives it (engine.py's), as its rows' keys end at different slots.
    """
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    assert k.shape == v.shape == (B, Hkv, S, D) and Hq % Hkv == 0 and S >= T, (q.shape, k.shape, v.shape)
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=Hq != Hkv)
    if window is not None and window >= S:
        window = None  # a window that covers every key is global attention
    if window is not None:
        if q.is_cuda:
            return flex_local_attention(q, k, v, window)
        if S > BLOCKED_FROM * window:
            return _local_attention(q, k, v, window)
        # Short: one masked call over all T x S pairs scores hardly more than the blocks would (about T * 2w),
        # and saves the blocked kernel's dozen extra ops.
    elif T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=Hq != Hkv)
    elif T == 1:  # one decoding query sees every cached key: no mask at all
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=Hq != Hkv)
    # One masked SDPA call. The queries are the last T of S positions (SDPA's is_causal would align them with
    # the first T).
    i = torch.arange(S - T, S, device=q.device)[:, None]
    j = torch.arange(S, device=q.device)
    mask = (j <= i) & (j > i - window) if window is not None else j <= i
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=Hq != Hkv)


BLOCKED_FROM = 4  # windows of keys from which the blocked kernel beats one masked call (docs/serving.md, prefill)
SCORES_PER_CALL = 2 ** 21  # attention scores per SDPA call in the local kernel (8 MB in fp32)


def local_blocks(T, window, B, Hkv, g):
    """The blocked kernel's shapes for T queries: (queries per block c, blocks nb, keys per block span, blocks per
    SDPA call), for B sequences of Hkv K/V heads with g query heads each."""
    c = min(window, T)
    span = c + window - 1
    return c, math.ceil(T / c), span, max(1, SCORES_PER_CALL // (B * Hkv * g * c * span))


def _local_attention(q, k, v, window):
    """Sliding-window attention in time and memory linear in T: cut the queries into blocks of `window`;
    each block needs only the keys from `window - 1` positions before its first query to its last query,
    a span of 2*window - 1 keys. The blocks go through batched SDPA calls with a small banded mask, a few
    blocks per call: one call over all blocks would build a score tensor that outgrows the CPU caches, and
    its time would then grow faster than T.
    """
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    g, w = Hq // Hkv, window
    c, nb, span, per_call = local_blocks(T, w, B, Hkv, g)   # queries per block, blocks, keys per block, per call
    # Keys older than the first query's window are never seen: drop them. Then pad the front so that
    # block b's key span starts exactly at index b*c, and pad the end so every span is complete.
    first = max(0, S - T - (w - 1))
    k, v = k[:, :, first:], v[:, :, first:]
    front = (w - 1) - (S - first - T)                        # zero keys before the first real key
    back = nb * c + w - 1 - (front + k.shape[2])
    k = F.pad(k, (0, 0, front, back))
    v = F.pad(v, (0, 0, front, back))
    kb = k.unfold(2, span, c).transpose(-1, -2)              # (B, Hkv, nb, span, D)
    vb = v.unfold(2, span, c).transpose(-1, -2)
    # Queries: (B, Hq, T, D) -> (B, Hkv, nb, g*c, D), so the g query heads of a group share their K/V block.
    qb = F.pad(q, (0, 0, 0, nb * c - T)).view(B, Hkv, g, nb, c, D).transpose(2, 3).reshape(B, Hkv, nb, g * c, D)
    # Query r of a block sits at span index r + w - 1 and sees span indices r .. r + w - 1. Padding keys at
    # the end lie after every real query, so the band already hides them; the front padding needs masking.
    r = torch.arange(c, device=q.device)[:, None]
    j = torch.arange(span, device=q.device)[None, :]
    band = (j >= r) & (j <= r + w - 1)                       # (c, span)
    real = torch.arange(nb * c + w - 1, device=q.device).unfold(0, span, c) >= front  # (nb, span)
    mask = (band[None] & real[:, None, :]).repeat(1, g, 1)   # (nb, g*c, span)
    out = torch.cat([F.scaled_dot_product_attention(qs, ks, vs, attn_mask=ms) for qs, ks, vs, ms in zip(
        qb.flatten(0, 1).split(per_call, 1), kb.flatten(0, 1).split(per_call, 1),
        vb.flatten(0, 1).split(per_call, 1), mask.split(per_call, 0))], dim=1)
    out = out.view(B, Hkv, nb, g, c, D).transpose(2, 3).reshape(B, Hq, nb * c, D)
    return out[:, :, :T]


FLEX_TILE = 128  # FlexAttention's tile size: its block mask says which (query tile, key tile) pairs to compute


def sliding_window_block_mask(T, S, window, device):
    """FlexAttention's block mask for sliding-window attention of the last T of S positions, worked out in
    closed form per pair of tiles: skipped (no pair in the band), computed whole (every pair in it), or
    computed with the mask. Nothing of size T x S is built; create_block_mask would evaluate the mask at
    every (query, key) pair, 4G of them at 64K."""
    offset = S - T                                          # absolute position of query 0

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx + offset) & (kv_idx > q_idx + offset - window)

    q_first = torch.arange(0, T, FLEX_TILE, device=device) + offset
    k_first = torch.arange(0, S, FLEX_TILE, device=device)
    q_last, k_last = q_first + FLEX_TILE - 1, k_first + FLEX_TILE - 1  # a tile cut by the end is never whole
    some = (k_first <= q_last.clamp(max=S - 1)[:, None]) & (k_last.clamp(max=S - 1) > q_first[:, None] - window)
    every = (k_last <= q_first[:, None]) & (k_first > q_last[:, None] - window) & (q_last < S)[:, None]

    def ordered(tiles):  # (query tiles, key tiles) bool -> per query tile: how many, and which key tiles first
        order = tiles.to(torch.uint8).argsort(dim=-1, descending=True, stable=True)
        return tiles.sum(-1, dtype=torch.int32)[None, None], order.to(torch.int32)[None, None]

    return BlockMask.from_kv_blocks(*ordered(some & ~every), *ordered(every), BLOCK_SIZE=FLEX_TILE,
                                    mask_mod=mask_mod, seq_lengths=(T, S))


@functools.cache
def _fused_flex():
    """flex_attention compiled: called eagerly it materializes every score, the very thing it exists to avoid.
    Built on first use (torch.compile loads Dynamo, which costs a second or two at import). Static shapes: each
    new (T, S) compiles once (a few seconds), as a stage's new length or a long prompt does."""
    return torch.compile(flex_attention, dynamic=False)


def flex_local_attention(q, k, v, window):
    """Sliding-window attention as one fused FlexAttention kernel over the tiles the band touches: the CUDA
    path. Memory holds the block mask (a few MiB at 64K) and no scores; the tiles computed are about
    (2*window + tile) / S of all. Same contract as causal_attention. On a CPU, where only the tests call it
    (causal_attention takes the blocked kernel there), it runs unfused, forward only: the same mask and the same
    math, as inductor's CPU kernel of torch 2.13 returned wrong rows for a 40-position case (docs/log.md)."""
    mask = sliding_window_block_mask(q.shape[2], k.shape[2], window, q.device)
    fused = q.is_cuda and not torch.compiler.is_compiling()  # (a compiled model fuses it itself)
    return (_fused_flex() if fused else flex_attention)(q, k, v, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


# -----------------------------------------------------------------------------------------------------
# Rotary position embedding (RoPE). A long-context stage raises `base` so that far positions stay apart.

def rope_cache(positions, head_dim, base=10000.0):
    """The tables apply_rope takes for the given absolute positions, each (*positions.shape, head_dim): pair d
    (dims d and d + D/2) turns by angle position * base^(-2d/D); cos is [cos, cos], sin is [-sin, sin]."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    angles = positions.float()[..., None] * inv_freq  # (positions may be (B, T): one row each, for a ragged batch)
    return torch.cat([angles.cos(), angles.cos()], dim=-1), torch.cat([-angles.sin(), angles.sin()], dim=-1)


def apply_rope(x, cos, sin):
    """Rotate the pairs (x[..., d], x[..., d + D/2]) of x (B, H, T, D) by their angles: x1 cos - x2 sin and
    x2 cos + x1 sin, written as x * cos + (x2, x1) * sin with the signed tables of rope_cache (four ops and
    their backward instead of eight: at small widths per-op overhead is most of the time)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([x2, x1], dim=-1) * sin.to(x.dtype)


# -----------------------------------------------------------------------------------------------------
# One attention layer. Every layer is one of three kinds, spelled the same everywhere (config layout,
# blocks, KV cache, FLOP count):

LOCAL = "L"     # sliding window: sees the last `window` positions; caches at most `window` of them
GLOBAL = "G"    # sees every position; computes and caches its own K/V
SHARING = "S"   # global, but attends with the K/V of the GLOBAL layer before it: no K/V weights, nothing cached
KINDS = (LOCAL, GLOBAL, SHARING)


class Attention(nn.Module):
    """Multi-head causal self-attention with GQA, of one of the three kinds above (GPTConfig checks the
    settings). A SHARING layer owns only its query and output projections. `window` is what causal_attention
    takes: None for the global kinds; a training stage may change a local layer's (GPT.set_window)."""

    def __init__(self, n_embd, n_head, n_kv_head, kind=GLOBAL, window=None):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, n_embd // n_head
        self.kind = kind
        self.window = window if kind == LOCAL else None
        self.q_proj = nn.Linear(n_embd, n_head * self.head_dim, bias=False)
        self.kv_proj = None if kind == SHARING else nn.Linear(n_embd, 2 * n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_head * self.head_dim, n_embd, bias=False)

    def queries(self, x, cos, sin):
        """(B, n_head, T, head_dim): the rotated queries of x (B, T, C)."""
        B, T, _ = x.shape
        return apply_rope(self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2), cos, sin)

    def forward(self, x, cos, sin, kv=None, cache=None, layer=None):
        """x (B, T, C); cos/sin for the T new positions; kv: what the GLOBAL layer before a SHARING layer returned.
        Returns (y, (k, v, mask)): the keys and values this layer attended to, and the mask a cache gave for them
        (None but for a cache whose rows differ in length)."""
        B, T, C = x.shape
        q = self.queries(x, cos, sin)
        if self.kind == SHARING:
            k, v, mask = kv
        else:
            k, v = self.kv_proj(x).view(B, T, 2, self.n_kv_head, self.head_dim).permute(2, 0, 3, 1, 4)
            k, mask = apply_rope(k, cos, sin), None
            if cache is not None:
                k, v, mask = cache.update(layer, k, v)
        y = causal_attention(q, k, v, self.window, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C)), (k, v, mask)


# -----------------------------------------------------------------------------------------------------
# The KV cache for decoding

class KVCache:
    """Keys and values of past positions, per layer, for decoding one token (or a chunk) at a time.

    kinds: one per layer. LOCAL keeps a ring buffer of at most `window` positions (position p in slot p % window),
    GLOBAL every position up to max_len (position p in slot p), SHARING nothing (it reuses the GLOBAL layer before
    it). `filled` counts the positions written so far; advance() moves it once all layers have stored a step.
    """

    def __init__(self, kinds, window, batch_size, n_kv_head, head_dim, max_len, device=None, dtype=torch.float32):
        self.kinds, self.max_len, self.filled = list(kinds), max_len, 0
        self.k, self.v = [], []
        for kind in self.kinds:
            n = {LOCAL: min(window, max_len), GLOBAL: max_len, SHARING: 0}[kind]
            shape = (batch_size, n_kv_head, n, head_dim)
            self.k.append(torch.zeros(shape, device=device, dtype=dtype) if n else None)
            self.v.append(torch.zeros(shape, device=device, dtype=dtype) if n else None)

    def advance(self, T):
        """The T positions just stored by every layer are now filled (GPT.forward calls it after each step)."""
        self.filled += T

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)

    def positions(self, T, device):
        """The absolute positions of the next T tokens: every row's are the same."""
        return torch.arange(self.filled, self.filled + T, device=device)

    def select(self, row):
        """A KVCache over one row of this one's buffers (views: what it stores lands in this cache), filled to 0."""
        view = copy.copy(self)
        view.k, view.v = ([t[row:row + 1] if t is not None else None for t in ts] for ts in (self.k, self.v))
        view.filled = 0
        return view

    def check_room(self, T):
        if self.filled + T > self.max_len:
            raise ValueError(f"KV cache is full: it holds {self.max_len} positions, {self.filled} are used and "
                             f"{T} more were given; make the cache with a larger max_len")

    def update(self, layer, k, v):
        """Store the new k, v (B, H, T, D) at positions filled .. filled+T-1 of this layer and return every key and
        value the new queries may attend to, with no mask (rows of one length need none beyond causal_attention's
        own rule): only the slots written so far, in position order (a ring returns its slots unordered when
        T == 1: a single query's attention does not depend on key order)."""
        T, K, V, pos = k.shape[2], self.k[layer], self.v[layer], self.filled
        if self.kinds[layer] == GLOBAL:  # append
            K[:, :, pos:pos + T] = k
            V[:, :, pos:pos + T] = v
            return K[:, :, :pos + T], V[:, :, :pos + T], None
        n = K.shape[2]  # ring size; position p lives in slot p % n
        if T == 1:
            K[:, :, pos % n] = k[:, :, 0]
            V[:, :, pos % n] = v[:, :, 0]
            return K[:, :, :min(pos + 1, n)], V[:, :, :min(pos + 1, n)], None
        # A chunk: lay out the kept past in order, append the chunk, keep the last n positions in the ring.
        past = torch.arange(max(0, pos - n), pos, device=K.device) % n
        k_all = torch.cat([K[:, :, past], k], dim=2)
        v_all = torch.cat([V[:, :, past], v], dim=2)
        keep = torch.arange(pos + T - min(n, k_all.shape[2]), pos + T, device=K.device)
        K[:, :, keep % n] = k_all[:, :, keep - (pos + T - k_all.shape[2])]
        V[:, :, keep % n] = v_all[:, :, keep - (pos + T - v_all.shape[2])]
        return k_all, v_all, None


# -----------------------------------------------------------------------------------------------------
# A smoke test: python attention.py

if __name__ == "__main__":
    torch.manual_seed(0)
    B, Hq, Hkv, T, D, w = 2, 4, 2, 50, 16, 8
    q, k, v = torch.randn(B, Hq, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    i, j = torch.arange(T)[:, None], torch.arange(T)
    naive = ((q @ k.repeat_interleave(Hq // Hkv, 1).transpose(-1, -2)) / D ** 0.5).masked_fill(
        ~((j <= i) & (j > i - w)), float("-inf")).softmax(-1) @ v.repeat_interleave(Hq // Hkv, 1)
    local = causal_attention(q, k, v, window=w)
    print(f"sliding window {w} over T={T}: q {tuple(q.shape)}, k/v {tuple(k.shape)} -> {tuple(local.shape)}; "
          f"equals a naive masked softmax: {torch.allclose(local, naive, atol=1e-5)}")
    kinds = [LOCAL, LOCAL, LOCAL, GLOBAL, LOCAL, LOCAL, LOCAL, SHARING]
    layers = [Attention(64, 4, 2, kind, window=w) for kind in kinds]
    x = torch.randn(1, 30, 64)

    def run(x, start, cache=None):  # the stack of layers, each adding to a residual stream
        cos, sin = rope_cache(torch.arange(start, start + x.shape[1]), 16)
        kv = None
        for n, layer in enumerate(layers):
            y, layer_kv = layer(x, cos, sin, kv, cache, n)
            kv = layer_kv if layer.kind == GLOBAL else kv
            x = x + y
        if cache is not None:
            cache.advance(x.shape[1])
        return x

    with torch.no_grad():
        cache = KVCache(kinds, w, 1, 2, 16, max_len=30)
        stepped = torch.cat([run(x[:, :10], 0, cache)] + [run(x[:, t:t + 1], t, cache) for t in range(10, 30)], 1)
        print(f"layout {''.join(kinds)}: a 10-token prompt then 20 tokens one at a time through the KV cache equal "
              f"one full forward: {torch.allclose(stepped, run(x, 0), atol=1e-5)}")
    every = KVCache([GLOBAL] * 8, w, 1, 2, 16, max_len=30)
    print(f"KV cache for 30 positions: {cache.nbytes():,} bytes, against {every.nbytes():,} with every layer global "
          f"and its own K/V")
