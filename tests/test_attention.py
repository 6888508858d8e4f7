import math

import pytest
import torch

import attention
from attention import (GLOBAL, LOCAL, SHARING, Attention, KVCache, apply_rope, causal_attention, flex_local_attention,
                       rope_cache, sliding_window_block_mask)


def reference(q, k, v, window):
    """Naive attention in float64 with an explicit (T, S) mask: the queries are the last T of S positions."""
    B, Hq, T, D = q.shape
    S, g = k.shape[2], Hq // k.shape[1]
    k, v = k.double().repeat_interleave(g, dim=1), v.double().repeat_interleave(g, dim=1)
    i = torch.arange(T)[:, None] + (S - T)
    j = torch.arange(S)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= j > i - window
    scores = (q.double() @ k.transpose(-1, -2)) / math.sqrt(D)
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


CASES = [  # (T, S, Hq, Hkv, window)
    (37, 37, 4, 4, 8),     # T not a multiple of the window
    (20, 20, 4, 2, 64),    # window >= T
    (16, 16, 2, 1, 1),     # window 1: each query sees only itself
    (33, 33, 4, 2, 5),     # GQA 2
    (33, 33, 8, 2, 6),     # GQA 4
    (20, 20, 4, 2, 12),    # short (S <= 4 windows): one masked call instead of blocks
    (5, 30, 4, 2, 16),     # short, continuing a cache
    (7, 40, 4, 2, 9),      # S > T: queries continue a cache
    (1, 40, 4, 1, 9),      # one decoding query
    (30, 30, 4, 2, None),  # global
    (6, 25, 4, 4, None),   # global, continuing a cache
]


@pytest.mark.parametrize("T,S,Hq,Hkv,window", CASES)
def test_matches_reference(T, S, Hq, Hkv, window):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, Hq, T, 16), torch.randn(2, Hkv, S, 16), torch.randn(2, Hkv, S, 16)
    out = causal_attention(q, k, v, window)
    assert out.shape == (2, Hq, T, 16)
    torch.testing.assert_close(out.double(), reference(q, k, v, window), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T,S,window", [(45, 45, 8), (10, 31, 7)])
def test_local_gradients_match_reference(T, S, window):
    torch.manual_seed(1)
    q = torch.randn(1, 4, T, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, S, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, S, 8, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(1, 4, T, 8, dtype=torch.float64)
    grads = torch.autograd.grad((causal_attention(q, k, v, window) * grad_out).sum(), (q, k, v))
    expected = torch.autograd.grad((reference(q, k, v, window) * grad_out).sum(), (q, k, v))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("T,S,window", [(45, 45, 4), (13, 40, 3)])
def test_local_kernel_split_into_many_calls(monkeypatch, T, S, window):
    """The local kernel sends a few blocks per SDPA call; force one block per call and compare."""
    import attention
    monkeypatch.setattr(attention, "SCORES_PER_CALL", 1)
    torch.manual_seed(2)
    q = torch.randn(2, 4, T, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, S, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, S, 8, dtype=torch.float64, requires_grad=True)
    out = causal_attention(q, k, v, window)
    torch.testing.assert_close(out, reference(q, k, v, window), atol=1e-10, rtol=1e-8)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    expected = torch.autograd.grad(reference(q, k, v, window).sum(), (q, k, v))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)


# The CUDA path: FlexAttention with a block mask worked out per tile. Its forward runs on CPU too (no backward
# there), so its mask and its output are checked here; on a GPU the same tests also check the gradients.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLEX_CASES = [  # (T, S, window), tiles of 128
    (256, 256, 64), (300, 300, 64), (129, 129, 1), (1000, 1000, 300), (200, 461, 100), (257, 385, 128), (1, 40, 8)]


@pytest.mark.parametrize("T,S,window", FLEX_CASES)
def test_flex_block_mask_matches_torchs_own(T, S, window):
    """torch's create_block_mask evaluates the mask at every (query, key) pair: the reference for the tile
    classes that sliding_window_block_mask works out in closed form."""
    from torch.nn.attention.flex_attention import create_block_mask
    offset = S - T
    want = create_block_mask(lambda b, h, i, j: (j <= i + offset) & (j > i + offset - window), None, None, T, S,
                             device="cpu")
    got = sliding_window_block_mask(T, S, window, "cpu")

    def tiles(num, idx):  # per query tile, the set of key tiles listed
        return [set(idx[0, 0, r, :num[0, 0, r]].tolist()) for r in range(num.shape[2])]
    assert tiles(got.kv_num_blocks, got.kv_indices) == tiles(want.kv_num_blocks, want.kv_indices)  # masked
    assert tiles(got.full_kv_num_blocks, got.full_kv_indices) == tiles(want.full_kv_num_blocks, want.full_kv_indices)
    assert got.seq_lengths == (T, S)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T,S,window", [(300, 300, 64), (200, 461, 100), (40, 40, 9)])
