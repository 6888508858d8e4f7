import math

import pytest
import torch

from model import GPT, GPTConfig, PRESETS, compile_model, make_config, preset, weight_inits

SMALL = dict(vocab_size=101, block_size=64, n_layer=8, n_head=4, n_kv_head=2, n_embd=32, window=4,
             attn_pattern="LLLG", share_kv=True, n_experts=6, n_shared=1, expert_hidden=16, mlp_hidden=48)


def test_layout():
    config = GPTConfig(**SMALL)
    assert config.layout() == ["L", "L", "L", "G", "L", "L", "L", "S"]
    model = GPT(config, verbose=False)
    assert model.blocks[7].attn.kv_proj is None and model.blocks[3].attn.window is None
    assert len(model.moe_layers()) == 7  # all but the first (n_dense_layers=1)


@torch.no_grad()
def test_greedy_decoding_with_cache_equals_recomputation():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL), verbose=False).eval()
    idx = torch.randint(0, 101, (2, 6))
    new = 3 * SMALL["window"] + 4
    out = model.generate(idx, new, temperature=0)
    seq = idx
    for _ in range(new):  # what nanoGPT does: the whole context again at every step
        logits, _ = model(seq)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_loss_at_init_is_log_vocab():
    torch.manual_seed(0)
    config = GPTConfig(**{**SMALL, "vocab_size": 500})
    model = GPT(config, verbose=False)
    x, y = torch.randint(0, 500, (4, 32)), torch.randint(0, 500, (4, 32))
    logits, loss, parts = model(x, y, parts=True)
    assert abs(parts.ce.item() - math.log(500)) < 0.1
    assert loss.item() == pytest.approx(parts.ce.item() + parts.aux.item(), rel=1e-6)
    # per-token losses: the cross-entropy of each position, computed here by hand
    by_hand = -logits.log_softmax(-1).gather(-1, y[..., None])[..., 0]
    torch.testing.assert_close(parts.token_loss, by_hand, atol=1e-5, rtol=1e-5)
    assert len(parts.routing) == 7 and parts.routing[0].experts_per_token.shape == (4, 32)
    # the two-value form stays for the plain call
    assert torch.equal(model(x, y)[1], loss)


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL), verbose=False)
    x = torch.randint(0, 101, (4, 32))
    y = torch.roll(x, -1, dims=1)
    opt = model.configure_optimizer(0.0, 3e-3, (0.9, 0.95), "cpu")
    first = None
    for _ in range(200):
        _, loss, parts = model(x, y, parts=True)
        first = first or parts.ce.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert parts.ce.item() < first / 2


def test_active_parameter_count_by_hand():
    c = make_config(dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_kv_head=1, n_embd=8, window=4,
                         attn_pattern="LG", n_experts=4, n_shared=1, expert_hidden=4, mlp_hidden=12,
                         routing="top_k", top_k=2))
    model = GPT(c, verbose=False)
    d, hd = 8, 4
    emb = 50 * d                                           # tied with the output layer
    attn = d * d + d * 2 * 1 * hd + d * d                  # q, kv (1 kv head), o
    norms = 2 * d * 2 + d                                  # two per block, one final
    dense = 3 * d * 12                                     # layer 0: SwiGLU of 12
    router, expert, shared = d * 4, 3 * d * 4, 3 * d * 4   # layer 1: MoE
    total = emb + 2 * attn + norms + dense + router + 4 * expert + shared
    assert model.num_params() == total
    assert model.num_params(active=True) == total - 4 * expert + 2 * expert
    assert model.num_params(active=True, experts_per_token=1.5) == round(total - 4 * expert + 1.5 * expert)
    # The live routing counts, not the config's: a stage may switch a layer to top-p, whose count varies.
    model.moe_layers()[0].config = c.router.updated(4, routing="top_p", top_p=0.5)
    with pytest.raises(ValueError, match="measured experts_per_token"):
        model.num_params(active=True)
    assert model.num_params(active=True, experts_per_token=[3.0]) == total - 4 * expert + 3 * expert
    model.moe_layers()[0].config = c.router.updated(4, top_k=3)
    assert model.num_params(active=True) == total - 4 * expert + 3 * expert


