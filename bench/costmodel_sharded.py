"""Cost-model rows for sharded parameters (issue 21): the optimizer step under DeepSpeed ZeRO-3, PyTorch
FSDP2, HSDP and FSDP2 × TP, per rank, for teonspeed and the peers that run Muon in the same layout.

    .venv/bin/python bench/costmodel_sharded.py      # writes bench/results/costmodel_sharded.{json,md}

A prediction, not a measurement. The constants are those of bench/costmodel.py's `Assumptions`: the hardware
ones are teonspeed.parallel.cost.ClusterProfile (H100 SXM datasheet: 989 TFLOP/s bf16 at 45% for
Newton–Schulz, NVLink 450 GB/s and InfiniBand 50 GB/s per GPU and direction, 15 / 40 µs per collective
inside / across nodes + 0.5 µs per peer), forward+backward = 6 · active params · 4 Mi tokens / (GPUs · peak
· 40% MFU), fp32 exchanged elements. No strategy's communication is overlapped with its Newton–Schulz work.

Who computes what, per strategy (W: the ranks a parameter is split over; a *job* is one Muon matrix or one
TEON stack of q/k/v over `teon_k` layers, teonspeed.plan's groups):

  teonspeed:    each job to one owner, owners by LPT over the jobs' Newton–Schulz FLOPs
                (teonspeed.parallel.owners.assign_owners); every other holder sends its piece of the job to
                the owner (one batched point-to-point round), the owner orthogonalizes it whole and sends each
                holder its slice back (a second round). Bytes: exactly those pieces, rank by rank.
  DeepSpeed:    DeepSpeed 0.19.8's ZeRO-3 Muon (runtime/zero/stage3.py, _apply_muon_to_accumulated_grads and
                _muon_update_sub_group; `"reduce_scatter": false` is required, else it raises "Muon and reduce
                scatter cannot be used together"): the gradients are all-reduced in backward instead of
                reduce-scattered (+ (W−1)/W of them over AdamW's); at the step, per bucket of parameters
                (the Muon group sorted by shape, largest first, as MuonWithAuxAdam does; reduce_bucket_size
                5e8 elements, within sub-groups of sub_group_size 1e9 local elements):
                all-gather the gradients and the momentum, then in rounds of W parameters rank r
                orthogonalizes the round's r-th parameter and the updates and momenta are all-gathered (a
                round of unequal shapes, or fewer than W parameters, is zero-padded to W × its largest).
  dion:         microsoft/dion's Muon (megabatch design): per shape, the N matrices are padded with zero
                matrices to a multiple of W; one all-to-all gives each rank N/W whole matrices (zero-padded
                dim-0 shards), Newton–Schulz, one all-to-all back. FSDP2 / HSDP only (a 1-D shard mesh: HSDP
                passes the shard sub-mesh; replicas compute the same); no TP for Muon, no TEON stacks.

Layouts: ZeRO-3 and FSDP2 shard every parameter over all GPUs (ZeRO-3: flat chunks of ceil(n/W) elements;
FSDP2: dim-0 chunks of ceil(rows/W) rows); HSDP shards over the 8 GPUs of a node and replicates across nodes:
teonspeed owns each job once over all GPUs, takes each piece from the holder nearest the owner (its own
replica's, but for ties) and sends each holder of every replica its slice (the implementation's flat plan:
the owner sends R × the job); *hierarchical*: slices back to the owner's replica only, then per shard index a
ring over the replicas passes each replica's slices on (the implementation's relay plan, R−1 point-to-point
rounds; the planner takes it where its constants predict the busiest rank finishes sooner); dion works in the
shard group and its replicas compute the same matrices (*replica-local*: teonspeed planned that way too, for
reference); FSDP2 × TP: TP 8 inside a node (q/k/v/gate/up split on dim 0, o/down on dim 1), FSDP2 over the
nodes on dim 0 of each TP shard; teonspeed's jobs are owned over all TP × DP ranks and orthogonalized whole.
TP and PP are 1 elsewhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import teonspeed  # noqa: E402
from costmodel import GPUS, RESULTS_DIR, Assumptions, ModelSpec, local_shape, stage_parameters  # noqa: E402
from teonspeed.parallel.owners import assign_owners, ns_flops  # noqa: E402

# The papers' LLaMA sizes (TEON / HTMuon: 350M and 1B, HTMuon's shapes) and the two sizes ZeRO-3 / FSDP2
# exist for; one pipeline stage, no TP unless the layout says so.
MODELS: Dict[str, ModelSpec] = {
    "llama-350m": ModelSpec("LLaMA-350M (paper shapes)", 1024, 24, 16, 16, 64, 2736, 32000),
    "llama-1b": ModelSpec("LLaMA-1B (paper shapes)", 2048, 24, 32, 32, 64, 5461, 32000),
    "llama-7b": ModelSpec("LLaMA-7B (2-7B shapes)", 4096, 32, 32, 32, 128, 11008, 32000),
    "llama-70b": ModelSpec("LLaMA-70B (3-70B shapes)", 8192, 80, 64, 8, 128, 28672, 128256),
}
LAYOUTS = ("zero3", "fsdp2", "hsdp", "fsdp2_tp")
LAYOUT_NAMES = {
    "zero3": "DeepSpeed ZeRO-3",
    "fsdp2": "FSDP2",
    "hsdp": "HSDP (shard 8 × replicate)",
    "fsdp2_tp": "FSDP2 × TP 8",
}
PEER = {"zero3": "DeepSpeed", "fsdp2": "dion", "hsdp": "dion", "fsdp2_tp": None}
NODE = 8  # HSDP shard group and FSDP2 × TP's TP size: one node
REDUCE_BUCKET_SIZE = 500_000_000  # DeepSpeed 0.19.8 zero config defaults
SUB_GROUP_SIZE = 1_000_000_000
H100_GB = 80
STATE_BYTES_PER_PARAM = 12  # bf16 weight + bf16 grad + fp32 master + fp32 momentum, sharded


@dataclass
class Cost:
    """One strategy's optimizer step on the busiest rank."""

    flops_max: float
    flops_mean: float
    bytes_max: float  # larger direction, busiest rank, the step's own collectives
    compute: float
    comm: float
    latency: float
    extra_backward_bytes: float = 0.0  # bytes the strategy adds to backward (DeepSpeed's all-reduce)
    buffer_bytes: float = 0.0  # largest transient buffer the strategy's collectives allocate

    @property
    def total(self) -> float:
        return self.compute + self.comm + self.latency


