# tests/python/test_checkpoint.py — fusedmoe.checkpoint: expert-sharded safetensors checkpoints.
# A bit-exact round trip W = 4 → 1 → 2 → 1 (every tensor compared with torch.equal, fp32 and
# bf16, E not a multiple of W so that a rank holds no expert), explicit placements, loading into
# a fresh model (same outputs), the command-line tool, and bad input: corrupted, truncated and
# foreign files, shards of different checkpoints, missing / repeated ranks, shape, dtype and
# config mismatches (errors name the tensor or module and the expected / found values), and that
# loading never unpickles.
# Run: see conftest.py (a few seconds).
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from torch import nn

import fusedmoe
from fusedmoe import checkpoint as ckpt
from fusedmoe.checkpoint import CheckpointError
from fusedmoe.plain import PlainMoE

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


class TinyLM(nn.Module):
    """embedding [V, H] → LayerNorm → MoE (E = 6, bias, shared expert, gate bias) → LayerNorm →
    PlainMoE (E = 4, sigmoid gate with a selection-bias buffer) → head tied to the embedding.

    Args:
        d_ffn: I of the first MoE layer.
        dtype: parameter dtype.
    """

    def __init__(self, d_ffn=12, dtype=torch.float32, vocab=11, hidden=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden, dtype=dtype)
        self.norm0 = nn.LayerNorm(hidden, dtype=dtype)
        self.moe0 = fusedmoe.MoE(6, hidden, d_ffn, top_k=2, ffn="swiglu", num_shared_experts=1,
                                 expert_bias=True, gate_bias=True, dtype=dtype)
        self.norm1 = nn.LayerNorm(hidden, dtype=dtype)
        self.moe1 = PlainMoE(4, hidden, 10, top_k=2, gate="sigmoid", ffn="gelu", dtype=dtype)
        self.head = nn.Linear(hidden, vocab, bias=False, dtype=dtype)
        self.head.weight = self.embed.weight  # tied: stored once, restored to both names
        with torch.no_grad():  # no structured values anywhere (LayerNorm starts at 1 / 0)
            for p in self.parameters():
                p.add_(torch.randn_like(p) * 0.1)
            self.moe1.gate.selection_bias.copy_(torch.randn(4) * 0.1)

    def forward(self, tokens):
        """tokens [B, S] int64 → logits [B, S, V]."""
        h = self.embed(tokens)
        h = h + self.moe0(self.norm0(h))
        h = h + self.moe1(self.norm1(h))
        return self.head(h)


