"""Who orthogonalizes what when the data-parallel ranks hold pieces of the matrices, decided from the layout
alone: what a plan is (units, their holds, jobs, owners) for every sharded layout (`sharded.py`: ZeRO-1/2 and
Megatron's flat partitions, ZeRO-3's even splits, FSDP2's dim-0 chunks). A unit's *holds* say which
data-parallel index holds which range of its elements; below, "partition" is a holder's index.

The flat layouts: a param group is one flat buffer cut into `dp_size` equal partitions (the same offsets on
every TP rank, since TP shards have equal shapes). Megatron's distributed optimizer cuts several buffers (its
DDP buckets) the same way, each into its own `dp_size` partitions: a plan covers all the buckets of one
topology at once, rank d holding the d-th partition of every bucket (its *local buffer*: those partitions end
to end, in bucket order), so a TEON stack or a fused weight whose members lie in different buckets is one job
like any other. A *job* is the smallest set of orthogonalization groups that must be computed together: groups
that read the same tensor (the parts of a fused weight, the members of a TEON stack) are merged. A job whose
elements lie in one partition is *local*: the TP peers holding that partition index compute it (one of them,
after a TP gather if the members are TP-sharded). A job cut by a partition boundary, or spread over
partitions, is *cut*: its pieces go to one owner, the rank that is free first and exchanges them fastest
(usually a holder on their node), and only each holder's pieces of the update come back.

Equal-byte partitions do not give equal Newton–Schulz work (a partition of small matrices against one of a few
large ones), so a job, cut or not, then moves off the busiest rank to a less-loaded one whenever the NS time
it saves the busiest rank exceeds the time its pieces and update slices take to travel, both predicted with
the `ClusterProfile` constants. Nothing here touches tensors, process groups or clocks: every rank derives the
same plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Hashable, List, Optional, Sequence, Tuple

from ..grouping import MatrixRef, OrthoGroup

WorkRank = int


@dataclass(frozen=True)
class Hold:
    """Elements [lo, hi) of one tensor's flattened local (TP-shard) elements, held by data-parallel index
    `holder`, starting at element `at` of the stepped tensor `key` on that rank. Each rank describes every
    holder's pieces with its own key for the corresponding tensor: only the holder itself reads `key`."""

    holder: int
    lo: int
    hi: int
    key: Hashable = 0
    at: int = 0

    @property
    def numel(self) -> int:
        return self.hi - self.lo


@dataclass(frozen=True, eq=False)
class Unit:
    """What the transform reads as one tensor: a parameter, or one expert's slice of a 3-D (grouped-GEMM)
    weight. `shape` is the local (TP-shard) shape; `holds`: which data-parallel index holds which range of
    its flattened elements (in unit coordinates; at most one range per holder; replicas may hold the same
    range). Flat layouts also record where it starts in its flat buffer (`offset` in bucket `bucket`)."""

    name: str
    expert_index: Optional[int]
    shape: Tuple[int, ...]
    holds: Tuple[Hold, ...]
    offset: int = 0
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

    def hold(self, holder: int) -> Optional[Hold]:
        return next((h for h in self.holds if h.holder == holder), None)


@dataclass
class ZeroJob:
    groups: Tuple[OrthoGroup, ...]
    units: Tuple[Unit, ...]
    partitions: Tuple[int, ...]  # the data-parallel indices holding some of its elements, ascending
    tp_sharded: bool  # members are split over TP (each TP rank holds a different shard)
    flops: float
    owner: WorkRank = -1

    @property
    def cut(self) -> bool:
        return len(self.partitions) > 1


