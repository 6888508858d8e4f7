"""
Dynamic top-p routing over a fine-grained Mixture-of-Experts with shared experts.

Top-p routing (Huang et al. 2024, "Harder Tasks Need More Experts"): softmax the router logits, sort, and
keep the smallest set of experts whose probabilities add up to at least p. A confident token needs one
expert; a token the router is unsure about spreads its probability and so gets several. Each kept expert's
output is weighted by its router probability, without renormalising (the paper's choice: the weights then
carry the router's confidence). The paper uses p = 0.4, a Switch-style balance loss (weight 1e-2) and an
entropy "dynamic loss" (weight 1e-4) that stops the router from spreading probability just to buy more
experts; it reports 1.76 experts per token on average.

Balancing the experts' load. The balance loss pulls the router's probabilities toward uniform, and so the very
probabilities top-p reads. DeepSeek-V3's auxiliary-loss-free balancing instead adds a per-expert bias b_e to the
scores that *choose* experts, never to the gates that weight them, and after each optimizer step moves it by a
fixed rate against the sign of the expert's load error: b_e += rate * sign(mean load - load_e). Top-p needs a
rule for it, as its threshold is on probability mass. The rule here: rank the experts by p_e + b_e, then keep
them in that order until the kept *probabilities* p_e reach p. The bias decides who is chosen and in what
order; the mass, the threshold and the gates stay the router's own, so a token the bias steers to a less likely
expert needs more experts to reach p (the bias costs compute there, not confidence). Top-k ranks by p_e + b_e
and keeps k. With b = 0 both rules are the plain ones.

Shapes: N tokens (the batch and sequence flattened), E routed experts, C = n_embd, H = expert_hidden, M rows
sent to experts (one per kept (token, expert) pair, sorted by expert).

Read top to bottom: the selection rules, the losses and the bias update (pure functions), the router's
settings, then the layer: its experts and its dropless dispatch. Imports only torch.
"""

from dataclasses import asdict, dataclass, fields, replace
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------------------------------
# Which experts does each token get?

def _sorted(probs, bias=None):
    """(probabilities, experts) in descending order of probability + bias (bias (E,), or None: 0); stable, so
    ties go to the lower expert index."""
    if bias is None:
        return probs.sort(dim=-1, descending=True, stable=True)
    order = (probs + bias).sort(dim=-1, descending=True, stable=True).indices
    return probs.gather(-1, order), order


def _unsort(order, kept):
    """kept (N, E) bool in rank order (column r: the expert at rank r of `order`) -> mask by expert index."""
    return torch.empty_like(kept).scatter_(-1, order, kept)


def top_p_mask(probs, p, min_k=1, max_k=None, bias=None):
    """Bool (N, E) mask: per row of probs (N, E), the experts in descending order of probability (+ bias, when
    given: the balancing bias ranks, the probabilities count) until their probabilities sum to >= p, then
    clamped to between min_k and max_k experts. p >= 1 selects every expert."""
    assert probs.dim() == 2, probs.shape
    E = probs.shape[1]
    max_k = E if max_k is None else max_k
    values, order = _sorted(probs, bias)
    if p >= 1:
        kept = torch.ones_like(values, dtype=torch.bool)
    else:
        # Keep an expert while the mass ranked above it is short of p: a prefix of the ranks. The mass above
        # rank r is the running sum up to rank r - 1, shifted over, never `running sum - own value` (that
        # subtraction rounds: 0.5 + 1/3 - 1/3 is not 0.5 in floating point). Summed in float64 (or wider
        # input's own dtype) so float32 rounding of the running sum does not decide the threshold.
        mass = values.to(torch.promote_types(values.dtype, torch.float64)).cumsum(-1)
        above = torch.cat([torch.zeros_like(mass[:, :1]), mass[:, :-1]], dim=-1)
        kept = above < p
    if min_k > 1:
        kept[:, :min_k] = True
    if max_k < E:
        kept[:, max_k:] = False
    return _unsort(order, kept)


