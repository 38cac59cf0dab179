# tests/python/test_tiny_model.py — end-to-end training of a tiny MoE model on CPU:
# embedding → 2 × (LayerNorm → fusedmoe.MoE, residual) → linear head, trained 200 Adam steps on a
# fixed synthetic task (each token's target is a fixed random permutation of its id), with the
# balance losses added. The final loss must be at least 30% below the step-0 loss.
# Run: see conftest.py (takes a few seconds).
import torch
from torch import nn

import fusedmoe

VOCAB = 32
D_MODEL = 32


class TinyMoeModel(nn.Module):
    """embedding [V, H] → 2 MoE blocks with residuals → head [H, V].

    Args:
        gates: gate name of each block.
    """

    def __init__(self, gates=("softmax", "noisy")):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D_MODEL)
        self.norms = nn.ModuleList(nn.LayerNorm(D_MODEL) for _ in gates)
        self.blocks = nn.ModuleList(
            fusedmoe.MoE(num_experts=4, d_model=D_MODEL, d_ffn=32, top_k=2, gate=gate, ffn="swiglu",
                         num_shared_experts=1, shared_ffn_size=16, capacity_factor=2.0)
            for gate in gates)
        self.head = nn.Linear(D_MODEL, VOCAB)

    def forward(self, tokens):
        """tokens: [B, S] int64 → logits [B, S, V]."""
        h = self.embed(tokens)
        for norm, block in zip(self.norms, self.blocks):
            h = h + block(norm(h))
        return self.head(h)


def test_tiny_moe_model_learns():
    generator = torch.Generator().manual_seed(1234)  # the task is fixed; the model init is seeded
    permutation = torch.randperm(VOCAB, generator=generator)
    data = torch.randint(0, VOCAB, (16, 8, 16), generator=generator)  # 16 batches of [8, 16]
    model = TinyMoeModel()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    for step in range(200):
        tokens = data[step % data.shape[0]]
        logits = model(tokens)
        task = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), permutation[tokens].reshape(-1))
        loss = task + fusedmoe.balance_loss(model, aux_coef=1e-2, z_coef=1e-3)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(task.item())
        assert torch.isfinite(loss), f"step {step}: loss {loss.item()}"
    first, last = losses[0], sum(losses[-10:]) / 10
    print(f"task loss: step 0 {first:.4f}, mean of the last 10 steps {last:.4f}")
    assert last < 0.7 * first, f"loss went from {first:.4f} to {last:.4f} (less than 30% lower)"
    for block in model.blocks:
        stats = block.load_stats()
        assert stats["calls"] == 200 and stats["tokens"] == 200 * 8 * 16
        assert int((stats["routed"] > 0).sum()) >= 2, "routing collapsed onto one expert"
