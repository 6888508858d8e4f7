"""
The GPT: a decoder-only transformer whose blocks use the hybrid attention of attention.py and the
top-p Mixture-of-Experts of router.py.

    token ids -> embedding -> n_layer x [x + Attention(RMSNorm(x)); x + MoE-or-MLP(RMSNorm(x))]
              -> RMSNorm -> tied output projection -> logits

Which layers are local or global, which global layers share K/V and which layers are MoE all come from
GPTConfig; `GPTConfig.layout()` gives each layer's attention kind (attention.LOCAL, GLOBAL or SHARING), which
the blocks, the KV cache and the FLOP count all read. The router's settings are one RouterConfig (router.py).

Read top to bottom: a block, the GPT and its forward, decoding with the KV cache, then the settings
(GPTConfig), the initialisation of every weight, and the named shapes. Imports only torch, attention and router.
"""

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import GLOBAL, LOCAL, SHARING, Attention, KVCache, rope_cache
from router import MoE, RouterConfig, SwiGLU, top_k_mask, top_p_mask


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.attn = Attention(config.n_embd, config.n_head, config.n_kv_head, config.layout()[layer], config.window)
        # With global_x0, a global (or sharing) layer reads the token embeddings beside the stream, each normalised:
        # the token it looks a match up for, at a share no earlier layer can shrink (docs/experiments.md).
        self.x0_norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps) if config.global_x0 and \
            self.attn.kind != LOCAL else None
        if layer < config.n_attn_only:  # attention alone
            self.ffn_norm = self.ffn = None
            return
        self.ffn_norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        if layer < config.n_attn_only + config.n_dense_layers:
            self.ffn = SwiGLU(config.n_embd, config.mlp_hidden)
        else:
            self.ffn = MoE(config.n_embd, config.n_experts, config.expert_hidden, config.n_shared, config.router)

    def forward(self, x, x0, cos, sin, kv, cache, layer):
        """x: the stream; x0: the token embeddings. Returns (x, the K/V this layer attended to, aux loss, Routing or
        None for a dense layer)."""
        h = self.attn_norm(x) if self.x0_norm is None else self.attn_norm(x) + self.x0_norm(x0)
        a, kv = self.attn(h, cos, sin, kv, cache, layer)
        x = x + a
        if isinstance(self.ffn, MoE):
            f, aux, routing = self.ffn(self.ffn_norm(x))
            return x + f, kv, aux, routing
        if self.ffn is not None:
            x = x + self.ffn(self.ffn_norm(x))
        return x, kv, x.new_zeros(()), None


class LossParts(NamedTuple):
    """What GPT.forward(..., parts=True) returns beside logits and loss: the loss's pieces and the routing."""
    ce: Optional[torch.Tensor]          # mean cross-entropy over the targets (None without targets)
    aux: torch.Tensor                   # the weighted auxiliary router losses (0 in eval mode)
    token_loss: Optional[torch.Tensor]  # (B, T) cross-entropy of each position (None without targets)
    routing: tuple                      # one router.Routing per MoE layer, in layer order


