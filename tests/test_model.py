import math

import pytest
import torch

from model import GPT, GPTConfig, PRESETS, preset

SMALL = dict(vocab_size=101, block_size=64, n_layer=8, n_head=4, n_kv_head=2, n_embd=32, window=4,
             attn_pattern="LLLG", kv_share=True, n_experts=6, n_shared=1, expert_hidden=16, mlp_hidden=48)


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
    _, loss = model(x, y)
    assert abs(model.last["ce"].item() - math.log(500)) < 0.1
    assert loss.item() == pytest.approx(model.last["ce"].item() + model.last["aux"].item(), rel=1e-6)
    assert model.last["token_loss"].shape == (4, 32)


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL), verbose=False)
    x = torch.randint(0, 101, (4, 32))
    y = torch.roll(x, -1, dims=1)
    opt = model.configure_optimizer(0.0, 3e-3, (0.9, 0.95), "cpu")
    first = None
    for _ in range(200):
        _, loss = model(x, y)
        first = first or model.last["ce"].item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.last["ce"].item() < first / 2


def test_active_parameter_count_by_hand():
    c = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_kv_head=1, n_embd=8, window=4,
                  attn_pattern="LG", n_experts=4, n_shared=1, expert_hidden=4, mlp_hidden=12,
                  routing="top_k", top_k=2)
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


@pytest.mark.parametrize("change,message", [
    (dict(n_embd=30), "divisible by n_head"),
    (dict(n_kv_head=3), "multiple of n_kv_head"),
    (dict(attn_pattern="LLLL", kv_share=True), "kv_share"),
    (dict(n_layer=4, attn_pattern="LLLG", kv_share=True), "kv_share"),
    (dict(window=0), "window"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.2), "top_p"),
    (dict(top_k=7), "top_k"),
    (dict(attn_pattern="LXG"), "attn_pattern"),
    (dict(min_k=3, max_k=2), "max_k"),
    (dict(routing="top_q"), "routing"),
    (dict(n_experts=6, n_expert_groups=4), "n_expert_groups"),
])
def test_bad_configs(change, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{**SMALL, **change})


def test_presets_build():
    for name in PRESETS:
        config = preset(name)
        assert config.n_embd % config.n_head == 0
    GPT(preset("tiny", vocab_size=128), verbose=False)


def test_generate_past_block_size_and_sampling():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**SMALL, "block_size": 8}), verbose=False).eval()
    out = model.generate(torch.zeros(1, 3, dtype=torch.long), 20, temperature=1.0, top_k=5, top_p=0.9)
    assert out.shape == (1, 23) and out.max() < 101
