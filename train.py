"""
Multi-stage training on one CPU, one GPU, or many GPUs and nodes (infra/parallel.py says how the model is spread).

    python train.py config/default.py                 # the three-stage CPU run of the quickstart
    python train.py --help                            # every setting, with its default and meaning
    torchrun --standalone --nproc_per_node=8 train.py config/gpt2_trunk_64e.py [--parallel=fsdp] [--ep=8]

A run is a list of stages (Yi-Lightning trains this way), each with its own data mixture, budget, sequence
length, batch, learning-rate phase, RoPE base and router settings. Checkpoints (infra/checkpoint.py) carry everything
needed to resume exactly: a killed run started again with the same command continues where it stopped.

Read top to bottom: the settings, the schedule, then the Trainer, whose run() is the story of a run: for each
stage, begin it, then train steps, logging, evaluating and saving.
"""

import dataclasses
import math
import os
import sys
import time

STARTED = time.time()  # before torch is imported: each log record's wall_s counts from here
STARTING = "interrupted while starting: nothing was trained. Run the same command to start again."
try:
    from infra import cli
except KeyboardInterrupt:  # (Ctrl-C in the moment before the handler below is in place)
    print(STARTING, file=sys.stderr)
    sys.exit(130)
if __name__ == "__main__":  # (first: until the run's own handler is in place, a signal ends start-up in one line)
    cli.exit_on_signal(STARTING)
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Optional

import torch
from tqdm import tqdm

from infra.cli import need
from infra import evaluation
from infra import parallel
from infra.checkpoint import (append_metrics, claim_out_dir, good_checkpoint, last_checkpoint, pack, resume,
                              runtime_changes, save_atomic, start_metrics, write_checkpoint)
from data.corpus import TOKENIZERS, MixtureLoader, check_prepared, mixture_tokenizer
from model import GPTConfig, PRESETS, compile_model, make_config
from router import RouterConfig


@dataclass
class Stage:
    name: str                            # shown in logs and errors
    mixture: dict                        # corpus -> weight, e.g. {"shakespeare": 0.7, "code": 0.3}
    steps: Optional[int] = None          # budget in optimizer steps ...
    tokens: Optional[int] = None         # ... or in tokens (all ranks together); exactly one of the two
    seq_len: int = 128                   # tokens per training sequence
    batch_size: int = 8                  # sequences per micro-step per rank
    grad_accum: int = 1                  # micro-steps per optimizer step per rank
    warmup: int = 0                      # steps of linear warmup from 0 at the stage start (< the stage's steps)
    lr_start: Optional[float] = None     # fraction of peak lr after warmup; None: where the previous stage ended
    lr_end: Optional[float] = None       # fraction of peak lr at the stage's last step; None: same as lr_start
    decay: str = "linear"                # shape from lr_start to lr_end: "linear" or "cosine"
    rope_base: Optional[float] = None    # None: keep the current base
    window: Optional[int] = None         # the local layers' window from this stage on; None: keep the current one
    router: dict = field(default_factory=dict)  # router settings changed from here on, e.g. {"top_p": 0.5}

    def __post_init__(self):  # (the parser checked the names and types: here, the ranges)
        try:
            self.check()
        except cli.ConfigError as e:
            raise cli.ConfigError(f"stage {self.name!r}: {e}") from None

    def check(self):
        need(self.name, "a stage needs a name (a non-empty string)")
        need(self.mixture, "mixture must name at least one corpus")
        need((self.steps is None) != (self.tokens is None), "give exactly one budget: steps or tokens")
        budget = self.steps if self.steps is not None else self.tokens
        need(budget >= 1, f"the budget must be >= 1; got {budget}")
        for name, low in [("seq_len", 1), ("batch_size", 1), ("grad_accum", 1), ("warmup", 0), ("lr_start", 0),
                          ("lr_end", 0), ("window", 1)]:
            value = getattr(self, name)
            need(value is None or value >= low, f"{name} must be >= {low}; got {value}")
        need(self.decay in ("linear", "cosine"), f"decay must be 'linear' or 'cosine'; got {self.decay!r}")
        need(self.rope_base is None or self.rope_base > 1, f"rope_base must be > 1; got {self.rope_base}")

    def num_steps(self, world_size):
        if self.steps is not None:
            return self.steps
        return math.ceil(self.tokens / (self.batch_size * self.seq_len * self.grad_accum * world_size))