@pytest.mark.parametrize("change,message", [
    (dict(n_embd=30), "divisible by n_head"),
    (dict(n_kv_head=3), "multiple of n_kv_head"),
    (dict(attn_pattern="LLLL", share_kv=True), "share_kv"),
    (dict(n_layer=4, attn_pattern="LLLG", share_kv=True), "share_kv"),
    (dict(window=0), "window"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.2), "top_p"),
    (dict(top_k=7), "top_k"),
    (dict(attn_pattern="LXG"), "attn_pattern"),
    (dict(min_k=3, max_k=2), "max_k"),
    (dict(routing="top_q"), "routing"),
    (dict(n_experts=0), "n_experts must be >= 1"),
    (dict(n_shared=-1), "n_shared must be >= 0"),
    (dict(n_attn_only=9), "n_attn_only must be in .0, n_layer."),
    (dict(n_attn_only=4, n_dense_layers=5), "n_dense_layers must be in .0, n_layer - n_attn_only."),
    (dict(target_experts=9), "target_experts"),
])
def test_bad_configs(change, message):
    with pytest.raises(ValueError, match=message):
        make_config({**SMALL, **change})


def test_presets_build():
    for name in PRESETS:
        config = preset(name)
        assert config.n_embd % config.n_head == 0
    GPT(preset("tiny_8x64", vocab_size=128), verbose=False)


@torch.no_grad()
def test_generation_never_produces_padding_ids():
    # A model whose padding ids (past the tokenizer's 90) have by far the largest logits.
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL), verbose=False).eval()
    model.lm_head.register_forward_hook(lambda module, args, out: out + 100.0 * (torch.arange(101) >= 90))
    prompt = torch.zeros(4, 2, dtype=torch.long)
    assert (model.generate(prompt, 10, temperature=0)[:, 2:] >= 90).all()  # (what happens without the limit)
    for temperature, top_k, top_p in ((0, None, None), (1.0, None, None), (1.0, 5, None), (1.5, None, 0.9)):
        out = model.generate(prompt, 10, temperature, top_k, top_p, vocab_size=90)
        assert (out[:, 2:] < 90).all()


@torch.no_grad()
def test_the_kv_cache_takes_the_autocast_dtype():
    model = GPT(GPTConfig(**SMALL), verbose=False).eval()
    assert model.make_cache(1, 8).k[0].dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cache = model.make_cache(1, 8)
        assert all(t.dtype == torch.bfloat16 for t in cache.k + cache.v if t is not None)
        out = model.generate(torch.zeros(1, 3, dtype=torch.long), 5, temperature=0, cache=cache)
    assert out.shape == (1, 8)


def allowed_tokens(row, top_k, top_p):
    """The tokens sampling may pick from probabilities `row`: the top_k most likely (ties to the lower id),
    then, renormalised, the shortest prefix whose mass reaches top_p."""
    order = sorted(range(len(row)), key=lambda e: (-row[e], e))[:top_k or len(row)]
    if top_p is None:
        return set(order)
    total, mass, chosen = sum(row[e] for e in order), 0.0, []
    for e in order:
        if mass >= top_p:
            break
        chosen.append(e)
        mass += row[e] / total
    return set(chosen)


