"""
The GPT: a decoder-only transformer whose blocks use the hybrid attention of attention.py and the
top-p Mixture-of-Experts of router.py.

    token ids -> embedding -> n_layer x [x + Attention(RMSNorm(x)); x + MoE-or-MLP(RMSNorm(x))]
              -> RMSNorm -> tied output projection -> logits

Which layers are local or global, which global layers share K/V and which layers are MoE all come from
GPTConfig; `layer_kinds` turns the config into the per-layer layout that the blocks and the KV cache use.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import Attention, KVCache, rope_cache
from router import MoE, SwiGLU, top_k_mask, top_p_mask


@dataclass
class GPTConfig:
    vocab_size: int = 50304          # GPT-2's 50257 padded up to a multiple of 64
    block_size: int = 256            # longest training sequence
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 2               # grouped-query attention: n_head / n_kv_head query heads per K/V head
    n_embd: int = 128
    # Hybrid attention
    attn_pattern: str = "LLLG"       # L = local, G = global, tiled over the layers (Yi-Lightning: LLLG)
    window: int = 64                 # local layers see this many positions (themselves included)
    kv_share: bool = False           # pairs of consecutive global layers share one K/V (the 2nd reuses the 1st)
    rope_base: float = 10000.0
    # Mixture-of-Experts
    n_dense_layers: int = 1          # the first layers keep a dense MLP (as in DeepSeekMoE)
    mlp_hidden: Optional[int] = None     # dense SwiGLU hidden size; default 8/3 * n_embd rounded up to 8
    n_experts: int = 8               # routed experts per MoE layer
    n_shared: int = 1                # always-on shared experts per MoE layer
    expert_hidden: Optional[int] = None  # hidden size of one expert; default mlp_hidden // 4 (fine-grained)
    routing: str = "top_p"           # "top_p" (dynamic) or "top_k" (the fixed baseline)
    top_p: float = 0.4               # Huang et al. 2024
    top_k: int = 2
    min_k: int = 1
    max_k: Optional[int] = None
    n_expert_groups: int = 1         # expert groups (one per expert-parallel rank) for the group balance loss
    balance_loss: float = 1e-2       # Switch-style expert balance (Huang et al. 2024)
    group_balance_loss: float = 0.0  # group-level balance (DeepSeek-V2 uses 0.05 for its device-level loss)
    entropy_loss: float = 1e-4       # router entropy, the "dynamic loss" (Huang et al. 2024)
    z_loss: float = 1e-3             # router z-loss (ST-MoE)
    target_experts: Optional[float] = None  # if set, a controller moves top_p to hold this many experts/token
    controller_gain: float = 0.05
    # The rest
    dropout: float = 0.0
    tie_embeddings: bool = True
    norm_eps: float = 1e-5

    def __post_init__(self):
        def need(ok, message):
            if not ok:
                raise ValueError(message)
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "window",
                     "n_experts", "top_k", "min_k", "n_expert_groups"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1; got {getattr(self, name)}")
        need(self.n_embd % self.n_head == 0,
             f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): pick e.g. n_head="
             f"{math.gcd(self.n_embd, self.n_head)}")
        need((self.n_embd // self.n_head) % 2 == 0, f"head size n_embd/n_head must be even for RoPE; "
             f"got {self.n_embd // self.n_head}")
        need(self.n_head % self.n_kv_head == 0,
             f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        need(len(self.attn_pattern) > 0 and set(self.attn_pattern) <= {"L", "G"},
             f"attn_pattern must be a non-empty string of L (local) and G (global); got {self.attn_pattern!r}")
        n_global = sum(kind != "L" for kind in self.layout())
        need(not self.kv_share or n_global >= 2, f"kv_share needs at least two global layers to pair; "
             f"attn_pattern {self.attn_pattern!r} over {self.n_layer} layers has {n_global}: set kv_share=False")
        need(0 <= self.n_dense_layers <= self.n_layer, f"n_dense_layers must be in [0, n_layer]; "
             f"got {self.n_dense_layers}")
        need(self.routing in ("top_p", "top_k"), f"routing must be 'top_p' or 'top_k'; got {self.routing!r}")
        need(0 < self.top_p <= 1, f"top_p must be in (0, 1]; got {self.top_p}")
        need(self.top_k <= self.n_experts, f"top_k ({self.top_k}) cannot exceed n_experts ({self.n_experts})")
        max_k = self.n_experts if self.max_k is None else self.max_k
        need(self.min_k <= max_k <= self.n_experts, f"need min_k <= max_k <= n_experts; got min_k="
             f"{self.min_k}, max_k={self.max_k}, n_experts={self.n_experts}")
        need(self.n_experts % self.n_expert_groups == 0, f"n_experts ({self.n_experts}) must be divisible "
             f"by n_expert_groups ({self.n_expert_groups})")
        need(self.target_experts is None or 1 <= self.target_experts <= self.n_experts,
             f"target_experts must be in [1, n_experts]; got {self.target_experts}")
        need(0 <= self.dropout < 1, f"dropout must be in [0, 1); got {self.dropout}")
        need(self.rope_base > 1, f"rope_base must be > 1; got {self.rope_base}")
        for name in ("balance_loss", "group_balance_loss", "entropy_loss", "z_loss"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0; got {getattr(self, name)}")
        if self.mlp_hidden is None:
            self.mlp_hidden = 8 * ((8 * self.n_embd // 3 + 7) // 8)
        if self.expert_hidden is None:
            self.expert_hidden = max(1, self.mlp_hidden // 4)
        need(self.mlp_hidden >= 1 and self.expert_hidden >= 1, "mlp_hidden and expert_hidden must be >= 1")

    def layout(self):
        """Per layer: "L" (local), "G" (global, own K/V) or "S" (global, reuses the previous G's K/V)."""
        kinds = [self.attn_pattern[i % len(self.attn_pattern)] for i in range(self.n_layer)]
        n_global = 0
        for i, kind in enumerate(kinds):
            if kind == "G":
                if self.kv_share and n_global % 2 == 1:
                    kinds[i] = "S"
                n_global += 1
        return kinds

    def cache_layers(self):
        """The layout in the KV cache's terms: window (local), None (global) or "shared"."""
        return [{"L": self.window, "G": None, "S": "shared"}[kind] for kind in self.layout()]


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        kind = config.layout()[layer]
        self.attn_norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.attn = Attention(config.n_embd, config.n_head, config.n_kv_head,
                              window=config.window if kind == "L" else None, share_kv=kind == "S",
                              dropout=config.dropout)
        self.ffn_norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        if layer < config.n_dense_layers:
            self.ffn = SwiGLU(config.n_embd, config.mlp_hidden)
        else:
            self.ffn = MoE(config.n_embd, config.n_experts, config.expert_hidden, n_shared=config.n_shared,
                           routing=config.routing, top_p=config.top_p, top_k=config.top_k, min_k=config.min_k,
                           max_k=config.max_k, n_groups=config.n_expert_groups, balance_loss=config.balance_loss,
                           group_balance_loss=config.group_balance_loss, entropy_loss=config.entropy_loss,
                           z_loss=config.z_loss, target_experts=config.target_experts,
                           controller_gain=config.controller_gain)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, shared_kv, cache, layer):
        a, kv = self.attn(self.attn_norm(x), cos, sin, shared_kv, cache, layer)
        x = x + a
        if isinstance(self.ffn, MoE):
            f, aux = self.ffn(self.ffn_norm(x))
        else:
            f, aux = self.ffn(self.ffn_norm(x)), x.new_zeros(())
        return x + self.dropout(f), kv, aux


