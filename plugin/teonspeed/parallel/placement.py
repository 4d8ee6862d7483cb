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
loudly). The prediction adds compute, transfer and latency, with the share of the owners' compute and
transfer that the runner's waves overlap (`hidden_fraction`) taken off.
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


def layout_of(
    positions: Sequence[Tuple[int, int]], global_ranks: Sequence[int], gpus_per_node: int
) -> Layout:
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


def predicted_step(
    groups: Sequence[GroupCost], owned: Sequence[bool], layout: Layout, profile: ClusterProfile, waves: int
) -> float:
    """Seconds of one step's orthogonalization on the busiest rank when the groups with owned[i] go to
    owners (LPT over the work group, as the runner assigns them) and the rest are replicated."""
    owner_flops = [g.flops for g, o in zip(groups, owned) if o]
    loads = [0.0] * layout.work_size
    for c, q in zip(owner_flops, assign_owners(owner_flops, layout.work_size)):
        loads[q] += c
    return _StepTerms(layout, profile, waves).seconds(_Sums.of(groups, owned), max(loads, default=0.0))


def hidden_fraction(waves: int) -> float:
    """Share of the shorter of (owners' compute, exchange) hidden behind the longer when the runner splits
    the owner-compute groups in `waves`: wave k is transformed while wave k+1's shards travel in and
    wave k−1's updates travel out, but the first gather and the last scatter are never hidden."""
    return (waves - 1) / waves


@dataclass
class _Sums:
    """What the step's prediction needs of a plan besides the busiest owner's load: running sums."""

    replicated_flops: float = 0.0
    replicated_gathered: int = 0
    replicated_count: int = 0
    owner_count: int = 0
    owner_flops: float = 0.0
    owner_largest: float = 0.0
    owner_gathered: int = 0
    owner_shard: int = 0

    @staticmethod
    def of(groups: Sequence[GroupCost], owned: Sequence[bool]) -> "_Sums":
        sums = _Sums()
        for g, o in zip(groups, owned):
            sums.add(g, o)
        return sums

    def add(self, g: GroupCost, owned: bool, sign: int = 1) -> None:
        if owned:
            self.owner_count += sign
            self.owner_flops += sign * g.flops
            self.owner_gathered += sign * g.gathered_bytes
            self.owner_shard += sign * g.shard_bytes
            if sign > 0:
                self.owner_largest = max(self.owner_largest, g.flops)
        else:
            self.replicated_count += sign
            self.replicated_flops += sign * g.flops
            self.replicated_gathered += sign * g.gathered_bytes


@dataclass(frozen=True)
class _StepTerms:
    layout: Layout
    profile: ClusterProfile
    waves: int

    def seconds(self, sums: _Sums, busiest_owner_flops: float) -> float:
        """Replicated compute + TP all-gather; the busiest owner's compute; the owners' exchanges."""
        layout, profile = self.layout, self.profile
        t, d = layout.tp_size, layout.dp_size
        tp_bw, column_bw = profile.bandwidth(layout.tp_nodes), profile.bandwidth(layout.column_nodes)
        tp_latency = profile.collective_latency(t, layout.tp_nodes)
        seconds = 0.0
        if sums.replicated_count:
            seconds += profile.ns_seconds(sums.replicated_flops)
            if t > 1:  # one all-gather over TP
                seconds += (t - 1) * sums.replicated_gathered / tp_bw + tp_latency
        if sums.owner_count:
            compute = profile.ns_seconds(busiest_owner_flops)
            n_waves = min(max(1, self.waves), sums.owner_count)
            transfer = latency = 0.0
            if t > 1:  # two all_to_alls over TP per wave
                transfer += (t - 1) / t * (sums.owner_gathered + sums.owner_shard) / tp_bw
                latency += 2 * n_waves * tp_latency
            if d > 1:  # a broadcast per owning replica per wave over each column
                transfer += (d - 1) / d * sums.owner_shard / column_bw
                broadcasts = n_waves * min(d, math.ceil(sums.owner_count / n_waves))
                latency += broadcasts * profile.collective_latency(d, layout.column_nodes)
            hidden = hidden_fraction(n_waves) * min(compute, transfer)
            seconds += compute + transfer - hidden + latency
        return seconds

    def lower_bound(self, sums: _Sums) -> float:
        """No LPT assignment loads its busiest rank below the largest group or the mean."""
        return self.seconds(sums, max(sums.owner_largest, sums.owner_flops / self.layout.work_size))


def choose_owner_compute(
    groups: Sequence[GroupCost], layout: Layout, profile: ClusterProfile, waves: int
) -> List[bool]:
    """Per group: True where an owner computes it, False where every rank does (see the module's rule).
    Of the plans "the first k in saving order at owners", the one of least predicted step (the least k on
    a tie). Only the busiest owner's load needs an LPT pass; every other term is a running sum, so a plan is
    evaluated exactly only where its lower bound (that load ≥ largest group, ≥ mean) could still win."""
    if not groups or layout.work_size == 1:
        return [False] * len(groups)  # one rank: nothing to share, no collective needed
    saving = [replicated_seconds(g, layout, profile) - owner_seconds(g, layout, profile) for g in groups]
    order = sorted(range(len(groups)), key=lambda i: (-saving[i] / max(1, groups[i].shard_bytes), i))
    terms = _StepTerms(layout, profile, waves)
    sums = _Sums.of(groups, [False] * len(groups))
    bounds = [terms.lower_bound(sums)]
    for i in order:
        sums.add(groups[i], False, -1)
        sums.add(groups[i], True)
        bounds.append(terms.lower_bound(sums))
    owned = [False] * len(groups)
    best, best_k = math.inf, 0
    for k in sorted(range(len(groups) + 1), key=lambda k: (bounds[k], k)):
        if bounds[k] > best * (1 + 1e-9):  # the running sums may round differently from predicted_step's
            break
        owned_k = list(owned)
        for i in order[:k]:
            owned_k[i] = True
        seconds = predicted_step(groups, owned_k, layout, profile, waves)
        if seconds < best or (seconds == best and k < best_k):
            best, best_k = seconds, k
    chosen = set(order[:best_k])
    return [i in chosen for i in range(len(groups))]