def _chunks(n: int, w: int) -> np.ndarray:
    """Elements of each of `w` ranks in torch.chunk / ZeRO-3's ceil-sized split of `n` (trailing ranks may
    hold fewer, or none)."""
    c = -(-n // w)
    return np.clip(n - c * np.arange(w), 0, c)


def holder_pieces(name: str, shape: Tuple[int, int], layout: str, gpus: int, shard: int = NODE) -> np.ndarray:
    """Elements of the matrix `name` each rank holds, by global rank (FSDP2 × TP: rank d·TP + t; HSDP:
    replica r's shard s at r·shard + s, the same chunk on every replica)."""
    rows, cols = shape
    if layout == "zero3":
        return _chunks(rows * cols, gpus)
    if layout == "fsdp2":
        return _chunks(rows, gpus) * cols
    if layout == "hsdp":
        return np.tile(_chunks(rows, shard) * cols, gpus // shard)
    tp, dp = NODE, gpus // NODE  # fsdp2_tp
    lr, lc = local_shape(name, shape, tp)
    return np.repeat(_chunks(lr, dp) * lc, tp)


def work_size(layout: str, gpus: int) -> int:
    """Ranks a parameter is split over (the peers' work group: dion passes HSDP's shard sub-mesh)."""
    return NODE if layout == "hsdp" else gpus


def _nearest_holders(owner: int, gpus: int, shard: int) -> np.ndarray:
    """Per shard index, the rank an HSDP owner reads that chunk from, as the planner chooses
    (zero_partition's `reads`): itself if it holds it, else the nearest rank holding it, ties to the lower."""
    holders = np.arange(0, gpus, shard)[:, None] + np.arange(shard)[None, :]  # [replica, shard index]
    key = (holders != owner) * (2 * gpus) ** 2 + np.abs(holders - owner) * 2 * gpus + holders
    return holders[np.argmin(key, axis=0), np.arange(shard)]


def teonspeed_cost(
    jobs: Sequence[Tuple[Sequence[Tuple[str, Tuple[int, int]]], Tuple[int, int]]],
    layout: str,
    gpus: int,
    a: Assumptions,
    shard: int = NODE,
    hierarchical: bool = False,
) -> Cost:
    """Pieces to one owner per job (LPT over FLOPs, over every GPU), Newton–Schulz there, slices back: two
    point-to-point rounds; per rank its bytes over NVLink (same node) and InfiniBand, one latency per round
    (inter-node if any peer is on another node) plus one per peer. HSDP (`shard` ranks per replica): the
    gradient is already reduced over the replicas, so the owner takes each piece from its own replica's
    shard group (the nearest holder of each chunk, as the planner reads) and sends the update's slice to
    the holders of every replica (as the implementation does);
    `hierarchical`: only to its own replica's, then a third round, per shard index an all-gather over the
    replicas (ring, R - 1 rounds), brings every replica the slices the others got."""
    flops = [ns_flops(stacked, a.ns_steps) for _, stacked in jobs]
    owners = assign_owners(flops, gpus)
    node = np.arange(gpus) // a.gpus_per_node
    item = a.comm_itemsize
    # per round (a: pieces to owners, b: slices back), per rank: bytes out and in, by link; peers
    out = {(ph, k): np.zeros(gpus) for ph in "ab" for k in ("intra", "inter")}
    into = {(ph, k): np.zeros(gpus) for ph in "ab" for k in ("intra", "inter")}
    peers = {ph: np.zeros((gpus, gpus), dtype=bool) for ph in "ab"}
    load = np.zeros(gpus)
    replica = np.arange(gpus) // shard
    own_replica = np.zeros((gpus // shard, shard))  # HSDP: per replica, per shard index, elements it owns
    for (members, _), cost, o in zip(jobs, flops, owners):
        held = sum(holder_pieces(n, s, layout, gpus, shard) for n, s in members).astype(float)
        same = node == node[o]
        sources, targets = held.copy(), held.copy()
        if layout == "hsdp":  # each piece from one replica; the slices to every replica's holders
            sources = np.zeros(gpus)
            sources[_nearest_holders(o, gpus, shard)] = held[:shard]
            if hierarchical:  # or to the holders it read, which pass them on in round c
                own_replica[replica[_nearest_holders(o, gpus, shard)], np.arange(shard)] += held[:shard]
                targets = sources.copy()
        for ph, pieces in (("a", sources), ("b", targets)):
            pieces[o] = 0.0
            sender, receiver = (out, into) if ph == "a" else (into, out)
            sender[(ph, "intra")] += np.where(same, pieces, 0.0)
            sender[(ph, "inter")] += np.where(same, 0.0, pieces)
            receiver[(ph, "intra")][o] += pieces[same].sum()
            receiver[(ph, "inter")][o] += pieces[~same].sum()
            peers[ph][o] |= pieces > 0
            peers[ph][:, o] |= pieces > 0
        load[o] += cost
    # a rank can be holder and owner at once: its sends and receives of one round overlap
    comm = sum(
        np.maximum(out[(ph, k)], into[(ph, k)]) * item / bw
        for ph in "ab"
        for k, bw in (("intra", a.nvlink_bw), ("inter", a.ib_bw))
    )
    latency = np.zeros(gpus)
    for ph in "ab":
        n_peers = peers[ph].sum(axis=1)
        off_node = (peers[ph] & (node[None, :] != node[:, None])).any(axis=1)
        per_round = np.where(off_node, a.latency_inter, a.latency_intra) + a.latency_per_peer * n_peers
        latency += np.where(n_peers > 0, per_round, 0.0)
    sent = sum(out.values())
    received = sum(into.values())
    if layout == "hsdp" and hierarchical and gpus > shard:
        # round c: per shard index, a ring all-gather over the replicas (ascending) of the slices each
        # replica got back: replica i receives every part but its own and passes on every part but its
        # successor's; R - 1 point-to-point rounds, each one latency and two peers (the implementation's
        # `ZeroPlan.relay_rounds`)
        replicas = gpus // shard
        total = own_replica.sum(axis=0)[None, :]
        other = (total - own_replica).reshape(-1)
        passed = (total - np.roll(own_replica, -1, axis=0)).reshape(-1)
        comm = comm + np.maximum(other, passed) * item / a.ib_bw
        latency = latency + (replicas - 1) * (a.latency_inter + 2 * a.latency_per_peer)
        sent, received = sent + passed, received + other
    rate = a.peak_flops * a.ns_efficiency
    total = load / rate + comm + latency
    q = int(np.argmax(total))
    moved = np.maximum(sent, received)  # the step's bytes per rank, larger direction
    return Cost(
        load.max(), load.mean(), float(moved.max() * item), load[q] / rate, float(comm[q]), float(latency[q])
    )


def _collective(a: Assumptions, w: int) -> Tuple[float, float]:
    """(bytes/s per GPU, fixed seconds) of one ring collective over `w` consecutive ranks."""
    nodes = -(-w // a.gpus_per_node)
    return a.cluster.bandwidth(nodes), a.cluster.collective_latency(w, nodes)


def deepspeed_cost(params: Sequence[Tuple[str, Tuple[int, int]]], gpus: int, a: Assumptions) -> Cost:
    """DeepSpeed 0.19.8's ZeRO-3 Muon (see the module docstring), rank by rank; ring all-gathers move
    (W−1) × the per-rank input per rank; a round's compute ends with its all-gathers, so the step's compute
    is the sum over rounds of the round's slowest rank."""
    w, item = gpus, a.comm_itemsize
    bw, fixed = _collective(a, w)
    # MuonWithAuxAdam.__init__ sorts a Muon group's parameters by x.size(), largest first (stable): the
    # order of the sub-groups, buckets and rounds (under zero.Init every size is [0] and model order stays)
    params = sorted(params, key=lambda p: tuple(p[1]), reverse=True)
    numels = [r * c for _, (r, c) in params]
    local = [-(-n // w) for n in numels]
    sub_groups, cur, size = [], [], 0  # _create_fp16_sub_groups: by partition_numel
    for i, n in enumerate(local):
        cur.append(i)
        size += n
        if size >= SUB_GROUP_SIZE or i == len(local) - 1:
            sub_groups.append(cur)
            cur, size = [], 0
    buckets = []  # _apply_muon_to_accumulated_grads: consecutive, ds_numel ≤ reduce_bucket_size
    for sg in sub_groups:
        start = 0
        while start < len(sg):
            end, total = start, 0
            while end < len(sg) and (end == start or total + numels[sg[end]] <= REDUCE_BUCKET_SIZE):
                total += numels[sg[end]]
                end += 1
            buckets.append(sg[start:end])
            start = end
    load = np.zeros(w)
    moved = compute = buffer = 0.0
    collectives = 0
    for b in buckets:
        moved += 2 * (w - 1) * sum(local[i] for i in b)  # gradients, then momentum, all-gathered
        collectives += 2
        for k in range(0, len(b), w):
            rnd = b[k : k + w]
            shapes = {params[i][1] for i in rnd}
            uniform = len(rnd) == w and len(shapes) == 1
            width = numels[rnd[0]] if uniform else max(numels[i] for i in rnd)
            moved += 2 * (w - 1) * width  # updates and momenta, all-gathered
            buffer = max(buffer, 2 * w * width * item)  # both all-gathers' outputs, W × width each
            collectives += 2
            f = [ns_flops(params[i][1], a.ns_steps) for i in rnd]
            load[: len(rnd)] += f
            compute += max(f)
    extra = (w - 1) / w * sum(numels) * item  # all-reduce instead of reduce-scatter, in backward
    rate = a.peak_flops * a.ns_efficiency
    comm = (moved * item + extra) / bw
    return Cost(
        load.max(), load.mean(), moved * item, compute / rate, comm, collectives * fixed, extra, buffer
    )


def dion_cost(params: Sequence[Tuple[str, Tuple[int, int]]], layout: str, gpus: int, a: Assumptions) -> Cost:
    """microsoft/dion's Muon on FSDP2 / HSDP's 1-D shard mesh (see the module docstring); per shape one
    all-to-all each way, each rank sending its zero-padded dim-0 shard of the matrices other ranks own."""
    w, item = work_size(layout, gpus), a.comm_itemsize
    bw, fixed = _collective(a, w)
    by_shape: Dict[Tuple[int, int], int] = {}
    for _, shape in params:
        by_shape[shape] = by_shape.get(shape, 0) + 1
    flops = moved = 0.0
    total_flops = sum(ns_flops(s, a.ns_steps) for _, s in params)
    for (rows, cols), n in by_shape.items():
        per_rank = -(-n // w)  # zero matrices pad N to a multiple of W
        flops += per_rank * ns_flops((rows, cols), a.ns_steps)
        moved += (w - 1) * per_rank * (-(-rows // w)) * cols  # to the other W−1 owners, each way
    rate = a.peak_flops * a.ns_efficiency
    comm = 2 * moved * item / bw
    return Cost(flops, total_flops / w, 2 * moved * item, flops / rate, comm, 2 * len(by_shape) * fixed)


def jobs_of(params: Sequence[Tuple[str, Tuple[int, int]]], optimizer: str, a: Assumptions):
    """teonspeed's jobs for these matrices (teonspeed.plan's groups): (members [(name, full shape)],
    stacked shape)."""
    named = [(n, torch.nn.Parameter(torch.empty(s, device="meta"))) for n, s in params]
    extra = {"teon_k": a.teon_k} if optimizer == "teon" else {}
    groups = teonspeed.plan(named, optimizer, **extra).groups
    return [([(m.name, tuple(m.shape)) for m in g.members], tuple(g.stacked_shape)) for g in groups]


def model_jobs(model: ModelSpec, optimizer: str, a: Assumptions):
    return jobs_of(stage_parameters(model), optimizer, a)


def adamw_bytes_per_rank(model: ModelSpec, layout: str, gpus: int, a: Assumptions) -> float:
    """What AdamW moves per rank per step for the same matrices in this layout (ring collectives): the
    gradients' reduce-scatter and the parameters' all-gather in forward and again in backward (ZeRO-3 /
    FSDP2's default reshard-after-forward); HSDP adds the all-reduce of the 1/S shard over the replicas.
    teonspeed.parallel.cost.sharded_adamw_bytes, the same function comm_stats uses."""
    from teonspeed.parallel.cost import sharded_adamw_bytes

    numel = sum(r * c for _, (r, c) in stage_parameters(model))
    item = a.comm_itemsize
    if layout == "hsdp":
        return sharded_adamw_bytes(numel, NODE, item, item, replicate_size=gpus // NODE)
    if layout == "fsdp2_tp":
        return sharded_adamw_bytes(numel // NODE, gpus // NODE, item, item)
    return sharded_adamw_bytes(numel, gpus, item, item)


def row(model: ModelSpec, layout: str, gpus: int, a: Assumptions) -> Optional[Dict]:
    if layout in ("hsdp", "fsdp2_tp") and gpus <= NODE:
        return None  # one node: HSDP is FSDP2, FSDP2 × TP is TP alone
    total, active = model.params()
    fwd_bwd = 6 * active * a.global_batch_tokens / (gpus * a.peak_flops * a.train_mfu)
    params = stage_parameters(model)
    shard = work_size(layout, gpus)
    local = sum(r * c for _, (r, c) in params) / shard
    elementwise = local * a.elementwise_bytes_per_param / a.hbm_bw  # momentum + update, every strategy
    out = dict(
        gpus=gpus,
        layout=layout,
        fwd_bwd_s=fwd_bwd,
        states_gb_per_gpu=total * STATE_BYTES_PER_PARAM / shard / 1e9,
        adamw_bytes=adamw_bytes_per_rank(model, layout, gpus, a),
        elementwise_s=elementwise,
    )
    strategies = {
        "teonspeed muon": teonspeed_cost(model_jobs(model, "muon", a), layout, gpus, a),
        "teonspeed teon": teonspeed_cost(model_jobs(model, "teon", a), layout, gpus, a),
    }
    if layout == "hsdp":  # owners inside each replica's shard group: FSDP2 on one node, per replica
        local = teonspeed_cost(model_jobs(model, "muon", a), "fsdp2", NODE, a)
        strategies["teonspeed muon replica-local"] = local
        tree = teonspeed_cost(model_jobs(model, "muon", a), layout, gpus, a, hierarchical=True)
        strategies["teonspeed muon hierarchical"] = tree
    if PEER[layout] == "DeepSpeed":
        strategies["DeepSpeed muon"] = deepspeed_cost(params, gpus, a)
    elif PEER[layout] == "dion":
        strategies["dion muon"] = dion_cost(params, layout, gpus, a)
    for key, c in strategies.items():
        step = c.total + elementwise
        out[key] = dict(dataclasses.asdict(c), step_s=step, pct=100 * step / fwd_bwd)
    return out


def predict(a: Assumptions, models: Sequence[str] = tuple(MODELS), gpus: Sequence[int] = GPUS) -> Dict:
    return {
        key: {lay: [r for n in gpus if (r := row(MODELS[key], lay, n, a)) is not None] for lay in LAYOUTS}
        for key in models
    }


def target_misses(pred: Dict) -> List[str]:
    """Rows where teonspeed's step is ≥ 5% of a forward+backward of ≥ 1 s (the issue's target)."""
    out = []
    for key, by_layout in pred.items():
        for lay, rows in by_layout.items():
            for r in rows:
                for opt in ("muon", "teon"):
                    s = r[f"teonspeed {opt}"]
                    if r["fwd_bwd_s"] >= 1 and s["pct"] >= 5:
                        fits = r["states_gb_per_gpu"] <= H100_GB
                        out.append(
                            f"- {key}, {LAYOUT_NAMES[lay]}, {r['gpus']} GPUs, {opt}: {s['pct']:.1f}% of a "
                            f"{r['fwd_bwd_s']:.2f} s forward+backward"
                            + (
                                ""
                                if fits
                                else f" (a layout that does not fit: {r['states_gb_per_gpu']:.0f} GB "
                                "of states per GPU)"
                            )
                        )
    return out


SUMMARY_GPUS = (8, 64, 256, 1024)


def summary_table(pred: Dict) -> List[str]:
    """The headline rows (docs/performance.md quotes them): % of forward+backward per layout and strategy,
    and the ZeRO-3 step's MB per rank next to DeepSpeed's and AdamW's."""
    lines = [
        "| model | GPUs | fwd+bwd s | ZeRO-3: teonspeed Muon % / TEON % / DeepSpeed Muon % | ZeRO-3 MB/rank: "
        "teonspeed Muon / DeepSpeed Muon / AdamW | FSDP2: teonspeed Muon % / dion % | HSDP: teonspeed "
        "Muon % / dion % | FSDP2 × TP 8: teonspeed Muon % / TEON % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, by_layout in pred.items():
        by = {lay: {r["gpus"]: r for r in rows} for lay, rows in by_layout.items()}
        for n in SUMMARY_GPUS:
            z = by["zero3"].get(n)
            if z is None:
                continue
            f, h, t = by["fsdp2"][n], by["hsdp"].get(n), by["fsdp2_tp"].get(n)
            ds = z["DeepSpeed muon"]

            def big(r):  # the layout's states alone exceed an H100
                return " ‡" if r["states_gb_per_gpu"] > H100_GB else ""

            oom = " §" if ds["buffer_bytes"] > H100_GB * 1e9 else ""
            zero3 = f"{z['teonspeed muon']['pct']:.2f} / {z['teonspeed teon']['pct']:.2f} / {ds['pct']:.1f}"
            mb = (
                f"{z['teonspeed muon']['bytes_max'] / 1e6:,.0f} / {ds['bytes_max'] / 1e6:,.0f} / "
                f"{z['adamw_bytes'] / 1e6:,.0f}"
            )
            fsdp = f"{f['teonspeed muon']['pct']:.2f} / {f['dion muon']['pct']:.2f}{big(f)}"
            hsdp = f"{h['teonspeed muon']['pct']:.2f} / {h['dion muon']['pct']:.2f}{big(h)}" if h else "—"
            tp = f"{t['teonspeed muon']['pct']:.2f} / {t['teonspeed teon']['pct']:.2f}{big(t)}" if t else "—"
            cells = [key, str(n), f"{z['fwd_bwd_s']:.2f}", zero3 + oom + big(z), mb, fsdp, hsdp, tp]
            lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def write_md(pred: Dict, a: Assumptions, path: Path) -> None:
    doc = __doc__.split("\n\n", 2)
    lines = [
        "# Predicted optimizer step with sharded parameters: ZeRO-3, FSDP2, HSDP, FSDP2 × TP",
        "",
        "Written by `bench/costmodel_sharded.py`. " + " ".join(doc[2].split("Who computes")[0].split()),
        "",
        "Who computes " + " ".join(doc[2].split("Who computes")[1].split("Layouts:")[0].split()),
        "",
        "Layouts: " + " ".join(doc[2].split("Layouts:")[1].split()),
        "",
        "Constants: "
        + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in a.as_dict().items())
        + f"; DeepSpeed reduce_bucket_size={REDUCE_BUCKET_SIZE:.0e}, sub_group_size={SUB_GROUP_SIZE:.0e} "
        "(its defaults). Newton–Schulz FLOPs per matrix: teonspeed.parallel.owners.ns_flops "
        '(steps · (4m²n + 2m³), m ≤ n) for every strategy (DeepSpeed\'s default ns_method "gram" does fewer '
        'FLOPs on rectangular matrices in fp16: a kernel choice, not a placement; "standard" is its '
        "other method).",
        "",
        "Columns: *MB/rank*: the optimizer step's own bytes per rank, larger direction, busiest rank "
        "(DeepSpeed: plus, in brackets, the extra bytes its required gradient all-reduce adds to backward "
        "over a reduce-scatter, whose time its % includes); *AdamW MB/rank*: what AdamW moves per rank "
        "per step for the same matrices "
        "in the same layout (gradient reduce-scatter, parameter all-gather in forward and backward), the "
        "yardstick every optimizer pays; *GFLOP/rank*: Newton–Schulz FLOPs of the busiest rank (max/mean "
        "in brackets: 1.00 is a perfect balance); *%*: optimizer step (compute + comm + latency + the "
        "element-wise part) over forward+backward; *states GB/GPU*: weights, gradients, master weights and "
        "momentum at 12 B/parameter, sharded (‡: over 80 GB, the layout does not fit an H100 even before "
        "activations); *§*: DeepSpeed's padded all-gather outputs (2 × W × the round's largest matrix) "
        "exceed 80 GB, so the step would run out of memory before it is slow.",
        "",
        "Target (issue 21): the optimizer step under 5% of forward+backward wherever forward+backward is "
        "≥ 1 s.",
        "",
        "## Summary (every row of every layout below)",
        "",
        *summary_table(pred),
    ]
    for key, by_layout in pred.items():
        m = MODELS[key]
        total, active = m.params()
        lines += [f"## {m.name}: {total / 1e9:.2f}B parameters", ""]
        for lay, rows in by_layout.items():
            if not rows:
                continue
            peer = PEER[lay]
            head = (
                "| GPUs | fwd+bwd s | states GB/GPU | AdamW MB/rank | teonspeed Muon: MB/rank | GFLOP/rank "
                "(max/mean) | step ms | % | teonspeed TEON: MB/rank | GFLOP/rank (max/mean) | step ms | % |"
            )
            sep = "|---" * 12 + "|"
            if peer:
                head += f" {peer} Muon: MB/rank | GFLOP/rank (max/mean) | step ms | % |"
                sep += "---|" * 4
            if lay == "hsdp":
                head += " teonspeed Muon, hierarchical: MB/rank | % | replica-local: % |"
                sep += "---|" * 3
            lines += [
                f"**{LAYOUT_NAMES[lay]}**" + ("" if peer else " (no peer runs Muon here)"),
                "",
                head,
                sep,
            ]
            for r in rows:
                gb = r["states_gb_per_gpu"]
                cells = [
                    f"{r['gpus']}",
                    f"{r['fwd_bwd_s']:.2f}",
                    f"{gb:.1f}" + (" ‡" if gb > H100_GB else ""),
                ]
                cells.append(f"{r['adamw_bytes'] / 1e6:.0f}")
                for k in ["teonspeed muon", "teonspeed teon"] + ([f"{peer} muon"] if peer else []):
                    s = r[k]
                    mb = f"{s['bytes_max'] / 1e6:.0f}"
                    if s["extra_backward_bytes"]:
                        mb += f" (+{s['extra_backward_bytes'] / 1e6:.0f})"
                    if s["buffer_bytes"] > H100_GB * 1e9:
                        mb += " §"
                    cells += [
                        mb,
                        f"{s['flops_max'] / 1e9:.0f} ({s['flops_max'] / s['flops_mean']:.2f})",
                        f"{1e3 * s['step_s']:.1f}",
                        f"{s['pct']:.2f}",
                    ]
                if lay == "hsdp":
                    tree, local = r["teonspeed muon hierarchical"], r["teonspeed muon replica-local"]
                    cells += [f"{tree['bytes_max'] / 1e6:.0f}", f"{tree['pct']:.2f}", f"{local['pct']:.2f}"]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    misses = target_misses(pred)
    lines += [
        "## Where the target holds",
        "",
        (
            "teonspeed's step is under 5% of forward+backward in every row above whose forward+backward "
            "is ≥ 1 s."
            if not misses
            else "teonspeed's step is under 5% of forward+backward in every row whose forward+backward is "
            "≥ 1 s, except:"
        ),
        "",
        *misses,
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(RESULTS_DIR / "costmodel_sharded"))
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args(argv)
    a = Assumptions()
    pred = predict(a, args.models.split(","))
    out = Path(args.out)
    data = dict(
        assumptions=a.as_dict(),
        deepspeed=dict(reduce_bucket_size=REDUCE_BUCKET_SIZE, sub_group_size=SUB_GROUP_SIZE),
        models={k: dict(dataclasses.asdict(MODELS[k]), total_params=MODELS[k].params()[0]) for k in pred},
        predictions=pred,
    )
    out.with_suffix(".json").write_text(json.dumps(data, indent=1, default=float) + "\n")
    write_md(pred, a, out.with_suffix(".md"))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
