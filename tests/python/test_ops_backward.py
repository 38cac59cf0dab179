# tests/python/test_ops_backward.py — gradients of torch.ops.fusedmoe.moe_forward (autograd via
# moe_backward): torch.autograd.gradcheck on the op (fp64, small shapes, y + aux + z outputs),
# and the op's gradients against the reference's autograd for every gate, with capacity, shared
# experts, biases and emulated ranks; torch.library.opcheck of the registrations.
# Run: see conftest.py.
import pytest
import torch

from fusedmoe._ops import FORWARD_INPUTS
from moe_testing import GATES, GRAD_INPUTS, make_case, op_and_reference_grads, rel_err

GRAD_TOL = 1e-10


def _gradcheck(case, *, training=False, seed=0, backend="cpu", forced=None):
    """gradcheck of (y, aux_loss, z_loss) w.r.t. every differentiable input of the case."""
    case.requires_grad_()
    names = [n for n, _ in case.grad_tensors()]
    inputs = tuple(t for _, t in case.grad_tensors())
    base = dict(case.tensors)

    def run(*tensors):
        t = dict(base, **dict(zip(names, tensors)))
        args = [t.get(n) for n in FORWARD_INPUTS[:13]]
        out = torch.ops.fusedmoe.moe_forward(*args, forced, case.config.to_string(), [], training,
                                             seed, 0, backend)
        return out[0], out[6], out[7]

    assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, nondet_tol=0.0)


@pytest.mark.parametrize("gate,ffn", [("softmax", "swiglu"), ("sigmoid", "gelu"), ("noisy", "relu"),
                                      ("switch", "geglu"), ("gshard", "swiglu")])
def test_gradcheck_eval(gate, ffn):
    case = make_case(gate, ffn, T=6, H=4, I=3, E=4, gate_bias=True, expert_bias=True)
    _gradcheck(case)


@pytest.mark.parametrize("gate", ["noisy", "switch", "gshard"])
def test_gradcheck_training(gate):
    case = make_case(gate, "gelu", T=6, H=4, I=3, E=4, gate_bias=gate != "noisy", S=1)
    _gradcheck(case, training=True, seed=1234)


def test_gradcheck_capacity_and_shared_experts():
    case = make_case("softmax", "geglu", T=7, H=4, I=3, E=3, k=2, capacity_factor=0.8, S=1, Is=2,
                     expert_bias=True)
    _gradcheck(case)


def test_gradcheck_naive_backend():
    case = make_case("sigmoid", "swiglu", T=5, H=4, I=3, E=4, gate_bias=True)
    _gradcheck(case, backend="naive")


@pytest.mark.parametrize("gate", GATES)
def test_backward_matches_reference_eval(gate):
    case = make_case(gate, "swiglu", T=19, gate_bias=True, expert_bias=True, S=1)
    op, ref = op_and_reference_grads(case)
    for name in op:
        assert rel_err(op[name], ref[name]) < GRAD_TOL, name


@pytest.mark.parametrize("gate", ["noisy", "switch", "gshard"])
def test_backward_matches_reference_training(gate):
    case = make_case(gate, "gelu", T=21, gate_bias=True, noise_scale=3.0)
    op, ref = op_and_reference_grads(case, training=True, seed=99)
    for name in op:
        assert rel_err(op[name], ref[name]) < GRAD_TOL, name


@pytest.mark.parametrize("ffn", ["relu", "geglu"])
def test_backward_with_capacity_and_ranks(ffn):
    case = make_case("softmax", ffn, T=40, E=4, k=2, capacity_factor=0.75, gate_scale=2.0,
                     world_size=4, expert_bias=True)
    op, ref = op_and_reference_grads(case, tokens_per_rank=[13, 7, 0, 20])
    for name in op:
        assert rel_err(op[name], ref[name]) < GRAD_TOL, name


def test_backward_of_losses_only():
    # Only aux and z are used: y's upstream gradient is absent (zeros).
    case = make_case("sigmoid", "relu", gate_bias=True).requires_grad_()
    w = case.tensors["gate_weight"]
    for run in (case.op, case.ref):
        out = run()
        (out["aux_loss"] + 2.0 * out["z_loss"]).backward()
    g_op_ref = w.grad.clone()  # op + reference accumulated
    w.grad = None
    out = case.ref()
    (out["aux_loss"] + 2.0 * out["z_loss"]).backward()
    assert rel_err(g_op_ref - w.grad, w.grad) < GRAD_TOL


def test_absent_inputs_get_no_gradient():
    case = make_case("sigmoid", "swiglu").requires_grad_()
    sel = case.tensors["selection_bias"].requires_grad_(True)
    out = case.op()
    out["y"].sum().backward()
    assert sel.grad is None, "the selection bias steers selection only and gets no gradient"
    for name, t in case.grad_tensors():
        assert t.grad is not None and torch.isfinite(t.grad).all(), name


def test_backward_op_returns_empty_tensors_for_absent_inputs():
    case = make_case("softmax", "relu")
    x = case.tensors["x"]
    grads = torch.ops.fusedmoe.moe_backward(*case.args(), "cpu", torch.randn_like(x),
                                            torch.tensor(0.5, dtype=x.dtype), torch.tensor(0.25, dtype=x.dtype))
    named = dict(zip(GRAD_INPUTS, grads))
    for name in GRAD_INPUTS:
        present = case.tensors.get(name) is not None
        assert (named[name].numel() > 0) == present, name
        if present:
            assert named[name].shape == case.tensors[name].shape and torch.isfinite(named[name]).all()


def test_topk_weight_is_not_differentiable():
    case = make_case("softmax", "relu").requires_grad_()
    out = case.op()
    assert out["y"].requires_grad and out["aux_loss"].requires_grad and out["z_loss"].requires_grad
    assert not out["topk_weight"].requires_grad
    assert not out["topk_idx"].requires_grad and not out["kept"].requires_grad


def test_fp32_backward_close_to_reference():
    case = make_case("softmax", "swiglu", dtype=torch.float32, T=32, H=32, I=16, E=8, expert_bias=True)
    op, ref = op_and_reference_grads(case)
    for name in op:
        assert rel_err(op[name], ref[name]) < 1e-5, name


def test_opcheck():
    case = make_case("noisy", "geglu", T=9, H=8, I=4, E=4, gate_bias=True, S=1).requires_grad_()
    args = case.args(training=True, seed=5) + ("cpu",)
    torch.library.opcheck(torch.ops.fusedmoe.moe_forward.default, args)
    x = case.tensors["x"].detach()
    bargs = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args) + (
        torch.randn_like(x), torch.tensor(0.1, dtype=x.dtype), torch.tensor(0.2, dtype=x.dtype))
    torch.library.opcheck(torch.ops.fusedmoe.moe_backward.default, bargs)
