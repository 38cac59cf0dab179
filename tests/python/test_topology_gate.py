# tests/python/test_topology_gate.py — topology-aware routing (gates.py: ranks_per_node,
# max_remote_choices): the selection on a hand-checked example and against a brute-force optimum,
# the gate modules, and fusedmoe.MoE over 2 gloo processes (one rank per node) on the CPU: every
# token keeps the limit, the routing is the gate's constrained selection, and outputs, dx and
# every gradient equal one process running the whole layer with that routing forced. fp64.
import itertools
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fusedmoe
from fusedmoe import distributed
from fusedmoe.gates import SigmoidTopKGate, SoftmaxTopKGate, make_gate, node_limited_topk

# --- the selection -----------------------------------------------------------------------------
# 6 experts on 3 nodes (two each), one token per node.
EXPERT_NODE = torch.tensor([0, 0, 1, 1, 2, 2])
TOKEN_NODE = torch.tensor([0, 1, 2])
SCORES = torch.tensor([[0.10, 0.20, 0.90, 0.80, 0.70, 0.05],
                       [0.50, 0.40, 0.30, 0.10, 0.20, 0.60],
                       [0.30, 0.30, 0.10, 0.10, 0.30, 0.20]])


def test_selection_by_hand():
    # k = 3, at most 1 remote choice:
    #   token 0 (node 0): 2 (remote, the 1 allowed), 3 and 4 skipped (remote), 1, 0.
    #   token 1 (node 1): 5 (remote), 0 and 1 skipped, 2, 4 skipped, 3.
    #   token 2 (node 2): ties keep the lower index first: 0 (remote), 1 skipped, 4, 5.
    got = node_limited_topk(SCORES, 3, EXPERT_NODE, TOKEN_NODE, 1)
    assert got.tolist() == [[2, 1, 0], [5, 2, 3], [0, 4, 5]]
    assert got.dtype == torch.int64
    # No remote expert at all (k = 2: the node's two experts, best first).
    assert node_limited_topk(SCORES, 2, EXPERT_NODE, TOKEN_NODE, 0).tolist() == [[1, 0], [2, 3], [4, 5]]
    # A limit of k never binds: the plain top-k (stable sort, ties to the lower index).
    plain = torch.sort(SCORES, dim=1, descending=True, stable=True).indices[:, :3]
    assert node_limited_topk(SCORES, 3, EXPERT_NODE, TOKEN_NODE, 3).tolist() == [[2, 3, 4], [5, 0, 1], [0, 1, 4]]
    assert torch.equal(node_limited_topk(SCORES, 3, EXPERT_NODE, TOKEN_NODE, 3), plain)
    # Every token on node 1 (0-dim token_node), k = 2, 1 remote: token 0 takes 2 and 3 (both
    # local); token 1 takes 5 (remote), skips 0, 1, takes 2; token 2 takes 0, skips 1, 4, 5, takes 2.
    assert node_limited_topk(SCORES, 2, EXPERT_NODE, torch.tensor(1), 1).tolist() == [[2, 3], [5, 2], [0, 2]]
    # No tokens.
    assert node_limited_topk(SCORES[:0], 2, EXPERT_NODE, TOKEN_NODE[:0], 1).shape == (0, 2)


def test_selection_errors():
    with pytest.raises(ValueError, match="fewer than top_k"):
        node_limited_topk(SCORES, 3, EXPERT_NODE, TOKEN_NODE, 0)   # a node has only 2 experts
    with pytest.raises(ValueError, match="max_remote"):
        node_limited_topk(SCORES, 2, EXPERT_NODE, TOKEN_NODE, 3)
    with pytest.raises(ValueError, match="top_k"):
        node_limited_topk(SCORES, 7, EXPERT_NODE, TOKEN_NODE, 0)
    with pytest.raises(ValueError, match="expert_node"):
        node_limited_topk(SCORES, 2, EXPERT_NODE[:5], TOKEN_NODE, 1)


def test_selection_is_the_best_allowed_set():
    # The limit is a partition-matroid constraint, so taking experts greedily by score gives the
    # allowed k-set of the largest total score; check against every k-subset.
    gen = torch.Generator().manual_seed(7)
    E, k = 6, 3
    expert_node = torch.tensor([0, 0, 0, 1, 1, 2])   # nodes with 3, 2 and 1 experts
    scores = torch.rand(60, E, generator=gen, dtype=torch.float64)
    token_node = torch.randint(0, 3, (60,), generator=gen)
    for m in range(k + 1):
        local = (expert_node.unsqueeze(0) == token_node.unsqueeze(1)).sum(dim=1)
        ok = local >= k - m                          # tokens whose node can meet the limit
        if not bool(ok.all()):
            with pytest.raises(ValueError, match="fewer than top_k"):
                node_limited_topk(scores, k, expert_node, token_node, m)
        got = node_limited_topk(scores[ok], k, expert_node, token_node[ok], m)
        for row, t_scores, t_node in zip(got, scores[ok], token_node[ok]):
            allowed = [s for s in itertools.combinations(range(E), k)
                       if sum(int(expert_node[e] != t_node) for e in s) <= m]
            best = max(allowed, key=lambda s: float(t_scores[list(s)].sum()))
            assert sorted(row.tolist()) == sorted(best), m
            assert row.tolist() == sorted(row.tolist(), key=lambda e: -float(t_scores[e]))


