"""Times torch._grouped_mm on the paper-64 grouped GEMMs (bf16), the baseline for
src/cuda/gemm/grouped_gemm_sm90.cu. Run it in the same session as build/gemm/grouped_gemm_test
and pass that program's --results file to print the ratios:

    build/gemm/grouped_gemm_test --bench-only --results ours.txt
    python3 tests/gpu/gemm/bench_torch.py --ours ours.txt

Problems (64 experts x 512 rows = 32768 rows, FLOPs = 2 * rows * K * N):
    GEMM0: A [32768, 2048] x B [64, 2048, 4096]   (SwiGLU in the fused kernel; torch: GEMM only)
    GEMM1: A [32768, 2048] x B [64, 2048, 2048]
Backward (same run, printed as a second table):
    dgrad GEMM1: dact = g · W2ᵀ   torch._grouped_mm(g [32768, 2048], W2.transpose(-2, -1))
                 with W2 [64, 2048 (I), 2048 (H)]
    dgrad GEMM0: dx = dpre · W1ᵀ  torch._grouped_mm(dpre [32768, 4096], W1.transpose(-2, -1))
                 with W1 [64, 2048 (H), 4096 (2I)]
    wgrad dW2 = actᵀ · g  torch._grouped_mm(act.t(), g, offs=offs) -> [64, 2048, 2048]
    wgrad dW1 = xᵀ · dpre torch._grouped_mm(x.t(), dpre, offs=offs) -> [64, 2048, 4096]
    (torch's ragged-K mode; if torch rejects the transposed view, the contiguous transpose is
    timed instead and the copy is reported separately.)
Also times a dense bf16 matmul of the same FLOPs (the device's practical ceiling) and the
skewed routing of the test program (same seedless exponential weights are not reproduced; the
skewed torch numbers use torch's own random split).
"""
import argparse
import statistics

import torch


def median_ms(fn, warmup=5, iters=30):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def grouped(counts, k, n, swiglu, gen):
    rows = int(sum(counts))
    a = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    b = torch.randn(len(counts), k, n, device="cuda", dtype=torch.bfloat16, generator=gen) / k**0.5
    offs = torch.cumsum(torch.tensor(counts, device="cuda", dtype=torch.int32), 0, dtype=torch.int32)

    # torch's kernel may prefer B with k contiguous: time both layouts, keep the faster.
    b_kmajor = b.transpose(-2, -1).contiguous().transpose(-2, -1)

    def gemm():
        return torch._grouped_mm(a, b, offs=offs)

    def gemm_kmajor():
        return torch._grouped_mm(a, b_kmajor, offs=offs)

    def gemm_swiglu():
        h = torch._grouped_mm(a, b, offs=offs)
        g, u = h.chunk(2, dim=-1)
        return torch.nn.functional.silu(g) * u

    ms_n = median_ms(gemm)
    ms_k = median_ms(gemm_kmajor)
    print(f"  torch._grouped_mm K={k} N={n}: B n-contiguous {ms_n:.4f} ms, B k-contiguous {ms_k:.4f} ms")
    ms = min(ms_n, ms_k)
    ms_act = median_ms(gemm_swiglu) if swiglu else None
    return rows, ms, ms_act


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ours", help="results file of grouped_gemm_test --results")
    parser.add_argument("--scan", action="store_true",
                        help="the problems of grouped_gemm_test --scan (K scan, mixtral)")
    args = parser.parse_args()
    gen = torch.Generator(device="cuda")
    gen.manual_seed(1234)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")

    ours = {}
    if args.ours:
        with open(args.ours) as f:
            for line in f:
                name, ms, tflops = line.split()
                ours[name] = (float(ms), float(tflops))

    if args.scan:
        scan(ours, gen)
        return

    # Skewed split like the test program's (exponential weights), torch's own draw.
    w = torch.distributions.Exponential(1.0).sample((64,))
    skew = (w / w.sum() * 32768).floor().long()
    skew[0] += 32768 - int(skew.sum())
    skew = skew.tolist()

    problems = [
        ("paper64_gemm0_swiglu", [512] * 64, 2048, 4096, True),
        ("paper64_gemm1_identity", [512] * 64, 2048, 2048, False),
        ("skewed64_gemm0_swiglu", skew, 2048, 4096, True),
        ("skewed64_gemm1_identity", skew, 2048, 2048, False),
    ]
    print(f"{'problem':28s} {'torch ms':>9s} {'torch TF/s':>10s} {'+act ms':>8s} "
          f"{'ours ms':>8s} {'ours TF/s':>9s} {'ours/torch':>10s}")
    for name, counts, k, n, swiglu in problems:
        rows, ms, ms_act = grouped(counts, k, n, swiglu, gen)
        tflops = 2 * rows * k * n / (ms * 1e-3) / 1e12
        o = ours.get(name)
        ratio = f"{o[1] / tflops:10.3f}" if o else f"{'-':>10s}"
        ostr = f"{o[0]:8.4f} {o[1]:9.1f}" if o else f"{'-':>8s} {'-':>9s}"
        act = f"{ms_act:8.4f}" if ms_act else f"{'-':>8s}"
        print(f"{name:28s} {ms:9.4f} {tflops:10.1f} {act} {ostr} {ratio}")

    backward(ours, gen)

    # Dense ceiling: one bf16 matmul with the FLOPs of GEMM0.
    a = torch.randn(32768, 2048, device="cuda", dtype=torch.bfloat16, generator=gen)
    b = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16, generator=gen)
    ms = median_ms(lambda: a @ b)
    print(f"dense bf16 matmul 32768x2048x4096: {ms:.4f} ms, "
          f"{2 * 32768 * 2048 * 4096 / (ms * 1e-3) / 1e12:.1f} TFLOP/s")


