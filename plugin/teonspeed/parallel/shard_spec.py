"""Layout discovery: how each parameter is sharded, and where it lives in the full model.

`ShardSpec` is what the distributed step needs per parameter; `megatron_shard_specs(model)` reads it from
megatron-core's attributes (`tensor_model_parallel`, `partition_dim`, `partition_stride`, `allreduce`)
and module structure (`TransformerLayer.layer_number`, the expert-parallel rank). Users of other
frameworks build ShardSpecs themselves and pass them as `shard_specs={name: ShardSpec(...)}`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch


@dataclass(frozen=True)
class ShardSpec:
    tp_partition_dim: Optional[int] = None
    """Dim split over tensor parallelism (0: column-parallel rows, 1: row-parallel columns); None: whole."""
    tp_partition_stride: int = 1
    """Megatron's stride: the full dim is cut into tp·stride chunks and rank r holds chunks r, r+tp, ...
    (gated fc1 uses 2, so each rank holds its own [gate_r; up_r])."""
    layer_offset: int = 0
    """Added to the block index in the parameter's name to get the global layer number (pipeline)."""
    expert_offset: int = 0
    """Added to the local expert index to get the global one (expert parallelism)."""
    is_expert: bool = False
    """Expert weights use the expert tensor/data-parallel groups instead of the dense ones."""

    @property
    def topology(self) -> str:
        """The name of the topology (groups) the weight is exchanged on: "expert" or "dense"."""
        return "expert" if self.is_expert else "dense"


def full_shape(local_shape: Tuple[int, ...], spec: ShardSpec, tp_size: int) -> Tuple[int, ...]:
    if spec.tp_partition_dim is None or tp_size == 1:
        return tuple(local_shape)
    shape = list(local_shape)
    shape[spec.tp_partition_dim] *= tp_size
    return tuple(shape)


def assemble(shards, dim: Optional[int], stride: int = 1) -> torch.Tensor:
    """The full tensor from the TP shards (in TP-rank order), undoing Megatron's strided split."""
    if dim is None:
        return shards[0]
    if stride == 1:
        return torch.cat(list(shards), dim=dim)
    chunks = [s.chunk(stride, dim=dim) for s in shards]
    return torch.cat([chunks[r][j] for j in range(stride) for r in range(len(shards))], dim=dim)


def shard_of(full: torch.Tensor, dim: Optional[int], rank: int, size: int, stride: int = 1) -> torch.Tensor:
    """Rank `rank`'s shard of `full` (the inverse of `assemble`)."""
    if dim is None or size == 1:
        return full
    pieces = full.chunk(size * stride, dim=dim)
    return torch.cat([pieces[j * size + rank] for j in range(stride)], dim=dim)


def megatron_shard_specs(model: torch.nn.Module) -> Dict[str, ShardSpec]:
    """ShardSpecs of every parameter of a megatron-core model chunk (names as in model.named_parameters())."""
    layer_offsets = _megatron_layer_offsets(model)
    expert_offsets = _megatron_expert_offsets(model)
    specs = {}
    for name, p in model.named_parameters():
        sharded = bool(getattr(p, "tensor_model_parallel", False))
        dim = getattr(p, "partition_dim", -1) if sharded else None
        specs[name] = ShardSpec(
            tp_partition_dim=dim if dim is not None and dim >= 0 else None,
            tp_partition_stride=int(getattr(p, "partition_stride", 1)),
            layer_offset=next((off for prefix, off in layer_offsets.items() if name.startswith(prefix)), 0),
            expert_offset=next((off for prefix, off in expert_offsets.items() if name.startswith(prefix)), 0),
            is_expert=not getattr(p, "allreduce", True),
        )
    return specs


def _megatron_layer_offsets(model: torch.nn.Module) -> Dict[str, int]:
    """'decoder.layers.N.' -> global layer index - N, from each TransformerLayer's 1-based layer_number."""
    out = {}
    for name, module in model.named_modules():
        number = getattr(module, "layer_number", None)
        parts = name.split(".")
        if number is None or len(parts) < 2 or parts[-2] != "layers" or not parts[-1].isdigit():
            continue
        out[name + "."] = int(number) - 1 - int(parts[-1])
    return out


def _megatron_expert_offsets(model: torch.nn.Module) -> Dict[str, int]:
    """'...experts.local_experts.' -> first global expert index held by this expert-parallel rank."""
    out = {}
    for name, module in model.named_modules():
        local = getattr(module, "local_experts", None)
        if local is None:
            continue
        from megatron.core import parallel_state as ps

        offset = ps.get_expert_model_parallel_rank() * len(local)
        out[name + ".local_experts."] = offset
    return out
