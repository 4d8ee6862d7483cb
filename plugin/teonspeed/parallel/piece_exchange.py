"""The one exchange of sharded pieces, run each step by the plan (`zero_partition.ZeroPlan`): each job's
pieces of the momentum go to its owner, which assembles every member whole (after a TP gather where the
members are TP-sharded), transforms the groups (`runner.transform_stacks`), and sends each holder its slice
of the update back: two rounds of batched point-to-point in the tp × dp work group, skipped when nothing
moves; with replicated pieces and `plan.relay` (HSDP), the slices go back to the holders the owner read only,
which pass them on round by round to the other replicas of their range (a ring all-gather).
The layouts differ only in their holds (`sharded.py`): ZeRO-1/2 and Megatron's flat partitions,
ZeRO-3's even splits, FSDP2's dim-0 chunks.
"""

from __future__ import annotations

from typing import Callable, Dict, Hashable, List, Mapping, Optional, Tuple, Union

import torch
import torch.distributed as dist

from ..grouping import MatrixRef, OrthoGroup
from ..matrix_io import in_unit
from .pieces import TPSplit
from .runner import StepIO, transform_stacks
from .shard_spec import assemble, shard_of
from .stats import CommStats
from .zero_partition import Hold, Unit, ZeroJob, ZeroPlan

TPSplitOf = Callable[[MatrixRef], TPSplit]  # a matrix's TP slices, on the topology the plan covers
Pieces = Union[
    torch.Tensor, Mapping[Hashable, torch.Tensor]
]  # a rank's stepped tensors by key (or a flat buffer)