class GPT(nn.Module):
    def __init__(self, config, verbose=True):
        super().__init__()
        self.config = config
        # A stage may raise the RoPE base or change the local layers' window; both are saved with the weights.
        self.rope_base, self.window = config.rope_base, config.window
        # The layers are made on the meta device: no memory and none of torch's default draws, which init_weights
        # would only overwrite. The weights then depend on the seed and weight_inits alone, on whatever device is
        # the default here (under `with torch.device("meta")` the model stays bare).
        device = torch.get_default_device()
        with torch.device("meta"):
            self.wte = nn.Embedding(config.vocab_size, config.n_embd)
            self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
            self.norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
            if config.x0_mix:  # block i reads x_scale[i] * x + x0_scale[i] * (the token embeddings); starts at 1, 0
                self.x_scale, self.x0_scale = nn.Parameter(torch.empty(config.n_layer)), \
                    nn.Parameter(torch.empty(config.n_layer))
        self.to_empty(device=device)
        self.tie_weights()
        init_weights(self, config.n_layer, config.init_std)
        if verbose:
            print(self.describe())

    def tie_weights(self):
        """With tie_embeddings, the output layer is the token embedding: one tensor. (Making the weights anew on
        a device, as to_empty does, unties it.)"""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    def get_extra_state(self):
        return {"rope_base": self.rope_base, "window": self.window}

    def set_extra_state(self, state):
        self.rope_base = state["rope_base"]
        self.set_window(state.get("window", self.config.window))  # (a run saved before windows could change)

    def set_window(self, window):
        """Every local layer attends to the last `window` positions from now on (a stage's window)."""
        self.window = window
        for block in self.blocks:
            if block.attn.kind == LOCAL:
                block.attn.window = window

    def moe_layers(self):
        return [block.ffn for block in self.blocks if isinstance(block.ffn, MoE)]

    # -------------------------------------------------------------------------------------------------
    def forward(self, idx, targets=None, cache=None, parts=False):
        """idx (B, T) token ids. Returns (logits, loss), or (logits, loss, LossParts) with parts=True.

        With targets (B, T; -1 = ignore): logits for every position and loss = mean cross-entropy + the
        weighted auxiliary router losses. Without targets: logits of the last position only, loss None.
        With a KVCache: continue from where it is filled to, and advance it. LossParts holds the plain
        cross-entropy, the auxiliary loss, the per-token losses and each MoE layer's routing, as tensors (nothing
        is read back from a GPU here).
        """
        B, T = idx.shape
        if cache is None and T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        if cache is not None:
            cache.check_room(T)
        positions = cache.positions(T, idx.device) if cache is not None else torch.arange(T, device=idx.device)
        cos, sin = rope_cache(positions, self.config.n_embd // self.config.n_head, self.rope_base)
        if positions.dim() == 2:  # one position per row (engine.py's ragged batch): broadcast over the heads
            cos, sin = cos[:, None], sin[:, None]
        x = x0 = self.wte(idx)
        kv, aux, routing = None, x.new_zeros(()), []
        for i, block in enumerate(self.blocks):
            if self.config.x0_mix:
                x = self.x_scale[i] * x + self.x0_scale[i] * x0
            x, layer_kv, layer_aux, layer_routing = block(x, x0, cos, sin, kv, cache, i)
            if block.attn.kind == GLOBAL:
                kv = layer_kv  # the K/V a following SHARING layer attends with
            aux = aux + layer_aux
            if layer_routing is not None:
                routing.append(layer_routing)
        if cache is not None:
            cache.advance(T)
        x = self.norm(x)
        if targets is None:
            logits, loss, ce, token_loss = self.lm_head(x[:, -1:, :]), None, None, None
        else:
            logits = self.lm_head(x)
            token_loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1,
                                         reduction="none").view(B, T)
            ce = token_loss.sum() / (targets != -1).sum().clamp(min=1)
            loss = ce + aux
        if parts:
            return logits, loss, LossParts(ce, aux, token_loss, tuple(routing))
        return logits, loss

    # -------------------------------------------------------------------------------------------------
    def make_cache(self, batch_size, max_len, device=None, dtype=None):
        """A KVCache for this model, its local layers' rings as long as their window now. Its dtype is autocast's
        where autocast is on (the keys and values come out of the projections in that dtype, and attention reads
        them in it), else the weights'. On the meta device it holds no memory and still counts its bytes."""
        where = self.wte.weight.device.type  # (the autocast of where the model runs, also for a cache on meta)
        if dtype is None:
            dtype = torch.get_autocast_dtype(where) if torch.is_autocast_enabled(where) else self.wte.weight.dtype
        device = device or self.wte.weight.device
        return kv_cache(self.config, batch_size, max_len, device, dtype, self.window)

    @torch.inference_mode()  # like no_grad, with less per-op bookkeeping: decoding runs many small ops
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, cache=None, on_token=None,
                 vocab_size=None):
        """Continue idx (B, T) by max_new_tokens tokens: one prefill of the prompt, then one token at a
        time through the KV cache. temperature 0 (or top_k=1) is greedy. top_p: nucleus sampling with the
        same rule as the router (smallest set of tokens whose probabilities reach p). vocab_size: the
        tokenizer's, when the model's is padded beyond it: ids past it are never produced.

        Past block_size: local layers simply slide (their ring buffer never holds more than `window`); global
        layers keep attending to every position, with RoPE angles beyond those seen in training, so quality
        degrades gradually there. The cache is sized for prompt + max_new_tokens; on_token(tokens) is called
        with each new (B, 1) tensor as it is produced."""
        if cache is None:
            cache = self.make_cache(idx.shape[0], idx.shape[1] + max_new_tokens)
        cache.check_room(idx.shape[1] + max_new_tokens - 1)  # (the last new token is never fed back)
        logits, _ = self(idx, cache=cache)
        for i in range(max_new_tokens):
            token = next_token(logits[:, -1, :vocab_size].float(), temperature, top_k, top_p)  # (padding ids: unknowns)
            idx = torch.cat([idx, token], dim=1)
            if on_token is not None:
                on_token(token)
            if i < max_new_tokens - 1:  # the last token needs no logits after it
                logits, _ = self(token, cache=cache)
        return idx

    # -------------------------------------------------------------------------------------------------
    def num_params(self, active=False, experts_per_token=None):
        """Total parameters (tied embeddings counted once), or with active=True the parameters one token
        uses: everything but the routed experts, plus `experts_per_token` routed experts per MoE layer (a
        number, or one per MoE layer). Left out, each layer's live routing decides: top_k for top-k; top-p
        picks a varying number, so there the measured experts per token must be given."""
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        moes = self.moe_layers()
        if experts_per_token is None:
            if any(m.config.routing == "top_p" for m in moes):
                raise ValueError("top-p routing uses a varying number of experts per token: pass the measured "
                                 "experts_per_token (LossParts.routing of a forward)")
            experts_per_token = [m.config.top_k for m in moes]
        if isinstance(experts_per_token, (int, float)):
            experts_per_token = [experts_per_token] * len(moes)
        if len(experts_per_token) != len(moes):
            raise ValueError(f"experts_per_token needs one value per MoE layer ({len(moes)}); "
                             f"got {len(experts_per_token)}")
        per_expert = 3 * self.config.n_embd * self.config.expert_hidden
        routed = per_expert * self.config.n_experts * len(moes)
        return round(total - routed + per_expert * sum(experts_per_token))

    def describe(self):
        c = self.config
        moes = self.moe_layers()
        line = (f"GPT: {self.num_params() / 1e6:.2f}M parameters, layout {''.join(c.layout())} (L local "
                f"w={self.window}, G global, S attends with the previous G's K/V), {len(moes)} MoE layers of "
                f"{c.n_experts} experts + {c.n_shared} shared, {c.router.routing} routing")
        if moes:
            per_expert = 3 * c.n_embd * c.expert_hidden * len(moes)
            line += (f"; active per token {self.num_params(True, 0) / 1e6:.2f}M + {per_expert / 1e6:.3f}M "
                     f"per routed expert")
            if any(2 * n % 16 for n in (c.n_embd, c.expert_hidden)):  # bf16 rows must be 16-byte multiples
                line += (f" (on a GPU the experts run one at a time: bf16 rows of n_embd={c.n_embd} and "
                         f"expert_hidden={c.expert_hidden} are not multiples of 16 bytes, as grouped GEMM needs)")
        return line

    def configure_optimizer(self, weight_decay, learning_rate, betas, device_type):
        """AdamW. Matrices (embeddings, projections, experts, router) decay; norm gains do not: decay pulls
        a gain toward 0, which is not a sensible prior for a scale that starts at 1."""
        experts = {id(w) for m in self.moe_layers() for w in m.experts.parameters()}
        params = [p for p in self.parameters() if p.requires_grad]
        # The routed experts get a group of their own: expert parallelism splits them over the ranks
        # (infra/parallel.py) and one fused update needs its tensors alike.
        routed = [p for p in params if id(p) in experts]
        matrices = [p for p in params if p.dim() >= 2 and id(p) not in experts]
        groups = [{"params": routed, "weight_decay": weight_decay}, {"params": matrices, "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        # The fused kernel (CUDA and CPU) updates every tensor in one op instead of a dozen ops per tensor.
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in ("cuda", "cpu"))


def next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """(B, 1) next tokens from logits (B, V): greedy at temperature 0 (or top_k=1), else a sample from the
    tempered softmax, cut to the top_k tokens and then to the top_p nucleus (the router's rule: the smallest set
    whose probabilities reach p). generator: the random stream to draw from (engine.py gives each request its own)."""
    if temperature < 1e-30 or top_k == 1:  # (the limit as the temperature falls; smaller ones are 0 in float32)
        return logits.argmax(-1, keepdim=True)
    probs = ((logits - logits.amax(-1, keepdim=True)) / temperature).softmax(-1)  # (no inf - inf)
    if top_k is not None:
        probs = probs * top_k_mask(probs, min(top_k, probs.shape[-1]))
    if top_p is not None:
        probs = probs * top_p_mask(probs / probs.sum(-1, keepdim=True), top_p)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def compile_model(model, backend="inductor"):
    """torch.compile(model), after turning on two process-wide Dynamo settings that trace the MoE's
    data-dependent dispatch into the graph: which tokens go to which expert (nonzero) and how many each gets
    (read with tolist on the loop path) would otherwise break the graph once or twice per MoE layer, and every
    stage's new sequence length would then recompile each piece, until Dynamo's limit of 8 versions leaves the
    rest uncompiled. Traced, a training step is one graph, and a change of shape costs one recompile (after
    which that dimension is dynamic)."""
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    torch._dynamo.config.capture_scalar_outputs = True
    return torch.compile(model, backend=backend)


# -----------------------------------------------------------------------------------------------------
# The settings

@dataclass
class GPTConfig:
    vocab_size: int = 50304          # token ids the model knows; train.py takes the data's, padded to a multiple of 64
    block_size: int = 256            # longest training sequence
    n_layer: int = 4                 # transformer blocks
    n_head: int = 4                  # query heads
    n_kv_head: int = 2               # grouped-query attention: n_head / n_kv_head query heads per K/V head
    n_embd: int = 128                # width of the residual stream
    # Hybrid attention
    attn_pattern: str = "LLLG"       # L = local, G = global, tiled over the layers (Yi-Lightning: LLLG)
    window: int = 64                 # local layers see this many positions (themselves included); a stage may change it
    share_kv: bool = False           # global layers share K/V in pairs: the 2nd of each pair reuses the 1st's
    rope_base: float = 10000.0       # RoPE base at the start of training (a stage may raise it)
    x0_mix: bool = False             # each block reads a learned mix of the stream and the token embeddings (x0)
    global_x0: bool = False          # global layers' attention reads RMSNorm(stream) + RMSNorm(token embeddings)
    n_attn_only: int = 0             # the first layers have attention and no MLP
    # Mixture-of-Experts
    n_dense_layers: int = 1          # the first layers with an MLP keep a dense one (as in DeepSeekMoE)
    mlp_hidden: Optional[int] = None     # dense SwiGLU hidden size; default 8/3 * n_embd rounded up to 8
    n_experts: int = 8               # routed experts per MoE layer
    n_shared: int = 1                # always-on shared experts per MoE layer
    expert_hidden: Optional[int] = None  # hidden size of one expert; default mlp_hidden // 4 (fine-grained)
    router: RouterConfig = field(default_factory=RouterConfig)  # how tokens pick experts (router.py)
    # The rest
    tie_embeddings: bool = True      # the output layer reuses the token embedding
    norm_eps: float = 1e-5           # RMSNorm epsilon
    init_std: float = 0.02           # weights start as normal(0, init_std) (GPT-2's 0.02, made for 768 wide)

    def __post_init__(self):
        if isinstance(self.router, dict):  # as stored in a checkpoint
            self.router = RouterConfig(**self.router)
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "window", "n_experts"):
            if not getattr(self, name) >= 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): pick e.g. n_head="
                             f"{math.gcd(self.n_embd, self.n_head)}")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"head size n_embd/n_head must be even for RoPE; got {self.n_embd // self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if not self.attn_pattern or not set(self.attn_pattern) <= {LOCAL, GLOBAL}:
            raise ValueError(f"attn_pattern must be a non-empty string of L (local) and G (global); "
                             f"got {self.attn_pattern!r}")
        n_global = sum(kind != LOCAL for kind in self.layout())
        if self.share_kv and n_global < 2:
            raise ValueError(f"share_kv needs at least two global layers to pair; attn_pattern {self.attn_pattern!r} "
                             f"over {self.n_layer} layers has {n_global}: set share_kv=False")
        if not 0 <= self.n_attn_only <= self.n_layer:
            raise ValueError(f"n_attn_only must be in [0, n_layer]; got {self.n_attn_only}")
        if not 0 <= self.n_dense_layers <= self.n_layer - self.n_attn_only:
            raise ValueError(f"n_dense_layers must be in [0, n_layer - n_attn_only]; got {self.n_dense_layers}")
        if self.n_shared < 0:
            raise ValueError(f"n_shared must be >= 0; got {self.n_shared}")
        if not self.rope_base > 1:
            raise ValueError(f"rope_base must be > 1; got {self.rope_base}")
        if not 0 < self.norm_eps < 1:
            raise ValueError(f"norm_eps must be in (0, 1); got {self.norm_eps}")
        if not 0 < self.init_std < 1:
            raise ValueError(f"init_std must be in (0, 1); got {self.init_std}")
        self.router.check(self.n_experts)
        if self.mlp_hidden is None:
            self.mlp_hidden = 8 * ((8 * self.n_embd // 3 + 7) // 8)
        if self.expert_hidden is None:
            self.expert_hidden = max(1, self.mlp_hidden // 4)
        if self.mlp_hidden < 1 or self.expert_hidden < 1:
            raise ValueError("mlp_hidden and expert_hidden must be >= 1")

    def layout(self):
        """Each layer's attention kind: LOCAL, GLOBAL, or SHARING (with share_kv, every second global layer
        attends with the K/V of the GLOBAL layer before it). Blocks, the KV cache and the FLOP count all read it."""
        kinds = [self.attn_pattern[i % len(self.attn_pattern)] for i in range(self.n_layer)]
        n_global = 0
        for i, kind in enumerate(kinds):
            if kind == GLOBAL:
                if self.share_kv and n_global % 2 == 1:
                    kinds[i] = SHARING
                n_global += 1
        return kinds


def make_config(settings):
    """GPTConfig from one flat dict of settings (a preset, a config file, --key=value): the router's settings
    go to its RouterConfig, the rest to the GPTConfig."""
    router_names = {f.name for f in fields(RouterConfig)}
    router = RouterConfig(**{k: v for k, v in settings.items() if k in router_names})
    return GPTConfig(**{k: v for k, v in settings.items() if k not in router_names}, router=router)


def kv_cache(config, batch_size, max_len, device=None, dtype=torch.float32, window=None):
    """A KVCache for a model of this config whose local layers attend to `window` positions (default: the
    config's). On the meta device it holds no memory and still counts its bytes."""
    return KVCache(config.layout(), window or config.window, batch_size, config.n_kv_head,
                   config.n_embd // config.n_head, max_len, device, dtype)


def kv_cache_bytes(config, context, dtype=torch.bfloat16):
    """Bytes of the KV cache of one sequence of `context` positions, measured on the cache object itself, built
    on the meta device (no memory): how the tools size caches of models too large to build."""
    return kv_cache(config, 1, context, "meta", dtype).nbytes()


def kv_cache_ratio(config, context):
    """The KV cache of this layout at `context` over that of the same model with every layer global and no K/V
    shared: what hybrid attention saves (README, "KV-cache arithmetic")."""
    all_global = dataclasses.replace(config, attn_pattern=GLOBAL, share_kv=False)
    return kv_cache_bytes(config, context) / kv_cache_bytes(all_global, context)


# -----------------------------------------------------------------------------------------------------
# The initialisation of every weight

def weight_inits(module, n_layer, std=0.02):
    """(tensor, std) for every weight of a GPT (or of a bare MoE, SwiGLU or Attention layer), and the experts'
    balancing biases, each exactly once, in a fixed order: the one statement of the initialisation, which
    init_weights applies and infra/parallel.py replays shard by shard. A tensor with a std > 0 starts as
    normal(0, std); std None (an RMSNorm gain) starts at 1; std 0 (a balancing bias) at 0.
    Embeddings, projections, routers and experts: std (GPTConfig.init_std). Projections that write into the
    residual stream (attention's o_proj, every MLP's and expert's w2) are scaled by 1/sqrt(2 * n_layer), as in
    GPT-2, so the stream's variance does not grow with depth. GPT-2's 0.02 is about 0.55 / sqrt(768); at 64 wide
    it makes attention scores so flat that looking a token up by content (recall) does not form in the minutes
    the CPU track trains, where about 1 / sqrt(n_embd) does (docs/experiments.md)."""
    out_std = std / math.sqrt(2 * n_layer)
    for m in module.modules():
        if isinstance(m, nn.Embedding):
            yield m.weight, std
        elif isinstance(m, nn.RMSNorm):
            yield m.weight, None
        elif isinstance(m, Attention):
            for w in (m.q_proj.weight, *([m.kv_proj.weight] if m.kv_proj is not None else [])):
                yield w, std
            yield m.o_proj.weight, out_std
        elif isinstance(m, SwiGLU):
            yield from ((m.w1.weight, std), (m.w3.weight, std), (m.w2.weight, out_std))
        elif isinstance(m, MoE):  # (its shared experts are a SwiGLU, met on their own)
            e = m.experts
            yield from ((m.router.weight, std), (e.w1, std), (e.w3, std), (e.w2, out_std), (m.expert_bias, 0))
        elif isinstance(m, GPT):
            if not m.config.tie_embeddings:  # (tied: it is the embedding)
                yield m.lm_head.weight, std
            if m.config.x0_mix:  # (the blocks start by reading the stream alone)
                yield from ((m.x_scale, None), (m.x0_scale, 0))


def init_weights(module, n_layer, std=0.02):
    """Every weight of a GPT (or of a bare layer) set as weight_inits says."""
    with torch.no_grad():
        for w, std in weight_inits(module, n_layer, std):
            nn.init.ones_(w) if std is None else nn.init.normal_(w, std=std) if std else nn.init.zeros_(w)


# -----------------------------------------------------------------------------------------------------
# Named shapes, each named for what it is: layers x width, or the model whose shape it takes. train.py configs
# start from one of these; the tools use them for the arithmetic.

PRESETS = {
    # 8 layers, 64 wide: the tests, the hybrid and long-context experiments.
    "tiny_8x64": dict(n_layer=8, n_head=4, n_kv_head=2, n_embd=64, block_size=128, window=32, share_kv=True,
                      n_experts=8),
    # nanoGPT's shakespeare_char CPU shape (4 layers, 4 heads, 128 wide, block 64), made hybrid + MoE: the quickstart.
    "nanogpt_4x128": dict(n_layer=4, n_head=4, n_kv_head=4, n_embd=128, block_size=64, window=32, n_experts=8),
    # GPT-2 small's trunk (12 layers, 12 heads, 768 wide, 1024 context; GPT-2 small itself has 124M parameters) with 64
    # routed experts and 2 shared per MoE layer: 0.92B parameters in all, for one GPU or more.
    "gpt2_trunk_64e": dict(n_layer=12, n_head=12, n_kv_head=4, n_embd=768, block_size=1024, window=256,
                           share_kv=True, n_experts=64, n_shared=2, expert_hidden=512),
    # A large Yi-Lightning-like shape for parameter and KV-cache arithmetic only (not trained here). The
    # report does not publish Yi-Lightning's dimensions; these are assumptions of the right magnitude.
    "yi_lightning_like": dict(n_layer=64, n_head=64, n_kv_head=8, n_embd=8192, block_size=65536, window=4096,
                              share_kv=True, n_experts=128, n_shared=2, expert_hidden=1536, vocab_size=100352),
}


def preset(name, **overrides):
    """GPTConfig of a named shape, with any setting (router settings too) overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return make_config({**PRESETS[name], **overrides})


# -----------------------------------------------------------------------------------------------------
# A smoke test: python model.py

if __name__ == "__main__":
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=257, block_size=64, n_layer=8, n_head=4, n_kv_head=2, n_embd=64, window=8,
                       attn_pattern="LLLG", share_kv=True, n_experts=8)
    model = GPT(config)
    x = torch.randint(0, 257, (2, 64))
    logits, loss, parts = model(x, x.roll(-1, 1), parts=True)
    print(f"forward: idx {tuple(x.shape)} -> logits {tuple(logits.shape)}; loss {loss.item():.3f} (cross-entropy "
          f"{parts.ce.item():.3f}, ln 257 = {math.log(257):.3f} at init; aux {parts.aux.item():.4f}); routed experts "
          f"per token by MoE layer {[round(r.experts_per_token.float().mean().item(), 2) for r in parts.routing]}")
    model.eval()
    out = model.generate(x[:1, :5], 30, temperature=0)
    seq = x[:1, :5]
    with torch.no_grad():
        for _ in range(30):  # the whole context again at every step, as nanoGPT decodes
            seq = torch.cat([seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)], 1)
    print(f"greedy decoding through the KV cache equals recomputing the context at every token: "
          f"{torch.equal(out, seq)}")
    print(f"KV cache at 64K positions, this layout over all-global: {kv_cache_ratio(config, 65536):.3f}")
