"""
Dynamic top-p routing over a fine-grained Mixture-of-Experts with shared experts.

Top-p routing (Huang et al. 2024, "Harder Tasks Need More Experts"): softmax the router logits, sort, and
keep the smallest set of experts whose probabilities add up to at least p. A confident token needs one
expert; a token the router is unsure about spreads its probability and so gets several. Each kept expert's
output is weighted by its router probability, without renormalising (the paper's choice: the weights then
carry the router's confidence). The paper uses p = 0.4, a Switch-style balance loss (weight 1e-2) and an
entropy "dynamic loss" (weight 1e-4) that stops the router from spreading probability just to buy more
experts; it reports 1.76 experts per token on average. Yi-Lightning adds balance across expert groups.

Balancing the experts' load. The losses below (Switch's balance loss) pull the router's probabilities toward
uniform, and so the very probabilities top-p reads. DeepSeek-V3's auxiliary-loss-free balancing instead adds a
per-expert bias b_e to the scores that *choose* experts, never to the gates that weight them, and after each
optimizer step moves it by a fixed rate against the sign of the expert's load error: b_e += rate * sign(mean
load - load_e). Top-p needs a rule for it, as its threshold is on probability mass. The rule here: rank the
experts by p_e + b_e, then keep them in that order until the kept *probabilities* p_e reach p. The bias decides
who is chosen and in what order; the mass, the threshold and the gates stay the router's own, so a token the
bias steers to a less likely expert needs more experts to reach p (the bias costs compute there, not
confidence). Top-k ranks by p_e + b_e and keeps k. With b = 0 both rules are the plain ones.

Read top to bottom: the router's settings, the selection rules, the losses and the bias update, then the layer
and its dropless dispatch. Imports only torch.
"""

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import NamedTuple, Optional, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor


# -----------------------------------------------------------------------------------------------------
# The router's settings: one validated record, used by the model config, each MoE layer, the training
# stages (which may change any of them, e.g. top_p or the routing rule) and the checkpoints.

