# python/fusedmoe/bench.py — `fusedmoe bench` (also `python -m fusedmoe.bench`): the standard
# configs of docs/benchmarks.md (or one given on the command line) timed for fusedmoe and for
# the torch baselines in the same process, forward and forward+backward, on one GPU.
#
# Baselines: (1) a torch per-expert loop (FastMoE-style: gather each expert's tokens, run its
# FFN, index_add back); (2) the torch `_grouped_mm` pipeline (router → argsort by expert →
# gather → grouped GEMM → activation → grouped GEMM → weighted un-permute). Both run the same
# layer as fusedmoe: same weights (w1 [E, H, N1], w2 [E, I, H]), same softmax top-k router.
# Timing: CUDA events around each call, after warm-up, median over repetitions, cycling through
# several input sets so caches do not flatter, the methods' repetitions interleaved so that none
# meets a cooler GPU than the others. Prints a table (ms, TFLOP/s, % of the bf16 peak
# measured in the same run, ratio to each baseline) and writes CSV and a PNG bar chart.
from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

STANDARD_CONFIGS = {
    # name: (T, H, I, E, k, ffn, dtype)
    "paper-64": (16384, 2048, 2048, 64, 2, "swiglu", "bf16"),
    "paper-128": (16384, 2048, 2048, 128, 2, "swiglu", "bf16"),
    "qwen3-30b-a3b": (16384, 2048, 768, 128, 8, "swiglu", "bf16"),
    "mixtral": (8192, 4096, 14336, 8, 2, "swiglu", "bf16"),
    "decode": (128, 7168, 2048, 32, 8, "swiglu", "bf16"),
    "paper-fp32": (16384, 2048, 2048, 32, 2, "relu", "fp32"),
}
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclasses.dataclass
class Problem:
    name: str
    tokens: int
    hidden: int
    ffn: int
    experts: int
    top_k: int
    ffn_kind: str
    dtype: str

    @property
    def gated(self) -> bool:
        return self.ffn_kind in ("swiglu", "geglu")

    def flops(self) -> float:
        n1 = 2 * self.ffn if self.gated else self.ffn
        return 2.0 * self.tokens * self.top_k * (self.hidden * n1 + self.ffn * self.hidden)

    def weight_bytes(self) -> float:
        n1 = 2 * self.ffn if self.gated else self.ffn
        elem = torch.finfo(TORCH_DTYPES[self.dtype]).bits // 8
        touched = min(self.experts, self.tokens * self.top_k)
        return float(touched * (self.hidden * n1 + self.ffn * self.hidden) * elem)

    def config_string(self) -> str:
        return (f"hidden_size={self.hidden};ffn_size={self.ffn};num_experts={self.experts};top_k={self.top_k};"
                f"ffn={self.ffn_kind};gate=softmax;renormalize=1;dtype={self.dtype}")


def activation(kind: str, pre: torch.Tensor, ffn: int) -> torch.Tensor:
    if kind == "swiglu":
        return F.silu(pre[..., :ffn]) * pre[..., ffn:]
    if kind == "geglu":
        return F.gelu(pre[..., :ffn]) * pre[..., ffn:]
    if kind == "gelu":
        return F.gelu(pre)
    return F.relu(pre)


