"""Analytical cost model of the TEON/Muon optimizer step at cluster scale: owner-compute ("distributed")
vs every-rank-computes ("replicated"), against the forward/backward time of a training step.

    .venv/bin/python bench/costmodel.py                 # writes bench/results/costmodel.{json,md,png}
    .venv/bin/python bench/costmodel.py --optimizer muon --ns-efficiency 0.3

Nothing here is measured on a GPU. Every constant is a field of `Assumptions` (printed into the outputs); the
hardware ones are its `cluster`, the package's own ClusterProfile (--nvlink-bw, --ib-bw, ... override them).
The structure of the model follows the implementation (plugin/teonspeed/parallel/distributed.py) exactly:

  groups     the optimizer's groups of one pipeline stage, from the model's matrix shapes: TEON stacks
             q/k/v of `teon_k` consecutive layers, every other matrix (o, gate, up, down, each expert's)
             is its own Muon group; embeddings / lm_head / norms go to AdamW (not modelled: same in both
             modes). FLOPs per group = teonspeed.parallel.owners.ns_flops (steps·(4m²n + 2m³)).
  owners     teonspeed.parallel.owners.assign_owners (the same LPT) over the work group W = TP × DP
             (experts: expert-TP × expert-DP), so the busiest rank's FLOPs include the real imbalance:
             when W exceeds the number of groups, the busiest rank holds the largest group and the
             compute stops shrinking with W.
  bytes      per rank, the same sums as DistributedRunner.expected_bytes (phase A: the rank's shards
             of groups owned by a TP peer of its replica; phase B: (1) the owner's T-1 TP peers' shards of
             its updates, (2) its replica's chunk once into its column's broadcast; received: its shard of
             every update it does not own); replicated: an all-gather over TP of (T-1) shards each way.
             `per_rank_bytes` is checked against expected_bytes in tests/unit/test_costmodel.py.
  time       compute = FLOPs / (peak · ns_efficiency); comm = phase A and B (1) over TP (NVLink inside a
             node), B (2) over the column's ring (InfiniBand once the column spans nodes); latency per
             collective (+ per hop of a ring); distributed hides placement.hidden_fraction(waves) of the
             shorter of compute and comm (1/2 for 2 waves), as the rule does; a memory-bound element-wise part
             (momentum, update) is added to every mode.
  auto       parallel_mode="auto": the package's own rule (teonspeed.parallel.placement) picks owner-compute
             or replicated per group from the constants of ClusterProfile; the chosen plan is then timed
             as above (replicated groups, then the owner-compute waves).
  deepspeed  DeepSpeed 0.19.8's own Muon under ZeRO-1/2 (see deepspeed_time), for comparison; at ZeRO
             stage 0 (deepspeed_zero0_time) every rank runs it on each local weight: replicated, TP-local.
  zero       teonspeed's own ZeRO-1/2 step (plugin/teonspeed/parallel/flat.py): the hidden matrices of one
             stage in the model's parameter order (HF names: q, k, v, o, gate, up, down per layer; TP-local
             shapes) form one flat param group cut into DP equal partitions (DeepSpeed's alignment padding
             ignored); teonspeed.parallel.zero_planner.plan_zero_partition, the implementation's own
             planner, decides local/cut jobs and owners; bytes are its point-to-point rounds, FLOPs its loads
             (see zero_partition_time; tests/unit/test_costmodel.py checks the bytes against
             FlatStep.expected_bytes). MoE: one EP rank's expert matrices form their own param group, cut into
             expert-DP partitions and planned on the expert topology (expert TP 1 × expert-DP), as the
             implementation does.
  training   forward+backward = 6 · active params · global batch tokens / (GPUs · peak · train_mfu);
             overhead % = optimizer step / forward+backward.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import teonspeed
from teonspeed.config import default  # the optimizer's own defaults
from teonspeed.parallel.owner_compute import split_waves  # the implementation's own rules
from teonspeed.parallel.cost import ClusterProfile
from teonspeed.parallel.owners import assign_owners, ns_flops
from teonspeed.parallel.placement import GroupCost, choose_owner_compute, hidden_fraction, layout_of
from teonspeed.parallel.zero_partition import ZeroPlan
from teonspeed.parallel.zero_planner import plan_zero_buckets

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"


@dataclass
class Assumptions:
    """Every constant of the model. The hardware ones are the package's own ClusterProfile (H100 SXM
    datasheet values, not measurements; the same constants parallel_mode="auto" decides with), read
    through this object (a.nvlink_bw is a.cluster.nvlink_bw); the fields here are the model's own."""

    cluster: ClusterProfile = field(default_factory=ClusterProfile)
    train_mfu: float = 0.40
    """Model-FLOPs utilisation of forward+backward (typical for Megatron LLaMA training)."""
    global_batch_tokens: int = 4 * 1024 * 1024
    """Tokens per optimizer step, fixed as the GPU count grows (strong scaling: the worst case for the
    optimizer's share)."""
    comm_itemsize: int = 4
    """Bytes per element exchanged: the momentum dtype (fp32, as implemented)."""
    hbm_bw: float = 3.35e12
    """HBM bytes/s for the element-wise part (H100 SXM; no placement decision depends on it)."""
    elementwise_bytes_per_param: int = 40
    """Bytes touched per local matrix element by momentum + weight update (fp32 grad, momentum, master)."""
    ns_steps: int = default("ns_steps")
    teon_k: int = default("teon_k", "teon")
    overlap_waves: int = default("overlap_waves")

    def __getattr__(self, name: str):
        if name.startswith("_") or name == "cluster":
            raise AttributeError(name)
        return getattr(self.cluster, name)

    def as_dict(self) -> Dict[str, float]:
        """Every constant, the cluster's first (for the outputs)."""
        out = dataclasses.asdict(self.cluster)
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "cluster"})
        return out


@dataclass
class ModelSpec:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int  # dense MLP width (0: every layer is MoE)
    vocab: int
    tp: int = 1
    pp: int = 1
    experts: int = 0
    expert_ffn: int = 0
    topk: int = 0
    ep: int = 1

    def matrices_per_layer(self) -> Dict[str, Tuple[int, int]]:
        """Full (out, in) shapes of one layer's dense matrices (fused qkv / gate-up split in parts)."""
        h, d = self.hidden, self.head_dim
        out = {
            "q": (self.heads * d, h),
            "k": (self.kv_heads * d, h),
            "v": (self.kv_heads * d, h),
            "o": (h, self.heads * d),
        }
        if self.ffn:
            out.update(gate=(self.ffn, h), up=(self.ffn, h), down=(h, self.ffn))
        return out

    def expert_matrices(self) -> Dict[str, Tuple[int, int]]:
        h, f = self.hidden, self.expert_ffn
        return {"gate": (f, h), "up": (f, h), "down": (h, f)} if self.experts else {}

    def params(self) -> Tuple[float, float]:
        """(total, active per token) parameters, embeddings and untied lm_head included."""
        dense = sum(a * b for a, b in self.matrices_per_layer().values()) * self.layers
        expert = sum(a * b for a, b in self.expert_matrices().values()) * self.layers
        emb = 2 * self.vocab * self.hidden
        router = self.layers * self.experts * self.hidden
        total = dense + expert * self.experts + emb + router
        active = dense + expert * self.topk + emb + router
        return float(total), float(active)

    def min_gpus(self) -> int:
        return self.tp * self.pp * (self.ep if self.experts else 1)


