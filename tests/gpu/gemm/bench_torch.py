"""Times torch._grouped_mm on the paper-64 grouped GEMMs (bf16), the baseline for
src/cuda/gemm/grouped_gemm_sm90.cu. Run it in the same session as build/gemm/grouped_gemm_test
and pass that program's --results file to print the ratios:

    build/gemm/grouped_gemm_test --bench-only --results ours.txt
    python3 tests/gpu/gemm/bench_torch.py --ours ours.txt

Problems (64 experts x 512 rows = 32768 rows, FLOPs = 2 * rows * K * N):
    GEMM0: A [32768, 2048] x B [64, 2048, 4096]   (SwiGLU in the fused kernel; torch: GEMM only)
    GEMM1: A [32768, 2048] x B [64, 2048, 2048]
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

    # Dense ceiling: one bf16 matmul with the FLOPs of GEMM0.
    a = torch.randn(32768, 2048, device="cuda", dtype=torch.bfloat16, generator=gen)
    b = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16, generator=gen)
    ms = median_ms(lambda: a @ b)
    print(f"dense bf16 matmul 32768x2048x4096: {ms:.4f} ms, "
          f"{2 * 32768 * 2048 * 4096 / (ms * 1e-3) / 1e12:.1f} TFLOP/s")


if __name__ == "__main__":
    main()
