"""Who orthogonalizes what under ZeRO-1/2 flat partitions, decided from the layout alone.

A param group is one flat buffer cut into `dp_size` equal partitions (the same offsets on every TP rank,
since TP shards have equal shapes). Megatron's distributed optimizer cuts several buffers (its DDP buckets)
the same way, each into its own `dp_size` partitions: a plan covers all the buckets of one topology at once,
rank d holding the d-th partition of every bucket (its *local buffer*: those partitions end to end, in
bucket order), so a TEON stack or a fused weight whose members lie in different buckets is one job like any
other. A *job* is the smallest set of orthogonalization groups that must be
computed together: groups that read the same tensor (the parts of a fused weight, the members of a TEON
stack) are merged. A job whose elements lie in one partition is *local*: the TP peers holding that
partition index compute it (one of them, after a TP gather if the members are TP-sharded). A job cut by a
partition boundary, or spread over partitions, is *cut*: its pieces go to one owner, the rank that is
free first and exchanges them fastest (usually a holder on their node), and only each holder's pieces of
the update come back.

Equal-byte partitions do not give equal Newton–Schulz work (a partition of small matrices against one of
a few large ones), so a job, cut or not, then moves off the busiest rank to a less-loaded one whenever the
NS time it saves the busiest rank exceeds the time its pieces and update slices take to travel, both
predicted with the `ClusterProfile` constants. Nothing here touches tensors, process groups or clocks:
every rank derives the same plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from ..grouping import MatrixRef, OrthoGroup

WorkRank = int


@dataclass(frozen=True)
class Unit:
    """A contiguous run of the flat buffer that the transform reads as one tensor: a parameter, or one
    expert's slice of a 3-D (grouped-GEMM) weight. `shape` is the local (TP-shard) shape; `offset` counts
    from the start of bucket `bucket` (a parameter never spans two buckets)."""

    name: str
    expert_index: Optional[int]
    offset: int
    shape: Tuple[int, ...]
    bucket: int = 0

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def end(self) -> int:
        return self.offset + self.numel


@dataclass
class ZeroJob:
    groups: Tuple[OrthoGroup, ...]
    units: Tuple[Unit, ...]
    partitions: Tuple[int, ...]  # the DP partition indices holding some of its elements, ascending
    tp_sharded: bool  # members are split over TP (each TP rank holds a different shard)
    flops: float
    owner: WorkRank = -1

    @property
    def cut(self) -> bool:
        return len(self.partitions) > 1


@dataclass
class ZeroPlan:
    jobs: List[ZeroJob]
    partition_sizes: Tuple[int, ...]  # per bucket: the elements of each of its dp_size partitions
    dp_size: int
    tp_size: int
    work_rank: Dict[Tuple[int, int], WorkRank]  # (tp rank, dp partition index) -> work rank
    loads: List[float] = field(default_factory=list)  # NS FLOPs per work rank after balancing
    placed_loads: List[float] = field(default_factory=list)  # ... before: every job where it was placed first
    moved: List[ZeroJob] = field(default_factory=list)  # jobs balancing moved off the rank first chosen

    _memo: Dict[Tuple, object] = field(default_factory=dict, repr=False, compare=False)  # layout-only lookups

    @property
    def work_size(self) -> int:
        return self.dp_size * self.tp_size

    def position(self, rank: WorkRank) -> Tuple[int, int]:
        if ("position",) not in self._memo:
            self._memo[("position",)] = {r: pos for pos, r in self.work_rank.items()}
        return self._memo[("position",)][rank]

    @property
    def partition_size(self) -> int:
        """Elements of a rank's local buffer: its partition of every bucket, end to end."""
        return sum(self.partition_sizes)

    def local_start(self, bucket: int) -> int:
        """Where bucket `bucket`'s partition starts in a rank's local buffer."""
        return sum(self.partition_sizes[:bucket])

    def piece(self, unit: Unit, partition: int) -> Tuple[int, int]:
        """[lo, hi) of `unit` inside partition `partition` of its bucket (offsets in the bucket; lo == hi
        if none)."""
        size = self.partition_sizes[unit.bucket]
        start = partition * size
        lo, hi = max(unit.offset, start), min(unit.end, start + size)
        return (lo, hi) if lo < hi else (lo, lo)

    def local(self, unit: Unit, partition: int) -> Tuple[int, int]:
        """[lo, hi) of `unit`'s piece in partition `partition`, in that rank's local buffer."""
        lo, hi = self.piece(unit, partition)
        shift = self.local_start(unit.bucket) - partition * self.partition_sizes[unit.bucket]
        return lo + shift, hi + shift

    def sources(self, job: ZeroJob, owner: Optional[WorkRank] = None) -> List[Tuple[int, int, WorkRank]]:
        """(tp rank, partition, work rank) of every rank whose pieces the owner (`job.owner` unless given)
        reads. A job that is not TP-sharded is identical on every TP rank: the owner's TP rank supplies it."""
        owner = job.owner if owner is None else owner
        tps = range(self.tp_size) if job.tp_sharded else [self.position(owner)[0]]
        return [(t, d, self.work_rank[(t, d)]) for t in tps for d in job.partitions]

    def holders(self, job: ZeroJob) -> List[WorkRank]:
        """The work ranks holding some of the job's elements (every TP peer of its partitions), ascending."""
        return sorted(self.work_rank[(t, d)] for t in range(self.tp_size) for d in job.partitions)

    def targets(self, job: ZeroJob) -> List[Tuple[int, int, WorkRank]]:
        """(tp rank, partition, work rank) of every rank that keeps a slice of the update."""
        return [(t, d, self.work_rank[(t, d)]) for t in range(self.tp_size) for d in job.partitions]

    def piece_numel(self, job: ZeroJob, partition: int) -> int:
        key = ("numel", id(job), partition)
        if key not in self._memo:
            self._memo[key] = sum(hi - lo for lo, hi in (self.piece(u, partition) for u in job.units))
        return self._memo[key]

    def bytes_per_rank(self, itemsize: int) -> Tuple[List[int], List[int]]:
        """(sent, received) bytes of one step, per work rank: pieces to owners, then slices back."""
        sent, received = [0] * self.work_size, [0] * self.work_size
        for job in self.jobs:
            for _, d, r in self.sources(job):  # pieces of the momentum to the owner
                if r != job.owner:
                    n = self.piece_numel(job, d) * itemsize
                    sent[r] += n
                    received[job.owner] += n
            for _, d, r in self.targets(job):  # each holder's slice of the update back
                if r != job.owner:
                    n = self.piece_numel(job, d) * itemsize
                    sent[job.owner] += n
                    received[r] += n
        return sent, received

    def exchanged_jobs(self) -> List[ZeroJob]:
        """The jobs whose data moves at all (cut jobs, and TP-sharded local ones)."""
        return [j for j in self.jobs if any(r != j.owner for _, _, r in self.targets(j))]

    def partition_flops(self) -> List[float]:
        """NS FLOPs per partition if each job were computed where most of its bytes live (what
        equal-byte partitions give without balancing, TP peers sharing a partition's work)."""
        out = [0.0] * self.dp_size
        for job in self.jobs:
            d = max(job.partitions, key=lambda p: (self.piece_numel(job, p), -p))
            out[d] += job.flops
        return out

    @property
    def partition_imbalance(self) -> float:
        """max / mean of partition_flops(): how uneven equal-byte partitions leave the NS work."""
        return _imbalance(self.partition_flops())

    @property
    def imbalance(self) -> float:
        """max / mean NS FLOPs per work rank of this plan (1.0 = perfectly even)."""
        return _imbalance(self.loads)

    @property
    def imbalance_before_balancing(self) -> float:
        """max / mean NS FLOPs per work rank before jobs were moved off overloaded ranks."""
        return _imbalance(self.placed_loads)

    def describe(self) -> str:
        lines = [
            f"ZeRO flat plan: {len(self.jobs)} jobs over {self.dp_size} partitions x TP {self.tp_size}; "
            f"{sum(j.cut for j in self.jobs)} cut; NS FLOPs max/mean {self.imbalance:.2f} after balancing, "
            f"{self.imbalance_before_balancing:.2f} before ({len(self.moved)} jobs moved; equal-byte "
            f"partitions alone: {self.partition_imbalance:.2f})"
        ]
        for job in self.jobs:
            labels = " + ".join(m.label for g in job.groups for m in g.members)
            where = (
                f"cut over partitions {list(job.partitions)}"
                if job.cut
                else f"local to partition {job.partitions[0]}"
            )
            moved = " (moved by balancing)" if any(job is m for m in self.moved) else ""
            lines.append(
                f"  {labels}: {where}, owner work rank {job.owner} {self.position(job.owner)}{moved}"
            )
        return "\n".join(lines)


def _imbalance(loads: Sequence[float]) -> float:
    mean = sum(loads) / len(loads) if loads else 0.0
    return max(loads) / mean if mean > 0 else 1.0


def units_of(
    groups: Sequence[OrthoGroup], places: Dict[str, Tuple[int, int]], shapes: Dict[str, Tuple[int, ...]]
) -> Dict[Tuple[str, Optional[int]], Unit]:
    """The units the groups read: one per parameter, or per expert slice of a 3-D parameter. places:
    each parameter's (bucket, offset in the bucket)."""
    out: Dict[Tuple[str, Optional[int]], Unit] = {}
    for g in groups:
        for m in g.members:
            key = unit_key(m)
            if key in out:
                continue
            shape, (bucket, offset) = shapes[m.name], places[m.name]
            if m.expert_index is None:
                out[key] = Unit(m.name, None, offset, tuple(shape), bucket)
            else:
                inner = tuple(shape[1:])
                size = 1
                for s in inner:
                    size *= s
                out[key] = Unit(m.name, m.expert_index, offset + m.expert_index * size, inner, bucket)
    return out


def unit_key(m: MatrixRef) -> Tuple[str, Optional[int]]:
    return (m.name, m.expert_index)
