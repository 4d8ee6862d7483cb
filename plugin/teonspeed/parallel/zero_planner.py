"""Planning ZeRO-1/2 flat partitions (zero_partition.py holds what a plan is): the jobs of one partition or of
several buckets planned together, each job's owner (the rank that is free first and exchanges it fastest),
and the balancing that moves jobs off the busiest rank while the Newton–Schulz time it saves exceeds the
transfer. Nothing here touches tensors, process groups or clocks: every rank derives the same plan.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..grouping import MatrixRef, OrthoGroup
from .cost import ClusterProfile
from .topology import connected_components
from .zero_partition import WorkRank, ZeroJob, ZeroPlan, unit_key, units_of


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
