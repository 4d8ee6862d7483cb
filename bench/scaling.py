"""Scaling of the distributed optimizer step on CPU/gloo: per-rank Newton–Schulz FLOPs, bytes moved and
step time of teonspeed.TEON / Muon at 1, 2, 4 and 8 ranks, TP, DP and TP×DP layouts, each parallel_mode
named: "distributed" (owner-compute), "replicated", "auto" (the default: per group, as the default
ClusterProfile predicts cheaper) and "auto-mixed" (auto with a `cluster` override, MIXED_CLUSTER, on which
this tiny model gets a mixed plan); and "megatron-distopt": the same model in megatron-core DDP with
Megatron's distributed optimizer (use_distributed_optimizer=True, ZeRO-1-like bucket partitions) through
teonspeed.megatron.get_megatron_optimizer.

    .venv/bin/python bench/scaling.py                          # every layout below (a few minutes on 2 cores)
    .venv/bin/python bench/scaling.py --layouts 1x1,2x1,1x2 --optimizers teon --modes distributed
    .venv/bin/python bench/scaling.py --max-ranks 4            # skip the 8-rank layouts
    .venv/bin/python bench/scaling.py --modes megatron-distopt  # only the distributed-optimizer rows (~1 min)

A layout "TxD" is tensor-parallel size T times data-parallel size D (T·D ranks, forked with
tests/support/harness.py run_ranks, gloo on loopback). Every rank builds a megatron-core GPT
(hidden 128, 8 layers, 8 heads, 4 query groups, ffn 352, gated; the tests' tiny_gpt at a larger size)
for its TP position, so the shard layout is Megatron's own; gradients are deterministic functions of the
global parameter name (identical on every DP replica, like averaged gradients). Each rank runs
`--warmup` steps and then `--steps` timed steps (barrier, then wall time of opt.step(); median).
Under megatron-distopt the gradients are written into DDP's gradient buffer and the plan is the
distributed optimizer's (`zero_plans`, `zero_expected_bytes()`); see distopt_worker.

Per rank it records `opt.comm_stats` (NS FLOPs computed on the rank, bytes sent and received by the
optimizer's collectives, counted as the collectives' payloads), the plan's prediction
(`expected_bytes`), and the rank's own shard bytes of the orthogonalized matrices (fp32). A single
process has no comm_stats: its FLOPs are the plan's total.

Results are merged into bench/results/scaling_cpu.{json,md} (keyed by optimizer, mode, layout), so the
script can be run in several short pieces.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "tests"))  # megatron_models (the tests' tiny megatron-core GPT)

MODEL = dict(num_layers=8, hidden=128, heads=8, groups=4, ffn=352)
LAYOUTS = ["1x1", "2x1", "1x2", "4x1", "1x4", "2x2", "2x4", "4x2", "1x8"]  # "TxD"; TP=8 needs 8 query groups
GOAL_FLOPS, GOAL_BYTES = 1.10, 2.0


# A cluster on which auto mixes the two ways on this tiny model: a 1 TFLOP/s device on 2 GB/s links with
# 1 µs collectives. Newton–Schulz FLOPs grow as m²n and bytes as mn, so under plain data parallelism the
# narrow groups (GQA's 64-row k/v) stay replicated and the rest go to owners (at T = 1; with TP every group
# goes to an owner). With the default (H100) profile the tiny groups cost microseconds of compute against
# 15 µs per collective, and auto replicates every group in every layout.
MIXED_CLUSTER: Dict[str, float] = dict(
    peak_flops=1e12, ns_efficiency=1.0, nvlink_bw=2e9, latency_intra=1e-6, latency_per_peer=1e-9
)

# mode name -> optimizer options; every mode names its parallel_mode (the package's default is "auto").
# These are ZeRO-0 / Megatron DDP rows; DeepSpeed's ZeRO-1/2 (the flat path) is measured by
# bench/zero_side_by_side.py, Megatron's distributed optimizer by DISTOPT_MODES below.
MODE_OPTIONS: Dict[str, Dict[str, Any]] = {
    "distributed": dict(parallel_mode="distributed"),
    "replicated": dict(parallel_mode="replicated"),
    "auto": dict(parallel_mode="auto"),
    "auto-mixed": dict(parallel_mode="auto", cluster=MIXED_CLUSTER),
}
# Megatron-core DDP with use_distributed_optimizer=True (ZeRO-1-like: each DP rank steps its partition of
# every DDP bucket) through teonspeed.megatron.get_megatron_optimizer; clip_grad 1.0 is Megatron-LM's default.
# The balancer moves a job off the busiest rank only where the Newton–Schulz time saved exceeds the travel
# time; on H100 constants (the default) or MIXED_CLUSTER this tiny model's jobs take microseconds, and at
# 1x8 TEON keeps an uneven FLOP split (1.14) that costs less than moving. CPU_CLUSTER, a 10 GFLOP/s device
# (about one core of this machine) on MIXED_CLUSTER's links, makes the moves pay.
CPU_CLUSTER: Dict[str, float] = dict(MIXED_CLUSTER, peak_flops=1e10)
DISTOPT_MODES: Dict[str, Dict[str, Any]] = {
    "megatron-distopt": dict(clip_grad=1.0),
    "megatron-distopt-cpu": dict(clip_grad=1.0, cluster=CPU_CLUSTER),
}


def predicted_bytes(runner, groups, options: Dict[str, Any], itemsize: int):
    """(sent, received) of this rank from bench/costmodel.py's per_rank_bytes (the GPU model's own count),
    and the model's own per-group choice (True: owner-compute); under "auto" the model decides with its own
    auto_choice on its own groups and the same ClusterProfile, not with the runner's answer."""
    sys.path.insert(0, str(ROOT / "bench"))
    import costmodel as cm
    from teonspeed.parallel.cost import cluster_profile

    topo = runner.topologies["dense"]
    tp, dp = topo.tp_size, topo.work_size // topo.tp_size
    as_model = [
        cm.Group(
            g.stacked_shape,
            sum(m.shape[0] * m.shape[1] for m in g.members),
            any(runner.placement(m, topo).dim is not None for m in g.members),
        )
        for g in groups
    ]
    mode = options["parallel_mode"]
    if mode == "auto":
        assumptions = cm.Assumptions(
            cluster=cluster_profile(options.get("cluster")),
            comm_itemsize=itemsize,
            ns_steps=runner.ns_steps,
            overlap_waves=runner.waves,
        )
        owned = cm.auto_choice(
            as_model, tp, dp, tp, assumptions
        )  # megatron: global rank = tp_rank + T·dp_rank
    else:
        owned = [mode == "distributed"] * len(groups)
    rc = cm.per_rank_bytes(as_model, tp, dp, runner.ns_steps, itemsize, "auto", owned)
    tp_rank, replica = topo.my_position
    q = tp_rank + tp * replica
    return int(rc.sent[q]), int(rc.received[q]), owned


