"""engine.py against an independent reference: every request decoded alone by GPT.generate (one sequence, a plain
KVCache), token for token; the schedule's promises (a finished row goes to the next request at once, the cache
never exceeds its budget) observed from outside; bad requests refused in one line."""

import pytest
import torch

from engine import Engine, Request
from model import GPT, GPTConfig, kv_cache_bytes

SHAPES = {  # window 8 and prompts up to 40: local rings wrap, in prefill chunks and in decoding
    "hybrid_moe": dict(attn_pattern="LLLG", share_kv=True, n_layer=8),
    "all_global": dict(attn_pattern="G", share_kv=False, n_layer=4),
    "dense_local": dict(attn_pattern="LG", n_layer=2, n_dense_layers=2),
}


def model_of(shape, seed=0):
    """A random model whose greedy output depends on its context (at the init's scale, with tied embeddings, it
    repeats its last token whatever came before, and a wrong key or position would go unseen)."""
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=96, block_size=96, n_head=4, n_kv_head=2, n_embd=32, window=8, n_experts=4,
                       expert_hidden=16, tie_embeddings=False, **SHAPES[shape])
    model = GPT(config, verbose=False).eval()
    with torch.no_grad():
        for w in model.parameters():
            w.mul_(4 if w.dim() == 2 else 1)
    return model