def top_k_mask(probs, k, bias=None):
    """Bool (N, E) mask of the k experts per row of highest probability (+ bias, when given), ties to the lower
    expert index."""
    assert probs.dim() == 2 and 1 <= k <= probs.shape[1], (probs.shape, k)
    order = _sorted(probs, bias)[1]
    kept = torch.zeros_like(order, dtype=torch.bool)
    kept[:, :k] = True
    return _unsort(order, kept)


# -----------------------------------------------------------------------------------------------------
# Auxiliary losses and the balancing bias: pure functions of the router's probabilities and choices

def load_balance_loss(probs, mask):
    """Switch-style balance: E * sum_e f_e * P_e, with f_e the fraction of (token, expert) assignments that went
    to expert e and P_e its mean router probability. Both sum to 1; the loss is 1 when routing is uniform and
    grows as load concentrates. Only P carries gradient (f comes from a discrete choice)."""
    f = mask.float().sum(0)
    f = f / f.sum().clamp(min=1)
    return probs.shape[1] * (f * probs.float().mean(0)).sum()


def router_entropy(probs):
    """Mean entropy of the router's distribution (Huang et al.'s "dynamic loss"): penalising it stops the
    router from flattening its probabilities just to activate more experts under top-p."""
    return -(probs * torch.log(probs.clamp(min=1e-20))).sum(-1).mean()


def router_z_loss(logits):
    """Mean squared log-partition of the router logits (ST-MoE): keeps the logits small and stable."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def bias_update(bias, load, rate):
    """The balancing bias after one optimizer step: each expert's moves by `rate` against the sign of its load
    error, b_e + rate * sign(mean(load) - load_e) (DeepSeek-V3). load (E,): the tokens each expert got in the
    step; the sign does not change when it is averaged over micro-steps and ranks instead of summed."""
    return bias + rate * torch.sign(load.mean() - load)


# -----------------------------------------------------------------------------------------------------
# The router's settings: one validated record, used by the model config, each MoE layer, the training
# stages (which may change any of them, e.g. top_p or the routing rule) and the checkpoints. The command line
# and a stage's router dict are type-checked by the parser (infra/cli.py); the ranges are checked here.

@dataclass(frozen=True)
class RouterConfig:
    routing: str = "top_p"           # "top_p" (dynamic: experts until their probabilities reach p) or "top_k"
    top_p: float = 0.4               # top-p threshold (Huang et al. 2024 use 0.4)
    top_k: int = 2                   # experts per token under top-k routing
    min_k: int = 1                   # top-p: at least this many experts per token
    max_k: Optional[int] = None      # top-p: at most this many experts per token (None: no cap)
    balance_loss: float = 1e-2       # weight of the Switch-style expert balance loss (Huang et al. 2024)
    entropy_loss: float = 1e-4       # weight of the router-entropy "dynamic loss" (Huang et al. 2024)
    z_loss: float = 1e-3             # weight of the router z-loss (ST-MoE)
    target_experts: Optional[float] = None  # if set, a controller moves top_p to hold this many experts/token
    controller_gain: float = 0.05    # how far the controller moves top_p per step, per expert of error / E
    bias_rate: float = 0.0           # loss-free balancing: per step, each expert's bias moves this much (0: off)

    def __post_init__(self):
        bad = [f"{name} must be >= {low}; got {getattr(self, name)}" for name, low in
               [("top_k", 1), ("min_k", 1), ("balance_loss", 0), ("entropy_loss", 0), ("z_loss", 0),
                ("bias_rate", 0)] if not getattr(self, name) >= low]
        if self.routing not in ("top_p", "top_k"):
            bad.insert(0, f"routing must be 'top_p' or 'top_k'; got {self.routing!r}")
        if not 0 < self.top_p <= 1:
            bad.append(f"top_p must be in (0, 1]; got {self.top_p}")
        if self.max_k is not None and self.max_k < self.min_k:
            bad.append(f"max_k must be >= min_k ({self.min_k}); got {self.max_k}")
        if self.target_experts is not None and self.target_experts < 1:
            bad.append(f"target_experts must be >= 1; got {self.target_experts}")
        if not self.controller_gain > 0:
            bad.append(f"controller_gain must be > 0; got {self.controller_gain}")
        if bad:
            raise ValueError("; ".join(bad))

    def check(self, n_experts):
        """self, if it fits a layer of n_experts routed experts; else ValueError saying what to change."""
        for name in ("top_k", "min_k", "max_k", "target_experts"):
            value = getattr(self, name)
            if value is not None and value > n_experts:
                raise ValueError(f"{name} ({value}) cannot exceed n_experts ({n_experts})")
        return self

    def updated(self, n_experts, **changes):
        """A copy with some settings changed (what a training stage does), checked for n_experts."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise ValueError(f"unknown router setting(s) {unknown}; known: {', '.join(f.name for f in fields(self))}")
        return replace(self, **changes).check(n_experts)


