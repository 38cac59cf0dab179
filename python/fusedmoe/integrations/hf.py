# python/fusedmoe/integrations/hf.py — Hugging Face transformers integration: patch(model)
# replaces every sparse MoE block of a Mixtral (MixtralSparseMoeBlock) or Qwen3-MoE
# (Qwen3MoeSparseMoeBlock) model by FusedSparseMoeBlock, a wrapper holding a fusedmoe.MoE with
# the same weights and routing; unpatch(model) puts blocks of the original classes back (e.g.
# before save_pretrained).
#
# Weight mapping (E experts, H hidden, I intermediate size):
#   router weight [E, H]                          → moe.gate.weight [E, H]
#   gate / up projections (gate half first)       → moe.experts.w1 [E, H, 2I] (K × N: x · w1)
#   down projection                               → moe.experts.w2 [E, I, H]
# transformers >= 5 stores the experts as fused 3-D parameters, gate_up_proj [E, 2I, H] and
# down_proj [E, H, I] ([E, H, 2I] / [E, I, H] when the experts class sets is_transposed; biases
# gate_up_proj_bias [E, 2I] / down_proj_bias [E, H] when it sets has_bias); transformers 4.x
# stores one MLP per expert (Mixtral: w1 gate, w3 up, w2 down; Qwen3-MoE: gate_proj, up_proj,
# down_proj; nn.Linear weights [out, in]). Both layouts are read and written.
#
# Routing, as the blocks do it: Mixtral softmax over all E logits, top-k, renormalised (in training
# with router_jitter_noise > 0 the block's input is first multiplied by U(1 − j, 1 + j), for the
# router and the experts alike); Qwen3-MoE the same with renormalisation iff config.norm_topk_prob.
# Expert activation: silu → SwiGLU, exact gelu → GeGLU (checked numerically on the block's own
# activation module; anything else raises ValueError).
#
# Return value: what the original block returns, found by calling it once on one zero token:
# transformers >= 5 returns the hidden states [B, S, H] (router logits are recorded by output
# hooks on the router class: the wrapper then feeds the logits x·Wgᵀ to a parameter-free
# subclass of that router class, so output_router_logits=True and the HF aux loss still work);
# transformers 4.x returns (hidden_states [B, S, H], router_logits [B·S, E]).
#
# Balance losses: fusedmoe.balance_loss(model) finds the MoE layers inside the wrappers.
# Test: tests/python/test_integrations_hf.py (tiny random Mixtral and Qwen3-MoE models, fp32).
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..moe import MoE

__all__ = ["SUPPORTED_BLOCKS", "FusedSparseMoeBlock", "convert_block", "patch", "unpatch"]

# Block class name → model family. Matched by name so that no transformers import is needed and
# every transformers version's class is found.
SUPPORTED_BLOCKS = {"MixtralSparseMoeBlock": "mixtral", "Qwen3MoeSparseMoeBlock": "qwen3_moe"}
# Per-expert linear names of transformers 4.x blocks: (gate, up, down).
_LEGACY_EXPERT_LINEARS = {"mixtral": ("w1", "w3", "w2"), "qwen3_moe": ("gate_proj", "up_proj", "down_proj")}

_returns_tuple_cache: Dict[type, bool] = {}
_probe_classes: Dict[type, type] = {}


# --- reading a block --------------------------------------------------------------------------
def _ffn_kind(act: nn.Module) -> str:
    """"swiglu" or "geglu" for the block's activation module (compared numerically)."""
    probe = torch.linspace(-6.0, 6.0, 97, dtype=torch.float64)
    with torch.no_grad():
        try:
            value = act(probe.float()).double()
        except Exception as error:  # noqa: BLE001 (any failure means: not an activation we know)
            raise ValueError(f"hidden_act: cannot evaluate the experts' activation {act!r}: {error}") from None
    if torch.allclose(value, F.silu(probe), rtol=0, atol=1e-6):
        return "swiglu"
    if torch.allclose(value, F.gelu(probe), rtol=0, atol=1e-6):
        return "geglu"
    raise ValueError(f"hidden_act: the experts' activation {type(act).__name__} is neither silu nor exact "
                     "gelu; fusedmoe supports SwiGLU (silu) and GeGLU (exact gelu) gated experts")