def test_flex_local_attention_matches_reference(device, T, S, window):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, T, 16), torch.randn(2, 2, S, 16), torch.randn(2, 2, S, 16)
    grad = device != "cpu"
    q, k, v = (t.to(device).requires_grad_(grad) for t in (q, k, v))
    out = flex_local_attention(q, k, v, window)
    torch.testing.assert_close(out.double().cpu(), reference(q.cpu(), k.cpu(), v.cpu(), window).detach(),
                               atol=1e-5, rtol=1e-5)
    if grad:
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        expected = torch.autograd.grad(reference(q, k, v, window).sum(), (q, k, v))
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_flex_block_mask_is_linear_in_context():
    """At 64K with a 4096 window, each query tile computes only the tiles the band touches (33 of 512), and
    the mask's tensors are a few MiB, not the 4G entries of a per-position mask."""
    mask = sliding_window_block_mask(65536, 65536, 4096, "cpu")
    per_row = mask.kv_num_blocks + mask.full_kv_num_blocks
    assert per_row.max().item() == 4096 // 128 + 1 and per_row.min().item() == 1  # the first tile sees itself
    assert sum(t.numel() for t in vars(mask).values() if isinstance(t, torch.Tensor)) < 2 ** 21


def test_flex_path_traces_into_one_graph(monkeypatch):
    """Inside a compiled model the block mask and the flex kernel are traced with the rest: one frame, and the
    same output. (CUDA takes this path; on CPU it is put in place of the blocked kernel for the test.)"""
    from torch._dynamo.testing import CompileCounterWithBackend
    monkeypatch.setattr(attention, "_local_attention", flex_local_attention)
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer, counter = Attention(64, 4, 2, kind=LOCAL, window=32).eval(), CompileCounterWithBackend("aot_eager")
    x, (cos, sin) = torch.randn(2, 160, 64), rope_cache(torch.arange(160), 16)
    with torch.no_grad():
        got = torch.compile(layer, backend=counter)(x, cos, sin)[0]
    assert counter.frame_count == 1
    monkeypatch.undo()
    torch.testing.assert_close(got, layer(x, cos, sin)[0], atol=1e-5, rtol=1e-5)


def test_local_cost_is_linear_in_memory():
    """The local kernel never builds a T x T score matrix: its mask holds O(T * window) entries."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 4096, 8) for _ in range(3))
    seen = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q_, k_, v_, attn_mask=None, **kw):
        seen.append(attn_mask.numel() if attn_mask is not None else 0)
        return real_sdpa(q_, k_, v_, attn_mask=attn_mask, **kw)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        causal_attention(q, k, v, window=16)
    finally:
        torch.nn.functional.scaled_dot_product_attention = real_sdpa
    assert seen and max(seen) <= 4096 * 2 * 16 * 2


@pytest.mark.parametrize("q_shape,k_shape", [
    ((1, 3, 8, 16), (1, 2, 8, 16)),  # query heads not a multiple of key/value heads
    ((1, 4, 8, 16), (1, 2, 8, 8)),   # head dims differ
    ((1, 4, 8, 16), (1, 2, 5, 16)),  # fewer keys than queries
])
def test_shapes_that_do_not_fit_are_refused(q_shape, k_shape):
    # (the settings behind them, n_head, n_kv_head and n_embd, are checked once, by GPTConfig: test_model.py)
    with pytest.raises(AssertionError):
        causal_attention(torch.randn(q_shape), torch.randn(k_shape), torch.randn(k_shape))


def test_rope_turns_each_pair_by_its_angle():
    """Against a plain 2x2 rotation per pair: dims d and d + D/2 turn by position * base^(-2d/D)."""
    torch.manual_seed(0)
    x, positions, base = torch.randn(2, 3, 5, 8, dtype=torch.float64), torch.tensor([0, 1, 7, 100, 4096]), 500.0
    want = x.clone()
    for t, pos in enumerate(positions.tolist()):
        for d in range(4):
            angle = pos * base ** (-2 * d / 8)
            a, b = x[:, :, t, d], x[:, :, t, d + 4]
            want[:, :, t, d], want[:, :, t, d + 4] = a * math.cos(angle) - b * math.sin(angle), \
                b * math.cos(angle) + a * math.sin(angle)
    cos, sin = rope_cache(positions, 8, base)
    # (the tables are float32: at position 4096 their angles are off by about 1e-4)
    torch.testing.assert_close(apply_rope(x, cos.double(), sin.double()), want, atol=1e-3, rtol=0)


def test_rope_is_a_relative_rotation():
    """Rotated q.k depends only on the distance between positions, and base changes the angles."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(i, j, base=10000.0):
        cq, sq = rope_cache(torch.tensor([i]), 16, base)
        ck, sk = rope_cache(torch.tensor([j]), 16, base)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum().item()

    assert score(5, 2) == pytest.approx(score(105, 102), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 2, base=500000.0), abs=1e-4)
    cos, sin = rope_cache(torch.tensor([0]), 16)
    torch.testing.assert_close(apply_rope(q, cos, sin), q)  # position 0 is the identity