class FlatStep:
    """One orthogonalization step of a rank's pieces by the plan (any layout of sharded pieces: ZeRO-1/2's
    and Megatron's flat partitions, ZeRO-3's even splits, FSDP2's dim-0 chunks): two rounds of
    point-to-point exchange in the tp × dp work group (pieces to owners, update slices back), skipped
    when nothing moves. `dp_rank`: this rank's data-parallel index (the holder the plan names it by)."""

    def __init__(self, plan: ZeroPlan, dp_rank: int, me: int, work_group) -> None:
        self.plan, self.dp_rank, self.me, self.work_group = plan, dp_rank, me, work_group
        self.moves = bool(plan.exchanged_jobs())
        # What this rank receives from each rank in the two rounds: fixed by the plan, so counted once here.
        self.piece_sizes, self.update_sizes = self._incoming_sizes(), self._incoming_update_sizes()
        self.relays = [self._relay_moves(moves) for moves in plan.relay_rounds()]

    def expected_bytes(self, itemsize: int) -> Tuple[int, int]:
        """(sent, received) bytes of one step on this rank, from the plan alone."""
        if not self.moves:
            return 0, 0
        sent, received = self.plan.bytes_per_rank(itemsize)
        return sent[self.me], received[self.me]

    def run(
        self,
        directions: Pieces,
        out: Pieces,
        io: StepIO,
        tp_split: TPSplitOf,
        stats: CommStats,
        like: Optional[torch.Tensor] = None,
    ) -> None:
        """This rank's stepped tensors `directions` (key -> tensor, the keys its holds name) -> their
        updates, written into `out` (zeros, the same shapes); bytes and FLOPs counted in `stats`. A flat
        plan also takes its local buffer as one tensor (its partitions end to end). `io`: the transform and
        the fused-matrix I/O; `like`: the dtype and device to exchange in where this rank holds no piece."""
        directions, out = self._keyed(directions), self._keyed(out)
        plan, me = self.plan, self.me
        like = next(iter(directions.values()), like)
        received, sent_bytes, recv_bytes = self._exchange(
            self._outgoing_pieces(directions) if self.moves else [], self.piece_sizes, like
        )
        mine = [job for job in plan.jobs if job.owner == me]
        units = self._assemble(mine, directions, received)
        updates = self._transform(mine, units, io, tp_split, like.dtype)
        back, s2, r2 = self._exchange(
            self._outgoing_updates(mine, updates) if self.moves else [], self.update_sizes, like
        )
        self._write_local(out, updates, back)
        for sends, receives in self.relays:  # relayed slices on to the other replicas (HSDP, `plan.relay`)
            parts = [[self._held(out, h) for h in holds] for holds in sends]
            got, s3, r3 = self._exchange(parts, [sum(h.numel for h in hs) for hs in receives], like)
            for peer, holds in enumerate(receives):
                at = 0
                for h in holds:
                    self._held(out, h).copy_(got[peer][at : at + h.numel])
                    at += h.numel
            s2, r2 = s2 + s3, r2 + r3
        stats.add(sent_bytes + s2, recv_bytes + r2)
        stats.flops += sum(job.flops for job in mine)

    def _keyed(self, tensors: Pieces) -> Mapping[Hashable, torch.Tensor]:
        if isinstance(tensors, torch.Tensor):  # a flat local buffer: bucket b is stepped tensor b
            return dict(enumerate(tensors.split(self.plan.partition_sizes)))
        return tensors

    # -- phase A: momentum pieces to the owners -------------------------------------------------------
    def _my_piece(self, directions, hold: Hold) -> torch.Tensor:
        return directions[hold.key].reshape(-1)[hold.at : hold.at + hold.numel]

    def _outgoing_pieces(self, directions):
        send: List[List[torch.Tensor]] = [[] for _ in range(self.plan.work_size)]
        for job in self.plan.jobs:
            if job.owner != self.me and any(r == self.me for *_, r in self.plan.sources(job)):
                for _, holds in self.plan.reads(job):
                    send[job.owner] += [
                        self._my_piece(directions, h) for h in holds if h.holder == self.dp_rank
                    ]
        return send

    def _incoming_sizes(self) -> List[int]:
        sizes = [0] * self.plan.work_size
        for job in self.plan.jobs:
            if job.owner == self.me:
                for _, d, r in self.plan.sources(job):
                    if r != self.me:
                        sizes[r] += self.plan.source_numel(job, d)
        return sizes

    def _assemble(self, mine: List[ZeroJob], directions, received) -> Dict[Tuple[int, Unit], torch.Tensor]:
        """(tp rank, unit) -> that TP rank's whole unit tensor, for the jobs I own."""
        plan = self.plan
        offsets = [0] * plan.work_size
        out: Dict[Tuple[int, Unit], torch.Tensor] = {}
        for job in mine:
            tps = sorted({t for t, _, _ in plan.sources(job)})
            for t in tps:
                for u, holds in plan.reads(job):
                    pieces = []
                    for h in holds:  # ascending ranges tiling the unit
                        r = plan.work_rank[(t, h.holder)]
                        if r == self.me:
                            pieces.append(self._my_piece(directions, h))
                        else:
                            pieces.append(received[r][offsets[r] : offsets[r] + h.numel])
                            offsets[r] += h.numel
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
                    if hi > lo:
                        send[r].append(self._update_of(updates, job, t, u).reshape(-1)[lo:hi])
        return send

    def _incoming_update_sizes(self) -> List[int]:
        sizes = [0] * self.plan.work_size
        for job in self.plan.jobs:
            if job.owner != self.me and any(r == self.me for *_, r in self.plan.targets(job)):
                sizes[job.owner] += self.plan.piece_numel(job, self.dp_rank)
        return sizes

    def _write_local(self, out, updates, back) -> None:
        plan = self.plan
        my_tp = plan.position(self.me)[0]
        offsets = [0] * plan.work_size
        for job in plan.jobs:
            if not any(r == self.me for *_, r in plan.targets(job)):
                continue
            for u in job.units:
                h = u.hold(self.dp_rank)
                if h is None or h.hi == h.lo:
                    continue
                if job.owner == self.me:
                    value = self._update_of(updates, job, my_tp, u).reshape(-1)[h.lo : h.hi]
                else:
                    r = job.owner
                    value = back[r][offsets[r] : offsets[r] + h.numel]
                    offsets[r] += h.numel
                out[h.key].view(-1)[h.at : h.at + h.numel].copy_(value)

    # -- relayed slices (replicated pieces) -------------------------------------------------------------
    def _relay_moves(self, moves):
        """One relay round's holds this rank sends to and receives from each rank, in the plan's order."""
        sends: List[List[Hold]] = [[] for _ in range(self.plan.work_size)]
        receives: List[List[Hold]] = [[] for _ in range(self.plan.work_size)]
        for src, dst, mine, theirs in moves:
            if src == self.me:
                sends[dst].append(mine)
            if dst == self.me:
                receives[src].append(theirs)
        return sends, receives

    @staticmethod
    def _held(tensors, h: Hold) -> torch.Tensor:
        return tensors[h.key].view(-1)[h.at : h.at + h.numel]

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
