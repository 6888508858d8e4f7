"""
How the model is spread over ranks: data parallelism (DDP or FSDP2) and expert parallelism (EP).

    ddp       every rank holds the whole model, its gradients and its Adam state; gradients are averaged
    fsdp      FSDP2: each block's parameters (and so their gradients and Adam state) are split over the ranks,
              gathered just before the block runs and freed after; gradients are reduce-scattered
    ep=N      combines with either: each MoE layer's routed experts are split over groups of N ranks. A token's
              row travels to the rank holding its expert (all_to_all, uneven counts) and comes back the same way

With EP the world is a grid of (world / ep) x ep ranks: the ep ranks of a row hold different experts and trade
tokens; the ranks of a column hold the same experts and average their gradients. Everything but the routed experts
(attention, router, shared experts, embeddings) is data parallel over the whole world, as without EP.

train.py calls: check_layout (settings), build (under FSDP or EP the model built on the meta device, spread, then each
rank's part made: no rank holds the whole model), reduce_expert_grads (after backward) and clip_grad_norm_ (for any
mix of whole and split tensors), and the rank plumbing at the end of this file: join and leave the ranks, wrap the
model for DDP, reduce a step's numbers over the ranks. memory_per_rank is the arithmetic behind docs/parallel.md's
memory table (tools/bench.py).
"""

import atexit
import os
import signal
import sys
import warnings
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.nn.parallel import DistributedDataParallel as DDP

from infra import cli
from model import GPT, weight_inits
from router import Experts, compute_dtype, expert_mlps, use_grouped_mm

PARALLEL = ("ddp", "fsdp")


def check_layout(parallel, ep, world_size, n_experts):
    """None if the layout fits, else what is wrong and how to fix it."""
    if parallel not in PARALLEL:
        return f"parallel must be one of {', '.join(PARALLEL)}; got {parallel!r}"
    if parallel == "fsdp" and world_size == 1:
        return ("parallel='fsdp' shards the model over ranks, and this is one process: launch with torchrun "
                "--nproc_per_node=N (N >= 2), or use parallel='ddp' for a single process")
    if ep < 1 or n_experts % ep != 0:
        return f"ep ({ep}) must divide n_experts ({n_experts}): each EP rank holds n_experts / ep experts"
    if world_size % ep != 0:
        return (f"ep ({ep}) must divide the world size ({world_size}): the ranks form groups of ep that split "
                f"the experts; launch a multiple of {ep} processes")
    return None


def sharded(parallel, ep):
    """Whether a rank holds only part of the model (and so its checkpoint is sharded, and every rank evaluates)."""
    return parallel == "fsdp" or ep > 1


# -----------------------------------------------------------------------------------------------------
# Expert parallelism: the dispatch and combine of one MoE layer (MoE.ep), and the split of its weights

class ExpertParallel(Experts):
    """A MoE layer's experts split evenly over the ranks of the mesh's "shard" dimension: rank r holds experts
    [r * E/ep, (r + 1) * E/ep), as DTensors (split over "shard", the same on every rank of "replicate", so a
    sharded checkpoint knows the whole). Called, as router.Experts is, with this rank's rows sorted by expert;
    each row travels to the rank holding its expert and its output comes back, in the same order. Dropless:
    every row is computed, however unevenly the experts are loaded."""

    def __init__(self, experts, mesh):
        nn.Module.__init__(self)
        rank, self.size = mesh["shard"].get_local_rank(), mesh["shard"].size()
        self.group = mesh["shard"].get_group()
        n = experts.w1.shape[0] // self.size
        for name in ("w1", "w3", "w2"):
            local = getattr(experts, name).detach()[rank * n:(rank + 1) * n].clone()
            setattr(self, name, nn.Parameter(DTensor.from_local(local, mesh, [Replicate(), Shard(0)],
                                                                run_check=False)))

    def forward(self, xs, counts):
        per_rank = counts.numel() // self.size
        sent = counts.view(self.size, per_rank)  # sent[r, j]: rows for rank r's j-th expert
        got = torch.empty_like(sent)              # got[r, j]: rows rank r sends for my j-th expert
        dist.all_to_all_single(got, sent, group=self.group)
        send_sizes, recv_sizes = sent.sum(1).tolist(), got.sum(1).tolist()
        dtype = compute_dtype(xs)
        xs = xs.to(dtype)  # (under bf16 autocast, half the bytes on the wire)
        recv = all_to_all_single_autograd(xs, recv_sizes, send_sizes, self.group)
        # The rows arrive grouped by sender, each sender's sorted by expert; the experts want them by expert.
        expert = torch.arange(per_rank, device=xs.device).repeat(self.size).repeat_interleave(got.flatten())
        order = expert.argsort(stable=True)
        w1, w3, w2 = (w.to_local().to(dtype) for w in (self.w1, self.w3, self.w2))
        ys = expert_mlps(recv.index_select(0, order), got.sum(0), w1, w3, w2, use_grouped_mm(xs, w1))
        ys = ys.index_select(0, order.argsort())  # back to arrival order
        return all_to_all_single_autograd(ys, send_sizes, recv_sizes, self.group)


