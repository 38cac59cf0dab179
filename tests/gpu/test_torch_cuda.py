# tests/gpu/test_torch_cuda.py — the torch ops on CUDA tensors (the cuda backend through the
# op library) against the CPU op in fp64 on the same (rounded) inputs and the same routing;
# autograd; CUDA-graph capture of forward + backward. Needs a GPU (scripts/gpu_all.sh).
import pytest
import torch

import fusedmoe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def make_layer(gate="softmax", ffn="swiglu", experts=8, top_k=2, dtype=torch.bfloat16, **kw):
    torch.manual_seed(0)
    layer = fusedmoe.MoE(experts, 128, 96, top_k=top_k, gate=gate, ffn=ffn, dtype=torch.float64, **kw)
    return layer


def run_op(layer, x, dtype, device, forced=None):
    params = {n: p.detach().to(device, dtype).requires_grad_(True) for n, p in layer.named_parameters()}
    g, ex = layer.gate, layer.experts
    get = lambda t, name: None if t is None else params[name]
    x = x.detach().to(device, dtype).requires_grad_(True)
    cfg = layer.config_for(dtype).to_string()
    args = (x, params["gate.weight"], get(g.bias, "gate.bias"), get(g.noise_weight, "gate.noise_weight"), None,
            params["experts.w1"], get(ex.b1, "experts.b1"), params["experts.w2"], get(ex.b2, "experts.b2"),
            None, None, None, None, forced, cfg, [], False, 0, 0, "auto")
    y, idx, w, kept, counts, kept_counts, aux, z = torch.ops.fusedmoe.moe_forward(*args)[:8]
    loss = (y.double() * torch.linspace(-1, 1, y.numel(), device=device, dtype=torch.float64).view_as(y)).sum()
    loss = loss + 0.1 * aux.double() + 0.01 * z.double()
    loss.backward()
    grads = {n: p.grad.double().cpu() for n, p in params.items()}
    return y.double().cpu(), idx.cpu(), x.grad.double().cpu(), grads


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# fp32 runs the expert GEMMs in TF32 by default: ~1e-3 per GEMM, and dx chains four of them.
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-2), (torch.bfloat16, 4e-2), (torch.float16, 4e-2)])
@pytest.mark.parametrize("gate,ffn", [("softmax", "swiglu"), ("sigmoid", "gelu"), ("gshard", "geglu"), ("switch", "relu")])
def test_cuda_op_matches_cpu_fp64(dtype, tol, gate, ffn):
    layer = make_layer(gate=gate, ffn=ffn, top_k=1 if gate == "switch" else 2, gate_bias=True, expert_bias=True)
    x = torch.randn(200, 128, dtype=torch.float64)
    # Round the inputs and parameters to the GPU dtype so both sides see the same values.
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(p.to(dtype).double())
    x = x.to(dtype).double()
    y_gpu, idx_gpu, dx_gpu, g_gpu = run_op(layer, x, dtype, "cuda")
    y_ref, _, dx_ref, g_ref = run_op(layer, x, torch.float64, "cpu", forced=idx_gpu.to(torch.int32))
    assert torch.isfinite(y_gpu).all()
    assert rel(y_gpu, y_ref) < tol
    assert rel(dx_gpu, dx_ref) < tol
    for name in g_ref:
        assert rel(g_gpu[name], g_ref[name]) < tol, name


def test_module_on_cuda_and_graph_capture():
    torch.manual_seed(1)
    layer = fusedmoe.MoE(16, 256, 128, top_k=2, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    static_x = x.detach().clone().requires_grad_(True)

    def step():
        y = layer(static_x)
        (y.float().square().mean() + 0.01 * layer.aux_loss.float()).backward()
        return y

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    for p in layer.parameters():
        p.grad = None
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = step()
    eager = layer(x).detach()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y_static, eager), "graph replay differs from eager"
    assert torch.isfinite(static_x.grad.float()).all()


@pytest.mark.parametrize("gate,ffn,dtype,capacity", [("softmax", "swiglu", torch.bfloat16, 0.0),
                                                     ("noisy", "gelu", torch.float16, 1.25),
                                                     ("switch", "relu", torch.float32, 0.0)])
