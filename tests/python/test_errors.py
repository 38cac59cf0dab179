# tests/python/test_errors.py — bad input raises ValueError / TypeError / RuntimeError (or
# expert-parallel groups whose size does not divide the experts) whose message names the argument, both through
# the op and through the fusedmoe.MoE module.
# Run: see conftest.py.
import pytest
import torch

import fusedmoe
from moe_testing import TENSOR_INPUTS, make_case

BAD_INPUT = (ValueError, TypeError, RuntimeError)


def _op_with(case, **changes):
    """Runs the op of `case` with some tensors replaced (others of `changes` go to case.op)."""
    tensors = dict(case.tensors)
    extra = {}
    for name, value in changes.items():
        if name in TENSOR_INPUTS:
            tensors[name] = value
        else:
            extra[name] = value
    return type(case)(config=case.config, tensors=tensors).op(**extra)


@pytest.mark.parametrize("shape", [(23,), (23, 15), (23, 16, 1)])
def test_op_rejects_bad_x_shape(shape):
    case = make_case("softmax", "relu")
    with pytest.raises(BAD_INPUT, match=r"\bx\b"):
        _op_with(case, x=torch.randn(*shape, dtype=torch.float64))


def test_op_rejects_x_dtype_not_matching_config():
    case = make_case("softmax", "relu")
    with pytest.raises(TypeError, match="x: dtype"):
        _op_with(case, x=case.tensors["x"].float())


@pytest.mark.parametrize("name", ["w1", "gate_weight", "w2"])
def test_op_rejects_integer_weights(name):
    case = make_case("softmax", "relu")
    with pytest.raises(TypeError, match=name):
        _op_with(case, **{name: case.tensors[name].to(torch.int32)})


@pytest.mark.parametrize("name,shape", [("w1", (6, 16, 11)), ("w2", (6, 13, 16)),
                                        ("gate_weight", (5, 16))])
def test_op_rejects_wrong_weight_shape(name, shape):
    case = make_case("softmax", "relu")
    with pytest.raises(BAD_INPUT, match=name):
        _op_with(case, **{name: torch.randn(*shape, dtype=torch.float64)})


def test_op_rejects_missing_and_extra_weights():
    noisy = make_case("noisy", "relu")
    without_noise = dict(noisy.tensors)
    without_noise.pop("noise_weight")
    with pytest.raises(BAD_INPUT, match="noise_weight"):
        type(noisy)(config=noisy.config, tensors=without_noise).op()
    softmax = make_case("softmax", "relu")
    with pytest.raises(BAD_INPUT, match="noise_weight"):
        _op_with(softmax, noise_weight=torch.randn(6, 16, dtype=torch.float64))
    with pytest.raises(BAD_INPUT, match="b1"):
        _op_with(softmax, b1=torch.randn(6, 12, dtype=torch.float64))


def test_op_rejects_top_k_larger_than_num_experts():
    case = make_case("softmax", "relu", E=4, k=2)
    with pytest.raises(BAD_INPUT, match="top_k"):
        case.op(config=case.config.replace(top_k=5))


def test_op_rejects_unknown_names_in_config_and_backend():
    case = make_case("softmax", "relu")
    with pytest.raises(BAD_INPUT, match="gate"):
        torch.ops.fusedmoe.moe_forward(*case.args()[:14], case.config.to_string().replace(
            "gate=softmax", "gate=bogus"), [], False, 0, 0, "cpu")
    with pytest.raises(BAD_INPUT, match="backend"):
        case.op(backend="tpu")


def test_op_rejects_bad_forced_routing():
    case = make_case("softmax", "relu", E=4, k=2, T=5)
    with pytest.raises(BAD_INPUT, match="forced_topk_idx"):
        case.op(forced_topk_idx=torch.tensor([[0, 4]] * 5))
    with pytest.raises(BAD_INPUT, match="forced_topk_idx"):
        case.op(forced_topk_idx=torch.tensor([[1, 1]] * 5))
    with pytest.raises(BAD_INPUT, match="forced_topk_idx"):
        case.op(forced_topk_idx=torch.zeros(5, 3, dtype=torch.int32))
    with pytest.raises(TypeError, match="forced_topk_idx"):
        case.op(forced_topk_idx=torch.zeros(5, 2))