# -----------------------------------------------------------------------------------------------------
# The experts

class SwiGLU(nn.Module):
    """A dense gated MLP: w2(silu(x w1) * (x w3)). Used for dense layers and for the shared experts."""

    def __init__(self, n_embd, hidden):
        super().__init__()
        self.w1 = nn.Linear(n_embd, hidden, bias=False)
        self.w3 = nn.Linear(n_embd, hidden, bias=False)
        self.w2 = nn.Linear(hidden, n_embd, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def expert_mlps(xs, counts, w1, w3, w2, grouped):
    """xs (M, C) with rows sorted by expert, counts (E,) rows per expert, w1 and w3 (E, C, H), w2 (E, H, C) ->
    (M, C): each row through its own expert's SwiGLU. grouped: one torch._grouped_mm per weight over every
    expert's slice at once; else one expert at a time."""
    if grouped:
        offs = counts.cumsum(0).to(torch.int32)
        h = F.silu(torch._grouped_mm(xs, w1, offs=offs)) * torch._grouped_mm(xs, w3, offs=offs)
        return torch._grouped_mm(h, w2, offs=offs)
    # One expert at a time, its whole MLP on its slice. On CPU this beats the grouped GEMM: a slice's
    # intermediates stay in cache instead of making three passes over the whole buffer. An expert with no
    # tokens still multiplies an empty slice, so its weights stay in the autograd graph (zero gradient) and
    # DDP needs no find_unused_parameters. Without autograd (evaluation, decoding) there is no graph to keep,
    # and skipping empty experts saves small ops (not under torch.compile: a test of a slice's data-dependent
    # length cannot be traced). (Iterating over the stacked weights unbinds them: one backward op stacks every
    # expert's gradient. Indexing w1[e] instead would give each expert a backward that writes a full-size zero
    # gradient.)
    sizes, keep_empty = counts.tolist(), torch.is_grad_enabled() or torch.compiler.is_compiling()
    pieces = [(F.silu(xe @ a) * (xe @ b)) @ c for xe, a, b, c in zip(xs.split(sizes), w1, w3, w2)
              if keep_empty or len(xe)]
    return torch.cat(pieces) if pieces else xs.new_zeros(0, w2.shape[-1])  # (a rank may get no rows)


def grouped_mm_supported(device_type, dtype, capability, sizes):
    """Whether the grouped-GEMM expert path is known to be right here: fp32 on CPU, or bf16 on Hopper (compute
    capability 9.x) only. On Blackwell (10.x) experts that get no tokens receive non-zero weight gradients from
    torch._grouped_mm (an open PyTorch issue), so the loop path runs there. sizes: the row lengths of the
    tokens and the weights (n_embd, expert_hidden), each a multiple of 16 bytes as the kernel needs."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    aligned = all(n * dtype.itemsize % 16 == 0 for n in sizes)
    device_ok = device_type == "cpu" or (device_type == "cuda" and dtype == torch.bfloat16 and capability[0] == 9)
    return aligned and device_ok


def use_grouped_mm(xs, w1):
    """The path the experts take for rows xs (in the compute dtype) and weights w1 (E, C, H): the grouped GEMM on
    CUDA where it is known to be right, the loop elsewhere (on CPU the faster of the two)."""
    return xs.device.type == "cuda" and grouped_mm_supported(
        "cuda", xs.dtype, torch.cuda.get_device_capability(xs.device), (xs.shape[1], w1.shape[2]))


def compute_dtype(x):
    """The dtype matmuls of x run in: autocast's where it is on (the residual stream stays fp32)."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class Experts(nn.Module):
    """E routed experts, each a SwiGLU of hidden size H, as three stacked weights. forward(xs, counts) -> ys:
    xs (M, C) rows sorted by expert, counts (E,) rows per expert; each row through its expert, in the compute
    dtype. Expert parallelism (infra/parallel.py) replaces this module by one that holds a slice of the experts
    and sends each row to the rank that holds its expert."""

    def __init__(self, n_experts, n_embd, hidden):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, n_embd, hidden))
        self.w3 = nn.Parameter(torch.empty(n_experts, n_embd, hidden))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, n_embd))

    def forward(self, xs, counts):
        dtype = compute_dtype(xs)
        xs, w1, w3, w2 = (t.to(dtype) for t in (xs, self.w1, self.w3, self.w2))
        return expert_mlps(xs, counts, w1, w3, w2, use_grouped_mm(xs, w1))


