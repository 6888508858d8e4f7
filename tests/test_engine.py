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
    assert engine.n_rows == slots
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
            seen.setdefault(seq.id, []).append(row.clone())
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
        assert engine.cache.kv.nbytes() <= budget < engine.cache.kv.nbytes() + engine.row_bytes  # as many rows as fit
    assert engines[0].n_rows > 2 * engines[1].n_rows  # local rings of 8 and shared K/V, against 4 full layers
    seen = []
    real = Engine.decode_step
    monkeypatch.setattr(Engine, "decode_step", lambda self: (seen.append(len(self.running)), real(self))[1])
    engine = Engine(hybrid, kv_budget=4 * engines[0].row_bytes)
    list(engine.serve([Request(p, max_new_tokens=6) for p in prompts(11)]))
    assert max(seen) == 4 and engine.cache.kv.nbytes() <= 4 * engines[0].row_bytes


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
    ("hybrid_moe", Request([1], seed=2 ** 64), "seed must be a whole number in [0, 2**63)"),
    ("hybrid_moe", Request([1], seed=1.5), "seed must be a whole number in [0, 2**63)"),
    ("hybrid_moe", Request([1], stop=["\n"]), "stop strings need the engine's decode"),
    ("hybrid_moe", Request([1], stop_ids=[1, 500]), "stop_ids must be a list of token ids below 96"),
    ("hybrid_moe", Request([1], max_new_tokens=True), "max_new_tokens must be a whole number >= 1"),
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


@pytest.mark.parametrize("settings,message", [
    (dict(kv_budget=1000), r"holds no sequence: one of 96 positions needs"),
    (dict(kv_budget=float("nan")), r"kv_budget must be a finite number of bytes > 0; got nan"),
    (dict(kv_budget=float("inf")), r"kv_budget must be a finite number of bytes > 0; got inf"),
    (dict(kv_budget=10 ** 7, prefill_chunk=0), r"prefill_chunk must be a whole number >= 1; got 0"),  # (looped forever)
    (dict(kv_budget=10 ** 7, max_batch=0), r"max_batch must be a whole number >= 1"),
])
def test_engine_settings_that_cannot_serve_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        Engine(model_of("all_global"), **settings)


# -----------------------------------------------------------------------------------------------------
# Online serving: requests that arrive between steps, streaming outputs, cancellation, stops, shared prefills

def run_online(engine, arrivals, steps=400):
    """Step the engine, adding arrivals[s] (a list of Requests) before step s. Returns ({id: tokens}, {id: reason},
    {id: [each step's output]}), and the id of each request in arrival order."""
    tokens, reasons, outputs, ids = {}, {}, {}, []
    for s in range(steps):
        for request in arrivals.get(s, []):
            ids += engine.add_request(request)
        if not engine.busy() and s > max(arrivals):
            break
        for out in engine.step():
            tokens.setdefault(out.id, []).extend(out.tokens)
            outputs.setdefault(out.id, []).append(out)
            if out.finished:
                reasons[out.id] = out.finished
    return tokens, reasons, outputs, ids


@pytest.mark.parametrize("shape", ["hybrid_moe", "all_global"])
def test_requests_added_between_steps_and_during_a_long_prefill_are_each_decoded_alone(shape):
    model = model_of(shape)
    ps = prompts(6, seed=11)
    long_prompt = list(range(1, 61))  # 60 tokens in chunks of 8: its prefill spans eight steps
    arrivals = {0: [Request(ps[0], 20), Request(ps[1], 6)], 3: [Request(long_prompt, 12)],
                5: [Request(ps[2], 15)],  # (the long prompt is still being prefilled)
                9: [Request(ps[3], 9), Request(ps[4], 25)], 30: [Request(ps[5], 4)]}
    engine = Engine(model, kv_budget=3 * kv_cache_bytes(model.config, 96, torch.float32), prefill_chunk=8)
    tokens, reasons, outputs, ids = run_online(engine, arrivals)
    requests = [r for s in sorted(arrivals) for r in arrivals[s]]
    assert len(ids) == len(requests) == len(reasons)
    for rid, request in zip(ids, requests):
        assert tokens[rid] == alone(model, request), f"request {rid}"
        assert reasons[rid] == "length" and [o.finished for o in outputs[rid]][-1] == "length"
        assert sum(o.finished is not None for o in outputs[rid]) == 1  # (each ends once, and says so)


