#!/usr/bin/env python3
# scripts/multi_gpu_train_check.py — a training step of fusedmoe.MoE across W GPUs (one process
# per GPU, NCCL) equals the same step of one process holding all experts and all W ranks'
# tokens:
#   ep      expert parallel over all W ranks (each rank E / W experts, its own tokens);
#   ep x dp expert parallel over groups of --ep ranks, data parallel across those groups
#           (expert_data_parallel_groups), when W is a multiple of --ep and larger than it.
# Compared per rank: y and dx of its tokens, and every gradient after the library's reductions
# (allreduce_replicated_grads / allreduce_grads: gate and shared experts summed over all ranks,
# expert gradients over the ranks holding the same experts) against the single-process step's
# gradients (this rank's slice for the experts). Skewed routing (a gate biased towards two
# experts) leaves some experts without tokens. The single-process reference runs on each rank's
# GPU, so no rank waits for another.
#
#   NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node W scripts/multi_gpu_train_check.py [--dtype fp32]
#
# Exits 1 when a comparison fails; rank 0 prints one line per check.
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

import fusedmoe
from fusedmoe import distributed as fd

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build(args, dtype, group=None):
    torch.manual_seed(0)
    moe = fusedmoe.MoE(args.experts, args.hidden, args.ffn, top_k=args.top_k, gate="softmax", ffn="swiglu",
                       num_shared_experts=1, gate_bias=True, dtype=dtype, device="cuda", group=group)
    with torch.no_grad():  # skewed routing: two experts favoured, some get no tokens
        moe.gate.bias.zero_()
        moe.gate.bias[:2] = 4.0
    return moe


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def step(moe, x, dy):
    x = x.clone().requires_grad_(True)
    y = moe(x)
    (y.float() * dy.float()).sum().backward()
    return y.detach(), x.grad


def check(name, ep_group, dp_group, args, dtype, tol, x_all, dy_all, full_grads, y_full, dx_full) -> bool:
    world, rank = dist.get_world_size(), dist.get_rank()
    ep_size, ep_rank = dist.get_world_size(ep_group), dist.get_rank(ep_group)
    per = args.experts // ep_size
    moe = build(args, dtype, ep_group)
    reference = build(args, dtype)
    with torch.no_grad():
        for n, p in moe.named_parameters():
            full = dict(reference.named_parameters())[n]
            p.copy_(full[ep_rank * per:(ep_rank + 1) * per] if n.startswith("experts.") else full)
    mine = slice(rank * args.tokens, (rank + 1) * args.tokens)
    y, dx = step(moe, x_all[mine], dy_all[mine])
    if dp_group is None:
        fd.allreduce_replicated_grads(moe, ep_group)
    else:
        fd.allreduce_grads(moe, None, dp_group)
    errors = {"y": rel(y, y_full[mine]), "dx": rel(dx, dx_full[mine])}
    for n, p in moe.named_parameters():
        expected = full_grads[n]
        if n.startswith("experts."):
            expected = expected[ep_rank * per:(ep_rank + 1) * per]
        errors[n] = rel(p.grad, expected)
    worst = max(errors, key=errors.get)
    ok = errors[worst] <= tol
    verdicts = [None] * world
    dist.all_gather_object(verdicts, (ok, worst, errors[worst]))
    if rank == 0:
        for r, (r_ok, r_worst, r_err) in enumerate(verdicts):
            print(f"{name} W={world} ep={ep_size} rank {r}: {'PASS' if r_ok else 'FAIL'} "
                  f"(largest rel. error {r_err:.2e} in {r_worst}, tolerance {tol:.0e})", flush=True)
    return all(v[0] for v in verdicts)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=192)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=300, help="tokens per rank")
    ap.add_argument("--ep", type=int, default=2, help="expert-parallel group size of the ep x dp check")
    args = ap.parse_args()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    world = dist.get_world_size()
    dtype = DTYPES[args.dtype]
    # fp32 runs the expert GEMMs in TF32; per-row results do not depend on the other rows, but
    # the reductions over tokens (weight gradients) sum in another order.
    tol = 2e-3 if dtype == torch.float32 else 3e-2
    if args.experts % world:
        raise SystemExit(f"--experts {args.experts} must be a multiple of the {world} ranks")

    g = torch.Generator(device="cuda").manual_seed(123)
    x_all = torch.randn(world * args.tokens, args.hidden, device="cuda", generator=g).to(dtype)
    dy_all = torch.randn(world * args.tokens, args.hidden, device="cuda", generator=g).to(dtype)
    single = build(args, dtype)
    y_full, dx_full = step(single, x_all, dy_all)
    full_grads = {n: p.grad.clone() for n, p in single.named_parameters()}

    ok = check("ep", dist.group.WORLD, None, args, dtype, tol, x_all, dy_all, full_grads, y_full, dx_full)
    if world > args.ep and world % args.ep == 0:
        ep_group, dp_group = fd.expert_data_parallel_groups(args.ep)
        ok &= check("ep x dp", ep_group, dp_group, args, dtype, tol, x_all, dy_all, full_grads, y_full, dx_full)
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