def router(x, gate_weight, top_k):
    logits = (x @ gate_weight.t()).float()
    probs = logits.softmax(dim=-1)
    weights, idx = probs.topk(top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, idx


def torch_grouped_mm_pipeline(p: Problem, x, gate_weight, w1, w2):
    """Router → sort by expert → _grouped_mm → activation → _grouped_mm → weighted un-permute."""
    weights, idx = router(x, gate_weight, p.top_k)
    flat = idx.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=p.experts)
    offs = counts.cumsum(0).to(torch.int32)
    x_sorted = x.index_select(0, order // p.top_k)
    pre = torch._grouped_mm(x_sorted, w1, offs=offs)
    act = activation(p.ffn_kind, pre, p.ffn)
    out_sorted = torch._grouped_mm(act, w2, offs=offs)
    out = torch.empty_like(out_sorted).index_copy_(0, order, out_sorted)
    y = (out.view(p.tokens, p.top_k, p.hidden).float() * weights.unsqueeze(-1)).sum(1)
    return y.to(x.dtype)


def torch_loop(p: Problem, x, gate_weight, w1, w2):
    """FastMoE-style: per expert, gather its tokens, run its FFN, index_add the weighted rows."""
    weights, idx = router(x, gate_weight, p.top_k)
    y = torch.zeros(p.tokens, p.hidden, dtype=torch.float32, device=x.device)
    for e in range(p.experts):
        token, slot = (idx == e).nonzero(as_tuple=True)
        if token.numel() == 0:
            continue
        h = activation(p.ffn_kind, x[token] @ w1[e], p.ffn) @ w2[e]
        y.index_add_(0, token, h.float() * weights[token, slot].unsqueeze(-1))
    return y.to(x.dtype)


def fusedmoe_layer(p: Problem, x, gate_weight, w1, w2, backend: str = "auto"):
    """The modular GPU path ("auto"), or the single persistent kernel ("fused")."""
    out = torch.ops.fusedmoe.moe_forward(x, gate_weight, None, None, None, w1, None, w2, None, None, None, None,
                                         None, None, p.config_string(), [], False, 0, 0, backend,
                                         save_for_backward=torch.is_grad_enabled())
    return out[0]


def fusedmoe_fused(p: Problem, x, gate_weight, w1, w2):
    return fusedmoe_layer(p, x, gate_weight, w1, w2, backend="fused")


def clear_grads(args) -> None:
    """Drops the .grad of every tensor argument (as optimizer.zero_grad(set_to_none=True) does
    between steps), so that a timed backward writes fresh gradients instead of accumulating into
    the previous repetition's (an elementwise pass over every weight gradient, which is not the
    layer's work)."""
    for a in args:
        if isinstance(a, torch.Tensor):
            a.grad = None


def time_ms(fn, input_sets, warmup=3, repeats=20) -> float:
    """Median milliseconds of fn(*inputs) with CUDA events, cycling through input sets; every
    repetition starts from an idle GPU with the inputs' gradients cleared."""
    return time_interleaved_ms({"fn": fn}, input_sets, warmup, repeats)["fn"]


def time_interleaved_ms(fns: dict, input_sets, warmup=3, repeats=20) -> dict:
    """Median milliseconds of each fn in `fns` (name -> fn) with CUDA events, cycling through the
    input sets; every repetition starts from an idle GPU with the inputs' gradients cleared. The
    methods are interleaved: repetition i runs every method once, in an order rotated by i. Run one
    method's repetitions after the other's and the first one meets a cooler GPU (a sustained
    GEMM loop sits at the H100's power limit: mixtral's GEMM0 4.96 ms cold, 5.49 ms hot). A
    method that raises during warm-up gets NaN (and a message)."""
    live = {}
    for name, fn in fns.items():
        try:
            for i in range(warmup):
                fn(*input_sets[i % len(input_sets)])
            live[name] = fn
        except (RuntimeError, NotImplementedError) as error:
            print(f"\n{name}: {str(error).splitlines()[0]}", file=sys.stderr)
    torch.cuda.synchronize()
    times = {name: [] for name in live}
    names = list(live)
    for i in range(repeats):
        args = input_sets[i % len(input_sets)]
        for j in range(len(names)):
            name = names[(i + j) % len(names)]
            clear_grads(args)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            live[name](*args)
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end))
    return {name: statistics.median(times[name]) if name in times else float("nan") for name in fns}


def measured_peak_tflops(dtype) -> float:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = time_ms(lambda a, b: a @ b, [(a, b)], warmup=3, repeats=10)
    return 2 * n**3 / ms / 1e9


def make_inputs(p: Problem, sets: int, requires_grad: bool):
    dt = TORCH_DTYPES[p.dtype]
    n1 = 2 * p.ffn if p.gated else p.ffn
    g = torch.Generator(device="cuda").manual_seed(1234)
    weights = dict(
        gate_weight=(torch.randn(p.experts, p.hidden, device="cuda", generator=g) / math.sqrt(p.hidden)).to(dt),
        w1=(torch.randn(p.experts, p.hidden, n1, device="cuda", generator=g) / math.sqrt(p.hidden)).to(dt),
        w2=(torch.randn(p.experts, p.ffn, p.hidden, device="cuda", generator=g) / math.sqrt(p.ffn)).to(dt),
    )
    for w in weights.values():
        w.requires_grad_(requires_grad)
    xs = [torch.randn(p.tokens, p.hidden, device="cuda", dtype=dt, generator=g).requires_grad_(requires_grad)
          for _ in range(sets)]
    return [(p, x, weights["gate_weight"], weights["w1"], weights["w2"]) for x in xs]