def _expert_weights(block: nn.Module, kind: str):
    """(w1 [E, H, 2I], b1 [E, 2I] | None, w2 [E, I, H], b2 [E, H] | None, activation module)."""
    experts = block.experts
    if hasattr(experts, "gate_up_proj"):  # transformers >= 5: fused 3-D parameters
        if not getattr(experts, "has_gate", True):
            raise ValueError(f"{type(experts).__name__}: has_gate = False (no gate projection) is not supported")
        if not getattr(experts, "is_concatenated", True):
            raise ValueError(f"{type(experts).__name__}: an interleaved gate/up layout is not supported")
        transposed = bool(getattr(experts, "is_transposed", False))
        gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
        w1 = gate_up if transposed else gate_up.transpose(1, 2)
        w2 = down if transposed else down.transpose(1, 2)
        b1 = b2 = None
        if getattr(experts, "has_bias", False):
            b1, b2 = experts.gate_up_proj_bias.detach(), experts.down_proj_bias.detach()
        return w1, b1, w2, b2, experts.act_fn
    if isinstance(experts, nn.ModuleList) and len(experts) > 0:  # transformers 4.x: one MLP per expert
        gate_name, up_name, down_name = _LEGACY_EXPERT_LINEARS[kind]
        w1, w2, b1, b2 = [], [], [], []
        for mlp in experts:
            gate, up, down = getattr(mlp, gate_name), getattr(mlp, up_name), getattr(mlp, down_name)
            w1.append(torch.cat([gate.weight.detach().t(), up.weight.detach().t()], dim=1))
            w2.append(down.weight.detach().t())
            if gate.bias is not None:
                b1.append(torch.cat([gate.bias.detach(), up.bias.detach()]))
                b2.append(down.bias.detach())
        return (torch.stack(w1), torch.stack(b1) if b1 else None, torch.stack(w2),
                torch.stack(b2) if b2 else None, experts[0].act_fn)
    raise ValueError(f"{type(block).__name__}.experts: neither fused expert parameters (gate_up_proj, "
                     f"down_proj) nor a list of expert MLPs, but {type(experts).__name__}")


def _write_expert_weights(block: nn.Module, kind: str, w1, b1, w2, b2) -> None:
    """Inverse of _expert_weights: copies fusedmoe-layout weights into a fresh HF block."""
    experts = block.experts
    with torch.no_grad():
        if hasattr(experts, "gate_up_proj"):
            transposed = bool(getattr(experts, "is_transposed", False))
            experts.gate_up_proj.copy_(w1 if transposed else w1.transpose(1, 2))
            experts.down_proj.copy_(w2 if transposed else w2.transpose(1, 2))
            if getattr(experts, "has_bias", False):
                experts.gate_up_proj_bias.copy_(b1)
                experts.down_proj_bias.copy_(b2)
            return
        gate_name, up_name, down_name = _LEGACY_EXPERT_LINEARS[kind]
        inter = w2.shape[1]
        for e, mlp in enumerate(experts):
            gate, up, down = getattr(mlp, gate_name), getattr(mlp, up_name), getattr(mlp, down_name)
            gate.weight.copy_(w1[e, :, :inter].t())
            up.weight.copy_(w1[e, :, inter:].t())
            down.weight.copy_(w2[e].t())
            if gate.bias is not None:
                gate.bias.copy_(b1[e, :inter])
                up.bias.copy_(b1[e, inter:])
                down.bias.copy_(b2[e])


