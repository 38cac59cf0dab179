#!/usr/bin/env python3
# scripts/multi_gpu_bench.py — the MoE layer across W GPUs of one node, one process per GPU, three
# ways in the same run:
#   fused     fusedmoe's persistent kernel over the NCCL transport (router, dispatch of rows
#             into the owners' memory, experts, return and combine in one kernel per GPU);
#   modular   fusedmoe.MoE(group=world): routing, torch all_to_all of the kept rows, fusedmoe's
#             expert kernels on the local experts, all_to_all back, combine;
#   torch     router → all_to_all (split sizes exchanged first) → torch._grouped_mm over the local
#             experts → activation → _grouped_mm → all_to_all back → weighted sum;
#   a2a       the torch path's communication alone (split sizes, rows to the experts' ranks and
#             back, for the same routing): the dispatch + combine time the fused kernel hides.
# Every rank holds only its E / W experts' weights (all three paths); inputs and weights are
# drawn from the same seed on every rank.
#
#   NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node W scripts/multi_gpu_bench.py \
#       [--tokens 4096,8192,16384] [--dtypes bf16,fp32] [--out DIR]
#   decode:  ... --tokens 128 --hidden 7168 --ffn 2048 --experts 256 --top-k 8 --dtypes bf16
#
# Rank 0 prints a table (median ms of --iters calls, each timed with CUDA events after a barrier;
# the slowest rank's time counts) and writes DIR/multi_gpu_bench.csv.
from __future__ import annotations

import argparse
import csv
import os
import statistics

import torch
import torch.distributed as dist
import torch.nn.functional as F

import fusedmoe
from fusedmoe import distributed as fd

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def a2a_dispatch_combine(x, gate_weight, experts, top_k, world):
    """A function running the all-to-all path's communication for x's routing: the split sizes,
    the routed rows to their experts' ranks and the same number of rows back."""
    per_rank = experts // world
    idx = (x @ gate_weight.t()).float().topk(top_k, dim=-1).indices
    flat = idx.reshape(-1)
    order = flat.argsort(stable=True)
    rows = x.index_select(0, order // top_k)
    send_counts = torch.bincount(flat // per_rank, minlength=world)

    def run():
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        got = x.new_empty(sum(recv), x.shape[1])
        dist.all_to_all_single(got, rows, recv, send)
        back = x.new_empty(rows.shape[0], x.shape[1])
        dist.all_to_all_single(back, got, send, recv)
        return back
    return run


def torch_ep_forward(x, gate_weight, w1_local, w2_local, experts, top_k, ffn, world):
    """All-to-all expert parallelism with torch collectives and torch._grouped_mm."""
    per_rank = experts // world
    probs = (x @ gate_weight.t()).float().softmax(-1)
    weights, idx = probs.topk(top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    flat = idx.reshape(-1)
    order = flat.argsort(stable=True)  # by expert, hence by owning rank
    send_counts = torch.bincount(flat // per_rank, minlength=world)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts)
    send, recv = send_counts.tolist(), recv_counts.tolist()
    rows = x.index_select(0, order // top_k)
    local_expert = (flat[order] % per_rank).to(torch.int32)
    got_rows = x.new_empty(sum(recv), x.shape[1])
    got_expert = torch.empty(sum(recv), dtype=torch.int32, device=x.device)
    dist.all_to_all_single(got_rows, rows, recv, send)
    dist.all_to_all_single(got_expert, local_expert, recv, send)
    by_expert = got_expert.argsort(stable=True)
    offs = torch.bincount(got_expert, minlength=per_rank).cumsum(0).to(torch.int32)
    pre = torch._grouped_mm(got_rows.index_select(0, by_expert), w1_local, offs=offs)
    act = F.silu(pre[:, :ffn]) * pre[:, ffn:]
    out_sorted = torch._grouped_mm(act, w2_local, offs=offs)
    out = torch.empty_like(out_sorted).index_copy_(0, by_expert, out_sorted)
    back = x.new_empty(rows.shape[0], x.shape[1])
    dist.all_to_all_single(back, out, send, recv)
    per_choice = torch.empty_like(back).index_copy_(0, order, back)
    y = (per_choice.view(x.shape[0], top_k, -1).float() * weights.unsqueeze(-1)).sum(1)
    return y.to(x.dtype)


def timed(fn, iters):
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        t = torch.tensor([start.elapsed_time(end)], device="cuda")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the layer is as slow as its slowest rank
        times.append(float(t))
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description="the MoE layer across the GPUs of one node: fused, modular, torch")
    ap.add_argument("--tokens", default="4096,8192,16384", help="tokens per GPU, comma-separated")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default="multi_gpu_bench_out")
    args = ap.parse_args()

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    world, rank = dist.get_world_size(), dist.get_rank()
    E, H, I, k = args.experts, args.hidden, args.ffn, args.top_k
    if E % world:
        raise SystemExit(f"--experts {E} must be a multiple of the {world} ranks")
    per_rank = E // world
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    results = []
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        torch.manual_seed(0)
        full = fusedmoe.MoE(E, H, I, top_k=k, gate="softmax", ffn="swiglu", dtype=dtype, device="cuda")
        ep = fusedmoe.MoE(E, H, I, top_k=k, gate="softmax", ffn="swiglu", dtype=dtype, device="cuda",
                          group=dist.group.WORLD)
        with torch.no_grad():
            ep.gate.weight.copy_(full.gate.weight)
            ep.experts.w1.copy_(full.experts.w1[mine])
            ep.experts.w2.copy_(full.experts.w2[mine])
        config = full.config_for(dtype).to_string().replace("world_size=1", f"world_size={world}")
        gate_w, w1, w2 = full.gate.weight.detach(), full.experts.w1.detach(), full.experts.w2.detach()
        w1_local, w2_local = w1[mine].contiguous(), w2[mine].contiguous()
        for tokens in (int(t) for t in args.tokens.split(",")):
            g = torch.Generator(device="cuda").manual_seed(1 + rank)
            x = torch.randn(tokens, H, device="cuda", dtype=dtype, generator=g)
            row = {"dtype": dtype_name, "tokens_per_gpu": tokens, "world": world}
            with torch.no_grad():
                fd.init_fused_transport()
                row["fused_ms"] = timed(lambda: torch.ops.fusedmoe.moe_forward(
                    x, gate_w, None, None, None, w1_local, None, w2_local, None, None, None, None, None, None, config, [],
                    False, 0, 0, "fused"), args.iters)
                fd.close_fused_transport()
                row["modular_ms"] = timed(lambda: ep(x), args.iters)
                row["torch_ms"] = timed(lambda: torch_ep_forward(x, gate_w, w1_local, w2_local, E, k, I, world),
                                        args.iters)
                row["a2a_ms"] = timed(a2a_dispatch_combine(x, gate_w, E, k, world), args.iters)
            results.append(row)
            if rank == 0:
                print(f"W={world} {dtype_name} T/GPU={tokens}: fused {row['fused_ms']:.3f} ms, "
                      f"modular {row['modular_ms']:.3f} ms, torch {row['torch_ms']:.3f} ms, "
                      f"all-to-all alone {row['a2a_ms']:.3f} ms "
                      f"(fused {row['torch_ms'] / row['fused_ms']:.2f}x torch, "
                      f"{row['modular_ms'] / row['fused_ms']:.2f}x modular)", flush=True)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "multi_gpu_bench.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(results[0]))
            writer.writeheader()
            writer.writerows(results)
        print(f"wrote {os.path.join(args.out, 'multi_gpu_bench.csv')}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