@torch.no_grad()
def test_generate_past_block_size_and_sampling():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**SMALL, "block_size": 8}), verbose=False).eval()
    wide = GPT(GPTConfig(**{**SMALL, "block_size": 64}), verbose=False).eval()  # same weights, room to
    wide.load_state_dict(model.state_dict())                                   # recompute past 8 tokens
    prompt = torch.randint(0, 101, (2, 3))
    greedy, seq = model.generate(prompt, 20, temperature=0), prompt
    for _ in range(20):  # 23 tokens in the end: the cache runs well past block_size
        seq = torch.cat([seq, wide(seq)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy, seq)
    # Every sampled token lies in the set top_k / top_p allow for the distribution it was drawn from (at
    # initialisation the distribution is nearly flat, so unrestricted sampling would leave the set at once).
    for top_k, top_p in ((3, None), (None, 0.5), (4, 0.6)):
        out = model.generate(prompt.repeat(8, 1), 12, temperature=1.0, top_k=top_k, top_p=top_p)
        for t in range(3, out.shape[1]):
            probs = wide(out[:, :t])[0][:, -1].float().softmax(-1)
            for row, token in zip(probs.tolist(), out[:, t].tolist()):
                assert token in allowed_tokens(row, top_k, top_p), (top_k, top_p, t)


# The paths written for CUDA (bf16 autocast, torch.compile, the grouped expert GEMM), run on the CPU so they
# cannot rot unseen: a few optimizer steps each, against the default fp32 eager loop path.

def train_losses(steps=3, autocast=False, backend=None, device="cpu"):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**SMALL, "vocab_size": 64}), verbose=False).to(device)
    opt = model.configure_optimizer(0.1, 3e-3, (0.9, 0.95), device)
    forward = compile_model(model, backend=backend) if backend else model
    data = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.randint(0, 64, (2, 24), generator=data).to(device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            _, loss, parts = forward(x, x.roll(-1, 1), parts=True)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(parts.ce.item())
    return losses


def test_bf16_autocast_steps_match_fp32():
    reference, bf16 = train_losses(), train_losses(autocast=True)
    assert bf16 != reference  # autocast really ran the matmuls in bf16...
    assert bf16 == pytest.approx(reference, rel=2e-2)  # ...which keeps about 3 significant digits


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_compiled_steps_match_eager(device):
    # On CPU, aot_eager runs Dynamo's graph capture and AOTAutograd (what breaks or miscompiles most often)
    # without inductor's C++ code generation, which takes about a minute on these 2-core machines. On a GPU,
    # inductor itself, with the local layers on FlexAttention.
    backend = "aot_eager" if device == "cpu" else "inductor"
    assert train_losses(backend=backend, device=device) == pytest.approx(train_losses(device=device), rel=1e-5)


def test_a_compiled_model_evaluates_without_autograd():
    # Without autograd the loop path skips experts that got no rows, a data-dependent test Dynamo cannot trace
    # (it stops with GuardOnDataDependentSymNode); compiled, every expert runs, and the loss is the same.
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL), verbose=False).eval()
    x = torch.randint(0, SMALL["vocab_size"], (2, 16))
    with torch.no_grad():
        compiled_loss = compile_model(model, backend="aot_eager")(x, x)[1].item()
        assert compiled_loss == pytest.approx(model(x, x)[1].item(), rel=1e-5)


def test_grouped_gemm_steps_match_the_loop(monkeypatch):
    import router
    loop = train_losses()  # (on CPU the experts take the loop)
    monkeypatch.setattr(router, "use_grouped_mm", lambda xs, w1: True)
    assert train_losses() == pytest.approx(loop, rel=1e-5)


@pytest.mark.parametrize("init_std", [0.02, 0.125])
def test_every_weight_is_initialised_as_documented(init_std):
    # Each parameter of the model is named here with the std it must have; none is left over.
    torch.manual_seed(0)
    config = GPTConfig(**{**SMALL, "n_layer": 8, "tie_embeddings": False, "n_embd": 64, "expert_hidden": 64,
                          "mlp_hidden": 128, "vocab_size": 512, "init_std": init_std})
    model = GPT(config, verbose=False)
    out_std = init_std / math.sqrt(2 * 8)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert (p == 1).all(), name
            continue
        expected = out_std if name.endswith(("o_proj.weight", "w2.weight", "experts.w2")) else init_std
        assert p.std().item() == pytest.approx(expected, rel=0.1), name
        assert abs(p.mean().item()) < 0.2 * expected, name
    # init_weights sets each weight once, norm gains included, and leaves none to torch's default init (which
    # infra/parallel.py's sharded build does not replay); a tied head is the embedding, listed once.
    for m in (model, GPT(GPTConfig(**{**SMALL, "vocab_size": 512}), verbose=False)):
        listed = [id(w) for w, _ in weight_inits(m, m.config.n_layer)]
        assert sorted(listed) == sorted(id(p) for p in [*m.parameters(), *m.buffers()])
        assert all((b == 0).all() for b in m.buffers())  # (the balancing biases)


