# python/fusedmoe/checkpoint.py — checkpoints of models that contain fusedmoe layers, in
# safetensors files (no pickle: reading a checkpoint never runs code), in an expert-sharded
# layout, and the tool that merges W rank shards into one file or splits one file for another W.
#
# Layout. A checkpoint of world size W is W files, one per expert-parallel rank r (W = 1: one
# file). Each file is self-contained: it holds the whole model state_dict except that the routed
# expert tensors of every MoE layer (experts.w1 [E, H, N1], experts.b1 [E, N1], experts.w2
# [E, I, H], experts.b2 [E, H]) keep only rank r's experts, [num_local_experts, ...], in
# ascending global expert order. Everything else (gate, shared experts, attention, embeddings,
# ...) is replicated in every file. The safetensors header metadata has one key, "fusedmoe", a
# JSON string:
#   {"format": "fusedmoe.checkpoint", "version": 1, "world_size": W, "rank": r,
#    "modules": {"<module name>": {"class": "MoE", "config": "<MoeConfig string>",
#                "expert_placement": [rank of each expert], "local_experts": [global ids],
#                "expert_tensors": ["<name>", ...]}},
#    "tensors": {"<name>": {"crc32": n}}, "aliases": {"<tied name>": "<stored name>"},
#    "user": {...}}
# The MoeConfig string carries world_size, rank and expert_placement. Placement defaults to
# contiguous blocks (include/fusedmoe/config.hpp): expert e on rank e // ceil(E / W).
#
# Checks on reading: the header and the file size (safetensors), the crc32 of every tensor, the
# metadata (format, version, placement, tensor list); on merging: every rank present once, the
# same modules, configs and placement in every shard, replicated tensors bit-identical; on
# loading into a model: the same MoE modules with the same structural config, every tensor of
# the expected shape and dtype (errors name the tensor, the expected and the found value).
# Errors raise CheckpointError (a ValueError).
#
# Command line (python -m fusedmoe.checkpoint ...):
#   merge -o merged.safetensors ckpt.rank0-of-4.safetensors ... ckpt.rank3-of-4.safetensors
#   split -w 2 -o ckpt.safetensors merged.safetensors   (writes ckpt.rank{0,1}-of-2.safetensors)
#   info FILE...
#
# Test: tests/python/test_checkpoint.py (bit-exact W = 4 → 1 → 2 → 1 round trip, loading, bad
# files), run as in tests/python/conftest.py.
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from .config import MoeConfig
from .moe import MoE

__all__ = [
    "FORMAT",
    "VERSION",
    "CheckpointError",
    "MoeEntry",
    "Checkpoint",
    "contiguous_placement",
    "shard_path",
    "from_model",
    "read_checkpoint",
    "shard",
    "merge",
    "save_checkpoint",
    "load_checkpoint",
    "merge_shards",
    "split_checkpoint",
    "main",
]

FORMAT = "fusedmoe.checkpoint"
VERSION = 1
METADATA_KEY = "fusedmoe"
# Routed-expert tensors of a MoE module (relative names), sharded along dim 0 (the expert).
EXPERT_TENSORS = ("experts.w1", "experts.b1", "experts.w2", "experts.b2")
# MoeConfig fields that must agree between a checkpoint and the model it is loaded into (dtype is
# checked per tensor; world_size, rank, expert_placement describe the file, fp32_math a choice of
# GEMM precision at run time).
STRUCTURAL_FIELDS = ("hidden_size", "ffn_size", "num_experts", "top_k", "ffn", "gate", "renormalize",
                     "capacity_factor", "num_shared_experts", "shared_ffn_size", "expert_bias",
                     "gate_bias", "jitter_eps")

PathLike = Union[str, "os.PathLike[str]"]


class CheckpointError(ValueError):
    """A checkpoint file or set of shards that is unreadable, corrupted, inconsistent, or does
    not fit the model; the message names the file, the tensor or module, and the values."""