def assert_state_equal(state, model):
    """Every tensor of the model's state_dict is bit-identical (torch.equal, same dtype) in state."""
    expected = model.state_dict()
    assert set(state) == set(expected), sorted(set(state) ^ set(expected))
    for name, t in expected.items():
        assert state[name].dtype == t.dtype, name
        assert torch.equal(state[name], t.cpu()), f"tensor {name} differs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_w4_w1_w2_w1_is_bit_exact(tmp_path, dtype):
    model = TinyLM(dtype=dtype)
    files4 = ckpt.save_checkpoint(model, tmp_path / "c4.safetensors", world_size=4, user={"step": 7})
    assert [os.path.basename(f) for f in files4] == [f"c4.rank{r}-of-4.safetensors" for r in range(4)]
    shards4 = [ckpt.read_checkpoint(f) for f in files4]
    # Contiguous placement: E = 6 → ceil(6/4) = 2 per rank: [0,0,1,1,2,2], rank 3 empty; E = 4 → one each.
    w1 = model.moe0.experts.w1.detach()
    for s in shards4:
        assert s.modules["moe0"].local_experts == [e for e in range(6) if e // 2 == s.rank]
        assert s.modules["moe1"].local_experts == [s.rank]
        assert s.modules["moe0"].config.expert_placement == [0, 0, 1, 1, 2, 2]
        local = s.tensors["moe0.experts.w1"]
        assert local.shape == (len(s.modules["moe0"].local_experts), 8, 24)
        assert torch.equal(local, w1[2 * s.rank:2 * s.rank + local.shape[0]])
        assert "head.weight" not in s.tensors and s.aliases == {"head.weight": "embed.weight"}
        assert s.user == {"step": 7}
    merged1 = ckpt.merge_shards(list(reversed(files4)), tmp_path / "c1.safetensors")
    assert_state_equal(ckpt.read_checkpoint(tmp_path / "c1.safetensors").state_dict(), model)
    assert_state_equal(merged1.state_dict(), model)
    shards2 = ckpt.split_checkpoint(tmp_path / "c1.safetensors", 2, tmp_path / "c2.safetensors")
    assert [s.modules["moe0"].local_experts for s in shards2] == [[0, 1, 2], [3, 4, 5]]
    files2 = [tmp_path / f"c2.rank{r}-of-2.safetensors" for r in range(2)]
    ckpt.merge_shards(files2, tmp_path / "c1b.safetensors")
    final = ckpt.read_checkpoint(tmp_path / "c1b.safetensors")
    assert final.world_size == 1 and final.user == {"step": 7}
    assert_state_equal(final.state_dict(), model)
    for name in ("moe0", "moe1"):
        assert final.modules[name].config == ckpt.from_model(model).modules[name].config

    fresh = TinyLM(dtype=dtype)
    assert not torch.equal(fresh.moe0.experts.w1, model.moe0.experts.w1)
    loaded = ckpt.load_checkpoint(fresh, files2)  # the shards, merged while loading
    assert loaded.user == {"step": 7}
    assert_state_equal(fresh.state_dict(), model)
    assert fresh.head.weight is fresh.embed.weight
    if dtype == torch.float32:
        tokens = torch.randint(0, 11, (3, 5))
        model.eval(), fresh.eval()
        assert torch.equal(fresh(tokens), model(tokens))


def test_explicit_placement_and_name_lookup(tmp_path):
    model = TinyLM()
    placement = {"moe0": [1, 0, 2, 0, 1, 2], "moe1": [2, 2, 0, 1]}
    files = ckpt.save_checkpoint(model, tmp_path / "p.safetensors", world_size=3, placement=placement)
    shards = [ckpt.read_checkpoint(f) for f in files]
    assert [s.modules["moe0"].local_experts for s in shards] == [[1, 3], [0, 4], [2, 5]]
    assert [s.modules["moe1"].local_experts for s in shards] == [[2], [3], [0, 1]]
    assert torch.equal(shards[2].tensors["moe1.experts.w2"], model.moe1.experts.w2.detach()[[0, 1]])
    fresh = TinyLM()
    ckpt.load_checkpoint(fresh, tmp_path / "p.safetensors")  # the name: finds the three shards
    assert_state_equal(fresh.state_dict(), model)
    with pytest.raises(CheckpointError, match=r"placement of module 'moe0'.*world_size = 3"):
        ckpt.save_checkpoint(model, tmp_path / "q.safetensors", world_size=3, placement=[0, 1, 2, 3, 0, 1])


def test_command_line_merge_split_info(tmp_path, capsys):
    model = TinyLM()
    files = ckpt.save_checkpoint(model, tmp_path / "m.safetensors", world_size=2)
    assert ckpt.main(["merge", "-o", str(tmp_path / "one.safetensors"), *files]) == 0
    assert ckpt.main(["split", "-w", "3", "-o", str(tmp_path / "three.safetensors"),
                      str(tmp_path / "one.safetensors")]) == 0
    assert ckpt.main(["info", str(tmp_path / "three.rank2-of-3.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "merged 2 shards" in out and "rank 2:" in out and "world_size 3, rank 2" in out
    assert ckpt.main(["merge", "-o", str(tmp_path / "bad.safetensors"), files[0]]) == 1
    assert "missing ranks [1]" in capsys.readouterr().err
    # The module entry point, as a user runs it.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.path.join(REPO, "python"),
                                                                    os.environ.get("PYTHONPATH")])))
    three = [str(tmp_path / f"three.rank{r}-of-3.safetensors") for r in range(3)]
    run = subprocess.run([sys.executable, "-m", "fusedmoe.checkpoint", "merge", "-o",
                          str(tmp_path / "again.safetensors"), *three],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert_state_equal(ckpt.read_checkpoint(tmp_path / "again.safetensors").state_dict(), model)


def test_load_checks_shapes_dtypes_configs_and_names(tmp_path):
    path = tmp_path / "c.safetensors"
    ckpt.save_checkpoint(TinyLM(d_ffn=12), path)
    with pytest.raises(CheckpointError, match=r"module 'moe0': ffn_size = 12 in the checkpoint, but the "
                                              r"model has ffn_size = 16"):
        ckpt.load_checkpoint(TinyLM(d_ffn=16), path)
    with pytest.raises(CheckpointError, match=r"tensor 'moe0\.experts\.(w1|b1|w2)': expected shape "
                                              r"\[6, (8, 32|32|16, 8)\] dtype torch.float32, found shape "
                                              r"\[6, (8, 24|24|12, 8)\] dtype torch.float32"):
        ckpt.load_checkpoint(TinyLM(d_ffn=16), path, strict_config=False)
    with pytest.raises(CheckpointError, match=r"tensor '[\w.]+': expected shape \[[\d, ]*\] dtype "
                                              r"torch.float64, found shape \[[\d, ]*\] dtype torch.float32"):
        ckpt.load_checkpoint(TinyLM(dtype=torch.float64), path)

    class Bigger(TinyLM):
        def __init__(self):
            super().__init__()
            self.extra = nn.Linear(2, 2)

    with pytest.raises(CheckpointError, match=r"missing from the checkpoint \['extra.bias', 'extra.weight'\]"):
        ckpt.load_checkpoint(Bigger(), path)
    bigger = Bigger()
    ckpt.load_checkpoint(bigger, path, strict=False)  # loads what is there
    assert torch.equal(bigger.moe0.experts.w1, ckpt.read_checkpoint(path).tensors["moe0.experts.w1"])

    class Fewer(TinyLM):
        def __init__(self):
            super().__init__()
            self.moe1 = nn.Identity()

    with pytest.raises(CheckpointError, match=r"MoE modules \['moe0', 'moe1'\], but the model has \['moe0'\]"):
        ckpt.load_checkpoint(Fewer(), path)


def test_sharded_files_must_come_together(tmp_path):
    a = TinyLM()
    files = ckpt.save_checkpoint(a, tmp_path / "a.safetensors", world_size=3)
    with pytest.raises(CheckpointError, match=r"shard of rank 1 of world_size = 3; pass all 3 shard files"):
        ckpt.load_checkpoint(TinyLM(), [files[1]])
    with pytest.raises(CheckpointError, match=r"missing ranks \[2\], repeated ranks \[0\]"):
        ckpt.merge_shards([files[0], files[0], files[1]])
    b_files = ckpt.save_checkpoint(TinyLM(), tmp_path / "b.safetensors", world_size=3)
    with pytest.raises(CheckpointError, match=r"replicated tensor '[\w.]+' .* differs from rank 0's"):
        ckpt.merge_shards([files[0], b_files[1], files[2]])
    c_files = ckpt.save_checkpoint(a, tmp_path / "c.safetensors", world_size=2)
    with pytest.raises(CheckpointError, match=r"world_size = 2, but .* has world_size = 3"):
        ckpt.merge_shards([files[0], c_files[1], files[2]])
    d_files = ckpt.save_checkpoint(TinyLM(d_ffn=4), tmp_path / "d.safetensors", world_size=3)
    with pytest.raises(CheckpointError, match=r"module 'moe0': config .*ffn_size=4.* differs from rank 0's"):
        ckpt.merge_shards([files[0], d_files[1], files[2]])


def _rewrite_metadata(src, dst, change):
    """Copies a checkpoint file with its fusedmoe metadata changed by change(meta)."""
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    with safe_open(src, framework="pt") as f:
        meta = json.loads(f.metadata()["fusedmoe"])
    change(meta)
    save_file(load_file(src), dst, metadata={"fusedmoe": json.dumps(meta)})


def test_corrupted_and_foreign_files_raise(tmp_path):
    path = str(tmp_path / "c.safetensors")
    ckpt.save_checkpoint(TinyLM(), path)
    data = open(path, "rb").read()
    header_len = int.from_bytes(data[:8], "little")
    # A flipped bit in the tensor data: the crc32 names the tensor.
    flipped = bytearray(data)
    flipped[8 + header_len + len(flipped[8 + header_len:]) // 2] ^= 0x10
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=r"flip.safetensors: tensor '[\w.]+': crc32 \d+ does not match "
                                              r"the stored \d+: the file is corrupted"):
        ckpt.load_checkpoint(TinyLM(), tmp_path / "flip.safetensors")
    ckpt.read_checkpoint(tmp_path / "flip.safetensors", verify=False)  # readable without the check
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"cut.safetensors: not a readable safetensors file"):
        ckpt.read_checkpoint(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(os.urandom(64))
    with pytest.raises(CheckpointError, match=r"not a readable safetensors file"):
        ckpt.read_checkpoint(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file
    save_file({"w": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match=r"without 'fusedmoe' metadata: not a fusedmoe checkpoint"):
        ckpt.read_checkpoint(tmp_path / "plain.safetensors")

    def newer(meta):
        meta["version"] = 99

    _rewrite_metadata(path, str(tmp_path / "v.safetensors"), newer)
    with pytest.raises(CheckpointError, match=r"format version 99; this fusedmoe reads versions 1..1"):
        ckpt.read_checkpoint(tmp_path / "v.safetensors")

    def wrong_local(meta):
        meta["modules"]["moe0"]["local_experts"] = [0, 1]

    _rewrite_metadata(path, str(tmp_path / "l.safetensors"), wrong_local)
    with pytest.raises(CheckpointError, match=r"module 'moe0': local_experts \[0, 1\] do not match"):
        ckpt.read_checkpoint(tmp_path / "l.safetensors")
    with pytest.raises(FileNotFoundError, match="neither the file nor shards"):
        ckpt.load_checkpoint(TinyLM(), tmp_path / "absent.safetensors")
    ckpt.save_checkpoint(TinyLM(), tmp_path / "two.safetensors", world_size=2)
    ckpt.save_checkpoint(TinyLM(), tmp_path / "two.safetensors", world_size=3)
    with pytest.raises(CheckpointError, match=r"shards of several world sizes \[2, 3\] exist"):
        ckpt.load_checkpoint(TinyLM(), tmp_path / "two.safetensors")


def test_tied_expert_tensors_are_refused(tmp_path):
    model = TinyLM()
    model.alias = nn.Module()
    model.alias.w = model.moe1.experts.w2  # a non-expert name tied to an expert tensor
    with pytest.raises(CheckpointError, match=r"module 'moe1': expert tensor 'moe1.experts.w2' is tied to "
                                              r"'alias.w'; expert tensors cannot be shared"):
        ckpt.save_checkpoint(model, tmp_path / "t.safetensors", world_size=2)


def test_loading_never_unpickles(tmp_path, monkeypatch):
    model = TinyLM()
    files = ckpt.save_checkpoint(model, tmp_path / "c.safetensors", world_size=2)

    def forbidden(*args, **kwargs):
        raise AssertionError("a checkpoint load used pickle")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, forbidden)
    fresh = TinyLM()
    ckpt.load_checkpoint(fresh, files)
    assert_state_equal(fresh.state_dict(), model)
