import math

import pytest
import torch

from router import MoE, compute_dtype, load_balance_loss, router_entropy, router_z_loss, top_k_mask, top_p_mask


def brute_force_top_p(row, p, min_k=1, max_k=None):
    """Walk the experts from most to least probable (ties: lower index first) until the mass reaches p."""
    order = sorted(range(len(row)), key=lambda e: (-row[e], e))
    chosen, mass = [], 0.0
    for e in order:
        if mass >= p and p < 1:
            break
        chosen.append(e)
        mass += row[e]
    n = max(min_k, min(len(chosen), max_k or len(row)))
    return set(order[:n])


def rows():
    torch.manual_seed(0)
    random = torch.randn(50, 8).mul(2).softmax(-1)
    ties = torch.tensor([[0.25, 0.25, 0.25, 0.25, 0, 0, 0, 0], [0.1, 0.3, 0.3, 0.1, 0.1, 0.1, 0, 0]])
    one_hot = torch.eye(8)[:3]
    uniform = torch.full((2, 8), 1 / 8)
    return torch.cat([random, ties, one_hot, uniform])


@pytest.mark.parametrize("p", [0.1, 0.4, 0.9, 1.0])
@pytest.mark.parametrize("min_k,max_k", [(1, None), (2, None), (1, 2), (2, 3)])
def test_top_p_matches_brute_force(p, min_k, max_k):
    probs = rows()
    mask = top_p_mask(probs, p, min_k, max_k)
    for i, row in enumerate(probs.tolist()):
        assert set(mask[i].nonzero().flatten().tolist()) == brute_force_top_p(row, p, min_k, max_k), (i, row)


def test_top_p_basics():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])
    assert top_p_mask(probs, 0.4).tolist() == [[True, False, False], [False, False, True]]
    assert top_p_mask(probs, 0.7).tolist() == [[True, True, False], [True, False, True]]  # tie -> index 0
    assert top_p_mask(probs, 1.0).all()


def test_top_k_matches_brute_force():
    probs = rows()
    for k in (1, 2, 5):
        mask = top_k_mask(probs, k)
        for i, row in enumerate(probs.tolist()):
            assert set(mask[i].nonzero().flatten().tolist()) == set(sorted(range(8), key=lambda e: (-row[e], e))[:k])