def worker(
    rank: int,
    world_size: int,
    tp: int,
    optimizer: str,
    mode: str,
    warmup: int,
    steps: int,
    num_layers: int = MODEL["num_layers"],
    comm_dtype: str = "auto",
) -> Dict[str, Any]:
    import torch
    import megatron_models as mm
    import teonspeed
    from megatron.core import parallel_state as ps
    from teonspeed.parallel.owners import ns_flops
    from teonspeed.parallel.shard_spec import megatron_shard_specs
    from support.synthetic import local_tensor

    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    config = mm.tiny_config(
        num_layers=num_layers,
        hidden=MODEL["hidden"],
        heads=MODEL["heads"],
        groups=MODEL["groups"],
        ffn=MODEL["ffn"],
        tp=tp,
    )
    model = mm.tiny_gpt(config)
    specs = megatron_shard_specs(model)
    tp_rank = ps.get_tensor_model_parallel_rank()

    def local_of(name, p, salt):
        return local_tensor(name, p, specs[name], tp_rank, tp, salt)

    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(local_of(name, p, 0))
            p.grad = local_of(name, p, 1)
    cls = {"teon": teonspeed.TEON, "muon": teonspeed.Muon}[optimizer]
    opt = cls(model, lr=0.02, adamw_lr=1e-3, comm_dtype=comm_dtype, **MODE_OPTIONS[mode])
    groups = opt.grouping.groups
    ns_steps = opt.config.ns_steps
    total_flops = sum(ns_flops(g.stacked_shape, ns_steps) for g in groups)
    full_bytes = sum(4 * m.shape[0] * m.shape[1] for g in groups for m in g.members)
    runner = opt.runner
    if hasattr(runner, "shard_numel"):
        topo = runner.topologies["dense"]
        shard_bytes = sum(4 * runner.shard_numel(m, topo) for g in groups for m in g.members)
        expected = runner.expected_bytes(groups)
        *predicted, model_owned = predicted_bytes(
            runner, groups, MODE_OPTIONS[mode], {"bf16": 2}.get(comm_dtype, 4)
        )
        owner_computed = runner.owner_computed(groups, topo)
    else:
        shard_bytes, expected, predicted = full_bytes, (0, 0), (0, 0)
        owner_computed = model_owned = [False] * len(groups)
    times, cpu_times = timed_steps(opt.step, warmup, steps)
    stats = opt.comm_stats
    owned = None
    if stats is not None and any(owner_computed):
        owners = runner.owners([g for g, o in zip(groups, owner_computed) if o], runner.topologies["dense"])
        owned = sum(1 for o in owners if o == runner.topologies["dense"].work_rank)
    return dict(
        rank=rank,
        tp_rank=tp_rank,
        dp_rank=ps.get_data_parallel_rank(),
        flops=stats.flops if stats is not None else total_flops,
        sent=stats.sent if stats is not None else 0,
        received=stats.received if stats is not None else 0,
        expected_sent=expected[0],
        expected_received=expected[1],
        predicted_sent=predicted[0],
        predicted_received=predicted[1],
        adamw_bytes=stats.adamw_bytes if stats is not None else 0,
        shard_bytes=shard_bytes,
        full_bytes=full_bytes,
        total_flops=total_flops,
        groups=len(groups),
        owned_groups=owned,
        owner_computed=sum(owner_computed),
        model_choice_equal=list(owner_computed) == list(model_owned),
        step_s=statistics.median(times),
        step_s_all=times,
        cpu_s=statistics.median(cpu_times),
    )


