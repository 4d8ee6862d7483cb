"""Deterministic weights and gradients for comparing parallel layouts with a single process: every value
is a function of the parameter's *global* name, cut into this rank's shard by Megatron's own rule, so any
TP/PP/EP layout and the full model see exactly the same numbers."""

from __future__ import annotations

import re
import zlib

import torch

from teonspeed.parallel.shard_spec import ShardSpec, full_shape, shard_of


def global_name(name: str, spec: ShardSpec) -> str:
    """The parameter's name in the unsharded model (global layer and expert indices)."""
    name = re.sub(
        r"layers\.(\d+)\.", lambda m: f"layers.{int(m.group(1)) + spec.layer_offset}.", name, count=1
    )
    return re.sub(
        r"local_experts\.(\d+)\.", lambda m: f"local_experts.{int(m.group(1)) + spec.expert_offset}.", name
    )


def full_tensor(name: str, shape, salt: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()) + 7919 * salt)
    return torch.randn(shape, generator=g) * 0.1


def local_tensor(
    name: str, p: torch.Tensor, spec: ShardSpec, tp_rank: int, tp_size: int, salt: int
) -> torch.Tensor:
    """This rank's shard of the deterministic full tensor of local parameter `name`."""
    full = full_tensor(global_name(name, spec), full_shape(tuple(p.shape), spec, tp_size), salt)
    return shard_of(full, spec.tp_partition_dim, tp_rank, tp_size, spec.tp_partition_stride)
