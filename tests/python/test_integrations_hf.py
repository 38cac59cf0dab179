# tests/python/test_integrations_hf.py — fusedmoe.integrations.hf on tiny random Hugging Face
# models (fp32, CPU): the patched Mixtral / Qwen3-MoE block equals the original block (output,
# gradients of the input and of every weight, Mixtral's training-mode jitter), the patched
# models' logits, router logits, HF aux loss and every parameter's gradient in a training step
# equal the originals', unpatch() restores the original classes bit-exactly, transformers
# 4.x-style blocks (per-expert MLP lists, returning (hidden_states, router_logits)) are handled,
# and patched models save / load through fusedmoe.checkpoint. Router weights are drawn with
# std 1 (HF initialises them with std 0.02, which makes the top-k probabilities near-ties), so the
# fp32 (HF) and fp64 (fusedmoe CPU) routers pick the same experts.
# Needs transformers (requirements-dev.txt); without it the module is skipped with the reason.
# Run: see conftest.py.
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -r "
                                                          "requirements-dev.txt)")
from transformers import (MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig,  # noqa: E402
                          Qwen3MoeForCausalLM)

import fusedmoe  # noqa: E402
from fusedmoe import checkpoint  # noqa: E402
from fusedmoe.integrations import hf  # noqa: E402
from moe_testing import rel_err  # noqa: E402

FP32_TOL = 1e-5
# Gradients of the whole model (embedding included) sum the MoE layers' fp32 results over every
# token in another order than the original model: they were seen at up to 1.05e-5.
FP32_GRAD_TOL = 5e-5
VOCAB = 64


def mixtral_config(**overrides):
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2,
              max_position_embeddings=64)
    kw.update(overrides)
    return MixtralConfig(**kw)


def qwen3_config(**overrides):
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, moe_intermediate_size=24,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8,
              num_experts_per_tok=2, norm_topk_prob=False, max_position_embeddings=64)
    kw.update(overrides)
    return Qwen3MoeConfig(**kw)