def prompts(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 90, (int(torch.randint(1, 41, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def alone(model, request, eot=None):
    """The reference: the request decoded by itself with GPT.generate, cut at its first end-of-text."""
    out = model.generate(torch.tensor([request.prompt]), request.max_new_tokens, temperature=0)[0]
    tokens = out[len(request.prompt):].tolist()
    return tokens[:tokens.index(eot)] if eot in tokens else tokens


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("slots,chunk", [(3, 8), (16, 512)])
def test_a_ragged_greedy_batch_is_each_request_decoded_alone(shape, slots, chunk):
    model = model_of(shape)
    requests = [Request(p, max_new_tokens=5 + 7 * (i % 4)) for i, p in enumerate(prompts(7))]
    engine = Engine(model, kv_budget=slots * kv_cache_bytes(model.config, 96, torch.float32), prefill_chunk=chunk)
    assert engine.slots == slots
    results = {r.index: r for r in engine.serve(requests)}
    assert sorted(results) == list(range(7))
    for i, request in enumerate(requests):
        assert results[i].tokens == alone(model, request), f"request {i}"
        assert results[i].finished == "length"


def test_every_step_s_logits_are_the_whole_sequence_s_without_a_cache(monkeypatch):
    """Stronger than tokens: the logits each row is sampled from, against one forward over the request's whole
    text so far with no cache at all (so no ring, no mask, no row position can be wrong in both)."""
    model, seen = model_of("hybrid_moe"), {}
    real = Engine.sample

    def recording(self, logits, seqs):
        for row, seq in zip(logits, seqs):
            seen.setdefault(seq.index, []).append(row.clone())
        return real(self, logits, seqs)
    monkeypatch.setattr(Engine, "sample", recording)
    requests = [Request(p, max_new_tokens=12) for p in prompts(6, seed=2)]
    results = {r.index: r for r in Engine(model, kv_budget=3 * kv_cache_bytes(model.config, 96, torch.float32),
                                          prefill_chunk=16).serve(requests)}
    for i, request in enumerate(requests):
        text = torch.tensor([request.prompt + results[i].tokens])
        with torch.no_grad():
            reference = model(text, text)[0][0, len(request.prompt) - 1:-1]  # (targets: logits at every position)
        assert torch.allclose(torch.stack(seen[i]), reference, atol=1e-4, rtol=1e-4), f"request {i}"


def test_a_request_that_ends_frees_its_row_for_the_next_before_the_others_end():
    model = model_of("hybrid_moe")
    first, long, waiting = (Request(p, max_new_tokens=n) for p, n in zip(prompts(3, seed=5), (30, 40, 10)))
    others = set(alone(model, long) + alone(model, waiting))
    eot = next(t for t in alone(model, first)[2:] if t not in others)  # one only request 0 makes: end-of-text
    engine = Engine(model, kv_budget=2 * kv_cache_bytes(model.config, 96, torch.float32), eot=eot)
    order = list(engine.serve([first, long, waiting]))
    done = {r.index: r for r in order}
    assert done[0].finished == "eot" and done[0].tokens == alone(model, first, eot)
    assert order[0].index == 0  # it left first,
    assert done[2].first_token_s < done[1].done_s  # and request 2 took its row while request 1 still decoded
    assert done[1].tokens == alone(model, long, eot) and done[2].tokens == alone(model, waiting, eot)


def test_the_cache_never_exceeds_its_budget_and_a_hybrid_fits_more(monkeypatch):
    hybrid, dense = model_of("hybrid_moe"), model_of("all_global")
    budget = 10 ** 6
    engines = [Engine(m, kv_budget=budget) for m in (hybrid, dense)]
    for engine in engines:
        assert engine.cache.nbytes() <= budget < engine.cache.nbytes() + engine.row_bytes  # as many rows as fit
    assert engines[0].slots > 2 * engines[1].slots  # local rings of 8 and shared K/V, against 4 full layers
    seen = []
    real = Engine.decode
    monkeypatch.setattr(Engine, "decode", lambda self, running: (seen.append(len(running)), real(self, running)))
    engine = Engine(hybrid, kv_budget=4 * engines[0].row_bytes)
    list(engine.serve([Request(p, max_new_tokens=6) for p in prompts(11)]))
    assert max(seen) == 4 and engine.cache.nbytes() <= 4 * engines[0].row_bytes


def test_a_sampled_request_does_not_depend_on_the_others():
    model = model_of("hybrid_moe")
    mine = Request(prompts(1, seed=9)[0], max_new_tokens=20, temperature=0.9, top_p=0.9, seed=3)
    engine = Engine(model, kv_budget=4 * kv_cache_bytes(model.config, 96, torch.float32))
    by_itself = next(engine.serve([mine])).tokens
    crowd = [Request(p, max_new_tokens=15, temperature=1.0, seed=i) for i, p in enumerate(prompts(5))]
    together = {r.index: r.tokens for r in engine.serve(crowd[:2] + [mine] + crowd[2:])}
    assert together[2] == by_itself and len(by_itself) == 20


@pytest.mark.parametrize("shape,request_,message", [
    ("hybrid_moe", Request([]), "request 0: prompt must be a non-empty list of token ids below 96"),
    ("hybrid_moe", Request([1, 500]), "prompt must be a non-empty list of token ids below 96"),
    ("hybrid_moe", Request([1], max_new_tokens=0), "max_new_tokens must be a whole number >= 1"),
    ("hybrid_moe", Request([1], temperature=-1), "temperature must be a finite number >= 0"),
    ("hybrid_moe", Request([1], top_p=1.5), "top_p must be in (0, 1]"),
    ("hybrid_moe", Request([1] * 50, max_new_tokens=100), "needs 149 positions; a row of this engine's cache holds 96"),
    ("all_global", Request([1] * 50, max_new_tokens=100), "past block_size (96), and a model without local layers"),
    ("hybrid_moe", {"prompt": [1], "temprature": 0.5}, "unknown request setting(s) ['temprature']"),
])
def test_bad_requests_are_refused_in_one_line(shape, request_, message):
    model = model_of(shape)
    max_len = 200 if "past block_size" in message else None
    engine = Engine(model, kv_budget=10 ** 7, max_len=max_len)
    with pytest.raises(ValueError) as refused:
        list(engine.serve([request_]))
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_a_budget_too_small_for_one_sequence_is_refused():
    with pytest.raises(ValueError, match=r"holds no sequence: one of 96 positions needs"):
        Engine(model_of("all_global"), kv_budget=1000)
