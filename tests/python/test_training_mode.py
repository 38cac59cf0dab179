# tests/python/test_training_mode.py — training-mode routing (noisy gate, Switch jitter, GShard
# random routing): determinism in the seed, dependence on seed and token offset, the op against
# the reference (which ports the counter-based generator of noise.hpp), the naive backend against
# the CPU backend, and torch.manual_seed reproducibility of fusedmoe.MoE.
# Run: see conftest.py.
import pytest
import torch

import fusedmoe
from moe_testing import (GRAD_INPUTS, STOCHASTIC_GATES, assert_forward_close, make_case,
                         rel_err)

FP64_TOL = 1e-12


@pytest.mark.parametrize("gate", STOCHASTIC_GATES)
def test_same_seed_same_output(gate):
    case = make_case(gate, "swiglu", T=40, noise_scale=3.0, jitter_eps=0.3)
    a, b = case.op(training=True, seed=17), case.op(training=True, seed=17)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_different_seed_changes_noisy_routing():
    case = make_case("noisy", "relu", T=64, E=8, noise_scale=4.0)
    a, b = case.op(training=True, seed=1), case.op(training=True, seed=2)
    assert not torch.equal(a["topk_idx"], b["topk_idx"]), "noise did not change any routing"
    evaluation = case.op(training=False, seed=1)
    assert torch.equal(evaluation["topk_idx"], case.op(training=False, seed=2)["topk_idx"]), \
        "eval mode must not depend on the seed"


def test_different_seed_changes_gshard_second_choice():
    case = make_case("gshard", "gelu", T=200, E=4)
    a, b = case.op(training=True, seed=3), case.op(training=True, seed=4)
    dropped_a, dropped_b = a["topk_idx"][:, 1] < 0, b["topk_idx"][:, 1] < 0
    assert dropped_a.any() and not dropped_a.all()
    assert not torch.equal(dropped_a, dropped_b)
    assert (a["topk_weight"][dropped_a, 1] == 0).all()
    assert not case.op(training=False)["kept"].eq(False).any(), "eval mode drops nothing"


def test_switch_jitter_changes_logits_only_in_training():
    case = make_case("switch", "relu", T=50, E=4, jitter_eps=0.5)
    train, evaluation = case.op(training=True, seed=8), case.op(training=False, seed=8)
    assert not torch.equal(train["z_loss"], evaluation["z_loss"])
    no_jitter = case.op(training=True, seed=8, config=case.config.replace(jitter_eps=0.0))
    for name in evaluation:
        assert torch.equal(no_jitter[name], evaluation[name]), name


@pytest.mark.parametrize("capacity_factor", [0.0, 1.0])
@pytest.mark.parametrize("gate", STOCHASTIC_GATES)
def test_training_forward_matches_reference(gate, capacity_factor):
    case = make_case(gate, "geglu", T=45, noise_scale=3.0, jitter_eps=0.2, gate_bias=True,
                     capacity_factor=capacity_factor)
    out = case.op(training=True, seed=2024, token_offset=1000)
    ref = case.ref(training=True, seed=2024, token_offset=1000)
    assert_forward_close(out, ref, FP64_TOL)


@pytest.mark.parametrize("gate", STOCHASTIC_GATES)
def test_naive_backend_matches_cpu_in_training(gate):
    case = make_case(gate, "swiglu", T=33, noise_scale=3.0, jitter_eps=0.2, S=1, expert_bias=True,
                     capacity_factor=1.0)
    kw = {"training": True, "seed": 77, "token_offset": 5}
    assert_forward_close(case.op(backend="naive", **kw), case.op(backend="cpu", **kw), FP64_TOL)
    x = case.tensors["x"]
    dy = torch.randn_like(x)
    d_aux, d_z = torch.tensor(0.3, dtype=x.dtype), torch.tensor(0.2, dtype=x.dtype)
    grads = {}
    for backend in ("naive", "cpu"):
        grads[backend] = torch.ops.fusedmoe.moe_backward(
            *case.args(**kw), backend, dy, d_aux, d_z)
    for name, g_naive, g_cpu in zip(GRAD_INPUTS, grads["naive"], grads["cpu"]):
        if g_cpu.numel():
            assert rel_err(g_naive, g_cpu) < 1e-10, name


@pytest.mark.parametrize("gate", ["noisy", "switch"])
def test_noise_is_keyed_by_global_token_index(gate):
    # Routing is per token in dropless mode, so the last 20 tokens called alone with
    # token_offset = 10 see the same noise as inside the whole batch.
    case = make_case(gate, "relu", T=30, noise_scale=3.0, jitter_eps=0.3)
    whole = case.op(training=True, seed=5)
    tail = type(case)(config=case.config, tensors=dict(case.tensors, x=case.tensors["x"][10:].clone()))
    part = tail.op(training=True, seed=5, token_offset=10)
    assert torch.equal(part["topk_idx"], whole["topk_idx"][10:])
    assert rel_err(part["y"], whole["y"][10:]) < FP64_TOL
    shifted = tail.op(training=True, seed=5, token_offset=0)
    assert not torch.equal(shifted["topk_weight"], whole["topk_weight"][10:])


def test_module_noise_reproducible_with_manual_seed():
    torch.manual_seed(0)
    layer = fusedmoe.MoE(8, 16, 24, top_k=2, gate="noisy", dtype=torch.float64)
    with torch.no_grad():
        layer.gate.noise_weight.uniform_(-1.0, 1.0)
    x = torch.randn(64, 16, dtype=torch.float64)
    layer.train()
    torch.manual_seed(123)
    first = layer(x)
    idx_first = layer.last_topk_idx.clone()
    second = layer(x)  # a new seed per training step
    assert not torch.equal(idx_first, layer.last_topk_idx)
    torch.manual_seed(123)
    again = layer(x)
    assert torch.equal(first, again) and torch.equal(idx_first, layer.last_topk_idx)
    layer.eval()
    e1, e2 = layer(x), layer(x)
    assert torch.equal(e1, e2)
    del second


def test_only_stochastic_training_forwards_draw_seeds():
    x = torch.randn(5, 8, dtype=torch.float64)
    state = torch.get_rng_state()
    fusedmoe.MoE(4, 8, 8, gate="gshard", dtype=torch.float64).eval()(x)
    layer = fusedmoe.MoE(4, 8, 8, gate="softmax", dtype=torch.float64).train()
    torch.set_rng_state(state)
    layer(x)  # the softmax gate draws no noise
    assert torch.equal(torch.get_rng_state(), state)
    stochastic = fusedmoe.MoE(4, 8, 8, gate="gshard", dtype=torch.float64)
    state = torch.get_rng_state()
    stochastic.eval()(x)
    assert torch.equal(torch.get_rng_state(), state)
    stochastic.train()(x)
    assert not torch.equal(torch.get_rng_state(), state)