def scan(ours, gen):
    """torch._grouped_mm and a dense matmul of the same FLOPs on grouped_gemm_test --scan's
    problems (GEMM only: the SwiGLU of ours is not added to torch's time here)."""
    problems = [(f"scan_gemm1_k{k}", [512] * 64, k, 2048) for k in (1024, 2048, 4096, 8192)]
    problems += [("scan_gemm0_swiglu_k8192", [512] * 64, 8192, 4096),
                 ("mixtral_gemm0_swiglu", [2048] * 8, 4096, 2 * 14336),
                 ("mixtral_gemm1_identity", [2048] * 8, 14336, 4096)]
    print(f"{'problem':28s} {'torch ms':>9s} {'torch TF/s':>10s} {'dense TF/s':>10s} "
          f"{'ours ms':>8s} {'ours TF/s':>9s} {'ours/torch':>10s}")
    for name, counts, k, n in problems:
        rows, ms, _ = grouped(counts, k, n, False, gen)
        flops = 2 * rows * k * n
        tflops = flops / (ms * 1e-3) / 1e12
        a = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16, generator=gen)
        dense = flops / (median_ms(lambda: a @ b) * 1e-3) / 1e12
        del a, b
        o = ours.get(name)
        ratio = f"{o[1] / tflops:10.3f}" if o else f"{'-':>10s}"
        ostr = f"{o[0]:8.4f} {o[1]:9.1f}" if o else f"{'-':>8s} {'-':>9s}"
        print(f"{name:28s} {ms:9.4f} {tflops:10.1f} {dense:10.1f} {ostr} {ratio}")


def backward(ours, gen):
    counts = [512] * 64
    rows = sum(counts)
    offs = torch.cumsum(torch.tensor(counts, device="cuda", dtype=torch.int32), 0, dtype=torch.int32)
    bf16 = torch.bfloat16
    print(f"{'backward problem':28s} {'torch ms':>9s} {'torch TF/s':>10s} {'ours ms':>8s} "
          f"{'ours TF/s':>9s} {'ours/torch':>10s}  torch call")

    def row(name, flops, ms, how):
        tflops = flops / (ms * 1e-3) / 1e12
        o = ours.get(name)
        ratio = f"{o[1] / tflops:10.3f}" if o else f"{'-':>10s}"
        ostr = f"{o[0]:8.4f} {o[1]:9.1f}" if o else f"{'-':>8s} {'-':>9s}"
        print(f"{name:28s} {ms:9.4f} {tflops:10.1f} {ostr} {ratio}  {how}")

    # dgrad: dX = dY · Wᵀ with W [E, n, k] (B read K-major through the transposed view).
    for name, k, n in [("paper64_dgrad_gemm1", 2048, 2048), ("paper64_dgrad_gemm0", 4096, 2048)]:
        dy = torch.randn(rows, k, device="cuda", dtype=bf16, generator=gen)
        w = torch.randn(64, n, k, device="cuda", dtype=bf16, generator=gen) / k**0.5
        wt = w.transpose(-2, -1)
        ms = median_ms(lambda: torch._grouped_mm(dy, wt, offs=offs))
        row(name, 2 * rows * k * n, ms, "_grouped_mm(dy, w.transpose(-2, -1), offs)")
        del dy, w, wt

    # wgrad: C_g = A_gᵀ · B_g, ragged K (offs along the rows).
    for name, m, n in [("paper64_wgrad_dw2", 2048, 2048), ("paper64_wgrad_dw1", 2048, 4096)]:
        a = torch.randn(rows, m, device="cuda", dtype=bf16, generator=gen)
        b = torch.randn(rows, n, device="cuda", dtype=bf16, generator=gen)
        flops = 2 * rows * m * n
        a_op = a.t()
        try:
            out = torch._grouped_mm(a_op, b, offs=offs)
            assert out.shape == (64, m, n), out.shape
            ms = median_ms(lambda: torch._grouped_mm(a_op, b, offs=offs))
            row(name, flops, ms, "_grouped_mm(a.t(), b, offs)")
        except Exception as e:  # noqa: BLE001 - report what torch accepts
            print(f"  {name}: torch._grouped_mm(a.t(), b) rejected: {str(e).splitlines()[0]}")
            a_op = a.t().contiguous()
            ms = median_ms(lambda: torch._grouped_mm(a_op, b, offs=offs))
            ms_copy = median_ms(lambda: a.t().contiguous())
            row(name, flops, ms, f"_grouped_mm(a.t().contiguous(), b) (+{ms_copy:.4f} ms copy)")
        # Spot check of torch's ragged-K semantics on one group against a plain matmul.
        out = torch._grouped_mm(a_op, b, offs=offs)
        ref = a[512:1024].t().float() @ b[512:1024].float()
        err = ((out[1].float() - ref).norm() / ref.norm()).item()
        print(f"  {name}: torch ragged-K group 1 vs matmul rel err {err:.2e}")
        del a, b, out


if __name__ == "__main__":
    main()