def shard_experts(model, mesh):
    """Replace every MoE layer's experts by this rank's slice of them, on the ("replicate", "shard") mesh."""
    for moe in model.moe_layers():
        moe.experts = ExpertParallel(moe.experts, mesh)


def expert_params(model):
    """The split expert weights (none without expert parallelism)."""
    return [w for moe in model.moe_layers() if isinstance(moe.experts, ExpertParallel) for w in
            moe.experts.parameters()]


def reduce_expert_grads(model, world_size):
    """After backward, make the split experts' gradients the mean over the world, as DDP and FSDP make the rest.
    An expert's local gradient already sums the losses of every rank of its EP group (their rows came to it);
    the ranks of its "replicate" column, which hold the same experts, add theirs; then divide by the world size."""
    for w in expert_params(model):
        if w.grad is None:
            continue
        g = w.grad.to_local()
        mesh = w.grad.device_mesh
        if mesh["replicate"].size() > 1:
            dist.all_reduce(g, group=mesh["replicate"].get_group())
        g.div_(world_size)


# -----------------------------------------------------------------------------------------------------

def spread(model, parallel, ep, device_type, bf16):
    """Spread the model over the ranks in place (before its optimizer is made: the parameters change).
    ep > 1 splits the experts; fsdp shards every block, then the root (embeddings, final norm), leaving the
    split experts to EP. On CUDA with bf16, FSDP gathers weights in bf16 and reduces gradients in fp32."""
    world = dist.get_world_size()
    if ep > 1:
        shard_experts(model, init_device_mesh(device_type, (world // ep, ep), mesh_dim_names=("replicate", "shard")))
    if parallel != "fsdp":
        return
    mesh = init_device_mesh(device_type, (world,))
    # FSDP warns when a sharded module returns a view (a block's K/V, the per-token losses): an in-place op on one
    # would skip a gather in backward. Nothing here writes into a module's output in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if device_type == "cuda" and bf16 else MixedPrecisionPolicy())
    experts = set(expert_params(model))
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, ignored_params=experts & set(block.parameters()))
    fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=experts)


def rows_per_ep_rank(tokens_per_expert, ep):
    """Per MoE layer, the rows each EP rank computes in a micro-step, from tokens_per_expert (per layer, per
    expert: the mean over all ranks of the rows each sent to that expert). An EP group of ep ranks sends ep
    times the mean; each EP rank computes its experts' share."""
    return [[ep * sum(layer[r * len(layer) // ep:(r + 1) * len(layer) // ep]) for r in range(ep)]
            for layer in tokens_per_expert]


def build(config, parallel, ep, device, bf16, verbose=True):
    """This rank's model: the whole GPT(config) on `device`, or, when the layout shards it (fsdp, ep > 1), its part,
    without any rank ever holding all of it: built on the meta device (no memory), spread, then each rank's part
    allocated on `device` and filled with exactly the values a one-process GPT(config) gets from the same seed:
    model.weight_inits' draws, in its order, each weight made whole on the CPU one at a time (the largest single
    weight is the most any rank holds at once), of which it keeps its part."""
    with torch.device("meta"):
        model = GPT(config, verbose=verbose)
    check_memory(model, parallel, ep, device)
    if not sharded(parallel, ep):
        return allocated(lambda: GPT(config, verbose=False).to(device), device)
    spread(model, parallel, ep, torch.device(device).type, bf16)
    allocated(lambda: model.to_empty(device=device), device)
    model.tie_weights()
    with torch.no_grad():
        for w, std in weight_inits(model, config.n_layer, config.init_std):
            whole = torch.ones(w.shape) if std is None else torch.empty(w.shape).normal_(0, std) if std else \
                torch.zeros(w.shape)
            if isinstance(w, DTensor):
                whole = distribute_tensor(whole, w.device_mesh, w.placements, src_data_rank=None)
            w.copy_(whole)
    return model


def check_memory(model, parallel, ep, device):
    """SystemExit, before anything is allocated, when this rank's part of the model (a meta-device GPT), with its
    gradients and AdamW state, cannot fit in the device's free memory (the CPU's is shared by the ranks on it)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    n_params = model.num_params()
    need = sum(memory_per_rank(n_params, n_params - model.num_params(active=True, experts_per_token=0), world,
                               parallel, ep))
    sharing = 1 if str(device).startswith("cuda") else int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    free = cli.free_memory(device) // sharing
    if need > free:
        raise SystemExit(f"the model has {n_params:,} parameters: with their gradients and AdamW state that is "
                         f"{need / 2 ** 30:,.1f} GiB per rank, and {free / 2 ** 30:,.1f} GiB is free on {device}: "
                         f"choose a smaller model (n_layer, n_embd, n_experts), or shard it over more ranks "
                         f"(parallel='fsdp', ep)")


def allocated(make, device):
    """make(), or SystemExit in one line when the allocator refuses (the estimate above leaves out activations)."""
    try:
        return make()
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not isinstance(e, torch.OutOfMemoryError) and "allocate" not in str(e):
            raise
        raise SystemExit(f"out of memory on {device} while building the model ({str(e)[:160]}): choose a smaller "
                         f"model, or shard it over more ranks (parallel='fsdp', ep)") from None


def clip_grad_norm_(params, max_norm):
    """torch.nn.utils.clip_grad_norm_ for a model whose gradients are whole tensors, FSDP shards and EP slices
    at once (torch's own needs them all alike). Each kind's norm is reduced over the ranks that split it; the
    total is the norm of those norms. Returns the total norm (before clipping)."""
    groups = defaultdict(list)
    for p in params:
        if p.grad is not None:
            groups[(p.grad.device_mesh, p.grad.placements) if isinstance(p.grad, DTensor) else None].append(p.grad)
    norms = []
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # (torch's rule)
    torch._foreach_mul_([g.to_local() if isinstance(g, DTensor) else g for grads in groups.values() for g in grads],
                        coef)
    return total


# -----------------------------------------------------------------------------------------------------
# The ranks of a run: joining them, wrapping the model for them, reducing over them, and leaving them

@dataclass(frozen=True)
class Ranks:
    """This process's place among torchrun's ranks; a process on its own is rank 0 of 1."""
    rank: int = 0
    size: int = 1
    distributed: bool = False

    @property
    def master(self):
        return self.rank == 0


def join(device):
    """(Ranks, this rank's device). Under torchrun (which sets RANK, LOCAL_RANK and WORLD_SIZE) join the process
    group, nccl for a run on CUDA and gloo on CPU, and take the GPU of LOCAL_RANK; alone, keep `device`."""
    if "RANK" not in os.environ:
        return Ranks(), device
    cuda = device.startswith("cuda")
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    ranks = Ranks(dist.get_rank(), dist.get_world_size(), distributed=True)
    return ranks, f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu"


def wrap(model, parallel, ranks):
    """The model as the training step calls it: under DDP on several ranks, wrapped in DistributedDataParallel,
    which leaves the split experts to reduce_expert_grads; FSDP's sharding is already in the model (spread)."""
    if not ranks.distributed or parallel != "ddp":
        return model
    ids = {id(w) for w in expert_params(model)}
    DDP._set_params_and_buffers_to_ignore_for_model(model, [n for n, p in model.named_parameters() if id(p) in ids])
    on_cuda = next(model.parameters()).device.type == "cuda"
    return DDP(model, device_ids=[torch.cuda.current_device()] if on_cuda else None)


def sync_gradients(model, raw_model, on):
    """Whether the next backward averages gradients over the ranks (the last micro-step of a step does; the
    others only accumulate)."""
    if isinstance(model, DDP):
        model.require_backward_grad_sync = on
    elif isinstance(raw_model, FSDPModule):
        raw_model.set_requires_gradient_sync(on)


def mean_over_ranks(stats, ranks):
    """A step's numbers ({name: tensor}) averaged over the ranks, in one all_reduce."""
    if not ranks.distributed:
        return stats
    flat = torch.cat([v.flatten() for v in stats.values()])
    dist.all_reduce(flat, op=dist.ReduceOp.AVG)
    return {k: v.view_as(stats[k]) for k, v in zip(stats, flat.split([t.numel() for t in stats.values()]))}


def any_rank(flag, ranks, device):
    """Whether flag is true on any rank (all ranks must stop at the same step, whichever got the signal)."""
    t = torch.tensor(float(flag), device=device)
    if ranks.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_finite(model, ranks, device, sharded):
    """Whether every tensor a checkpoint saves of the model (each weight, and each buffer: the experts' balancing
    biases) is finite, on every rank when each holds only a part (sharded); with whole models every rank holds the
    same ones, and asks no other."""
    local = torch.stack([torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all()
                         for p in [*model.parameters(), *model.buffers()]]).all().item()  # (one read, not one each)
    return not any_rank(not local, ranks, device) if sharded else local


class StopSignal:
    """SIGINT and SIGTERM, noted rather than obeyed at once: the run stops after the step in flight, on every rank
    at the same step (any_rank(signal is not None): whichever rank got it), with a checkpoint saved first."""

    def __init__(self):
        self.signal = None
        signal.signal(signal.SIGINT, self.note)
        signal.signal(signal.SIGTERM, self.note)

    def note(self, signum, frame):
        self.signal = signum

    @property
    def number(self):
        """The signal's number, for the exit code 128 + number (SIGTERM where another rank had the signal)."""
        return self.signal or signal.SIGTERM


def gather(obj, ranks):
    """[each rank's obj], in rank order, on every rank."""
    out = [obj] * ranks.size
    if ranks.distributed:
        dist.all_gather_object(out, obj)
    return out


def leave(ranks):
    """Every rank leaves together (a rank that tears down gloo while another still talks to it can abort)."""
    if ranks.distributed:
        dist.barrier()
        dist.destroy_process_group()


def exit_rank(code):
    """End a torchrun rank whose run is written without the interpreter's teardown, as multiprocessing's children
    end: DDP keeps the process group until that teardown, and a gloo thread that frees a collective's tensors
    during it aborts the rank after a complete run (docs/parallel.md, "How a rank ends", has the core dumps)."""
    atexit._run_exitfuncs()  # what a normal exit runs first (the out_dir lock goes)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# -----------------------------------------------------------------------------------------------------
# The arithmetic of docs/parallel.md's memory table

def memory_per_rank(n_params, n_expert_params, world, parallel, ep=1):
    """Bytes one rank holds as (parameters, gradients, AdamW state), all fp32 (bf16 training keeps fp32 master
    weights; FSDP's bf16 copies live only while a block runs). DDP: everything on every rank. FSDP: 1/world of
    it. EP: 1/ep of the routed experts (the ranks of a "replicate" column hold the same ones), everything else as the
    data-parallel layout has it. Activations and the transient gathers are not counted."""
    rest, experts = n_params - n_expert_params, n_expert_params
    if parallel == "fsdp":
        rest /= world
    experts /= ep if ep > 1 else (world if parallel == "fsdp" else 1)
    n = rest + experts
    return 4 * n, 4 * n, 8 * n

