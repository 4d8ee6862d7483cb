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
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..grouping import MatrixRef, OrthoGroup
from .cost import ClusterProfile
from .topology import connected_components

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


def plan_zero_partition(
    groups: Sequence[OrthoGroup],
    offsets: Dict[str, int],
    shapes: Dict[str, Tuple[int, ...]],
    partition_size: int,
    dp_size: int,
    tp_size: int,
    work_rank: Dict[Tuple[int, int], WorkRank],
    cost: Callable[[OrthoGroup], float],
    tp_sharded: Callable[[MatrixRef], bool],
    cluster: ClusterProfile = ClusterProfile(),
    itemsize: int = 4,
) -> ZeroPlan:
    """Jobs, local or cut, and their owners, for one flat buffer (see the module docstring). offsets/shapes:
    each parameter's flat offset and local shape; work_rank: (tp rank, partition) -> rank in the tp × dp
    work group; cost: a group's NS FLOPs; cluster, itemsize: what a FLOP and an exchanged element cost, for
    balancing."""
    return plan_zero_buckets(
        groups,
        {n: (0, o) for n, o in offsets.items()},
        shapes,
        (partition_size,),
        dp_size,
        tp_size,
        work_rank,
        cost,
        tp_sharded,
        cluster,
        itemsize,
    )


def plan_zero_buckets(
    groups: Sequence[OrthoGroup],
    places: Dict[str, Tuple[int, int]],
    shapes: Dict[str, Tuple[int, ...]],
    partition_sizes: Sequence[int],
    dp_size: int,
    tp_size: int,
    work_rank: Dict[Tuple[int, int], WorkRank],
    cost: Callable[[OrthoGroup], float],
    tp_sharded: Callable[[MatrixRef], bool],
    cluster: ClusterProfile = ClusterProfile(),
    itemsize: int = 4,
) -> ZeroPlan:
    """One plan over several flat buffers (buckets) cut over the same data-parallel ranks: places gives each
    parameter's (bucket, offset in the bucket), partition_sizes each bucket's partition length; the rest as
    in plan_zero_partition. A job's members may lie in any buckets."""
    units = units_of(groups, places, shapes)
    # One job per set of groups that read the same unit (a fused weight's parts, shared experts slices).
    first_reader: Dict[Tuple[str, Optional[int]], int] = {}
    links = [{first_reader.setdefault(unit_key(m), i) for m in g.members} for i, g in enumerate(groups)]
    plan = ZeroPlan([], tuple(partition_sizes), dp_size, tp_size, dict(work_rank))
    for component in connected_components(links):
        job_groups = tuple(groups[i] for i in component)
        keys = list(dict.fromkeys(unit_key(m) for g in job_groups for m in g.members))
        job_units = tuple(sorted((units[k] for k in keys), key=lambda u: (u.bucket, u.offset)))
        outside = [u for u in job_units if u.end > dp_size * partition_sizes[u.bucket]]
        if outside:
            u = outside[0]
            raise ValueError(
                f"teonspeed: {u.name!r} lies outside the flat partitions ({dp_size} x "
                f"{partition_sizes[u.bucket]} elements); the ZeRO layout given to the optimizer "
                f"is wrong"
            )
        parts = sorted(
            {d for u in job_units for d in range(dp_size) if plan.piece(u, d)[0] < plan.piece(u, d)[1]}
        )
        sharded = {tp_sharded(m) for g in job_groups for m in g.members}
        plan.jobs.append(
            ZeroJob(
                job_groups,
                job_units,
                tuple(parts),
                tp_size > 1 and True in sharded,
                sum(cost(g) for g in job_groups),
            )
        )
    _assign_owners(plan, cluster, itemsize)
    _balance(plan, cluster, itemsize)
    return plan


