"""The ranks that share one set of matrices: a tensor-parallel group replicated over a data-parallel
group. Each pipeline stage (and, for experts, each expert-parallel rank) has its own."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

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


def build_topology(tp_group: Optional[dist.ProcessGroup], dp_group: Optional[dist.ProcessGroup]) -> Topology:
    """Collective over the whole world (every rank must call it, in the same order): creates the
    tp × dp work group of every rank, and learns each member's (tp rank, replica)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return single_process()
    me = dist.get_rank()
    tp_ranks = tuple(dist.get_process_group_ranks(tp_group)) if tp_group is not None else (me,)
    dp_ranks = tuple(dist.get_process_group_ranks(dp_group)) if dp_group is not None else (me,)
    everyone: List[Tuple[Tuple[int, ...], Tuple[int, ...]]] = [None] * dist.get_world_size()  # type: ignore
    dist.all_gather_object(everyone, (tp_ranks, dp_ranks))
    tp_of: Dict[int, Tuple[int, ...]] = {r: everyone[r][0] for r in range(len(everyone))}

    def work_of(rank: int) -> Tuple[int, ...]:
        return tuple(sorted({t for d in everyone[rank][1] for t in tp_of[d]}))

    my_work = work_of(me)
    work_group = None
    for ranks in sorted({work_of(r) for r in range(len(everyone))}):
        group = dist.new_group(list(ranks))  # every rank creates every group, in the same order
        if ranks == my_work:
            work_group = group
    # A rank's replica index: the position of its TP group's first rank among my DP peers' TP groups.
    replica_leaders = sorted({tp_of[d][0] for d in dp_ranks})
    positions = []
    for r in my_work:
        positions.append((tp_of[r].index(r), replica_leaders.index(tp_of[r][0])))
    return Topology(tp_group, len(tp_ranks), tp_ranks.index(me), work_group, len(my_work), my_work.index(me),
                    positions)