def make_stack(window):
    """local, global, sharing (reuses the global's K/V), local, global layers."""
    kinds = [LOCAL, GLOBAL, SHARING, LOCAL, GLOBAL]
    return kinds, [Attention(32, 4, 2, kind, window) for kind in kinds]


def run_stack(layers, x, start, cache=None):
    cos, sin = rope_cache(torch.arange(start, start + x.shape[1]), 8)
    kv = None
    for i, layer in enumerate(layers):
        y, layer_kv = layer(x, cos, sin, kv=kv, cache=cache, layer=i)
        if layer.kind == GLOBAL:
            kv = layer_kv
        x = x + y
    if cache is not None:
        cache.advance(x.shape[1])
    return x


def test_sharing_layer_has_no_kv_weights():
    _, layers = make_stack(4)
    assert layers[2].kv_proj is None and layers[1].kv_proj is not None
    assert sum(p.numel() for p in layers[2].parameters()) < sum(p.numel() for p in layers[1].parameters())


@torch.no_grad()
def test_decoding_through_the_cache_matches_a_full_forward():
    torch.manual_seed(0)
    window = 5
    kinds, layers = make_stack(window)
    x = torch.randn(2, 4 + 3 * window, 32)
    full = run_stack(layers, x, 0)
    cache = KVCache(kinds, window, 2, 2, 8, max_len=x.shape[1])
    prefill = run_stack(layers, x[:, :4], 0, cache)  # a prompt, then one token at a time
    steps = [run_stack(layers, x[:, t:t + 1], t, cache) for t in range(4, x.shape[1])]
    torch.testing.assert_close(torch.cat([prefill] + steps, dim=1), full, atol=1e-5, rtol=1e-5)
    # Local layers never hold more than `window` positions; sharing layers hold nothing.
    assert cache.k[0].shape[2] == window and cache.k[2] is None and cache.k[1].shape[2] == x.shape[1]


@torch.no_grad()
def test_chunked_decoding_matches_a_full_forward():
    torch.manual_seed(0)
    kinds, layers = make_stack(4)
    x = torch.randn(1, 23, 32)
    full = run_stack(layers, x, 0)
    cache = KVCache(kinds, 4, 1, 2, 8, max_len=23)
    out = [run_stack(layers, x[:, a:b], a, cache) for a, b in ((0, 3), (3, 10), (10, 11), (11, 23))]
    torch.testing.assert_close(torch.cat(out, dim=1), full, atol=1e-5, rtol=1e-5)


def test_cache_size_and_overflow():
    window, L, B, H, D = 16, 256, 2, 2, 8
    cache = KVCache(list("LLLGLLLS"), window, B, H, D, L)
    per_position = 2 * B * H * D * 4  # K and V, fp32
    assert cache.nbytes() == per_position * (6 * window + 1 * L)
    cache.advance(L - 1)
    cache.check_room(1)
    with pytest.raises(ValueError, match="KV cache is full"):
        cache.check_room(2)
