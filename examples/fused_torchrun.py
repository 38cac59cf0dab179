#!/usr/bin/env python3
# examples/fused_torchrun.py — the fused MoE kernel across GPUs under torchrun: one process per
# GPU, each holding E / W experts' slot in the layer and its own tokens; router, dispatch of rows
# to the GPUs that own their experts, expert FFN and combine run in one kernel per GPU, writing
# straight into the peers' memory through an NCCL symmetric window.
#
#   NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node W examples/fused_torchrun.py [--tokens T] [--iters N]
#
# Every rank draws the same weights and the same W x T tokens, runs the fused op on its T tokens
# over NCCL with the weights of its own E / W experts only, and compares its rows with the same
# layer computed in this process with W ranks emulated on its own GPU (fusedmoe's local
# transport, all E experts' weights). Prints each rank's error and time;
# exits 1 if a rank's rows differ beyond the tolerance.
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

import fusedmoe
from fusedmoe import distributed as fd


def main() -> int:
    ap = argparse.ArgumentParser(description="the fused MoE kernel over NCCL, one process per GPU (torchrun)")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--skew", action="store_true",
                    help="a gate bias towards experts 0 and 1: skewed loads (rank 0's experts), experts with no tokens")
    args = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    world, rank = dist.get_world_size(), dist.get_rank()
    if args.experts % world:
        raise SystemExit(f"--experts {args.experts} must be a multiple of the {world} ranks")

    torch.manual_seed(0)
    layer = fusedmoe.MoE(args.experts, args.hidden, args.ffn, top_k=args.top_k, gate="softmax", ffn="swiglu",
                         gate_bias=args.skew, dtype=dtype, device="cuda")
    if args.skew:
        with torch.no_grad():
            layer.gate.bias.zero_()
            layer.gate.bias[:2] = 4.0
    config = layer.config_for(dtype).to_string().replace("world_size=1", f"world_size={world}")
    if f"world_size={world}" not in config:
        config += f";world_size={world}"
    g, ex = layer.gate, layer.experts
    bias = g.bias.detach() if args.skew else None
    weights = (g.weight.detach(), bias, None, None, ex.w1.detach(), None, ex.w2.detach(), None,
               None, None, None, None, None)
    x_all = torch.randn(world * args.tokens, args.hidden, device="cuda", dtype=dtype, generator=torch.Generator(
        device="cuda").manual_seed(1))
    mine = slice(rank * args.tokens, (rank + 1) * args.tokens)

    per_rank = args.experts // world
    experts = slice(rank * per_rank, (rank + 1) * per_rank)  # this rank's experts (default placement)
    local_weights = (g.weight.detach(), bias, None, None, ex.w1.detach()[experts].contiguous(), None,
                     ex.w2.detach()[experts].contiguous(), None, None, None, None, None, None)

    def fused(x, w=weights):
        return torch.ops.fusedmoe.moe_forward(x, *w, config, [], False, 0, 0, "fused")

    with torch.no_grad():
        # Reference: the whole layer with W ranks emulated on this GPU (local transport).
        y_ref, idx_ref = (t[mine] for t in fused(x_all)[:2])
        fd.init_fused_transport()
        x = x_all[mine].contiguous()
        y, idx = fused(x, local_weights)[:2]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(3):
            fused(x, local_weights)
        start.record()
        for _ in range(args.iters):
            fused(x, local_weights)
        end.record()
        torch.cuda.synchronize()
        fd.close_fused_transport()
    error = float((y.float() - y_ref.float()).norm() / y_ref.float().norm().clamp_min(1e-30))
    routing = int((idx != idx_ref).sum())
    counts = torch.bincount(idx_ref.reshape(-1).long(), minlength=args.experts)
    load = f", skewed: experts 0-1 take {int(counts[:2].sum())} of {idx_ref.numel()} rows, {int((counts == 0).sum())} experts none" \
        if args.skew else ""
    tolerance = 2e-2 if dtype != torch.float32 else 5e-3
    ok = error <= tolerance and routing == 0
    print(f"rank {rank} of {world}: {args.tokens} tokens, fused over NCCL {start.elapsed_time(end) / args.iters:.3f} ms, "
          f"y error vs emulated ranks {error:.2e}, routing differences {routing}{load}: {'PASS' if ok else 'FAIL'}",
          flush=True)
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