def _top_k_and_renormalize(block: nn.Module, kind: str, config) -> Tuple[int, bool]:
    top_k = getattr(block, "top_k", None) or getattr(block.gate, "top_k", None) \
        or getattr(config, "num_experts_per_tok", None)
    if top_k is None:
        raise ValueError(f"{type(block).__name__}: cannot find top_k (block.top_k, block.gate.top_k, "
                         "config.num_experts_per_tok)")
    if kind == "mixtral":
        return int(top_k), True
    for owner in (block.gate, block, config):
        if owner is not None and hasattr(owner, "norm_topk_prob"):
            return int(top_k), bool(owner.norm_topk_prob)
    raise ValueError(f"{type(block).__name__}: cannot find norm_topk_prob (gate, block or config)")


def _returns_tuple(block: nn.Module, hidden: int) -> bool:
    """Whether the block's forward returns (hidden_states, router_logits): one call on one zero
    token (cached per class); on the meta device, transformers 4.x's per-expert list says so."""
    cls = type(block)
    if cls in _returns_tuple_cache:
        return _returns_tuple_cache[cls]
    weight = block.gate.weight
    if weight.device.type == "meta":
        return isinstance(block.experts, nn.ModuleList)
    was_training = block.training
    block.eval()
    try:
        with torch.no_grad():
            out = block(torch.zeros(1, 1, hidden, dtype=weight.dtype, device=weight.device))
    finally:
        block.train(was_training)
    _returns_tuple_cache[cls] = isinstance(out, tuple)
    return _returns_tuple_cache[cls]


def _router_probe_class(router_cls: type) -> type:
    """A parameter-free subclass of the HF router class whose forward returns (logits,): the
    model's output hooks, installed on instances of the router class, record it."""
    if router_cls not in _probe_classes:
        def __init__(self, gate: nn.Module):
            nn.Module.__init__(self)
            object.__setattr__(self, "_gate", gate)  # not a child: its parameters stay the MoE's

        def weight(self):
            return self._gate.weight  # so that the model's _init_weights reaches the MoE's router

        def forward(self, x: torch.Tensor) -> tuple:
            return (F.linear(x, self._gate.weight, self._gate.bias),)

        def extra_repr(self) -> str:
            return "router logits of the fused MoE (for output_router_logits)"

        _probe_classes[router_cls] = type(f"FusedRouterLogits{router_cls.__name__}", (router_cls,), {
            "__init__": __init__, "weight": property(weight), "forward": forward, "extra_repr": extra_repr,
            "__module__": __name__})
    return _probe_classes[router_cls]


