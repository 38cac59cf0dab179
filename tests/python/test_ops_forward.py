# tests/python/test_ops_forward.py — torch.ops.fusedmoe.moe_forward against the plain-PyTorch
# reference (fusedmoe.reference) in eval mode: every gate × FFN kind, capacity, shared experts,
# biases, emulated world sizes, and adversarial shapes (T = 0, 1, prime; k = E; one hot expert;
# experts with no tokens). fp64 comparisons at 1e-12 relative error, fp32 at 1e-5.
# Run: see conftest.py.
import math

import pytest
import torch

from moe_testing import (FFNS, GATES, assert_forward_close, assert_routing_equal, make_case,
                         rel_err)

FP64_TOL = 1e-12
FP32_TOL = 1e-5


@pytest.mark.parametrize("ffn", FFNS)
@pytest.mark.parametrize("gate", GATES)
def test_every_gate_and_ffn_matches_reference(gate, ffn):
    case = make_case(gate, ffn, T=29, H=16, I=12, E=6)
    out, ref = case.op(), case.ref()
    assert_forward_close(out, ref, FP64_TOL)
    assert out["kept"].all(), "dropless mode dropped a row"
    k = case.config.top_k
    assert int(out["expert_counts"].sum()) == 29 * k


@pytest.mark.parametrize("gate", ["softmax", "sigmoid", "noisy"])
def test_without_renormalisation(gate):
    case = make_case(gate, "swiglu", renormalize=False, k=3)
    out, ref = case.op(), case.ref()
    assert_forward_close(out, ref, FP64_TOL)
    if gate != "sigmoid":  # softmax weights of k < E experts sum to less than 1
        assert (out["topk_weight"].sum(-1) < 1.0).all()


@pytest.mark.parametrize("gate", ["softmax", "gshard"])
def test_fp32_matches_reference(gate):
    case = make_case(gate, "swiglu", dtype=torch.float32, T=40, H=32, I=24, E=8)
    out, ref = case.op(), case.ref()
    assert out["y"].dtype == torch.float32 and out["topk_weight"].dtype == torch.float32
    assert_forward_close(out, ref, FP32_TOL)


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.25])
@pytest.mark.parametrize("gate", ["softmax", "sigmoid", "gshard"])
def test_capacity_matches_reference(gate, capacity_factor):
    # A peaked router (gate_scale) makes the experts' loads uneven, so capacity really drops.
    case = make_case(gate, "gelu", T=37, E=4, capacity_factor=capacity_factor, gate_scale=2.0)
    out, ref = case.op(), case.ref()
    assert_forward_close(out, ref, FP64_TOL)
    capacity = math.ceil(capacity_factor * 37 * case.config.top_k / 4)
    assert (out["kept_counts"] <= capacity).all()
    assert (out["kept_counts"] == torch.minimum(out["expert_counts"], torch.tensor(capacity))).all()
    if capacity_factor == 0.5:
        assert int(out["kept_counts"].sum()) < int(out["expert_counts"].sum()), "nothing was dropped"


def test_capacity_slots_are_choice_major():
    # Worked by hand: T = 4, k = 2, E = 4, cf = 1 → C = ceil(4·2/4) = 2 rows per expert.
    # First choices in token order take slots first: expert 0 gets t0, t1 (t3 dropped), expert 1
    # gets t2; then second choices: t0→1 (slot 1), t1→2, t2→0 (full), t3→1 (full).
    case = make_case("softmax", "relu", T=4, E=4, k=2, capacity_factor=1.0)
    forced = torch.tensor([[0, 1], [0, 2], [1, 0], [0, 1]], dtype=torch.int32)
    out, ref = case.op(forced_topk_idx=forced), case.ref(forced_topk_idx=forced)
    expected = torch.tensor([[1, 1], [1, 1], [1, 0], [0, 0]], dtype=torch.bool)
    assert torch.equal(out["kept"], expected)
    assert out["expert_counts"].tolist() == [4, 3, 1, 0]
    assert out["kept_counts"].tolist() == [2, 2, 1, 0]
    assert_forward_close(out, ref, FP64_TOL)
    # A dropped (token, j) contributes nothing: token 3 has no routed expert left.
    assert float(out["y"][3].abs().max()) == 0.0