@dataclass
class TrainConfig:
    out_dir: str = "out/default"         # checkpoints, metrics.jsonl and plots go here
    stages: list = field(default_factory=lambda: [  # the run: a list of dicts of Stage settings (see below)
        {"name": "main", "mixture": {"shakespeare": 1.0}, "steps": 200, "warmup": 20, "lr_end": 0.1}])
    tokenizer: str = "byte"              # how every corpus of the run is read: "byte", "gpt2" or "char"
    preset: Optional[str] = None         # a model shape from model.PRESETS; model settings given here override it
    lr: float = 1e-3                     # peak learning rate
    weight_decay: float = 0.1            # AdamW weight decay of the matrices
    beta1: float = 0.9                   # AdamW beta1
    beta2: float = 0.95                  # AdamW beta2
    grad_clip: float = 1.0               # clip the gradient norm to this; 0 disables
    eval_interval: int = 100             # steps between evaluations (and at every stage end)
    eval_iters: int = 10                 # val batches per corpus
    eval_seq_len: Optional[int] = None   # val sequence length, the same all run; None: the longest stage's
    eval_batch_size: int = 8             # val sequences per batch, the same all run
    arith_per_level: int = 40            # held-out arith problems per level scored at each evaluation (0: none)
    log_interval: int = 10               # steps between log lines in metrics.jsonl
    ckpt_interval: int = 100             # steps between checkpoints (and at every stage end)
    resume: bool = True                  # continue from out_dir/ckpt.pt when it exists
    seed: int = 1337                     # seeds the model init and the data order
    device: str = "auto"                 # "auto", "cpu", "cuda", "cuda:1", ...
    dtype: str = "auto"                  # "auto" (bfloat16 on CUDA, float32 on CPU), "bfloat16", "float32"
    compile: Optional[bool] = None       # torch.compile the model; None: on for CUDA, off for CPU
    parallel: str = "ddp"                # over torchrun's ranks: "ddp" (whole model per rank) or "fsdp" (sharded)
    ep: int = 1                          # expert parallelism: split each MoE layer's experts over groups of ep ranks
    plots: bool = True                   # write plots at the end of the run
    samples: bool = True                 # at the end, print a sample per corpus and arithmetic marked right/wrong

    def __post_init__(self):
        need(self.lr > 0, f"lr must be > 0; got {self.lr}")
        need(isinstance(self.out_dir, str) and self.out_dir.strip(), "out_dir must name a folder; got an empty one")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"beta1 and beta2 must be in [0, 1); got "
             f"{self.beta1}, {self.beta2}")
        for name, low in [("eval_interval", 1), ("eval_iters", 1), ("eval_batch_size", 1), ("log_interval", 1),
                          ("ckpt_interval", 1), ("eval_seq_len", 1), ("arith_per_level", 0)]:
            value = getattr(self, name)
            need(value is None or value >= low, f"{name} must be >= {low}; got {value}")
        need(self.weight_decay >= 0 and self.grad_clip >= 0, "weight_decay and grad_clip must be >= 0")
        need(self.tokenizer in TOKENIZERS, f"tokenizer must be one of {', '.join(TOKENIZERS)}; got {self.tokenizer!r}")
        need(self.dtype in ("auto", "bfloat16", "float32"),
             f"dtype must be auto, bfloat16 or float32; got {self.dtype!r}")
        need(cli.valid_device(self.device), f"device must be auto, cpu, cuda or cuda:N; got {self.device!r}")
        need(cli.valid_seed(self.seed), f"seed must be a whole number in [0, 2**32); got {self.seed!r}")
        need(self.preset is None or self.preset in PRESETS,
             f"unknown preset {self.preset!r}; known: {', '.join(PRESETS)}")
        need(self.stages, "stages must be a non-empty list of stage dicts")
        self.stages = [s if isinstance(s, Stage) else Stage(**s) for s in self.stages]
        if self.eval_seq_len is None:
            self.eval_seq_len = max(s.seq_len for s in self.stages)

    def corpora(self):
        """Every corpus the run's stages name, once each, in order of first mention."""
        return list(dict.fromkeys(c for s in self.stages for c in s.mixture))


