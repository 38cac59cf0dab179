# python/fusedmoe/plain.py — PlainMoE: the fusedmoe.MoE layer computed with ordinary PyTorch ops
# (fusedmoe.reference: vectorised router, per-expert loop, autograd for the backward), for any
# device torch supports. Same constructor, same parameters (gate.weight [E, H], experts.w1
# [E, H, N1], experts.w2 [E, I, H], ...), same initialisation order and the same training-mode
# noise as fusedmoe.MoE, so that under one torch seed both classes start from identical weights
# and compute the same function. It is the baseline of examples/train_lm.py (--moe plain) and
# loads fusedmoe checkpoints (fusedmoe.checkpoint) like MoE, being a subclass of it.
#
# Router precision: fp64 for fp64 inputs or CPU tensors (exactly the CPU backend's router), fp32
# otherwise (the GPU backend routes in at least fp32); override with router_dtype=.
#
# Test: tests/python/test_example.py (PlainMoE vs fusedmoe.MoE: outputs and gradients < 1e-10
# in fp64, every gate, training mode), run as in tests/python/conftest.py.
from __future__ import annotations

from typing import Optional, Union

import torch

from . import reference
from .gates import BaseGate
from .moe import MoE

__all__ = ["PlainMoE"]


class PlainMoE(MoE):
    """fusedmoe.MoE computed in plain PyTorch: y = Σ_j w_j · expert_{e_j}(x) + Σ_s shared_s(x).

    Args (all as fusedmoe.MoE):
        num_experts: E routed experts.
        d_model: H, the token width.
        d_ffn: I, the hidden width of each routed expert.
        top_k: k experts per token; None = 2 (1 for gate "switch").
        gate: a gate name ("softmax", "sigmoid", "noisy", "switch", "gshard") or a gate module.
        ffn: "relu" | "gelu" | "swiglu" | "geglu".
        capacity_factor: 0 = dropless; else each expert takes at most ceil(cf · T · k / E) rows.
        num_shared_experts: S experts applied to every token (weight 1).
        shared_ffn_size: I of each shared expert (0 = d_ffn).
        renormalize: divide the k gate weights by their sum (softmax, sigmoid, noisy gates).
        expert_bias: biases b1, b2 on every expert.
        gate_bias: a trained router bias [E].
        jitter_eps: Switch gate jitter half-width.
        group: None or a process group of one rank.
        dtype: parameter dtype (default: torch.get_default_dtype()).
        device: parameter device (any torch device).
        backend: "auto" or "reference" (both mean plain PyTorch here); others raise ValueError.
        fp32_math: accepted for signature compatibility (plain matmuls follow torch's settings).
        router_dtype: dtype of the router math (logits, softmax, top-k, weights, losses) and of
            the combine accumulator; None = float64 on CPU or for float64 inputs, else float32.
    Parameters: gate.weight [E, H] (+ gate.bias [E], gate.noise_weight [E, H]), experts.w1
        [E, H, N1], experts.w2 [E, I, H] (+ b1 [E, N1], b2 [E, H]), shared_experts.* — exactly
        fusedmoe.MoE's names and shapes (N1 = 2I for gated FFNs).
    Attributes set by forward(): aux_loss, z_loss, last_expert_counts, last_kept_counts,
        last_topk_idx (as fusedmoe.MoE; load_stats() works the same way).
    """

    def __init__(self, num_experts: int, d_model: int, d_ffn: int, top_k: Optional[int] = None,
                 gate: Union[str, BaseGate] = "softmax", ffn: str = "swiglu",
                 capacity_factor: float = 0.0, num_shared_experts: int = 0,
                 shared_ffn_size: int = 0, renormalize: bool = True, expert_bias: bool = False,
                 gate_bias: bool = False, jitter_eps: float = 1e-2, group=None,
                 dtype: Optional[torch.dtype] = None,
                 device: Optional[Union[str, torch.device]] = None, backend: str = "reference",
                 fp32_math: str = "tf32", *, router_dtype: Optional[torch.dtype] = None):
        if backend not in ("auto", "reference"):
            raise ValueError(f"backend = {backend!r}: PlainMoE always computes in plain PyTorch "
                             "('auto' or 'reference'); use fusedmoe.MoE for the fused op")
        if router_dtype not in (None, torch.float32, torch.float64):
            raise ValueError(f"router_dtype = {router_dtype}: must be None, torch.float32 or torch.float64")
        super().__init__(num_experts, d_model, d_ffn, top_k=top_k, gate=gate, ffn=ffn,
                         capacity_factor=capacity_factor, num_shared_experts=num_shared_experts,
                         shared_ffn_size=shared_ffn_size, renormalize=renormalize,
                         expert_bias=expert_bias, gate_bias=gate_bias, jitter_eps=jitter_eps,
                         group=group, dtype=dtype, device=device, backend="reference",
                         fp32_math=fp32_math)
        self.router_dtype = router_dtype

    def _router_dtype_for(self, x: torch.Tensor) -> torch.dtype:
        if self.router_dtype is not None:
            return self.router_dtype
        if x.dtype == torch.float64 or x.device.type == "cpu":
            return torch.float64
        return torch.float32

    def forward(self, x: torch.Tensor, forced_topk_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Applies the layer to every token (plain PyTorch; autograd provides the backward).

        Args:
            x: [..., H] tokens (any leading shape), of the parameters' dtype and device.
            forced_topk_idx: optional [T, k] integer routing (T = number of tokens, -1 = none).
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
        config = self.config_for(x.dtype)
        # The same seed draw as fusedmoe.MoE (one per training forward of a stochastic gate), so
        # that both classes see the same noise under the same torch seed.
        seed = self._draw_seed() if self.training and self.gate.stochastic else 0
        g, ex, sh = self.gate, self.experts, self.shared_experts
        out = reference.moe_forward(
            tokens, g.weight, g.bias, g.noise_weight, g.selection_bias, ex.w1, ex.b1, ex.w2, ex.b2,
            None if sh is None else sh.w1, None if sh is None else sh.b1,
            None if sh is None else sh.w2, None if sh is None else sh.b2, forced_topk_idx,
            config, (), self.training, seed, 0, router_dtype=self._router_dtype_for(x))
        y, topk_idx, _, _, expert_counts, kept_counts, aux, z = out
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

    def extra_repr(self) -> str:
        return super().extra_repr().replace("backend=reference", "plain PyTorch")