@pytest.mark.parametrize("call,message", [
    (lambda: top_p_mask(torch.rand(4, 8).softmax(-1), 0.0), "top_p"),
    (lambda: top_p_mask(torch.rand(4, 8).softmax(-1), 1.5), "top_p"),
    (lambda: top_p_mask(torch.rand(4, 8).softmax(-1), 0.5, min_k=3, max_k=2), "max_k"),
    (lambda: top_p_mask(torch.rand(8), 0.5), "shape"),
    (lambda: top_k_mask(torch.rand(4, 8).softmax(-1), 0), "top_k"),
    (lambda: top_k_mask(torch.rand(4, 8).softmax(-1), 9), "top_k"),
    (lambda: MoE(16, 0, 8), "n_experts"),
    (lambda: MoE(16, 4, 8, routing="top_k", top_k=5), "top_k"),
    (lambda: MoE(16, 4, 8, expert_gemm="bmm"), "expert_gemm"),
])
def test_bad_inputs(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def slow_moe(moe, x):
    """Loop over every token and each expert it selected; shared experts as independent MLPs."""
    flat = x.reshape(-1, x.shape[-1])
    probs = (flat @ moe.router.weight.t()).softmax(-1)
    mask = top_p_mask(probs, moe.top_p, moe.min_k, moe.max_k) if moe.routing == "top_p" else top_k_mask(probs, moe.top_k)
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for e in mask[t].nonzero().flatten().tolist():
            h = torch.nn.functional.silu(flat[t] @ moe.w1[e]) * (flat[t] @ moe.w3[e])
            out[t] += probs[t, e] * (h @ moe.w2[e])
        if moe.shared is not None:
            h_size = moe.w1.shape[2]
            for s in range(moe.shared.w1.weight.shape[0] // h_size):  # each shared expert on its own
                rows = slice(s * h_size, (s + 1) * h_size)
                h = torch.nn.functional.silu(flat[t] @ moe.shared.w1.weight[rows].t()) * \
                    (flat[t] @ moe.shared.w3.weight[rows].t())
                out[t] += h @ moe.shared.w2.weight[:, rows].t()
    return out.view_as(x), mask


@pytest.mark.parametrize("routing", ["top_p", "top_k"])
@pytest.mark.parametrize("n_shared", [0, 2])
@pytest.mark.parametrize("grouped", ["grouped", "loop"])
def test_moe_matches_slow_reference(routing, n_shared, grouped):
    torch.manual_seed(0)
    moe = MoE(16, 6, 8, n_shared=n_shared, routing=routing, top_k=2, expert_gemm=grouped)
    with torch.no_grad():
        moe.router.weight[5] = -10.0 * moe.router.weight[5].abs().sign()  # expert 5 never wins...
    x = torch.randn(3, 7, 16).abs()                                       # ...for positive inputs
    y, aux = moe(x)
    expected, mask = slow_moe(moe, x)
    assert mask[:, 5].sum() == 0, "the test needs an expert that receives no tokens"
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    with torch.inference_mode():  # without autograd the loop skips experts that got no tokens
        torch.testing.assert_close(moe(x)[0], expected, atol=1e-5, rtol=1e-5)
    assert aux.ndim == 0 and torch.isfinite(aux)
    assert moe.stats["tokens_per_expert"].tolist() == mask.sum(0).tolist()
    assert moe.stats["experts_per_token"].item() == pytest.approx(mask.sum(1).float().mean().item())


@pytest.mark.parametrize("grouped", ["grouped", "loop"])
def test_gradients_reach_router_and_experts(grouped):
    torch.manual_seed(0)
    moe = MoE(16, 6, 8, n_shared=1, expert_gemm=grouped, balance_loss=0, entropy_loss=0, z_loss=0)
    with torch.no_grad():
        moe.router.weight[5] = -10.0 * moe.router.weight[5].abs().sign()
    x = torch.randn(4, 5, 16).abs()
    y, aux = moe(x)
    (y.square().sum() + aux).backward()
    used = moe.stats["tokens_per_expert"] > 0
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    for w in (moe.w1, moe.w2, moe.w3):
        assert w.grad is not None  # every expert is in the graph (DDP needs no find_unused_parameters)
        norms = w.grad.flatten(1).norm(dim=1)
        assert (norms[used] > 0).all() and (norms[~used] == 0).all()
    assert not used[5]


@pytest.mark.parametrize("expert_gemm", ["grouped", "loop"])
def test_experts_run_in_the_autocast_dtype(expert_gemm):
    # Under autocast the residual stream stays fp32 but the experts' matmuls run in bf16: the output comes
    # back fp32, close to the fp32 reference, and the gradients reach the fp32 expert weights.
    torch.manual_seed(0)
    moe = MoE(16, 6, 8, n_shared=1, expert_gemm=expert_gemm)
    x = torch.randn(4, 5, 16)
    expected, _ = slow_moe(moe, x)
    assert compute_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(x) == torch.bfloat16
        y, aux = moe(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, expected, atol=0.05, rtol=0.05)
    y.square().sum().backward()
    assert moe.w1.grad.dtype == torch.float32 and moe.w1.grad.abs().sum() > 0


def test_balance_loss_minimum_and_entropy_closed_form():
    E, N = 8, 64
    uniform = torch.full((N, E), 1 / E)
    balanced = torch.zeros(N, E, dtype=torch.bool)
    balanced[torch.arange(N), torch.arange(N) % E] = True     # each expert gets N/E tokens
    assert load_balance_loss(uniform, balanced).item() == pytest.approx(1.0)
    assert load_balance_loss(uniform, balanced, n_groups=4).item() == pytest.approx(1.0)
    collapsed = torch.zeros(N, E, dtype=torch.bool)
    collapsed[:, 0] = True
    skewed = torch.full((N, E), 0.3 / (E - 1))
    skewed[:, 0] = 0.7
    assert load_balance_loss(skewed, collapsed).item() == pytest.approx(E * 0.7)
    assert router_entropy(uniform).item() == pytest.approx(math.log(E))
    p = torch.tensor([[0.5, 0.25, 0.25]])
    assert router_entropy(p).item() == pytest.approx(-(0.5 * math.log(0.5) + 0.5 * math.log(0.25)))
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    expected = (math.log(2) ** 2 + math.log(math.e + math.e ** 2) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected)


def test_controller_moves_p_toward_the_target():
    moe = MoE(16, 8, 8, target_experts=2.0, controller_gain=0.5, top_p=0.4)
    moe.adjust_p(4.0)   # too many experts: p must drop
    assert moe.top_p < 0.4
    p = moe.top_p
    moe.adjust_p(1.0)   # too few: p must rise
    assert moe.top_p > p
    state = moe.state_dict()
    fresh = MoE(16, 8, 8)
    fresh.load_state_dict(state)
    assert fresh.top_p == moe.top_p  # p travels with the checkpoint
