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
from ..matrix_io import in_unit
from .cost import ClusterProfile
from .pieces import TPSplit
from .runner import StepIO, transform_stacks
from .shard_spec import assemble, shard_of
from .stats import CommStats
from .zero_partition import Unit, ZeroJob, ZeroPlan
from .zero_planner import plan_zero_buckets


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
    mine = []
    for g in groups:
        inside = [m.name in places for m in g.members]
        if all(inside):
            mine.append(g)
        elif any(inside):
            outside = next(m.label for m, i in zip(g.members, inside) if not i)
            labels = " + ".join(m.label for m in g.members)
            raise ValueError(
                f"teonspeed: the group {labels} is partly outside the flat partitions planned "
                f"together ({outside} is not in them: another param group, data-parallel group "
                f"or expert/dense buffer); put its members in one param group, or set teon_k=1"
            )
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


TPSplitOf = Callable[[MatrixRef], TPSplit]  # a matrix's TP slices, on the topology the plan covers


class FlatStep:
    """One ZeRO-1/2 orthogonalization step of a rank's local buffer (its partition of each flat buffer the
    plan covers, end to end), by the plan: two rounds of point-to-point exchange in the tp × dp work group
    (pieces to owners, update slices back), skipped when nothing moves. `dp_rank`: the partition index this
    rank holds."""

    def __init__(self, plan: ZeroPlan, dp_rank: int, me: int, work_group) -> None:
        self.plan, self.dp_rank, self.me, self.work_group = plan, dp_rank, me, work_group
        self.moves = bool(plan.exchanged_jobs())
        # What this rank receives from each rank in the two rounds: fixed by the plan, so counted once here.
        self.piece_sizes, self.update_sizes = self._incoming_sizes(), self._incoming_update_sizes()

    def expected_bytes(self, itemsize: int) -> Tuple[int, int]:
        """(sent, received) bytes of one step on this rank, from the plan alone."""
        if not self.moves:
            return 0, 0
        sent, received = self.plan.bytes_per_rank(itemsize)
        return sent[self.me], received[self.me]

    def run(
        self, direction: torch.Tensor, out: torch.Tensor, io: StepIO, tp_split: TPSplitOf, stats: CommStats
    ) -> None:
        """This rank's local buffer `direction` -> its update, written into `out` (zeros, the same shape);
        bytes and FLOPs counted in `stats`. `io`: the transform and the fused-matrix I/O."""
        plan, me = self.plan, self.me
        received, sent_bytes, recv_bytes = self._exchange(
            self._outgoing_pieces(direction) if self.moves else [], self.piece_sizes, direction
        )
        mine = [job for job in plan.jobs if job.owner == me]
        units = self._assemble(mine, direction, received)
        updates = self._transform(mine, units, io, tp_split, direction.dtype)
        back, s2, r2 = self._exchange(
            self._outgoing_updates(mine, updates) if self.moves else [], self.update_sizes, direction
        )
        self._write_local(out, updates, back)
        stats.add(sent_bytes + s2, recv_bytes + r2)
        stats.flops += sum(job.flops for job in mine)

    # -- phase A: momentum pieces to the owners -------------------------------------------------------
    def _my_piece(self, direction: torch.Tensor, unit: Unit) -> torch.Tensor:
        lo, hi = self.plan.local(unit, self.dp_rank)
        return direction[lo:hi]

    def _outgoing_pieces(self, direction):
        send: List[List[torch.Tensor]] = [[] for _ in range(self.plan.work_size)]
        for job in self.plan.jobs:
            if job.owner != self.me and any(r == self.me for *_, r in self.plan.sources(job)):
                send[job.owner] += [self._my_piece(direction, u) for u in job.units]
        return send

    def _incoming_sizes(self) -> List[int]:
        sizes = [0] * self.plan.work_size
        for job in self.plan.jobs:
            if job.owner == self.me:
                for _, d, r in self.plan.sources(job):
                    if r != self.me:
                        sizes[r] += self.plan.piece_numel(job, d)
        return sizes

    def _assemble(self, mine: List[ZeroJob], direction, received) -> Dict[Tuple[int, Unit], torch.Tensor]:
        """(tp rank, unit) -> that TP rank's whole unit tensor, for the jobs I own."""
        plan = self.plan
        offsets = [0] * plan.work_size
        out: Dict[Tuple[int, Unit], torch.Tensor] = {}
        for job in mine:
            by_tp: Dict[int, Dict[int, int]] = {}
            for t, d, r in plan.sources(job):
                by_tp.setdefault(t, {})[d] = r
            for t, ranks in by_tp.items():
                for u in job.units:
                    pieces = []
                    for d, r in sorted(ranks.items()):
                        lo, hi = plan.piece(u, d)
                        if hi == lo:
                            continue
                        if r == self.me:
                            pieces.append(self._my_piece(direction, u))
                        else:
                            pieces.append(received[r][offsets[r] : offsets[r] + hi - lo])
                            offsets[r] += hi - lo
                    out[(t, u)] = torch.cat(pieces).view(u.shape)
        return out

    # -- compute ----------------------------------------------------------------------------------------
    def _transform(self, mine, units, io: StepIO, tp_split: TPSplitOf, dtype: torch.dtype):
        """Transform every group of the jobs I own (same stacked shapes batched: one local buffer has one
        dtype); returns (tp rank, unit) -> that TP rank's update of the unit."""
        plan = self.plan
        unit_of = {(u.name, u.expert_index): u for job in mine for u in job.units}
        tps = {id(g): sorted({t for t, _, _ in plan.sources(job)}) for job in mine for g in job.groups}
        updates = {key: torch.zeros_like(value) for key, value in units.items()}

        def whole(g: OrthoGroup, i: int, m: MatrixRef) -> torch.Tensor:
            u, split = unit_of[(m.name, m.expert_index)], tp_split(m)
            shards = [io.view(in_unit(m), units[(t, u)]) for t in tps[id(g)]]
            return assemble(shards, split.dim if len(shards) > 1 else None, split.stride)

        def put(g: OrthoGroup, i: int, m: MatrixRef, piece: torch.Tensor) -> None:
            u, split = unit_of[(m.name, m.expert_index)], tp_split(m)
            piece = piece * io.scale(m)
            tp_ranks = tps[id(g)]
            for t in tp_ranks:
                value = (
                    piece if len(tp_ranks) == 1 else shard_of(piece, split.dim, t, plan.tp_size, split.stride)
                )
                io.store(in_unit(m), updates[(t, u)], value)

        transform_stacks([g for job in mine for g in job.groups], whole, lambda g: dtype, io.transform, put)
        return updates

    # -- phase B: each holder's slice of the update back ----------------------------------------------
    def _update_of(self, updates, job: ZeroJob, t: int, u: Unit) -> torch.Tensor:
        return updates[(t, u)] if (t, u) in updates else updates[(self.plan.position(job.owner)[0], u)]

    def _outgoing_updates(self, mine, updates):
        plan = self.plan
        send: List[List[torch.Tensor]] = [[] for _ in range(plan.work_size)]
        for job in mine:
            for t, d, r in plan.targets(job):
                if r == self.me:
                    continue
                for u in job.units:
                    lo, hi = plan.piece(u, d)
                    send[r].append(
                        self._update_of(updates, job, t, u).reshape(-1)[lo - u.offset : hi - u.offset]
                    )
        return send

    def _incoming_update_sizes(self) -> List[int]:
        sizes = [0] * self.plan.work_size
        for job in self.plan.jobs:
            if job.owner != self.me and any(r == self.me for *_, r in self.plan.targets(job)):
                sizes[job.owner] += self.plan.piece_numel(job, self.dp_rank)
        return sizes

    def _write_local(self, out: torch.Tensor, updates, back) -> None:
        plan = self.plan
        my_tp = plan.position(self.me)[0]
        offsets = [0] * plan.work_size
        for job in plan.jobs:
            if not any(r == self.me for *_, r in plan.targets(job)):
                continue
            for u in job.units:
                lo, hi = plan.piece(u, self.dp_rank)
                if hi == lo:
                    continue
                if job.owner == self.me:
                    value = self._update_of(updates, job, my_tp, u).reshape(-1)[lo - u.offset : hi - u.offset]
                else:
                    r = job.owner
                    value = back[r][offsets[r] : offsets[r] + hi - lo]
                    offsets[r] += hi - lo
                at = plan.local(u, self.dp_rank)[0]
                out[at : at + hi - lo].copy_(value)

    # -- the exchange ---------------------------------------------------------------------------------
    def _exchange(self, send: List[List[torch.Tensor]], recv_sizes: List[int], like: torch.Tensor):
        """Point-to-point sends and receives with only the ranks this one exchanges data with (batched; an
        all_to_all would post a message to every rank of the tp × dp group, whose latency grows with the
        group while a rank's peers here are a few holders and owners); returns the buffer received from
        each rank and the bytes sent/received."""
        itemsize = like.element_size()
        if not self.moves:
            return [like.new_empty(0)] * self.plan.work_size, 0, 0
        out = like.new_empty(sum(recv_sizes))
        received = list(out.split(recv_sizes))
        ops = []
        for peer, parts in enumerate(send):
            if parts:
                ops.append(dist.P2POp(dist.isend, torch.cat(parts), group=self.work_group, group_peer=peer))
        for peer, buffer in enumerate(received):
            if buffer.numel():
                ops.append(dist.P2POp(dist.irecv, buffer, group=self.work_group, group_peer=peer))
        for work in dist.batch_isend_irecv(ops) if ops else []:
            work.wait()
        sent = sum(t.numel() for parts in send for t in parts)
        return received, sent * itemsize, sum(recv_sizes) * itemsize