@pytest.mark.parametrize("expert_bias", [False, True])
@pytest.mark.parametrize("ffn", ["relu", "swiglu"])
def test_shared_experts(ffn, expert_bias):
    case = make_case("softmax", ffn, S=2, Is=20, expert_bias=expert_bias)
    assert_forward_close(case.op(), case.ref(), FP64_TOL)


def test_shared_expert_is_added_with_weight_one():
    with_shared = make_case("sigmoid", "geglu", S=1)
    without = dict(with_shared.tensors)
    for name in ("shared_w1", "shared_w2"):
        without.pop(name)
    plain = type(with_shared)(config=with_shared.config.replace(num_shared_experts=0), tensors=without)
    x = with_shared.tensors["x"]
    shared = torch.nn.functional.gelu(x @ with_shared.tensors["shared_w1"][0][:, :12]) \
        * (x @ with_shared.tensors["shared_w1"][0][:, 12:]) @ with_shared.tensors["shared_w2"][0]
    assert rel_err(with_shared.op()["y"] - plain.op()["y"], shared) < FP64_TOL


@pytest.mark.parametrize("gate", GATES)
def test_gate_and_expert_biases(gate):
    case = make_case(gate, "swiglu", gate_bias=True, expert_bias=True)
    out, ref = case.op(), case.ref()
    assert_forward_close(out, ref, FP64_TOL)