def timed_steps(step, warmup: int, steps: int, prepare=lambda: None):
    """Wall and CPU seconds of each timed call of `step` (after `warmup` untimed ones; `prepare` and a
    barrier before each, untimed)."""
    import torch.distributed as dist

    times, cpu_times = [], []
    for i in range(warmup + steps):
        prepare()
        if dist.get_world_size() > 1:
            dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if i >= warmup:
            times.append(dt)
            cpu_times.append(dc)
    return times, cpu_times


def model_zero_bytes(inner, groups, tp: int, dp: int, ns_steps: int):
    """bench/costmodel.py's ZeRO-1/2 count applied to this rank's DDP buckets: per set of buckets planned
    together (those of one topology), the model's own plan (costmodel.zero_plan: work rank d·T + t, every
    matrix TP-sharded when T > 1, default ClusterProfile) over the buckets' layout as Megatron built it
    (their offsets, local shapes and partition sizes: Megatron pads and orders its buffer itself, which the
    model's zero_layout of DeepSpeed's flat group does not reproduce), counted pair by pair by
    costmodel.zero_rank_bytes. (sent, received) of this rank, and whether every job's owner equals the
    runner's."""
    sys.path.insert(0, str(ROOT / "bench"))
    import costmodel as cm
    from teonspeed.parallel.cost import cluster_profile

    sent = received = 0
    same_owners = True
    runner = inner.runner  # the partition runner: each set of buckets planned together, and its FlatStep
    for keys, flat_step in runner.steps.items():
        parts = [runner.partitions[k] for k in keys]
        names = {n for part in parts for n in part.names()}
        layout = cm.ZeroLayout(
            [g for g in groups if g.members[0].name in names],
            {e.name: e.offset for part in parts for e in part.entries},
            {e.name: tuple(e.shape) for part in parts for e in part.entries},
            sum(part.partition_size for part in parts),
            bucket_of={e.name: b for b, part in enumerate(parts) for e in part.entries},
            partition_sizes=tuple(part.partition_size for part in parts),
        )
        plan = cm.zero_plan(layout, tp, dp, ns_steps, cluster_profile(inner.config.cluster))
        counted = cm.zero_rank_bytes(plan, 4, gpus_per_node=8)
        sent, received = sent + counted.sent[flat_step.me], received + counted.received[flat_step.me]
        same_owners &= [j.owner for j in plan.jobs] == [j.owner for j in flat_step.plan.jobs]
    return sent, received, same_owners


