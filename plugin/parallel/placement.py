"""parallel_mode="auto": which groups an owner computes and which every rank computes, chosen from the
groups' Newton–Schulz FLOPs, their bytes, the layout and the cluster's constants (ClusterProfile).

Under plain data parallelism (ZeRO-0, Megatron DDP) owner-compute spares the busiest rank (1 − 1/W) of a
group's FLOPs, but then every rank must receive its shard of the update from the owner's replica (phase B
(2) over its column), bytes that replicated compute never moves, plus one latency per collective. FLOPs
grow as m²n and bytes as mn: large matrices are cheaper at an owner, small ones (GQA's k/v, thin experts)
at every rank; and once the column leaves the node, there are more replicas than groups (the busiest
rank's work stops shrinking) or per-peer latencies add up, replicating everything wins.

The rule: order the groups by predicted saving per byte, and of the plans "owner-compute for the first k"
(k = 0 is all replicated, k = n all owner-compute) take the one with the smallest predicted step. Pure
functions of shapes and constants, no timing measured at run time, so every rank of a work group makes the
same choice (the ranks' plan digests include the mode and the constants: a rank configured otherwise fails
loudly). The prediction adds compute, transfer and latency without overlap: an upper bound for
owner-compute, whose waves overlap some of it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

from .cost import ClusterProfile
from .owners import assign_owners


@dataclass(frozen=True)
class GroupCost:
    flops: float
    """Newton–Schulz FLOPs of the whole (TP-gathered) stack: owners.ns_flops."""
    shard_bytes: int
    """This rank's shard of the group's members in the exchange dtype: what phase B brings every rank."""
    gathered_bytes: int
    """The part of shard_bytes whose members are TP-split (the only part a TP gather moves)."""


@dataclass(frozen=True)
class Layout:
    tp_size: int
    dp_size: int
    tp_nodes: int = 1
    """Nodes one data-parallel replica (a TP group) spans."""
    column_nodes: int = 1
    """Nodes one column (a TP position over every replica, phase B's broadcast group) spans."""

    @property
    def work_size(self) -> int:
        return self.tp_size * self.dp_size


def layout_of(positions: Sequence[Tuple[int, int]], global_ranks: Sequence[int], gpus_per_node: int) -> Layout:
    """The layout of a work group: positions[q] = (tp rank, replica) of work rank q, global_ranks[q] its rank
    in the job (node = rank // gpus_per_node); the widest TP group and column count."""
    tp = 1 + max(t for t, _ in positions)
    dp = 1 + max(d for _, d in positions)

    def nodes(qs) -> int:
        return len({global_ranks[q] // gpus_per_node for q in qs})

    tp_nodes = max(nodes([q for q, (_, d) in enumerate(positions) if d == r]) for r in range(dp))
    column_nodes = max(nodes([q for q, (t, _) in enumerate(positions) if t == s]) for s in range(tp))
    return Layout(tp, dp, tp_nodes, column_nodes)


def replicated_seconds(g: GroupCost, layout: Layout, profile: ClusterProfile) -> float:
    """One group computed by every rank: all its FLOPs, and a TP all-gather of (T−1) shards."""
    t = layout.tp_size
    return profile.ns_seconds(g.flops) + (t - 1) * g.gathered_bytes / profile.bandwidth(layout.tp_nodes)


def owner_seconds(g: GroupCost, layout: Layout, profile: ClusterProfile) -> float:
    """One group computed by its owner, per rank on average: 1/W of the FLOPs; over TP the shards in
    (phase A) and the update's shards out (phase B (1)), (T−1)/T of a shard each on average; over the
    column, the update's shard from the owning replica to the D−1 others."""
    t, d = layout.tp_size, layout.dp_size
    seconds = profile.ns_seconds(g.flops) / layout.work_size
    seconds += (t - 1) / t * (g.gathered_bytes + g.shard_bytes) / profile.bandwidth(layout.tp_nodes)
    seconds += (d - 1) / d * g.shard_bytes / profile.bandwidth(layout.column_nodes)
    return seconds


def predicted_step(groups: Sequence[GroupCost], owned: Sequence[bool], layout: Layout, profile: ClusterProfile,
                   waves: int) -> float:
    """Seconds of one step's orthogonalization on the busiest rank when the groups with owned[i] go to
    owners (LPT over the work group, as the runner assigns them) and the rest are replicated."""
    t, d, w = layout.tp_size, layout.dp_size, layout.work_size
    tp_bw, column_bw = profile.bandwidth(layout.tp_nodes), profile.bandwidth(layout.column_nodes)
    tp_latency = profile.collective_latency(t, layout.tp_nodes)
    replicated = [g for g, o in zip(groups, owned) if not o]
    owner = [g for g, o in zip(groups, owned) if o]
    seconds = 0.0
    if replicated:
        seconds += profile.ns_seconds(sum(g.flops for g in replicated))
        if t > 1:  # one all-gather over TP
            seconds += (t - 1) * sum(g.gathered_bytes for g in replicated) / tp_bw + tp_latency
    if owner:
        costs = [g.flops for g in owner]
        loads = [0.0] * w
        for c, q in zip(costs, assign_owners(costs, w)):
            loads[q] += c
        seconds += profile.ns_seconds(max(loads))
        n_waves = min(max(1, waves), len(owner))
        if t > 1:  # two all_to_alls over TP per wave
            seconds += (t - 1) / t * sum(g.gathered_bytes + g.shard_bytes for g in owner) / tp_bw
            seconds += 2 * n_waves * tp_latency
        if d > 1:  # a broadcast per owning replica per wave over each column
            seconds += (d - 1) / d * sum(g.shard_bytes for g in owner) / column_bw
            broadcasts = n_waves * min(d, math.ceil(len(owner) / n_waves))
            seconds += broadcasts * profile.collective_latency(d, layout.column_nodes)
    return seconds


def choose_owner_compute(groups: Sequence[GroupCost], layout: Layout, profile: ClusterProfile,
                         waves: int) -> List[bool]:
    """Per group: True where an owner computes it, False where every rank does (see the module's rule)."""
    if not groups or layout.work_size == 1:
        return [False] * len(groups)  # one rank: nothing to share, no collective needed
    saving = [replicated_seconds(g, layout, profile) - owner_seconds(g, layout, profile) for g in groups]
    order = sorted(range(len(groups)), key=lambda i: (-saving[i] / max(1, groups[i].shard_bytes), i))
    best, best_k = math.inf, 0
    owned = [False] * len(groups)
    for k in range(len(groups) + 1):
        if k:
            owned[order[k - 1]] = True
        seconds = predicted_step(groups, owned, layout, profile, waves)
        if seconds < best:
            best, best_k = seconds, k
    chosen = set(order[:best_k])
    return [i in chosen for i in range(len(groups))]
