"""Analytical cost model of the TEON/Muon optimizer step at cluster scale: owner-compute ("distributed")
vs every-rank-computes ("replicated"), against the forward/backward time of a training step.

    .venv/bin/python bench/costmodel.py                 # writes bench/results/costmodel.{json,md,png}
    .venv/bin/python bench/costmodel.py --optimizer muon --ns-efficiency 0.3

Nothing here is measured on a GPU. Every constant is a field of `Assumptions` (printed into the outputs).
The structure of the model follows the implementation (plugin/parallel/distributed.py) exactly:

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
             collective (+ per hop of a ring); distributed overlaps compute and comm by `overlap` (2
             waves); a memory-bound element-wise part (momentum, update) is added to every mode.
  deepspeed  DeepSpeed 0.19.8's own Muon under ZeRO-1/2 (see deepspeed_time), for comparison.
  zero       teonspeed's own ZeRO-1/2 step (plugin/parallel/flat.py): the hidden matrices of one stage in
             the model's parameter order (HF names: q, k, v, o, gate, up, down per layer; TP-local shapes)
             form one flat param group cut into DP equal partitions (DeepSpeed's alignment padding
             ignored); teonspeed.parallel.zero_partition.plan_zero_partition, the implementation's own
             planner, decides local/cut jobs and owners; bytes are its all_to_alls, FLOPs its loads (see
             zero_partition_time; tests/unit/test_costmodel.py checks the bytes against FlatStep.expected_bytes).
             MoE: one EP rank's expert matrices form their own param group, cut into expert-DP partitions
             and planned on the expert topology (expert TP 1 × expert-DP), as the implementation does.
  training   forward+backward = 6 · active params · global batch tokens / (GPUs · peak · train_mfu);
             overhead % = optimizer step / forward+backward.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"

import torch

import teonspeed
from teonspeed.parallel.distributed import _split_waves  # the implementation's own rules
from teonspeed.parallel.owners import assign_owners, ns_flops
from teonspeed.parallel.zero_partition import ZeroPlan, plan_zero_partition


@dataclass
class Assumptions:
    """Every constant of the model. GPU numbers are H100 SXM datasheet values, not measurements."""
    peak_flops: float = 989e12
    """bf16 dense tensor-core peak per GPU (H100 SXM)."""
    ns_efficiency: float = 0.45
    """Achieved fraction of peak for the Newton–Schulz matmuls (bf16, batched same-shape stacks; large
    square-ish matrices reach 0.6-0.7, small ones much less)."""
    train_mfu: float = 0.40
    """Model-FLOPs utilisation of forward+backward (typical for Megatron LLaMA training)."""
    global_batch_tokens: int = 4 * 1024 * 1024
    """Tokens per optimizer step, fixed as the GPU count grows (strong scaling: the worst case for the
    optimizer's share)."""
    gpus_per_node: int = 8
    nvlink_bw: float = 450e9
    """Bytes/s per GPU per direction inside a node (NVLink 4: 900 GB/s bidirectional)."""
    ib_bw: float = 50e9
    """Bytes/s per GPU per direction across nodes (400 Gb/s NDR InfiniBand per GPU)."""
    latency_intra: float = 15e-6
    """Seconds per collective inside a node."""
    latency_inter: float = 40e-6
    """Seconds per collective that leaves the node."""
    latency_per_peer: float = 0.5e-6
    """Extra seconds per peer of an all_to_all (NCCL issues one send/recv pair per peer)."""
    comm_itemsize: int = 4
    """Bytes per element exchanged: the momentum dtype (fp32, as implemented)."""
    hbm_bw: float = 3.35e12
    """HBM bytes/s for the element-wise part."""
    elementwise_bytes_per_param: int = 40
    """Bytes touched per local matrix element by momentum + weight update (fp32 grad, momentum, master)."""
    ns_steps: int = 5
    teon_k: int = 2
    overlap_waves: int = 2
    overlap: float = 0.5
    """Fraction of the shorter of (compute, comm) hidden behind the longer in distributed mode (2 waves:
    the first gather and the last scatter are never hidden)."""


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
        out = {"q": (self.heads * d, h), "k": (self.kv_heads * d, h), "v": (self.kv_heads * d, h),
               "o": (h, self.heads * d)}
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
    "llama-1b": ModelSpec("LLaMA-1B (3.2-1B shapes, untied lm_head)", 2048, 16, 32, 8, 64, 8192, 128256, tp=1, pp=1),
    "llama-7b": ModelSpec("LLaMA-7B (2-7B shapes)", 4096, 32, 32, 32, 128, 11008, 32000, tp=2, pp=1),
    "llama-70b": ModelSpec("LLaMA-70B (3-70B shapes)", 8192, 80, 64, 8, 128, 28672, 128256, tp=8, pp=4),
    "moe-64e": ModelSpec("MoE 64 experts top-8 (OLMoE-like)", 2048, 16, 16, 16, 128, 0, 50304, tp=1, pp=1,
                         experts=64, expert_ffn=1024, topk=8, ep=8),
}
GPUS = [8, 16, 32, 64, 128, 256, 512, 1024]
MODES = ("distributed", "replicated", "deepspeed", "zero")
"""distributed: teonspeed owner-compute under ZeRO-0 / Megatron DDP; replicated: every rank computes
everything; deepspeed: DeepSpeed's own Muon under ZeRO-1/2; zero: teonspeed's partition-local ZeRO-1/2 step."""


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


