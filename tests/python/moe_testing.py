# tests/python/moe_testing.py — shared helpers of the fusedmoe Python tests: random layer cases
# (config + every weight, in the op's argument order), calls of the op and of the reference with
# the same arguments, and error measures. Imported by the test_*.py files beside it.
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

import fusedmoe
from fusedmoe import reference
from fusedmoe._ops import FORWARD_OUTPUTS
from fusedmoe.config import MoeConfig

GATES = ("softmax", "sigmoid", "noisy", "switch", "gshard")
FFNS = ("relu", "gelu", "swiglu", "geglu")
STOCHASTIC_GATES = ("noisy", "switch", "gshard")
TENSOR_INPUTS = ("x", "gate_weight", "gate_bias", "noise_weight", "selection_bias", "w1", "b1",
                 "w2", "b2", "shared_w1", "shared_b1", "shared_w2", "shared_b2")
GRAD_INPUTS = ("x", "gate_weight", "gate_bias", "noise_weight", "w1", "b1", "w2", "b2",
               "shared_w1", "shared_b1", "shared_w2", "shared_b2")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ (with ‖b‖ floored at 1e-300), in fp64; shapes must match."""
    assert a.shape == b.shape, f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    a64, b64 = a.detach().double(), b.detach().double()
    assert torch.isfinite(a64).all(), "non-finite values (an unwritten, poisoned output?)"
    return float((a64 - b64).norm() / max(float(b64.norm()), 1e-300))


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| (0 for empty tensors)."""
    if a.numel() == 0:
        return 0.0
    return float((a.detach().double() - b.detach().double()).abs().max())


def default_top_k(gate: str) -> int:
    return {"switch": 1, "gshard": 2}.get(gate, 2)


@dataclass
class Case:
    """A random layer: config and tensors (named as the op's arguments)."""

    config: MoeConfig
    tensors: dict = field(default_factory=dict)

    def tensor_args(self):
        return tuple(self.tensors.get(name) for name in TENSOR_INPUTS)

    def args(self, *, training: bool = False, seed: int = 0, tokens_per_rank: Sequence[int] = (),
             token_offset: int = 0, forced_topk_idx: Optional[torch.Tensor] = None, config=None):
        """Positional arguments of moe_forward / reference.moe_forward (without `backend`)."""
        c = config if config is not None else self.config
        return (*self.tensor_args(), forced_topk_idx, c.to_string(), list(tokens_per_rank),
                training, seed, token_offset)

    def op(self, backend: str = "cpu", **kw):
        """torch.ops.fusedmoe.moe_forward → dict of the 8 named outputs."""
        return dict(zip(FORWARD_OUTPUTS, torch.ops.fusedmoe.moe_forward(*self.args(**kw), backend)))

    def ref(self, **kw):
        """fusedmoe.reference.moe_forward → dict of the 8 named outputs."""
        return dict(zip(FORWARD_OUTPUTS, reference.moe_forward(*self.args(**kw))))

    def requires_grad_(self):
        for name in GRAD_INPUTS:
            t = self.tensors.get(name)
            if t is not None:
                t.requires_grad_(True)
        return self

    def grad_tensors(self):
        """(name, tensor) of every present input that has a gradient."""
        return [(n, self.tensors[n]) for n in GRAD_INPUTS if self.tensors.get(n) is not None]