def separate_routers(model):
    """Router weights with std 1 and experts with std 0.1: well-separated top-k probabilities."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") and p.dim() == 2 and p.shape[0] < p.shape[1]:
                p.normal_(0.0, 1.0)
            elif "experts" in name:
                p.normal_(0.0, 0.1)
    return model


def routing_margin(block, x):
    """Smallest gap between the k-th and (k+1)-th router probability over the tokens of x."""
    probs = torch.softmax(F.linear(x.detach().reshape(-1, x.shape[-1]).double(),
                                   block.gate.weight.detach().double()), -1)
    top = torch.topk(probs, block.gate.top_k + 1, dim=-1).values
    return float((top[:, -2] - top[:, -1]).min())


def block_case(family):
    config = mixtral_config() if family == "mixtral" else qwen3_config()
    model = separate_routers((MixtralForCausalLM if family == "mixtral" else Qwen3MoeForCausalLM)(config))
    return config, model.model.layers[0].mlp


def expert_grads(block):
    """HF-layout gradients in fusedmoe layout: (router [E, H], w1 [E, H, 2I], w2 [E, I, H])."""
    ex = block.experts
    return block.gate.weight.grad, ex.gate_up_proj.grad.transpose(1, 2), ex.down_proj.grad.transpose(1, 2)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_patched_block_equals_original_block(family):
    config, block = block_case(family)
    assert type(block).__name__ == {"mixtral": "MixtralSparseMoeBlock", "qwen3_moe": "Qwen3MoeSparseMoeBlock"}[family]
    fused = hf.convert_block(block, config)
    assert isinstance(fused.moe, fusedmoe.MoE) and fused.moe.ffn == "swiglu"
    assert fused.moe.gate.renormalize == (family == "mixtral")  # Qwen3: norm_topk_prob = False here
    assert torch.equal(fused.moe.experts.w1, block.experts.gate_up_proj.transpose(1, 2))
    x = torch.randn(3, 5, 32, requires_grad=True)
    print(f"routing margin {routing_margin(block, x):.3e}")
    dy = torch.randn(3, 5, 32)
    y_ref = block(x)
    (gx_ref,) = torch.autograd.grad((y_ref * dy).sum(), x, retain_graph=True)
    (y_ref * dy).sum().backward()
    y = fused(x)
    assert not isinstance(y, tuple) and y.shape == x.shape
    err = rel_err(y, y_ref)
    assert err < FP32_TOL, f"output: relative error {err:.2e}"
    loss = (y * dy).sum()
    gx, gg, gw1, gw2 = torch.autograd.grad(loss, [x, fused.moe.gate.weight, fused.moe.experts.w1,
                                                  fused.moe.experts.w2])
    for name, got, want in zip(("dx", "d_router", "d_w1", "d_w2"), (gx, gg, gw1, gw2), (gx_ref, *expert_grads(block))):
        err = rel_err(got, want)
        assert err < FP32_TOL, f"{name}: relative error {err:.2e}"


def test_mixtral_training_jitter_matches():
    config, block = block_case("mixtral")
    block.jitter_noise = 0.1
    block.train()
    fused = hf.convert_block(block, config)
    assert fused.training and fused.jitter_noise == 0.1
    x = torch.randn(4, 6, 32)
    torch.manual_seed(11)
    y_ref = block(x.clone())  # the HF block scales its input in place
    torch.manual_seed(11)
    y = fused(x)
    assert rel_err(y, y_ref) < FP32_TOL
    torch.manual_seed(12)
    assert rel_err(fused(x), y_ref) > 1e-4  # other noise, other output: the jitter is on


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_patched_model_logits_router_logits_and_aux_loss(family):
    config = mixtral_config() if family == "mixtral" else qwen3_config(norm_topk_prob=True)
    cls = MixtralForCausalLM if family == "mixtral" else Qwen3MoeForCausalLM
    model = separate_routers(cls(config)).eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        ref = model(ids, labels=ids, output_router_logits=True)
    patched = copy.deepcopy(model)  # its output hooks are already installed: patch() must hook the new blocks
    names = hf.patch(patched)
    assert names == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert hf.patch(patched) == []  # idempotent
    assert len(fusedmoe.moe_modules(patched)) == 2
    with torch.no_grad():
        out = patched(ids, labels=ids, output_router_logits=True)
    err = rel_err(out.logits, ref.logits)
    print(f"{family}: logits relative error {err:.2e}")
    assert err < FP32_TOL
    assert len(out.router_logits) == 2
    for got, want in zip(out.router_logits, ref.router_logits):
        assert rel_err(got, want) < FP32_TOL
    assert abs(float(out.aux_loss) - float(ref.aux_loss)) < 1e-5 * abs(float(ref.aux_loss))
    assert abs(float(out.loss) - float(ref.loss)) < 1e-5 * abs(float(ref.loss))
    # A training step (HF loss incl. its aux loss through the recorded router logits): the same
    # loss and gradients as the original model, every parameter mapped to its fused layout.
    model.train(), patched.train()
    ref = model(ids, labels=ids, output_router_logits=True)
    ref.loss.backward()
    out = patched(ids, labels=ids, output_router_logits=True)
    out.loss.backward()
    assert rel_err(out.loss, ref.loss) < FP32_TOL
    fused_params = dict(patched.named_parameters())
    worst = 0.0
    for name, p in model.named_parameters():
        if ".mlp.experts." in name:
            prefix, _, leaf = name.partition(".experts.")
            got = fused_params[f"{prefix}.moe.experts.{'w1' if leaf == 'gate_up_proj' else 'w2'}"].grad.transpose(1, 2)
        elif ".mlp.gate." in name:
            got = fused_params[name.replace(".mlp.gate.", ".mlp.moe.gate.")].grad
        else:
            got = fused_params[name].grad
        err = rel_err(got, p.grad)
        worst = max(worst, err)
        assert err < FP32_GRAD_TOL, f"gradient of {name}: relative error {err:.2e}"
    print(f"{family}: worst gradient relative error {worst:.2e}")
    patched.zero_grad()
    (patched(ids, labels=ids).loss + fusedmoe.balance_loss(patched)).backward()  # fusedmoe's own losses
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in patched.parameters())
    # unpatch restores the original classes and weights bit for bit.
    patched.eval()
    assert hf.unpatch(patched) == names
    assert type(patched.model.layers[0].mlp) is type(model.model.layers[0].mlp)
    for (n, p), (n2, p2) in zip(model.state_dict().items(), patched.state_dict().items()):
        assert n == n2 and torch.equal(p, p2), n
    with torch.no_grad():
        assert torch.equal(patched(ids).logits, model(ids).logits)


def test_patched_model_checkpoint_round_trip(tmp_path):
    model = separate_routers(MixtralForCausalLM(mixtral_config())).eval()
    hf.patch(model)
    files = checkpoint.save_checkpoint(model, tmp_path / "mixtral.safetensors", world_size=2)
    other = separate_routers(MixtralForCausalLM(mixtral_config())).eval()
    hf.patch(other)
    checkpoint.load_checkpoint(other, files)
    ids = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        assert torch.equal(other(ids).logits, model(ids).logits)


def test_transposed_expert_layout():
    config, block = block_case("mixtral")
    x = torch.randn(2, 4, 32)
    y_ref = block(x)
    ex = block.experts
    ex.is_transposed = True
    ex.gate_up_proj = nn.Parameter(ex.gate_up_proj.detach().transpose(1, 2).contiguous())  # [E, H, 2I]
    ex.down_proj = nn.Parameter(ex.down_proj.detach().transpose(1, 2).contiguous())        # [E, I, H]
    assert rel_err(block(x), y_ref) < FP32_TOL  # the HF experts use the transposed layout now
    fused = hf.convert_block(block, config)
    assert rel_err(fused(x), y_ref) < FP32_TOL


def test_bad_models_raise():
    with pytest.raises(ValueError, match=r"has no MixtralSparseMoeBlock or Qwen3MoeSparseMoeBlock to patch"):
        hf.patch(nn.Sequential(nn.Linear(4, 4)))
    config = mixtral_config(hidden_act="gelu_pytorch_tanh")
    model = MixtralForCausalLM(config)
    with pytest.raises(ValueError, match=r"hidden_act: the experts' activation \w+ is neither silu nor exact gelu"):
        hf.patch(model)
    with pytest.raises(ValueError, match=r"block: Linear is not a supported sparse MoE block"):
        hf.convert_block(nn.Linear(2, 2))


# --- transformers 4.x-style blocks: one MLP per expert, forward returns (y, router_logits) ---------
class _LegacyMLP(nn.Module):
    def __init__(self, hidden, inter, names):
        super().__init__()
        gate, up, down = names
        setattr(self, gate, nn.Linear(hidden, inter, bias=False))
        setattr(self, up, nn.Linear(hidden, inter, bias=False))
        setattr(self, down, nn.Linear(inter, hidden, bias=False))
        self.names = names
        self.act_fn = nn.SiLU()

    def forward(self, x):
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class _LegacyBlock(nn.Module):
    """The forward of transformers 4.x's MixtralSparseMoeBlock / Qwen3MoeSparseMoeBlock."""

    names = ()
    renormalize = True

    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = self.renormalize
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(_LegacyMLP(config.hidden_size, config.intermediate_size, self.names)
                                     for _ in range(config.num_experts))

    def forward(self, hidden_states):
        b, s, h = hidden_states.shape
        x = hidden_states.view(-1, h)
        router_logits = self.gate(x)
        weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        weights, selected = torch.topk(weights, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(selected == e)
            out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        return out.reshape(b, s, h), router_logits


class MixtralSparseMoeBlock(_LegacyBlock):
    names = ("w1", "w3", "w2")


class Qwen3MoeSparseMoeBlock(_LegacyBlock):
    names = ("gate_proj", "up_proj", "down_proj")
    renormalize = False


@pytest.mark.parametrize("cls", [MixtralSparseMoeBlock, Qwen3MoeSparseMoeBlock])
def test_legacy_block_layout_and_tuple_return(cls):
    class Config:
        hidden_size, intermediate_size, num_experts, num_experts_per_tok = 16, 12, 5, 2

    model = nn.Sequential(cls(Config()), nn.Identity())
    model.config = Config()  # what patch() keeps for unpatch(), as a transformers model's config
    with torch.no_grad():
        model[0].gate.weight.normal_(0.0, 1.0)
    original = copy.deepcopy(model)
    x = torch.randn(2, 7, 16)
    y_ref, logits_ref = original[0](x)
    assert hf.patch(model, fp32_math="exact") == ["0"]
    fused = model[0]
    assert fused.returns_router_logits and fused.router_logits is None
    assert fused.moe.gate.renormalize == cls.renormalize
    y, logits = fused(x)
    assert rel_err(y, y_ref) < FP32_TOL and rel_err(logits, logits_ref) < FP32_TOL
    hf.unpatch(model)
    assert type(model[0]) is cls
    for (n, p), (n2, p2) in zip(original.state_dict().items(), model.state_dict().items()):
        assert n == n2 and torch.equal(p, p2), n