# --- gate modules --------------------------------------------------------------------------------
def test_gate_forward_applies_the_limit():
    E, H = 4, 8
    gate = SoftmaxTopKGate(H, E, 2, bias=True, ranks_per_node=1, max_remote_choices=0, dtype=torch.float64)
    x = torch.randn(5, H, dtype=torch.float64)
    probs = torch.softmax(x @ gate.weight.t() + gate.bias, dim=-1)
    for rank in (0, 1):
        idx, w = gate(x, world_size=2, token_rank=rank)       # 2 experts per rank, 1 rank per node
        assert set(idx.reshape(-1).tolist()) <= {2 * rank, 2 * rank + 1}
        expected = node_limited_topk(probs, 2, torch.tensor([0, 0, 1, 1]), torch.tensor(rank), 0)
        assert torch.equal(idx, expected)
        picked = probs.gather(1, idx)
        torch.testing.assert_close(w, picked / picked.sum(1, keepdim=True), rtol=1e-14, atol=0)
    # One rank (or no world_size): every expert is local, the plain top-k.
    plain = SoftmaxTopKGate(H, E, 2, bias=True, dtype=torch.float64)
    plain.load_state_dict(gate.state_dict())
    assert torch.equal(gate(x)[0], plain(x)[0])
    # Per-token ranks: tokens 0..2 on rank 0, 3..4 on rank 1; 2 ranks per node = one node.
    ranks = torch.tensor([0, 0, 0, 1, 1])
    two = SoftmaxTopKGate(H, E, 2, bias=True, ranks_per_node=1, max_remote_choices=0, dtype=torch.float64)
    two.load_state_dict(gate.state_dict())
    idx = two(x, world_size=2, token_rank=ranks)[0]
    assert all(int(e) // 2 == int(r) for row, r in zip(idx, ranks) for e in row)
    same_node = SoftmaxTopKGate(H, E, 2, bias=True, ranks_per_node=2, max_remote_choices=0, dtype=torch.float64)
    same_node.load_state_dict(gate.state_dict())
    assert torch.equal(same_node(x, world_size=2, token_rank=ranks)[0], plain(x)[0])


def test_sigmoid_gate_limits_on_biased_scores():
    E, H = 4, 8
    gate = SigmoidTopKGate(H, E, 2, ranks_per_node=1, max_remote_choices=1, dtype=torch.float64)
    gate.selection_bias.copy_(torch.tensor([0.0, 0.0, 5.0, 5.0]))   # experts 2, 3 always score first
    x = torch.randn(6, H, dtype=torch.float64)
    idx, _ = gate(x, world_size=2, token_rank=0)
    # Rank 0's tokens: one of the boosted remote experts (2, 3), then the best local one (0, 1).
    assert (idx[:, 0] >= 2).all() and (idx[:, 1] <= 1).all()
    scores = torch.sigmoid(x @ gate.weight.t())
    assert torch.equal(idx[:, 0], torch.where(scores[:, 2] >= scores[:, 3], 2, 3))
    assert torch.equal(idx[:, 1], torch.where(scores[:, 0] >= scores[:, 1], 0, 1))


def test_gate_arguments():
    with pytest.raises(ValueError, match="both"):
        SoftmaxTopKGate(8, 4, 2, ranks_per_node=1)
    with pytest.raises(ValueError, match="max_remote_choices"):
        SoftmaxTopKGate(8, 4, 2, ranks_per_node=1, max_remote_choices=3)
    with pytest.raises(ValueError, match="ranks_per_node"):
        SoftmaxTopKGate(8, 4, 2, ranks_per_node=0, max_remote_choices=1)
    with pytest.raises(ValueError, match="gshard"):
        make_gate("gshard", 8, 4, ranks_per_node=1, max_remote_choices=1)
    gate = make_gate("noisy", 8, 4, 2, ranks_per_node=2, max_remote_choices=1)
    assert gate.node_limited and "max_remote_choices=1" in repr(gate)
    assert not make_gate("switch", 8, 4, ranks_per_node=2, max_remote_choices=1).node_limited  # k = 1
    with pytest.raises(ValueError, match="world_size"):
        gate.node_limited_topk(torch.rand(2, 4), 3, 0)


def test_single_process_layer_is_one_node():
    # Without a group every expert is on this rank's node: the limit never binds.
    x = torch.randn(7, 8, dtype=torch.float64)
    layers = []
    for limited in (False, True):
        torch.manual_seed(3)
        kw = {"ranks_per_node": 1, "max_remote_choices": 0} if limited else {}
        gate = SoftmaxTopKGate(8, 4, 2, dtype=torch.float64, **kw)
        layers.append(fusedmoe.MoE(4, 8, 6, gate=gate, dtype=torch.float64))
        layers[-1].load_state_dict(layers[0].state_dict())
    assert torch.equal(layers[0](x), layers[1](x))


# --- fusedmoe.MoE over 2 gloo processes ----------------------------------------------------------
WORLD = 2
E, H, I, K, T_PER_RANK = 4, 16, 12, 2, 11
VARIANTS = {"softmax_m1": ("softmax", 1), "softmax_m0": ("softmax", 0), "sigmoid_m1": ("sigmoid", 1)}


def make_layer(kind, m, group):
    torch.manual_seed(0)
    cls = SoftmaxTopKGate if kind == "softmax" else SigmoidTopKGate
    gate = cls(H, E, K, bias=True, ranks_per_node=1, max_remote_choices=m, dtype=torch.float64)
    if kind == "sigmoid":
        gate.selection_bias.copy_(torch.tensor([0.0, 0.3, -0.2, 0.1], dtype=torch.float64))
    return fusedmoe.MoE(E, H, I, gate=gate, ffn="swiglu", num_shared_experts=1, expert_bias=True,
                        group=group, dtype=torch.float64)


def inputs():
    gen = torch.Generator().manual_seed(321)
    x_all = torch.randn(WORLD * T_PER_RANK, H, dtype=torch.float64, generator=gen)
    dy_all = torch.randn(WORLD * T_PER_RANK, H, dtype=torch.float64, generator=gen)
    return x_all, dy_all


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        x_all, dy_all = inputs()
        mine = slice(rank * T_PER_RANK, (rank + 1) * T_PER_RANK)
        per = E // WORLD
        out = {}
        for name, (kind, m) in VARIANTS.items():
            full = dict(make_layer(kind, m, None).named_parameters())
            layer = make_layer(kind, m, dist.group.WORLD)
            with torch.no_grad():
                for pname, p in layer.named_parameters():
                    p.copy_(full[pname][rank * per:(rank + 1) * per] if pname.startswith("experts.") else full[pname])
            x = x_all[mine].clone().requires_grad_(True)
            y = layer(x)
            (y * dy_all[mine]).sum().backward()
            distributed.allreduce_replicated_grads(layer, dist.group.WORLD)
            out[name] = dict(y=y.detach(), dx=x.grad, idx=layer.last_topk_idx.clone(),
                             grads={n: p.grad.clone() for n, p in layer.named_parameters()})
        results[rank] = out
    finally:
        dist.destroy_process_group()


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_expert_parallel_layer_keeps_the_limit():
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(worker, args=(free_port(), results), nprocs=WORLD, join=True)

    x_all, dy_all = inputs()
    per = E // WORLD
    for name, (kind, m) in VARIANTS.items():
        single = make_layer(kind, m, None)
        idx = torch.cat([results[r][name]["idx"] for r in range(WORLD)]).long()
        token_rank = torch.arange(WORLD).repeat_interleave(T_PER_RANK)
        # The limit holds, and it binds: the plain top-k would break it for some token.
        remote = (idx // per != token_rank.unsqueeze(1)).sum(dim=1)
        assert int(remote.max()) <= m, name
        plain, _ = single.gate(x_all)
        assert int((plain // per != token_rank.unsqueeze(1)).sum(dim=1).max()) > m, f"{name}: the limit never binds"
        # The routing is the gate's constrained selection of each rank's tokens.
        for r in range(WORLD):
            mine = slice(r * T_PER_RANK, (r + 1) * T_PER_RANK)
            expected, _ = single.gate(x_all[mine], world_size=WORLD, token_rank=r)
            assert torch.equal(idx[mine], expected), f"{name}: rank {r} routing"
        # One process with that routing forced gives the same outputs and gradients.
        x = x_all.clone().requires_grad_(True)
        y = single(x, forced_topk_idx=idx.to(torch.int32))
        (y * dy_all).sum().backward()
        assert torch.equal(single.last_topk_idx.long(), idx)
        for r in range(WORLD):
            got = results[r][name]
            mine = slice(r * T_PER_RANK, (r + 1) * T_PER_RANK)
            assert rel(got["y"], y.detach()[mine]) < 1e-12, f"{name}: rank {r} y"
            assert rel(got["dx"], x.grad[mine]) < 1e-12, f"{name}: rank {r} dx"
            for pname, p in single.named_parameters():
                expected = p.grad[r * per:(r + 1) * per] if pname.startswith("experts.") else p.grad
                assert rel(got["grads"][pname], expected) < 1e-12, f"{name}: rank {r} gradient of {pname}"
