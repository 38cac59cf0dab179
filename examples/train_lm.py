#!/usr/bin/env python3
# examples/train_lm.py — trains a small Mixture-of-Experts transformer language model on bytes of
# real text that every machine has: the Python standard library's own source files. Each block
# is pre-norm causal self-attention + a MoE FFN, either fusedmoe.MoE (--moe fusedmoe) or the
# plain-PyTorch PlainMoE (--moe plain), or both one after the other from the same initial
# weights (--moe both). Training adds the layers' balance losses (fusedmoe.balance_loss), shows
# a tqdm progress bar, evaluates on a held-out split every --eval-every steps, prints the mean
# step time, writes a PNG loss curve and metrics.json to --out, and optionally a fusedmoe
# checkpoint (--save, sharded for --save-world-size expert-parallel ranks).
#
#   PYTHONPATH=python FUSEDMOE_OPS_LIBRARY=build/python/fusedmoe/_fusedmoe_ops.so \
#     python3 examples/train_lm.py --device cpu --steps 300 --moe both
#
# The same --seed gives the same initial weights and the same batches for both MoE kinds.
# fusedmoe's CPU backend computes fp32 / fp64; bf16 / fp16 need --device cuda.
# Test: tests/python/test_example.py (20 tiny steps on the CPU: the loss falls, the PNG exists).
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

try:
    import fusedmoe
except ImportError:  # running from a source checkout without PYTHONPATH
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
    import fusedmoe
from fusedmoe.plain import PlainMoE

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}
VOCAB = 256  # bytes


# --- data ----------------------------------------------------------------------------------------
def stdlib_text(max_bytes: int) -> bytes:
    """Up to max_bytes of the standard library's .py files, concatenated in sorted path order.

    Args:
        max_bytes: how many bytes to collect (> 0).
    Returns:
        the bytes (site-packages and __pycache__ are skipped).
    """
    root = os.path.dirname(os.__file__)
    chunks, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, name), "rb") as f:
                    data = f.read()
            except OSError:
                continue
            chunks.append(data)
            total += len(data)
            if total >= max_bytes:
                return b"".join(chunks)[:max_bytes]
    if total == 0:
        raise RuntimeError(f"no .py files found under {root}")
    return b"".join(chunks)


def split_data(text: bytes, eval_fraction: float):
    """(train [N1] uint8, eval [N2] uint8): the last eval_fraction of the bytes are held out."""
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    cut = int(len(data) * (1.0 - eval_fraction))
    return data[:cut], data[cut:]


def batch_at(data: torch.Tensor, starts: torch.Tensor, seq: int):
    """(inputs [B, S] int64, targets [B, S] int64) of the windows starting at `starts` [B]."""
    index = starts[:, None] + torch.arange(seq + 1)[None, :]
    window = data[index].long()
    return window[:, :-1], window[:, 1:]


# --- model ---------------------------------------------------------------------------------------
class Block(nn.Module):
    """x + attn(norm1(x)), then + moe(norm2(x)).

    Args:
        moe_cls: fusedmoe.MoE or PlainMoE.
        d_model: H.  heads: attention heads (H % heads == 0).  moe_kwargs: the MoE's arguments.
    forward(x [B, S, H]) → [B, S, H].
    """

    def __init__(self, moe_cls, d_model: int, heads: int, moe_kwargs: dict):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.moe = moe_cls(d_model=d_model, **moe_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, h))
        return x + self.moe(self.norm2(x))