def distopt_worker(
    rank: int,
    world_size: int,
    tp: int,
    optimizer: str,
    mode: str,
    warmup: int,
    steps: int,
    num_layers: int = MODEL["num_layers"],
    comm_dtype: str = "auto",
) -> Dict[str, Any]:
    """The same model in megatron-core DDP with the distributed optimizer (fp32), stepped by the
    MegatronOptimizer of teonspeed.megatron.get_megatron_optimizer. The gradients are written into DDP's
    gradient buffer (identical on every DP replica, so the reduce-scatter DDP would run is skipped); the
    timed step includes DDP's parameter all-gather, which the optimizer starts."""
    import torch
    import torch.distributed as dist
    import megatron_models as mm
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from teonspeed.megatron import TeonOptimizerConfig, get_megatron_optimizer
    from teonspeed.parallel.owners import ns_flops
    from teonspeed.parallel.shard_spec import megatron_shard_specs
    from support.synthetic import local_tensor

    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    config = mm.tiny_config(
        num_layers=num_layers,
        hidden=MODEL["hidden"],
        heads=MODEL["heads"],
        groups=MODEL["groups"],
        ffn=MODEL["ffn"],
        tp=tp,
    )
    model = mm.tiny_gpt(config)
    specs = megatron_shard_specs(model)
    tp_rank, dp_rank = ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank()
    named = list(model.named_parameters())
    with torch.no_grad():
        for name, p in named:
            p.copy_(local_tensor(name, p, specs[name], tp_rank, tp, 0))
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True), model
    )
    grads = {name: local_tensor(name, p, specs[name], tp_rank, tp, 1) for name, p in named}

    def write_grads():  # again before every step: the clip scales the reduced gradients in place
        for name, p in named:
            p.main_grad.copy_(grads[name])

    opt = get_megatron_optimizer(
        TeonOptimizerConfig(
            optimizer=optimizer, lr=0.02, adamw_lr=1e-3, use_distributed_optimizer=True, **DISTOPT_MODES[mode]
        ),
        [ddp],
    )  # fp32 exchange: the Megatron builder has no comm_dtype
    assert type(opt).__name__ == "TeonDistributedOptimizer"
    inner = opt.optimizer
    runner, groups = inner.runner.base, inner.grouping.groups  # the runner the partition runner wraps
    topo = runner.topologies["dense"]
    assert topo.work_rank == tp_rank + tp * dp_rank  # Megatron's order, which the cost model assumes
    ns_steps = inner.config.ns_steps
    plans = inner.zero_plans
    expected = inner.zero_expected_bytes()
    model_sent, model_received, same_owners = model_zero_bytes(inner, groups, tp, world_size // tp, ns_steps)
    # The exchange's payloads as the wire sees them: the isend/irecv tensors of every batch_isend_irecv
    # (teonspeed's flat exchange; DDP's all-gather and the step check use other collectives), per step.
    wire, wire_per_step, batch_isend_irecv = [0, 0], [], dist.batch_isend_irecv

    def counted(ops):
        for op in ops:
            wire[op.op is not dist.isend] += op.tensor.numel() * op.tensor.element_size()
        return batch_isend_irecv(ops)

    def step():
        wire[:] = [0, 0]
        opt.step()
        wire_per_step.append(tuple(wire))

    dist.batch_isend_irecv = counted
    try:
        times, cpu_times = timed_steps(step, warmup, steps, prepare=write_grads)
    finally:
        dist.batch_isend_irecv = batch_isend_irecv
    stats = inner.comm_stats

    def load_balance(loads_of):
        loads = [sum(loads_of(plan)[r] for plan in plans) for r in range(world_size)]
        return max(loads) / (sum(loads) / len(loads))

    owned = sum(len(j.groups) for plan in plans for j in plan.jobs if j.owner == topo.work_rank)
    return dict(
        rank=rank,
        tp_rank=tp_rank,
        dp_rank=dp_rank,
        flops=stats.flops,
        sent=stats.sent,
        received=stats.received,
        expected_sent=expected[0],
        expected_received=expected[1],
        predicted_sent=model_sent,
        predicted_received=model_received,
        # what AdamW moves for these matrices under the distributed optimizer (comm_stats): DDP's
        # reduce-scatter of the fp32 gradients and all-gather of the fp32 parameters, (D-1)/D of the
        # shard each, per direction, the all-reduce's 2·(D-1)/D of the ZeRO-0 rows (runner.adamw_bytes)
        adamw_bytes=stats.adamw_bytes,
        adamw_equals_zero0=stats.adamw_bytes == runner.adamw_bytes(groups),
        shard_bytes=sum(4 * runner.shard_numel(m, topo) for g in groups for m in g.members),
        full_bytes=sum(4 * m.shape[0] * m.shape[1] for g in groups for m in g.members),
        total_flops=sum(ns_flops(g.stacked_shape, ns_steps) for g in groups),
        groups=len(groups),
        owned_groups=owned,
        owner_computed=len(groups),
        model_choice_equal=same_owners,
        wire_equals_plan=all(w == tuple(expected) for w in wire_per_step),
        buckets=len(plans),
        jobs=sum(len(p.jobs) for p in plans),
        cut_jobs=sum(j.cut for p in plans for j in p.jobs),
        moved_jobs=sum(len(p.moved) for p in plans),
        plan_flops=sum(p.loads[topo.work_rank] for p in plans),
        flops_max_over_mean_before=load_balance(lambda p: p.placed_loads),
        flops_max_over_mean_after=load_balance(lambda p: p.loads),
        step_s=statistics.median(times),
        step_s_all=times,
        cpu_s=statistics.median(cpu_times),
    )


def summarize(
    ranks: List[Dict[str, Any]],
    optimizer: str,
    mode: str,
    tp: int,
    dp: int,
    num_layers: int = MODEL["num_layers"],
    comm_dtype: str = "auto",
) -> Dict[str, Any]:
    flops = [r["flops"] for r in ranks]
    mean = sum(flops) / len(flops)
    total = ranks[0]["total_flops"]
    shard = max(r["shard_bytes"] for r in ranks)
    sent = max(r["sent"] for r in ranks)
    received = max(r["received"] for r in ranks)
    return dict(
        optimizer=optimizer,
        mode=mode,
        comm_dtype=comm_dtype,
        layout=f"{tp}x{dp}",
        tp=tp,
        dp=dp,
        world=tp * dp,
        num_layers=num_layers,
        groups=ranks[0]["groups"],
        owned_groups=[r["owned_groups"] for r in ranks],
        owner_computed_groups=ranks[0]["owner_computed"],
        choice_equals_model=all(
            r["model_choice_equal"] and r["owner_computed"] == ranks[0]["owner_computed"] for r in ranks
        ),
        total_flops=total,
        flops_per_rank=flops,
        flops_max_over_mean=max(flops) / mean if mean else None,
        flops_max_over_ideal=max(flops) / (total / (tp * dp)),
        shard_bytes=shard,
        full_matrix_bytes=ranks[0]["full_bytes"],
        sent_per_rank=[r["sent"] for r in ranks],
        received_per_rank=[r["received"] for r in ranks],
        max_sent_over_shard=sent / shard,
        max_received_over_shard=received / shard,
        max_sent_plus_received_over_shard=max(r["sent"] + r["received"] for r in ranks) / shard,
        counter_equals_plan=all(
            (r["sent"], r["received"]) == (r["expected_sent"], r["expected_received"]) for r in ranks
        )
        if tp * dp > 1
        else None,
        counter_equals_costmodel=all(
            (r["sent"], r["received"]) == (r["predicted_sent"], r["predicted_received"])
            and r["model_choice_equal"]
            for r in ranks
        )
        if tp * dp > 1
        else None,
        adamw_bytes_per_rank=[r["adamw_bytes"] for r in ranks],
        **(
            {}
            if "jobs" not in ranks[0]
            else dict(  # the distributed optimizer's plan, the same on every rank
                buckets=ranks[0]["buckets"],
                jobs=ranks[0]["jobs"],
                cut_jobs=ranks[0]["cut_jobs"],
                local_jobs=ranks[0]["jobs"] - ranks[0]["cut_jobs"],
                moved_jobs=ranks[0]["moved_jobs"],
                plan_flops_max_over_mean_before=ranks[0]["flops_max_over_mean_before"],
                plan_flops_max_over_mean_after=ranks[0]["flops_max_over_mean_after"],
                flops_equal_plan=all(r["flops"] == r["plan_flops"] for r in ranks),
                wire_equals_plan=all(r["wire_equals_plan"] for r in ranks),
                adamw_equals_zero0=all(r["adamw_equals_zero0"] for r in ranks),
            )
        ),
        step_ms_median_per_rank=[1e3 * r["step_s"] for r in ranks],
        step_ms_max_rank=1e3 * max(r["step_s"] for r in ranks),
        cpu_ms_max_rank=1e3 * max(r["cpu_s"] for r in ranks),
    )


def machine() -> Dict[str, Any]:
    import torch
    from gpu_report import cpu_model  # bench/: one description of the machine

    cpu = cpu_model()
    try:
        git = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        git = "?"
    return dict(
        cpu=cpu,
        cpus=os.cpu_count(),
        torch=torch.__version__,
        python=platform.python_version(),
        platform=platform.platform(),
        git=git,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        load_average=[round(x, 2) for x in os.getloadavg()],
        note="shared 2-core machine used by several engineers at once; "
        "up to 8 single-threaded rank processes share 2 cores, so step times measure "
        "oversubscribed CPU + loopback gloo, not scaling of a real cluster",
    )


def write_md(data: Dict[str, Any], path: Path) -> None:
    m = data["machine"]
    lines = [
        "# Distributed optimizer step: scaling on CPU/gloo",
        "",
        f"{m['cpu']}, {m['cpus']} CPUs; torch {m['torch']}, Python {m['python']}; {m['date']}; "
        f"git {m['git']}; load average at the end: {m['load_average']}.",
        "",
        f"**Note:** {m['note']}. FLOPs and bytes are exact counters and do not depend on the load.",
        "",
        f"Model: megatron-core GPT, hidden {MODEL['hidden']}, {MODEL['num_layers']} "
        f"layers, {MODEL['heads']} heads, "
        f"{MODEL['groups']} query groups, ffn {MODEL['ffn']} (gated); fp32. Layout TxD = "
        "tensor-parallel T × data-parallel D. "
        "*FLOPs max/mean*: load balance of the per-rank Newton–Schulz FLOPs; *max/ideal*: the busiest "
        "rank against "
        "total/ranks. *shard*: the rank's own fp32 bytes of the orthogonalized matrices (= full "
        "matrices when T = 1). "
        "*sent/shard*, *recv/shard*: the busiest rank's bytes per step over its shard. *plan*: the "
        "counter equals "
        "`expected_bytes` on every rank; *model*: it equals bench/costmodel.py's per_rank_bytes (the "
        "GPU model's "
        "count) on every rank, and under auto the model's own choice (costmodel.auto_choice) equals "
        "the runner's. "
        "*owner-computed*: groups an owner computes (the rest every rank); mode *auto* uses the default "
        "ClusterProfile (H100), *auto-mixed* the `cluster` override "
        f"{json.dumps(MIXED_CLUSTER)}. *AdamW/shard*: what AdamW's data-parallel all-reduce of the "
        "same gradients moves "
        "per rank and direction, over the shard. *step ms*: median wall time of the timed steps, "
        "slowest rank (oversubscribed: "
        "unreliable); *CPU ms*: median CPU time of the step (process_time, includes gloo's polling), "
        "busiest rank.",
        "",
        "| optimizer | mode | exchange | layout | layers | ranks | groups (owner-computed) | "
        "FLOPs/rank max (M) "
        "| FLOPs max/mean | max/ideal | shard KiB | sent/shard | recv/shard | AdamW/shard | plan | "
        "model | step ms | CPU ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    zero0 = [r for r in data["runs"].values() if r["mode"] not in DISTOPT_MODES]
    for r in sorted(
        zero0,
        key=lambda r: (
            -r.get("num_layers", 8),
            r["optimizer"],
            r["world"],
            r["tp"],
            r["mode"],
            r.get("comm_dtype", "auto"),
        ),
    ):
        lines.append(
            f"| {r['optimizer']} | {r['mode']} | {r.get('comm_dtype', 'auto')} | {r['layout']} | "
            f"{r.get('num_layers', MODEL['num_layers'])} | "
            f"{r['world']} | {r['groups']} ({_owner_computed(r)}) | "
            f"{max(r['flops_per_rank']) / 1e6:.0f} | {r['flops_max_over_mean']:.2f} "
            f"| {r['flops_max_over_ideal']:.2f} | "
            f"{r['shard_bytes'] / 1024:.0f} | {r['max_sent_over_shard']:.2f} "
            f"| {r['max_received_over_shard']:.2f} | "
            f"{max(r.get('adamw_bytes_per_rank') or [0]) / r['shard_bytes']:.2f} | "
            f"{_yes(r['counter_equals_plan'])} | {_yes(r.get('counter_equals_costmodel'))} | "
            f"{r['step_ms_max_rank']:.0f} | {r.get('cpu_ms_max_rank', float('nan')):.0f} |"
        )
    lines += distopt_table([r for r in data["runs"].values() if r["mode"] in DISTOPT_MODES])
    lines += [
        "",
        "## Goals (from the issue): FLOPs/rank within 10% of total/ranks; bytes/rank ≤ 2× the rank's shard",
        "",
    ]
    lines += data.get("verdict", [])
    path.write_text("\n".join(lines) + "\n")


def distopt_table(runs: List[Dict[str, Any]]) -> List[str]:
    if not runs:
        return []
    lines = [
        "",
        "## Megatron's distributed optimizer (ZeRO-1-like)",
        "",
        "The same model in megatron-core DDP with "
        "`DistributedDataParallelConfig(use_distributed_optimizer=True)`, "
        "fp32, stepped by `teonspeed.megatron.get_megatron_optimizer` (`use_distributed_optimizer=True`, "
        "clip_grad=1.0; mode *megatron-distopt-cpu* plans with the `cluster` override "
        f"{json.dumps(CPU_CLUSTER)}, a device as slow as one core here, on which moving a job off the "
        "busiest rank pays): each DP rank steps its "
        "partition of every DDP bucket; a matrix inside one partition is orthogonalized there "
        "(TP-gathered), a "
        "matrix cut by a partition boundary goes to one owner. *jobs local/cut*: the plan's jobs (a "
        "TEON stack or "
        "matrix computed together) inside one partition / cut by a boundary; *NS FLOPs max/mean*: over "
        "the ranks, "
        "as placed → after balancing (the plan's loads; the measured per-rank FLOPs equal them: *FLOPs "
        "= plan*). "
        "*plan*: `opt.comm_stats` bytes equal `zero_expected_bytes()` on every rank; *wire*: so do, on every "
        "rank and step (warm-up included), the payloads of the isend/irecv operations the step hands to "
        "`torch.distributed.batch_isend_irecv` (wrapped); *model*: they equal "
        "bench/costmodel.py's ZeRO-1/2 count (`zero_plan` + `zero_rank_bytes`) applied to each DDP "
        "bucket's own "
        "layout (Megatron's offsets and partition size), and the model's job owners equal the runner's. "
        "*AdamW/shard*: `opt.comm_stats.adamw_bytes`, DDP's reduce-scatter of the gradients plus "
        "all-gather of "
        "the parameters for the same matrices (2·(D−1)/D of the shard per direction, what AdamW pays "
        "with the distributed optimizer; equal to the ZeRO-0 rows' all-reduce count in every run: "
        f"{_yes(all(r.get('adamw_equals_zero0') for r in runs))}). "
        "*step ms* includes DDP's parameter all-gather, which the optimizer's step starts (the gradients are "
        "written into DDP's buffer; its reduce-scatter is not run).",
        "",
        "| optimizer | mode | layout | ranks | groups | buckets | jobs local/cut | NS FLOPs max/mean "
        "(as placed → balanced) "
        "| FLOPs max/ideal | FLOPs = plan | shard KiB | sent/shard | recv/shard | AdamW/shard | plan | "
        "wire | model | step ms | CPU ms |",
        "|" + "---|" * 19,
    ]
    for r in sorted(runs, key=lambda r: (r["optimizer"], r["world"], r["tp"], r["mode"])):
        lines.append(
            f"| {r['optimizer']} | {r['mode']} | {r['layout']} | {r['world']} | {r['groups']} "
            f"| {r['buckets']} | "
            f"{r['local_jobs']}/{r['cut_jobs']} | {r['plan_flops_max_over_mean_before']:.2f} → "
            f"{r['plan_flops_max_over_mean_after']:.2f} | {r['flops_max_over_ideal']:.2f} "
            f"| {_yes(r['flops_equal_plan'])} | "
            f"{r['shard_bytes'] / 1024:.0f} | {r['max_sent_over_shard']:.2f} "
            f"| {r['max_received_over_shard']:.2f} | "
            f"{max(r['adamw_bytes_per_rank']) / r['shard_bytes']:.2f} | {_yes(r['counter_equals_plan'])} | "
            f"{_yes(r.get('wire_equals_plan'))} | {_yes(r['counter_equals_costmodel'])} "
            f"| {r['step_ms_max_rank']:.0f} | {r['cpu_ms_max_rank']:.0f} |"
        )
    return lines


def _owner_computed(r: Dict[str, Any]):
    if "owner_computed_groups" in r:
        return r["owner_computed_groups"]
    return r["groups"] if r["mode"] == "distributed" else 0


def _yes(flag) -> str:
    return "-" if flag is None else ("yes" if flag else "NO")


def verdict(runs: Dict[str, Dict[str, Any]]) -> List[str]:
    out = []
    dist_runs = [r for r in runs.values() if r["mode"] == "distributed" and r["world"] > 1]
    rep_runs = [r for r in runs.values() if r["mode"] == "replicated" and r["world"] > 1]
    ok_f = [r for r in dist_runs if r["flops_max_over_ideal"] <= GOAL_FLOPS]
    bad_f = [r for r in dist_runs if r["flops_max_over_ideal"] > GOAL_FLOPS]
    ok_b = [r for r in dist_runs if max(r["max_sent_over_shard"], r["max_received_over_shard"]) <= GOAL_BYTES]
    out.append(
        "- distributed, FLOPs goal (busiest rank ≤ 1.10 × total/ranks): met "
        f"in {len(ok_f)}/{len(dist_runs)} runs"
        + (
            ": not met in "
            + ", ".join(
                f"{r['optimizer']} {r['layout']} ({r['flops_max_over_ideal']:.2f}, "
                f"{r['groups']} groups on {r['world']} ranks)"
                for r in bad_f
            )
            if bad_f
            else ""
        )
        + "."
    )
    out.append(
        f"- distributed, bytes goal per direction (sent and received each ≤ 2 × shard on every rank): met in "
        f"{len(ok_b)}/{len(dist_runs)} runs. Sent+received together reaches up to "
        f"{max((r['max_sent_plus_received_over_shard'] for r in dist_runs), default=0):.2f} × shard."
    )
    checked = [r for r in runs.values() if r.get("counter_equals_costmodel") is not None]
    out.append(
        f"- measured == predicted: the byte counters equal the plan's expected_bytes in "
        f"{sum(bool(r['counter_equals_plan']) for r in checked)}/{len(checked)} runs and "
        "bench/costmodel.py's count (per_rank_bytes; zero_rank_bytes for megatron-distopt) in "
        f"{sum(bool(r['counter_equals_costmodel']) for r in checked)}/{len(checked)} runs."
    )
    distopt = [r for r in runs.values() if r["mode"] in DISTOPT_MODES]
    if distopt:
        most_over_adamw = max(
            (
                max(r["sent_per_rank"] + r["received_per_rank"]) / max(r["adamw_bytes_per_rank"])
                for r in distopt
                if r["dp"] > 1
            ),
            default=0,
        )
        out.append(
            f"- megatron-distopt (Megatron's distributed optimizer): counters == plan in "
            f"{sum(bool(r['counter_equals_plan']) for r in distopt)}/{len(distopt)} runs, isend/irecv "
            "payloads "
            f"== plan in {sum(bool(r.get('wire_equals_plan')) for r in distopt)}/{len(distopt)}, == "
            "the cost model's "
            "ZeRO-1/2 count on the buckets' layout "
            f"in {sum(bool(r['counter_equals_costmodel']) for r in distopt)}"
            f"/{len(distopt)}; cut jobs per run: "
            + ", ".join(
                f"{r['optimizer']} {r['layout']} {r['cut_jobs']}/{r['jobs']}"
                for r in sorted(distopt, key=lambda r: (r["optimizer"], r["world"], r["tp"]))
                if r["mode"] == "megatron-distopt"
            )
            + "; NS FLOPs max/mean as placed → balanced where they differ: "
            + (
                ", ".join(
                    f"{r['optimizer']} {r['mode']} {r['layout']} "
                    f"{r['plan_flops_max_over_mean_before']:.2f} → "
                    f"{r['plan_flops_max_over_mean_after']:.2f}"
                    for r in sorted(distopt, key=lambda r: (r["optimizer"], r["world"], r["tp"], r["mode"]))
                    if r["moved_jobs"]
                )
                or "none"
            )
            + "; bytes per direction "
            f"over AdamW's (reduce-scatter + all-gather; D > 1) at most "
            f"{most_over_adamw:.2f}."
        )
    auto_runs = [r for r in runs.values() if r["mode"].startswith("auto") and r["world"] > 1]
    for mode in sorted({r["mode"] for r in auto_runs}):
        rows = sorted(
            (r for r in auto_runs if r["mode"] == mode), key=lambda r: (r["optimizer"], r["world"], r["tp"])
        )
        profile = "default ClusterProfile" if mode == "auto" else "cluster=" + json.dumps(MIXED_CLUSTER)
        mixed = sum(0 < _owner_computed(r) < r["groups"] for r in rows)
        out.append(
            f"- {mode} ({profile}): owner-computed groups per run: "
            + ", ".join(f"{r['optimizer']} {r['layout']} {_owner_computed(r)}/{r['groups']}" for r in rows)
            + f"; mixed (some of each) in {mixed}/{len(rows)} runs; "
            f"the runner's choice equals costmodel.auto_choice's in "
            f"{sum(bool(r.get('choice_equals_model')) for r in rows)}/{len(rows)}."
        )
    if rep_runs:
        out.append(
            "- replicated: every rank computes every group (FLOPs max/ideal = ranks: "
            + ", ".join(f"{r['optimizer']} {r['layout']} {r['flops_max_over_ideal']:.1f}" for r in rep_runs)
            + "); it moves (T−1) × shard each way (all-gather over TP) and nothing over DP."
        )
    return out


def save(data: Dict[str, Any], out_dir: Path) -> None:
    data["model"] = MODEL
    data["machine"] = machine()
    data["verdict"] = verdict(data["runs"])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "scaling_cpu.json").write_text(json.dumps(data, indent=1) + "\n")
    write_md(data, out_dir / "scaling_cpu.md")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="comma list of TxD")
    p.add_argument("--optimizers", default="teon,muon")
    modes = list(MODE_OPTIONS) + list(DISTOPT_MODES)
    p.add_argument("--modes", default=",".join(modes), help="comma list of " + ", ".join(modes))
    p.add_argument("--max-ranks", type=int, default=8)
    p.add_argument("--comm-dtypes", default="auto", help="comma list of comm_dtype values (auto, fp32, bf16)")
    p.add_argument(
        "--layers",
        type=int,
        default=MODEL["num_layers"],
        help="decoder layers (fewer: fewer groups per rank, to show the LPT imbalance)",
    )
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--fresh", action="store_true", help="do not merge with an existing scaling_cpu.json")
    args = p.parse_args(argv)

    import warnings

    warnings.filterwarnings("ignore")  # megatron-core's deprecation warnings, once per rank
    import torch

    torch.set_num_threads(1)  # before any tensor op: the ranks are forked
    import megatron_models  # noqa: F401  (import once in the parent; the children inherit it)
    import teonspeed  # noqa: F401
    from support.harness import run_ranks

    out_json = args.out_dir / "scaling_cpu.json"
    data = {"runs": {}}
    if out_json.exists() and not args.fresh:
        data = json.loads(out_json.read_text())
    for optimizer in args.optimizers.split(","):
        for layout in args.layouts.split(","):
            tp, dp = (int(x) for x in layout.split("x"))
            if tp * dp > args.max_ranks:
                continue
            for mode, comm_dtype in [
                (m, c) for m in args.modes.split(",") for c in args.comm_dtypes.split(",")
            ]:
                if tp * dp == 1 and (mode != "distributed" or comm_dtype != "auto"):
                    continue  # one process: no parallel mode, no exchange
                if mode in DISTOPT_MODES and comm_dtype != "auto":
                    continue
                t0 = time.time()
                ranks = run_ranks(
                    distopt_worker if mode in DISTOPT_MODES else worker,
                    tp * dp,
                    tp,
                    optimizer,
                    mode,
                    args.warmup,
                    args.steps,
                    args.layers,
                    comm_dtype,
                    timeout=args.timeout,
                )
                row = summarize(ranks, optimizer, mode, tp, dp, args.layers, comm_dtype)
                suffix = ("" if args.layers == MODEL["num_layers"] else f"/L{args.layers}") + (
                    "" if comm_dtype == "auto" else f"/{comm_dtype}"
                )
                data["runs"][f"{optimizer}/{mode}/{layout}{suffix}"] = row
                print(
                    f"{optimizer:5s} {mode:11s} {layout:4s} flops "
                    f"max/ideal {row['flops_max_over_ideal']:.2f} "
                    f"max/mean {row['flops_max_over_mean']:.2f} sent/shard {row['max_sent_over_shard']:.2f} "
                    f"recv/shard {row['max_received_over_shard']:.2f} plan={row['counter_equals_plan']} "
                    f"model={row['counter_equals_costmodel']} "
                    f"step {row['step_ms_max_rank']:.0f} ms cpu {row['cpu_ms_max_rank']:.0f} ms "
                    f"({time.time() - t0:.1f} s)",
                    flush=True,
                )
                save(data, args.out_dir)  # after every run, so an interrupted sweep keeps what it measured
    save(data, args.out_dir)
    print("\n".join(data["verdict"]))
    print(f"wrote {out_json} and scaling_cpu.md")


if __name__ == "__main__":
    main()
