# tests/python/test_expert_parallel.py — expert parallelism over a gloo group of 2 processes on
# the CPU: each rank holds half of the experts and its own tokens; the outputs, dx and every
# gradient (gate and shared experts summed over the group with allreduce_replicated_grads, expert
# gradients local) equal one process holding all experts and all tokens. Dropless, fp64.
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fusedmoe
from fusedmoe import distributed

WORLD = 2
E, H, I, K, T_PER_RANK = 4, 16, 12, 2, 9


def build(group, seed=0):
    torch.manual_seed(seed)
    return fusedmoe.MoE(E, H, I, top_k=K, gate="softmax", ffn="swiglu", num_shared_experts=1,
                        gate_bias=True, expert_bias=True, group=group, dtype=torch.float64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        single = build(None)
        layer = build(dist.group.WORLD)
        with torch.no_grad():  # the same weights: this rank's slice of the experts
            for name, p in layer.named_parameters():
                full = dict(single.named_parameters())[name]
                if name.startswith("experts."):
                    p.copy_(full[rank * (E // WORLD):(rank + 1) * (E // WORLD)])
                else:
                    p.copy_(full)
        gen = torch.Generator().manual_seed(123)
        x_all = torch.randn(WORLD * T_PER_RANK, H, dtype=torch.float64, generator=gen)
        dy_all = torch.randn(WORLD * T_PER_RANK, H, dtype=torch.float64, generator=gen)
        mine = slice(rank * T_PER_RANK, (rank + 1) * T_PER_RANK)
        x = x_all[mine].clone().requires_grad_(True)
        y = layer(x)
        (y * dy_all[mine]).sum().backward()
        reduced = distributed.allreduce_replicated_grads(layer, dist.group.WORLD)
        results[rank] = dict(
            y=y.detach(), dx=x.grad, reduced=reduced,
            grads={n: p.grad.clone() for n, p in layer.named_parameters()},
            counts=layer.last_expert_counts.clone())
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process():
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(worker, args=(free_port(), results), nprocs=WORLD, join=True)

    single = build(None)
    gen = torch.Generator().manual_seed(123)
    x_all = torch.randn(WORLD * T_PER_RANK, H, dtype=torch.float64, generator=gen)
    dy_all = torch.randn(WORLD * T_PER_RANK, H, dtype=torch.float64, generator=gen)
    x = x_all.clone().requires_grad_(True)
    y = single(x)
    (y * dy_all).sum().backward()

    def rel(a, b):
        return float((a - b).norm() / b.norm().clamp_min(1e-30))

    per = E // WORLD
    for rank in range(WORLD):
        r = results[rank]
        mine = slice(rank * T_PER_RANK, (rank + 1) * T_PER_RANK)
        assert rel(r["y"], y.detach()[mine]) < 1e-12, f"rank {rank}: y"
        assert rel(r["dx"], x.grad[mine]) < 1e-12, f"rank {rank}: dx"
        for name, p in single.named_parameters():
            expected = p.grad[rank * per:(rank + 1) * per] if name.startswith("experts.") else p.grad
            assert rel(r["grads"][name], expected) < 1e-12, f"rank {rank}: gradient of {name}"
        assert "gate.weight" in r["reduced"] and not any(n.startswith("experts.") for n in r["reduced"])
    assert torch.equal(results[0]["counts"] + results[1]["counts"], single.last_expert_counts)
