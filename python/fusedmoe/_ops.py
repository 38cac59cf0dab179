# python/fusedmoe/_ops.py — Python-side registrations of the torch ops defined in
# bindings/torch/binding.cpp: fake (meta) kernels for torch.compile / FakeTensor / meta tensors,
# and autograd for fusedmoe::moe_forward, whose backward calls fusedmoe::moe_backward.
#
# Differentiable outputs of moe_forward: y, aux_loss, z_loss (gradients w.r.t. x, the gate
# weight and bias, the noise weight, and every expert / shared-expert weight and bias).
# topk_weight is marked non-differentiable (the backward op takes no gradient for it); the
# integer and bool outputs never carry gradients. selection_bias (sigmoid gate) and
# forced_topk_idx get no gradient by definition. moe_backward itself is not differentiable
# (no double backward).
#
# Saved state: when any input needs a gradient, the autograd wrapper (and fusedmoe.MoE) pass
# save_for_backward=True; backends that can (cuda) then return in `saved` what their backward
# needs (routing, expert-ordered rows, activations: include/fusedmoe/saved_state.hpp), which
# moe_backward reads instead of recomputing the forward. Its size is fixed + T · per_token bytes
# (saved_bytes below mirrors SavedLayout::make; a GPU test compares it with the op's).
#
# Test: tests/python/test_ops_backward.py (gradcheck, opcheck), test_modules.py (torch.compile).
from __future__ import annotations

import torch

from .config import MoeConfig

__all__ = ["FORWARD_INPUTS", "FORWARD_OUTPUTS", "BACKWARD_OUTPUTS", "register"]

# Argument names of moe_forward, in schema order (moe_backward appends dy, d_aux, d_z).
FORWARD_INPUTS = (
    "x", "gate_weight", "gate_bias", "noise_weight", "selection_bias", "w1", "b1", "w2", "b2",
    "shared_w1", "shared_b1", "shared_w2", "shared_b2", "forced_topk_idx", "config",
    "tokens_per_rank", "training", "seed", "token_offset", "backend", "save_for_backward",
)
FORWARD_OUTPUTS = ("y", "topk_idx", "topk_weight", "kept", "expert_counts", "kept_counts",
                   "aux_loss", "z_loss", "saved")
# Inputs that have a gradient, in the order of moe_backward's outputs.
_GRAD_INPUTS = ("x", "gate_weight", "gate_bias", "noise_weight", "w1", "b1", "w2", "b2",
                "shared_w1", "shared_b1", "shared_w2", "shared_b2")
BACKWARD_OUTPUTS = tuple("d" + name if name == "x" else "d_" + name for name in _GRAD_INPUTS)
_NUM_TENSOR_INPUTS = 14  # x .. forced_topk_idx
_NUM_CALL_ARGS = 6  # config, tokens_per_rank, training, seed, token_offset, backend
_DTYPE_BYTES = {torch.float32: 4, torch.float64: 8, torch.bfloat16: 2, torch.float16: 2}


def saved_bytes(c: MoeConfig, num_tokens, element_bytes: int):
    """Bytes of moe_forward's `saved` output on the cuda backend (SavedLayout::make):
    fixed + num_tokens · per_token, every section rounded up to 16 B; the fixed part padded to
    256 B, and a section of 256 B or more per token starting on 256 B (the per-token bytes before
    it padded, its own rounded up)."""
    def round_up(b, to):
        return (b + to - 1) // to * to
    align = 256
    E, k, H = c.num_experts, c.top_k, c.hidden_size
    fixed = round_up(round_up(8 * E, 16) + round_up(8 * E, 16) + round_up(8 * (E + 1), 16), align)
    sections = [4 * E, 4 * E, 4 * E if c.gate == "noisy" else 0, 12, 4 * k, 4 * k, 4 * k, 4 * k, 4 * k, k,
                4 * H if c.gate == "switch" and c.jitter_eps > 0 else 0,
                k * H * element_bytes, k * c.ffn_in_width * element_bytes, k * c.ffn_size * element_bytes,
                k * H * element_bytes]
    per_token = 0
    for b in sections:
        b = round_up(b, 16)
        if b >= align:
            per_token = round_up(per_token, align)
            b = round_up(b, align)
        per_token += b
    return fixed + num_tokens * per_token


def _saves_state(x, c: MoeConfig, backend: str, save_for_backward: bool) -> bool:
    """Whether the real op returns a non-empty `saved` (MoeLayer::saved_bytes): the cuda backend,
    and the fused one at world_size = 1 (its training forward runs the modular path)."""
    return (save_for_backward and x.device.type == "cuda" and
            (backend in ("auto", "cuda") or (backend == "fused" and c.world_size == 1)))

_registered = False