# -----------------------------------------------------------------------------------------------------
# The MoE layer

class Routing(NamedTuple):
    """What one MoE forward decided, as tensors. Reading their values syncs a GPU: the caller decides when."""
    experts_per_token: torch.Tensor  # (*token shape): routed experts each token got
    tokens_per_expert: torch.Tensor  # (n_experts,): tokens each routed expert got


class MoE(nn.Module):
    """n_experts fine-grained routed SwiGLU experts (hidden size `expert_hidden` each) plus n_shared
    always-on experts. forward(x) -> (y, aux_loss, Routing).

    Each expert has 3 * n_embd * expert_hidden parameters. The n_shared shared experts are one SwiGLU of
    hidden n_shared * expert_hidden: the sum of independent MLPs is exactly an MLP with their hidden units
    side by side. The weights are created uninitialised: model.init_weights sets every weight of the model
    in one place (call it on a bare MoE too).

    config: the RouterConfig this layer routes with. A training stage may swap it (`self.config = ...`) and
    the sparsity controller moves its top_p, so it travels with the state dict: a model loaded from a
    checkpoint routes exactly as it last trained.
    """

    def __init__(self, n_embd, n_experts, expert_hidden, n_shared=1, config=RouterConfig()):
        super().__init__()
        self.n_experts = n_experts
        self.config = config.check(n_experts)
        self.router = nn.Linear(n_embd, n_experts, bias=False)
        self.experts = Experts(n_experts, n_embd, expert_hidden)
        self.shared = SwiGLU(n_embd, n_shared * expert_hidden) if n_shared > 0 else None
        # The balancing bias (bias_update): state, not a weight: it has no gradient, and checkpoints keep it.
        self.register_buffer("expert_bias", torch.zeros(n_experts))

    def get_extra_state(self):
        return asdict(self.config)

    def set_extra_state(self, state):
        self.config = RouterConfig(**state).check(self.n_experts)

    def route(self, x):
        """Router in fp32: returns logits, probabilities and the bool selection mask, each (N, E)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.router.weight.float())
        probs = logits.softmax(-1)
        c = self.config
        bias = self.expert_bias.float()  # (zero unless bias_rate has moved it: then the plain rules)
        if c.routing == "top_p":
            mask = top_p_mask(probs.detach(), c.top_p, c.min_k, c.max_k, bias)
        else:
            mask = top_k_mask(probs.detach(), c.top_k, bias)
        return logits, probs, mask

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, probs, mask = self.route(x)
        counts = mask.sum(0)
        # Dropless dispatch: list the (expert, token) pairs sorted by expert, gather the tokens into one buffer,
        # run every expert on its contiguous slice, scale by the router probability, scatter back.
        expert, token = mask.t().nonzero(as_tuple=True)
        xs = x.index_select(0, token)  # (its backward is index_add, cheaper than x[token]'s index_put)
        ys = self.experts(xs, counts)
        ys = ys * probs[token, expert].unsqueeze(1).to(ys.dtype)  # the gate scales whole rows: once, here
        y = torch.zeros_like(x).index_add_(0, token, ys.to(x.dtype))
        if self.shared is not None:
            y = y + self.shared(x)

        aux = self.aux_loss(logits, probs, mask) if self.training else y.new_zeros(())
        return y.view(shape), aux, Routing(mask.sum(-1).view(shape[:-1]), counts)

    def aux_loss(self, logits, probs, mask):
        """The weighted sum of the router's auxiliary losses (they only shape training, so eval skips them)."""
        c = self.config
        aux = c.balance_loss * load_balance_loss(probs, mask)
        if c.entropy_loss:
            aux = aux + c.entropy_loss * router_entropy(probs)
        if c.z_loss:
            aux = aux + c.z_loss * router_z_loss(logits)
        return aux

    def balance(self, load):
        """After an optimizer step: move the balancing bias against the step's load (tokens per routed expert,
        the same on every rank) when bias_rate > 0. Stays on the device: nothing is read back."""
        if self.config.bias_rate > 0:
            load = load.to(self.expert_bias.dtype)
            self.expert_bias.copy_(bias_update(self.expert_bias, load, self.config.bias_rate))

    def controls_p(self):
        """Whether adjust_p does anything: top-p routing with a target for the experts per token."""
        return self.config.target_experts is not None and self.config.routing == "top_p"

    def adjust_p(self, experts_per_token):
        """Sparsity control (DTop-p style): nudge top_p toward the target average experts per token.
        Call once per optimizer step with the mean measured over all ranks, so every rank moves alike."""
        if not self.controls_p():
            return
        c = self.config
        error = (c.target_experts - experts_per_token) / self.n_experts
        self.config = replace(c, top_p=float(min(1.0, max(1e-3, c.top_p + c.controller_gain * error))))