# --- placement and names ------------------------------------------------------------------------
def contiguous_placement(num_experts: int, world_size: int) -> List[int]:
    """Owner rank of each expert in contiguous blocks: expert e on rank e // ceil(E / W).

    Args:
        num_experts: E (> 0).
        world_size: W (> 0). Ranks past ceil(E / ceil(E / W)) own no expert.
    Returns:
        list of E ranks.
    """
    if num_experts <= 0 or world_size <= 0:
        raise CheckpointError(f"num_experts = {num_experts}, world_size = {world_size}: must be > 0")
    per_rank = math.ceil(num_experts / world_size)
    return [e // per_rank for e in range(num_experts)]


def shard_path(path: PathLike, rank: int, world_size: int) -> str:
    """File name of rank `rank`'s shard: "<stem>.rank<r>-of-<W>.safetensors" (W = 1: `path`).

    Args:
        path: the checkpoint's name, e.g. "ckpt.safetensors".
        rank: r in [0, W).
        world_size: W.
    """
    path = os.fspath(path)
    if world_size == 1:
        return path
    stem = path[:-len(".safetensors")] if path.endswith(".safetensors") else path
    return f"{stem}.rank{rank}-of-{world_size}.safetensors"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _crc32(t: torch.Tensor) -> int:
    """crc32 of a CPU tensor's bytes (any dtype, any shape)."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return zlib.crc32(b"")
    return zlib.crc32(flat.view(torch.uint8).numpy())


def _bytes_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality (NaN payloads and -0.0 included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _describe(t: torch.Tensor) -> str:
    return f"shape {list(t.shape)} dtype {t.dtype}"


# --- the in-memory checkpoint -------------------------------------------------------------------
@dataclass
class MoeEntry:
    """One MoE layer of a checkpoint.

    Attributes:
        cls: class name of the module that was saved ("MoE", "PlainMoE"); informational.
        config: its MoeConfig with world_size, rank and expert_placement of the file.
        local_experts: global ids of the experts this file holds, ascending.
        expert_tensors: full names of its routed-expert tensors (dim 0 = local expert).
    """

    cls: str
    config: MoeConfig
    local_experts: List[int]
    expert_tensors: List[str]

    @property
    def placement(self) -> List[int]:
        return list(self.config.expert_placement)

    def to_json(self) -> dict:
        return {"class": self.cls, "config": self.config.to_string(),
                "expert_placement": self.placement, "local_experts": list(self.local_experts),
                "expert_tensors": list(self.expert_tensors)}

    @classmethod
    def from_json(cls, name: str, data: dict, where: str) -> "MoeEntry":
        try:
            config = MoeConfig.from_string(data["config"])
            entry = cls(cls=str(data.get("class", "MoE")), config=config,
                        local_experts=[int(e) for e in data["local_experts"]],
                        expert_tensors=[str(t) for t in data["expert_tensors"]])
            placement = [int(r) for r in data["expert_placement"]]
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{where}: module '{name}': unreadable metadata ({error})") from None
        if placement != entry.placement:
            raise CheckpointError(f"{where}: module '{name}': expert_placement {placement} differs from "
                                  f"its config's {entry.placement}")
        return entry


@dataclass
class Checkpoint:
    """One file's content (a rank shard, or the whole model when world_size = 1).

    Attributes:
        tensors: name → CPU tensor, the names of model.state_dict(); a MoE module's routed-expert
            tensors hold this rank's experts only: [num_local_experts, ...].
        modules: MoE module name (as in model.named_modules()) → MoeEntry.
        world_size: W.  rank: r in [0, W).
        aliases: tied state_dict name → the stored name holding its values.
        user: free-form JSON-serialisable metadata (step, data position, ...).
        source: the file it was read from ("" when built in memory).
    """

    tensors: Dict[str, torch.Tensor]
    modules: Dict[str, MoeEntry]
    world_size: int = 1
    rank: int = 0
    aliases: Dict[str, str] = field(default_factory=dict)
    user: dict = field(default_factory=dict)
    source: str = ""

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The tensors plus their tied aliases, as model.load_state_dict wants them."""
        out = dict(self.tensors)
        for alias, target in self.aliases.items():
            out[alias] = self.tensors[target]
        return out

    def expert_tensor_names(self) -> Dict[str, str]:
        """name → owning MoE module name, for every routed-expert tensor."""
        return {t: name for name, entry in self.modules.items() for t in entry.expert_tensors}

    def metadata(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "world_size": self.world_size, "rank": self.rank,
                "modules": {name: entry.to_json() for name, entry in self.modules.items()},
                "tensors": {name: {"crc32": _crc32(t)} for name, t in self.tensors.items()},
                "aliases": dict(self.aliases), "user": self.user}

    def save(self, path: PathLike) -> str:
        """Writes the checkpoint to `path` (atomically: a temporary file, then a rename).

        Args:
            path: the file to write.
        Returns:
            the path written.
        """
        from safetensors.torch import save_file
        path = os.fspath(path)
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.tensors.items()}
        tensors = _unshare(tensors)
        meta = {METADATA_KEY: json.dumps(self.metadata(), sort_keys=True)}
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=directory)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path