MODELS: Dict[str, ModelSpec] = {
    "llama-1b": ModelSpec(
        "LLaMA-1B (3.2-1B shapes, untied lm_head)", 2048, 16, 32, 8, 64, 8192, 128256, tp=1, pp=1
    ),
    "llama-7b": ModelSpec("LLaMA-7B (2-7B shapes)", 4096, 32, 32, 32, 128, 11008, 32000, tp=2, pp=1),
    "llama-70b": ModelSpec("LLaMA-70B (3-70B shapes)", 8192, 80, 64, 8, 128, 28672, 128256, tp=8, pp=4),
    "moe-64e": ModelSpec(
        "MoE 64 experts top-8 (OLMoE-like)",
        2048,
        16,
        16,
        16,
        128,
        0,
        50304,
        tp=1,
        pp=1,
        experts=64,
        expert_ffn=1024,
        topk=8,
        ep=8,
    ),
}
GPUS = [8, 16, 32, 64, 128, 256, 512, 1024]
MODES = ("distributed", "replicated", "auto", "deepspeed0", "deepspeed", "zero")
"""distributed: teonspeed owner-compute under ZeRO-0 / Megatron DDP; replicated: every rank computes
everything; auto: teonspeed's per-group choice between the two (its own rule); deepspeed0: DeepSpeed's own
Muon at ZeRO stage 0; deepspeed: DeepSpeed's own Muon under ZeRO-1/2; zero: teonspeed's partition-local
ZeRO-1/2 step."""


@dataclass
class Group:
    """One orthogonalization group: its stacked shape and the full element count of its members."""

    stacked: Tuple[int, int]
    elements: int
    sharded: bool  # members split over the topology's TP