class GPT(nn.Module):
    def __init__(self, config, verbose=True):
        super().__init__()
        self.config = config
        self.rope_base = config.rope_base  # a long-context stage may raise it; saved with the weights
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # GPT-2: scale the init of projections into the residual stream by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "w2.weight", "ffn.w2")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
            elif name.endswith(("ffn.w1", "ffn.w3")):
                nn.init.normal_(p, mean=0.0, std=0.02)
        self.last = {}
        if verbose:
            print(self.describe())

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_extra_state(self):
        return {"rope_base": self.rope_base}

    def set_extra_state(self, state):
        self.rope_base = state["rope_base"]

    def moe_layers(self):
        return [block.ffn for block in self.blocks if isinstance(block.ffn, MoE)]

    # -------------------------------------------------------------------------------------------------
    def forward(self, idx, targets=None, cache=None):
        """idx (B, T) token ids. Returns (logits, loss).

        With targets (B, T; -1 = ignore): logits for every position and loss = mean cross-entropy + the
        weighted auxiliary router losses; `self.last` then holds the plain cross-entropy ("ce"), the
        auxiliary loss ("aux") and the per-token losses ("token_loss", B x T) for logging and analysis.
        Without targets: logits of the last position only, loss None. With a KVCache: continue from it.
        """
        B, T = idx.shape
        start = 0 if cache is None else cache.pos
        if cache is None and T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        if cache is not None:
            cache.check_room(T)
        cos, sin = rope_cache(torch.arange(start, start + T, device=idx.device),
                              self.config.n_embd // self.config.n_head, self.rope_base)
        x = self.drop(self.wte(idx))
        kv, aux = None, x.new_zeros(())
        for i, block in enumerate(self.blocks):
            x, layer_kv, layer_aux = block(x, cos, sin, kv, cache, i)
            if block.attn.window is None and not block.attn.share_kv:
                kv = layer_kv  # the K/V a following sharing layer reuses
            aux = aux + layer_aux
        if cache is not None:
            cache.pos += T
        x = self.norm(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        token_loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1,
                                     reduction="none").view(B, T)
        ce = token_loss.sum() / (targets != -1).sum().clamp(min=1)
        self.last = {"ce": ce.detach(), "aux": aux.detach(), "token_loss": token_loss.detach()}
        return logits, ce + aux

    # -------------------------------------------------------------------------------------------------
    def num_params(self, active=False, experts_per_token=None):
        """Total parameters (tied embeddings counted once), or the parameters one token uses: everything
        but the routed experts, plus `experts_per_token` routed experts per MoE layer (default: top_k for
        top-k routing, the mean measured in the last forward for top-p, else min_k)."""
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        moes = self.moe_layers()
        routed = sum(m.w1.numel() + m.w2.numel() + m.w3.numel() for m in moes)
        if experts_per_token is None:
            c = self.config
            if c.routing == "top_k":
                experts_per_token = c.top_k
            elif moes and moes[0].last_routing is not None:  # measured in the last forward
                experts_per_token = sum(m.stats["experts_per_token"].item() for m in moes) / len(moes)
            else:
                experts_per_token = c.min_k
        return round(total - routed + routed * experts_per_token / self.config.n_experts)

    def describe(self):
        c = self.config
        kinds = "".join(c.layout())
        moes = self.moe_layers()
        per_expert = 3 * c.n_embd * c.expert_hidden * len(moes)
        line = (f"GPT: {self.num_params() / 1e6:.2f}M parameters, layout {kinds} (L local w={c.window}, "
                f"G global, S shares the previous G's K/V), {len(moes)} MoE layers of {c.n_experts} experts "
                f"+ {c.n_shared} shared")
        if moes:
            line += (f"; active per token {self.num_params(True, c.min_k) / 1e6:.2f}M at {c.min_k} routed "
                     f"expert(s), +{per_expert / 1e6:.3f}M per extra expert")
        return line

    def configure_optimizer(self, weight_decay, learning_rate, betas, device_type):
        """AdamW. Matrices (embeddings, projections, experts, router) decay; norm gains do not: decay pulls
        a gain toward 0, which is not a sensible prior for a scale that starts at 1."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")

    def make_cache(self, batch_size, max_len, device=None, dtype=None):
        c = self.config
        weight = self.wte.weight
        return KVCache(c.cache_layers(), batch_size, c.n_kv_head, c.n_embd // c.n_head, max_len,
                       device=device or weight.device, dtype=dtype or weight.dtype)

    @torch.inference_mode()  # like no_grad, with less per-op bookkeeping: decoding runs many small ops
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, cache=None, on_token=None):
        """Continue idx (B, T) by max_new_tokens tokens: one prefill of the prompt, then one token at a
        time through the KV cache. temperature 0 (or top_k=1) is greedy. top_p: nucleus sampling with the
        same rule as the router (smallest set of tokens whose probabilities reach p).

        Past block_size: local layers simply slide (their ring buffer never holds more than `window`); global
        layers keep attending to every position, with RoPE angles beyond those seen in training, so quality
        degrades gradually there. The cache is sized for prompt + max_new_tokens; on_token(tokens) is called
        with each new (B, 1) tensor as it is produced (sample.py streams with it)."""
        if cache is None:
            cache = self.make_cache(idx.shape[0], idx.shape[1] + max_new_tokens)
        logits, _ = self(idx, cache=cache)
        for i in range(max_new_tokens):
            logits = logits[:, -1, :].float()
            if temperature == 0 or top_k == 1:
                next_token = logits.argmax(-1, keepdim=True)
            else:
                probs = (logits / temperature).softmax(-1)
                if top_k is not None:
                    probs = probs * top_k_mask(probs, min(top_k, probs.shape[-1]))
                if top_p is not None:
                    probs = probs * top_p_mask(probs / probs.sum(-1, keepdim=True), top_p)
                next_token = torch.multinomial(probs, num_samples=1)
            idx = torch.cat([idx, next_token], dim=1)
            if on_token is not None:
                on_token(next_token)
            if i < max_new_tokens - 1:  # the last token needs no logits after it
                logits, _ = self(next_token, cache=cache)
        return idx


# -----------------------------------------------------------------------------------------------------
# Named shapes. train.py configs start from one of these; bench.py uses them for the arithmetic.

PRESETS = {
    # A few seconds per hundred steps on a laptop CPU: tests and the quickstart.
    "tiny": dict(n_layer=8, n_head=4, n_kv_head=2, n_embd=64, block_size=128, window=32, kv_share=True,
                 n_experts=8),
    # nanoGPT's shakespeare_char CPU shape (4 layers, 4 heads, 128 wide, block 64), made hybrid + MoE.
    "nano_char": dict(n_layer=4, n_head=4, n_kv_head=4, n_embd=128, block_size=64, window=32, n_experts=8),
    # GPT-2-124M-class trunk for one GPU: 12 layers, 12 heads, 768 wide, 1024 context, 64 experts.
    "gpt2_124m": dict(n_layer=12, n_head=12, n_kv_head=4, n_embd=768, block_size=1024, window=256, kv_share=True,
                      n_experts=64, n_shared=2, expert_hidden=512),
    # A large Yi-Lightning-like shape for parameter and KV-cache arithmetic only (not trained here). The
    # report does not publish Yi-Lightning's dimensions; these are assumptions of the right magnitude.
    "yi_lightning_like": dict(n_layer=64, n_head=64, n_kv_head=8, n_embd=8192, block_size=65536, window=4096,
                              kv_share=True,
                              n_experts=128, n_shared=2, expert_hidden=1536, n_expert_groups=8,
                              vocab_size=100352),
}


def preset(name, **overrides):
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})