def _router_logits_requested() -> bool:
    """Whether a transformers >= 5 model forward is collecting router logits right now."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return False
    if torch.compiler.is_compiling():
        collected = getattr(_active_collector, "global_var", None) if getattr(_active_collector, "compiling", False) \
            else None
    else:
        collected = _active_collector.get()
    return isinstance(collected, dict) and "router_logits" in collected


# --- the wrapper --------------------------------------------------------------------------------
class FusedSparseMoeBlock(nn.Module):
    """A Mixtral / Qwen3-MoE sparse MoE block computed by fusedmoe.MoE.

    Args:
        moe: the fusedmoe.MoE (softmax gate, SwiGLU or GeGLU experts) holding the weights.
        kind: "mixtral" or "qwen3_moe".
        jitter_noise: Mixtral's router_jitter_noise (in training the input is multiplied by
            U(1 − j, 1 + j) before routing and the experts; 0 = off).
        returns_router_logits: forward returns (y, router_logits) as transformers 4.x blocks do.
        router_class: the HF router class (transformers >= 5) whose output hooks record router
            logits, or None.
        original_class: the replaced block's class (for unpatch()).
        hf_config: the model config the original block was built from (for unpatch()).
    Submodules: moe (fusedmoe.MoE), router_logits (parameter-free, or None).
    forward(hidden_states [B, S, H]) → y [B, S, H], or (y, router_logits [B·S, E]).
    """

    def __init__(self, moe: MoE, kind: str, *, jitter_noise: float = 0.0, returns_router_logits: bool = False,
                 router_class: Optional[type] = None, original_class: Optional[type] = None, hf_config=None):
        super().__init__()
        if kind not in SUPPORTED_BLOCKS.values():
            raise ValueError(f"kind = {kind!r}: must be one of {sorted(SUPPORTED_BLOCKS.values())}")
        self.moe = moe
        self.kind = kind
        self.jitter_noise = float(jitter_noise)
        self.returns_router_logits = bool(returns_router_logits)
        self.router_logits = _router_probe_class(router_class)(moe.gate) if router_class is not None else None
        self.original_class = original_class
        self.hf_config = hf_config

    def forward(self, hidden_states: torch.Tensor):
        """Args: hidden_states [B, S, H] (any leading shape), the model dtype.
        Returns: y of the same shape, or (y, router_logits [B·S, E]) when returns_router_logits."""
        x = hidden_states
        if self.training and self.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        y = self.moe(x)
        if self.returns_router_logits:
            gate = self.moe.gate
            return y, F.linear(x.reshape(-1, x.shape[-1]), gate.weight, gate.bias)
        if self.router_logits is not None and _router_logits_requested():
            self.router_logits(x.reshape(-1, x.shape[-1]))
        return y

    def extra_repr(self) -> str:
        return f"kind={self.kind}, jitter_noise={self.jitter_noise}, returns_router_logits={self.returns_router_logits}"


def _text_config(config):
    if config is not None and not hasattr(config, "num_experts_per_tok") and hasattr(config, "get_text_config"):
        return config.get_text_config()
    return config


def convert_block(block: nn.Module, config=None, *, backend: str = "auto",
                  fp32_math: str = "tf32") -> FusedSparseMoeBlock:
    """A FusedSparseMoeBlock computing what `block` computes, with a copy of its weights.

    Args:
        block: a MixtralSparseMoeBlock or Qwen3MoeSparseMoeBlock (any transformers version).
        config: the model config (used when the block itself lacks top_k / norm_topk_prob, and
            kept for unpatch()); None = the experts module's config when it has one.
        backend: fusedmoe.MoE backend ("auto", "cpu", "naive", "reference").
        fp32_math: fusedmoe.MoE fp32_math ("tf32" or "exact") for fp32 models on GPUs.
    Returns:
        the wrapper, on the block's device and dtype, in the block's training mode.
    Raises:
        ValueError for an unsupported block class, layout or activation.
    """
    kind = SUPPORTED_BLOCKS.get(type(block).__name__)
    if kind is None:
        raise ValueError(f"block: {type(block).__name__} is not a supported sparse MoE block "
                         f"({', '.join(SUPPORTED_BLOCKS)})")
    config = _text_config(config if config is not None else getattr(block.experts, "config", None))
    router = block.gate
    gate_weight = router.weight.detach()
    gate_bias = getattr(router, "bias", None)
    num_experts, hidden = gate_weight.shape
    top_k, renormalize = _top_k_and_renormalize(block, kind, config)
    w1, b1, w2, b2, act = _expert_weights(block, kind)
    if w1.shape[0] != num_experts or w1.shape[1] != hidden or w2.shape != (num_experts, w1.shape[2] // 2, hidden):
        raise ValueError(f"{type(block).__name__}: expert weights w1 {list(w1.shape)}, w2 {list(w2.shape)} do not "
                         f"fit E = {num_experts}, H = {hidden}")
    returns_tuple = _returns_tuple(block, hidden)
    moe = MoE(num_experts=num_experts, d_model=hidden, d_ffn=w2.shape[1], top_k=top_k, gate="softmax",
              ffn=_ffn_kind(act), renormalize=renormalize, expert_bias=b1 is not None,
              gate_bias=gate_bias is not None, dtype=gate_weight.dtype, device=gate_weight.device,
              backend=backend, fp32_math=fp32_math)
    with torch.no_grad():
        moe.gate.weight.copy_(gate_weight)
        if gate_bias is not None:
            moe.gate.bias.copy_(gate_bias.detach())
        moe.experts.w1.copy_(w1)
        moe.experts.w2.copy_(w2)
        if b1 is not None:
            moe.experts.b1.copy_(b1)
            moe.experts.b2.copy_(b2)
    router_class = None if returns_tuple or isinstance(router, nn.Linear) else type(router)
    wrapper = FusedSparseMoeBlock(moe, kind, jitter_noise=getattr(block, "jitter_noise", 0.0) or 0.0,
                                  returns_router_logits=returns_tuple, router_class=router_class,
                                  original_class=type(block), hf_config=config)
    return wrapper.train(block.training)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def patch(model: nn.Module, *, backend: str = "auto", fp32_math: str = "tf32") -> List[str]:
    """Replaces every Mixtral / Qwen3-MoE sparse MoE block of `model` by a FusedSparseMoeBlock
    (in place; the original blocks and their weights are dropped). The fused blocks hold new
    parameters: build the optimizer after patching.

    Args:
        model: a transformers model (MixtralForCausalLM, Qwen3MoeModel, ...) or any nn.Module
            containing such blocks.
        backend: fusedmoe.MoE backend ("auto", "cpu", "naive", "reference").
        fp32_math: fusedmoe.MoE fp32_math ("tf32" or "exact").
    Returns:
        the names of the replaced blocks (empty when the model was already patched).
    Raises:
        ValueError when the model has no supported block and no patched one.
    """
    targets = [(name, m) for name, m in model.named_modules() if type(m).__name__ in SUPPORTED_BLOCKS]
    if not targets:
        if any(isinstance(m, FusedSparseMoeBlock) for m in model.modules()):
            return []
        raise ValueError(f"model: {type(model).__name__} has no {' or '.join(SUPPORTED_BLOCKS)} to patch")
    config = getattr(model, "config", None)
    for name, block in targets:
        wrapper = convert_block(block, config, backend=backend, fp32_math=fp32_math)
        _set_submodule(model, name, wrapper)
        if wrapper.router_logits is not None and _hooks_already_installed(model, name):
            _install_router_logits_hook(wrapper.router_logits)
    return [name for name, _ in targets]


def _hooks_already_installed(model: nn.Module, name: str) -> bool:
    """Whether a transformers model above `name` has installed its output hooks already (they
    are installed once, at the first forward that records outputs, so a block added later would
    be missed)."""
    parts = name.split(".")
    for depth in range(len(parts)):
        owner = model.get_submodule(".".join(parts[:depth])) if depth else model
        if getattr(owner, "_output_capturing_hooks_installed", False):
            return True
    return False


def _install_router_logits_hook(probe: nn.Module) -> None:
    try:
        from transformers.utils.output_capturing import install_output_capuring_hook as install
    except ImportError:
        try:
            from transformers.utils.output_capturing import install_output_capturing_hook as install
        except ImportError:
            return
    install(probe, "router_logits", 0)


def unpatch(model: nn.Module) -> List[str]:
    """Replaces every FusedSparseMoeBlock of `model` by a block of the original class with the
    fused layer's current weights (e.g. after training, before save_pretrained).

    Args:
        model: a model patched by patch().
    Returns:
        the names of the restored blocks.
    """
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, FusedSparseMoeBlock)]
    for name, wrapper in targets:
        if wrapper.original_class is None or wrapper.hf_config is None:
            raise ValueError(f"{name}: the wrapper does not know its original block class and config")
        moe = wrapper.moe
        block = wrapper.original_class(wrapper.hf_config).to(device=moe.experts.w1.device,
                                                             dtype=moe.experts.w1.dtype)
        ex = moe.experts
        _write_expert_weights(block, wrapper.kind, ex.w1.detach(), None if ex.b1 is None else ex.b1.detach(),
                              ex.w2.detach(), None if ex.b2 is None else ex.b2.detach())
        with torch.no_grad():
            block.gate.weight.copy_(moe.gate.weight)
            if moe.gate.bias is not None:
                block.gate.bias.copy_(moe.gate.bias)
        _set_submodule(model, name, block.train(wrapper.training))
    return [name for name, _ in targets]
