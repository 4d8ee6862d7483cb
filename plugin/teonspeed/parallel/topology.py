"""The ranks that share one set of matrices: a tensor-parallel group replicated over a data-parallel
group. Each pipeline stage (and, for experts, each expert-parallel rank) has its own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch.distributed as dist


@dataclass
class Topology:
    tp_group: Optional[dist.ProcessGroup]
    tp_size: int
    tp_rank: int
    work_group: Optional[dist.ProcessGroup]  # tp × dp
    work_size: int
    work_rank: int
    positions: List[Tuple[int, int]]  # per work rank: (tp rank, data-parallel replica index)
    work_ranks: Tuple[int, ...] = (0,)  # global ranks of the work group, in work-rank order
    column_group: Optional[dist.ProcessGroup] = None
    """The work ranks at my TP position, one per replica (Megatron's data-parallel group): phase B
    broadcasts each replica's updates over it. None when there is one replica."""

    @property
    def dp_size(self) -> int:
        return self.work_size // self.tp_size

    def column_member(self, replica: int) -> int:
        """The work rank at my TP position in `replica`."""
        return self.positions.index((self.tp_rank, replica))

    @property
    def my_position(self) -> Tuple[int, int]:
        return self.positions[self.work_rank]

    def replica_peers(self) -> List[int]:
        """Work ranks of my own data-parallel replica, in TP-rank order."""
        replica = self.my_position[1]
        peers = [q for q, (_, d) in enumerate(self.positions) if d == replica]
        return sorted(peers, key=lambda q: self.positions[q][0])


def single_process() -> Topology:
    return Topology(None, 1, 0, None, 1, 0, [(0, 0)])


def one_rank_world() -> Topology:
    """A world of one rank that still runs the collectives (on the default group), so one GPU with an
    NCCL group exercises the exchange code."""
    return Topology(dist.group.WORLD, 1, 0, dist.group.WORLD, 1, 0, [(0, 0)], (dist.get_rank(),))


def build_topology(tp_group: Optional[dist.ProcessGroup], dp_group: Optional[dist.ProcessGroup]) -> Topology:
    """Collective over the whole world (every rank must call it, in the same order): creates the
    tp × dp work group of every rank, and learns each member's (tp rank, replica)."""
    if not dist.is_initialized():
        return single_process()
    if dist.get_world_size() == 1:
        return one_rank_world()
    me = dist.get_rank()
    tp_ranks = tuple(dist.get_process_group_ranks(tp_group)) if tp_group is not None else (me,)
    dp_ranks = tuple(dist.get_process_group_ranks(dp_group)) if dp_group is not None else (me,)
    everyone: List[Tuple[Tuple[int, ...], Tuple[int, ...]]] = [None] * dist.get_world_size()  # type: ignore
    dist.all_gather_object(everyone, (tp_ranks, dp_ranks))
    tp_of: Dict[int, Tuple[int, ...]] = {r: everyone[r][0] for r in range(len(everyone))}

    def work_of(rank: int) -> Tuple[int, ...]:
        return tuple(sorted({t for d in everyone[rank][1] for t in tp_of[d]}))

    def column_of(rank: int) -> Tuple[int, ...]:
        return tuple(sorted(g for g in work_of(rank) if tp_of[g].index(g) == tp_of[rank].index(rank)))

    my_work, my_column = work_of(me), column_of(me)
    work_group = column_group = None
    for ranks in sorted({work_of(r) for r in range(len(everyone))}):
        group = dist.new_group(list(ranks))  # every rank creates every group, in the same order
        if ranks == my_work:
            work_group = group
    for ranks in sorted({column_of(r) for r in range(len(everyone))}):
        if len(ranks) > 1:
            group = dist.new_group(list(ranks))
            if ranks == my_column:
                column_group = group
    # A rank's replica index: the position of its TP group's first rank among my DP peers' TP groups.
    replica_leaders = sorted({tp_of[d][0] for d in dp_ranks})
    positions = []
    for r in my_work:
        positions.append((tp_of[r].index(r), replica_leaders.index(tp_of[r][0])))
    return Topology(
        tp_group,
        len(tp_ranks),
        tp_ranks.index(me),
        work_group,
        len(my_work),
        my_work.index(me),
        positions,
        my_work,
        column_group,
    )


@dataclass(frozen=True)
class StepGroup:
    """The ranks that share one optimizer step: the skip decision and the plan check are reduced over
    them. `work_groups` lists every tp × dp work group inside it (dense and expert) as indices into the
    group, so every rank can tell which ranks must run the same plan."""

    group: Optional[dist.ProcessGroup]
    size: int
    rank: int
    work_groups: Tuple[Tuple[str, Tuple[int, ...]], ...]  # (topology name, member indices)
    ranks: Tuple[int, ...] = (0,)  # global ranks, by index


def build_step_group(
    topologies: Dict[str, Topology], pipeline_group: Optional[dist.ProcessGroup]
) -> StepGroup:
    """Collective over the whole world. The ranks that share this optimizer's step: the union of the
    dense and expert work groups it uses, closed over the pipeline stages (a stage must not step while
    another skips, or the model's stages drift apart: Megatron reduces found_inf over TP × PP for the
    same reason). Ranks that run other work (another model, a reward model) are left out, so they are
    never waited for. The whole world when nothing else runs, which costs no new communicator."""
    if not dist.is_initialized():
        return StepGroup(None, 1, 0, tuple((k, (0,)) for k in sorted(topologies)))
    me = dist.get_rank()
    pp_ranks = tuple(dist.get_process_group_ranks(pipeline_group)) if pipeline_group is not None else (me,)
    mine = ({k: t.work_ranks for k, t in topologies.items()}, pp_ranks)
    everyone: List = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    components = connected_components(
        [set(pp) | {r for w in work.values() for r in w} for work, pp in everyone]
    )
    group = dist.group.WORLD
    if len(components) > 1:
        group = None  # a rank alone needs no collective
        for ranks in components:  # every rank creates every group, in the same order
            if len(ranks) > 1:
                created = dist.new_group(list(ranks))
                if me in ranks:
                    group = created
    ranks = next(c for c in components if me in c)
    index = {r: i for i, r in enumerate(ranks)}
    work_groups = sorted({(k, tuple(index[r] for r in w)) for r in ranks for k, w in everyone[r][0].items()})
    return StepGroup(group, len(ranks), index[me], tuple(work_groups), ranks)


def connected_components(links: Sequence[set]) -> List[Tuple[int, ...]]:
    """Rank r is linked to every rank in links[r]; the classes of the closure, each sorted, in order."""
    parent = list(range(len(links)))

    def find(r: int) -> int:
        while parent[r] != r:
            parent[r] = parent[parent[r]]
            r = parent[r]
        return r

    for r, linked in enumerate(links):
        for q in linked:
            parent[find(q)] = find(r)
    classes: Dict[int, List[int]] = {}
    for r in range(len(links)):
        classes.setdefault(find(r), []).append(r)
    return sorted(tuple(c) for c in classes.values())