@dataclass(frozen=True)
class RouterConfig:
    routing: str = "top_p"           # "top_p" (dynamic: experts until their probabilities reach p) or "top_k"
    top_p: float = 0.4               # top-p threshold (Huang et al. 2024 use 0.4)
    top_k: int = 2                   # experts per token under top-k routing
    min_k: int = 1                   # top-p: at least this many experts per token
    max_k: Optional[int] = None      # top-p: at most this many experts per token (None: no cap)
    n_expert_groups: int = 1         # expert groups for the group balance loss (train.py: the EP ranks, ep, if unset)
    balance_loss: float = 1e-2       # weight of the Switch-style expert balance loss (Huang et al. 2024)
    group_balance_loss: float = 0.0  # weight of the group-level balance loss (DeepSeek-V2 uses 0.05)
    entropy_loss: float = 1e-4       # weight of the router-entropy "dynamic loss" (Huang et al. 2024)
    z_loss: float = 1e-3             # weight of the router z-loss (ST-MoE)
    target_experts: Optional[float] = None  # if set, a controller moves top_p to hold this many experts/token
    controller_gain: float = 0.05    # how far the controller moves top_p per step, per expert of error / E
    bias_rate: float = 0.0           # loss-free balancing: per step, each expert's bias moves this much (0: off)

    def __post_init__(self):
        for f in fields(self):  # types first: a stage's router dict does not pass through the parser
            value, kinds = getattr(self, f.name), get_args(f.type) or (f.type,)  # Optional[int]: (int, None)
            fits = isinstance(value, kinds) or (float in kinds and isinstance(value, int))
            if not fits or isinstance(value, bool):
                names = " or ".join("None" if k is type(None) else k.__name__ for k in kinds)
                raise ValueError(f"router setting {f.name} must be {names}; got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"router setting {f.name} must be a finite number; got {value}")
        bad = [f"{name} must be >= {low}; got {getattr(self, name)}" for name, low in
               [("top_k", 1), ("min_k", 1), ("n_expert_groups", 1), ("balance_loss", 0), ("group_balance_loss", 0),
                ("entropy_loss", 0), ("z_loss", 0), ("bias_rate", 0)] if not getattr(self, name) >= low]
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
        if n_experts % self.n_expert_groups != 0:
            raise ValueError(f"n_experts ({n_experts}) must be divisible by n_expert_groups "
                             f"({self.n_expert_groups})")
        return self

    def updated(self, n_experts, **changes):
        """A copy with some settings changed (what a training stage does), checked for n_experts."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise ValueError(f"unknown router setting(s) {unknown}; known: {', '.join(f.name for f in fields(self))}")
        return replace(self, **changes).check(n_experts)


# -----------------------------------------------------------------------------------------------------
# Which experts does each token get?

def _check_probs(probs):
    if probs.dim() != 2:
        raise ValueError(f"probs must be (tokens, experts); got shape {tuple(probs.shape)}")


def _unsort(order, kept):
    """kept (N, E) bool in rank order (column r: the expert at rank r of `order`) -> mask by expert index."""
    return torch.empty_like(kept).scatter_(-1, order, kept)


def _sorted(probs, bias=None):
    """(probabilities, experts) in descending order of probability + bias (bias (E,), or None: 0); stable, so
    ties go to the lower expert index."""
    if bias is None:
        return probs.sort(dim=-1, descending=True, stable=True)
    order = (probs + bias).sort(dim=-1, descending=True, stable=True).indices
    return probs.gather(-1, order), order


def top_p_mask(probs, p, min_k=1, max_k=None, bias=None):
    """Bool (N, E) mask: per row, the experts in descending order of probability (+ bias, when given: the
    balancing bias ranks, the probabilities count) until their probabilities sum to >= p, then clamped to
    between min_k and max_k experts. p >= 1 selects every expert."""
    _check_probs(probs)
    E = probs.shape[1]
    max_k = E if max_k is None else max_k
    if not 0 < p <= 1:
        raise ValueError(f"top_p must be in (0, 1]; got {p}")
    if not 1 <= min_k <= E:
        raise ValueError(f"min_k must be in [1, n_experts={E}]; got {min_k}")
    if not min_k <= max_k <= E:
        raise ValueError(f"max_k must be in [min_k={min_k}, n_experts={E}]; got {max_k}")
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
    _check_probs(probs)
    if not 1 <= k <= probs.shape[1]:
        raise ValueError(f"top_k must be in [1, n_experts={probs.shape[1]}]; got {k}")
    order = _sorted(probs, bias)[1]
    kept = torch.zeros_like(order, dtype=torch.bool)
    kept[:, :k] = True
    return _unsort(order, kept)


# -----------------------------------------------------------------------------------------------------
# Auxiliary losses: pure functions of the router's probabilities and choices

def load_balance_loss(probs, mask, n_groups=None):
    """Switch-style balance: G * sum_g f_g * P_g over G groups of experts (default G = n_experts: the
    expert level; G = number of expert-parallel ranks: the group level).

    f_g is the fraction of (token, expert) assignments that went to group g, P_g the mean router
    probability of its experts. Both sum to 1; the loss is 1 when routing is uniform and grows as load
    concentrates. Only P carries gradient (f comes from a discrete choice)."""
    E = probs.shape[1]
    n_groups = n_groups or E
    if E % n_groups != 0:
        raise ValueError(f"n_experts ({E}) must be divisible by the number of expert groups ({n_groups})")
    f = mask.float().sum(0)
    f = f / f.sum().clamp(min=1)
    P = probs.float().mean(0)
    f, P = f.view(n_groups, -1).sum(1), P.view(n_groups, -1).sum(1)
    return n_groups * (f * P).sum()


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
# The MoE layer

class SwiGLU(nn.Module):
    """A dense gated MLP: w2(silu(x w1) * (x w3)). Used for dense layers and for the shared experts."""

    def __init__(self, n_embd, hidden):
        super().__init__()
        self.w1 = nn.Linear(n_embd, hidden, bias=False)
        self.w3 = nn.Linear(n_embd, hidden, bias=False)
        self.w2 = nn.Linear(hidden, n_embd, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


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


def grouped_mm_available(x, w):
    capability = torch.cuda.get_device_capability(x.device) if x.device.type == "cuda" else None
    return grouped_mm_supported(x.device.type, x.dtype, capability, (x.shape[1], w.shape[1], w.shape[2]))


def compute_dtype(x):
    """The dtype matmuls of x run in: autocast's where it is on (the residual stream stays fp32)."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def local_part(w):
    """The part of a weight this process holds: under expert parallelism (parallel.py) the expert weights are
    DTensors split over the ranks, and each rank runs its own slice; otherwise the weight itself."""
    return w.to_local() if isinstance(w, DTensor) else w


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
    expert_gemm: "grouped" (one torch._grouped_mm per weight, over every expert's slice at once), "loop"
    (one expert at a time), or "auto": grouped on CUDA and the loop on CPU, the faster of the two on each.
    """

    def __init__(self, n_embd, n_experts, expert_hidden, n_shared=1, config=RouterConfig(), expert_gemm="auto"):
        super().__init__()
        if n_experts < 1:
            raise ValueError(f"n_experts must be >= 1; got {n_experts}")
        if n_shared < 0:
            raise ValueError(f"n_shared must be >= 0; got {n_shared}")
        if expert_gemm not in ("auto", "grouped", "loop"):
            raise ValueError(f"expert_gemm must be 'auto', 'grouped' or 'loop'; got {expert_gemm!r}")
        self.n_experts, self.expert_gemm = n_experts, expert_gemm
        self.config = config.check(n_experts)
        self.router = nn.Linear(n_embd, n_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(n_experts, n_embd, expert_hidden))
        self.w3 = nn.Parameter(torch.empty(n_experts, n_embd, expert_hidden))
        self.w2 = nn.Parameter(torch.empty(n_experts, expert_hidden, n_embd))
        self.shared = SwiGLU(n_embd, n_shared * expert_hidden) if n_shared > 0 else None
        # The balancing bias (bias_update): state, not a weight: it has no gradient, and checkpoints keep it.
        self.register_buffer("expert_bias", torch.zeros(n_experts))
        # Expert parallelism (parallel.py) sets this to a callable (moe, xs, counts, gate) -> ys that sends each
        # row to the rank holding its expert and brings the result back; None runs every expert here.
        self.ep = None

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
        gate = probs[token, expert].unsqueeze(1)
        ys = self.experts(xs, counts, gate) if self.ep is None else self.ep(self, xs, counts, gate)
        y = torch.zeros_like(x).index_add_(0, token, ys.to(x.dtype))
        if self.shared is not None:
            y = y + self.shared(x)

        aux = self.aux_loss(logits, probs, mask) if self.training else y.new_zeros(())
        return y.view(shape), aux, Routing(mask.sum(-1).view(shape[:-1]), counts)

    def gemm_path(self, xs):
        """"grouped" or "loop": the path `experts` takes for rows xs, already in the compute dtype."""
        wanted = self.expert_gemm == "grouped" or (self.expert_gemm == "auto" and xs.device.type == "cuda")
        return "grouped" if wanted and grouped_mm_available(xs, self.w1) else "loop"

    def experts(self, xs, counts, gate=None):
        """xs (M, n_embd) with rows sorted by expert, counts rows per expert (one per expert held here: all of
        them, or this rank's under expert parallelism), gate (M, 1) router probabilities or None -> (M, n_embd):
        each row through its expert's SwiGLU, times its gate."""
        dtype = compute_dtype(xs)
        xs = xs.to(dtype)
        w1, w3, w2 = (local_part(w).to(dtype) for w in (self.w1, self.w3, self.w2))
        # The gate scales whole output rows, so either path applies it once, to all of them.
        scale = (lambda y: y) if gate is None else (lambda y: y * gate.to(dtype))
        if self.gemm_path(xs) == "grouped":
            # One grouped GEMM per weight: each expert's slice times its own matrix, in one kernel.
            offs = counts.cumsum(0).to(torch.int32)
            h = F.silu(torch._grouped_mm(xs, w1, offs=offs)) * torch._grouped_mm(xs, w3, offs=offs)
            return scale(torch._grouped_mm(h, w2, offs=offs))
        # One expert at a time, its whole MLP on its slice. On CPU this beats the grouped GEMM ("auto"
        # picks it there): a slice's intermediates stay in cache instead of making three passes over the
        # whole buffer. An expert with no tokens still multiplies an empty slice, so its weights stay in
        # the autograd graph (zero gradient) and DDP needs no find_unused_parameters. Without autograd
        # (evaluation, decoding) there is no graph to keep, and skipping empty experts saves small ops
        # (not under torch.compile: a test of a slice's data-dependent length cannot be traced).
        # (Iterating over the stacked weights unbinds them: one backward op stacks every expert's gradient.
        # Indexing w1[e] instead would give each expert a backward that writes a full-size zero gradient.)
        sizes, keep_empty = counts.tolist(), torch.is_grad_enabled() or torch.compiler.is_compiling()
        pieces = [(F.silu(xe @ a) * (xe @ b)) @ c for xe, a, b, c in zip(xs.split(sizes), w1, w3, w2)
                  if keep_empty or len(xe)]
        return scale(torch.cat(pieces)) if pieces else xs.new_zeros(0, w2.shape[-1])  # (a rank may get no rows)

    def aux_loss(self, logits, probs, mask):
        """The weighted sum of the router's auxiliary losses (they only shape training, so eval skips them)."""
        c = self.config
        aux = c.balance_loss * load_balance_loss(probs, mask)
        if c.group_balance_loss and c.n_expert_groups > 1:
            aux = aux + c.group_balance_loss * load_balance_loss(probs, mask, c.n_expert_groups)
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
