"""ZeRO-style flat partitions: a param group flattened into one buffer and cut into equal data-parallel
partitions, each rank holding one (DeepSpeed ZeRO-1/2 and its BF16 optimizer hand the inner optimizer
exactly that). The momentum is element-wise and runs on the partition; the orthogonalization needs
whole matrices. A matrix (or TEON stack) inside one partition is orthogonalized where it lives (after a
TP gather among the ranks holding that partition index, if it is TP-sharded); only the jobs cut by
partition boundaries travel, to one owner (and jobs the planner moves off an overloaded rank, where the
Newton–Schulz time saved outweighs the transfer), and only each holder's slice of the update comes back
(`zero_partition.py` plans it). DeepSpeed's parameter all-gather after the step does the rest.

Megatron's distributed optimizer hands several such buffers, its DDP buckets, each cut over the same
data-parallel ranks: they are planned and stepped together (`plan_partitions`), a rank's partitions of all
of them end to end as one local buffer, so a TEON stack whose members lie in different buckets (every layer
its own bucket, or a layer larger than a bucket) is one job like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..grouping import MatrixRef, OrthoGroup
from .cost import ClusterProfile
from .piece_exchange import FlatStep, Pieces, TPSplitOf  # noqa: F401  (the exchange, re-exported)
from .sharded import PieceLayout
from .zero_partition import ZeroPlan
from .zero_planner import plan_pieces, plan_zero_buckets


@dataclass
class FlatEntry:
    name: str
    offset: int  # element offset in the flat (unpartitioned) buffer
    shape: Tuple[int, ...]

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


@dataclass
class FlatPartition:
    entries: List[FlatEntry]
    partition_size: int
    dp_group: Optional[dist.ProcessGroup]
    dp_rank: int
    dp_size: int

    @property
    def start(self) -> int:
        return self.dp_rank * self.partition_size

    def names(self) -> List[str]:
        return [e.name for e in self.entries]


NORM_SLICE = 1 << 22  # elements per float64 norm kernel of BucketShard.grad_norm_sq


@dataclass
class BucketShard:
    """Megatron's distributed optimizer layout: a DDP bucket (parameters of any route at `entries`
    offsets) whose reduce-scatter leaves this rank the partition `grad`, and whose parameter all-gather
    spreads this rank's partition `param` (both views into the bucket's buffers). With bf16/fp16
    parameters, `master` is the fp32 main copy of `param` that the step updates (Megatron's main-param
    shard). `counted`: the (lo, hi) ranges of the partition that count in the global gradient norm
    (each TP-duplicated parameter counted on one TP rank only)."""

    partition: FlatPartition
    grad: torch.Tensor
    param: torch.Tensor
    master: Optional[torch.Tensor] = None
    counted: Tuple[Tuple[int, int], ...] = ()

    @property
    def weights(self) -> torch.Tensor:
        """What the step updates: the fp32 master, or the parameter partition itself."""
        return self.param if self.master is None else self.master

    def grad_norm_sq(self) -> torch.Tensor:
        """Squared L2 norm of the counted gradient ranges, accumulated in float64, on the gradient's device
        (0-dim float64). A long fp32 accumulation drifts (PyTorch's CPU norm of 1M fp32 elements is
        ~1e-5 off, Megatron's per-parameter fp32 norms ~1e-8); in float64 the rounding is ~n·2⁻⁵³. Ranges
        are cut into slices of NORM_SLICE elements: a kernel that converts its input to float64 first
        (PyTorch's CPU norm does) then holds 32 MiB at most."""
        parts = [
            self.grad[lo : min(lo + NORM_SLICE, hi)]
            for start, hi in self.counted
            for lo in range(start, hi, NORM_SLICE)
        ]
        if not parts:
            return self.grad.new_zeros((), dtype=torch.float64)
        return torch.stack(torch._foreach_norm(parts, 2, dtype=torch.float64)).square().sum()

    def slices(self):
        """(entry, lo, hi) of every entry intersecting this rank's partition, in partition coordinates."""
        start, size = self.partition.start, self.partition.partition_size
        for e in self.partition.entries:
            lo, hi = max(e.offset, start), min(e.offset + e.numel, start + size)
            if lo < hi:
                yield e, lo - start, hi - start


def gather_work_ranks(
    partition: FlatPartition, tp_rank: int, tp_size: int, work_group, work_size: int, device: torch.device
) -> Dict[Tuple[int, int], int]:
    """(tp rank, partition index) -> rank in the tp × dp work group, learned from every member (a
    collective over the work group, at construction)."""
    if work_size != tp_size * partition.dp_size:
        raise ValueError(
            f"teonspeed: a ZeRO partition spans {partition.dp_size} data-parallel ranks but the "
            f"tensor x data-parallel group it is planned on has {work_size} ranks for TP size {tp_size}: "
            f"its data-parallel group is neither the dense one nor the expert one teonspeed was given "
            f"(ParallelContext dp_group / expert_dp_group, and is_expert in the ShardSpecs)"
        )
    if work_size == 1:
        return {(0, 0): 0}
    mine = torch.tensor([tp_rank, partition.dp_rank], dtype=torch.int64, device=device)
    everyone = torch.empty(work_size * 2, dtype=torch.int64, device=device)
    dist.all_gather_into_tensor(everyone, mine, group=work_group)
    pairs = [tuple(p) for p in everyone.view(work_size, 2).tolist()]
    if len(set(pairs)) != work_size:
        raise ValueError(f"teonspeed: the (TP rank, ZeRO partition) pairs of the work group repeat: {pairs}")
    return {(t, d): r for r, (t, d) in enumerate(pairs)}


def plan_partition(
    partition: FlatPartition,
    groups: List[OrthoGroup],
    work_rank: Dict[Tuple[int, int], int],
    tp_size: int,
    cost: Callable[[OrthoGroup], float],
    tp_sharded: Callable[[MatrixRef], bool],
    cluster: ClusterProfile = ClusterProfile(),
    itemsize: int = 4,
) -> ZeroPlan:
    return plan_partitions([partition], groups, work_rank, tp_size, cost, tp_sharded, cluster, itemsize)


def plan_partitions(
    partitions: Sequence[FlatPartition],
    groups: List[OrthoGroup],
    work_rank: Dict[Tuple[int, int], int],
    tp_size: int,
    cost: Callable[[OrthoGroup], float],
    tp_sharded: Callable[[MatrixRef], bool],
    cluster: ClusterProfile = ClusterProfile(),
    itemsize: int = 4,
) -> ZeroPlan:
    """One plan over this rank's partitions of several flat buffers cut over the same data-parallel ranks
    (Megatron's DDP buckets of one topology), for the groups whose matrices lie in them. A group with
    members inside and outside them cannot be computed here and is refused."""
    dp_sizes = {p.dp_size for p in partitions}
    if len(dp_sizes) > 1:
        raise ValueError(
            f"teonspeed: flat partitions planned together are cut over different data-parallel "
            f"sizes {sorted(dp_sizes)}; buckets of one topology must share one data-parallel "
            f"group"
        )
    places = {e.name: (b, e.offset) for b, p in enumerate(partitions) for e in p.entries}
    mine = _groups_inside(set(places), groups, "the flat partitions planned together")
    shapes = {e.name: tuple(e.shape) for p in partitions for e in p.entries}
    sizes = [p.partition_size for p in partitions]
    return plan_zero_buckets(
        mine,
        places,
        shapes,
        sizes,
        partitions[0].dp_size,
        tp_size,
        work_rank,
        cost,
        tp_sharded,
        cluster,
        itemsize,
    )


def _groups_inside(names, groups: List[OrthoGroup], what: str) -> List[OrthoGroup]:
    """The groups whose members all lie in `names`; a group with members inside and outside is refused."""
    mine = []
    for g in groups:
        inside = [m.name in names for m in g.members]
        if all(inside):
            mine.append(g)
        elif any(inside):
            outside = next(m.label for m, i in zip(g.members, inside) if not i)
            labels = " + ".join(m.label for m in g.members)
            raise ValueError(
                f"teonspeed: the group {labels} is partly outside {what} ({outside} is not in them: "
                f"another param group, data-parallel group or expert/dense buffer); put its members in one "
                f"param group, or set teon_k=1"
            )
    return mine


def plan_layout(
    layout: PieceLayout,
    groups: List[OrthoGroup],
    work_rank: Dict[Tuple[int, int], int],
    tp_size: int,
    cost: Callable[[OrthoGroup], float],
    tp_sharded: Callable[[MatrixRef], bool],
    cluster: ClusterProfile = ClusterProfile(),
    itemsize: int = 4,
) -> ZeroPlan:
    """The plan of any layout of sharded pieces (ZeRO-3, FSDP2) for the groups whose matrices it holds; a
    group partly outside it is refused like a flat partition's."""
    mine = _groups_inside(set(layout.holds), groups, "the sharded layout planned together")
    return plan_pieces(
        mine,
        layout.holds,
        layout.shapes,
        layout.dp_size,
        tp_size,
        work_rank,
        cost,
        tp_sharded,
        cluster,
        itemsize,
    )