def test_sigmoid_selection_bias_steers_selection_only():
    case = make_case("sigmoid", "relu", E=6, k=2)
    bias = torch.zeros(6, dtype=torch.float64)
    bias[5] = 10.0  # every token picks expert 5 ...
    case.tensors["selection_bias"] = bias
    out, ref = case.op(), case.ref()
    assert_forward_close(out, ref, FP64_TOL)
    assert (out["topk_idx"] == 5).any(dim=1).all()
    # ... but its weight is its sigmoid score, renormalised, not moved by the bias.
    logits = case.tensors["x"] @ case.tensors["gate_weight"].t()
    s = torch.sigmoid(logits)
    picked = torch.gather(s, 1, out["topk_idx"].long())
    assert rel_err(out["topk_weight"], picked / picked.sum(-1, keepdim=True)) < FP64_TOL


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_emulated_world_sizes_equal_one_rank_when_dropless(world_size):
    case = make_case("softmax", "swiglu", T=41, E=8, k=2, S=1)
    single = case.op()
    shares = [41 // world_size] * world_size
    shares[0] += 41 - sum(shares)  # uneven split
    shares[-1], shares[0] = shares[0], shares[-1]
    multi = case.op(config=case.config.replace(world_size=world_size), tokens_per_rank=shares)
    assert_routing_equal(multi, single)
    assert rel_err(multi["y"], single["y"]) < FP64_TOL
    ref = case.ref(config=case.config.replace(world_size=world_size), tokens_per_rank=shares)
    assert_forward_close(multi, ref, FP64_TOL)


@pytest.mark.parametrize("world_size", [2, 4])
def test_emulated_world_sizes_capacity_per_rank(world_size):
    # Capacity is decided per source rank (GShard groups), so it differs from one rank's.
    case = make_case("softmax", "relu", T=48, E=4, k=2, capacity_factor=0.75, gate_scale=2.0)
    config = case.config.replace(world_size=world_size)
    shares = [48 // world_size] * world_size
    out = case.op(config=config, tokens_per_rank=shares)
    ref = case.ref(config=config, tokens_per_rank=shares)
    assert_forward_close(out, ref, FP64_TOL)
    per_rank = math.ceil(0.75 * shares[0] * 2 / 4)
    assert (out["kept_counts"] <= world_size * per_rank).all()


def test_even_split_when_tokens_per_rank_is_empty():
    case = make_case("softmax", "gelu", T=32, E=4, capacity_factor=1.0, world_size=4)
    out, ref = case.op(), case.ref()
    assert_forward_close(out, ref, FP64_TOL)
    explicit = case.op(tokens_per_rank=[8, 8, 8, 8])
    assert torch.equal(explicit["kept"], out["kept"])


@pytest.mark.parametrize("backend", ["naive", "auto"])
@pytest.mark.parametrize("gate", GATES)
def test_other_backends_match_cpu_in_eval(gate, backend):
    case = make_case(gate, "geglu", S=1, capacity_factor=1.0, gate_bias=True)
    assert_forward_close(case.op(backend=backend), case.op(backend="cpu"), FP64_TOL)


# ------------------------------------------------------------------------ adversarial shapes --

@pytest.mark.parametrize("gate", ["softmax", "gshard"])
def test_zero_tokens(gate):
    case = make_case(gate, "swiglu", T=0, S=1, capacity_factor=1.0)
    out = case.op()
    assert out["y"].shape == (0, 16)
    assert out["topk_idx"].shape == (0, case.config.top_k)
    assert out["expert_counts"].tolist() == [0] * 6 and out["kept_counts"].tolist() == [0] * 6
    assert float(out["aux_loss"]) == 0.0 and float(out["z_loss"]) == 0.0
    ref = case.ref()
    assert float(ref["aux_loss"]) == 0.0 and float(ref["z_loss"]) == 0.0


@pytest.mark.parametrize("T", [1, 2, 97, 131])
def test_odd_token_counts(T):
    case = make_case("sigmoid", "swiglu", T=T, E=5, k=3, capacity_factor=1.1, expert_bias=True)
    assert_forward_close(case.op(), case.ref(), FP64_TOL)


@pytest.mark.parametrize("gate", ["softmax", "sigmoid", "noisy"])
def test_top_k_equals_num_experts(gate):
    case = make_case(gate, "relu", E=4, k=4)
    out, ref = case.op(), case.ref()
    assert_forward_close(out, ref, FP64_TOL)
    assert torch.equal(out["topk_idx"].sort(-1).values, torch.arange(4, dtype=torch.int32).expand(23, 4))
    assert out["expert_counts"].tolist() == [23] * 4


def test_all_tokens_to_one_expert_forced():
    case = make_case("softmax", "swiglu", T=30, E=6, k=1, capacity_factor=1.0)
    forced = torch.full((30, 1), 3, dtype=torch.int32)
    out, ref = case.op(forced_topk_idx=forced), case.ref(forced_topk_idx=forced)
    assert_forward_close(out, ref, FP64_TOL)
    capacity = math.ceil(1.0 * 30 / 6)
    assert out["expert_counts"].tolist() == [0, 0, 0, 30, 0, 0]
    assert out["kept_counts"].tolist() == [0, 0, 0, capacity, 0, 0]
    assert out["kept"][:capacity].all() and not out["kept"][capacity:].any()  # first come, first served
    assert float(out["y"][capacity:].abs().max()) == 0.0


def test_all_tokens_to_one_expert_by_gate_bias():
    case = make_case("softmax", "gelu", T=25, E=5, k=2, gate_bias=True)
    case.tensors["gate_bias"] = torch.tensor([0.0, 0.0, 50.0, 0.0, 0.0], dtype=torch.float64)
    out, ref = case.op(), case.ref()
    assert_forward_close(out, ref, FP64_TOL)
    assert (out["topk_idx"][:, 0] == 2).all()
    assert int(out["expert_counts"][2]) == 25


def test_experts_without_tokens():
    case = make_case("softmax", "geglu", T=20, E=8, k=2)
    forced = torch.randint(0, 2, (20, 1), dtype=torch.int32)
    forced = torch.cat([forced, 1 - forced], dim=1)  # only experts 0 and 1 are used
    out, ref = case.op(forced_topk_idx=forced), case.ref(forced_topk_idx=forced)
    assert_forward_close(out, ref, FP64_TOL)
    assert out["expert_counts"][2:].tolist() == [0] * 6


def test_forced_routing_with_empty_choices():
    case = make_case("softmax", "relu", T=10, E=4, k=2)
    forced = torch.randint(0, 4, (10, 1))
    forced = torch.cat([forced, torch.full_like(forced, -1)], dim=1)  # second choice: none
    forced[3, 0] = -1  # token 3: no expert at all
    out, ref = case.op(forced_topk_idx=forced), case.ref(forced_topk_idx=forced)
    assert_forward_close(out, ref, FP64_TOL)
    assert float(out["y"][3].abs().max()) == 0.0
    assert not out["kept"][:, 1].any()


def test_saved_bytes_mirror_pinned():
    # SavedLayout::make pins the same number (tests/cpp/test_layout.cpp); the GPU suite compares
    # the op's `saved` output with this function on real forwards.
    from fusedmoe import _ops
    from fusedmoe.config import MoeConfig
    c = MoeConfig(num_experts=8, top_k=2, hidden_size=4096, ffn_size=14336, ffn="swiglu", dtype="bf16")
    assert _ops.saved_bytes(c, 8192, 2) == 1679819008
    assert _ops.saved_bytes(c, 0, 2) == 256