def _assign_owners(plan: ZeroPlan, cluster: ClusterProfile, itemsize: int) -> None:
    """Local jobs first (largest first), each to the least-loaded TP peer holding its partition; then cut
    jobs (largest first) to the rank anywhere that is free first and receives and returns its pieces
    fastest: least predicted NS seconds already owned plus the job's exchange seconds there (a holder on
    its node, unless the holders are much busier). Deterministic: ties go to the lower rank."""
    loads = [0.0] * plan.work_size
    order = sorted(range(len(plan.jobs)), key=lambda i: (plan.jobs[i].cut, -plan.jobs[i].flops, i))
    for i in order:
        job = plan.jobs[i]
        if job.cut:  # a non-holder's exchange depends only on its node: the least-loaded one of each node
            holders = plan.holders(job)
            others: Dict[int, WorkRank] = {}
            for r in range(plan.work_size):
                node = r // cluster.gpus_per_node
                if r not in holders and (node not in others or loads[r] < loads[others[node]]):
                    others[node] = r
            job.owner = min(
                holders + list(others.values()),
                key=lambda r: (
                    cluster.ns_seconds(loads[r]) + exchange_seconds(plan, job, r, cluster, itemsize),
                    r,
                ),
            )
        else:
            job.owner = min(plan.holders(job), key=lambda r: (loads[r], r))
        loads[job.owner] += job.flops
    plan.loads = loads
    plan.placed_loads = list(loads)


def exchange_seconds(
    plan: ZeroPlan, job: ZeroJob, owner: WorkRank, cluster: ClusterProfile, itemsize: int
) -> float:
    """Predicted seconds of `job`'s traffic at `owner`: the pieces it receives and the update slices it
    sends back, over NVLink to ranks of its node and InfiniBand beyond (work ranks taken as consecutive
    global ranks, TP fastest: Megatron's and DeepSpeed's order)."""
    node = owner // cluster.gpus_per_node
    seconds = 0.0
    for _, d, r in plan.sources(job, owner) + plan.targets(job):
        if r != owner:
            n = plan.piece_numel(job, d) * itemsize
            seconds += n / cluster.bandwidth(1 if r // cluster.gpus_per_node == node else 2)
    return seconds


def _balance(plan: ZeroPlan, cluster: ClusterProfile, itemsize: int) -> None:
    """Move a job off the busiest rank (by NS FLOPs) to another rank, or swap it for a smaller job of that
    rank, while the NS time this saves the busiest rank exceeds the extra exchange time of the jobs that
    move (plus two exchange rounds' latency if nothing travelled before); the best such move first. Every
    move strictly lowers the sum of squared loads, so this ends. If the busiest rank's load did not drop
    in the end, every job goes back (no byte moves for nothing). Ties break by job index and rank: the
    same plan on every rank."""
    loads, jobs, w = plan.loads, plan.jobs, plan.work_size
    first_owner = [job.owner for job in jobs]
    exchanging = bool(plan.exchanged_jobs())
    cache: Dict[Tuple[int, WorkRank], float] = {}

    def travel(i: int, r: WorkRank) -> float:
        if (i, r) not in cache:
            cache[(i, r)] = exchange_seconds(plan, jobs[i], r, cluster, itemsize)
        return cache[(i, r)]

    for _ in range(len(jobs) * w):
        busiest = max(range(w), key=lambda r: (loads[r], -r))
        peak = cluster.ns_seconds(loads[busiest])
        owned: Dict[WorkRank, List[int]] = {}
        for i, job in enumerate(jobs):
            owned.setdefault(job.owner, []).append(i)
        best: Tuple[float, int, WorkRank, int] = (
            0.0,
            -1,
            -1,
            -1,
        )  # (net gain, job, new owner, job swapped back)
        for i in owned.get(busiest, []):
            f = jobs[i].flops
            for r in range(w):
                if r == busiest:
                    continue
                moved_cost = (
                    travel(i, r) - travel(i, busiest) + (0.0 if exchanging else 2 * cluster.latency(w))
                )
                for k in [-1] + [k for k in owned.get(r, []) if jobs[k].flops < f]:
                    back = jobs[k].flops if k >= 0 else 0.0
                    saving = peak - cluster.ns_seconds(max(loads[busiest] - f + back, loads[r] + f - back))
                    extra = moved_cost + (travel(k, busiest) - travel(k, r) if k >= 0 else 0.0)
                    if saving > 0 and saving - extra > best[0]:
                        best = (saving - extra, i, r, k)
        if best[1] < 0:
            break
        _, i, r, k = best
        for job_index, src, dst in ((i, busiest, r),) + (((k, r, busiest),) if k >= 0 else ()):
            loads[src] -= jobs[job_index].flops
            loads[dst] += jobs[job_index].flops
            jobs[job_index].owner = dst
        exchanging = True
    if max(loads) >= max(plan.placed_loads):
        for job, owner in zip(jobs, first_owner):
            job.owner = owner
        plan.loads = list(plan.placed_loads)
    plan.moved = [job for job, owner in zip(jobs, first_owner) if job.owner != owner]