def test_op_rejects_bad_tokens_per_rank():
    case = make_case("softmax", "relu", T=10, E=4, world_size=2)
    with pytest.raises(BAD_INPUT, match="tokens_per_rank"):
        case.op(tokens_per_rank=[3, 3])
    with pytest.raises(BAD_INPUT, match="tokens_per_rank"):
        case.op(tokens_per_rank=[10])
    odd = make_case("softmax", "relu", T=9, E=4, world_size=2)
    with pytest.raises(BAD_INPUT, match="tokens_per_rank"):
        odd.op()


def test_op_backward_rejects_bad_dy():
    case = make_case("softmax", "relu")
    x = case.tensors["x"]
    with pytest.raises(BAD_INPUT, match="dy"):
        torch.ops.fusedmoe.moe_backward(*case.args(), "cpu", torch.randn(3, 16, dtype=x.dtype),
                                        torch.tensor(0.0), torch.tensor(0.0))
    with pytest.raises(BAD_INPUT, match="d_aux"):
        torch.ops.fusedmoe.moe_backward(*case.args(), "cpu", torch.randn_like(x),
                                        torch.zeros(2), torch.tensor(0.0))


def test_op_rejects_meta_device_on_cpu_kernel():
    case = make_case("softmax", "relu")
    with pytest.raises(BAD_INPUT, match="w1"):
        _op_with(case, w1=case.tensors["w1"].to("meta"))


# ---------------------------------------------------------------------------- module level --

def test_module_rejects_top_k_larger_than_num_experts():
    with pytest.raises(ValueError, match="top_k"):
        fusedmoe.MoE(4, 8, 8, top_k=5)


@pytest.mark.parametrize("kwargs,argument", [
    ({"gate": "bogus"}, "gate"), ({"ffn": "tanh"}, "ffn"), ({"capacity_factor": -1.0}, "capacity_factor"),
    ({"gate": "switch", "top_k": 2}, "top_k"), ({"gate": "gshard", "top_k": 3}, "top_k"),
    ({"backend": "tpu"}, "backend"), ({"num_shared_experts": -1}, "num_shared_experts"),
    ({"jitter_eps": 1.5, "gate": "switch"}, "jitter_eps"),
])
def test_module_constructor_names_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        fusedmoe.MoE(4, 8, 8, **kwargs)


def test_module_rejects_bad_sizes():
    for args, argument in (((0, 8, 8), "num_experts"), ((4, -1, 8), "d_model"), ((4, 8, 0), "d_ffn")):
        with pytest.raises(ValueError, match=argument):
            fusedmoe.MoE(*args)


def test_module_rejects_mismatched_gate_module():
    gate = fusedmoe.SoftmaxTopKGate(8, 6, 2)
    with pytest.raises(ValueError, match="gate"):
        fusedmoe.MoE(4, 8, 8, gate=gate)
    with pytest.raises(ValueError, match="top_k"):
        fusedmoe.MoE(6, 8, 8, gate=gate, top_k=3)
    with pytest.raises(TypeError, match="gate"):
        fusedmoe.MoE(6, 8, 8, gate=42)


def test_module_rejects_bad_input():
    layer = fusedmoe.MoE(4, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="x"):
        layer(torch.randn(3, 7, dtype=torch.float64))
    with pytest.raises(TypeError, match="x"):
        layer(torch.randn(3, 8, dtype=torch.float32))
    half = fusedmoe.MoE(4, 8, 8, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="x"):  # the CPU ops run fp32 and fp64
        half(torch.randn(3, 8, dtype=torch.bfloat16))


def test_module_expert_parallel_group_needs_divisible_experts():
    class FakeGroup:
        def size(self):
            return 3

    with pytest.raises(ValueError, match="num_experts = 4"):
        fusedmoe.MoE(4, 8, 8, group=FakeGroup())


def test_balance_loss_rejects_negative_coefficients():
    layer = fusedmoe.MoE(4, 8, 8)
    with pytest.raises(ValueError, match="aux_coef"):
        fusedmoe.balance_loss(layer, aux_coef=-1.0)
    with pytest.raises(ValueError, match="z_coef"):
        fusedmoe.balance_loss(layer, z_coef=-1.0)


def test_module_gpu_backends_on_cpu_tensors_say_so():
    # "cuda" and "fused" are module backends; with parameters on the CPU the op says why it
    # cannot run them.
    import fusedmoe
    for backend in ("cuda", "fused"):
        layer = fusedmoe.MoE(4, 16, 8, top_k=2, backend=backend)
        with pytest.raises(BAD_INPUT, match="cannot run the CPU kernel"):
            layer(torch.randn(3, 16))
