#!/usr/bin/env python3
"""scripts/host_trace.py — the host latency one layer call exposes, and where it goes (GPU machine).

For each config and path (fusedmoe modular / fused forward, modular forward+backward, the torch
`_grouped_mm` pipeline): the median time of a call from an idle GPU (as `fusedmoe bench` times
it), of the same call queued behind a GPU sleep (the host enqueues meanwhile: GPU time only),
their difference (the host latency the call exposes) and the call's host time. With --trace,
also one call under torch.profiler (CPU + CUDA activities): the call's host duration, the delay
to its first GPU kernel, the GPU idle time inside its GPU span, and the CUDA runtime/driver
calls by total host time; the chrome traces go to $OUT/host_trace (default ./out/host_trace).

  PYTHONPATH=python FUSEDMOE_OPS_LIBRARY=... python3 scripts/host_trace.py [--trace] [config ...]
"""
from __future__ import annotations

import collections
import json
import os
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from fusedmoe import bench


def analyse(trace_path: str, label: str) -> None:
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    complete = [e for e in events if e.get("ph") == "X"]
    marks = [e for e in complete if e.get("name") == "call" and e.get("cat") == "user_annotation"]
    if not marks:
        print(f"{label}: no 'call' range")
        return
    mark = marks[0]
    t0, t1 = mark["ts"], mark["ts"] + mark["dur"]
    kernels = sorted((e for e in complete if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    runtime = [e for e in complete if e.get("cat") in ("cuda_runtime", "cuda_driver") and t0 <= e["ts"] <= t1]
    if not kernels:
        print(f"{label}: no kernels")
        return
    g0 = kernels[0]["ts"]
    g1 = max(e["ts"] + e["dur"] for e in kernels)
    busy = bench.union_ns([(e["ts"], e["ts"] + e["dur"]) for e in kernels])
    print(f"\n== {label}: host call {mark['dur'] / 1e3:.3f} ms; first kernel {(g0 - t0) / 1e3:.3f} ms after the call "
          f"starts; GPU span {(g1 - g0) / 1e3:.3f} ms, busy {busy / 1e3:.3f} ms, idle {(g1 - g0 - busy) / 1e3:.3f} ms; "
          f"end-to-end {(g1 - t0) / 1e3:.3f} ms; {len(kernels)} GPU ops")
    print("   GPU ops (start offset from the first, duration):")
    for e in kernels[:40]:
        print(f"     {(e['ts'] - g0) / 1e3:8.3f} ms {e['dur']:8.1f} us {e['name'][:90]}")
    per = collections.defaultdict(lambda: [0, 0.0, 0.0])
    for e in runtime:
        p = per[e["name"]]
        p[0] += 1
        p[1] += e["dur"]
        p[2] = max(p[2], e["dur"])
    for name, (n, tot, mx) in sorted(per.items(), key=lambda kv: -kv[1][1])[:12]:
        print(f"   {name:40s} n={n:4d} total {tot:8.1f} us  max {mx:7.1f} us")
    # The first launches: host start offsets and durations, with the GPU start of what they launched.
    corr = {e["args"].get("correlation"): e for e in kernels if "args" in e}
    print("   first host calls (offset from call start, duration, GPU start offset):")
    for e in sorted(runtime, key=lambda e: e["ts"])[:14]:
        k = corr.get(e.get("args", {}).get("correlation"))
        gpu = f"{(k['ts'] - t0) / 1e3:8.3f} ms {k['name'][:60]}" if k else ""
        print(f"     {(e['ts'] - t0) / 1e3:8.3f} ms {e['dur']:7.1f} us {e['name'][:28]:28s} {gpu}")


def exposed_latency(fn, inputs, repeats=15) -> tuple[float, float, float]:
    """Median ms of one call from an idle GPU (as `fusedmoe bench` times it), of the same call
    queued behind a 5 ms GPU sleep (the host enqueues during the sleep: GPU time only), and the
    host time of the call."""
    idle, busy, host = [], [], []
    for i in range(repeats):
        for queued in (False, True):
            bench.clear_grads(inputs)
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if queued:
                torch.cuda._sleep(10_000_000)
            start.record()
            t0 = time.perf_counter()
            fn(*inputs)
            t1 = time.perf_counter()
            end.record()
            end.synchronize()
            (busy if queued else idle).append(start.elapsed_time(end))
            if not queued:
                host.append((t1 - t0) * 1e3)
    return statistics.median(idle), statistics.median(busy), statistics.median(host)


def main() -> None:
    args = sys.argv[1:]
    trace = "--trace" in args
    names = [a for a in args if not a.startswith("--")] or ["paper-64", "mixtral", "decode"]
    out_dir = os.environ.get("OUT", "out") + "/host_trace"
    if trace:
        os.makedirs(out_dir, exist_ok=True)
    print(f"{'config':10s} {'path':16s} {'idle-start ms':>14s} {'queued ms':>10s} {'exposed host ms':>16s} {'host call ms':>13s}")
    for name in names:
        p = bench.Problem(name, *bench.STANDARD_CONFIGS[name])
        paths = [("modular-fwd", bench.fusedmoe_layer, False), ("fused-fwd", bench.fusedmoe_fused, False),
                 ("torch-fwd", bench.torch_grouped_mm_pipeline, False),
                 ("modular-fwdbwd", bench.forward_backward(bench.fusedmoe_layer), True),
                 ("torch-fwdbwd", bench.forward_backward(bench.torch_grouped_mm_pipeline), True)]
        only = os.environ.get("HOST_TRACE_PATHS")
        for label, fn, grad in paths:
            if only and label not in only.split(","):
                continue
            inputs = bench.make_inputs(p, sets=1, requires_grad=grad)[0]
            with torch.enable_grad() if grad else torch.no_grad():
                for _ in range(3):
                    bench.clear_grads(inputs)
                    fn(*inputs)
                torch.cuda.synchronize()
                idle, queued, host = exposed_latency(fn, inputs)
                print(f"{name:10s} {label:16s} {idle:14.3f} {queued:10.3f} {idle - queued:16.3f} {host:13.3f}", flush=True)
                if not trace:
                    del inputs
                    continue
                bench.clear_grads(inputs)
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    with torch.profiler.record_function("call"):
                        fn(*inputs)
                    torch.cuda.synchronize()
            path = f"{out_dir}/{name}-{label}.json"
            prof.export_chrome_trace(path)
            analyse(path, f"{name} {label}")
            del inputs
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