def test_a_compiled_training_step_is_one_graph_and_a_new_seq_len_one_recompile():
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**SMALL, "vocab_size": 64, "n_layer": 2, "attn_pattern": "LG", "share_kv": False}),
                verbose=False)  # a dense layer, then a MoE layer
    counter = CompileCounterWithBackend("aot_eager")
    forward = compile_model(model, backend=counter)
    frames = []
    for T in (16, 16, 24, 32):  # stages change seq_len; the second change finds T already dynamic
        x = torch.randint(0, 64, (2, T))
        _, loss, _ = forward(x, x.roll(-1, 1), parts=True)
        loss.backward()
        frames.append(counter.frame_count)
    assert frames == [1, 1, 2, 2]  # one graph (a break would make 2 frames per step), one recompile


def naive_logits(model, idx):
    """A dense GPT's logits computed here from its weights by the plain formulas: RMSNorm, rotary embeddings on
    each pair (d, d + D/2), a masked softmax per head (a window where the layer is local, the global layer's K/V
    where it shares them), SwiGLU, tied head. What the model computed before any of its optional remedies existed."""
    c = model.config
    T, D = idx.shape[1], c.n_embd // c.n_head
    pos = torch.arange(T, dtype=torch.float64)
    angle = pos[:, None] * model.rope_base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)

    def rope(x):  # (H, T, D)
        a, b = x[..., :D // 2], x[..., D // 2:]
        return torch.cat([a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()], -1)

    def norm(x, w):
        return x / (x.square().mean(-1, keepdim=True) + c.norm_eps).sqrt() * w.double()

    x = model.wte.weight.double()[idx[0]]
    kv = None
    for block in model.blocks:
        attn, h = block.attn, norm(x, block.attn_norm.weight)
        q = rope((h @ attn.q_proj.weight.double().T).view(T, c.n_head, D).transpose(0, 1))
        if attn.kind != "S":
            k, v = (h @ attn.kv_proj.weight.double().T).view(T, 2, c.n_kv_head, D).unbind(1)
            k, v = rope(k.transpose(0, 1)), v.transpose(0, 1)
            kv = (k, v) if attn.kind == "G" else kv
        else:
            k, v = kv
        g = c.n_head // c.n_kv_head
        k, v = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)
        i, j = torch.arange(T)[:, None], torch.arange(T)
        allowed = (j <= i) & ((j > i - attn.window) if attn.window else True)
        p = ((q @ k.transpose(-1, -2)) / D ** 0.5).masked_fill(~allowed, float("-inf")).softmax(-1)
        x = x + (p @ v).transpose(0, 1).reshape(T, -1) @ attn.o_proj.weight.double().T
        h, f = norm(x, block.ffn_norm.weight), block.ffn
        x = x + (torch.nn.functional.silu(h @ f.w1.weight.double().T) * (h @ f.w3.weight.double().T)) @ \
            f.w2.weight.double().T
    return norm(x, model.norm.weight) @ model.wte.weight.double().T


def test_the_default_settings_compute_the_plain_transformer_and_the_remedies_start_from_it():
    """With its defaults (no x0_mix, no global_x0, no attention-only layers) the model computes what the plain
    formulas give; x0_mix starts from exactly the model without it (its scales 1 and 0), from the same seed."""
    settings = {**SMALL, "n_dense_layers": 8, "vocab_size": 64}
    torch.manual_seed(0)
    model = GPT(GPTConfig(**settings), verbose=False)
    idx = torch.randint(0, 64, (1, 24))
    with torch.no_grad():
        logits, _ = model(idx, idx)
    torch.testing.assert_close(logits[0].double(), naive_logits(model, idx), atol=1e-4, rtol=1e-4)
    torch.manual_seed(0)
    mixed = GPT(GPTConfig(**settings, x0_mix=True), verbose=False)
    with torch.no_grad():
        assert torch.equal(mixed(idx, idx)[0], logits)
    assert {n for n, _ in mixed.named_parameters()} - {n for n, _ in model.named_parameters()} == \
        {"x_scale", "x0_scale"}


@pytest.mark.parametrize("settings", [dict(global_x0=True), dict(n_attn_only=3, n_dense_layers=2),
                                      dict(x0_mix=True, global_x0=True)])
def test_each_remedy_decodes_through_the_cache_as_a_full_recompute(settings):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**SMALL, **settings}), verbose=False).eval()
    idx = torch.randint(0, 101, (2, 6))
    seq = idx
    with torch.no_grad():
        for _ in range(3 * SMALL["window"]):
            seq = torch.cat([seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(model.generate(idx, 3 * SMALL["window"], temperature=0), seq)