def _check_devices(x, **tensors) -> None:
    """Every given tensor on x's device (mixed meta / real devices reach the fake kernel)."""
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"fusedmoe: {name}: on device {t.device}, but x is on {x.device}")


def _moe_forward_fake(x, gate_weight, gate_bias, noise_weight, selection_bias, w1, b1, w2, b2,
                      shared_w1, shared_b1, shared_w2, shared_b2, forced_topk_idx, config,
                      tokens_per_rank, training, seed, token_offset, backend, save_for_backward=False):
    """Output shapes of moe_forward from x [T, H] and the config string (k, E)."""
    c = MoeConfig.from_string(config)
    torch._check(x.dim() == 2, lambda: f"x: expected a 2-D tensor [T, H], got {x.dim()} dims")
    _check_devices(x, gate_weight=gate_weight, gate_bias=gate_bias, noise_weight=noise_weight,
                   selection_bias=selection_bias, w1=w1, b1=b1, w2=w2, b2=b2, shared_w1=shared_w1,
                   shared_b1=shared_b1, shared_w2=shared_w2, shared_b2=shared_b2,
                   forced_topk_idx=forced_topk_idx)
    T, H = x.shape
    k, E = c.top_k, c.num_experts
    return (
        x.new_empty((T, H)),
        x.new_empty((T, k), dtype=torch.int32),
        x.new_empty((T, k)),
        x.new_empty((T, k), dtype=torch.bool),
        x.new_empty((E,), dtype=torch.int64),
        x.new_empty((E,), dtype=torch.int64),
        x.new_empty(()),
        x.new_empty(()),
        x.new_empty((saved_bytes(c, T, _DTYPE_BYTES[x.dtype]) if _saves_state(x, c, backend, save_for_backward) else 0,),
                    dtype=torch.uint8),
    )


def _moe_backward_fake(x, gate_weight, gate_bias, noise_weight, selection_bias, w1, b1, w2, b2,
                       shared_w1, shared_b1, shared_w2, shared_b2, forced_topk_idx, config,
                       tokens_per_rank, training, seed, token_offset, backend, dy, d_aux, d_z, saved=None):
    """Gradient shapes: like each present input, empty [0] for absent ones."""
    _check_devices(x, gate_weight=gate_weight, w1=w1, w2=w2, dy=dy)
    def like(t):
        return x.new_empty((0,)) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)
    return tuple(like(t) for t in (x, gate_weight, gate_bias, noise_weight, w1, b1, w2, b2,
                                   shared_w1, shared_b1, shared_w2, shared_b2))


def _setup_context(ctx, inputs, output):
    _, topk_idx, topk_weight, kept, expert_counts, kept_counts, _, _, saved = output
    ctx.save_for_backward(*inputs[:_NUM_TENSOR_INPUTS], saved)
    ctx.call_args = tuple(inputs[_NUM_TENSOR_INPUTS:_NUM_TENSOR_INPUTS + _NUM_CALL_ARGS])  # config, ...
    ctx.mark_non_differentiable(topk_idx, topk_weight, kept, expert_counts, kept_counts, saved)
    # Outputs without a gradient arrive as None (handled in _backward) instead of zero tensors:
    # materialised, the saved-state buffer's alone was a 0.5 ms fill per step on mixtral.
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, d_topk_idx, d_topk_weight, d_kept, d_expert_counts, d_kept_counts,
              d_aux, d_z, d_saved):
    saved = ctx.saved_tensors[:_NUM_TENSOR_INPUTS]
    state = ctx.saved_tensors[_NUM_TENSOR_INPUTS]
    x = saved[0]
    if dy is None:
        dy = torch.zeros_like(x)
    if d_aux is None:
        d_aux = x.new_zeros(())
    if d_z is None:
        d_z = x.new_zeros(())
    grads = torch.ops.fusedmoe.moe_backward(*saved, *ctx.call_args, dy.contiguous(), d_aux, d_z,
                                            state if state.numel() > 0 else None)
    by_name = dict(zip(_GRAD_INPUTS, grads))
    result = []
    for name, tensor in zip(FORWARD_INPUTS, list(saved) + list(ctx.call_args)):
        if name in by_name and tensor is not None:
            result.append(by_name[name])
        else:
            result.append(None)
    # save_for_backward (when the caller passed it; extra trailing Nones are allowed)
    result += [None] * (len(FORWARD_INPUTS) - len(result))
    return tuple(result)


def register() -> None:
    """Registers the fake kernels and the autograd formula (once; after the library is loaded)."""
    global _registered
    if _registered:
        return
    torch.library.register_fake("fusedmoe::moe_forward")(_moe_forward_fake)
    torch.library.register_fake("fusedmoe::moe_backward")(_moe_backward_fake)
    torch.library.register_autograd("fusedmoe::moe_forward", _backward, setup_context=_setup_context)
    _registered = True