def load_config(argv):
    """TrainConfig, GPTConfig and the run's Tokenizer from [config.py] [--key=value ...]; vocab_size comes from
    the tokenizer. Every stage is checked here, before anything runs: a bad value in the last stage stops the
    run at once."""
    settings = cli.parse(argv, TrainConfig, GPTConfig, groups={"router": RouterConfig}, nested={"stages": Stage})
    train_cfg = cli.build(TrainConfig, settings)
    tokenizer = mixture_tokenizer(train_cfg.corpora(), train_cfg.tokenizer)
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    model_settings = {**PRESETS.get(train_cfg.preset, {}),  # (make_config takes the router's settings unprefixed)
                      **{k.removeprefix("router."): v for k, v in settings.items() if k not in train_names}}
    model_settings.setdefault("vocab_size", 64 * math.ceil(tokenizer.vocab_size / 64))  # pad: faster matmuls
    world_size = int(os.environ.get("WORLD_SIZE", 1))  # torchrun sets WORLD_SIZE
    layout_error = parallel.check_layout(train_cfg.parallel, train_cfg.ep, world_size,
                                         model_settings.get("n_experts", GPTConfig.n_experts))
    need(layout_error is None, layout_error)
    need(model_settings["vocab_size"] >= tokenizer.vocab_size, f"vocab_size {model_settings['vocab_size']} is "
         f"smaller than the {tokenizer.name} tokenizer's {tokenizer.vocab_size}")
    model_cfg = make_config(model_settings)  # (a ValueError it raises stops the run in main, as any bad setting)
    router = model_cfg.router
    for stage in train_cfg.stages:
        steps = stage.num_steps(world_size)
        need(stage.warmup < steps, f"stage {stage.name!r}: warmup ({stage.warmup}) must be shorter than the stage "
             f"({steps} steps at world size {world_size})")
        need(stage.seq_len <= model_cfg.block_size,
             f"stage {stage.name!r}: seq_len {stage.seq_len} exceeds block_size {model_cfg.block_size}")
        try:  # the router settings in force from this stage on: those before it, with the stage's changes
            router = router.updated(model_cfg.n_experts, **stage.router)
        except ValueError as e:
            raise cli.ConfigError(f"stage {stage.name!r}: {e}") from None
    need(train_cfg.eval_seq_len <= model_cfg.block_size,
         f"eval_seq_len {train_cfg.eval_seq_len} exceeds block_size {model_cfg.block_size}")
    check_prepared([(s.name, s.mixture, s.seq_len) for s in train_cfg.stages], tokenizer, train_cfg.eval_seq_len)
    return train_cfg, model_cfg, tokenizer


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
    """Fraction of peak lr at optimizer step `step` (0-based) of stage s. Warmup climbs from 0 and reaches
    `start` on its last step; from there the decay moves to `end`, which the stage's last step reaches. With
    no warmup the decay starts from `start` just before step 0, so a stage continues its predecessor
    without repeating its last value."""
    stage, (start, end) = stages[s], stage_lr_range(stages, s)
    if step < stage.warmup:
        return start * (step + 1) / stage.warmup
    t = (step - stage.warmup + 1) / (stage.num_steps(world_size) - stage.warmup)
    shape = t if stage.decay == "linear" else 0.5 * (1 - math.cos(math.pi * t))
    return start + (end - start) * shape


