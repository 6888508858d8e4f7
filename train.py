"""
Multi-stage training, on one CPU, one GPU, or many GPUs and nodes with DDP.

    python train.py                                   # the default 3-stage CPU run (config/default.py)
    python train.py config/shakespeare_char.py --compile=False
    torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 --rdzv_endpoint=HOST:29500 train.py config/...

A run is a list of stages (Yi-Lightning trains this way): each stage has its own data mixture, budget,
sequence length, batch, learning-rate phase, RoPE base and router settings. The learning rate is continuous
across stage boundaries unless a stage sets its own start. Checkpoints (out_dir/ckpt.pt, and best.pt for the
lowest mean val loss) are written atomically and carry everything needed to resume exactly: a killed run
started again with the same command continues where it stopped.
"""

import dataclasses
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import cli
from data.corpus import MixtureLoader, Tokenizer, corpus_dir, mixture_tokenizer
from model import GPT, GPTConfig, PRESETS
from router import ROUTER_SETTINGS


@dataclass
class Stage:
    name: str
    mixture: dict                        # corpus -> weight, e.g. {"shakespeare": 0.7, "code": 0.3}
    steps: Optional[int] = None          # budget in optimizer steps ...
    tokens: Optional[int] = None         # ... or in tokens (all ranks together); exactly one of the two
    seq_len: int = 128
    batch_size: int = 8                  # sequences per micro-step per rank
    grad_accum: int = 1                  # micro-steps per optimizer step per rank
    warmup: int = 0                      # steps of linear warmup from 0 at the stage start
    lr_start: Optional[float] = None     # fraction of peak lr after warmup; None: where the previous stage ended
    lr_end: Optional[float] = None       # fraction of peak lr at the stage end; None: same as lr_start
    decay: str = "linear"                # shape from lr_start to lr_end: "linear" or "cosine"
    rope_base: Optional[float] = None    # None: keep the current base
    router: dict = field(default_factory=dict)  # e.g. {"top_p": 0.5, "entropy_loss": 1e-4}

    def __post_init__(self):
        def need(ok, message):
            if not ok:
                raise ValueError(f"stage {self.name!r}: {message}")
        need(isinstance(self.mixture, dict) and self.mixture, "mixture must name at least one corpus")
        for corpus, weight in self.mixture.items():
            need(isinstance(weight, (int, float)) and weight > 0, f"weight of {corpus!r} must be > 0; got {weight!r}")
        need((self.steps is None) != (self.tokens is None), "give exactly one budget: steps or tokens")
        need((self.steps or self.tokens) >= 1, "the budget must be >= 1")
        for name in ("seq_len", "batch_size", "grad_accum"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1; got {getattr(self, name)}")
        need(self.warmup >= 0, f"warmup must be >= 0; got {self.warmup}")
        for name in ("lr_start", "lr_end"):
            value = getattr(self, name)
            need(value is None or value >= 0, f"{name} must be >= 0; got {value}")
        need(self.decay in ("linear", "cosine"), f"decay must be 'linear' or 'cosine'; got {self.decay!r}")
        need(self.rope_base is None or self.rope_base > 1, f"rope_base must be > 1; got {self.rope_base}")

    def num_steps(self, world_size):
        if self.steps is not None:
            return self.steps
        return math.ceil(self.tokens / (self.batch_size * self.seq_len * self.grad_accum * world_size))


@dataclass
class TrainConfig:
    out_dir: str = "out/default"
    stages: list = field(default_factory=lambda: [
        {"name": "main", "mixture": {"shakespeare_char": 1.0}, "steps": 200, "warmup": 20, "lr_end": 0.1}])
    preset: Optional[str] = None         # a model shape from model.PRESETS; model fields set here override it
    lr: float = 1e-3                     # peak learning rate
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0               # 0 disables
    eval_interval: int = 100             # steps between evaluations (and at every stage end)
    eval_iters: int = 10                 # val batches per corpus
    arith_problems: int = 100            # val problems for exact-match accuracy, when arith is in the run
    log_interval: int = 10
    ckpt_interval: int = 100             # steps between checkpoints (and at every stage end)
    resume: bool = True                  # continue from out_dir/ckpt.pt when it exists
    seed: int = 1337
    device: str = "auto"                 # "auto", "cpu", "cuda", "cuda:1", ...
    dtype: str = "auto"                  # "auto" (bfloat16 on CUDA, float32 on CPU), "bfloat16", "float32"
    compile: Optional[bool] = None       # None: on for CUDA, off for CPU
    plots: bool = True

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0; got {self.lr}")
        for name in ("eval_interval", "eval_iters", "log_interval", "ckpt_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be >= 0")
        if self.dtype not in ("auto", "bfloat16", "float32"):
            raise ValueError(f"dtype must be auto, bfloat16 or float32; got {self.dtype!r}")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; known: {', '.join(PRESETS)}")
        if not isinstance(self.stages, list) or not self.stages:
            raise ValueError("stages must be a non-empty list of stage dicts")
        known = {f.name for f in dataclasses.fields(Stage)}
        for i, stage in enumerate(self.stages):
            if isinstance(stage, dict) and set(stage) - known:
                raise ValueError(f"stage {i}: unknown key(s) {sorted(set(stage) - known)}; known: {sorted(known)}")
        self.stages = [s if isinstance(s, Stage) else Stage(**s) for s in self.stages]


def load_config(argv):
    """TrainConfig and GPTConfig from [config.py] [--key=value ...]; vocab_size comes from the data."""
    settings = cli.parse(argv, TrainConfig, GPTConfig)
    train_cfg = cli.build(TrainConfig, settings)
    corpora = [c for s in train_cfg.stages for c in s.mixture]
    meta = mixture_tokenizer(dict.fromkeys(corpora))
    model_settings = {**PRESETS.get(train_cfg.preset, {}), **settings}
    model_settings.setdefault("vocab_size", 64 * math.ceil(meta["vocab_size"] / 64))  # pad: faster matmuls
    if model_settings["vocab_size"] < meta["vocab_size"]:
        raise cli.ConfigError(f"vocab_size {model_settings['vocab_size']} is smaller than the data's "
                              f"{meta['vocab_size']}")
    model_cfg = cli.build(GPTConfig, model_settings)
    for stage in train_cfg.stages:
        if stage.seq_len > model_cfg.block_size:
            raise cli.ConfigError(f"stage {stage.name!r}: seq_len {stage.seq_len} exceeds block_size "
                                  f"{model_cfg.block_size}")
        for key in stage.router:
            if key not in ROUTER_SETTINGS:
                raise cli.ConfigError(f"stage {stage.name!r}: unknown router setting {key!r}; known: "
                                      f"{', '.join(sorted(ROUTER_SETTINGS))}")
    return train_cfg, model_cfg, meta


# -----------------------------------------------------------------------------------------------------
# The learning-rate schedule: a pure function of (stage, step within it)

def stage_lr_range(stages, s):
    """(start, end) fractions of peak lr for stage s; a stage without lr_start continues the previous end."""
    end = 1.0
    for i in range(s + 1):
        start = stages[i].lr_start if stages[i].lr_start is not None else end
        end = stages[i].lr_end if stages[i].lr_end is not None else start
    return start, end


def lr_at(stages, s, step, world_size=1):
    """Fraction of peak lr at optimizer step `step` (0-based) of stage s."""
    stage, (start, end) = stages[s], stage_lr_range(stages, s)
    if step < stage.warmup:
        return start * (step + 1) / stage.warmup
    n = stage.num_steps(world_size) - stage.warmup
    t = (step - stage.warmup) / max(1, n - 1)
    shape = t if stage.decay == "linear" else 0.5 * (1 - math.cos(math.pi * t))
    return start + (end - start) * shape


# -----------------------------------------------------------------------------------------------------
# Checkpoints: atomic writes, exact resume, clear errors

def save_atomic(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash leaves either the old file or the new one, never half of one


def load_checkpoint(path, model_cfg, train_cfg, world_size):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise SystemExit(f"cannot read checkpoint {path} ({type(e).__name__}: {e}). It is corrupt or not a "
                         f"checkpoint: move it away to start over, or restore a copy (best.pt is kept beside it)")
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise SystemExit(f"{path} is not a checkpoint written by train.py")
    mismatched = [f"{k}: checkpoint {v!r}, config {getattr(model_cfg, k)!r}"
                  for k, v in ckpt["model_config"].items() if getattr(model_cfg, k, None) != v]
    if ckpt["stages"] != [dataclasses.asdict(s) for s in train_cfg.stages]:
        mismatched.append("stages differ")
    if ckpt["world_size"] != world_size:
        mismatched.append(f"world size: checkpoint {ckpt['world_size']}, now {world_size}")
    if mismatched:
        raise SystemExit(f"checkpoint {path} does not match this config:\n  " + "\n  ".join(mismatched) +
                         "\nResume with the config it was written with, or use another --out_dir.")
    return ckpt


# -----------------------------------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def evaluate(model, corpora, seq_len, batch_size, iters, autocast):
    """Mean val cross-entropy per corpus on fixed batches (the same at every evaluation)."""
    model.eval()
    losses = {}
    for name in corpora:
        loader = MixtureLoader({name: 1.0}, seq_len, batch_size, split="val", seed=0)
        total = 0.0
        for _ in range(iters):
            x, y, _ = loader.next_batch()
            with autocast:
                model(x.to(model.wte.weight.device), y.to(model.wte.weight.device))
            total += model.last["ce"].item()
        losses[name] = total / iters
    model.train()
    return losses


@torch.no_grad()
def arith_accuracy(model, tokenizer, n_problems, autocast):
    """Exact-match accuracy of greedy answers on arith val problems, per difficulty and overall."""
    with open(os.path.join(corpus_dir("arith"), "val_problems.jsonl")) as f:
        problems = [json.loads(line) for _, line in zip(range(n_problems), f)]
    model.eval()
    correct, count = {}, {}
    device = model.wte.weight.device
    for p in problems:
        prompt = torch.tensor([[tokenizer.eot] + tokenizer.encode(p["prompt"])], device=device)
        n_new = len(tokenizer.encode(p["answer"])) + 1
        with autocast:
            out = model.generate(prompt, n_new, temperature=0)[0, prompt.shape[1]:].tolist()
        if tokenizer.eot in out:
            out = out[:out.index(tokenizer.eot)]
        d = str(p["difficulty"])
        count[d] = count.get(d, 0) + 1
        correct[d] = correct.get(d, 0) + (tokenizer.decode(out) == p["answer"])
    model.train()
    acc = {d: correct[d] / count[d] for d in sorted(count)}
    acc["all"] = sum(correct.values()) / max(1, sum(count.values()))
    return acc


def flops_per_token(model_cfg, raw_model, seq_len):
    """Training FLOPs per token (forward + backward): 6 per active parameter plus the attention scores,
    12 * n_embd * (keys attended) per layer (nanoGPT's estimate, with a window's keys for local layers)."""
    keys = [min(model_cfg.window, seq_len) if kind == "L" else seq_len for kind in model_cfg.layout()]
    return 6 * raw_model.num_params(active=True) + sum(12 * model_cfg.n_embd * k for k in keys)


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


# -----------------------------------------------------------------------------------------------------

def main(argv):
    try:
        cfg, model_cfg, meta = load_config(argv)
    except (cli.ConfigError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"config error: {e}")

    # Distributed setup: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE.
    ddp = "RANK" in os.environ
    if ddp:
        use_cuda = cfg.device != "cpu" and torch.cuda.is_available()
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        rank, world_size = dist.get_rank(), dist.get_world_size()
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if use_cuda else "cpu"
    else:
        rank, world_size = 0, 1
        device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    master = rank == 0
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    if device_type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device_type == "cuda" else "float32")
    autocast = (torch.autocast(device_type=device_type, dtype=torch.bfloat16) if dtype == "bfloat16"
                else nullcontext())
    torch.manual_seed(cfg.seed + rank)
    stages = cfg.stages
    stage_steps = [s.num_steps(world_size) for s in stages]
    corpora = list(dict.fromkeys(c for s in stages for c in s.mixture))

    # Model, optimizer, and the run's state (or the checkpoint's).
    model = GPT(model_cfg, verbose=master).to(device)
    optimizer = model.configure_optimizer(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2), device_type)
    ckpt_path, best_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "best.pt")
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    ckpt = None
    if cfg.resume and os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path, model_cfg, cfg, world_size)
    state = dict(ckpt["state"]) if ckpt else {"stage": 0, "step": 0, "global_step": 0, "tokens": 0, "best_val": None}
    resume_stage = state["stage"] if ckpt else None
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        if ckpt is None:
            open(metrics_path, "w").close()
        else:  # drop what the stopped run logged after its last checkpoint: those steps run again
            with open(metrics_path) as f:
                kept = [line for line in f if json.loads(line)["step"] <= state["global_step"]]
            with open(metrics_path, "w") as f:
                f.writelines(kept)
            print(f"resuming {ckpt_path}: stage {state['stage']} step {state['step']}")
    raw_model = model
    if cfg.compile if cfg.compile is not None else device_type == "cuda":
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[torch.cuda.current_device()] if device_type == "cuda" else None)
    tokenizer = Tokenizer(meta)

    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    def log(record):
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def checkpoint(loader):
        # The loader's stream is the same on every rank; the torch RNG is not, so gather it from each rank.
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device_type == "cuda" else None}
        rngs = [None] * world_size
        if ddp:
            dist.all_gather_object(rngs, rng)
        else:
            rngs[0] = rng
        if master:
            save_atomic({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                         "model_config": dataclasses.asdict(model_cfg), "train_config": dataclasses.asdict(cfg),
                         "stages": [dataclasses.asdict(s) for s in stages], "meta": meta,
                         "state": dict(state), "loader": loader.state_dict(), "rng": rngs,
                         "world_size": world_size}, ckpt_path)

    def run_eval(stage):
        val = evaluate(raw_model, corpora, stage.seq_len, stage.batch_size, cfg.eval_iters, autocast)
        record = {"kind": "eval", "step": state["global_step"], "tokens": state["tokens"],
                  "stage": state["stage"], "val": val}
        if "arith" in corpora and cfg.arith_problems > 0 and tokenizer.eot is not None:
            record["arith_accuracy"] = arith_accuracy(raw_model, tokenizer, cfg.arith_problems, autocast)
        log(record)
        return record

    moes = raw_model.moe_layers()
    n_moe = len(moes)
    total_steps = sum(stage_steps)
    bar = tqdm(total=total_steps, initial=sum(stage_steps[:state["stage"]]) + state["step"], disable=not master,
               dynamic_ncols=True)
    t_last, tokens_last = time.time(), state["tokens"]
    for s in range(state["stage"], len(stages)):
        stage = stages[s]
        loader = MixtureLoader(stage.mixture, stage.seq_len, stage.batch_size, seed=cfg.seed, rank=rank,
                               world_size=world_size, stream=s)
        if s == resume_stage:  # resuming inside this stage
            raw_model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            torch.set_rng_state(ckpt["rng"][rank]["cpu"])
            if device_type == "cuda" and ckpt["rng"][rank]["cuda"] is not None:
                torch.cuda.set_rng_state(ckpt["rng"][rank]["cuda"])
            if state["step"] > 0:  # (a checkpoint at a stage boundary holds the previous stage's stream)
                loader.load_state_dict(ckpt["loader"])
        # The stage's router settings and RoPE base. Mid-stage (a resume) the checkpoint's top_p and RoPE
        # base stand: the sparsity controller may have moved p since the stage began.
        router = dict(stage.router)
        if state["step"] > 0:
            router.pop("top_p", None)
        elif stage.rope_base is not None:
            raw_model.rope_base = stage.rope_base
        for moe in moes:
            moe.configure(**router)
        tokens_per_step = stage.batch_size * stage.seq_len * stage.grad_accum * world_size
        flops = flops_per_token(model_cfg, raw_model, stage.seq_len)
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if device_type == "cuda" and
                     k in torch.cuda.get_device_name()), None)

        while state["step"] < stage_steps[s]:
            step = state["step"]
            lr = cfg.lr * lr_at(stages, s, step, world_size)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # Forward/backward over the micro-steps; DDP syncs gradients on the last one only.
            sums = torch.zeros(3 + n_moe * (1 + model_cfg.n_experts), device=device)
            for micro in range(stage.grad_accum):
                x, y, _ = loader.next_batch()
                x, y = x.to(device), y.to(device)
                if ddp:
                    model.require_backward_grad_sync = micro == stage.grad_accum - 1
                with autocast:
                    _, loss = model(x, y)
                (loss / stage.grad_accum).backward()
                stats = [m.stats for m in moes]  # computed on each read: read once per layer
                sums += torch.cat([torch.stack([loss.detach(), raw_model.last["ce"], raw_model.last["aux"]])] +
                                  [st["experts_per_token"].view(1) for st in stats] +
                                  [st["tokens_per_expert"].float() for st in stats]).float()
            sums /= stage.grad_accum
            if ddp:
                dist.all_reduce(sums, op=dist.ReduceOp.AVG)
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or float("inf"))
            if not (math.isfinite(sums[0].item()) and math.isfinite(grad_norm.item())):
                bar.close()
                raise SystemExit(f"non-finite loss ({sums[0].item()}) or gradient norm ({grad_norm.item()}) at "
                                 f"stage {s} ({stage.name!r}) step {step} (global step {state['global_step']}); "
                                 f"stopping without saving. The last good checkpoint is {ckpt_path}.")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            experts = sums[3:3 + n_moe].tolist()
            for moe, k in zip(moes, experts):
                moe.adjust_p(k)
            state["step"] += 1
            state["global_step"] += 1
            state["tokens"] += tokens_per_step

            if state["step"] % cfg.log_interval == 0 or state["step"] == stage_steps[s]:
                dt = time.time() - t_last
                tok_s = (state["tokens"] - tokens_last) / max(dt, 1e-9)
                t_last, tokens_last = time.time(), state["tokens"]
                mfu = flops * tok_s / (peak * world_size) if peak else None
                loss_v, ce_v, aux_v = sums[:3].tolist()
                log({"kind": "train", "step": state["global_step"], "tokens": state["tokens"], "stage": s,
                     "stage_step": step, "lr": lr, "loss": loss_v, "ce": ce_v, "aux": aux_v, "tok_s": tok_s,
                     "mfu": mfu, "seq_len": stage.seq_len, "batch_size": stage.batch_size,
                     "mixture": stage.mixture, "rope_base": raw_model.rope_base,
                     "top_p": [m.top_p for m in moes],
                     "routing": [m.routing for m in moes], "experts_per_token": experts,
                     "tokens_per_expert": sums[3 + n_moe:].view(n_moe, -1).tolist()})
                postfix = {"stage": s, "loss": f"{ce_v:.3f}", "lr": f"{lr:.2e}", "tok/s": f"{tok_s:,.0f}"}
                if experts:
                    postfix["k"] = f"{sum(experts) / len(experts):.2f}"
                if mfu is not None:
                    postfix["mfu"] = f"{100 * mfu:.1f}%"
                bar.set_postfix(postfix, refresh=False)
            bar.update(1)

            stage_done = state["step"] == stage_steps[s]
            if master and (state["step"] % cfg.eval_interval == 0 or stage_done):
                record = run_eval(stage)
                mean_val = sum(record["val"].values()) / len(record["val"])
                tqdm.write(f"step {state['global_step']} stage {s} ({stage.name}): val " +
                           ", ".join(f"{k} {v:.3f}" for k, v in record["val"].items()) +
                           (f", arith acc {record['arith_accuracy']['all']:.2f}" if "arith_accuracy" in record else ""))
                if state["best_val"] is None or mean_val < state["best_val"]:
                    state["best_val"] = mean_val
                    save_atomic({"model": raw_model.state_dict(), "model_config": dataclasses.asdict(model_cfg),
                                 "meta": meta, "state": dict(state)}, best_path)
            if stage_done:  # record in the checkpoint that the next stage starts fresh
                state.update(stage=s + 1, step=0)
            stopping = torch.tensor(float(stop["signal"] is not None), device=device)
            if ddp:
                dist.all_reduce(stopping, op=dist.ReduceOp.MAX)
            if stage_done or state["step"] % cfg.ckpt_interval == 0 or stopping.item():
                checkpoint(loader)
            if stopping.item():
                bar.close()
                if master:
                    print(f"stopped by signal at global step {state['global_step']}; checkpoint saved to "
                          f"{ckpt_path}. Run the same command again to resume.")
                if ddp:
                    dist.destroy_process_group()
                return
            if stage_done:
                break
    bar.close()
    if master:
        print(f"run complete: {state['global_step']} steps, {state['tokens']:,} tokens. Checkpoint: {ckpt_path}")
        if cfg.plots:
            import plot
            plot.plot_run(cfg.out_dir)
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
