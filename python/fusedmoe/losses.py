# python/fusedmoe/losses.py — combining the balance losses of every MoE layer in a model.
#
# Each fusedmoe.MoE stores the aux (load-balancing) loss and the router z-loss of its last
# forward call; a training step adds   aux_coef · Σ aux + z_coef · Σ z   over all layers:
#
#     loss = task_loss + fusedmoe.balance_loss(model, aux_coef=1e-2, z_coef=1e-3)
#
# Test: tests/python/test_modules.py, tests/python/test_tiny_model.py.
from __future__ import annotations

from typing import List

import torch
from torch import nn

__all__ = ["moe_modules", "aux_losses", "z_losses", "balance_loss", "update_selection_biases"]


def moe_modules(model: nn.Module) -> List[nn.Module]:
    """Every fusedmoe.MoE inside `model` (including model itself), in module order.

    Args:
        model: any nn.Module.
    """
    from .moe import MoE
    # An explicit walk over _modules (not model.modules()) keeps torch.compile from breaking the
    # graph when the model was changed in the same frame.
    found, seen, stack = [], set(), [model]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        if isinstance(module, MoE):
            found.append(module)
        stack.extend(reversed([m for m in module._modules.values() if m is not None]))
    return found


def aux_losses(model: nn.Module) -> List[torch.Tensor]:
    """The aux losses (0-dim tensors) of the MoE layers of `model` that have run forward.

    Args:
        model: any nn.Module.
    """
    return [m.aux_loss for m in moe_modules(model) if m.aux_loss is not None]


def z_losses(model: nn.Module) -> List[torch.Tensor]:
    """The z-losses (0-dim tensors) of the MoE layers of `model` that have run forward.

    Args:
        model: any nn.Module.
    """
    return [m.z_loss for m in moe_modules(model) if m.z_loss is not None]


def balance_loss(model: nn.Module, aux_coef: float = 1e-2, z_coef: float = 1e-3) -> torch.Tensor:
    """aux_coef · Σ aux_loss + z_coef · Σ z_loss over the MoE layers of `model` (differentiable).

    Args:
        model: any nn.Module containing fusedmoe.MoE layers.
        aux_coef: weight of the load-balancing losses (Switch uses 1e-2).
        z_coef: weight of the router z-losses (ST-MoE uses 1e-3).
    Returns:
        0-dim tensor; 0 when no MoE layer has run forward yet.
    Raises:
        ValueError naming aux_coef / z_coef when negative.
    """
    if aux_coef < 0:
        raise ValueError(f"aux_coef = {aux_coef}: must be >= 0")
    if z_coef < 0:
        raise ValueError(f"z_coef = {z_coef}: must be >= 0")
    total = None
    for m in moe_modules(model):
        if m.aux_loss is None:
            continue
        term = aux_coef * m.aux_loss + z_coef * m.z_loss
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total


@torch.no_grad()
def update_selection_biases(model: nn.Module, rate: float = 1e-3) -> int:
    """Aux-loss-free balancing (DeepSeek-V3) for every sigmoid-gated MoE layer of `model`:
    nudges each gate's selection_bias by its last expert counts.

    Args:
        model: any nn.Module.
        rate: update speed γ.
    Returns:
        the number of layers updated.
    """
    from .gates import SigmoidTopKGate
    updated = 0
    for m in moe_modules(model):
        if isinstance(m.gate, SigmoidTopKGate) and m.last_expert_counts is not None:
            m.gate.update_selection_bias(m.last_expert_counts, rate)
            updated += 1
    return updated
