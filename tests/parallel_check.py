"""
Run by tests/test_parallel.py under torchrun (2 ranks, gloo): expert parallelism against one process holding
every expert, and how much of the model each rank holds. Exits non-zero (an AssertionError) on any mismatch.

    torchrun --standalone --nproc_per_node=2 tests/parallel_check.py
"""

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from infra import parallel  # noqa: E402
from model import GPT, init_weights, preset  # noqa: E402
from router import MoE, RouterConfig  # noqa: E402

E, D, H = 8, 16, 12


def moe_pair(world):
    """The same layer twice: one split over the ranks (EP), one whole (the reference). Every input row is
    positive and expert 3's router row negative, so expert 3 gets no token; the rest are loaded unevenly."""
    torch.manual_seed(0)
    whole = MoE(D, E, H, n_shared=1, config=RouterConfig(top_p=0.6))
    init_weights(whole, n_layer=2)
    with torch.no_grad():
        whole.router.weight[3] = -whole.router.weight[3].abs() - 1
    split = MoE(D, E, H, n_shared=1, config=whole.config)
    split.load_state_dict(whole.state_dict())
    model = torch.nn.Module()
    model.moe_layers = lambda: [split]
    parallel.shard_experts(model, init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard")))
    return whole, split


def check_expert_parallel(rank, world):
    whole, split = moe_pair(world)
    g = torch.Generator().manual_seed(1)
    xs = [torch.rand(20 + 7 * r, D, generator=g) for r in range(world)]  # uneven batches, positive rows
    cs = [torch.randn(20 + 7 * r, D, generator=g) for r in range(world)]
    y, aux, routing = split(xs[rank])
    ((y * cs[rank]).sum() + aux).backward()
    ref = [whole(x) for x in xs]
    sum((yr * c).sum() + a for (yr, a, _), c in zip(ref, cs)).backward()

    assert torch.allclose(y, ref[rank][0], atol=1e-6), (y - ref[rank][0]).abs().max()
    counts = torch.stack([r.tokens_per_expert for _, _, r in ref]).sum(0)
    assert counts[3] == 0 and counts.max() >= 2 * counts[counts > 0].min(), counts  # one idle, uneven load
    n = E // world
    for name in ("w1", "w3", "w2"):  # the experts here: their gradient sums every rank's loss already
        local = getattr(split.experts, name).grad.to_local()
        assert local.shape[0] == n
        assert torch.allclose(local, getattr(whole.experts, name).grad[rank * n:(rank + 1) * n], atol=1e-5)
    if rank == 3 // n:
        assert split.experts.w1.grad.to_local()[3 % n].abs().max() == 0  # the idle expert: exactly zero
    for name, p in split.named_parameters():  # the replicated rest: the ranks' gradients add up to the whole's
        if not name.startswith("experts."):
            dist.all_reduce(p.grad)
            assert torch.allclose(p.grad, dict(whole.named_parameters())[name].grad, atol=1e-5), name

    with torch.no_grad():  # without autograd, and with every token going to rank 0's experts: rank 1 gets none
        split.router.weight[n:] = -10.0
        whole.router.weight.copy_(split.router.weight)
        assert torch.allclose(split(xs[rank])[0], whole(xs[rank])[0], atol=1e-6)


def check_sharded_build(rank, world):
    """FSDP + EP built shard by shard: the weights are exactly one process's from the same seed, and each rank's
    local elements are about 1/world of everything but the experts and 1/ep of those."""
    torch.manual_seed(0)
    whole = GPT(preset("tiny_8x64", vocab_size=64), verbose=False)
    experts = sum(w.numel() for m in whole.moe_layers() for w in m.experts.parameters())
    rest = whole.num_params() - experts
    torch.manual_seed(0)
    model = parallel.build(whole.config, "fsdp", world, "cpu", bf16=False, verbose=False)
    for (name, w), ref in zip(model.named_parameters(), whole.parameters()):
        assert torch.equal(w.full_tensor(), ref), name
    assert model.lm_head.weight is model.wte.weight  # still tied
    local_experts = sum(w.to_local().numel() for w in parallel.expert_params(model))
    local_rest = sum(p.to_local().numel() for p in model.parameters()) - local_experts
    assert local_experts == experts // world, (local_experts, experts)
    assert abs(local_rest - rest / world) <= 0.01 * rest, (local_rest, rest)
    if rank == 0:
        print(f"shards: experts {local_experts}/{experts}, rest {local_rest}/{rest}")


if __name__ == "__main__":
    dist.init_process_group("gloo")
    r, w = dist.get_rank(), dist.get_world_size()
    check_expert_parallel(r, w)
    check_sharded_build(r, w)
    dist.barrier()
    if r == 0:
        print("parallel checks passed")
    dist.destroy_process_group()