# -----------------------------------------------------------------------------------------------------
class Trainer:
    """One run: where it runs (device, ranks), its model and optimizer, and its state (stage, step within
    it, tokens seen, best val loss), which is all a checkpoint needs besides the weights."""

    def __init__(self, cfg, model_cfg, tokenizer):
        self.cfg, self.model_cfg, self.tokenizer = cfg, model_cfg, tokenizer
        self.meta = tokenizer.meta()  # what sample.py needs to rebuild the tokenizer
        self.setup_device()
        self.master, self.world_size = self.ranks.master, self.ranks.size
        self.stage_steps, self.corpora = [s.num_steps(self.world_size) for s in cfg.stages], cfg.corpora()
        self.tasks = evaluation.read_tasks(self.corpora, cfg.arith_per_level)  # (arith problems, recall documents)
        # Every rank starts from the same weights (FSDP and EP build only their part), then draws its own randomness.
        torch.manual_seed(cfg.seed)
        self.sharded = parallel.sharded(cfg.parallel, cfg.ep)
        self.raw_model = parallel.build(model_cfg, cfg.parallel, cfg.ep, self.device, self.bf16, self.master)
        if self.ranks.rank > 0:
            torch.manual_seed(cfg.seed + self.ranks.rank)
        self.moes = self.raw_model.moe_layers()
        self.optimizer = self.raw_model.configure_optimizer(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2),
                                                            self.device_type)
        if self.master:  # (only now: every refusal above leaves out_dir untouched)
            claim_out_dir(cfg)
        self.best_path, self.metrics_path = (os.path.join(cfg.out_dir, n) for n in ("best.pt", "metrics.jsonl"))
        self.state, self.loader_state = self.restore()
        self.saved_at = self.state["global_step"] if self.loader_state is not None else None  # the last checkpoint's
        if self.master:
            start_metrics(self.metrics_path, self.saved_at)
        self.model = parallel.wrap(compile_model(self.raw_model) if self.runtime["compile"] else self.raw_model,
                                   cfg.parallel, self.ranks)
        self.stop = parallel.StopSignal()  # (from here on, Ctrl-C saves a checkpoint and stops)

    def setup_device(self):
        """The ranks (parallel.join: one process, or torchrun's), this rank's device, and the precision."""
        cfg = self.cfg
        self.ranks, self.device = parallel.join(cli.resolve_device(cfg.device))
        self.device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        self.peak = None  # the GPU's peak FLOP/s, for MFU
        if self.device_type == "cuda":
            torch.cuda.set_device(self.device)
            torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls left outside autocast
            self.peak = evaluation.peak_flops(torch.cuda.get_device_name(self.device))
        dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if self.device_type == "cuda" else "float32")
        self.bf16 = dtype == "bfloat16"
        compiling = cfg.compile if cfg.compile is not None else self.device_type == "cuda"
        self.runtime = {"device": self.device_type, "dtype": dtype, "compile": compiling}  # (checkpoints record it)
        self.autocast = (torch.autocast(device_type=self.device_type, dtype=torch.bfloat16) if self.bf16
                         else nullcontext())

    def restore(self):
        """(state, loader state): a fresh run's, or the checkpoint's (checkpoint.resume loads the rest)."""
        found = resume(self.cfg, self.model_cfg, self.raw_model, self.optimizer, self.world_size, self.ranks.rank,
                       self.device_type == "cuda") if self.cfg.resume else None
        if found is None:
            return {"stage": 0, "step": 0, "global_step": 0, "tokens": 0, "best_val": None}, None
        ckpt, where = found
        if self.master:
            print(f"resuming {where}: stage {ckpt['state']['stage']} step {ckpt['state']['step']}")
            if changes := runtime_changes(ckpt.get("runtime"), self.runtime):
                print(changes)
        return dict(ckpt["state"]), ckpt["loader"]

    # -------------------------------------------------------------------------------------------------
    def run(self):
        """For each stage: begin it, then train step by step, logging, evaluating and saving as it goes.
        Returns the exit code: 0 when the run completes, 128 + the signal's number when a signal stopped it
        (the shell's convention, so `train.py && sample.py` does not sample a half-trained model)."""
        cfg, state = self.cfg, self.state
        self.bar = tqdm(total=sum(self.stage_steps), initial=sum(self.stage_steps[:state["stage"]]) + state["step"],
                        disable=not self.master, dynamic_ncols=True)
        self.t_last, self.tokens_last = time.time(), state["tokens"]
        for s in range(state["stage"], len(cfg.stages)):
            stage, loader = cfg.stages[s], self.begin_stage(s)
            for step in range(state["step"], self.stage_steps[s]):
                lr = cfg.lr * lr_at(cfg.stages, s, step, self.world_size)
                stats = self.train_step(loader, stage, lr)
                state.update(step=state["step"] + 1, global_step=state["global_step"] + 1)
                state["tokens"] += stage.batch_size * stage.seq_len * stage.grad_accum * self.world_size
                stage_done = state["step"] == self.stage_steps[s]
                if state["step"] % cfg.log_interval == 0 or stage_done:
                    self.log_train(s, stage, lr, stats)
                self.bar.update(1)
                if (self.master or self.sharded) and (state["step"] % cfg.eval_interval == 0 or stage_done):
                    self.evaluate(s, stage)
                if stage_done:  # record in the checkpoint that the next stage starts fresh
                    state.update(stage=s + 1, step=0)
                stopping = parallel.any_rank(self.stop.signal is not None, self.ranks, self.device)
                if stage_done or state["step"] % cfg.ckpt_interval == 0 or stopping:
                    self.save_checkpoint(loader)
                if stopping:
                    self.finish(f"stopped by signal at global step {state['global_step']}; checkpoint saved to "
                                f"{last_checkpoint(cfg.out_dir, self.sharded)}. Run the same command again to "
                                f"resume.")
                    return 128 + self.stop.number
        return self.finish(f"run complete: {state['global_step']} steps, {state['tokens']:,} tokens. "
                           f"Checkpoint: {last_checkpoint(cfg.out_dir, self.sharded)}", complete=True)

    def begin_stage(self, s):
        """The stage's loader. At its first step, the stage's router settings, RoPE base and window take effect;
        resuming mid-stage, the checkpoint's stand (the sparsity controller may have moved top_p since)."""
        stage = self.cfg.stages[s]
        loader = MixtureLoader(stage.mixture, self.cfg.tokenizer, stage.seq_len, stage.batch_size, seed=self.cfg.seed,
                               rank=self.ranks.rank, world_size=self.world_size, stream=s)
        if self.state["step"] > 0:  # (a checkpoint at a stage boundary holds the previous stage's stream)
            loader.load_state_dict(self.loader_state)
            return loader
        for moe in self.moes:  # (load_config checked every stage's router changes)
            moe.config = moe.config.updated(moe.n_experts, **stage.router)
        if stage.rope_base is not None:
            self.raw_model.rope_base = stage.rope_base
        if stage.window is not None:
            self.raw_model.set_window(stage.window)
        return loader

    def train_step(self, loader, stage, lr):
        """One optimizer step over grad_accum micro-steps (DDP syncs gradients on the last one only).
        Returns the step's numbers, averaged over micro-steps and ranks, as tensors."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = None
        for micro in range(stage.grad_accum):
            x, y, _ = loader.next_batch()
            x, y = x.to(self.device), y.to(self.device)
            parallel.sync_gradients(self.model, self.raw_model, on=micro == stage.grad_accum - 1)
            with self.autocast:
                _, loss, parts = self.model(x, y, parts=True)
            (loss / stage.grad_accum).backward()
            stats = evaluation.step_stats(loss, parts)
            total = stats if total is None else {k: total[k] + v for k, v in stats.items()}
        stats = {k: v / stage.grad_accum for k, v in total.items()}
        stats = parallel.mean_over_ranks(stats, self.ranks)
        if self.cfg.ep > 1:
            parallel.reduce_expert_grads(self.raw_model, self.world_size)
        stats["grad_norm"] = parallel.clip_grad_norm_(self.raw_model.parameters(), self.cfg.grad_clip or float("inf"))
        if not torch.isfinite(stats["loss"] + stats["grad_norm"]).item():
            self.stop_non_finite(f"non-finite loss ({stats['loss'].item()}) or gradient norm "
                                 f"({stats['grad_norm'].item()}) in stage {stage.name!r} step {self.state['step']}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for moe, load in zip(self.moes, stats["tokens_per_expert"]):  # (loss-free balancing, if bias_rate > 0)
            moe.balance(load)
        if any(m.controls_p() for m in self.moes):  # the controller needs the numbers now: one read per step
            for moe, k in zip(self.moes, stats["experts_per_token"].tolist()):
                moe.adjust_p(k)
        return stats

    def stop_non_finite(self, what):
        self.bar.close()
        step = self.state["global_step"]
        kept = good_checkpoint(last_checkpoint(self.cfg.out_dir, self.sharded), self.saved_at, step)  # (is it good?)
        raise SystemExit(f"{what} at global step {step}; stopping without saving. {kept} A learning rate too high "
                         f"for the model is the usual cause (lr={self.cfg.lr}).")

    def log_train(self, s, stage, lr, stats):
        now, state = time.time(), self.state
        tok_s = (state["tokens"] - self.tokens_last) / max(now - self.t_last, 1e-9)
        self.t_last, self.tokens_last = now, state["tokens"]
        v = evaluation.read_stats(stats)
        active = self.raw_model.num_params(active=True, experts_per_token=v["experts_per_token"])
        util = evaluation.mfu(evaluation.flops_per_token(self.model_cfg, active, stage.seq_len), tok_s, self.peak,
                              self.world_size)
        record = {"kind": "train", "step": state["global_step"], "tokens": state["tokens"], "stage": s,
                  "stage_step": state["step"] - 1, "lr": lr, **v, "tok_s": tok_s, "mfu": util, "active_params": active,
                  "seq_len": stage.seq_len, "batch_size": stage.batch_size, "mixture": stage.mixture,
                  "rope_base": self.raw_model.rope_base, "window": self.raw_model.window,
                  "top_p": [m.config.top_p for m in self.moes],
                  "routing": [m.config.routing for m in self.moes]}
        if self.cfg.ep > 1:  # the load per EP rank: the slowest rank sets every rank's pace
            record["ep_rows"] = parallel.rows_per_ep_rank(v["tokens_per_expert"], self.cfg.ep)
        self.log(record)
        self.bar.set_postfix(evaluation.progress(record), refresh=False)

    def log(self, record):
        """One line of metrics.jsonl, with wall_s: seconds since this process started (startup included)."""
        if self.master:
            append_metrics(self.metrics_path, {**record, "wall_s": round(time.time() - STARTED, 2)})

    def evaluate(self, s, stage):
        """Val loss per corpus (and arithmetic accuracy), logged; best.pt keeps the lowest mean val bpb. A sharded
        model's every rank runs this (each forward needs them all) and writes no best.pt (none holds it all)."""
        cfg, state = self.cfg, self.state
        measured = evaluation.evaluate(self.raw_model, self.tokenizer, self.corpora, self.tasks, cfg.eval_seq_len,
                                       cfg.eval_batch_size, cfg.eval_iters, self.autocast)
        self.log({"kind": "eval", "step": state["global_step"], "tokens": state["tokens"], "stage": s, **measured})
        if self.master:
            tqdm.write(f"step {state['global_step']} stage {s} ({stage.name}): {evaluation.summary(measured)}")
        mean_bpb = sum(measured["val_bpb"].values()) / len(measured["val_bpb"])
        if math.isfinite(mean_bpb) and (state["best_val"] is None or mean_bpb < state["best_val"]) and \
                parallel.all_finite(self.raw_model, self.ranks, self.device, sharded=False):
            state["best_val"] = mean_bpb
            if not self.sharded:
                save_atomic(pack(self.model_cfg, self.cfg, self.meta, state, model=self.raw_model.state_dict()),
                            self.best_path)

    def save_checkpoint(self, loader):
        if not parallel.all_finite(self.raw_model, self.ranks, self.device, self.sharded):  # (an update blew up)
            self.stop_non_finite("non-finite weights or balancing biases after the update")
        # The loader's stream is the same on every rank; the torch RNG is not, so each rank's is kept.
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if self.device_type == "cuda" else None}
        run = pack(self.model_cfg, self.cfg, self.meta, self.state, loader=loader.state_dict(),
                   rng=parallel.gather(rng, self.ranks), world_size=self.world_size, runtime=self.runtime)
        write_checkpoint(run, self.raw_model, self.optimizer, self.cfg.out_dir, self.sharded, self.master)
        self.saved_at = self.state["global_step"]

    def finish(self, message, complete=False):
        """The run's last words: its message, then (a complete run, on rank 0) its plots and samples. Returns the exit
        code of a complete run: 0, or 128 + the signal's number when one came after its last step's check (its
        checkpoint is whole; the plots and samples are left out)."""
        self.bar.close()
        parallel.leave(self.ranks)  # (before rank 0's plots and samples)
        if self.master:
            print(message, flush=True)  # (a signal from here on ends the process without flushing)
        cli.exit_on_signal("interrupted after the run ended: its checkpoint is saved")  # (the samples that follow)
        if complete and self.stop.signal is not None:  # (noted between the last check and the handler above)
            print("interrupted as the run ended: its checkpoint is saved", file=sys.stderr, flush=True)
            return 128 + self.stop.number
        if not (self.master and complete):
            return 0
        from infra.plot import plot_run, read_metrics  # (matplotlib loads only when a run ends)
        if self.cfg.plots:
            plot_run(self.cfg.out_dir)
        if self.cfg.samples and self.sharded:
            print(f"(no samples here: no rank holds the whole model. python -m infra.checkpoint {self.cfg.out_dir} "
                  f"writes "
                  f"it to one file, then python sample.py --out_dir={self.cfg.out_dir})")
        elif self.cfg.samples:
            lines = evaluation.show_samples(self.raw_model, self.tokenizer, self.corpora, self.tasks["arith"],
                                            self.autocast)
            lines += [""] + evaluation.stage_end_accuracy(read_metrics(self.cfg.out_dir), self.cfg.stages)
            print("\n".join(lines))
        return 0


def main(argv):
    try:
        cfg, model_cfg, tokenizer = load_config(argv)
    except (cli.ConfigError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"config error: {e}")
    return Trainer(cfg, model_cfg, tokenizer).run()


if __name__ == "__main__":
    code = main(sys.argv[1:])
    if "RANK" in os.environ:
        parallel.exit_rank(code)
    sys.exit(code)
