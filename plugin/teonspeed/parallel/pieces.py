"""Where each matrix's pieces live on the ranks: the one description every runner and planner reads.

A matrix (a parameter, a part of a fused weight, one expert's slice of a 3-D weight) lives on the work
group of its topology (`ShardSpec.topology`: the dense tensor × data-parallel group, or the expert one).
Inside it, a matrix is either whole on every rank or cut into tensor-parallel slices along one dim of its
matrix view (`TPSplit`, Megatron's strided split); and the tensor holding it is either the parameter
itself, replicated over the data-parallel replicas, or cut into flat ranges over data-parallel partitions
(DeepSpeed ZeRO-1/2 and Megatron's distributed optimizer: `flat.FlatPartition`, planned by
`partitioned.py`). Sharded parameters (ZeRO-3, FSDP2) are further descriptions of the same kind: a flat
range or a dim slice of the parameter over the data-parallel group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from ..grouping import MatrixRef, OrthoGroup
from .shard_spec import ShardSpec, shard_of
from .topology import Topology


@dataclass(frozen=True)
class TPSplit:
    """A matrix's tensor-parallel slices: the dim of its matrix view cut over the TP group (None: whole on
    every TP rank) and Megatron's stride (the dim cut into tp·stride chunks, rank r holding r, r+tp, ...)."""

    dim: Optional[int]
    stride: int


class Pieces:
    """The layout of every matrix, from the parameters' ShardSpecs and the topologies they live on."""

    def __init__(self, specs: Dict[str, ShardSpec], topologies: Dict[str, Topology]) -> None:
        self.specs = specs
        self.topologies = topologies  # "dense" and "expert"

    def spec(self, name: str) -> ShardSpec:
        return self.specs.get(name, ShardSpec())

    def topology_name(self, name: str) -> str:
        """The topology a parameter is exchanged on: "dense" or "expert"."""
        return self.spec(name).topology

    def topology_of(self, group: OrthoGroup) -> str:
        return self.topology_name(group.members[0].name)

    def tp_split(self, m: MatrixRef, topology: Topology) -> TPSplit:
        spec = self.spec(m.name)
        if spec.tp_partition_dim is None or topology.tp_size == 1:
            return TPSplit(None, 1)
        dim = spec.tp_partition_dim - (1 if m.expert_index is not None else 0)
        # A part of a fused weight is split per shard, so the parts' shards are plain contiguous pieces.
        return TPSplit(dim, 1 if m.part is not None else spec.tp_partition_stride)

    def sharded(self, m: MatrixRef, topology: Topology) -> bool:
        return self.tp_split(m, topology).dim is not None

    def shard_numel(self, m: MatrixRef, topology: Topology) -> int:
        full = m.shape[0] * m.shape[1]
        return full if self.tp_split(m, topology).dim is None else full // topology.tp_size

    def shard_shape(self, m: MatrixRef, topology: Topology) -> Tuple[int, int]:
        rows, cols = m.shape
        dim = self.tp_split(m, topology).dim
        if dim is None:
            return rows, cols
        if dim not in (0, 1):
            raise ValueError(
                f"teonspeed: {m.label} is split along dim {dim} of its matrix view; only 0 or 1 work"
            )
        return (rows // topology.tp_size, cols) if dim == 0 else (rows, cols // topology.tp_size)

    def shard_for(self, full: torch.Tensor, m: MatrixRef, topology: Topology, tp_rank: int) -> torch.Tensor:
        """TP rank `tp_rank`'s slice of the whole matrix `full`."""
        split = self.tp_split(m, topology)
        return shard_of(full, split.dim, tp_rank, topology.tp_size, split.stride)
