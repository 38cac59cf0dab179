# python/fusedmoe/moe.py — fusedmoe.MoE: a Mixture-of-Experts FFN layer as an nn.Module
# (FastMoE-style: a gate module + stacked experts + optional shared experts), run by the fused
# op torch.ops.fusedmoe.moe_forward (autograd through moe_backward), or by the plain-PyTorch
# reference with backend="reference".
#
# After every forward the layer exposes its balance losses (self.aux_loss, self.z_loss:
# differentiable 0-dim tensors; add them to the training loss, see fusedmoe.losses) and its
# routing statistics (self.last_expert_counts, accumulated load_stats()).
# Test: tests/python/test_modules.py, tests/python/test_tiny_model.py.
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from . import reference
from .distributed import group_size
from .config import MoeConfig, dtype_name, normalize_ffn_kind
from .experts import Experts
from .gates import BaseGate, make_gate
from .shadowing import ShadowingPolicy

__all__ = ["MoE"]

_BACKENDS = ("auto", "cuda", "fused", "cpu", "naive", "reference")


def _needs_grad(args) -> bool:
    """Whether autograd will call backward for an op on these arguments (then the forward keeps
    its intermediate results for it instead of backward recomputing them)."""
    return torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


class MoE(nn.Module):
    """Mixture-of-Experts FFN: y = Σ_j w_j · expert_{e_j}(x) + Σ_s shared_s(x).

    Args:
        num_experts: E routed experts.
        d_model: H, the token width.
        d_ffn: I, the hidden width of each routed expert.
        top_k: k experts per token; None = 2 (1 for gate "switch"). Taken from the gate when
            `gate` is a module (a different explicit value raises ValueError).
        gate: a gate name ("softmax", "sigmoid", "noisy", "switch", "gshard") or a gate module
            (fusedmoe.gates.BaseGate) with num_experts = E and d_model = H.
        ffn: "relu" | "gelu" | "swiglu" | "geglu".
        capacity_factor: 0 = dropless; else each expert takes at most ceil(cf · T · k / E) rows.
        num_shared_experts: S experts applied to every token (weight 1).
        shared_ffn_size: I of each shared expert (0 = d_ffn).
        renormalize: divide the k gate weights by their sum (softmax, sigmoid, noisy gates).
        expert_bias: biases b1, b2 on every expert (routed and shared).
        gate_bias: a trained router bias [E].
        jitter_eps: Switch gate jitter half-width.
            (renormalize, gate_bias and jitter_eps are the gate module's own when `gate` is one.)
        group: expert-parallel process group (torch.distributed); None or one rank = all experts
            here. With W ranks this rank holds experts [rank·E/W, (rank+1)·E/W) (E % W == 0), the
            gate is replicated, and tokens travel to their experts' ranks (fusedmoe.distributed;
            sum replicated gradients with fusedmoe.distributed.allreduce_replicated_grads).
        shadowing: hot-expert shadowing policy (fusedmoe.shadowing.ShadowingPolicy, e.g.
            CostModelPolicy()) or None (default: off). With a group of W > 1 ranks, each call
            replicates the experts the policy picks from the call's load on every rank for that
            call (fusedmoe.shadowing); outputs and gradients are unchanged. No effect without a
            group.
        dtype: parameter dtype (default: torch.get_default_dtype()); inputs must match it.
        device: parameter device.
        backend: the fused op's backend — "auto" (CUDA tensors: the modular GPU path; CPU tensors: the
            CPU backend), "cuda" (the modular GPU path), "fused" (the single persistent kernel for the
            forward, its backward through the modular path; with a group, it runs each rank's local
            experts), "cpu", "naive" — or "reference" (plain PyTorch).
        fp32_math: "tf32" | "exact": GPU expert GEMM precision for fp32 (unused on CPU).
    Submodules:
        gate: the router.  experts: Experts(E, H, I).  shared_experts: Experts(S, H, Is) or None.
    Attributes set by forward():
        aux_loss, z_loss: 0-dim differentiable tensors of the last call.
        last_expert_counts, last_kept_counts: [E] int64 assignments before / after capacity.
        last_topk_idx: [T, k] int32 routing of the last call (-1 = none).
        last_shadowed: experts shadowed in the last call (ascending ints; [] without shadowing).
    """

    def __init__(self, num_experts: int, d_model: int, d_ffn: int, top_k: Optional[int] = None,
                 gate: Union[str, BaseGate] = "softmax", ffn: str = "swiglu",
                 capacity_factor: float = 0.0, num_shared_experts: int = 0,
                 shared_ffn_size: int = 0, renormalize: bool = True, expert_bias: bool = False,
                 gate_bias: bool = False, jitter_eps: float = 1e-2, group=None,
                 shadowing: Optional[ShadowingPolicy] = None, dtype: Optional[torch.dtype] = None,
                 device: Optional[Union[str, torch.device]] = None, backend: str = "auto",
                 fp32_math: str = "tf32"):
        super().__init__()
        for name, value in (("num_experts", num_experts), ("d_model", d_model), ("d_ffn", d_ffn)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} = {value!r}: must be a positive integer")
        if isinstance(num_shared_experts, bool) or not isinstance(num_shared_experts, int) \
                or not 0 <= num_shared_experts <= 64:
            raise ValueError(f"num_shared_experts = {num_shared_experts!r}: must be an integer in [0, 64]")
        if isinstance(shared_ffn_size, bool) or not isinstance(shared_ffn_size, int) or shared_ffn_size < 0:
            raise ValueError(f"shared_ffn_size = {shared_ffn_size!r}: must be an integer >= 0")
        try:
            capacity_factor = float(capacity_factor)
        except (TypeError, ValueError):
            raise ValueError(f"capacity_factor = {capacity_factor!r}: must be a number >= 0") from None
        if not capacity_factor >= 0.0 or capacity_factor == float("inf"):
            raise ValueError(f"capacity_factor = {capacity_factor}: must be 0 (dropless) or > 0")
        if backend not in _BACKENDS:
            raise ValueError(f"backend = {backend!r}: must be one of {', '.join(_BACKENDS)}")
        if fp32_math not in ("tf32", "exact"):
            raise ValueError(f"fp32_math = {fp32_math!r}: must be 'tf32' or 'exact'")
        world = group_size(group)
        if world > 1 and num_experts % world != 0:
            raise ValueError(f"num_experts = {num_experts}: expert parallelism over a group of {world} ranks "
                             "needs a multiple of the group size")
        if world > 1 and backend == "reference":
            raise ValueError("backend = 'reference': expert parallelism runs the fused op")
        if shadowing is not None and not isinstance(shadowing, ShadowingPolicy):
            raise TypeError(f"shadowing: expected None or a fusedmoe.shadowing.ShadowingPolicy, "
                            f"got {type(shadowing).__name__}")
        self.group = group
        self.world_size = world
        self.shadowing = shadowing
        ffn = normalize_ffn_kind(ffn, "ffn")

        if isinstance(gate, BaseGate):
            if gate.num_experts != num_experts:
                raise ValueError(f"gate: has num_experts = {gate.num_experts}, the layer {num_experts}")
            if gate.d_model != d_model:
                raise ValueError(f"gate: has d_model = {gate.d_model}, the layer {d_model}")
            if top_k is not None and top_k != gate.top_k:
                raise ValueError(f"top_k = {top_k}: the gate module routes to top_k = {gate.top_k}")
            self.gate = gate
        elif isinstance(gate, str):
            if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                                      or not 1 <= top_k <= num_experts):
                raise ValueError(f"top_k = {top_k!r}: must be in [1, num_experts = {num_experts}]")
            self.gate = make_gate(gate, d_model, num_experts, top_k, bias=gate_bias,
                                  renormalize=renormalize, jitter_eps=jitter_eps, dtype=dtype,
                                  device=device)
        else:
            raise TypeError(f"gate: expected a gate name or a fusedmoe.gates.BaseGate, got {type(gate).__name__}")

        self.num_experts = num_experts
        self.d_model = d_model
        self.d_ffn = d_ffn
        self.top_k = self.gate.top_k
        self.ffn = ffn
        self.capacity_factor = capacity_factor
        self.backend = backend
        self.fp32_math = fp32_math
        # With expert parallelism this rank holds experts [rank·E/W, (rank+1)·E/W) only.
        self.experts = Experts(num_experts // world, d_model, d_ffn, ffn, bias=expert_bias, dtype=dtype,
                               device=device)
        self.shared_ffn_size = shared_ffn_size
        if num_shared_experts > 0:
            self.shared_experts = Experts(num_shared_experts, d_model, shared_ffn_size or d_ffn, ffn,
                                          bias=expert_bias, dtype=dtype, device=device)
        else:
            self.shared_experts = None
        self.num_shared_experts = num_shared_experts
        self.config_for(self.experts.w1.dtype)  # validates the whole config now

        self.aux_loss: Optional[torch.Tensor] = None
        self.z_loss: Optional[torch.Tensor] = None
        self.last_expert_counts: Optional[torch.Tensor] = None
        self.last_kept_counts: Optional[torch.Tensor] = None
        self.last_topk_idx: Optional[torch.Tensor] = None
        self.last_shadowed: list = []
        device = self.experts.w1.device
        self.register_buffer("_routed_total", torch.zeros(num_experts, dtype=torch.int64, device=device),
                             persistent=False)
        self.register_buffer("_kept_total", torch.zeros(num_experts, dtype=torch.int64, device=device),
                             persistent=False)
        # Tensors, not Python ints: torch.compile would treat ints as constants and recompile.
        self.register_buffer("_tokens_total", torch.zeros((), dtype=torch.int64, device=device), persistent=False)
        self.register_buffer("_calls_total", torch.zeros((), dtype=torch.int64, device=device), persistent=False)

    # --- configuration ----------------------------------------------------------------------
    def config_for(self, dtype: torch.dtype) -> MoeConfig:
        """The layer's MoeConfig for inputs of `dtype` (validated; ValueError naming the field)."""
        return MoeConfig(
            hidden_size=self.d_model, ffn_size=self.d_ffn, num_experts=self.num_experts,
            ffn=self.ffn, capacity_factor=self.capacity_factor,
            num_shared_experts=self.num_shared_experts, shared_ffn_size=self.shared_ffn_size,
            expert_bias=self.experts.has_bias, dtype=dtype_name(dtype, "x"),
            fp32_math=self.fp32_math, **self.gate.config_fields()).validate()

    # --- forward ----------------------------------------------------------------------------
    def _draw_seed(self) -> int:
        # One draw from torch's default CPU generator per training forward of a stochastic
        # gate: the noise differs per step and is reproducible with torch.manual_seed.
        return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())

    def forward(self, x: torch.Tensor, forced_topk_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Applies the layer to every token.

        Args:
            x: [..., H] tokens (any leading shape), of the parameters' dtype and device.
            forced_topk_idx: optional [T, k] integer routing (T = number of tokens, -1 = none)
                used instead of the gate's top-k (the gate weights still come from the gate);
                with a group: this rank's tokens, global expert indices.
        Returns:
            y: [..., H], same shape and dtype as x.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(f"x: shape {tuple(x.shape)}, expected [..., d_model = {self.d_model}]")
        param_dtype = self.experts.w1.dtype
        if x.dtype != param_dtype:
            raise TypeError(f"x: dtype {x.dtype} does not match the layer's parameters ({param_dtype})")
        shape = x.shape
        tokens = x.reshape(-1, self.d_model)
        if not tokens.is_contiguous():
            tokens = tokens.contiguous()
        config = self.config_for(x.dtype)
        seed = self._draw_seed() if self.training and self.gate.stochastic else 0
        if self.world_size > 1:
            return self._forward_expert_parallel(tokens, config, seed, forced_topk_idx).reshape(shape)
        g, ex, sh = self.gate, self.experts, self.shared_experts
        args = (tokens, g.weight, g.bias, g.noise_weight, g.selection_bias, ex.w1, ex.b1, ex.w2, ex.b2,
                None if sh is None else sh.w1, None if sh is None else sh.b1,
                None if sh is None else sh.w2, None if sh is None else sh.b2, forced_topk_idx,
                config.to_string(), [], self.training, seed, 0)
        if self.backend == "reference":
            out = reference.moe_forward(*args)
        else:
            out = torch.ops.fusedmoe.moe_forward(*args, self.backend,
                                                 save_for_backward=_needs_grad(args))
        y, topk_idx, _, _, expert_counts, kept_counts, aux, z = out[:8]
        self.aux_loss = aux
        self.z_loss = z
        self.last_topk_idx = topk_idx
        self.last_expert_counts = expert_counts
        self.last_kept_counts = kept_counts
        with torch.no_grad():
            self._routed_total += expert_counts.to(self._routed_total.device)
            self._kept_total += kept_counts.to(self._kept_total.device)
            self._tokens_total += tokens.shape[0]
            self._calls_total += 1
        return y.reshape(shape)

    def _forward_expert_parallel(self, tokens: torch.Tensor, config: MoeConfig, seed: int,
                                 forced_topk_idx: Optional[torch.Tensor]) -> torch.Tensor:
        from . import distributed
        y, routing = distributed.expert_parallel_forward(self, tokens, seed, forced_topk_idx)
        self.aux_loss, self.z_loss = (v.to(tokens.dtype) for v in reference.balance_losses(routing, config))
        self.last_topk_idx = routing.topk_idx.to(torch.int32)
        self.last_expert_counts = routing.expert_counts
        self.last_kept_counts = routing.kept_counts
        with torch.no_grad():
            self._routed_total += routing.expert_counts.to(self._routed_total.device)
            self._kept_total += routing.kept_counts.to(self._kept_total.device)
            self._tokens_total += tokens.shape[0]
            self._calls_total += 1
        return y

    # --- load statistics --------------------------------------------------------------------
    def load_stats(self) -> dict:
        """Routing statistics accumulated since construction or reset_load_stats().

        Returns:
            dict with routed [E] int64 (assignments before capacity), kept [E] int64
            (assignments computed), tokens (int), calls (int), load [E] float (routed / total
            routed; zeros before any token), dropped_fraction (float, 1 − kept / routed).
        """
        routed = self._routed_total.clone()
        kept = self._kept_total.clone()
        total = int(routed.sum())
        load = routed.double() / total if total > 0 else torch.zeros(self.num_experts, dtype=torch.float64)
        dropped = 1.0 - float(kept.sum()) / total if total > 0 else 0.0
        return {"routed": routed, "kept": kept, "tokens": int(self._tokens_total), "calls": int(self._calls_total),
                "load": load, "dropped_fraction": dropped}

    def reset_load_stats(self) -> None:
        """Zeroes the accumulated load statistics."""
        self._routed_total.zero_()
        self._kept_total.zero_()
        self._tokens_total.zero_()
        self._calls_total.zero_()

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, d_model={self.d_model}, d_ffn={self.d_ffn}, "
                f"top_k={self.top_k}, ffn={self.ffn}, capacity_factor={self.capacity_factor}, "
                f"num_shared_experts={self.num_shared_experts}, backend={self.backend}")
