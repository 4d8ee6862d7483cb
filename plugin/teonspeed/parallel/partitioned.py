"""The runner of sharded data-parallel layouts: DeepSpeed ZeRO-1/2 (one flat partition per param group),
Megatron's distributed optimizer (one partition per DDP bucket), and any `sharded.PieceLayout` (DeepSpeed
ZeRO-3's sub-groups, FSDP2's dim-0 chunks). The jobs are planned once, at attach (`zero_partition.py`: a
matrix inside one partition is computed where it lives, only jobs cut by partition boundaries, or moved by
balancing, travel): each ZeRO partition alone, and the buckets of one topology together (a rank's partitions
of them end to end form its local buffer, so a TEON stack whose members lie in different buckets is one job).
Every step runs each plan's two exchange rounds (`piece_exchange.FlatStep`). The runner it wraps (local or
distributed) keeps the step check, the topologies and the counters.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from ..config import OptimizerConfig
from ..grouping import MatrixRef, OrthoGroup
from .cost import cluster_profile
from .distributed import DistributedRunner
from .flat import FlatPartition, FlatStep, gather_work_ranks, plan_layout, plan_partitions
from .sharded import PieceLayout
from .owners import ns_flops
from .pieces import TPSplit
from .runner import Key, Runner, StepCheck, StepIO, StepVerdict
from .stats import CommStats
from .topology import Topology

Layout = Union[FlatPartition, PieceLayout]  # what a partition runner plans over


def check_groups_within_partitions(
    partitions: Mapping[Key, Layout],
    groups: Sequence[OrthoGroup],
    where: str = "",
    fix: Union[str, Callable[[Sequence[Key]], str]] = "",
) -> None:
    """A TEON group must live inside one partition (the partitions are planned one at a time). `fix`: what
    to do, or a function of the partitions' keys the group's members are in that says it."""
    owner = {name: key for key, fp in partitions.items() for name in fp.names()}
    for g in groups:
        keys = list(dict.fromkeys(owner.get(m.name) for m in g.members))
        if len(keys) > 1:
            what = fix(keys) if callable(fix) else fix
            raise ValueError(
                f"teonspeed: under {where or 'ZeRO-1/2'} the members of a TEON group must be in the same "
                f"{'sub-group' if where else 'param group'}; "
                + " + ".join(m.label for m in g.members)
                + f" are not. {what or 'Put them in one group'} or set teon_k=1"
            )


class PartitionRunner:
    """Runner over flat partitions (keys as in StepIO.directions), planned at construction: a collective
    over each plan's tp × dp work group, so every rank constructs it at the same point. `together`: plan
    the partitions of one topology and data-parallel group as one local buffer (Megatron's buckets). A
    partition is a `FlatPartition` (offsets in a flat buffer cut into equal partitions) or any
    `sharded.PieceLayout` (ZeRO-3, FSDP2: each holder's ranges of each parameter), planned alone."""

    policy = None  # the plans are fixed at attach; nothing else decides who computes what

    def __init__(
        self,
        base: Runner,
        partitions: Mapping[Key, Layout],
        groups: Sequence[OrthoGroup],
        config: OptimizerConfig,
        device_of: Callable[[Key], torch.device],
        adamw_bytes: int = 0,
        together: bool = False,
        itemsize: int = 4,
    ) -> None:
        self.base = base
        self._itemsize = itemsize  # the stepped tensors' element size: what the exchange moves per element
        self.partitions = dict(partitions)
        self._distributed = base if isinstance(base, DistributedRunner) else None
        self._adamw_bytes = adamw_bytes  # what AdamW moves for the same matrices in this layout (comm_stats)
        self._ns_steps, self._cluster = config.ns_steps, cluster_profile(config.cluster)
        sets: Dict[Tuple, List[Key]] = {}  # (topology, data-parallel ranks), or the key alone -> keys
        for key, fp in self.partitions.items():
            if together:
                ranks = tuple(dist.get_process_group_ranks(fp.dp_group)) if fp.dp_group is not None else ()
                sets.setdefault((id(self._topology(fp)), ranks), []).append(key)
            else:
                sets[(key,)] = [key]
        self.steps: Dict[Tuple[Key, ...], FlatStep] = {
            tuple(keys): self._plan([self.partitions[k] for k in keys], list(groups), device_of(keys[0]))
            for keys in sets.values()
        }

    @property
    def stats(self) -> Optional[CommStats]:
        return self.base.stats

    @property
    def step_group(self):
        return getattr(self.base, "step_group", None)

    # -- planning -------------------------------------------------------------------------------------
    def tp_split(self, m: MatrixRef) -> TPSplit:
        """m's TP slices on the topology it lives on (whole in a single process)."""
        if self._distributed is None:
            return TPSplit(None, 1)
        pieces = self._distributed.pieces
        return pieces.tp_split(m, self._distributed.topologies[pieces.topology_name(m.name)])

    def _topology(self, partition: Layout) -> Optional[Topology]:
        """The topology a flat partition is planned on (None in a single process): the expert one
        (expert-TP × expert-DP) for expert-parallel weights, which DeepSpeed's MoE groups and Megatron's
        expert_parallel_buffers partition over the expert-data-parallel group; the dense one otherwise."""
        if self._distributed is None:
            return None
        kinds = {n: self._distributed.pieces.topology_name(n) for n in partition.names()}
        if len(set(kinds.values())) > 1:
            dense = next(n for n, kind in kinds.items() if kind == "dense")
            expert = next(n for n, kind in kinds.items() if kind == "expert")
            raise ValueError(
                f"teonspeed: a ZeRO-1/2 partition (or Megatron distributed-optimizer bucket) "
                f"holds dense weights ({dense!r}) and expert-parallel weights ({expert!r}); "
                f"they are partitioned over different data-parallel groups. Put the expert "
                f"parameters "
                f"in their own param group (DeepSpeed: "
                f"deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer)"
            )
        kind = next(iter(kinds.values()), "dense")
        topology = self._distributed.topologies[kind]
        cut_over = dist.get_process_group_ranks(partition.dp_group) if partition.dp_group is not None else []
        if not set(cut_over) <= set(topology.work_ranks):
            raise ValueError(
                f"teonspeed: a sharded layout (ZeRO partition, Megatron bucket, FSDP2 mesh) of {kind} "
                f"weights is cut over ranks "
                f"{cut_over}, outside the {kind} tensor x data-parallel group "
                f"{list(topology.work_ranks)}: the data-parallel groups given to teonspeed "
                f"(ParallelContext dp_group / expert_dp_group) are not the ones the layout is sharded over"
            )
        return topology

    def _plan(self, partitions: List[Layout], groups, device: torch.device) -> FlatStep:
        """One plan and step over this rank's partitions of flat buffers of one topology, cut over the same
        data-parallel ranks (a collective over its tp × dp work group)."""
        partition = partitions[0]
        topology = self._topology(partition)
        tp_size, tp_rank = (topology.tp_size, topology.tp_rank) if topology is not None else (1, 0)
        work_group, work_size, me = (
            (topology.work_group, topology.work_size, topology.work_rank)
            if topology is not None
            else (None, 1, 0)
        )
        work_rank = gather_work_ranks(partition, tp_rank, tp_size, work_group, work_size, device)
        steps = self._ns_steps
        planner = plan_layout if isinstance(partition, PieceLayout) else plan_partitions
        plan = planner(
            partition if isinstance(partition, PieceLayout) else partitions,
            groups,
            work_rank,
            tp_size,
            cost=lambda g: ns_flops(g.stacked_shape, steps),
            tp_sharded=lambda m: self.tp_split(m).dim is not None,
            cluster=self._cluster,
            itemsize=self._itemsize,
        )
        return FlatStep(plan, partition.dp_rank, me, work_group)

    # -- the Runner contract -------------------------------------------------------------------------
    def check_step(self, check: StepCheck) -> StepVerdict:
        return self.base.check_step(check)

    def topology_of(self, group: OrthoGroup) -> str:
        return self.base.topology_of(group)

    def run(self, groups: Sequence[OrthoGroup], io: StepIO) -> None:
        """Every planned partition with a direction this step (its jobs are fixed by its plan: `groups`
        are the ones they hold), in the order they were planned, so the exchanges match across ranks."""
        stats = self.stats if self.stats is not None else CommStats()  # a single process counts nothing
        if io.new_step:
            stats.start_step()
            stats.adamw_bytes = self._adamw_bytes
        like = next(iter(io.directions.values()), None)
        for keys, flat_step in self.steps.items():
            layout = self.partitions[keys[0]]
            if isinstance(layout, PieceLayout):  # its holds name this rank's stepped tensors by io key
                mine = layout.keys()
                if keys[0] in io.directions or any(k in io.directions for k in layout.keys(None)):
                    directions = {k: io.directions[k] for k in mine}
                    updates = {k: io.updates[k] for k in mine}
                    flat_step.run(directions, updates, io, self.tp_split, stats, like)
                continue
            if keys[0] not in io.directions:
                continue
            # flat partitions planned as one local buffer: bucket b (in planned order) is stepped tensor b
            directions = {b: io.directions[k] for b, k in enumerate(keys)}
            flat_step.run(
                directions, {b: io.updates[k] for b, k in enumerate(keys)}, io, self.tp_split, stats
            )

    def describe(self, groups: Sequence[OrthoGroup]) -> Dict[int, str]:
        """id(group) -> the work rank whose job computes it (its partition's plan)."""
        out = {}
        for flat_step in self.steps.values():
            plan = flat_step.plan
            for job in plan.jobs:
                tp, partition = plan.position(job.owner)
                for g in job.groups:
                    out[id(g)] = f"work rank {job.owner} (tp {tp}, partition {partition})"
        return out

    def expected_bytes(
        self, groups: Sequence[OrthoGroup] = (), itemsize: Optional[int] = None
    ) -> Tuple[int, int]:
        """(sent, received) bytes of one step on this rank, predicted by the plans (elements of `itemsize`
        bytes; by default the stepped tensors' given at construction: fp32 masters under ZeRO)."""
        pairs = [s.expected_bytes(itemsize or self._itemsize) for s in self.steps.values()]
        return sum(p[0] for p in pairs), sum(p[1] for p in pairs)

    def adamw_bytes(self, groups: Sequence[OrthoGroup] = (), itemsize: int = 4) -> int:
        return self._adamw_bytes
