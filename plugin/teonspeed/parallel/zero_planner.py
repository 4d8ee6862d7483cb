"""Planning sharded pieces (zero_partition.py holds what a plan is; `plan_pieces` for any layout's holds,
`plan_zero_buckets` / `plan_zero_partition` deriving them from flat offsets): the jobs of a layout (one
partition, several buckets planned together, a ZeRO-3 sub-group, an FSDP2 model), each job's owner (the rank
that is free first and exchanges it fastest), and the balancing that moves jobs off the busiest rank while the
Newton–Schulz time it saves exceeds the transfer. Nothing here touches tensors, process groups or clocks:
every rank derives the same plan.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..grouping import MatrixRef, OrthoGroup
from .cost import ClusterProfile
from .topology import connected_components
from .sharded import flat_holds
from .zero_partition import Hold, Unit, WorkRank, ZeroJob, ZeroPlan, unit_key, units_of


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
    in plan_zero_partition. A job's members may lie in any buckets. The pieces are the partitions' ranges of
    each parameter (`sharded.flat_holds`, keyed by bucket index), planned like any other layout's."""
    holds = flat_holds(places, shapes, partition_sizes, dp_size)
    return plan_pieces(
        groups,
        holds,
        shapes,
        dp_size,
        tp_size,
        work_rank,
        cost,
        tp_sharded,
        cluster,
        itemsize,
        partition_sizes=tuple(partition_sizes),
        places=places,
    )


def plan_pieces(
    groups: Sequence[OrthoGroup],
    holds: Dict[str, Sequence[Hold]],
    shapes: Dict[str, Tuple[int, ...]],
    dp_size: int,
    tp_size: int,
    work_rank: Dict[Tuple[int, int], WorkRank],
    cost: Callable[[OrthoGroup], float],
    tp_sharded: Callable[[MatrixRef], bool],
    cluster: ClusterProfile = ClusterProfile(),
    itemsize: int = 4,
    partition_sizes: Tuple[int, ...] = (),
    places: Optional[Dict[str, Tuple[int, int]]] = None,
    relay: Optional[bool] = None,
) -> ZeroPlan:
    """Jobs and owners for any layout of sharded pieces: `holds` gives, per parameter, which
    data-parallel index holds which range of its flattened local (TP-shard) elements, and where
    (`zero_partition.Hold`); shapes: the local shapes. One job per set of groups reading the same unit;
    owners by Newton–Schulz FLOPs, then balancing (see the module docstrings). Flat layouts also pass
    their partition sizes and each parameter's (bucket, offset). Pieces with replicas (HSDP): `relay`
    (`ZeroPlan.relay`) or not, by default whichever plan's busiest rank is predicted to finish first
    (`plan_seconds`; without relay on a tie)."""
    units = units_of(groups, holds, shapes, places)
    for u in units.values():
        check_tiles(u)
    order = {k: i for i, k in enumerate(units)}
    # One job per set of groups that read the same unit (a fused weight's parts, shared experts slices).
    first_reader: Dict[Tuple[str, Optional[int]], int] = {}
    links = [{first_reader.setdefault(unit_key(m), i) for m in g.members} for i, g in enumerate(groups)]
    plan = ZeroPlan([], tuple(partition_sizes), dp_size, tp_size, dict(work_rank))
    for component in connected_components(links):
        job_groups = tuple(groups[i] for i in component)
        keys = sorted(dict.fromkeys(unit_key(m) for g in job_groups for m in g.members), key=order.get)
        job_units = tuple(units[k] for k in keys)
        parts = sorted({h.holder for u in job_units for h in u.holds if h.hi > h.lo})
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
    replicated = any(len(u.holds) > len({(h.lo, h.hi) for h in u.holds}) for u in units.values())
    if not replicated or relay is not None:
        plan.relay = bool(relay) and replicated
        _assign_owners(plan, cluster, itemsize)
        _balance(plan, cluster, itemsize)
        return plan
    flat = _place(plan, cluster, itemsize, False)
    relayed = _place(plan, cluster, itemsize, True)
    return (
        relayed if plan_seconds(relayed, cluster, itemsize) < plan_seconds(flat, cluster, itemsize) else flat
    )


def _place(plan: ZeroPlan, cluster: ClusterProfile, itemsize: int, relay: bool) -> ZeroPlan:
    """A copy of `plan` (its jobs unplaced) with owners assigned and balanced."""
    placed = ZeroPlan(
        [replace(job, owner=-1) for job in plan.jobs],
        plan.partition_sizes,
        plan.dp_size,
        plan.tp_size,
        dict(plan.work_rank),
        relay=relay,
    )
    _assign_owners(placed, cluster, itemsize)
    _balance(placed, cluster, itemsize)
    return placed


def plan_seconds(plan: ZeroPlan, cluster: ClusterProfile, itemsize: int) -> float:
    """Predicted seconds of the busiest rank's step: its Newton-Schulz FLOPs, and per exchange round the
    larger of what it sends and receives (NVLink within its node, InfiniBand beyond) plus one latency."""
    rounds: List[List[Tuple[WorkRank, WorkRank, int]]] = [[], []]
    for job in plan.jobs:
        rounds[0] += [(r, job.owner, plan.source_numel(job, d)) for _, d, r in plan.sources(job)]
        rounds[1] += [(job.owner, r, plan.piece_numel(job, d)) for _, d, r in plan.targets(job)]
    rounds += [[(a, b, h.numel) for a, b, h, _ in moves] for moves in plan.relay_rounds()]
    seconds = [cluster.ns_seconds(load) for load in plan.loads]
    for moves in rounds:
        out, into = [0.0] * plan.work_size, [0.0] * plan.work_size
        for a, b, numel in moves:
            if a != b:
                link = cluster.bandwidth(1 if a // cluster.gpus_per_node == b // cluster.gpus_per_node else 2)
                out[a] += numel * itemsize / link
                into[b] += numel * itemsize / link
        for r in range(plan.work_size):
            if out[r] or into[r]:
                seconds[r] += max(out[r], into[r]) + cluster.latency(plan.work_size)
    return max(seconds)


def check_tiles(u: Unit) -> None:
    """The distinct ranges held of a unit must tile its elements (replicas may repeat a range)."""
    ranges = sorted({(h.lo, h.hi) for h in u.holds if h.hi > h.lo})
    at = 0
    for lo, hi in ranges:
        if lo != at:
            break
        at = hi
    if at != u.numel or len({lo for lo, _ in ranges}) != len(ranges):
        label = u.name if u.expert_index is None else f"{u.name}[expert {u.expert_index}]"
        raise ValueError(
            f"teonspeed: the pieces of {label!r} held by the data-parallel ranks ({ranges}) do not tile its "
            f"{u.numel} local elements; the sharded layout given to the optimizer is wrong"
        )


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
    moves = [(r, plan.source_numel(job, d, owner)) for _, d, r in plan.sources(job, owner)]
    moves += [(r, plan.piece_numel(job, d)) for _, d, r in plan.targets(job, owner)]
    for r, numel in moves:
        if r != owner:
            seconds += numel * itemsize / cluster.bandwidth(1 if r // cluster.gpus_per_node == node else 2)
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
