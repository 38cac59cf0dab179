# tests/python/test_modules.py — the nn modules of fusedmoe: MoE (op path vs reference path,
# shapes, gradients, load statistics, state_dict), gates, Experts, balance losses, the config
# string, fake kernels (meta tensors, torch.compile with aot_eager) and process groups of one
# rank (single-process gloo).
# Run: see conftest.py.
import math

import pytest
import torch

import fusedmoe
from fusedmoe import reference
from fusedmoe.config import MoeConfig
from moe_testing import GATES, rel_err

FP64_TOL = 1e-12


def _pair(**kwargs):
    """An op-backed MoE and a reference-backed copy with the same parameters (fp64)."""
    layer = fusedmoe.MoE(dtype=torch.float64, **kwargs)
    twin = fusedmoe.MoE(dtype=torch.float64, backend="reference", **kwargs)
    twin.load_state_dict(layer.state_dict())
    return layer, twin


@pytest.mark.parametrize("gate", GATES)
def test_module_matches_reference_module(gate):
    kw = dict(num_experts=6, d_model=12, d_ffn=10, gate=gate, ffn="geglu", num_shared_experts=1,
              expert_bias=True, gate_bias=True, capacity_factor=1.5)
    layer, twin = _pair(**kw)
    if gate == "noisy":
        for m in (layer, twin):
            torch.nn.init.constant_(m.gate.noise_weight, 0.05)
    x = torch.randn(3, 7, 12, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(3, 7, 12, dtype=torch.float64)
    grads = []
    for m in (layer, twin):
        m.train()
        torch.manual_seed(42)  # same noise seed in both
        y = m(x)
        assert y.shape == x.shape
        loss = (y * dy).sum() + 0.1 * m.aux_loss + 0.01 * m.z_loss
        grads.append(torch.autograd.grad(loss, [x] + list(m.parameters())))
        m.eval()
    assert torch.equal(layer.last_topk_idx, twin.last_topk_idx)
    for g_op, g_ref in zip(*grads):
        assert rel_err(g_op, g_ref) < 1e-10
    x2 = torch.randn(9, 12, dtype=torch.float64)
    assert rel_err(layer(x2), twin(x2)) < FP64_TOL


def test_module_handles_empty_and_odd_shapes():
    layer = fusedmoe.MoE(4, 8, 16, top_k=2, dtype=torch.float64)
    for shape in [(0, 8), (2, 0, 8), (1, 8), (8,), (5, 3, 1, 8)]:
        x = torch.randn(*shape, dtype=torch.float64)
        y = layer(x)
        assert y.shape == x.shape and torch.isfinite(y).all()
    x = torch.randn(6, 16, dtype=torch.float64)[:, ::2]  # non-contiguous
    assert rel_err(layer(x), layer(x.contiguous())) == 0.0


def test_module_load_stats_accumulate_and_reset():
    layer = fusedmoe.MoE(5, 8, 8, top_k=2, capacity_factor=0.5, dtype=torch.float64)
    total_routed = torch.zeros(5, dtype=torch.int64)
    for T in (10, 7, 12):
        layer(torch.randn(T, 8, dtype=torch.float64))
        assert int(layer.last_expert_counts.sum()) == 2 * T
        total_routed += layer.last_expert_counts
    stats = layer.load_stats()
    assert stats["tokens"] == 29 and stats["calls"] == 3
    assert torch.equal(stats["routed"], total_routed)
    assert (stats["kept"] <= stats["routed"]).all()
    assert 0.0 < stats["dropped_fraction"] < 1.0
    assert abs(float(stats["load"].sum()) - 1.0) < 1e-12
    layer.reset_load_stats()
    stats = layer.load_stats()
    assert stats["tokens"] == 0 and int(stats["routed"].sum()) == 0 and stats["dropped_fraction"] == 0.0


def test_module_state_dict_has_parameters_not_statistics():
    layer = fusedmoe.MoE(4, 8, 8, gate="sigmoid", num_shared_experts=2, expert_bias=True, gate_bias=True)
    keys = set(layer.state_dict())
    assert {"gate.weight", "gate.bias", "gate.selection_bias", "experts.w1", "experts.b1", "experts.w2",
            "experts.b2", "shared_experts.w1", "shared_experts.w2"} <= keys
    assert not any("total" in key for key in keys)


def test_module_accepts_gate_module():
    gate = fusedmoe.NoisyTopKGate(8, 6, 3, bias=True, dtype=torch.float64)
    layer = fusedmoe.MoE(6, 8, 8, gate=gate, dtype=torch.float64)
    assert layer.gate is gate and layer.top_k == 3
    config = layer.config_for(torch.float64)
    assert config.gate == "noisy" and config.top_k == 3 and config.gate_bias
    layer(torch.randn(4, 8, dtype=torch.float64))
    assert layer.last_topk_idx.shape == (4, 3)


@pytest.mark.parametrize("gate", GATES)
def test_gate_modules(gate):
    g = fusedmoe.make_gate(gate, 10, 6, bias=True, dtype=torch.float64)
    assert isinstance(g, fusedmoe.BaseGate) and g.kind == gate
    assert g.weight.shape == (6, 10) and g.bias.shape == (6,)
    assert g.top_k == {"switch": 1}.get(gate, 2)
    assert (g.noise_weight is not None) == (gate == "noisy")
    assert (g.selection_bias is not None) == (gate == "sigmoid")
    bound = 1 / math.sqrt(10)
    assert float(g.weight.detach().abs().max()) <= bound
    # The gate alone routes like the layer does.
    layer = fusedmoe.MoE(6, 10, 4, gate=g, dtype=torch.float64).eval()
    g.eval()
    x = torch.randn(15, 10, dtype=torch.float64)
    idx, weight = g(x)
    layer(x)
    assert torch.equal(idx.to(torch.int32), layer.last_topk_idx)
    assert weight.shape == (15, g.top_k)


def test_sigmoid_gate_selection_bias_update():
    g = fusedmoe.SigmoidTopKGate(8, 4, 2)
    g.update_selection_bias(torch.tensor([10, 0, 5, 5]), rate=0.5)
    assert g.selection_bias.tolist() == [-0.5, 0.5, 0.0, 0.0]
    with pytest.raises(ValueError, match="expert_counts"):
        g.update_selection_bias(torch.tensor([1, 2]))
    model = torch.nn.Sequential(fusedmoe.MoE(4, 8, 8, gate="sigmoid"), fusedmoe.MoE(4, 8, 8))
    assert fusedmoe.update_selection_biases(model) == 0  # nothing ran yet
    model(torch.randn(6, 8))
    assert fusedmoe.update_selection_biases(model, rate=0.1) == 1


def test_experts_module():
    ex = fusedmoe.Experts(3, 8, 5, "swiglu", bias=True, dtype=torch.float64)
    assert ex.w1.shape == (3, 8, 10) and ex.b1.shape == (3, 10)
    assert ex.w2.shape == (3, 5, 8) and ex.b2.shape == (3, 8)
    assert float(ex.w1.detach().abs().max()) <= 1 / math.sqrt(8)
    assert float(ex.w2.detach().abs().max()) <= 1 / math.sqrt(5)
    x = torch.randn(4, 8, dtype=torch.float64)
    h = x @ ex.w1[1] + ex.b1[1]
    expected = (torch.nn.functional.silu(h[:, :5]) * h[:, 5:]) @ ex.w2[1] + ex.b2[1]
    assert rel_err(ex(x, 1), expected) < FP64_TOL
    with pytest.raises(ValueError, match="expert_idx"):
        ex(x, 3)
    plain = fusedmoe.Experts(2, 8, 5, "relu")
    assert plain.w1.shape == (2, 8, 5) and plain.b1 is None


def test_balance_loss_sums_over_layers():
    model = torch.nn.ModuleList([fusedmoe.MoE(4, 8, 8, dtype=torch.float64),
                                 fusedmoe.MoE(4, 8, 8, gate="switch", dtype=torch.float64)])
    assert float(fusedmoe.balance_loss(model)) == 0.0
    x = torch.randn(10, 8, dtype=torch.float64)
    for layer in model:
        layer(x)
    a, b = model[0], model[1]
    expected = 0.01 * (a.aux_loss + b.aux_loss) + 0.001 * (a.z_loss + b.z_loss)
    loss = fusedmoe.balance_loss(model, aux_coef=0.01, z_coef=0.001)
    assert rel_err(loss, expected) < FP64_TOL
    loss.backward()
    for layer in model:
        assert float(layer.gate.weight.grad.norm()) > 0
        # The balance losses depend on the router only.
        assert float(layer.experts.w1.grad.abs().max()) == 0.0
    assert len(fusedmoe.moe_modules(model)) == 2


def test_aux_loss_is_one_for_uniform_routing():
    # Zero router weights: p = 1/E everywhere, and forced routing spreads tokens evenly, so
    # aux = E · Σ (1/E)(1/E) · E ... = 1, and z = log(E)².
    layer = fusedmoe.MoE(4, 8, 8, top_k=1, dtype=torch.float64)
    torch.nn.init.zeros_(layer.gate.weight)
    forced = torch.arange(8).remainder(4).view(8, 1)
    layer(torch.randn(8, 8, dtype=torch.float64), forced_topk_idx=forced)
    assert abs(layer.aux_loss.item() - 1.0) < 1e-12
    assert abs(layer.z_loss.item() - math.log(4) ** 2) < 1e-12


def test_config_string_round_trip():
    config = MoeConfig(hidden_size=64, ffn_size=96, num_experts=8, top_k=2, ffn="geglu", gate="noisy",
                       renormalize=False, capacity_factor=1.1, num_shared_experts=2, shared_ffn_size=48,
                       expert_bias=True, gate_bias=True, jitter_eps=0.1 + 0.2, dtype="fp64",
                       fp32_math="exact", world_size=4, rank=1, expert_placement=[0, 1, 2, 3, 3, 2, 1, 0])
    assert MoeConfig.from_string(config.to_string()) == config
    assert MoeConfig.from_string("H=8; I=4; E=2; k=1; gate=deepseek; ffn=relu_mlp").gate == "sigmoid"
    with pytest.raises(ValueError, match="colour"):
        MoeConfig.from_string("colour=blue")
    with pytest.raises(ValueError, match="top_k"):
        config.replace(top_k=9).validate()


def test_reference_capacity_respects_per_rank_groups():
    config = MoeConfig(hidden_size=4, ffn_size=4, num_experts=2, top_k=1, capacity_factor=1.0, world_size=2)
    routing = reference.Routing(logits=None, probs=None, lse=None, selected=None,
                                topk_idx=torch.zeros(6, 1, dtype=torch.int64), topk_weight=None)
    reference.apply_capacity(routing, config, [4, 2])
    # C = ceil(T_r · k / E): 2 for rank 0 (4 tokens), 1 for rank 1 (2 tokens).
    assert routing.kept.view(-1).tolist() == [True, True, False, False, True, False]


def test_meta_tensors_use_the_fake_kernel():
    layer = fusedmoe.MoE(6, 8, 16, top_k=2, num_shared_experts=1, device="meta")
    y = layer(torch.empty(5, 3, 8, device="meta"))
    assert y.shape == (5, 3, 8) and y.device.type == "meta"
    assert layer.last_topk_idx.shape == (15, 2) and layer.last_topk_idx.dtype == torch.int32
    assert layer.aux_loss.shape == () and layer.last_expert_counts.shape == (6,)


def test_torch_compile_aot_eager():
    layer = fusedmoe.MoE(4, 8, 16, top_k=2, dtype=torch.float64).eval()
    x = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)

    def step(inp):
        return layer(inp).square().sum() + layer.aux_loss

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss_c = compiled(x)
    (gx_c,) = torch.autograd.grad(loss_c, x)
    loss_e = step(x)
    (gx_e,) = torch.autograd.grad(loss_e, x)
    assert rel_err(loss_c, loss_e) < FP64_TOL and rel_err(gx_c, gx_e) < FP64_TOL


def test_single_rank_gloo_group():
    import torch.distributed as dist
    if dist.is_initialized():
        pytest.fail("a default process group is already initialised")
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        layer = fusedmoe.MoE(4, 8, 8, group=dist.group.WORLD, dtype=torch.float64)
        sub = dist.new_group([0])
        fusedmoe.MoE(4, 8, 8, group=sub)
        assert layer(torch.randn(3, 8, dtype=torch.float64)).shape == (3, 8)
    finally:
        dist.destroy_process_group()