def forward_backward(fn):
    def run(p, x, gate_weight, w1, w2):
        y = fn(p, x, gate_weight, w1, w2)
        y.backward(torch.ones_like(y))
    return run


def profile_kernels(p: Problem) -> None:
    """Prints the CUDA kernels of fusedmoe's forward and forward+backward on p, by total time."""
    from torch.profiler import ProfilerActivity, profile
    for pass_name in ("forward", "forward+backward"):
        inputs = make_inputs(p, sets=1, requires_grad=pass_name != "forward")
        run = fusedmoe_layer if pass_name == "forward" else forward_backward(fusedmoe_layer)
        with torch.no_grad() if pass_name == "forward" else torch.enable_grad():
            host_ms = []
            for _ in range(3):
                clear_grads(inputs[0])
                torch.cuda.synchronize()
                start = time.perf_counter()
                run(*inputs[0])
                host_ms.append((time.perf_counter() - start) * 1e3)
                torch.cuda.synchronize()
            clear_grads(inputs[0])
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                run(*inputs[0])
                torch.cuda.synchronize()
        print(f"\n{p.name} {pass_name}: GPU kernels (host time of a call from an idle GPU: "
              f"{statistics.median(host_ms):.3f} ms)")
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=16, max_name_column_width=150))


TIMELINE_KINDS = ("router", "dispatch", "GEMM0", "GEMM1", "combine", "schedule", "router logits", "dispatch copy")
PART_KINDS = (5, 6, 7)  # inside another phase's interval: drawn thin, not counted as busy on their own


def union_ns(intervals) -> int:
    """Total length of the union of [start, end) intervals."""
    total, cur_start, cur_end = 0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def timeline_stats(events) -> dict:
    """SM busy % and overlap of dispatch with expert compute from timeline rows
    (start_ns, end_ns, block, sm, rank, kind); the scheduler's lookups and the parts of phases
    (PART_KINDS) do not count as busy on their own."""
    t0 = min(e[0] for e in events)
    span = max(e[1] for e in events) - t0
    blocks = sorted({e[2] for e in events})
    busy = gemm = 0
    for b in blocks:
        mine = [(e[0], e[1]) for e in events if e[2] == b and e[5] not in PART_KINDS]  # parts of phases, lookups
        busy += union_ns(mine)
        gemm += union_ns([(e[0], e[1]) for e in events if e[2] == b and e[5] in (2, 3)])
    dispatch = [(e[0], e[1]) for e in events if e[5] == 1]
    compute = [(e[0], e[1]) for e in events if e[5] in (2, 3)]
    dispatch_wall = union_ns(dispatch)
    both = union_ns(dispatch) + union_ns(compute) - union_ns(dispatch + compute)  # |D ∩ C|
    return dict(span_ms=span / 1e6, blocks=len(blocks),
                sm_busy=100.0 * busy / (span * len(blocks)), gemm_busy=100.0 * gemm / (span * len(blocks)),
                dispatch_ms=dispatch_wall / 1e6,
                overlap=100.0 * both / dispatch_wall if dispatch_wall else float("nan"),
                tasks=sum(1 for e in events if e[5] in (2, 3)))