def per_rank_bytes(groups: Sequence[Group], tp: int, dp: int, ns_steps: int, itemsize: int = 4,
                   mode: str = "distributed") -> RankCost:
    """FLOPs and bytes (phase A / phase B) of every work rank q = tp_rank + T·replica, as
    DistributedRunner.expected_bytes counts them (a broadcast: once at its source, once per receiver)."""
    w = tp * dp
    costs = [ns_flops(g.stacked, ns_steps) for g in groups]
    shard = [(g.elements // tp if (g.sharded and tp > 1) else g.elements) * itemsize for g in groups]
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
    b_column = [max(total - replica_owned[q // tp], replica_owned[q // tp]) if dp > 1 else 0.0 for q in range(w)]
    return RankCost(flops, sent_a, recv_a, sent_b, recv_b, b_tp, b_column)


def broadcasts_per_step(groups: Sequence[Group], tp: int, dp: int, ns_steps: int, waves: int) -> int:
    """Phase B (2) collectives per step: one per (wave, replica owning something in it)."""
    if dp == 1:
        return 0
    costs = [ns_flops(g.stacked, ns_steps) for g in groups]
    owners = assign_owners(costs, tp * dp)
    return sum(len({owners[i] // tp for i in wave}) for wave in _split_waves(groups, costs, waves))


def _on_node_fraction(global_ranks: Sequence[int], gpus_per_node: int) -> List[float]:
    """Per member: fraction of its peers (in the work group) that share its node."""
    nodes = [r // gpus_per_node for r in global_ranks]
    count = Counter(nodes)
    w = len(global_ranks)
    return [(count[n] - 1) / (w - 1) if w > 1 else 0.0 for n in nodes]


def topology_time(groups: Sequence[Group], tp: int, dp: int, stride: int, mode: str,
                  a: Assumptions) -> Dict[str, float]:
    """Optimizer-step time of one topology (seconds), for the busiest rank. `stride`: distance in
    global ranks between consecutive TP groups of the work group (dense: tp; experts: ep·etp)."""
    if not groups:
        return dict(compute=0.0, comm=0.0, latency=0.0, total=0.0, flops=0.0, bytes=0.0, imbalance=1.0)
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
            total = max(compute, comm) + (1 - a.overlap) * min(compute, comm) + latency
        if total > worst["total"]:
            worst = dict(compute=compute, comm=comm, latency=latency, total=total, flops=rc.flops[q],
                         bytes=max(rc.sent[q], rc.received[q]))
    mean = sum(rc.flops) / w
    worst["imbalance"] = max(rc.flops) / mean if mean else 1.0
    return worst


def deepspeed_time(groups: Sequence[Group], tp: int, dp: int, stride: int, a: Assumptions) -> Dict[str, float]:
    """DeepSpeed 0.19.8's own Muon strategy under ZeRO-1/2 (runtime/zero/stage_1_and_2.py,
    get_flat_partition): each data-parallel rank runs muon_update on every matrix that overlaps its
    equal-size partition of the flat (TP-local) buffer, on its full gradient; a matrix cut by a partition
    boundary is therefore all-reduced (not reduce-scattered) and orthogonalized redundantly by every rank
    that holds a piece. Under TP it orthogonalizes the local shard (a different update; its cheaper
    FLOPs are counted, no TP gather). Busiest rank; the parameter all-gather that follows is ZeRO's own,
    paid by AdamW too, so not counted. `groups`: the flat group's matrices in order (step_cost passes
    every hidden matrix on its own, in the model's parameter order: DeepSpeed's Muon does not stack)."""
    if not groups:
        return dict(compute=0.0, comm=0.0, latency=0.0, total=0.0, flops=0.0, bytes=0.0, imbalance=1.0)
    local = [(g.elements // tp if (g.sharded and tp > 1) else g.elements) for g in groups]
    flops = [ns_flops(((g.stacked[0] // tp) if (g.sharded and tp > 1) else g.stacked[0], g.stacked[1]), a.ns_steps)
             for g in groups]
    size = -(-sum(local) // dp)
    column_intra = stride * (dp - 1) < a.gpus_per_node
    column_bw = a.nvlink_bw if column_intra else a.ib_bw
    column_lat = (a.latency_intra if column_intra else a.latency_inter) + a.latency_per_peer * (dp - 1)
    rate = a.peak_flops * a.ns_efficiency
    per_rank_flops = [0.0] * dp
    per_rank_bytes = [0.0] * dp
    per_rank_reduces = [0] * dp
    start = 0
    for n, f in zip(local, flops):
        first, last = start // size, (start + n - 1) // size
        for r in range(first, last + 1):
            per_rank_flops[r] += f
            if last > first:  # cut by a boundary: the full gradient reaches every holder
                per_rank_bytes[r] += n * a.comm_itemsize
                per_rank_reduces[r] += 1
        start += n
    worst = dict(total=-1.0)
    for r in range(dp):
        compute, comm = per_rank_flops[r] / rate, per_rank_bytes[r] / column_bw
        latency = 2 * column_lat * per_rank_reduces[r]
        total = compute + comm + latency
        if total > worst["total"]:
            worst = dict(compute=compute, comm=comm, latency=latency, total=total, flops=per_rank_flops[r],
                         bytes=per_rank_bytes[r])
    mean = sum(per_rank_flops) / dp
    worst["imbalance"] = max(per_rank_flops) / mean if mean else 1.0
    return worst


# -- teonspeed's ZeRO-1/2 step: the implementation's planner on the model's real parameter list -------
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # Megatron splits dim 0; o/down dim 1
HF_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
            "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


@dataclass
class ZeroLayout:
    """One ZeRO-1/2 param group of the hidden matrices of a pipeline stage, as DeepSpeed flattens it on
    every TP rank: parameters in model order at `offsets` with TP-local `shapes`, cut into `dp` partitions."""
    groups: list  # teonspeed's OrthoGroups, with full shapes as the optimizer builds them under TP
    offsets: Dict[str, int]
    shapes: Dict[str, Tuple[int, int]]
    partition_size: int


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
    return (shape[0] // tp, shape[1]) if any(c in name for c in COLUMN_PARALLEL) else (shape[0], shape[1] // tp)


def zero_layout(model: ModelSpec, optimizer: str, a: Assumptions, dp: int, expert: bool = False) -> ZeroLayout:
    """expert=True: the expert param group (expert TP = 1), cut into `dp` expert-DP partitions."""
    params = expert_parameters(model) if expert else stage_parameters(model)
    named = [(n, torch.nn.Parameter(torch.empty(s, device="meta"))) for n, s in params]
    groups = teonspeed.plan(named, optimizer, **({"teon_k": a.teon_k} if optimizer == "teon" else {})).groups
    offsets, shapes, offset = {}, {}, 0
    for n, s in params:
        offsets[n], shapes[n] = offset, local_shape(n, s, 1 if expert else model.tp)
        offset += shapes[n][0] * shapes[n][1]
    return ZeroLayout(groups, offsets, shapes, -(-offset // dp))


def zero_plan(layout: ZeroLayout, tp: int, dp: int, ns_steps: int) -> ZeroPlan:
    """The implementation's plan (what plugin/parallel/flat.py plan_partition builds on every rank: NS
    FLOPs of the full, TP-gathered stacks as the cost); work rank d·T + t: Megatron's order, TP adjacent."""
    work_rank = {(t, d): d * tp + t for t in range(tp) for d in range(dp)}
    return plan_zero_partition(layout.groups, layout.offsets, layout.shapes, layout.partition_size, dp, tp,
                               work_rank, cost=lambda g: ns_flops(g.stacked_shape, ns_steps),
                               tp_sharded=lambda m: tp > 1)


@dataclass
class ZeroBytes:
    """Per work rank and phase (a: pieces to the owners, b: update slices back), bytes sent / received
    over NVLink (same node) and InfiniBand (other nodes)."""
    sent: List[int]
    received: List[int]
    link: Dict[Tuple[str, str, str], List[int]]  # (phase, "sent"|"received", "intra"|"inter") -> per rank


def zero_rank_bytes(plan: ZeroPlan, itemsize: int, gpus_per_node: int) -> ZeroBytes:
    """The two all_to_alls of FlatStep, pair by pair (the same pieces as ZeroPlan.bytes_per_rank)."""
    w = plan.work_size
    link = {(ph, d, l): [0] * w for ph in "ab" for d in ("sent", "received") for l in ("intra", "inter")}
    sent, received = [0] * w, [0] * w

    def move(phase, src, dst, n):
        where = "intra" if src // gpus_per_node == dst // gpus_per_node else "inter"
        link[(phase, "sent", where)][src] += n
        link[(phase, "received", where)][dst] += n
        sent[src] += n
        received[dst] += n

    if plan.exchanged_jobs():
        for job in plan.jobs:
            for _, d, r in plan.sources(job):
                if r != job.owner:
                    move("a", r, job.owner, plan.piece_numel(job, d) * itemsize)
            for _, d, r in plan.targets(job):
                if r != job.owner:
                    move("b", job.owner, r, plan.piece_numel(job, d) * itemsize)
    return ZeroBytes(sent, received, link)


def zero_partition_time(model: ModelSpec, optimizer: str, dp: int, a: Assumptions,
                        expert: bool = False) -> Dict[str, float]:
    """teonspeed's ZeRO-1/2 step on the busiest rank: all_to_all of the pieces, Newton–Schulz of the
    jobs it owns, all_to_all of the slices back, in sequence (FlatStep does not overlap them); each
    all_to_all pays one latency plus one per peer of the tp × dp work group. expert=True: the expert
    partitions on the expert topology (expert TP 1 × expert-DP `dp`, peers `ep` global ranks apart)."""
    tp, stride = (1, model.ep) if expert else (model.tp, 1)
    plan = zero_plan(zero_layout(model, optimizer, a, dp, expert), tp, dp, a.ns_steps)
    zb = zero_rank_bytes(plan, a.comm_itemsize, max(1, a.gpus_per_node // stride))
    w = tp * dp
    rate = a.peak_flops * a.ns_efficiency
    lat = (a.latency_intra if (w - 1) * stride < a.gpus_per_node else a.latency_inter) + a.latency_per_peer * (w - 1)
    latency = 2 * lat if plan.exchanged_jobs() else 0.0
    worst = dict(total=-1.0)
    for q in range(w):
        comm = sum(max(zb.link[(ph, "sent", l)][q], zb.link[(ph, "received", l)][q]) / bw
                   for ph in "ab" for l, bw in (("intra", a.nvlink_bw), ("inter", a.ib_bw)))
        compute = plan.loads[q] / rate
        total = compute + comm + latency
        if total > worst["total"]:
            worst = dict(compute=compute, comm=comm, latency=latency, total=total, flops=plan.loads[q],
                         bytes=max(zb.sent[q], zb.received[q]))
    worst.update(imbalance=plan.imbalance, partition_imbalance=plan.partition_imbalance,
                 cut_jobs=sum(j.cut for j in plan.jobs), jobs=len(plan.jobs),
                 exchanged_jobs=len(plan.exchanged_jobs()))
    return worst


def step_cost(model: ModelSpec, gpus: int, optimizer: str, mode: str, a: Assumptions) -> Optional[Dict[str, float]]:
    """Optimizer-step and forward/backward time per step on `gpus` GPUs (None: layout does not fit)."""
    if gpus % model.min_gpus():
        return None
    dp = gpus // (model.tp * model.pp)
    if mode == "zero":
        time_of = lambda groups, tp, dp_, stride, a_: zero_partition_time(model, optimizer, dp_, a_)
    else:
        time_of = deepspeed_time if mode == "deepspeed" else (lambda *args: topology_time(*args[:4], mode, args[4]))
    if mode == "deepspeed":  # its flat param group: every hidden matrix on its own, in parameter order
        dense = time_of([Group(shape, shape[0] * shape[1], model.tp > 1) for _, shape in stage_parameters(model)],
                        model.tp, dp, model.tp, a)
    else:
        dense = time_of(stage_groups(model, optimizer, a), model.tp, dp, model.tp, a)
    expert = dict(total=0.0, compute=0.0, comm=0.0, latency=0.0, flops=0.0, bytes=0.0)
    local_elems = sum(g.elements for g in stage_groups(model, optimizer, a)) / model.tp
    if model.experts:
        edp = gpus // (model.ep * model.pp)  # expert TP = 1
        eg = stage_groups(model, optimizer, a, expert=True)
        expert = (zero_partition_time(model, optimizer, edp, a, expert=True) if mode == "zero"
                  else time_of(eg, 1, edp, model.ep, a))
        local_elems += sum(g.elements for g in eg)
    adamw_bytes = 2 * (dp - 1) / dp * (local_elems - (sum(g.elements for g in eg) if model.experts else 0)) \
        * a.comm_itemsize
    if model.experts:
        adamw_bytes += 2 * (edp - 1) / edp * sum(g.elements for g in eg) * a.comm_itemsize
    if mode in ("deepspeed", "zero"):  # ZeRO-1/2: momentum and master weights of the partition only
        local_elems /= dp
    elementwise = local_elems * a.elementwise_bytes_per_param / a.hbm_bw
    opt_time = dense["total"] + expert["total"] + elementwise
    total_params, active = model.params()
    fwd_bwd = 6 * active * a.global_batch_tokens / (gpus * a.peak_flops * a.train_mfu)
    return dict(gpus=gpus, tp=model.tp, pp=model.pp, dp=dp, optimizer_s=opt_time, fwd_bwd_s=fwd_bwd,
                overhead_pct=100 * opt_time / fwd_bwd, compute_s=dense["compute"] + expert["compute"],
                comm_s=dense["comm"] + expert["comm"], latency_s=dense["latency"] + expert["latency"],
                elementwise_s=elementwise, busiest_rank_flops=dense["flops"] + expert["flops"],
                busiest_rank_bytes=dense["bytes"] + expert["bytes"], dense_imbalance=dense["imbalance"],
                adamw_bytes=adamw_bytes,
                **{k: dense[k] for k in ("partition_imbalance",) if k in dense},
                **{k: dense[k] + expert.get(k, 0) for k in ("cut_jobs", "jobs", "exchanged_jobs") if k in dense})


def predict(a: Assumptions, optimizer: str = "teon", models: Sequence[str] = tuple(MODELS),
            gpus: Sequence[int] = GPUS) -> Dict[str, Dict[str, List[Dict[str, float]]]]:
    out: Dict[str, Dict[str, List[Dict[str, float]]]] = {}
    for key in models:
        out[key] = {}
        for mode in MODES:
            out[key][mode] = [r for n in gpus if (r := step_cost(MODELS[key], n, optimizer, mode, a)) is not None]
        bf16 = dataclasses.replace(a, comm_itemsize=2)
        out[key]["distributed_bf16"] = [r for n in gpus
                                        if (r := step_cost(MODELS[key], n, optimizer, "distributed", bf16)) is not None]
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
    return dict(cpu_ns_flops_per_s=rate, gloo_bytes_per_s=bw, n_runs=len(xs),
                note="fitted on a shared, oversubscribed 2-core machine: order-of-magnitude only")


# -- outputs --------------------------------------------------------------------------------------------
def zero_table(key: str, by: Dict[str, Dict[int, Dict[str, float]]], misses: List[str]) -> List[str]:
    """The ZeRO-1/2 table of one model (teonspeed's partition-local step next to DeepSpeed's Muon), and
    its rows that miss the bar appended to `misses`."""
    lines = ["ZeRO-1/2: teonspeed's partition-local step next to DeepSpeed's own Muon.", "",
             "| GPUs | DP | fwd+bwd s | teonspeed ZeRO-1/2: step ms | compute ms | comm ms | latency ms "
             "| cut / jobs | FLOPs max/mean over TP×DP ranks (per partition, equal bytes alone) | MB/rank | DeepSpeed Muon MB/rank "
             "| teonspeed ZeRO-1/2 % | DeepSpeed Muon ZeRO-1/2 % | replicated % | meets the bar |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, z in by["zero"].items():
        ds, r = by["deepspeed"][n], by["replicated"][n]
        why = []
        if z["optimizer_s"] > ds["optimizer_s"]:
            why.append(f"slower than DeepSpeed's Muon ({z['overhead_pct']:.2f}% vs {ds['overhead_pct']:.2f}%"
                       + (f"; DeepSpeed orthogonalizes each TP shard alone, a different update with 1/{z['tp']} of "
                          f"the rows, where teonspeed gathers: compute {1e3 * z['compute_s']:.0f} ms vs "
                          f"{1e3 * ds['compute_s']:.0f} ms" if z["tp"] > 1 else
                          f"; {z['cut_jobs']} cut jobs move {z['busiest_rank_bytes'] / 1e6:.0f} MB on the busiest "
                          f"rank, DeepSpeed's cut matrices {ds['busiest_rank_bytes'] / 1e6:.0f} MB") + ")")
        if z["optimizer_s"] > r["optimizer_s"]:
            why.append(f"slower than replicated ({z['overhead_pct']:.2f}% vs {r['overhead_pct']:.2f}%)")
        if z["fwd_bwd_s"] >= 1 and z["overhead_pct"] >= 5:
            why.append(f"{z['overhead_pct']:.1f}% ≥ 5% of a {z['fwd_bwd_s']:.2f} s forward+backward")
        if why:
            misses.append(f"- {key}, {n} GPUs: " + "; ".join(why))
        lines.append(f"| {n} | {z['dp']} | {z['fwd_bwd_s']:.2f} | {1e3 * z['optimizer_s']:.0f} | "
                     f"{1e3 * z['compute_s']:.0f} | {1e3 * z['comm_s']:.1f} | {1e3 * z['latency_s']:.2f} | "
                     f"{z['cut_jobs']} / {z['jobs']} | {z['dense_imbalance']:.2f} ({z['partition_imbalance']:.2f}) | "
                     f"{z['busiest_rank_bytes'] / 1e6:.0f} | {ds['busiest_rank_bytes'] / 1e6:.0f} | "
                     f"{z['overhead_pct']:.2f} | {ds['overhead_pct']:.2f} | {r['overhead_pct']:.1f} | "
                     f"{'yes' if not why else 'no'} |")
    return lines + [""]


def write_outputs(pred, a: Assumptions, optimizer: str, calib: Dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    data = dict(assumptions=dataclasses.asdict(a), optimizer=optimizer,
                models={k: dict(dataclasses.asdict(MODELS[k]), total_params=MODELS[k].params()[0],
                                active_params=MODELS[k].params()[1]) for k in pred},
                predictions=pred, cpu_calibration=calib)
    (out_dir / "costmodel.json").write_text(json.dumps(data, indent=1) + "\n")
    lines = [f"# Predicted optimizer-step overhead ({optimizer}): owner-compute vs replicated vs DeepSpeed's Muon", "",
             "A model, not a measurement: H100 datasheet constants and the assumptions below; the group lists, "
             "owner assignment (LPT), phase-B collectives and per-rank bytes are those of the implementation "
             "(tests/unit/test_costmodel.py checks the bytes against DistributedRunner.expected_bytes).", "",
             "*owner-compute*: teonspeed under ZeRO-0 / Megatron DDP: phase A over TP, phase B as a TP hand-off "
             "plus one broadcast per owning replica over each TP position's data-parallel group (bytes per rank "
             "≈ one TP shard of the model, whatever the GPU count). *replicated*: every rank computes every "
             "matrix. *DeepSpeed Muon*: DeepSpeed 0.19.8's own strategy under ZeRO-1/2 (each rank "
             "orthogonalizes the matrices overlapping its partition; cut ones all-reduced and computed by every "
             "holder; under TP it orthogonalizes the local shard, a different update). *AdamW MB*: the "
             "data-parallel all-reduce of the same gradients, per rank and direction, which every optimizer "
             "pays. *teonspeed ZeRO-1/2*: teonspeed's partition-local step under DeepSpeed ZeRO-1/2 (plugin/parallel/"
             "flat.py): the hidden matrices of a stage, in the model's parameter order and TP-local shapes, as one "
             "flat param group cut into DP equal partitions; the implementation's planner (plan_zero_partition) "
             "runs on that layout: a job inside a partition is computed there (TP-gathered among that partition's "
             "TP peers), only cut jobs go to one owner (least-loaded rank) and only holders' slices come back; two "
             "all_to_alls over TP × DP, not overlapped with the Newton–Schulz work (tests/unit/test_costmodel.py "
             "checks its bytes against FlatStep.expected_bytes). Both ZeRO-1/2 modes count only the partition's "
             "element-wise work; ZeRO's parameter all-gather is paid by AdamW too, so not counted.", "",
             "Assumptions: " + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in dataclasses.asdict(a).items()) + ".", ""]
    misses: List[str] = []
    zero_misses: List[str] = []
    for key, by_mode in pred.items():
        m = MODELS[key]
        total, active = m.params()
        lines += [f"## {m.name}: {total / 1e9:.1f}B params ({active / 1e9:.1f}B active), TP={m.tp}, PP={m.pp}"
                  + (f", EP={m.ep}" if m.experts else ""), "",
                  "| GPUs | DP | fwd+bwd s | owner-compute: step ms | compute ms | comm ms | latency ms "
                  "| FLOPs max/mean | MB/rank | AdamW MB/rank | overhead % | bf16 exchange % | replicated % | DeepSpeed Muon % |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        by = {mode: {r["gpus"]: r for r in rows} for mode, rows in by_mode.items()}
        for d in by_mode["distributed"]:
            n = d["gpus"]
            r, ds, bf = by["replicated"][n], by["deepspeed"][n], by["distributed_bf16"][n]
            lines.append(f"| {n} | {d['dp']} | {d['fwd_bwd_s']:.2f} | {1e3 * d['optimizer_s']:.0f} | "
                         f"{1e3 * d['compute_s']:.0f} | {1e3 * d['comm_s']:.0f} | {1e3 * d['latency_s']:.1f} | "
                         f"{d['dense_imbalance']:.2f} | {d['busiest_rank_bytes'] / 1e6:.0f} | "
                         f"{d['adamw_bytes'] / 1e6:.0f} | {d['overhead_pct']:.1f} | {bf['overhead_pct']:.1f} | "
                         f"{r['overhead_pct']:.1f} | {ds['overhead_pct']:.1f} |")
            why = []
            if d["optimizer_s"] > r["optimizer_s"]:
                why.append(f"slower than replicated ({d['overhead_pct']:.1f}% vs {r['overhead_pct']:.1f}%)")
            if d["optimizer_s"] > ds["optimizer_s"]:
                why.append(f"slower than DeepSpeed's Muon ({d['overhead_pct']:.1f}% vs {ds['overhead_pct']:.1f}%)")
            if d["fwd_bwd_s"] >= 1 and d["overhead_pct"] >= 5:
                why.append(f"{d['overhead_pct']:.1f}% ≥ 5% of a {d['fwd_bwd_s']:.2f} s forward+backward"
                           f" (bf16 exchange: {bf['overhead_pct']:.1f}%)")
            if why:
                misses.append(f"- {key}, {n} GPUs: " + "; ".join(why))
        lines.append("")
        lines += zero_table(key, by, zero_misses)
    lines += ["## Rows that miss the bar under ZeRO-1/2 (teonspeed ZeRO-1/2 ≤ DeepSpeed Muon ZeRO-1/2, ≤ replicated, "
              "< 5% where fwd+bwd ≥ 1 s)", ""]
    lines += zero_misses or ["None."]
    lines += ["", "## Rows that miss the bar under ZeRO-0 / DDP (owner-compute ≤ replicated, ≤ DeepSpeed's Muon, "
              "< 5% where fwd+bwd ≥ 1 s)", ""]
    lines += misses or ["None."]
    lines += ["", "Why: under ZeRO-0 / DDP every rank must receive its shard of every update it did not compute: "
              "one TP shard of the model per step (the MB/rank column; half of what AdamW's all-reduce of the "
              "gradients already moves, but on top of it). Only computing every matrix everywhere (replicated) "
              "avoids it, so past the point where that shard's transfer over InfiniBand costs more than the "
              "whole Newton–Schulz work, replicated wins; DeepSpeed's Muon runs under ZeRO-1/2, where the "
              "update's distribution is the parameter all-gather ZeRO pays for AdamW too, and it adds only the "
              "cut matrices. Owner-compute reaches that bar only in the same layout (ZeRO-1/2 or Megatron's "
              "distributed optimizer: compute where the partition lives), not by a better collective in ZeRO-0: "
              "the *teonspeed ZeRO-1/2* tables above.", ""]
    if calib:
        lines += ["## CPU calibration (bench/results/scaling_cpu.json)", "",
                  f"Effective NS rate of one CPU rank ≈ {calib['cpu_ns_flops_per_s'] / 1e9:.2f} GFLOP/s (fp32, "
                  "whole step counted as NS: a lower bound); gloo loopback ≈ "
                  + (f"{calib['gloo_bytes_per_s'] / 1e6:.0f} MB/s" if calib.get("gloo_bytes_per_s") else "not fitted")
                  + f" from {calib['n_runs']} distributed runs. {calib['note']}. These numbers only check the "
                  "model's structure; the GPU predictions use the constants above.", ""]
    lines += ["*FLOPs max/mean*: LPT load balance of the dense groups at that work-group size (above 1.1 there are "
              "fewer groups than ranks, or a few large ones). *MB/rank*: the busiest rank's larger direction.", ""]
    (out_dir / "costmodel.md").write_text("\n".join(lines) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for color, (key, by_mode) in zip(colors, pred.items()):
        for mode, style in (("distributed", "-"), ("replicated", "--"), ("deepspeed", ":"), ("zero", "-.")):
            rows = by_mode[mode]
            if not rows:
                continue
            ax.plot([r["gpus"] for r in rows], [r["overhead_pct"] for r in rows], style, marker="o", ms=3,
                    color=color, label=f"{key} {mode}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("GPUs (H100)")
    ax.set_ylabel("optimizer step / (forward+backward), %")
    ax.set_title(f"Predicted {optimizer.upper()} step overhead, {a.global_batch_tokens / 2**20:.0f}M tokens/step")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    fig.savefig(out_dir / "costmodel.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizer", default="teon", choices=["teon", "muon"])
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    for f in dataclasses.fields(Assumptions):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = p.parse_args(argv)
    a = Assumptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Assumptions)})
    pred = predict(a, args.optimizer)
    scaling = RESULTS_DIR / "scaling_cpu.json"
    calib = calibrate_cpu(json.loads(scaling.read_text())) if scaling.exists() else {}
    write_outputs(pred, a, args.optimizer, calib, args.out_dir)
    print((args.out_dir / "costmodel.md").read_text())


if __name__ == "__main__":
    main()
