"""The parallel step: gather each group's tensor-parallel shards onto one owner rank, orthogonalize the
full stacked matrix there, and send every rank its shard of the update.

    phase A  all_to_all over TP: each rank sends its shards of the groups owned by a TP peer of its own
             data-parallel replica (the replicas hold identical gradients, so one copy suffices)
    compute  each owner transforms its groups, same-shape stacks batched into one call
    phase B  (1) all_to_all over TP: each owner hands its TP peers their shards of its updates, so each
             rank holds its shard of every update its replica owns (its replica's "chunk");
             (2) over each TP position's data-parallel group: one broadcast per owning replica of that
             replica's chunk

Why broadcasts per replica, not point-to-point copies or an all-gather: every rank must end with its
shard of every update, so it receives at least (all shards) − (its replica's chunk) whatever the
collective. One copy per receiver from the owner (the old all_to_all) makes the owner send W−1 copies:
its bytes grow with the ranks. An all-gather over the column needs equal chunks; padding them costs
(D−1)·largest chunk per rank, which explodes once replicas outnumber the groups of a wave (at 1,024
GPUs most replicas own nothing, one owns a 2048×8192 matrix). A broadcast (NCCL: pipelined ring) moves
exactly each chunk once over every link, so per-rank bytes stay ≈ one model shard at any D, with one
collective per owning replica per wave (latency bounded by the groups of the wave, not by W).

Owners are chosen by `owners.assign_owners` on the iteration's FLOPs, the same on every rank, so no
metadata is exchanged: both sides of every message derive its layout from the shared plan. The groups
go in `waves` (asynchronous collectives): wave k is transformed while wave k+1's shards travel to their
owners and wave k-1's updates travel back. `comm_dtype` (e.g. bf16) is what every exchange carries;
an owner rounds its own shards the same way, so the update does not depend on who owns what and all
replicas write identical values.
"replicated" mode instead all-gathers every shard over TP and computes everything on every rank; "auto"
mode runs each group one way or the other, as `placement.choose_owner_compute` decides from the cluster's
constants (replicated groups first, then the owner-compute waves).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..grouping import MatrixRef, OrthoGroup
from .agreement import agree
from .cost import ClusterProfile, adamw_bytes
from .owner_compute import OwnerCompute, TopologyPlan
from .owners import assign_owners, ns_flops
from .pieces import Pieces, TPSplit
from .placement import GroupCost, choose_owner_compute, layout_of
from .runner import StepCheck, StepIO, StepVerdict, transform_stacks
from .shard_spec import ShardSpec, assemble
from .stats import CommStats
from .topology import StepGroup, Topology


class DistributedRunner:
    """Parameters whole or TP-sliced on each rank, replicated over the data-parallel replicas: each group
    computed by an owner (owner-compute), by every rank (replicated), or either as "auto" decides."""

    def __init__(
        self,
        topologies: Dict[str, Topology],
        specs: Dict[str, ShardSpec],
        mode: str,
        ns_steps: int,
        *,
        step_group: Optional[StepGroup] = None,
        waves: int,
        comm_dtype: Optional[torch.dtype] = None,
        profile: Optional[ClusterProfile] = None,
    ) -> None:
        self.topologies = topologies  # "dense" and "expert"
        self.pieces = Pieces(specs, topologies)
        self.mode = mode
        self.ns_steps = ns_steps
        self.step_group = step_group
        self.stats = CommStats()
        self.waves = max(1, waves)  # owner-compute exchanges in this many overlapped waves
        self.comm_dtype = comm_dtype  # None: exchange in the data's dtype
        self.profile = profile or ClusterProfile()  # auto mode decides with these constants
        self._owner_compute = OwnerCompute(self.pieces, self.stats, ns_steps, self.waves)
        self._choices: Dict[Tuple, List[bool]] = {}

    @property
    def policy(self) -> str:
        """What decides who computes what, beyond the groups: part of the plan every rank must share."""
        return f"parallel_mode={self.mode}" + (f" {self.profile}" if self.mode == "auto" else "")

    # -- shared by every rank ---------------------------------------------------------------------
    def check_step(self, check: StepCheck) -> StepVerdict:
        """The step's one all-reduce and host read (agreement.agree) over the ranks sharing the step."""
        return agree(check, self.step_group, self.topologies)

    def owners(self, groups: Sequence[OrthoGroup], topology: Topology) -> List[int]:
        """The owner of each of `groups` (the owner-compute ones of a topology)."""
        return assign_owners([ns_flops(g.stacked_shape, self.ns_steps) for g in groups], topology.work_size)

    def owner_computed(self, groups: Sequence[OrthoGroup], topology: Topology) -> List[bool]:
        """Per group of a topology: True where an owner computes it, False where every rank does."""
        if self.mode != "auto":
            return [self.mode == "distributed"] * len(groups)
        key = (id(topology), tuple((g.stacked_shape, tuple(m.name for m in g.members)) for g in groups))
        if key not in self._choices:
            # The exchange itemsize is fixed (comm_dtype's, else fp32's), not the data's: the choice must not
            # depend on which step or entry point asks (expected_bytes, describe, run).
            itemsize = self.comm_dtype.itemsize if self.comm_dtype is not None else 4
            costs = [
                GroupCost(
                    ns_flops(g.stacked_shape, self.ns_steps),
                    itemsize * sum(self.pieces.shard_numel(m, topology) for m in g.members),
                    itemsize
                    * sum(
                        self.pieces.shard_numel(m, topology)
                        for m in g.members
                        if self.pieces.sharded(m, topology)
                    ),
                )
                for g in groups
            ]
            layout = layout_of(topology.positions, topology.work_ranks, self.profile.gpus_per_node)
            if len(self._choices) > 64:
                self._choices.clear()
            self._choices[key] = choose_owner_compute(costs, layout, self.profile, self.waves)
        return self._choices[key]

    def _split(
        self, groups: Sequence[OrthoGroup], topology: Topology
    ) -> Tuple[List[OrthoGroup], List[OrthoGroup]]:
        """(replicated groups, owner-compute groups) of a topology, each in the given order."""
        owned = self.owner_computed(groups, topology)
        return [g for g, o in zip(groups, owned) if not o], [g for g, o in zip(groups, owned) if o]

    def topology_of(self, group: OrthoGroup) -> str:
        return self.pieces.topology_of(group)

    def placement(self, m: MatrixRef, topology: Topology) -> TPSplit:
        return self.pieces.tp_split(m, topology)

    def shard_numel(self, m: MatrixRef, topology: Topology) -> int:
        return self.pieces.shard_numel(m, topology)

    def describe(self, groups: Sequence[OrthoGroup]) -> Dict[int, str]:
        """id(group) -> "work rank r (tp t, replica d)" of the rank that computes it."""
        out = {}
        for key, topo_groups in self._by_topology(groups).items():
            topology = self.topologies[key]
            replicated, owned = self._split(topo_groups, topology)
            for g in replicated:
                out[id(g)] = f"every rank ({key})"
            for g, owner in zip(owned, self.owners(owned, topology)):
                tp, replica = topology.positions[owner]
                out[id(g)] = f"{key} work rank {owner} (tp {tp}, replica {replica})"
        return out

    def expected_bytes(self, groups: Sequence[OrthoGroup], itemsize: Optional[int] = None) -> Tuple[int, int]:
        """(sent, received) bytes of one step on this rank, from the plan alone (itemsize: of the
        exchange dtype; default comm_dtype's, else 4). Phase B's broadcasts count once at the source
        (sent) and once at each receiver."""
        if itemsize is None:
            itemsize = self.comm_dtype.itemsize if self.comm_dtype is not None else 4
        sent = received = 0
        for key, topo_groups in self._by_topology(groups).items():
            topology = self.topologies[key]
            me, peers = topology.work_rank, topology.replica_peers()
            replicated, owned = self._split(topo_groups, topology)
            n = sum(
                self.pieces.shard_numel(m, topology)
                for g in replicated
                for m in g.members
                if self.pieces.sharded(m, topology)
            )
            sent += n * (topology.tp_size - 1)
            received += n * (topology.tp_size - 1)
            for g, owner in zip(owned, self.owners(owned, topology)):
                for m in g.members:
                    n = self.pieces.shard_numel(m, topology)
                    sharded = self.pieces.sharded(m, topology)
                    if owner == me:  # phase A in, phase B (1) out to each TP peer
                        received += n * (len(peers) - 1) if sharded else 0
                        sent += n * (len(peers) - 1)
                    elif owner in peers:  # phase A out, phase B (1) in
                        sent += n if sharded else 0
                        received += n
                    else:  # phase B (2): another replica's broadcast
                        received += n
                    if owner in peers and topology.dp_size > 1:  # phase B (2): my replica's broadcast
                        sent += n
        return sent * itemsize, received * itemsize

    def adamw_bytes(self, groups: Sequence[OrthoGroup], itemsize: int = 4) -> int:
        """What AdamW moves for these matrices in the same layout, per rank and direction: the
        data-parallel ring all-reduce of their gradients (2·(D-1)/D of the local shard), which every
        optimizer pays before its step; the yardstick for the optimizer's own exchanges above."""
        return sum(
            self._adamw_bytes(topo_groups, self.topologies[key], itemsize)
            for key, topo_groups in self._by_topology(groups).items()
        )

    def _adamw_bytes(self, groups: Sequence[OrthoGroup], topology: Topology, itemsize: int) -> int:
        local = sum(self.pieces.shard_numel(m, topology) for g in groups for m in g.members)
        return adamw_bytes(local, topology.dp_size, itemsize)

    def _by_topology(self, groups: Sequence[OrthoGroup]) -> Dict[str, List[OrthoGroup]]:
        by_topology: Dict[str, List[OrthoGroup]] = {}
        for g in groups:
            by_topology.setdefault(self.topology_of(g), []).append(g)
        return dict(sorted(by_topology.items()))

    # -- the step ------------------------------------------------------------------------------------
    def run(self, groups: Sequence[OrthoGroup], io: StepIO) -> None:
        if io.new_step:
            self.stats.start_step()
        # Every rank of a topology holds the same group list (same names, shapes and dtypes: checked by
        # check_step); the topologies are visited in a fixed order so the collectives match across ranks.
        for key, topo_groups in self._by_topology(groups).items():
            topology = self.topologies[key]
            dtype = io.group_dtype(topo_groups[0])
            for g in topo_groups[1:]:
                dtype = torch.promote_types(dtype, io.group_dtype(g))
            device = io.source(topo_groups[0].members[0]).device
            self.stats.adamw_bytes += self._adamw_bytes(topo_groups, topology, dtype.itemsize)
            replicated, owned = self._split(topo_groups, topology)
            if replicated:
                self._run_replicated(
                    TopologyPlan(replicated, [], topology, dtype, device, self.comm_dtype or dtype), io
                )
            if owned:
                self._owner_compute.run(
                    TopologyPlan(
                        owned, self.owners(owned, topology), topology, dtype, device, self.comm_dtype or dtype
                    ),
                    io,
                )

    def _run_replicated(self, plan: TopologyPlan, io: StepIO) -> None:
        members = [m for g in plan.groups for m in g.members]
        fulls = self._all_gather_tp(members, [io.read(m) for m in members], plan)
        self._compute(plan, fulls, io)

    def _compute(self, plan: TopologyPlan, fulls: List[torch.Tensor], io: StepIO) -> None:
        """Replicated mode: every rank transforms every group and keeps its own shard."""
        topology = plan.topology
        starts, position = {}, 0
        for g in plan.groups:
            starts[id(g)] = position
            position += len(g.members)

        def put(g: OrthoGroup, i: int, m: MatrixRef, piece: torch.Tensor) -> None:
            if i == 0:
                self.stats.flops += ns_flops(g.stacked_shape, self.ns_steps)
            io.write(m, self.pieces.shard_for(piece, m, topology, topology.my_position[0]))

        transform_stacks(
            plan.groups, lambda g, i, m: fulls[starts[id(g)] + i], io.group_dtype, io.transform, put
        )

    def _all_gather_tp(self, members, locals_, plan: TopologyPlan) -> List[torch.Tensor]:
        """Every member in full on every rank: the TP-split ones all-gathered over TP (one collective),
        the others (whole on every TP rank, as an owner uses them) as they are."""
        topology = plan.topology
        split = [local for m, local in zip(members, locals_) if self.pieces.sharded(m, topology)]
        if topology.tp_group is None or not split:
            return locals_
        flat = torch.cat([t.reshape(-1).to(plan.comm_dtype) for t in split])
        gathered = [torch.empty_like(flat) for _ in range(topology.tp_size)]
        dist.all_gather(gathered, flat, group=topology.tp_group)
        self.stats.add(
            flat.numel() * flat.element_size() * (topology.tp_size - 1),
            flat.numel() * flat.element_size() * (topology.tp_size - 1),
        )
        fulls, offset = [], 0
        for m, local in zip(members, locals_):
            if not self.pieces.sharded(m, topology):
                fulls.append(local)
                continue
            n = local.numel()
            shards = [
                gathered[t][offset : offset + n].view(local.shape).to(plan.dtype)
                for t in range(topology.tp_size)
            ]
            offset += n
            cut = self.pieces.tp_split(m, topology)
            fulls.append(assemble(shards, cut.dim, cut.stride))
        return fulls