def test_a_cancelled_request_frees_its_row_for_the_next():
    model = model_of("hybrid_moe")
    first, second = Request(prompts(1, seed=3)[0], 60), Request(prompts(1, seed=4)[0], 10)
    engine = Engine(model, kv_budget=kv_cache_bytes(model.config, 96, torch.float32))  # one row
    (a,), (b,) = engine.add_request(first), engine.add_request(second)
    for _ in range(5):
        assert {o.id for o in engine.step()} == {a}  # b waits for the only row
    assert engine.cancel(a) and not engine.cancel(12345)
    out = {o.id: o for o in engine.step()}
    assert out[a].finished == "cancelled" and out[a].tokens == []
    assert b in out and len(out[b].tokens) >= 1  # admitted in the same step, into the freed row
    tokens = list(out[b].tokens)
    while engine.busy():
        tokens += [t for o in engine.step() for t in o.tokens]
    assert tokens == alone(model, second)


def test_stop_strings_that_span_token_boundaries_stop_exactly():
    model = model_of("hybrid_moe")
    decode = lambda ids: "".join(chr(97 + t % 26) + chr(65 + t % 7) for t in ids)  # noqa: E731  two letters a token
    request = Request(prompts(1, seed=6)[0], 30)
    reference = alone(model, request)
    full = decode(reference)
    j = 5  # a stop string from the second letter of token 5 to the first of token 6
    stop = full[2 * j + 1:2 * j + 3]
    cut = full.find(stop)
    engine = Engine(model, kv_budget=10 ** 7, decode=decode)
    (rid,) = engine.add_request(Request(request.prompt, 30, stop=[stop, "never there"]))
    outs = []
    while engine.busy():
        outs += engine.step()
    assert "".join(o.text for o in outs) == full[:cut] and outs[-1].finished == "stop"
    assert all(stop not in "".join(o.text for o in outs[:i + 1]) for i in range(len(outs)))
    result = next(Engine(model, kv_budget=10 ** 7, decode=decode).serve([Request(request.prompt, 30, stop=[stop])]))
    assert result.text == full[:cut] and result.finished == "stop"
    assert result.tokens == reference[:cut // 2]  # the tokens whose text lies wholly before the stop
    ids = Engine(model, kv_budget=10 ** 7).serve([Request(request.prompt, 30, stop_ids=[reference[7]])])
    assert next(ids).tokens == reference[:reference.index(reference[7])]  # a stop id, left out as end-of-text is


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_n_samples_from_one_shared_prefill_equal_n_separate_serves(temperature, monkeypatch):
    model = model_of("hybrid_moe")
    request = Request(prompts(1, seed=8)[0] * 2, 16, temperature=temperature, seed=40)
    separate = [next(Engine(model, kv_budget=10 ** 7).serve([Request(request.prompt, 16, temperature, seed=40 + j)]))
                .tokens for j in range(4)]
    prefills = []
    real = type(model).forward
    monkeypatch.setattr(type(model), "forward", lambda self, idx, *a, **k: (
        prefills.append(idx.shape[1]) if idx.shape[0] == 1 and idx.shape[1] > 1 else None, real(self, idx, *a, **k))[1])
    engine = Engine(model, kv_budget=4 * kv_cache_bytes(model.config, 96, torch.float32))
    ids = engine.add_request(request, n=4)
    tokens = {i: [] for i in ids}
    while engine.busy():
        for out in engine.step():
            tokens[out.id] += out.tokens
    assert [tokens[i] for i in ids] == separate and len(prefills) == 1  # one prefill, four rows
    if temperature:
        assert len({tuple(t) for t in separate}) > 1  # (seeded samples of one prompt that differ)


def test_serve_takes_any_iterable_and_one_engine_serves_once_at_a_time():
    model = model_of("all_global")
    requests = [Request(p, 5, top_p=1) for p in prompts(3)]  # (top_p=1, an int, is a whole nucleus: allowed)
    engine = Engine(model, kv_budget=10 ** 7)
    assert sorted(r.index for r in engine.serve(r for r in requests)) == [0, 1, 2]  # (a generator was served: [])
    running = engine.serve(requests)
    next(running)
    with pytest.raises(ValueError, match="already serving"):
        next(engine.serve(requests))
    with pytest.raises(ValueError, match="inside serve"):
        engine.add_request(requests[0])
    running.close()  # a serve stopped early leaves the engine idle, its requests gone
    assert not engine.busy() and len(list(engine.serve(requests))) == 3