def test_saved_state_size_and_gradients(gate, ffn, dtype, capacity):
    """moe_forward(save_for_backward=True) on CUDA returns the state its backward reads: its size
    is what the fake kernel predicts (torch.compile relies on it), and the gradients through it
    equal the gradients of a backward that recomputes the forward, bit for bit."""
    from fusedmoe import _ops

    layer = make_layer(gate=gate, ffn=ffn, top_k=1 if gate == "switch" else 2, gate_bias=True,
                       capacity_factor=capacity)
    cfg = layer.config_for(dtype)
    x0 = torch.randn(301, 128, device="cuda", dtype=dtype)
    results = []
    for save in (False, True):
        params = {n: t.detach().to("cuda", dtype).requires_grad_(True) for n, t in layer.named_parameters()}
        g = layer.gate
        x = x0.clone().requires_grad_(True)
        out = torch.ops.fusedmoe.moe_forward(
            x, params["gate.weight"], params["gate.bias"],
            None if g.noise_weight is None else params["gate.noise_weight"], None,
            params["experts.w1"], None, params["experts.w2"], None, None, None, None, None, None,
            cfg.to_string(), [], True, 7, 0, "auto", save_for_backward=save)
        saved = out[8]
        if save:
            assert saved.dtype == torch.uint8
            assert saved.numel() == _ops.saved_bytes(cfg, x.shape[0], x.element_size()) > 0
        else:
            assert saved.numel() == 0
        y = out[0]
        (y.float() * torch.linspace(-1, 1, y.numel(), device="cuda").view_as(y)).sum().add(out[6].float()).backward()
        results.append([x.grad] + [p.grad for p in params.values()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_fused_op_captured_on_torch_graph_stream():
    """The fused op warmed up on one stream, then captured by torch.cuda.graph (which captures
    on a stream of its own, whose first forward therefore allocates the kernel's workspace under
    capture): replays equal the eager output."""
    layer = make_layer(experts=8, top_k=2)
    cfg = layer.config_for(torch.bfloat16).to_string()
    p = {n: t.detach().to("cuda", torch.bfloat16) for n, t in layer.named_parameters()}
    static_x = torch.randn(333, 128, device="cuda", dtype=torch.bfloat16)

    def forward(x):
        return torch.ops.fusedmoe.moe_forward(x, p["gate.weight"], None, None, None, p["experts.w1"], None,
                                              p["experts.w2"], None, None, None, None, None, None, cfg, [], False,
                                              0, 0, "fused")[0]

    side = torch.cuda.Stream()

    def warm_up_and_capture(x):
        """An eager forward on a side stream, then a capture with torch.cuda.graph."""
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            eager = forward(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = forward(x)
        return eager, graph, y

    eager, graph, y_static = warm_up_and_capture(static_x)
    for _ in range(3):
        y_static.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y_static, eager), "graph replay differs from eager"
    static_x.copy_(torch.randn_like(static_x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y_static, forward(static_x))
    # A larger shape captured later on the same stream grows its workspace under capture; the
    # first graph keeps its (retired, still allocated) buffers.
    big_x = torch.randn(4000, 128, device="cuda", dtype=torch.bfloat16)
    big_eager, big_graph, y_big = warm_up_and_capture(big_x)
    for g, y, expected in ((big_graph, y_big, big_eager), (graph, y_static, forward(static_x))):
        y.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, expected)


def test_fused_op_through_nccl_transport_of_a_one_rank_group(tmp_path):
    """init_fused_transport over a one-rank NCCL process group: the fused op's heaps move into an
    NCCL symmetric window; the output equals the same op on the local transport."""
    import torch.distributed as dist

    from fusedmoe import distributed as fd

    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/store", world_size=1, rank=0,
                            device_id=torch.device("cuda", torch.cuda.current_device()))
    try:
        layer = make_layer(experts=8, top_k=2)
        x = torch.randn(333, 128, dtype=torch.float64)
        cfg = layer.config_for(torch.bfloat16).to_string()
        p = {n: t.detach().to("cuda", torch.bfloat16) for n, t in layer.named_parameters()}
        args = (x.to("cuda", torch.bfloat16), p["gate.weight"], None, None, None, p["experts.w1"], None,
                p["experts.w2"], None, None, None, None, None, None, cfg, [], False, 0, 0, "fused")
        y_local, idx_local = torch.ops.fusedmoe.moe_forward(*args)[:2]
        fd.init_fused_transport()
        assert fd.fused_transport() == {"nccl": 1, "world": 1, "rank": 0}
        for _ in range(3):
            y, idx = torch.ops.fusedmoe.moe_forward(*args)[:2]
            torch.cuda.synchronize()
            assert torch.equal(idx, idx_local)
            assert torch.equal(y, y_local)
        fd.close_fused_transport()
        assert fd.fused_transport()["nccl"] == 0
    finally:
        fd.close_fused_transport()
        dist.destroy_process_group()


@pytest.mark.parametrize("shared", [0, 2])
def test_module_backend_fused_equals_modular(shared):
    # fusedmoe.MoE(backend="fused") on CUDA: inference runs the persistent kernel (shared experts
    # inside it); a training forward runs the modular path, which keeps the state its backward
    # reuses. Outputs (both) and gradients equal the modular module's under the same routing (the
    # modular module's, forced into the fused one: the two router GEMMs may round a near tie
    # differently).
    results, forced = [], None
    for backend in ("cuda", "fused"):
        torch.manual_seed(0)
        layer = fusedmoe.MoE(16, 256, 128, top_k=2, gate="softmax", ffn="swiglu", num_shared_experts=shared,
                             dtype=torch.bfloat16, device="cuda", backend=backend)
        x = torch.randn(300, 256, device="cuda", dtype=torch.bfloat16, generator=torch.Generator(
            device="cuda").manual_seed(1)).requires_grad_(True)
        with torch.no_grad():
            y_inference = layer(x, forced_topk_idx=forced).float()
        y = layer(x, forced_topk_idx=forced)
        y.float().square().sum().backward()
        forced = layer.last_topk_idx.to(torch.int32)
        results.append((y_inference, y.detach().float(), x.grad.float(), layer.experts.w1.grad.float(),
                        layer.last_topk_idx))
    (yi0, y0, dx0, dw0, idx0), (yi1, y1, dx1, dw1, idx1) = results
    assert torch.equal(idx0.long(), idx1.long())
    assert rel(yi1, yi0) < 2e-2 and rel(y1, y0) < 2e-2 and rel(dx1, dx0) < 2e-2 and rel(dw1, dw0) < 2e-2
