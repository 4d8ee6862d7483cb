"""Owner-compute: each group's TP shards gathered onto one owner rank, transformed there, and every rank
sent its shard of the update (the phases and the choice of collectives are described in distributed.py).

    phase A  all_to_all over TP: my shards of the groups a TP peer of my replica owns, to that owner
    compute  each owner transforms its groups (`runner.transform_stacks`)
    phase B  (1) all_to_all over TP: each owner's updates cut into its TP peers' shards;
             (2) over my column: one broadcast per owning replica of that replica's chunk

The groups go in waves (asynchronous collectives): wave k is transformed while wave k+1's shards travel
to their owners and wave k-1's updates travel back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..grouping import OrthoGroup
from .owners import ns_flops
from .pieces import Pieces
from .runner import StepIO, transform_stacks
from .shard_spec import assemble
from .stats import CommStats
from .topology import Topology


@dataclass(frozen=True)
class TopologyPlan:
    """One topology's share of a step, the same on every rank of its work group: the groups, their
    owners, the work group, and the dtype/device every exchange buffer is created with (the promoted
    dtype of the members, the device of the data)."""

    groups: Sequence[OrthoGroup]
    owners: List[int]
    topology: Topology
    dtype: torch.dtype
    device: torch.device
    comm_dtype: torch.dtype  # what the exchanges carry (config comm_dtype; default: `dtype`)


class OwnerCompute:
    """The owner-compute exchange of one runner: its layout description, counters and wave count."""

    def __init__(self, pieces: Pieces, stats: CommStats, ns_steps: int, waves: int) -> None:
        self.pieces, self.stats, self.ns_steps, self.waves = pieces, stats, ns_steps, waves

    def run(self, plan: TopologyPlan, io: StepIO) -> None:
        """Waves of groups: while the owners transform wave k, the shards of wave k+1 travel to their
        owners and the updates of wave k-1 travel back (asynchronous all_to_alls)."""
        waves = split_waves(
            plan.groups, [ns_flops(g.stacked_shape, self.ns_steps) for g in plan.groups], self.waves
        )
        incoming = self._send_shards(plan, waves[0], io) if waves else None
        outgoing = []
        for k, wave in enumerate(waves):
            received = incoming.wait()
            if k + 1 < len(waves):
                incoming = self._send_shards(plan, waves[k + 1], io)
            updates = self._transform_owned(plan, wave, received, io)
            outgoing.append((wave, self._send_updates(plan, wave, updates)))
        for wave, broadcasts in outgoing:
            self._write_updates(plan, wave, broadcasts.wait(), io)

    def _send_shards(self, plan: TopologyPlan, wave: List[int], io: StepIO) -> "_Exchange":
        """Phase A: my shards of this wave's groups owned by a TP peer of my own replica -> that owner
        (an all_to_all over the TP group: the other replicas take no part)."""
        topology = plan.topology
        me, peers = topology.work_rank, topology.replica_peers()
        send: List[List[torch.Tensor]] = [[] for _ in range(topology.tp_size)]
        recv_sizes = [0] * topology.tp_size
        for gi in wave:
            owner = plan.owners[gi]
            for m in plan.groups[gi].members:
                if not self.pieces.sharded(m, topology):
                    continue
                if owner != me and owner in peers:
                    send[topology.positions[owner][0]].append(io.read(m).reshape(-1).to(plan.comm_dtype))
                if owner == me:
                    for q in peers:
                        if q != me:
                            recv_sizes[topology.positions[q][0]] += self.pieces.shard_numel(m, topology)
        return self._all_to_all(send, recv_sizes, plan, topology.tp_group)

    def _transform_owned(
        self, plan: TopologyPlan, wave: List[int], received: List[torch.Tensor], io: StepIO
    ) -> Dict[Tuple[int, int], torch.Tensor]:
        """Assemble the full members of the groups I own in this wave, transform them (same-shape, same-
        dtype stacks batched), and return (group index, member index) -> full update."""
        groups, topology, pieces = plan.groups, plan.topology, self.pieces
        me, peers = topology.work_rank, topology.replica_peers()
        offsets = [0] * topology.tp_size
        fulls: Dict[Tuple[int, int], torch.Tensor] = {}
        mine = [gi for gi in wave if plan.owners[gi] == me]
        for gi in mine:
            for mi, m in enumerate(groups[gi].members):
                local = io.read(m)
                if not pieces.sharded(m, topology):
                    fulls[(gi, mi)] = local
                    continue
                shards = []
                for q in peers:
                    t = topology.positions[q][0]
                    if (
                        q == me
                    ):  # rounded like the shards that travelled: the update does not depend on the owner
                        shards.append(local.to(plan.comm_dtype).to(plan.dtype))
                    else:
                        n = local.numel()
                        shards.append(
                            received[t][offsets[t] : offsets[t] + n].view(local.shape).to(plan.dtype)
                        )
                        offsets[t] += n
                split = pieces.tp_split(m, topology)
                fulls[(gi, mi)] = assemble(shards, split.dim, split.stride)
        updates: Dict[Tuple[int, int], torch.Tensor] = {}
        index = {id(groups[gi]): gi for gi in mine}

        def put(g: OrthoGroup, i: int, m, piece: torch.Tensor) -> None:
            if i == 0:
                self.stats.flops += ns_flops(g.stacked_shape, self.ns_steps)
            updates[(index[id(g)], i)] = piece

        transform_stacks(
            [groups[gi] for gi in mine],
            lambda g, i, m: fulls[(index[id(g)], i)],
            io.group_dtype,
            io.transform,
            put,
        )
        return updates

    def _send_updates(
        self, plan: TopologyPlan, wave: List[int], updates: Dict[Tuple[int, int], torch.Tensor]
    ) -> "_Broadcasts":
        """Phase B. (1) Inside my replica, an owner hands each TP peer its shard of the updates it owns
        (all_to_all over TP), so every rank then holds its own shard of every update its replica owns:
        its replica's *chunk*. (2) Over my column (the ranks at my TP position, one per replica), one
        broadcast per replica that owns something in this wave carries that replica's chunk to the others
        (asynchronous; waited for in _write_updates)."""
        topology = plan.topology
        me, peers = topology.work_rank, topology.replica_peers()
        send: List[List[torch.Tensor]] = [[] for _ in range(topology.tp_size)]
        recv_sizes = [0] * topology.tp_size
        for gi in wave:
            owner = plan.owners[gi]
            for mi, m in enumerate(plan.groups[gi].members):
                if owner == me:
                    for q in peers:
                        if q != me:
                            shard = self.pieces.shard_for(
                                updates[(gi, mi)], m, topology, topology.positions[q][0]
                            )
                            send[topology.positions[q][0]].append(shard.reshape(-1).to(plan.comm_dtype))
                elif owner in peers:
                    recv_sizes[topology.positions[owner][0]] += self.pieces.shard_numel(m, topology)
        from_peers = (
            self._all_to_all(send, recv_sizes, plan, topology.tp_group).wait() if len(peers) > 1 else []
        )
        offsets = [0] * topology.tp_size
        mine: List[torch.Tensor] = []
        for gi in wave:
            owner = plan.owners[gi]
            if owner not in peers:
                continue
            for mi, m in enumerate(plan.groups[gi].members):
                if owner == me:
                    mine.append(
                        self.pieces.shard_for(updates[(gi, mi)], m, topology, topology.positions[me][0])
                        .reshape(-1)
                        .to(plan.comm_dtype)
                    )
                else:
                    t, n = topology.positions[owner][0], self.pieces.shard_numel(m, topology)
                    mine.append(from_peers[t][offsets[t] : offsets[t] + n])
                    offsets[t] += n
        chunk_sizes = self._chunk_sizes(plan, wave)
        my_replica = topology.my_position[1]
        chunks: Dict[int, torch.Tensor] = {}
        works = []
        for replica, size in chunk_sizes.items():
            if replica == my_replica:
                chunks[replica] = (
                    torch.cat(mine) if mine else torch.empty(0, dtype=plan.comm_dtype, device=plan.device)
                )
            else:
                chunks[replica] = torch.empty(size, dtype=plan.comm_dtype, device=plan.device)
            if topology.column_group is not None:
                src = topology.work_ranks[topology.column_member(replica)]
                works.append(
                    dist.broadcast(chunks[replica], src=src, group=topology.column_group, async_op=True)
                )
            itemsize = chunks[replica].element_size()
            if replica == my_replica:
                self.stats.add(size * itemsize if topology.dp_size > 1 else 0, 0)
            else:
                self.stats.add(0, size * itemsize)
        return _Broadcasts(works, chunks)

    def _chunk_sizes(self, plan: TopologyPlan, wave: List[int]) -> Dict[int, int]:
        """Replica -> elements of its chunk in this wave (my shard of every update it owns), for the
        replicas that own something, in replica order (the same on every rank)."""
        topology = plan.topology
        sizes: Dict[int, int] = {}
        for gi in wave:
            replica = topology.positions[plan.owners[gi]][1]
            sizes[replica] = sizes.get(replica, 0) + sum(
                self.pieces.shard_numel(m, topology) for m in plan.groups[gi].members
            )
        return dict(sorted(sizes.items()))

    def _write_updates(
        self, plan: TopologyPlan, wave: List[int], chunks: Dict[int, torch.Tensor], io: StepIO
    ) -> None:
        """Every rank, owners included, writes its shard from the chunk of the owner's replica, so all
        replicas write the same values (also when comm_dtype rounds them)."""
        topology = plan.topology
        offsets: Dict[int, int] = {}
        for gi in wave:
            replica = topology.positions[plan.owners[gi]][1]
            for m in plan.groups[gi].members:
                n, start = self.pieces.shard_numel(m, topology), offsets.get(replica, 0)
                io.write(
                    m,
                    chunks[replica][start : start + n]
                    .view(self.pieces.shard_shape(m, topology))
                    .to(plan.dtype),
                )
                offsets[replica] = start + n

    def _all_to_all(
        self,
        send: List[List[torch.Tensor]],
        recv_sizes: List[int],
        plan: TopologyPlan,
        group: Optional[dist.ProcessGroup],
    ) -> "_Exchange":
        """Start one batched exchange over `group` (send/recv_sizes indexed by group rank; every member
        takes part, even with nothing to send). Every buffer lives on the data's device (NCCL takes
        nothing else), in the exchange dtype."""
        send_flat = [
            torch.cat(parts) if parts else torch.empty(0, dtype=plan.comm_dtype, device=plan.device)
            for parts in send
        ]
        send_sizes = [t.numel() for t in send_flat]
        out = torch.empty(sum(recv_sizes), dtype=plan.comm_dtype, device=plan.device)
        work = None
        if group is not None:
            work = dist.all_to_all_single(
                out, torch.cat(send_flat), recv_sizes, send_sizes, group=group, async_op=True
            )
        itemsize = out.element_size()
        self.stats.add(sum(send_sizes) * itemsize, sum(recv_sizes) * itemsize)
        return _Exchange(work, out, recv_sizes)


class _Exchange:
    """An all_to_all in flight; wait() gives the flat buffer received from each group rank."""

    def __init__(self, work, out: torch.Tensor, recv_sizes: List[int]) -> None:
        self.work, self.out, self.recv_sizes = work, out, recv_sizes

    def wait(self) -> List[torch.Tensor]:
        if self.work is not None:
            self.work.wait()
        return list(self.out.split(self.recv_sizes))


class _Broadcasts:
    """Phase B's per-replica broadcasts in flight; wait() gives replica -> its chunk."""

    def __init__(self, works: list, chunks: Dict[int, torch.Tensor]) -> None:
        self.works, self.chunks = works, chunks

    def wait(self) -> Dict[int, torch.Tensor]:
        for work in self.works:
            work.wait()
        return self.chunks


def split_waves(groups: Sequence[OrthoGroup], costs: Sequence[float], waves: int) -> List[List[int]]:
    """Group indices cut into at most `waves` consecutive runs of about equal cost (the same on every
    rank: it depends only on the shared plan)."""
    if not groups:
        return []
    total = sum(costs) or 1.0
    out: List[List[int]] = [[]]
    acc = 0.0
    for i, cost in enumerate(costs):
        if out[-1] and acc >= total * len(out) / waves and len(out) < waves:
            out.append([])
        out[-1].append(i)
        acc += cost
    return out