@dataclass
class ZeroPlan:
    jobs: List[ZeroJob]
    partition_sizes: Tuple[int, ...]  # flat layouts, per bucket: the elements of each partition; else ()
    dp_size: int
    tp_size: int
    work_rank: Dict[Tuple[int, int], WorkRank]  # (tp rank, data-parallel index) -> work rank
    loads: List[float] = field(default_factory=list)  # NS FLOPs per work rank after balancing
    placed_loads: List[float] = field(default_factory=list)  # ... before: every job where it was placed first
    moved: List[ZeroJob] = field(default_factory=list)  # jobs balancing moved off the rank first chosen
    # Replicated pieces (HSDP): the owner sends the update's slices only to the holders it read (its own
    # replica's, mostly) and those pass them on to the other replicas of their range (`relay_rounds`)
    relay: bool = False

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
        """Flat layouts: elements of a rank's local buffer, its partition of every bucket end to end."""
        return sum(self.partition_sizes)

    def local_start(self, bucket: int) -> int:
        """Flat layouts: where bucket `bucket`'s partition starts in a rank's local buffer."""
        return sum(self.partition_sizes[:bucket])

    def piece(self, unit: Unit, holder: int) -> Tuple[int, int]:
        """[lo, hi) of `unit`'s elements (unit coordinates) held by data-parallel index `holder` (lo == hi
        if none)."""
        h = unit.hold(holder)
        return (h.lo, h.hi) if h is not None else (0, 0)

    def local(self, unit: Unit, partition: int) -> Tuple[int, int]:
        """Flat layouts: [lo, hi) of `unit`'s piece in partition `partition`, in that rank's local buffer
        (the bucket index is the hold's key)."""
        h = unit.hold(partition)
        if h is None:
            return (0, 0)
        at = self.local_start(h.key) + h.at
        return at, at + h.numel

    def reads(self, job: ZeroJob, owner: Optional[WorkRank] = None) -> List[Tuple[Unit, List[Hold]]]:
        """The holds the owner (`job.owner` unless given) reads, per unit in ascending order: one holder of
        each distinct range, the owner's own data-parallel index if it holds it, else the replica whose
        work rank is nearest the owner's (ties: the lower index). Without replicas: every hold."""
        owner = job.owner if owner is None else owner
        key = ("reads", id(job), owner)
        if key not in self._memo:
            t, mine = self.position(owner)
            out = []
            for u in job.units:
                by_range: Dict[Tuple[int, int], List[Hold]] = {}
                for h in u.holds:
                    if h.hi > h.lo:
                        by_range.setdefault((h.lo, h.hi), []).append(h)
                chosen = [
                    min(
                        hs,
                        key=lambda h: (
                            h.holder != mine,
                            abs(self.work_rank[(t, h.holder)] - owner),
                            h.holder,
                        ),
                    )
                    for _, hs in sorted(by_range.items())
                ]
                out.append((u, chosen))
            self._memo[key] = out
        return self._memo[key]

    def sources(self, job: ZeroJob, owner: Optional[WorkRank] = None) -> List[Tuple[int, int, WorkRank]]:
        """(tp rank, data-parallel index, work rank) of every rank whose pieces the owner (`job.owner` unless
        given) reads. A job that is not TP-sharded is identical on every TP rank: the owner's TP rank
        supplies it."""
        owner = job.owner if owner is None else owner
        tps = range(self.tp_size) if job.tp_sharded else [self.position(owner)[0]]
        ds = sorted({h.holder for _, hs in self.reads(job, owner) for h in hs})
        return [(t, d, self.work_rank[(t, d)]) for t in tps for d in ds]

    def holders(self, job: ZeroJob) -> List[WorkRank]:
        """The work ranks holding some of the job's elements (every TP peer of its holders), ascending."""
        return sorted(self.work_rank[(t, d)] for t in range(self.tp_size) for d in job.partitions)

    def targets(self, job: ZeroJob, owner: Optional[WorkRank] = None) -> List[Tuple[int, int, WorkRank]]:
        """(tp rank, data-parallel index, work rank) of every rank the owner (`job.owner` unless given)
        sends a slice of the update: every holder (replicas included), or with `relay` the ones it read."""
        if self.relay:
            ds = sorted({h.holder for _, hs in self.reads(job, owner) for h in hs})
        else:
            ds = list(job.partitions)
        return [(t, d, self.work_rank[(t, d)]) for t in range(self.tp_size) for d in ds]

    def relay_rounds(self) -> List[List[Tuple[WorkRank, WorkRank, Hold, Hold]]]:
        """With `relay`, the rounds after the slices went back: per distinct range the holders form a ring
        (ascending data-parallel index) and the slice travels on from the holder the owner read, one hop a
        round, R - 1 rounds for R replicas (a ring all-gather: each round a rank passes on what it got the
        round before). Each move: (from, to, the sender's hold, the receiver's hold); the order is the
        plan's, so sender and receiver agree. Empty without `relay`."""
        if ("relay",) in self._memo:
            return self._memo[("relay",)]
        rounds: List[List[Tuple[WorkRank, WorkRank, Hold, Hold]]] = []
        for job in self.jobs if self.relay else []:
            for u, read in self.reads(job):
                for first in read:
                    ring = sorted(
                        (h for h in u.holds if (h.lo, h.hi) == (first.lo, first.hi)), key=lambda h: h.holder
                    )
                    o = ring.index(first)
                    for k in range(len(ring) - 1):
                        if len(rounds) <= k:
                            rounds.append([])
                        src, dst = ring[(o + k) % len(ring)], ring[(o + k + 1) % len(ring)]
                        for t in range(self.tp_size):
                            rounds[k].append(
                                (self.work_rank[(t, src.holder)], self.work_rank[(t, dst.holder)], src, dst)
                            )
        self._memo[("relay",)] = rounds
        return rounds

    def piece_numel(self, job: ZeroJob, holder: int) -> int:
        """The elements of the job that `holder` holds (what it gets back of the update)."""
        key = ("numel", id(job), holder)
        if key not in self._memo:
            self._memo[key] = sum(hi - lo for lo, hi in (self.piece(u, holder) for u in job.units))
        return self._memo[key]

    def source_numel(self, job: ZeroJob, holder: int, owner: Optional[WorkRank] = None) -> int:
        """The elements of the job that the owner reads from `holder` (its pieces, less those another
        replica supplies)."""
        owner = job.owner if owner is None else owner
        return sum(h.numel for _, hs in self.reads(job, owner) for h in hs if h.holder == holder)

    def bytes_per_rank(self, itemsize: int) -> Tuple[List[int], List[int]]:
        """(sent, received) bytes of one step, per work rank: pieces to owners, slices back, relayed ones."""
        sent, received = [0] * self.work_size, [0] * self.work_size
        for job in self.jobs:
            for _, d, r in self.sources(job):  # pieces of the momentum to the owner
                if r != job.owner:
                    n = self.source_numel(job, d) * itemsize
                    sent[r] += n
                    received[job.owner] += n
            for _, d, r in self.targets(job):  # each holder's slice of the update back
                if r != job.owner:
                    n = self.piece_numel(job, d) * itemsize
                    sent[job.owner] += n
                    received[r] += n
        for moves in self.relay_rounds():  # relayed slices on to the other replicas
            for src, dst, h, _ in moves:
                sent[src] += h.numel * itemsize
                received[dst] += h.numel * itemsize
        return sent, received

    def exchanged_jobs(self) -> List[ZeroJob]:
        """The jobs whose data moves at all (cut jobs, and TP-sharded local ones)."""
        return [
            j for j in self.jobs if (self.relay and j.cut) or any(r != j.owner for *_, r in self.targets(j))
        ]

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
    groups: Sequence[OrthoGroup],
    holds: Dict[str, Sequence[Hold]],
    shapes: Dict[str, Tuple[int, ...]],
    places: Optional[Dict[str, Tuple[int, int]]] = None,
) -> Dict[Tuple[str, Optional[int]], Unit]:
    """The units the groups read: one per parameter, or per expert slice of a 3-D parameter, with the
    holds of its elements (`holds`: each parameter's, over its flattened local elements), in the order of
    `holds` (then expert index). A range that is not one contiguous run of the parameter's elements
    cannot be described. places: flat layouts' (bucket, offset in the bucket) of each parameter."""
    out: Dict[Tuple[str, Optional[int]], Unit] = {}
    order = {name: i for i, name in enumerate(holds)}
    wanted = sorted(
        {unit_key(m) for g in groups for m in g.members},
        key=lambda k: (order.get(k[0], len(order)), -1 if k[1] is None else k[1]),
    )
    for name, expert in wanted:
        shape = tuple(shapes[name])
        bucket, offset = places[name] if places is not None else (0, 0)
        if expert is None:
            out[(name, None)] = Unit(name, None, shape, tuple(holds[name]), offset, bucket)
            continue
        inner = shape[1:]
        size = 1
        for s in inner:
            size *= s
        start, end = expert * size, (expert + 1) * size
        mine = tuple(
            Hold(
                h.holder,
                max(h.lo, start) - start,
                min(h.hi, end) - start,
                h.key,
                h.at + max(h.lo, start) - h.lo,
            )
            for h in holds[name]
            if max(h.lo, start) < min(h.hi, end)
        )
        out[(name, expert)] = Unit(name, expert, inner, mine, offset + start, bucket)
    return out


def unit_key(m: MatrixRef) -> Tuple[str, Optional[int]]:
    return (m.name, m.expert_index)