def make_case(gate: str = "softmax", ffn: str = "swiglu", *, T: int = 23, H: int = 16, I: int = 12,
              E: int = 6, k: Optional[int] = None, dtype: torch.dtype = torch.float64,
              capacity_factor: float = 0.0, S: int = 0, Is: int = 0, expert_bias: bool = False,
              gate_bias: bool = False, renormalize: bool = True, world_size: int = 1,
              jitter_eps: float = 1e-2, gate_scale: float = 1.0, noise_scale: float = 1.0,
              selection_bias: bool = True) -> Case:
    """A random case. Weights ~ U(±1/sqrt(fan_in)) (gate weight × gate_scale, noise weight ×
    noise_scale), x ~ N(0, 1); the sigmoid gate gets a random selection bias when asked."""
    k = default_top_k(gate) if k is None else k
    c = MoeConfig(hidden_size=H, ffn_size=I, num_experts=E, top_k=k, ffn=ffn, gate=gate,
                  renormalize=renormalize, capacity_factor=capacity_factor, num_shared_experts=S,
                  shared_ffn_size=Is, expert_bias=expert_bias, gate_bias=gate_bias,
                  jitter_eps=jitter_eps, dtype={torch.float32: "fp32", torch.float64: "fp64"}[dtype],
                  world_size=world_size)
    c.validate()

    def uniform(*shape, fan_in, scale=1.0):
        bound = scale / math.sqrt(fan_in)
        return (torch.rand(*shape, dtype=torch.float64) * 2 - 1).mul_(bound).to(dtype)

    n1, is_, ns1 = c.ffn_in_width, c.shared_size, c.shared_in_width
    t = {"x": torch.randn(T, H, dtype=torch.float64).to(dtype),
         "gate_weight": uniform(E, H, fan_in=H, scale=3.0 * gate_scale),
         "w1": uniform(E, H, n1, fan_in=H), "w2": uniform(E, I, H, fan_in=I)}
    if gate_bias:
        t["gate_bias"] = uniform(E, fan_in=H, scale=3.0)
    if gate == "noisy":
        t["noise_weight"] = uniform(E, H, fan_in=H, scale=noise_scale)
    if gate == "sigmoid" and selection_bias:
        t["selection_bias"] = uniform(E, fan_in=1, scale=0.1)
    if expert_bias:
        t["b1"] = uniform(E, n1, fan_in=H)
        t["b2"] = uniform(E, H, fan_in=I)
    if S > 0:
        t["shared_w1"] = uniform(S, H, ns1, fan_in=H)
        t["shared_w2"] = uniform(S, is_, H, fan_in=is_)
        if expert_bias:
            t["shared_b1"] = uniform(S, ns1, fan_in=H)
            t["shared_b2"] = uniform(S, H, fan_in=is_)
    return Case(config=c, tensors=t)


def assert_routing_equal(out: dict, ref: dict) -> None:
    """Indices, kept flags and counts identical; weights and losses close."""
    assert torch.equal(out["topk_idx"], ref["topk_idx"]), "topk_idx differs"
    assert torch.equal(out["kept"], ref["kept"]), "kept differs"
    assert torch.equal(out["expert_counts"], ref["expert_counts"]), "expert_counts differ"
    assert torch.equal(out["kept_counts"], ref["kept_counts"]), "kept_counts differ"


def assert_forward_close(out: dict, ref: dict, tol: float) -> None:
    """Routing identical, y / topk_weight / aux / z within relative error `tol`."""
    assert_routing_equal(out, ref)
    for name in ("y", "topk_weight"):
        if ref[name].numel():
            err = rel_err(out[name], ref[name])
            assert err < tol, f"{name}: relative error {err:.3e} >= {tol:.1e}"
    for name in ("aux_loss", "z_loss"):
        err = abs(float(out[name]) - float(ref[name])) / max(abs(float(ref[name])), 1e-300)
        assert err < tol or float(ref[name]) == float(out[name]), \
            f"{name}: {float(out[name])!r} vs reference {float(ref[name])!r}"


def loss_of(outputs: dict, dy: torch.Tensor, d_aux: float, d_z: float) -> torch.Tensor:
    """⟨y, dy⟩ + d_aux·aux + d_z·z, so that the upstream gradients are dy, d_aux, d_z."""
    return (outputs["y"] * dy).sum() + d_aux * outputs["aux_loss"] + d_z * outputs["z_loss"]


def op_and_reference_grads(case: Case, *, d_aux: float = 0.7, d_z: float = 0.3, **kw):
    """Gradients of loss_of(...) w.r.t. every differentiable input, through the op and through
    the reference's autograd. Returns (op_grads, ref_grads), dicts by input name."""
    case.requires_grad_()
    names = [n for n, _ in case.grad_tensors()]
    inputs = [t for _, t in case.grad_tensors()]
    x = case.tensors["x"]
    dy = torch.randn(x.shape, dtype=torch.float64).to(x.dtype)
    result = []
    for run in (case.op, case.ref):
        outputs = run(**kw)
        grads = torch.autograd.grad(loss_of(outputs, dy, d_aux, d_z), inputs, allow_unused=True)
        result.append({n: (torch.zeros_like(t) if g is None else g)
                       for n, t, g in zip(names, inputs, grads)})
    return result[0], result[1]