def timeline_report(p: Problem, world: int, out_dir: str) -> dict:
    """One recorded forward of the fused kernel with `world` emulated ranks: statistics, CSV and PNG."""
    (_, x, gate_weight, w1, w2), = make_inputs(p, sets=1, requires_grad=False)
    share = [p.tokens // world + (1 if q < p.tokens % world else 0) for q in range(world)]
    config = p.config_string() + f";world_size={world}"

    def call():
        return torch.ops.fusedmoe.moe_forward(x, gate_weight, None, None, None, w1, None, w2, None, None, None, None,
                                              None, None, config, share if world > 1 else [], False, 0, 0, "fused")
    with torch.no_grad():
        for _ in range(3):
            call()
        torch.cuda.synchronize()
        torch.ops.fusedmoe.set_fused_timeline(True)
        try:
            call()
            torch.cuda.synchronize()
        finally:
            torch.ops.fusedmoe.set_fused_timeline(False)
    events = torch.ops.fusedmoe.fused_timeline().tolist()
    stats = timeline_stats(events)
    stem = os.path.join(out_dir, f"timeline_{p.name}_w{world}")
    with open(stem + ".csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["start_ns", "end_ns", "block", "sm", "rank", "kind"])
        writer.writerows(events)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        t0 = min(e[0] for e in events)
        fig, ax = plt.subplots(figsize=(12, 6))
        colors = ("tab:gray", "tab:orange", "tab:blue", "tab:green", "tab:red", "tab:purple", "black", "tab:brown")
        for kind, name in enumerate(TIMELINE_KINDS):
            for block in sorted({e[2] for e in events}):
                bars = [((e[0] - t0) / 1e3, (e[1] - e[0]) / 1e3) for e in events if e[5] == kind and e[2] == block]
                if bars:
                    # the scheduler's lookups overlap the block's GEMM tasks: a thin bar
                    ax.broken_barh(bars, (block - 0.1, 0.2) if kind in PART_KINDS else (block - 0.4, 0.8),
                                   facecolors=colors[kind])
            ax.plot([], [], color=colors[kind], linewidth=6, label=name)
        ax.set_xlabel("µs since the first block started")
        ax.set_ylabel("block (rank = block / blocks per rank)")
        ax.set_title(f"fused kernel, {p.name}, W = {world} emulated: SM busy {stats['sm_busy']:.1f}%, "
                     f"GEMM {stats['gemm_busy']:.1f}%, dispatch overlapped {stats['overlap']:.0f}%")
        ax.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        fig.savefig(stem + ".png", dpi=110)
    except ImportError:
        pass
    return stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="fusedmoe bench", description="Times fusedmoe against the torch baselines (per-expert loop, _grouped_mm pipeline) on the standard MoE configs, forward and forward+backward, on one GPU.")
    ap.add_argument("--configs", default=",".join(STANDARD_CONFIGS),
                    help="comma-separated standard configs (default: all): " + ", ".join(STANDARD_CONFIGS))
    ap.add_argument("--custom", default="", help="one extra config as T,H,I,E,k,ffn,dtype (e.g. 4096,1024,1024,16,2,swiglu,bf16)")
    ap.add_argument("--repeats", type=int, default=20, help="timed repetitions (median reported)")
    ap.add_argument("--no-loop", action="store_true", help="skip the slow torch per-expert loop baseline")
    ap.add_argument("--no-backward", action="store_true", help="forward only")
    ap.add_argument("--out", default="bench_out", help="directory for bench.csv and bench.png")
    ap.add_argument("--profile", action="store_true",
                    help="print the GPU kernels of one fusedmoe forward and forward+backward per config (torch.profiler)")
    ap.add_argument("--timeline", action="store_true",
                    help="record one fused-kernel forward per config at W = 1 and 8 emulated ranks: SM busy %%, "
                         "overlap of dispatch with expert compute, timeline PNG/CSV in --out")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("fusedmoe bench: no CUDA device (the benchmark times GPU kernels)", file=sys.stderr)
        return 2
    import fusedmoe  # noqa: F401  (loads the op library)

    problems = [Problem(name, *STANDARD_CONFIGS[name]) for name in args.configs.split(",") if name]
    if args.custom:
        t, h, i, e, k, ffn, dt = args.custom.split(",")
        problems.append(Problem("custom", int(t), int(h), int(i), int(e), int(k), ffn, dt))
    if args.profile:
        for p in problems:
            profile_kernels(p)
    device = torch.cuda.get_device_name()
    peak = measured_peak_tflops(torch.bfloat16)
    props = torch.cuda.get_device_properties(0)
    print(f"device: {device} ({props.multi_processor_count} SMs); measured bf16 matmul peak {peak:.0f} TFLOP/s")
    os.makedirs(args.out, exist_ok=True)
    if args.timeline:
        for p in problems:
            for world in (1, 8):
                try:
                    st = timeline_report(p, world, args.out)
                except (RuntimeError, NotImplementedError) as error:
                    print(f"timeline {p.name} W={world}: {str(error).splitlines()[0]}", file=sys.stderr)
                    continue
                print(f"timeline {p.name} W={world}: kernel {st['span_ms']:.3f} ms, {st['blocks']} blocks, "
                      f"{st['tasks']} GEMM tasks, SM busy {st['sm_busy']:.1f}% (GEMM {st['gemm_busy']:.1f}%), "
                      f"dispatch {st['dispatch_ms']:.3f} ms wall, {st['overlap']:.0f}% of it overlapped with "
                      f"expert GEMMs")
    rows = []
    methods = [("fusedmoe", fusedmoe_layer), ("fusedmoe fused", fusedmoe_fused),
               ("torch grouped_mm", torch_grouped_mm_pipeline)]
    if not args.no_loop:
        methods.append(("torch loop", torch_loop))
    passes = ["forward"] + ([] if args.no_backward else ["forward+backward"])
    total = len(problems) * len(passes)
    done = 0
    t0 = time.time()
    for p in problems:
        for pass_name in passes:
            with torch.no_grad() if pass_name == "forward" else torch.enable_grad():
                inputs = make_inputs(p, sets=3, requires_grad=pass_name != "forward")
                done += 1
                print(f"\r[{done}/{total}] {p.name} {pass_name} ... {time.time() - t0:.0f} s", end="",
                      file=sys.stderr, flush=True)
                # The methods' repetitions interleaved (time_interleaved_ms); _grouped_mm runs bf16 only.
                runs = {method: (fn if pass_name == "forward" else forward_backward(fn)) for method, fn in methods
                        if not (p.dtype != "bf16" and method == "torch grouped_mm")}
                timed = time_interleaved_ms(runs, inputs, repeats=args.repeats)
                for method, _ in methods:
                    ms = timed.get(method, float("nan"))
                    flops = p.flops() * (3 if pass_name != "forward" else 1)
                    rows.append(dict(config=p.name, pass_=pass_name, method=method, ms=ms,
                                     tflops=flops / ms / 1e9 if ms == ms else float("nan")))
            del inputs
            torch.cuda.empty_cache()
    print("", file=sys.stderr)
    # Table with ratios to each baseline.
    print(f"\n{'config':<15}{'pass':<18}{'method':<18}{'ms':>10}{'TFLOP/s':>10}{'% peak':>8}{'vs grouped_mm':>15}{'vs loop':>10}")
    for r in rows:
        base = {m["method"]: m["ms"] for m in rows if m["config"] == r["config"] and m["pass_"] == r["pass_"]}
        vs_gmm = base.get("torch grouped_mm", float("nan")) / r["ms"]
        vs_loop = base.get("torch loop", float("nan")) / r["ms"]
        r["vs_grouped_mm"], r["vs_loop"] = vs_gmm, vs_loop
        print(f"{r['config']:<15}{r['pass_']:<18}{r['method']:<18}{r['ms']:>10.3f}{r['tflops']:>10.1f}"
              f"{100 * r['tflops'] / peak:>7.1f}%{vs_gmm:>14.2f}x{vs_loop:>9.2f}x")
    with open(os.path.join(args.out, "bench.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()) + ["device"])
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "device": device})
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        labels = sorted({(r["config"], r["pass_"]) for r in rows}, key=lambda c: (c[0], c[1]))
        fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(labels)), 4.5))
        width = 0.8 / len(methods)
        for j, (method, _) in enumerate(methods):
            ys = [next((r["ms"] for r in rows if (r["config"], r["pass_"]) == c and r["method"] == method), 0) for c in labels]
            ax.bar([i + j * width for i in range(len(labels))], ys, width, label=method)
        ax.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(labels))])
        ax.set_xticklabels([f"{c}\n{p}" for c, p in labels], fontsize=8)
        ax.set_ylabel("ms (lower is better)")
        ax.set_yscale("log")
        ax.set_title(f"fusedmoe bench on {device}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "bench.png"), dpi=120)
    except ImportError:
        print("matplotlib not installed: no bench.png", file=sys.stderr)
    print(f"\nwrote {os.path.join(args.out, 'bench.csv')} and bench.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