# -----------------------------------------------------------------------------------------------------
# A smoke test: python router.py

if __name__ == "__main__":
    torch.manual_seed(0)
    probs = torch.tensor([[0.70, 0.20, 0.10], [0.40, 0.35, 0.25]])
    print("probs", [[round(p, 2) for p in row] for row in probs.tolist()])
    print("top-p 0.6 keeps", top_p_mask(probs, 0.6).int().tolist(), "(a confident token 1 expert, an unsure one 2)")
    print("top-2 keeps    ", top_k_mask(probs, 2).int().tolist())
    moe = MoE(n_embd=32, n_experts=8, expert_hidden=16, n_shared=1)
    for w in moe.parameters():
        nn.init.normal_(w, std=0.3)
    x = torch.randn(2, 5, 32)
    y, aux, routing = moe(x)
    print(f"MoE: x {tuple(x.shape)} -> y {tuple(y.shape)}, aux loss {aux.item():.4f}, routed experts per token "
          f"{routing.experts_per_token.float().mean().item():.2f}, tokens per expert "
          f"{routing.tokens_per_expert.tolist()}")
    # The dispatch against a plain loop over tokens and their experts.
    logits, probs, mask = moe.route(x.reshape(-1, 32))
    want = moe.shared(x.reshape(-1, 32))
    for t, e in mask.nonzero().tolist():
        w1, w3, w2 = moe.experts.w1[e], moe.experts.w3[e], moe.experts.w2[e]
        want[t] = want[t] + probs[t, e] * ((F.silu(x.reshape(-1, 32)[t] @ w1) * (x.reshape(-1, 32)[t] @ w3)) @ w2)
    print("matches a token-by-token loop:", torch.allclose(y.reshape(-1, 32), want, atol=1e-5))