def stage_groups(model: ModelSpec, optimizer: str, a: Assumptions, expert: bool = False) -> List[Group]:
    """The groups of one pipeline stage (expert=True: of one expert-parallel rank's experts)."""
    layers = model.layers // model.pp
    k = a.teon_k if optimizer == "teon" else 1
    out: List[Group] = []
    if expert:
        for _ in range(layers * (model.experts // model.ep)):
            for shape in model.expert_matrices().values():
                out.append(Group(shape, shape[0] * shape[1], False))  # expert TP = 1
        return out
    mats = model.matrices_per_layer()
    sharded = model.tp > 1
    for name, (m, n) in mats.items():
        if k > 1 and name in ("q", "k", "v"):
            full, rest = divmod(layers, k)
            out += [Group((m, n * k), m * n * k, sharded) for _ in range(full)]
            if rest:
                out.append(Group((m, n * rest), m * n * rest, sharded))
        else:
            out += [Group((m, n), m * n, sharded) for _ in range(layers)]
    return out


@dataclass
class RankCost:
    flops: List[float]
    sent_a: List[float]
    recv_a: List[float]
    sent_b: List[float]
    recv_b: List[float]
    b_tp: List[float] = field(default_factory=list)
    """phase B (1): bytes over TP links (the larger direction)"""
    b_column: List[float] = field(default_factory=list)
    """phase B (2): bytes over the column's ring (what the broadcasts carry through this rank)"""

    @property
    def sent(self) -> List[float]:
        return [x + y for x, y in zip(self.sent_a, self.sent_b)]

    @property
    def received(self) -> List[float]:
        return [x + y for x, y in zip(self.recv_a, self.recv_b)]


def auto_choice(groups: Sequence[Group], tp: int, dp: int, stride: int, a: Assumptions) -> List[bool]:
    """parallel_mode="auto": the package's own rule (teonspeed.parallel.placement) on this work group,
    work rank q = tp_rank + T·replica at global rank tp_rank + stride·replica. True: owner-compute."""
    itemsize = a.comm_itemsize
    costs = [
        GroupCost(
            ns_flops(g.stacked, a.ns_steps),
            _shard_elements(g, tp) * itemsize,
            _shard_elements(g, tp) * itemsize if (g.sharded and tp > 1) else 0,
        )
        for g in groups
    ]
    positions = [(q % tp, q // tp) for q in range(tp * dp)]
    layout = layout_of(positions, [t + stride * d for t, d in positions], a.gpus_per_node)
    return choose_owner_compute(costs, layout, a.cluster, a.overlap_waves)


def _shard_elements(g: Group, tp: int) -> int:
    return g.elements // tp if (g.sharded and tp > 1) else g.elements


def per_rank_bytes(
    groups: Sequence[Group],
    tp: int,
    dp: int,
    ns_steps: int,
    itemsize: int = 4,
    mode: str = "distributed",
    owned: Optional[Sequence[bool]] = None,
) -> RankCost:
    """FLOPs and bytes (phase A / phase B) of every work rank q = tp_rank + T·replica, as
    DistributedRunner.expected_bytes counts them (a broadcast: once at its source, once per receiver).
    mode "auto": the groups with owned[i] as "distributed", the others as "replicated", summed."""
    if mode == "auto":
        parts = [
            per_rank_bytes(
                [g for g, o in zip(groups, owned) if o == side],
                tp,
                dp,
                ns_steps,
                itemsize,
                "distributed" if side else "replicated",
            )
            for side in (False, True)
        ]
        return RankCost(
            *(
                [x + y for x, y in zip(*(getattr(p, f.name) or [0.0] * (tp * dp) for p in parts))]
                for f in dataclasses.fields(RankCost)
            )
        )
    w = tp * dp
    costs = [ns_flops(g.stacked, ns_steps) for g in groups]
    shard = [_shard_elements(g, tp) * itemsize for g in groups]
    if mode == "replicated":
        gathered = sum(s for s, g in zip(shard, groups) if g.sharded and tp > 1) * (tp - 1)
        return RankCost([sum(costs)] * w, [0.0] * w, [0.0] * w, [float(gathered)] * w, [float(gathered)] * w)
    owners = assign_owners(costs, w)
    flops = [0.0] * w
    owned = [0.0] * w
    owned_sharded = [0.0] * w
    for c, s, g, o in zip(costs, shard, groups, owners):
        flops[o] += c
        owned[o] += s
        if g.sharded and tp > 1:
            owned_sharded[o] += s
    replica_sharded = [0.0] * dp
    replica_owned = [0.0] * dp
    for q in range(w):
        replica_sharded[q // tp] += owned_sharded[q]
        replica_owned[q // tp] += owned[q]
    total = float(sum(shard))
    sent_a = [replica_sharded[q // tp] - owned_sharded[q] for q in range(w)]
    recv_a = [(tp - 1) * owned_sharded[q] for q in range(w)]
    # phase B: (1) the owner's TP peers' shards; (2) my replica's chunk, broadcast once over my column
    sent_b = [(tp - 1) * owned[q] + (replica_owned[q // tp] if dp > 1 else 0.0) for q in range(w)]
    recv_b = [total - owned[q] for q in range(w)]
    b_tp = [max((tp - 1) * owned[q], replica_owned[q // tp] - owned[q]) for q in range(w)]
    b_column = [
        max(total - replica_owned[q // tp], replica_owned[q // tp]) if dp > 1 else 0.0 for q in range(w)
    ]
    return RankCost(flops, sent_a, recv_a, sent_b, recv_b, b_tp, b_column)


def broadcasts_per_step(groups: Sequence[Group], tp: int, dp: int, ns_steps: int, waves: int) -> int:
    """Phase B (2) collectives per step: one per (wave, replica owning something in it)."""
    if dp == 1:
        return 0
    costs = [ns_flops(g.stacked, ns_steps) for g in groups]
    owners = assign_owners(costs, tp * dp)
    return sum(len({owners[i] // tp for i in wave}) for wave in split_waves(groups, costs, waves))


def topology_time(
    groups: Sequence[Group], tp: int, dp: int, stride: int, mode: str, a: Assumptions
) -> Dict[str, float]:
    """Optimizer-step time of one topology (seconds), for the busiest rank. `stride`: distance in
    global ranks between consecutive TP groups of the work group (dense: tp; experts: ep·etp)."""
    if not groups:
        return dict(compute=0.0, comm=0.0, latency=0.0, total=0.0, flops=0.0, bytes=0.0, imbalance=1.0)
    if mode == "auto":  # the replicated groups first, then the owner-compute waves (as the runner runs them)
        owned = auto_choice(groups, tp, dp, stride, a)
        parts = [
            topology_time(
                [g for g, o in zip(groups, owned) if o == side],
                tp,
                dp,
                stride,
                "distributed" if side else "replicated",
                a,
            )
            for side in (False, True)
        ]
        out = {
            k: parts[0][k] + parts[1][k] for k in ("compute", "comm", "latency", "total", "flops", "bytes")
        }
        flops = per_rank_bytes(groups, tp, dp, a.ns_steps, a.comm_itemsize, "auto", owned).flops
        return dict(
            out, imbalance=max(flops) * len(flops) / sum(flops), owned_groups=sum(owned), groups=len(groups)
        )
    w = tp * dp
    rc = per_rank_bytes(groups, tp, dp, a.ns_steps, a.comm_itemsize, mode)
    rate = a.peak_flops * a.ns_efficiency
    tp_intra = tp <= a.gpus_per_node
    tp_bw = a.nvlink_bw if tp_intra else a.ib_bw
    tp_lat = (a.latency_intra if tp_intra else a.latency_inter) + a.latency_per_peer * (tp - 1)
    # A column (one TP position, every replica) is a ring over global ranks t + stride·d: it crosses
    # nodes, and then runs at the InfiniBand rate, once it spans more than one node.
    column_intra = stride * (dp - 1) < a.gpus_per_node
    column_bw = a.nvlink_bw if column_intra else a.ib_bw
    column_lat = (a.latency_intra if column_intra else a.latency_inter) + a.latency_per_peer * (dp - 1)
    n_bcast = broadcasts_per_step(groups, tp, dp, a.ns_steps, a.overlap_waves) if mode == "distributed" else 0
    n_waves = min(a.overlap_waves, len(groups))
    worst = dict(total=-1.0)
    for q in range(w):
        compute = rc.flops[q] / rate
        if mode == "replicated":
            comm = rc.sent_b[q] / tp_bw if tp > 1 else 0.0
            latency = tp_lat if tp > 1 else 0.0
            total = compute + comm + latency
        else:
            comm_a = max(rc.sent_a[q], rc.recv_a[q]) / tp_bw
            # phase B (1): in the replica, over TP; (2): the other replicas' chunks over the column (a
            # pipelined ring forwards what it receives, so receive volume = link volume)
            comm = comm_a + rc.b_tp[q] / tp_bw + rc.b_column[q] / column_bw
            latency = (2 * n_waves * tp_lat if tp > 1 else 0.0) + n_bcast * column_lat
            total = compute + comm - hidden_fraction(n_waves) * min(compute, comm) + latency
        if total > worst["total"]:
            worst = dict(
                compute=compute,
                comm=comm,
                latency=latency,
                total=total,
                flops=rc.flops[q],
                bytes=max(rc.sent[q], rc.received[q]),
            )
    mean = sum(rc.flops) / w
    worst["imbalance"] = max(rc.flops) / mean if mean else 1.0
    return worst


def deepspeed_time(
    groups: Sequence[Group], tp: int, dp: int, stride: int, a: Assumptions
) -> Dict[str, float]:
    """DeepSpeed 0.19.8's own Muon strategy under ZeRO-1/2 (runtime/zero/stage_1_and_2.py,
    get_flat_partition): each data-parallel rank runs muon_update on every matrix that overlaps its
    equal-size partition of the flat (TP-local) buffer, on its full gradient; a matrix cut by a partition
    boundary is orthogonalized redundantly by every rank that holds a piece. Its full gradient reaches
    every holder through ZeRO's own gradient reduction: with the default use_multi_rank_bucket_allreduce
    every bucket is all-reduced (AdamW pays that all-reduce too) and the cut matrix is copied from it to
    each holder (`muon_copy_ranks`), so no byte and no collective is added to AdamW's (with the flag off,
    the cut matrices would join an all-reduce that every data-parallel rank pays). Under TP it
    orthogonalizes the local shard (a different update; its cheaper FLOPs are counted, no TP gather).
    Busiest rank. `groups`: the flat group's matrices in order (step_cost passes every hidden matrix on
    its own, in the model's parameter order: DeepSpeed's Muon does not stack)."""
    if not groups:
        return dict(compute=0.0, comm=0.0, latency=0.0, total=0.0, flops=0.0, bytes=0.0, imbalance=1.0)
    local = [_shard_elements(g, tp) for g in groups]
    flops = [
        ns_flops(((g.stacked[0] // tp) if (g.sharded and tp > 1) else g.stacked[0], g.stacked[1]), a.ns_steps)
        for g in groups
    ]
    size = -(-sum(local) // dp)
    rate = a.peak_flops * a.ns_efficiency
    per_rank_flops = [0.0] * dp
    start = 0
    for n, f in zip(local, flops):
        for r in range(start // size, (start + n - 1) // size + 1):
            per_rank_flops[r] += f
        start += n
    busiest = max(per_rank_flops)
    mean = sum(per_rank_flops) / dp
    return dict(
        compute=busiest / rate,
        comm=0.0,
        latency=0.0,
        total=busiest / rate,
        flops=busiest,
        bytes=0.0,
        imbalance=busiest / mean if mean else 1.0,
    )


def deepspeed_zero0_time(
    params: Sequence[Tuple[str, Tuple[int, int]]], tp: int, a: Assumptions
) -> Dict[str, float]:
    """DeepSpeed 0.19.8's own Muon at ZeRO stage 0 (runtime/zero/muon/muon_optimizer.py,
    MuonWithAuxAdam.step): no ZeRO optimizer partitions anything, so every rank runs muon_update on each
    weight it holds, whole, one matrix at a time: replicated compute on the TP-local shard, no exchange.
    Under TP that orthogonalizes each shard alone, a different (shard-wise) update than Muon's."""
    flops = sum(ns_flops(local_shape(name, shape, tp), a.ns_steps) for name, shape in params)
    compute = flops / (a.peak_flops * a.ns_efficiency)
    return dict(compute=compute, comm=0.0, latency=0.0, total=compute, flops=flops, bytes=0.0, imbalance=1.0)


# -- teonspeed's ZeRO-1/2 step: the implementation's planner on the model's real parameter list -------
COLUMN_PARALLEL = (
    "q_proj",
    "k_proj",
    "v_proj",
    "gate_proj",
    "up_proj",
)  # Megatron splits dim 0; o/down dim 1
HF_NAMES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


@dataclass
class ZeroLayout:
    """One ZeRO-1/2 param group of the hidden matrices of a pipeline stage, as DeepSpeed flattens it on
    every TP rank: parameters in model order at `offsets` with TP-local `shapes`, cut into `dp` partitions."""

    groups: list  # teonspeed's OrthoGroups, with full shapes as the optimizer builds them under TP
    offsets: Dict[str, int]
    shapes: Dict[str, Tuple[int, int]]
    partition_size: int
    # Megatron's DDP buckets planned together: each parameter's bucket (offsets then count from the bucket's
    # start) and each bucket's partition size; empty: one flat buffer of partition_size partitions
    bucket_of: Dict[str, int] = field(default_factory=dict)
    partition_sizes: Tuple[int, ...] = ()


def stage_parameters(model: ModelSpec) -> List[Tuple[str, Tuple[int, int]]]:
    """The hidden matrices of pipeline stage 0 in the model's parameter order (HF LLaMA names, full shapes).
    Embeddings, lm_head and norms go to AdamW's param group under DeepSpeed's Muon too: not modelled."""
    out = []
    for b in range(model.layers // model.pp):
        for kind, shape in model.matrices_per_layer().items():
            out.append((f"model.layers.{b}.{HF_NAMES[kind]}.weight", shape))
    return out


def expert_parameters(model: ModelSpec) -> List[Tuple[str, Tuple[int, int]]]:
    """One expert-parallel rank's expert matrices of pipeline stage 0, in the model's parameter order
    (DeepSpeed MoE's moe=True param group / Megatron's expert buffer: partitioned over expert-DP)."""
    out = []
    for b in range(model.layers // model.pp):
        for e in range(model.experts // model.ep):
            for kind, shape in model.expert_matrices().items():
                out.append((f"model.layers.{b}.mlp.experts.{e}.{kind}_proj.weight", shape))
    return out


def local_shape(name: str, shape: Tuple[int, int], tp: int) -> Tuple[int, int]:
    if tp == 1:
        return shape
    return (
        (shape[0] // tp, shape[1]) if any(c in name for c in COLUMN_PARALLEL) else (shape[0], shape[1] // tp)
    )


def zero_layout(
    model: ModelSpec, optimizer: str, a: Assumptions, dp: int, expert: bool = False
) -> ZeroLayout:
    """expert=True: the expert param group (expert TP = 1), cut into `dp` expert-DP partitions."""
    params = expert_parameters(model) if expert else stage_parameters(model)
    named = [(n, torch.nn.Parameter(torch.empty(s, device="meta"))) for n, s in params]
    # The expert group alone holds no q/k/v: TEON gives its matrices per-layer Muon (said explicitly).
    teon = {"teon_k": a.teon_k, "teon_per_layer_fallback": expert} if optimizer == "teon" else {}
    groups = teonspeed.plan(named, optimizer, **teon).groups
    offsets, shapes, offset = {}, {}, 0
    for n, s in params:
        offsets[n], shapes[n] = offset, local_shape(n, s, 1 if expert else model.tp)
        offset += shapes[n][0] * shapes[n][1]
    return ZeroLayout(groups, offsets, shapes, -(-offset // dp))


def zero_plan(
    layout: ZeroLayout,
    tp: int,
    dp: int,
    ns_steps: int,
    cluster: ClusterProfile = ClusterProfile(),
    itemsize: int = 4,
) -> ZeroPlan:
    """The implementation's plan (what plugin/teonspeed/parallel/flat.py plan_partition builds on every
    rank: NS FLOPs of the full, TP-gathered stacks as the cost, jobs balanced with `cluster`'s constants);
    work rank d·T + t: Megatron's order, TP adjacent."""
    work_rank = {(t, d): d * tp + t for t in range(tp) for d in range(dp)}
    places = {n: (layout.bucket_of.get(n, 0), offset) for n, offset in layout.offsets.items()}
    sizes = layout.partition_sizes or (layout.partition_size,)
    return plan_zero_buckets(
        layout.groups,
        places,
        layout.shapes,
        sizes,
        dp,
        tp,
        work_rank,
        cost=lambda g: ns_flops(g.stacked_shape, ns_steps),
        tp_sharded=lambda m: tp > 1,
        cluster=cluster,
        itemsize=itemsize,
    )


@dataclass
class ZeroBytes:
    """Per work rank and phase (a: pieces to the owners, b: update slices back), bytes sent / received
    over NVLink (same node) and InfiniBand (other nodes)."""

    sent: List[int]
    received: List[int]
    link: Dict[Tuple[str, str, str], List[int]]  # (phase, "sent"|"received", "intra"|"inter") -> per rank
    peers: Dict[str, List[set]] = field(
        default_factory=dict
    )  # phase -> per rank, the ranks it exchanges with


def zero_rank_bytes(plan: ZeroPlan, itemsize: int, gpus_per_node: int) -> ZeroBytes:
    """The two point-to-point rounds of FlatStep, pair by pair (the same pieces as
    ZeroPlan.bytes_per_rank)."""
    w = plan.work_size
    link = {(ph, d, l): [0] * w for ph in "ab" for d in ("sent", "received") for l in ("intra", "inter")}
    peers = {ph: [set() for _ in range(w)] for ph in "ab"}
    sent, received = [0] * w, [0] * w

    def move(phase, src, dst, n):
        where = "intra" if src // gpus_per_node == dst // gpus_per_node else "inter"
        link[(phase, "sent", where)][src] += n
        link[(phase, "received", where)][dst] += n
        sent[src] += n
        received[dst] += n
        if n:
            peers[phase][src].add(dst)
            peers[phase][dst].add(src)

    if plan.exchanged_jobs():
        for job in plan.jobs:
            for _, d, r in plan.sources(job):
                if r != job.owner:
                    move("a", r, job.owner, plan.piece_numel(job, d) * itemsize)
            for _, d, r in plan.targets(job):
                if r != job.owner:
                    move("b", job.owner, r, plan.piece_numel(job, d) * itemsize)
    return ZeroBytes(sent, received, link, peers)


def deepspeed_same_update_time(plan: ZeroPlan, a: Assumptions) -> Dict[str, float]:
    """DeepSpeed's placement with teonspeed's update, on the same layout and jobs: every rank holding
    partition d (its T TP ranks, each with its own shard) orthogonalizes every job overlapping d, whole
    (TEON stacks, fused parts) and TP-gathered, as teonspeed computes it; a cut job is computed by every
    holder. Its gradient comes with ZeRO's default all-reduce (no byte over AdamW's, as for DeepSpeed's
    own Muon); what it adds is the TP all-gather of each TP-sharded job ((T-1) local shards in, the
    rank's own out to T-1 peers), one batched all-gather per step. Busiest rank."""
    tp, dp = plan.tp_size, plan.dp_size
    rate = a.peak_flops * a.ns_efficiency
    flops, gathered = [0.0] * dp, [0.0] * dp
    for job in plan.jobs:
        for d in job.partitions:
            flops[d] += job.flops
            if job.tp_sharded:
                gathered[d] += (tp - 1) * sum(u.numel for u in job.units) * a.comm_itemsize
    tp_bw = a.nvlink_bw if tp <= a.gpus_per_node else a.ib_bw
    latency = (
        (a.latency_intra if tp <= a.gpus_per_node else a.latency_inter) + a.latency_per_peer * (tp - 1)
        if any(gathered)
        else 0.0
    )
    worst = dict(total=-1.0)
    for d in range(dp):
        compute, comm = flops[d] / rate, gathered[d] / tp_bw
        if compute + comm + latency > worst["total"]:
            worst = dict(
                compute=compute,
                comm=comm,
                latency=latency,
                total=compute + comm + latency,
                flops=flops[d],
                bytes=gathered[d],
            )
    return worst


def zero_partition_time(
    model: ModelSpec, optimizer: str, dp: int, a: Assumptions, expert: bool = False
) -> Dict[str, float]:
    """teonspeed's ZeRO-1/2 step on the busiest rank: the pieces to their owners, Newton–Schulz of the
    jobs it owns, the slices back, in sequence (FlatStep does not overlap them); each round of batched
    point-to-point sends pays one latency (inter-node if a peer is on another node) plus one per peer.
    expert=True: the expert partitions on the expert topology (expert TP 1 × expert-DP `dp`, peers `ep`
    global ranks apart, so gpus_per_node / ep of them share a node)."""
    tp, stride = (1, model.ep) if expert else (model.tp, 1)
    plan = zero_plan(
        zero_layout(model, optimizer, a, dp, expert), tp, dp, a.ns_steps, a.cluster, a.comm_itemsize
    )
    per_node = max(1, a.gpus_per_node // stride)
    zb = zero_rank_bytes(plan, a.comm_itemsize, per_node)
    w = tp * dp
    rate = a.peak_flops * a.ns_efficiency
    worst = dict(total=-1.0)
    for q in range(w):
        latency = sum(
            (a.latency_inter if any(p // per_node != q // per_node for p in peers) else a.latency_intra)
            + a.latency_per_peer * len(peers)
            for peers in (zb.peers["a"][q], zb.peers["b"][q])
            if peers
        )
        comm = sum(
            max(zb.link[(ph, "sent", l)][q], zb.link[(ph, "received", l)][q]) / bw
            for ph in "ab"
            for l, bw in (("intra", a.nvlink_bw), ("inter", a.ib_bw))
        )
        compute = plan.loads[q] / rate
        total = compute + comm + latency
        if total > worst["total"]:
            worst = dict(
                compute=compute,
                comm=comm,
                latency=latency,
                total=total,
                flops=plan.loads[q],
                bytes=max(zb.sent[q], zb.received[q]),
            )
    same = deepspeed_same_update_time(plan, a)
    worst.update(
        imbalance=plan.imbalance,
        imbalance_before=plan.imbalance_before_balancing,
        partition_imbalance=plan.partition_imbalance,
        cut_jobs=sum(j.cut for j in plan.jobs),
        jobs=len(plan.jobs),
        exchanged_jobs=len(plan.exchanged_jobs()),
        moved_jobs=len(plan.moved),
        largest_job_share=max(j.flops for j in plan.jobs) / (sum(plan.loads) / w),
        same_update_total=same["total"],
        same_update_compute=same["compute"],
        same_update_bytes=same["bytes"],
    )
    return worst


def step_cost(
    model: ModelSpec, gpus: int, optimizer: str, mode: str, a: Assumptions
) -> Optional[Dict[str, float]]:
    """Optimizer-step and forward/backward time per step on `gpus` GPUs (None: layout does not fit)."""
    if gpus % model.min_gpus():
        return None
    dp = gpus // (model.tp * model.pp)
    if mode == "zero":
        time_of = lambda groups, tp, dp_, stride, a_: zero_partition_time(model, optimizer, dp_, a_)
    else:
        time_of = (
            deepspeed_time if mode == "deepspeed" else (lambda *args: topology_time(*args[:4], mode, args[4]))
        )
    if mode == "deepspeed0":
        dense = deepspeed_zero0_time(stage_parameters(model), model.tp, a)
    elif mode == "deepspeed":  # its flat param group: every hidden matrix on its own, in parameter order
        dense = time_of(
            [Group(shape, shape[0] * shape[1], model.tp > 1) for _, shape in stage_parameters(model)],
            model.tp,
            dp,
            model.tp,
            a,
        )
    else:
        dense = time_of(stage_groups(model, optimizer, a), model.tp, dp, model.tp, a)
    expert = dict(total=0.0, compute=0.0, comm=0.0, latency=0.0, flops=0.0, bytes=0.0)
    local_elems = sum(g.elements for g in stage_groups(model, optimizer, a)) / model.tp
    if model.experts:
        edp = gpus // (model.ep * model.pp)  # expert TP = 1
        eg = stage_groups(model, optimizer, a, expert=True)
        if mode == "deepspeed0":  # expert TP = 1: each expert matrix whole on its rank
            expert = deepspeed_zero0_time([(f"expert{i}", g.stacked) for i, g in enumerate(eg)], 1, a)
        elif mode == "zero":
            expert = zero_partition_time(model, optimizer, edp, a, expert=True)
        else:
            expert = time_of(eg, 1, edp, model.ep, a)
        local_elems += sum(g.elements for g in eg)
    adamw_bytes = (
        2
        * (dp - 1)
        / dp
        * (local_elems - (sum(g.elements for g in eg) if model.experts else 0))
        * a.comm_itemsize
    )
    if model.experts:
        adamw_bytes += 2 * (edp - 1) / edp * sum(g.elements for g in eg) * a.comm_itemsize
    if mode in ("deepspeed", "zero"):  # ZeRO-1/2: momentum and master weights of the partition only
        local_elems /= dp
    elementwise = local_elems * a.elementwise_bytes_per_param / a.hbm_bw
    opt_time = dense["total"] + expert["total"] + elementwise
    total_params, active = model.params()
    fwd_bwd = 6 * active * a.global_batch_tokens / (gpus * a.peak_flops * a.train_mfu)
    return dict(
        gpus=gpus,
        tp=model.tp,
        pp=model.pp,
        dp=dp,
        optimizer_s=opt_time,
        fwd_bwd_s=fwd_bwd,
        overhead_pct=100 * opt_time / fwd_bwd,
        compute_s=dense["compute"] + expert["compute"],
        comm_s=dense["comm"] + expert["comm"],
        latency_s=dense["latency"] + expert["latency"],
        elementwise_s=elementwise,
        busiest_rank_flops=dense["flops"] + expert["flops"],
        busiest_rank_bytes=dense["bytes"] + expert["bytes"],
        dense_imbalance=dense["imbalance"],
        adamw_bytes=adamw_bytes,
        **{
            k: dense[k]
            for k in (
                "partition_imbalance",
                "imbalance_before",
                "moved_jobs",
                "largest_job_share",
                "same_update_compute",
                "same_update_bytes",
            )
            if k in dense
        },
        **{k: dense[k] + expert.get(k, 0) for k in ("cut_jobs", "jobs", "exchanged_jobs") if k in dense},
        **({k: dense[k] + expert.get(k, 0) for k in ("owned_groups", "groups")} if mode == "auto" else {}),
        **(
            {
                "same_update_s": dense["same_update_total"]
                + expert.get("same_update_total", 0.0)
                + elementwise,
                "same_update_pct": 100
                * (dense["same_update_total"] + expert.get("same_update_total", 0.0) + elementwise)
                / fwd_bwd,
            }
            if "same_update_total" in dense
            else {}
        ),
    )


def predict(
    a: Assumptions, optimizer: str = "teon", models: Sequence[str] = tuple(MODELS), gpus: Sequence[int] = GPUS
) -> Dict[str, Dict[str, List[Dict[str, float]]]]:
    out: Dict[str, Dict[str, List[Dict[str, float]]]] = {}
    for key in models:
        out[key] = {}
        for mode in MODES:
            out[key][mode] = [
                r for n in gpus if (r := step_cost(MODELS[key], n, optimizer, mode, a)) is not None
            ]
        bf16 = dataclasses.replace(a, comm_itemsize=2)
        out[key]["distributed_bf16"] = [
            r for n in gpus if (r := step_cost(MODELS[key], n, optimizer, "distributed", bf16)) is not None
        ]
    return out


# -- calibration on the CPU measurements of bench/scaling.py ------------------------------------------
def calibrate_cpu(scaling: Dict, cores: int = 2) -> Dict[str, float]:
    """Effective NS FLOP rate of one CPU rank (from the single-process runs: all step time counted as
    NS, so a lower bound) and gloo loopback bandwidth (least squares of the distributed runs' extra time
    over their bytes, after removing the predicted compute with ranks sharing `cores` cores)."""
    runs = scaling.get("runs", {})
    singles = [r for r in runs.values() if r["world"] == 1]
    if not singles:
        return {}
    rate = sorted(r["total_flops"] / (r["step_ms_max_rank"] / 1e3) for r in singles)[len(singles) // 2]
    xs, ys = [], []
    for r in runs.values():
        if r["mode"] != "distributed" or r["world"] == 1:
            continue
        slowdown = max(1.0, r["world"] / cores)
        compute = max(r["flops_per_rank"]) / rate * slowdown
        nbytes = max(max(s, v) for s, v in zip(r["sent_per_rank"], r["received_per_rank"]))
        xs.append(nbytes)
        ys.append(r["step_ms_max_rank"] / 1e3 - compute)
    bw = None
    if xs and sum(x * x for x in xs) > 0:
        slope = sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs)
        bw = 1 / slope if slope > 0 else None
    return dict(
        cpu_ns_flops_per_s=rate,
        gloo_bytes_per_s=bw,
        n_runs=len(xs),
        note="fitted on a shared, oversubscribed 2-core machine: order-of-magnitude only",
    )


# -- outputs --------------------------------------------------------------------------------------------
def zero_table(key: str, by: Dict[str, Dict[int, Dict[str, float]]], misses: List[str]) -> List[str]:
    """The ZeRO-1/2 table of one model (teonspeed's partition-local step next to DeepSpeed's strategy with
    the same update, and DeepSpeed's own Muon), and its rows that miss the bar appended to `misses`. The
    bar is the same-update column: DeepSpeed's native Muon computes another update under TP (each shard
    alone) and for TEON (no stacks), so its time is shown but not compared."""
    lines = [
        "ZeRO-1/2: teonspeed's partition-local step next to DeepSpeed's strategy computing the same update, "
        "and DeepSpeed's own Muon (another update: not the bar).",
        "",
        "| GPUs | DP | fwd+bwd s | teonspeed ZeRO-1/2: step ms | compute ms | comm ms | latency ms "
        "| cut / jobs (moved by balancing) | NS FLOPs max/mean over TP×DP ranks: before → after balancing "
        "(largest job alone) | MB/rank | teonspeed ZeRO-1/2 % | DeepSpeed's strategy, same update: % "
        "(MB/rank) | DeepSpeed Muon, native (other update) % | replicated % | meets the bar |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, z in by["zero"].items():
        ds, r = by["deepspeed"][n], by["replicated"][n]
        why = []
        if z["optimizer_s"] > z["same_update_s"]:
            why.append(
                f"slower than DeepSpeed's strategy with the same update ({z['overhead_pct']:.2f}% vs "
                f"{z['same_update_pct']:.2f}%)"
            )
        if z["optimizer_s"] > r["optimizer_s"]:
            why.append(f"slower than replicated ({z['overhead_pct']:.2f}% vs {r['overhead_pct']:.2f}%)")
        if z["fwd_bwd_s"] >= 1 and z["overhead_pct"] >= 5:
            why.append(f"{z['overhead_pct']:.1f}% ≥ 5% of a {z['fwd_bwd_s']:.2f} s forward+backward")
        if why:
            misses.append(f"- {key}, {n} GPUs: " + "; ".join(why))
        lines.append(
            f"| {n} | {z['dp']} | {z['fwd_bwd_s']:.2f} | {1e3 * z['optimizer_s']:.0f} | "
            f"{1e3 * z['compute_s']:.0f} | {1e3 * z['comm_s']:.1f} | {1e3 * z['latency_s']:.2f} | "
            f"{z['cut_jobs']} / {z['jobs']} ({z['moved_jobs']}) | {z['imbalance_before']:.2f} → "
            f"{z['dense_imbalance']:.2f} ({z['largest_job_share']:.2f}) | "
            f"{z['busiest_rank_bytes'] / 1e6:.0f} | {z['overhead_pct']:.2f} | "
            f"{z['same_update_pct']:.2f} ({z['same_update_bytes'] / 1e6:.0f}) | {ds['overhead_pct']:.2f} | "
            f"{r['overhead_pct']:.1f} | {'yes' if not why else 'no'} |"
        )
    return lines + [""]


def write_outputs(pred, a: Assumptions, optimizer: str, calib: Dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    data = dict(
        assumptions=a.as_dict(),
        optimizer=optimizer,
        models={
            k: dict(
                dataclasses.asdict(MODELS[k]),
                total_params=MODELS[k].params()[0],
                active_params=MODELS[k].params()[1],
            )
            for k in pred
        },
        predictions=pred,
        cpu_calibration=calib,
    )
    (out_dir / "costmodel.json").write_text(json.dumps(data, indent=1) + "\n")
    lines = [
        f"# Predicted optimizer-step overhead ({optimizer}): owner-compute vs replicated vs DeepSpeed's Muon",
        "",
        "A model, not a measurement: H100 datasheet constants and the assumptions below; the group lists, "
        "owner assignment (LPT), phase-B collectives and per-rank bytes are those of the implementation "
        "(tests/unit/test_costmodel.py checks the bytes against DistributedRunner.expected_bytes).",
        "",
        "*owner-compute*: teonspeed under ZeRO-0 / Megatron DDP: phase A over TP, phase B as a TP hand-off "
        "plus one broadcast per owning replica over each TP position's data-parallel group (bytes per rank "
        "≈ one TP shard of the model, whatever the GPU count). *replicated*: every rank computes every "
        'matrix. *teonspeed auto*: parallel_mode="auto" (the default): per group, owner-compute or '
        "replicated, as the package's own rule (teonspeed.parallel.placement) chooses from the constants "
        "below; *auto: owner-computed groups* counts its choice. *DeepSpeed Muon ZeRO-0*: DeepSpeed 0.19.8 "
        "at ZeRO stage 0 (MuonWithAuxAdam.step): every rank runs muon_update on each weight it holds, one "
        "matrix at a time, no exchange: replicated compute on the TP-local shard (under TP a different, "
        "shard-wise update). *DeepSpeed Muon*: DeepSpeed 0.19.8's own strategy under ZeRO-1/2 (each rank "
        "orthogonalizes the matrices overlapping its partition; cut ones computed by every holder, their "
        "gradient copied to each from ZeRO's default all-reduce, which AdamW pays too, so it adds no byte; "
        "under TP it orthogonalizes the local shard, a different update). *AdamW MB*: the "
        "data-parallel all-reduce of the same gradients, per rank and direction, which every optimizer "
        "pays. *teonspeed ZeRO-1/2*: teonspeed's partition-local step under DeepSpeed ZeRO-1/2 "
        "(plugin/teonspeed/parallel/"
        "flat.py): the hidden matrices of a stage, in the model's parameter order and TP-local shapes, "
        "as one "
        "flat param group cut into DP equal partitions; the implementation's planner (plan_zero_partition) "
        "runs on that layout: a job inside a partition is computed there (TP-gathered among that partition's "
        "TP peers), only cut jobs go to one owner (the rank free first that exchanges them fastest) and only "
        "holders' slices come back, and jobs move off the busiest rank where that pays; two rounds of "
        "point-to-point sends with only the ranks concerned, not overlapped with the Newton–Schulz "
        "work (tests/unit/test_costmodel.py "
        "checks its bytes against FlatStep.expected_bytes). Both ZeRO-1/2 modes count only the partition's "
        "element-wise work; ZeRO's parameter all-gather is paid by AdamW too, so not counted.",
        "",
        "Assumptions (the hardware ones: teonspeed.parallel.cost.ClusterProfile, the constants "
        'parallel_mode="auto" decides with): '
        + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in a.as_dict().items())
        + ".",
        "",
    ]
    misses: List[str] = []
    zero_misses: List[str] = []
    for key, by_mode in pred.items():
        m = MODELS[key]
        total, active = m.params()
        lines += [
            f"## {m.name}: {total / 1e9:.1f}B params ({active / 1e9:.1f}B active), TP={m.tp}, PP={m.pp}"
            + (f", EP={m.ep}" if m.experts else ""),
            "",
            "| GPUs | DP | fwd+bwd s | owner-compute: step ms | compute ms | comm ms | latency ms "
            "| FLOPs max/mean | MB/rank | AdamW MB/rank | overhead % | bf16 exchange % | replicated % "
            "| teonspeed auto % | auto: owner-computed groups | DeepSpeed Muon ZeRO-0 % |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        by = {mode: {r["gpus"]: r for r in rows} for mode, rows in by_mode.items()}
        for d in by_mode["distributed"]:
            n = d["gpus"]
            r, ds, bf, au = by["replicated"][n], by["deepspeed0"][n], by["distributed_bf16"][n], by["auto"][n]
            lines.append(
                f"| {n} | {d['dp']} | {d['fwd_bwd_s']:.2f} | {1e3 * d['optimizer_s']:.0f} | "
                f"{1e3 * d['compute_s']:.0f} | {1e3 * d['comm_s']:.0f} | {1e3 * d['latency_s']:.1f} | "
                f"{d['dense_imbalance']:.2f} | {d['busiest_rank_bytes'] / 1e6:.0f} | "
                f"{d['adamw_bytes'] / 1e6:.0f} | {d['overhead_pct']:.1f} | {bf['overhead_pct']:.1f} | "
                f"{r['overhead_pct']:.1f} | {au['overhead_pct']:.1f} | {au['owned_groups']} "
                f"/ {au['groups']} | {ds['overhead_pct']:.1f} |"
            )
            why = []
            for other, label in ((d, "owner-compute"), (r, "replicated")):
                if au["optimizer_s"] > other["optimizer_s"] * (1 + 1e-9):
                    why.append(
                        f"slower than {label} ({1e3 * au['optimizer_s']:.1f} ms vs "
                        f"{1e3 * other['optimizer_s']:.1f} ms: the rule predicts the owner part as one "
                        "block, this model per rank with the busiest rank's own bytes)"
                    )
            if au["optimizer_s"] > ds["optimizer_s"]:
                why.append(
                    f"slower than DeepSpeed's Muon at ZeRO-0 ({au['overhead_pct']:.1f}% vs "
                    f"{ds['overhead_pct']:.1f}%"
                    + (
                        "; DeepSpeed orthogonalizes each TP shard alone, a different update"
                        if m.tp > 1
                        else ""
                    )
                    + ")"
                )
            if au["fwd_bwd_s"] >= 1 and au["overhead_pct"] >= 5:
                why.append(f"{au['overhead_pct']:.1f}% ≥ 5% of a {au['fwd_bwd_s']:.2f} s forward+backward")
            if why:
                misses.append(f"- {key}, {n} GPUs: " + "; ".join(why))
        lines.append("")
        lines += zero_table(key, by, zero_misses)
    lines += [
        "## Rows that miss the bar under ZeRO-1/2 (teonspeed ZeRO-1/2 ≤ DeepSpeed's strategy with the same "
        "update, ≤ replicated, < 5% where fwd+bwd ≥ 1 s)",
        "",
        "*DeepSpeed's strategy, same update*: DeepSpeed's placement on the same layout and jobs (every rank "
        "holding partition d, each of its T TP ranks, orthogonalizes every job overlapping d; a cut job on "
        "every holder; gradients from ZeRO's default all-reduce, no byte added) but computing teonspeed's "
        "update: each TEON stack and fused weight whole, TP-gathered (the MB in brackets: that TP "
        "all-gather). That is the bar. *DeepSpeed Muon, native* is not: under TP it orthogonalizes each "
        "TP shard alone (1/T of the rows; the unsharded model's step is not reproduced, so the update "
        "changes with the TP size) and it has no TEON stacks, so it computes a different, cheaper "
        "update; its time is shown for reference. *NS FLOPs max/mean*: before → after the planner "
        "moves jobs off the busiest rank (only where the Newton–Schulz time saved exceeds the "
        "predicted time of moving the job's pieces and update, with the ClusterProfile constants); "
        "in brackets the largest single job's FLOPs over the mean, the least max/mean any placement of "
        "whole jobs can reach: where the after value equals it, the remaining imbalance is that job.",
        "",
    ]
    lines += zero_misses or ["None."]
    lines += [
        "",
        "## Rows that miss the bar under ZeRO-0 / DDP (teonspeed auto ≤ owner-compute, ≤ replicated, "
        "≤ DeepSpeed's Muon at ZeRO-0, < 5% where fwd+bwd ≥ 1 s)",
        "",
    ]
    lines += misses or ["None."]
    lines += [
        "",
        "Why: under ZeRO-0 / DDP a group computed by an owner must reach every other replica (phase B: its "
        "TP shard once per rank), bytes on top of AdamW's all-reduce of the gradients; replicating it costs "
        "its whole Newton–Schulz work on every rank and no bytes. auto takes, group by group, whichever the "
        "cluster's constants predict is cheaper (large matrices to owners, small ones everywhere; everything "
        "replicated once the column crosses many nodes or replicas outnumber the groups), so it is never "
        "predicted slower than either uniform plan (the rule predicts with average bytes per rank, "
        "this model with the busiest rank's). What it cannot remove is "
        "the floor of both choices: replicated compute of the small groups, or the update's bytes of the "
        "large ones. DeepSpeed's Muon at ZeRO-0 has the same floor as replicated, lower under TP because it "
        "orthogonalizes each TP shard alone (1/T of the rows: cheaper, and a different update). ZeRO-0 also "
        "keeps AdamW's full all-reduce of the gradients. The path without the optimizer's extra bytes is "
        "ZeRO-1/2 (or Megatron's distributed optimizer): compute where the partition lives, the update's "
        "distribution being the parameter all-gather that ZeRO pays for AdamW too (the *teonspeed ZeRO-1/2* "
        "tables above).",
        "",
    ]
    if calib:
        lines += [
            "## CPU calibration (bench/results/scaling_cpu.json)",
            "",
            f"Effective NS rate of one CPU rank ≈ {calib['cpu_ns_flops_per_s'] / 1e9:.2f} GFLOP/s (fp32, "
            "whole step counted as NS: a lower bound); gloo loopback ≈ "
            + (
                f"{calib['gloo_bytes_per_s'] / 1e6:.0f} MB/s"
                if calib.get("gloo_bytes_per_s")
                else "not fitted"
            )
            + f" from {calib['n_runs']} distributed runs. {calib['note']}. These numbers only check the "
            "model's structure; the GPU predictions use the constants above.",
            "",
        ]
    lines += [
        "*FLOPs max/mean*: LPT load balance of the dense groups at that work-group size (above 1.1 there are "
        "fewer groups than ranks, or a few large ones). *MB/rank*: the busiest rank's larger direction.",
        "",
    ]
    (out_dir / "costmodel.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for color, (key, by_mode) in zip(colors, pred.items()):
        for mode, style in (
            ("auto", "-"),
            ("distributed", (0, (4, 1, 1, 1, 1, 1))),
            ("replicated", "--"),
            ("deepspeed", ":"),
            ("zero", "-."),
        ):
            rows = by_mode[mode]
            if not rows:
                continue
            ax.plot(
                [r["gpus"] for r in rows],
                [r["overhead_pct"] for r in rows],
                linestyle=style,
                marker="o",
                ms=3,
                color=color,
                label=f"{key} {mode}",
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("GPUs (H100)")
    ax.set_ylabel("optimizer step / (forward+backward), %")
    ax.set_title(
        f"Predicted {optimizer.upper()} step overhead, {a.global_batch_tokens / 2**20:.0f}M tokens/step"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    fig.savefig(out_dir / "costmodel.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizer", default="teon", choices=["teon", "muon"])
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    own = [f for f in dataclasses.fields(Assumptions) if f.name != "cluster"]
    for f in dataclasses.fields(ClusterProfile) + tuple(own):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = p.parse_args(argv)
    cluster = ClusterProfile(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ClusterProfile)})
    a = Assumptions(cluster, **{f.name: getattr(args, f.name) for f in own})
    pred = predict(a, args.optimizer)
    scaling = RESULTS_DIR / "scaling_cpu.json"
    calib = calibrate_cpu(json.loads(scaling.read_text())) if scaling.exists() else {}
    write_outputs(pred, a, args.optimizer, calib, args.out_dir)
    print((args.out_dir / "costmodel.md").read_text())


if __name__ == "__main__":
    main()