class MoeLM(nn.Module):
    """Byte-level language model: embedding + positions → blocks → LayerNorm → head (tied).

    Args:
        moe_cls: fusedmoe.MoE or PlainMoE.
        seq: S, the longest sequence.  d_model: H.  layers: number of blocks.  heads: per block.
        moe_kwargs: num_experts, d_ffn, top_k, gate, ffn, capacity_factor, ... of every MoE.
    forward(tokens [B, S] int64) → logits [B, S, 256].
    """

    def __init__(self, moe_cls, seq: int, d_model: int, layers: int, heads: int, moe_kwargs: dict):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Embedding(seq, d_model)
        self.blocks = nn.ModuleList(Block(moe_cls, d_model, heads, moe_kwargs) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB, bias=False)
        self.head.weight = self.embed.weight  # tied (the checkpoint stores it once)
        with torch.no_grad():  # GPT-2 style: small embeddings, so that the first logits are ~uniform
            self.embed.weight.normal_(0.0, 0.02)
            self.pos.weight.normal_(0.0, 0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def build_model(args, moe_kind: str) -> MoeLM:
    """The model for --moe moe_kind: built on the CPU in fp32 under torch.manual_seed(args.seed)
    (so both kinds start from the same weights), then moved to --device and --dtype."""
    moe_cls = PlainMoE if moe_kind == "plain" else fusedmoe.MoE
    moe_kwargs = dict(num_experts=args.experts, d_ffn=args.d_ffn, top_k=args.top_k, gate=args.gate, ffn=args.ffn,
                      capacity_factor=args.capacity_factor, num_shared_experts=args.shared_experts)
    torch.manual_seed(args.seed)
    model = MoeLM(moe_cls, args.seq, args.d_model, args.layers, args.heads, moe_kwargs)
    return model.to(device=args.device, dtype=DTYPES[args.dtype])


# --- training ------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: MoeLM, batches) -> float:
    """Mean cross-entropy (nats per byte) over fixed held-out batches."""
    was_training = model.training
    model.eval()
    total = 0.0
    for inputs, targets in batches:
        logits = model(inputs)
        total += float(F.cross_entropy(logits.float().reshape(-1, VOCAB), targets.reshape(-1)))
    model.train(was_training)
    return total / len(batches)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(args, moe_kind: str, train_data: torch.Tensor, eval_batches) -> dict:
    """Trains one model; returns its metrics (losses per step, eval losses, step times)."""
    from tqdm import tqdm

    device = torch.device(args.device)
    model = build_model(args, moe_kind)
    n_params = sum(p.numel() for p in model.parameters())
    n_expert = sum(p.numel() for b in model.blocks for p in b.moe.experts.parameters())
    print(f"[{moe_kind}] {n_params / 1e6:.2f} M parameters ({n_expert / 1e6:.2f} M in routed experts), "
          f"{args.layers} layers, H = {args.d_model}, E = {args.experts}, k = {args.top_k}, "
          f"I = {args.d_ffn}, {args.dtype} on {device}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, args.warmup)))
    generator = torch.Generator().manual_seed(args.seed + 1)  # the batches: the same for both kinds
    metrics = {"moe": moe_kind, "step": [], "loss": [], "balance": [], "eval_step": [], "eval_loss": [],
               "step_time_s": []}
    metrics["eval_step"].append(0)
    metrics["eval_loss"].append(evaluate(model, eval_batches))
    model.train()
    bar = tqdm(range(1, args.steps + 1), desc=f"train ({moe_kind})", unit="step", disable=args.no_progress,
               dynamic_ncols=True)
    for step in bar:
        starts = torch.randint(0, len(train_data) - args.seq - 1, (args.batch,), generator=generator)
        inputs, targets = (t.to(device) for t in batch_at(train_data, starts, args.seq))
        synchronize(device)
        t0 = time.perf_counter()
        logits = model(inputs)
        task = F.cross_entropy(logits.float().reshape(-1, VOCAB), targets.reshape(-1))
        balance = fusedmoe.balance_loss(model, aux_coef=args.aux_coef, z_coef=args.z_coef)
        loss = task + balance
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        synchronize(device)
        metrics["step_time_s"].append(time.perf_counter() - t0)
        metrics["step"].append(step)
        metrics["loss"].append(float(task.detach()))
        metrics["balance"].append(float(balance.detach()))
        if step % args.eval_every == 0 or step == args.steps:
            metrics["eval_step"].append(step)
            metrics["eval_loss"].append(evaluate(model, eval_batches))
            bar.write(f"[{moe_kind}] step {step:5d}  train loss {metrics['loss'][-1]:.4f}  "
                      f"eval loss {metrics['eval_loss'][-1]:.4f}  ({metrics['eval_loss'][-1] / math.log(2):.3f} bits/byte)")
        bar.set_postfix(loss=f"{metrics['loss'][-1]:.3f}", ms=f"{1e3 * metrics['step_time_s'][-1]:.1f}")
    bar.close()
    times = metrics["step_time_s"][min(2, len(metrics["step_time_s"]) - 1):]  # skip warm-up steps
    metrics["mean_step_time_s"] = sum(times) / len(times)
    metrics["tokens_per_s"] = args.batch * args.seq / metrics["mean_step_time_s"]
    loads = [b.moe.load_stats()["load"].tolist() for b in model.blocks]
    metrics["expert_load"] = loads
    print(f"[{moe_kind}] mean step time {1e3 * metrics['mean_step_time_s']:.1f} ms "
          f"({metrics['tokens_per_s']:.0f} tokens/s, forward + backward + AdamW); eval loss "
          f"{metrics['eval_loss'][0]:.4f} → {metrics['eval_loss'][-1]:.4f}")
    print(f"[{moe_kind}] expert load per layer: " +
          " | ".join(" ".join(f"{v:.2f}" for v in layer) for layer in loads))
    if args.save:
        from fusedmoe import checkpoint
        path = args.save
        if args.moe == "both":  # one checkpoint per kind: <stem>.<kind>.safetensors
            stem = path[:-len(".safetensors")] if path.endswith(".safetensors") else path
            path = f"{stem}.{moe_kind}.safetensors"
        written = checkpoint.save_checkpoint(model, path, world_size=args.save_world_size,
                                             user={"step": args.steps, "moe": moe_kind, "seed": args.seed})
        print(f"[{moe_kind}] checkpoint: {', '.join(written)}")
    return metrics


def plot(runs, path: str, title: str) -> None:
    """PNG of the training loss (light: per step, dark: moving average) and the eval loss."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    colors = {"fusedmoe": "tab:blue", "plain": "tab:orange"}
    widths = {"fusedmoe": 3.0, "plain": 1.2}  # the same init computes the same curve: keep both visible
    for m in runs:
        c = colors[m["moe"]]
        ax.plot(m["step"], m["loss"], color=c, alpha=0.25, linewidth=0.8)
        window = max(1, len(m["loss"]) // 20)
        smooth = [sum(m["loss"][max(0, i - window + 1):i + 1]) / len(m["loss"][max(0, i - window + 1):i + 1])
                  for i in range(len(m["loss"]))]
        ax.plot(m["step"], smooth, color=c, linewidth=widths[m["moe"]], alpha=0.8,
                label=f"{m['moe']} train ({1e3 * m['mean_step_time_s']:.0f} ms/step)")
        ax.plot(m["eval_step"], m["eval_loss"], "o--", color=c, markersize=4, label=f"{m['moe']} eval")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a byte-level MoE language model on the Python standard "
                                            "library's source (fusedmoe or plain-PyTorch MoE layers).")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--moe", choices=("fusedmoe", "plain", "both"), default="fusedmoe",
                   help="MoE layer: fusedmoe.MoE, the plain-PyTorch PlainMoE, or both from the same init")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="parameter and activation dtype")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--seq", type=int, default=128, help="bytes per sequence")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--experts", type=int, default=8, help="routed experts per layer (E)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (k)")
    p.add_argument("--d-ffn", type=int, default=256, help="hidden width of each expert (I)")
    p.add_argument("--gate", default="softmax", help="softmax, sigmoid, noisy, switch, gshard")
    p.add_argument("--ffn", default="swiglu", help="relu, gelu, swiglu, geglu")
    p.add_argument("--capacity-factor", type=float, default=0.0, help="0 = dropless")
    p.add_argument("--shared-experts", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=20, help="linear learning-rate warm-up steps")
    p.add_argument("--aux-coef", type=float, default=1e-2, help="weight of the load-balancing losses")
    p.add_argument("--z-coef", type=float, default=1e-3, help="weight of the router z-losses")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--data-bytes", type=int, default=4_000_000, help="bytes of stdlib source to use")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="held-out fraction (the last bytes)")
    p.add_argument("--seed", type=int, default=0, help="initial weights (same for both MoE kinds) and batches")
    p.add_argument("--out", default=os.path.join("out", "train_lm"), help="folder for the PNG and metrics.json")
    p.add_argument("--save", default="", help="write a fusedmoe checkpoint to this .safetensors path")
    p.add_argument("--save-world-size", type=int, default=1, help="expert-parallel shards of the checkpoint")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for name in ("steps", "batch", "seq", "d_model", "layers", "heads", "experts", "top_k", "d_ffn", "eval_every",
                 "eval_batches", "data_bytes"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} = {getattr(args, name)}: must be > 0")
    if args.d_model % args.heads:
        p.error(f"--d-model = {args.d_model} is not a multiple of --heads = {args.heads}")
    if torch.device(args.device).type == "cpu" and args.dtype in ("bf16", "fp16") and args.moe != "plain":
        p.error(f"--dtype {args.dtype}: fusedmoe's CPU backend computes fp32 and fp64 only (use --device cuda)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    text = stdlib_text(args.data_bytes)
    train_data, eval_data = split_data(text, args.eval_fraction)
    if min(len(train_data), len(eval_data)) <= args.seq + 1:
        raise SystemExit(f"--data-bytes = {args.data_bytes} is too small for --seq = {args.seq}")
    print(f"data: {len(text) / 1e6:.2f} MB of Python stdlib source from {os.path.dirname(os.__file__)} "
          f"({len(train_data)} train / {len(eval_data)} held-out bytes)")
    eval_gen = torch.Generator().manual_seed(args.seed + 2)
    eval_batches = []
    for _ in range(args.eval_batches):
        starts = torch.randint(0, len(eval_data) - args.seq - 1, (args.batch,), generator=eval_gen)
        eval_batches.append(tuple(t.to(args.device) for t in batch_at(eval_data, starts, args.seq)))
    kinds = ("fusedmoe", "plain") if args.moe == "both" else (args.moe,)
    runs = [train(args, kind, train_data, eval_batches) for kind in kinds]
    if len(runs) == 2:
        ratio = runs[1]["mean_step_time_s"] / runs[0]["mean_step_time_s"]
        print(f"step time: fusedmoe {1e3 * runs[0]['mean_step_time_s']:.1f} ms, plain "
              f"{1e3 * runs[1]['mean_step_time_s']:.1f} ms (plain / fusedmoe = {ratio:.2f}x)")
    png = os.path.join(args.out, f"loss_{args.moe}.png")
    title = (f"byte LM on Python stdlib: {args.layers} layers, H={args.d_model}, E={args.experts}, k={args.top_k}, "
             f"I={args.d_ffn}, {args.gate}/{args.ffn}, batch {args.batch}x{args.seq}, {args.dtype}, {args.device}")
    plot(runs, png, title)
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump({"args": vars(args), "runs": runs, "png": png}, f, indent=1)
    print(f"loss curve: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