def _unshare(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Copies tensors that share storage with an earlier one (safetensors refuses shared memory)."""
    seen = set()
    out = {}
    for name, t in tensors.items():
        key = t.untyped_storage().data_ptr() if t.numel() > 0 else None
        if key is not None and key in seen:
            t = t.clone()
        elif key is not None:
            seen.add(key)
        out[name] = t
    return out


# --- building from a model, sharding, merging ---------------------------------------------------
def _moe_modules(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


def from_model(model: nn.Module, *, user: Optional[dict] = None) -> Checkpoint:
    """The world-size-1 checkpoint of a model: its state_dict (detached, on the CPU) and the
    config of every fusedmoe.MoE inside it (PlainMoE included).

    Args:
        model: any nn.Module containing fusedmoe.MoE layers (or none: then it is a plain
            safetensors state_dict with fusedmoe metadata).
        user: JSON-serialisable metadata to store (e.g. {"step": 1000}).
    Returns:
        Checkpoint with world_size = 1 (tensors share memory with CPU parameters: save it before
        the next optimizer step, or clone).
    """
    state = model.state_dict()
    tensors: Dict[str, torch.Tensor] = {}
    aliases: Dict[str, str] = {}
    by_view = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"state_dict entry '{name}': a {type(t).__name__}, not a tensor")
        t = t.detach()
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride())) if t.numel() else None
        if key is not None and key in by_view:
            aliases[name] = by_view[key]  # tied weights: stored once
            continue
        if key is not None:
            by_view[key] = name
        tensors[name] = t.cpu()
    modules: Dict[str, MoeEntry] = {}
    for name, m in _moe_modules(model):
        config = m.config_for(m.experts.w1.dtype).replace(
            world_size=1, rank=0, expert_placement=[0] * m.num_experts)
        expert_tensors = []
        for rel in EXPERT_TENSORS:
            full = _join(name, rel)
            tied = aliases.get(full) or next((a for a, target in aliases.items() if target == full), None)
            if tied is not None:
                raise CheckpointError(f"module '{name}': expert tensor '{full}' is tied to '{tied}'; "
                                      "expert tensors cannot be shared")
            if full in tensors:
                expert_tensors.append(full)
        modules[name] = MoeEntry(cls=type(m).__name__, config=config,
                                 local_experts=list(range(m.num_experts)), expert_tensors=expert_tensors)
    return Checkpoint(tensors=tensors, modules=modules, world_size=1, rank=0, aliases=aliases,
                      user=dict(user or {}))


def _resolve_placement(placement, name: str, num_experts: int, world_size: int) -> List[int]:
    if placement is None:
        out = contiguous_placement(num_experts, world_size)
    else:
        chosen = placement.get(name) if isinstance(placement, dict) else placement
        if chosen is None:
            out = contiguous_placement(num_experts, world_size)
        else:
            out = [int(r) for r in chosen]
    if len(out) != num_experts or any(not 0 <= r < world_size for r in out):
        raise CheckpointError(f"placement of module '{name}': {out} must give each of its {num_experts} "
                              f"experts a rank in [0, world_size = {world_size})")
    return out


def shard(checkpoint: Checkpoint, world_size: int,
          placement: Union[None, Sequence[int], Dict[str, Sequence[int]]] = None) -> List[Checkpoint]:
    """Splits a world-size-1 checkpoint into W rank shards (tensors are copied only for experts).

    Args:
        checkpoint: a Checkpoint with world_size = 1.
        world_size: W >= 1.
        placement: owner rank of each expert: None = contiguous blocks (e // ceil(E / W)), a list
            of E ranks used for every MoE module, or a dict module name → list (missing names
            contiguous).
    Returns:
        W Checkpoints, rank 0 .. W-1.
    """
    if checkpoint.world_size != 1:
        raise CheckpointError(f"{checkpoint.source or 'checkpoint'}: is rank {checkpoint.rank} of "
                              f"world_size = {checkpoint.world_size}; merge the shards first")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or not 1 <= world_size <= 1024:
        raise CheckpointError(f"world_size = {world_size!r}: must be an integer in [1, 1024]")
    expert_owner = checkpoint.expert_tensor_names()
    placements = {name: _resolve_placement(placement, name, entry.config.num_experts, world_size)
                  for name, entry in checkpoint.modules.items()}
    shards = []
    for rank in range(world_size):
        modules = {}
        for name, entry in checkpoint.modules.items():
            local = [e for e, r in enumerate(placements[name]) if r == rank]
            config = entry.config.replace(world_size=world_size, rank=rank,
                                          expert_placement=list(placements[name]))
            modules[name] = MoeEntry(cls=entry.cls, config=config, local_experts=local,
                                     expert_tensors=list(entry.expert_tensors))
        tensors = {}
        for tname, t in checkpoint.tensors.items():
            owner = expert_owner.get(tname)
            if owner is None:
                tensors[tname] = t
                continue
            local = modules[owner].local_experts
            if local == list(range(t.shape[0])):
                tensors[tname] = t
            else:
                tensors[tname] = t.index_select(0, torch.tensor(local, dtype=torch.long)).contiguous()
        shards.append(Checkpoint(tensors=tensors, modules=modules, world_size=world_size, rank=rank,
                                 aliases=dict(checkpoint.aliases), user=dict(checkpoint.user)))
    return shards


def merge(shards: Sequence[Checkpoint]) -> Checkpoint:
    """Merges the W rank shards of one checkpoint into its world-size-1 form.

    Args:
        shards: the W Checkpoints (any order), one per rank.
    Returns:
        Checkpoint with world_size = 1, every expert at its global index.
    Raises:
        CheckpointError: a rank missing or repeated, shards of different checkpoints (world
            size, modules, configs, placement, tensor names, shapes, dtypes), or replicated
            tensors that differ between ranks.
    """
    if len(shards) == 0:
        raise CheckpointError("merge: no shards given")
    first = min(shards, key=lambda s: s.rank)
    W = first.world_size
    where = {s.rank: (s.source or f"shard of rank {s.rank}") for s in shards}
    for s in shards:
        if s.world_size != W:
            raise CheckpointError(f"{s.source or 'shard'}: world_size = {s.world_size}, but "
                                  f"{first.source or 'another shard'} has world_size = {W}")
    ranks = sorted(s.rank for s in shards)
    if ranks != list(range(W)):
        missing = sorted(set(range(W)) - set(ranks))
        repeated = sorted({r for r in ranks if ranks.count(r) > 1})
        raise CheckpointError(f"merge: world_size = {W} needs one shard of each rank 0..{W - 1}; "
                              f"missing ranks {missing}, repeated ranks {repeated}")
    by_rank = sorted(shards, key=lambda s: s.rank)
    ref = by_rank[0]
    for s in by_rank[1:]:
        if set(s.modules) != set(ref.modules):
            raise CheckpointError(f"{where[s.rank]}: MoE modules {sorted(s.modules)} differ from "
                                  f"{where[0]}'s {sorted(ref.modules)}")
        for name, entry in s.modules.items():
            a, b = entry.config.replace(rank=0), ref.modules[name].config.replace(rank=0)
            if a != b:
                raise CheckpointError(f"{where[s.rank]}: module '{name}': config {entry.config.to_string()} "
                                      f"differs from rank 0's {ref.modules[name].config.to_string()}")
        if set(s.tensors) != set(ref.tensors):
            diff = sorted(set(s.tensors) ^ set(ref.tensors))
            raise CheckpointError(f"{where[s.rank]}: tensor names differ from {where[0]}'s: {diff[:8]}")
        if s.aliases != ref.aliases:
            raise CheckpointError(f"{where[s.rank]}: tied tensors {s.aliases} differ from {where[0]}'s {ref.aliases}")
    expert_owner = ref.expert_tensor_names()
    tensors: Dict[str, torch.Tensor] = {}
    for tname, t0 in ref.tensors.items():
        owner = expert_owner.get(tname)
        if owner is None:
            for s in by_rank[1:]:
                if not _bytes_equal(s.tensors[tname], t0):
                    raise CheckpointError(
                        f"{where[s.rank]}: replicated tensor '{tname}' ({_describe(s.tensors[tname])}) differs "
                        f"from rank 0's ({_describe(t0)}): the shards come from different states")
            tensors[tname] = t0
            continue
        E = ref.modules[owner].config.num_experts
        merged = torch.empty((E,) + tuple(t0.shape[1:]), dtype=t0.dtype)
        filled = torch.zeros(E, dtype=torch.bool)
        for s in by_rank:
            t = s.tensors[tname]
            local = s.modules[owner].local_experts
            expected = (len(local),) + tuple(t0.shape[1:])
            if tuple(t.shape) != expected or t.dtype != t0.dtype:
                raise CheckpointError(f"{where[s.rank]}: tensor '{tname}': expected shape {list(expected)} "
                                      f"dtype {t0.dtype}, found {_describe(t)}")
            if local:
                index = torch.tensor(local, dtype=torch.long)
                merged.index_copy_(0, index, t)
                filled[index] = True
        if not bool(filled.all()):
            raise CheckpointError(f"merge: module '{owner}': experts {torch.nonzero(~filled).flatten().tolist()} "
                                  "are held by no shard")
        tensors[tname] = merged
    modules = {}
    for name, entry in ref.modules.items():
        config = entry.config.replace(world_size=1, rank=0, expert_placement=[0] * entry.config.num_experts)
        modules[name] = MoeEntry(cls=entry.cls, config=config, local_experts=list(range(config.num_experts)),
                                 expert_tensors=list(entry.expert_tensors))
    return Checkpoint(tensors=tensors, modules=modules, world_size=1, rank=0, aliases=dict(ref.aliases),
                      user=dict(ref.user))


# --- files ----------------------------------------------------------------------------------------
def read_checkpoint(path: PathLike, *, verify: bool = True) -> Checkpoint:
    """Reads one checkpoint file (safetensors; no code runs).

    Args:
        path: a file written by Checkpoint.save / save_checkpoint.
        verify: check every tensor's crc32 against the metadata.
    Returns:
        Checkpoint (tensors on the CPU).
    Raises:
        CheckpointError: not a safetensors file, truncated or corrupted, not a fusedmoe
            checkpoint, a newer format version, inconsistent metadata, or a checksum mismatch.
        FileNotFoundError: no such file.
    """
    from safetensors import SafetensorError, safe_open
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {path!r} does not exist")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            raw_meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
    if METADATA_KEY not in raw_meta:
        raise CheckpointError(f"{path}: a safetensors file without '{METADATA_KEY}' metadata: not a "
                              "fusedmoe checkpoint")
    try:
        meta = json.loads(raw_meta[METADATA_KEY])
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: the '{METADATA_KEY}' metadata is not valid JSON ({error})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: metadata format {meta.get('format') if isinstance(meta, dict) else meta!r} "
                              f"is not {FORMAT!r}")
    version = meta.get("version")
    if not isinstance(version, int) or not 1 <= version <= VERSION:
        raise CheckpointError(f"{path}: format version {version!r}; this fusedmoe reads versions 1..{VERSION}")
    try:
        W, rank = int(meta["world_size"]), int(meta["rank"])
        module_meta, tensor_meta = dict(meta["modules"]), dict(meta["tensors"])
        aliases = {str(k): str(v) for k, v in dict(meta.get("aliases", {})).items()}
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: incomplete metadata ({error})") from None
    if not (1 <= W <= 1024 and 0 <= rank < W):
        raise CheckpointError(f"{path}: world_size = {W}, rank = {rank}: need 1 <= W <= 1024 and 0 <= rank < W")
    if set(tensor_meta) != set(tensors):
        missing = sorted(set(tensor_meta) - set(tensors))
        extra = sorted(set(tensors) - set(tensor_meta))
        raise CheckpointError(f"{path}: tensors missing from the file {missing[:8]}, not in the metadata {extra[:8]}")
    for alias, target in aliases.items():
        if target not in tensors:
            raise CheckpointError(f"{path}: tied tensor '{alias}' refers to '{target}', which the file lacks")
    if verify:
        for name, t in tensors.items():
            stored = tensor_meta[name].get("crc32") if isinstance(tensor_meta[name], dict) else None
            found = _crc32(t)
            if stored != found:
                raise CheckpointError(f"{path}: tensor '{name}': crc32 {found} does not match the stored "
                                      f"{stored}: the file is corrupted")
    modules = {}
    for name, data in module_meta.items():
        entry = MoeEntry.from_json(name, data, path)
        c = entry.config
        if c.world_size != W or c.rank != rank:
            raise CheckpointError(f"{path}: module '{name}': config says world_size = {c.world_size}, "
                                  f"rank = {c.rank}; the file says {W}, {rank}")
        placement = entry.placement
        if len(placement) != c.num_experts or any(not 0 <= r < W for r in placement):
            raise CheckpointError(f"{path}: module '{name}': expert_placement {placement} must give each of "
                                  f"num_experts = {c.num_experts} experts a rank in [0, {W})")
        local = [e for e, r in enumerate(placement) if r == rank]
        if entry.local_experts != local:
            raise CheckpointError(f"{path}: module '{name}': local_experts {entry.local_experts} do not match "
                                  f"the placement (rank {rank} owns {local})")
        for tname in entry.expert_tensors:
            if tname not in tensors:
                raise CheckpointError(f"{path}: module '{name}': expert tensor '{tname}' is missing")
            t = tensors[tname]
            if t.dim() == 0 or t.shape[0] != len(local):
                raise CheckpointError(f"{path}: tensor '{tname}': expected {len(local)} local experts in dim 0, "
                                      f"found {_describe(t)}")
        modules[name] = entry
    user = meta.get("user", {})
    return Checkpoint(tensors=tensors, modules=modules, world_size=W, rank=rank, aliases=aliases,
                      user=user if isinstance(user, dict) else {}, source=path)


def _as_checkpoint(item: Union[PathLike, Checkpoint], verify: bool) -> Checkpoint:
    return item if isinstance(item, Checkpoint) else read_checkpoint(item, verify=verify)


def save_checkpoint(model: nn.Module, path: PathLike, *, world_size: int = 1,
                    placement: Union[None, Sequence[int], Dict[str, Sequence[int]]] = None,
                    ranks: Optional[Sequence[int]] = None, user: Optional[dict] = None) -> List[str]:
    """Saves a model that holds all its experts as a checkpoint of W rank shards.

    Args:
        model: any nn.Module with fusedmoe.MoE layers (every expert present: world size 1).
        path: "<name>.safetensors"; W = 1 writes it, W > 1 writes shard_path(path, r, W).
        world_size: W, the expert-parallel world the shards are laid out for.
        placement: owner rank of each expert (see shard()); None = contiguous blocks.
        ranks: write only these ranks' shards (None = all W).
        user: JSON-serialisable metadata stored in every file (e.g. {"step": 1000}).
    Returns:
        the paths written, by rank.
    """
    shards = shard(from_model(model, user=user), world_size, placement)
    chosen = range(world_size) if ranks is None else [int(r) for r in ranks]
    written = []
    for r in chosen:
        if not 0 <= r < world_size:
            raise CheckpointError(f"ranks: {r} is not in [0, world_size = {world_size})")
        written.append(shards[r].save(shard_path(path, r, world_size)))
    return written


def _find_shards(path: str) -> List[str]:
    """The shard files of checkpoint name `path` (path itself when it exists)."""
    if os.path.isfile(path):
        return [path]
    import glob
    import re
    stem = path[:-len(".safetensors")] if path.endswith(".safetensors") else path
    pattern = re.compile(re.escape(stem) + r"\.rank(\d+)-of-(\d+)\.safetensors$")
    found = [f for f in sorted(glob.glob(glob.escape(stem) + ".rank*-of-*.safetensors")) if pattern.match(f)]
    if not found:
        raise FileNotFoundError(f"checkpoint {path!r}: neither the file nor shards "
                                f"{stem}.rank<r>-of-<W>.safetensors exist")
    worlds = sorted({int(pattern.match(f).group(2)) for f in found})
    if len(worlds) > 1:
        raise CheckpointError(f"checkpoint {path!r}: shards of several world sizes {worlds} exist; "
                              "pass the files of one of them")
    return found


def load_checkpoint(model: nn.Module, path: Union[PathLike, Sequence[PathLike], Checkpoint], *,
                    strict: bool = True, strict_config: bool = True, verify: bool = True) -> Checkpoint:
    """Loads a checkpoint into a model that holds all its experts (world size 1).

    Args:
        model: the nn.Module to fill (parameters keep their device; values are copied in).
        path: a world-size-1 file, the list of all W shard files of a sharded checkpoint, the
            checkpoint's name when only its shards exist (shard_path names), or a Checkpoint.
        strict: the model's and the checkpoint's tensor names and MoE modules must be the same.
        strict_config: every MoE module's structural config (hidden_size, ffn_size, num_experts,
            top_k, ffn, gate, renormalize, capacity_factor, shared experts, biases, jitter_eps)
            must equal the checkpoint's.
        verify: check every tensor's crc32.
    Returns:
        the merged Checkpoint that was loaded (its .user holds the saved metadata).
    Raises:
        CheckpointError naming the tensor (expected and found shape / dtype) or module (field,
        expected and found value); FileNotFoundError for a missing file.
    """
    if isinstance(path, Checkpoint):
        items: list = [path]
    elif isinstance(path, (str, os.PathLike)):
        items = _find_shards(os.fspath(path))
    else:
        items = list(path)
    shards = [_as_checkpoint(item, verify) for item in items]
    if len(shards) == 1 and shards[0].world_size != 1:
        s = shards[0]
        raise CheckpointError(f"{s.source or 'checkpoint'}: is the shard of rank {s.rank} of world_size = "
                              f"{s.world_size}; pass all {s.world_size} shard files (or merge them: "
                              "python -m fusedmoe.checkpoint merge)")
    ckpt = shards[0] if len(shards) == 1 else merge(shards)
    where = ckpt.source or (shards[0].source + " (+ shards)" if shards[0].source else "checkpoint")

    model_modules = dict(_moe_modules(model))
    if strict and set(model_modules) != set(ckpt.modules):
        raise CheckpointError(f"{where}: MoE modules {sorted(ckpt.modules)}, but the model has "
                              f"{sorted(model_modules)}")
    for name, entry in ckpt.modules.items():
        m = model_modules.get(name)
        if m is None:
            continue
        if strict_config:
            mine = m.config_for(m.experts.w1.dtype)
            for f in STRUCTURAL_FIELDS:
                if getattr(mine, f) != getattr(entry.config, f):
                    raise CheckpointError(f"{where}: module '{name}': {f} = {getattr(entry.config, f)!r} in the "
                                          f"checkpoint, but the model has {f} = {getattr(mine, f)!r}")

    state = ckpt.state_dict()
    expected = model.state_dict()
    if strict:
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"{where}: tensors missing from the checkpoint {missing[:8]}"
                                  f"{' ...' if len(missing) > 8 else ''}, not in the model {unexpected[:8]}"
                                  f"{' ...' if len(unexpected) > 8 else ''}")
    for name, t in state.items():
        target = expected.get(name)
        if target is None:
            continue
        if tuple(t.shape) != tuple(target.shape) or t.dtype != target.dtype:
            raise CheckpointError(f"{where}: tensor '{name}': expected shape {list(target.shape)} dtype "
                                  f"{target.dtype}, found shape {list(t.shape)} dtype {t.dtype}")
    if not strict:
        state = {k: v for k, v in state.items() if k in expected}
    model.load_state_dict(state, strict=strict)
    return ckpt


def merge_shards(paths: Sequence[Union[PathLike, Checkpoint]], output: Optional[PathLike] = None, *,
                 verify: bool = True) -> Checkpoint:
    """Merges the W shard files of a checkpoint into one world-size-1 checkpoint.

    Args:
        paths: the W shard files (any order), or Checkpoints.
        output: write the merged checkpoint there (None = only return it).
        verify: check every tensor's crc32 while reading.
    Returns:
        the merged Checkpoint (world_size = 1).
    """
    merged = merge([_as_checkpoint(p, verify) for p in paths])
    if output is not None:
        merged.save(output)
        merged.source = os.fspath(output)
    return merged


def split_checkpoint(path: Union[PathLike, Checkpoint], world_size: int, output: Optional[PathLike] = None,
                     placement: Union[None, Sequence[int], Dict[str, Sequence[int]]] = None, *,
                     verify: bool = True) -> List[Checkpoint]:
    """Splits a world-size-1 checkpoint into W rank shards.

    Args:
        path: a world-size-1 checkpoint file, or a Checkpoint.
        world_size: W.
        output: checkpoint name; writes shard_path(output, r, W) for every rank (None = only return).
        placement: owner rank of each expert (see shard()); None = contiguous blocks.
        verify: check every tensor's crc32 while reading.
    Returns:
        W Checkpoints, by rank.
    """
    shards = shard(_as_checkpoint(path, verify), world_size, placement)
    if output is not None:
        for s in shards:
            s.source = s.save(shard_path(output, s.rank, world_size))
    return shards


# --- command line ---------------------------------------------------------------------------------
def _info(path: str) -> str:
    ckpt = read_checkpoint(path)
    lines = [f"{path}: world_size {ckpt.world_size}, rank {ckpt.rank}, {len(ckpt.tensors)} tensors, "
             f"{sum(t.numel() for t in ckpt.tensors.values())} elements"]
    for name, entry in ckpt.modules.items():
        c = entry.config
        lines.append(f"  {name or '(model)'}: {entry.cls} E={c.num_experts} H={c.hidden_size} I={c.ffn_size} "
                     f"k={c.top_k} {c.gate}/{c.ffn} {c.dtype}, local experts {entry.local_experts}")
    if ckpt.user:
        lines.append(f"  user: {json.dumps(ckpt.user, sort_keys=True)}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """python -m fusedmoe.checkpoint merge|split|info ...; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m fusedmoe.checkpoint",
                                     description="Merge, split or describe fusedmoe safetensors checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_merge = sub.add_parser("merge", help="merge the W shards of a checkpoint into one file")
    p_merge.add_argument("shards", nargs="+", help="the W shard files (any order)")
    p_merge.add_argument("-o", "--output", required=True, help="the merged file to write")
    p_split = sub.add_parser("split", help="split a single-file checkpoint into W shards")
    p_split.add_argument("input", help="a world-size-1 checkpoint file")
    p_split.add_argument("-w", "--world-size", type=int, required=True, help="W, the number of shards")
    p_split.add_argument("-o", "--output", required=True,
                         help="checkpoint name; writes <stem>.rank<r>-of-<W>.safetensors")
    p_info = sub.add_parser("info", help="print the metadata of checkpoint files")
    p_info.add_argument("files", nargs="+")
    args = parser.parse_args(argv)
    try:
        if args.command == "merge":
            merged = merge_shards(args.shards, args.output)
            print(f"merged {len(args.shards)} shards into {merged.source} "
                  f"({len(merged.tensors)} tensors, {len(merged.modules)} MoE modules)")
        elif args.command == "split":
            shards = split_checkpoint(args.input, args.world_size, args.output)
            for s in shards:
                counts = ", ".join(f"{len(e.local_experts)}" for e in s.modules.values())
                print(f"rank {s.rank}: {s.source} (local experts per module: {counts or '-'})")
        else:
            for f in args.files:
                print(_info(f))
    except (CheckpointError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
