"""Invariants of the optimizer-step cost model (bench/costmodel.py), and its byte count against the
implementation's own prediction (DistributedRunner.expected_bytes, which needs no process group)."""

import sys
from pathlib import Path

import pytest
import torch

import teonspeed
from teonspeed.config import default
from teonspeed.parallel.cost import ClusterProfile
from teonspeed.parallel.distributed import DistributedRunner
from teonspeed.parallel.topology import Topology

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import costmodel as cm  # noqa: E402

H, F, KV = 64, 96, 32
TINY = cm.ModelSpec("tiny", hidden=H, layers=4, heads=4, kv_heads=2, head_dim=16, ffn=F, vocab=100)


def _hf_named_params(layers=4):
    shapes = {
        "self_attn.q_proj": (H, H),
        "self_attn.k_proj": (KV, H),
        "self_attn.v_proj": (KV, H),
        "self_attn.o_proj": (H, H),
        "mlp.gate_proj": (F, H),
        "mlp.up_proj": (F, H),
        "mlp.down_proj": (H, F),
    }
    named = [("model.embed_tokens.weight", torch.zeros(100, H))]
    for b in range(layers):
        named += [(f"model.layers.{b}.{n}.weight", torch.zeros(s)) for n, s in shapes.items()]
    named.append(("lm_head.weight", torch.zeros(100, H)))
    return [(n, p.requires_grad_()) for n, p in named]


def _specs(named):
    """Megatron's split: q/k/v/gate/up column-parallel (dim 0), o/down row-parallel (dim 1)."""
    row = ("o_proj", "down_proj")
    return {n: teonspeed.ShardSpec(tp_partition_dim=1 if any(r in n for r in row) else 0) for n, _ in named}


def _runner(specs, tp, dp, rank, mode, profile=None):
    positions = [(q % tp, q // tp) for q in range(tp * dp)]
    topo = Topology(None, tp, rank % tp, None, tp * dp, rank, positions, tuple(range(tp * dp)))
    return DistributedRunner(
        {"dense": topo, "expert": topo},
        specs,
        mode,
        ns_steps=default("ns_steps"),
        profile=profile,
        waves=default("overlap_waves"),
    )


@pytest.mark.parametrize("tp,dp,peak_flops", [(1, 4, 2.8e12), (2, 2, 8.4e12), (4, 2, 8.4e12)])
def test_auto_choices_and_bytes_equal_the_runners(tp, dp, peak_flops):
    """parallel_mode="auto": the model asks the package's rule, so it picks the runner's groups and
    counts the runner's bytes; constants set so that k/v stay replicated where the layout allows a mix
    (with TP4 owners move fewer bytes than the TP gather, so everything goes to owners)."""
    named = _hf_named_params()
    specs = _specs(named)
    groups = teonspeed.plan(named, "teon").groups
    as_model = [
        cm.Group(g.stacked_shape, sum(m.shape[0] * m.shape[1] for m in g.members), True) for g in groups
    ]
    profile = ClusterProfile(
        peak_flops=peak_flops, ns_efficiency=1.0, nvlink_bw=1e10, latency_intra=1e-9, latency_per_peer=1e-12
    )
    owned = cm.auto_choice(as_model, tp, dp, tp, cm.Assumptions(cluster=profile))
    assert (0 < sum(owned) < len(owned)) == (tp < 4), owned
    rc = cm.per_rank_bytes(
        as_model, tp, dp, ns_steps=default("ns_steps"), itemsize=4, mode="auto", owned=owned
    )
    for q in range(tp * dp):
        runner = _runner(specs, tp, dp, q, "auto", profile)
        assert runner.owner_computed(groups, runner.topologies["dense"]) == owned
        assert runner.expected_bytes(groups) == (rc.sent[q], rc.received[q]), q


@pytest.mark.parametrize("optimizer", ["teon", "muon"])
def test_stage_groups_match_the_plan(optimizer):
    plan_groups = teonspeed.plan(_hf_named_params(), optimizer).groups
    model_groups = cm.stage_groups(TINY, optimizer, cm.Assumptions())
    assert sorted(g.stacked_shape for g in plan_groups) == sorted(g.stacked for g in model_groups)


@pytest.mark.parametrize("mode", ["distributed", "replicated"])
@pytest.mark.parametrize("tp,dp", [(2, 1), (1, 4), (2, 2), (4, 2)])
def test_per_rank_bytes_equal_expected_bytes_of_the_runner(tp, dp, mode):
    named = _hf_named_params()
    specs = _specs(named)
    groups = teonspeed.plan(named, "teon").groups
    as_model = [
        cm.Group(g.stacked_shape, sum(m.shape[0] * m.shape[1] for m in g.members), True) for g in groups
    ]
    rc = cm.per_rank_bytes(as_model, tp, dp, ns_steps=default("ns_steps"), itemsize=4, mode=mode)
    for q in range(tp * dp):
        assert _runner(specs, tp, dp, q, mode).expected_bytes(groups) == (rc.sent[q], rc.received[q]), q


@pytest.mark.parametrize("tp,dp", [(2, 2), (8, 4), (1, 16)])
def test_total_traffic_is_the_readme_count(tp, dp):
    """Summed over ranks (S: one TP shard of every matrix), whoever owns what: sent = phase A (T-1)·S +
    phase B's TP hand-off (T-1)·S + each replica's chunk once per TP position T·S; received = (T-1)·S +
    (W-1)·S (every rank gets its shard of every update it did not compute)."""
    groups = cm.stage_groups(cm.MODELS["llama-7b"], "teon", cm.Assumptions())
    groups = [cm.Group(g.stacked, g.elements, tp > 1) for g in groups]
    rc = cm.per_rank_bytes(groups, tp, dp, ns_steps=5, itemsize=4)
    shard = sum(g.elements // tp for g in groups) * 4
    w = tp * dp
    assert sum(rc.sent) == pytest.approx(shard * (2 * (tp - 1) + tp))
    assert sum(rc.received) == pytest.approx(shard * ((tp - 1) + (w - 1)))
    assert sum(rc.flops) == pytest.approx(sum(cm.ns_flops(g.stacked, 5) for g in groups))


@pytest.mark.parametrize(
    "key,tp,dp", [("llama-1b", 1, 1024), ("llama-1b", 1, 8), ("llama-7b", 2, 512), ("llama-70b", 8, 32)]
)
def test_bytes_per_rank_do_not_grow_with_the_ranks(key, tp, dp):
    """No rank sends W-1 copies of anything: every rank's bytes stay within one TP shard of the model
    (plus the T-1 shards of phase A / the TP hand-off), at any data-parallel size."""
    groups = cm.stage_groups(cm.MODELS[key], "teon", cm.Assumptions())
    groups = [cm.Group(g.stacked, g.elements, tp > 1) for g in groups]
    rc = cm.per_rank_bytes(groups, tp, dp, ns_steps=5, itemsize=4)
    shard = sum(g.elements // tp for g in groups) * 4
    largest = max(g.elements for g in groups) * 4
    bound = shard + 2 * (tp - 1) * largest * tp
    assert max(rc.received) <= shard * tp and max(rc.sent) <= bound


def test_deepspeed_strategy_computes_cut_matrices_on_every_holder():
    """DeepSpeed's Muon: 3 equal matrices over 2 partitions: the middle one is cut, so both ranks
    orthogonalize it (2 NS each); its full gradient comes with ZeRO's default all-reduce, which AdamW
    pays too (no byte added); one partition does all of them."""
    a = cm.Assumptions()
    groups = [cm.Group((64, 64), 64 * 64, False)] * 3
    f = cm.ns_flops((64, 64), a.ns_steps)
    two = cm.deepspeed_time(groups, 1, 2, 1, a)
    assert two["flops"] == pytest.approx(2 * f) and two["bytes"] == 0 and two["latency"] == 0
    one = cm.deepspeed_time(groups, 1, 1, 1, a)
    assert one["flops"] == pytest.approx(3 * f) and one["bytes"] == 0


def test_replicated_computes_at_least_as_much_as_distributed():
    a = cm.Assumptions()
    for key, model in cm.MODELS.items():
        for n in cm.GPUS:
            d = cm.step_cost(model, n, "teon", "distributed", a)
            r = cm.step_cost(model, n, "teon", "replicated", a)
            if d is None:
                assert r is None
                continue
            assert r["compute_s"] >= d["compute_s"] - 1e-12, (key, n)
            assert r["busiest_rank_flops"] >= d["busiest_rank_flops"], (key, n)


def test_distributed_compute_scales_as_one_over_ranks_while_groups_outnumber_ranks():
    """70B, TP=8, PP=4: 20 layers per stage, ~130 groups; the busiest rank's FLOPs halve with the ranks
    until the work group is no longer much smaller than the group count."""
    a = cm.Assumptions()
    model = cm.MODELS["llama-70b"]
    groups = cm.stage_groups(model, "teon", a)
    total = sum(cm.ns_flops(g.stacked, a.ns_steps) for g in groups)
    for n in (32, 64):
        d = cm.step_cost(model, n, "teon", "distributed", a)
        w = model.tp * (n // (model.tp * model.pp))
        assert d["busiest_rank_flops"] == pytest.approx(total / w, rel=0.05)
    # and it stops scaling once ranks outnumber groups: the busiest rank holds the largest group
    d = cm.step_cost(model, 1024, "teon", "distributed", a)
    assert d["busiest_rank_flops"] == pytest.approx(max(cm.ns_flops(g.stacked, a.ns_steps) for g in groups))


def test_replicated_compute_does_not_shrink_with_data_parallelism():
    a = cm.Assumptions()
    model = cm.MODELS["llama-7b"]
    times = [cm.step_cost(model, n, "teon", "replicated", a)["compute_s"] for n in (8, 64, 1024)]
    assert times[0] == pytest.approx(times[1]) == pytest.approx(times[2])


def test_parameter_counts_and_layouts():
    assert cm.MODELS["llama-7b"].params()[0] == pytest.approx(6.74e9, rel=0.02)
    assert cm.MODELS["llama-70b"].params()[0] == pytest.approx(70.6e9, rel=0.02)
    total, active = cm.MODELS["moe-64e"].params()
    assert active < total / 3
    assert (
        cm.step_cost(cm.MODELS["llama-70b"], 16, "teon", "distributed", cm.Assumptions()) is None
    )  # TP8×PP4


def test_overhead_is_step_time_over_forward_backward():
    a = cm.Assumptions()
    d = cm.step_cost(cm.MODELS["llama-1b"], 8, "teon", "distributed", a)
    assert d["overhead_pct"] == pytest.approx(100 * d["optimizer_s"] / d["fwd_bwd_s"])
    total, active = cm.MODELS["llama-1b"].params()
    assert d["fwd_bwd_s"] == pytest.approx(
        6 * active * a.global_batch_tokens / (8 * a.peak_flops * a.train_mfu)
    )


# -- teonspeed's ZeRO-1/2 step: the model's bytes are the implementation's plan's ----------------------
def _flat_partition_of(named, tp, dp, d):
    """What attach_zero_stage_1_2 hands the optimizer for a flat param group of `named` (TP-local shapes,
    in order, no alignment padding), as seen by data-parallel rank d."""
    from teonspeed.parallel.flat import FlatEntry, FlatPartition

    entries, offset = [], 0
    for n, p in named:
        shape = cm.local_shape(n, tuple(p.shape), tp)
        entries.append(FlatEntry(n, offset, shape))
        offset += shape[0] * shape[1]
    return FlatPartition(entries, -(-offset // dp), None, d, dp)


SLOW_NS = dict(
    peak_flops=1e6, ns_efficiency=1.0, gpus_per_node=2
)  # seconds of NS per matrix: balancing moves jobs


@pytest.mark.parametrize("optimizer", ["teon", "muon"])
@pytest.mark.parametrize(
    "tp,dp,hardware",
    [
        (1, 3, {}),
        (1, 7, {}),
        (2, 2, {}),
        (2, 3, {}),
        (4, 3, {}),
        (1, 3, SLOW_NS),
        (2, 3, SLOW_NS),
        (4, 3, SLOW_NS),
    ],
)
def test_zero_bytes_equal_the_flat_steps_expected_bytes(optimizer, tp, dp, hardware):
    """The cost model's ZeRO-1/2 bytes per rank (its layout, its pair-by-pair count of the two exchange
    rounds) == FlatStep.expected_bytes of the plan the optimizer builds for the same flat group, with the
    same hardware constants (on slow Newton–Schulz the planner moves jobs between partitions)."""
    from teonspeed.parallel.flat import FlatStep, plan_partition

    named = [(n, p) for n, p in _hf_named_params() if ".layers." in n]  # the hidden matrices, in order
    groups = teonspeed.plan(named, optimizer).groups
    work_rank = {(t, d): d * tp + t for t in range(tp) for d in range(dp)}
    a = cm.Assumptions(cluster=ClusterProfile(**hardware))
    model = cm.ModelSpec(
        "tiny", hidden=H, layers=4, heads=4, kv_heads=2, head_dim=16, ffn=F, vocab=100, tp=tp
    )
    zb = cm.zero_rank_bytes(
        cm.zero_plan(cm.zero_layout(model, optimizer, a, dp), tp, dp, a.ns_steps, a.cluster),
        4,
        a.gpus_per_node,
    )
    moved, jobs_moved = 0, 0
    for d in range(dp):
        partition = _flat_partition_of(named, tp, dp, d)
        plan = plan_partition(
            partition,
            groups,
            work_rank,
            tp,
            cost=lambda g: cm.ns_flops(g.stacked_shape, 5),
            tp_sharded=lambda m: tp > 1,
            cluster=a.cluster,
        )
        jobs_moved += len(plan.moved)
        for t in range(tp):
            q = work_rank[(t, d)]
            step = FlatStep(plan, partition.dp_rank, q, None)
            assert step.expected_bytes(4) == (zb.sent[q], zb.received[q]), (t, d)
            moved += zb.sent[q]
    assert moved > 0  # every layout here cuts something (or TP-gathers): the equality is not 0 == 0
    assert jobs_moved > 0 or not hardware  # on slow NS, balancing did move jobs: the equality covers them
    for q in range(tp * dp):  # the NVLink / InfiniBand split adds up to the total
        assert sum(zb.link[(ph, "sent", l)][q] for ph in "ab" for l in ("intra", "inter")) == zb.sent[q]


def test_same_update_deepspeed_strategy_computes_every_overlapping_job_whole_on_every_holder():
    """DeepSpeed's placement with teonspeed's update: 7B at 8 GPUs (TP2, 4 partitions, nothing cut): each
    TP rank of a partition computes all its jobs whole (twice teonspeed's busiest-rank work, which splits
    them over the 2 TP peers) and all-gathers the other TP shard of each; LLaMA-1B at 16 GPUs (24 TEON
    stacks cut): the cut stacks are computed by both holders, so the partitions' FLOPs add up to more than
    the model's."""
    a = cm.Assumptions()
    model = cm.MODELS["llama-7b"]
    plan = cm.zero_plan(cm.zero_layout(model, "teon", a, 4), 2, 4, a.ns_steps, a.cluster)
    same = cm.deepspeed_same_update_time(plan, a)
    assert same["flops"] == pytest.approx(max(plan.partition_flops()))
    assert same["flops"] == pytest.approx(2 * max(plan.loads), rel=0.02)
    local = sum(u.numel for j in plan.jobs if j.partitions == (0,) for u in j.units)
    assert same["bytes"] == pytest.approx(
        local * a.comm_itemsize, rel=0.05
    )  # (T-1) = 1 shard, ≈ one partition
    one_b = cm.zero_plan(cm.zero_layout(cm.MODELS["llama-1b"], "teon", a, 16), 1, 16, a.ns_steps)
    cut = [j for j in one_b.jobs if j.cut]
    assert len(cut) == 24 and cm.deepspeed_same_update_time(one_b, a)["bytes"] == 0
    assert cm.deepspeed_same_update_time(one_b, a)["flops"] > sum(one_b.loads) / 16


@pytest.mark.parametrize("key,gpus", [("llama-1b", 64), ("llama-7b", 256), ("llama-70b", 512)])
def test_zero_step_computes_every_group_once(key, gpus):
    """No rank repeats another's Newton–Schulz work: the ZeRO-1/2 plan's loads sum to the stage's NS
    FLOPs (the same groups as the ZeRO-0 model), and the busiest rank holds at least its share."""
    a = cm.Assumptions()
    model = cm.MODELS[key]
    dp = gpus // (model.tp * model.pp)
    plan = cm.zero_plan(cm.zero_layout(model, "teon", a, dp), model.tp, dp, a.ns_steps)
    total = sum(cm.ns_flops(g.stacked, a.ns_steps) for g in cm.stage_groups(model, "teon", a))
    assert sum(plan.loads) == pytest.approx(total)
    z = cm.step_cost(model, gpus, "teon", "zero", a)
    assert z["busiest_rank_flops"] >= total / (model.tp * dp) * (1 - 1e-9)


def test_zero_moves_nothing_when_partitions_fall_on_matrix_boundaries():
    """LLaMA-1B over 8 partitions: 2 layers each (TEON stacks q/k/v of 2 layers), so no job is cut and
    the step sends no byte; DeepSpeed's Muon, per matrix, cuts none either."""
    a = cm.Assumptions()
    z = cm.step_cost(cm.MODELS["llama-1b"], 8, "teon", "zero", a)
    assert z["cut_jobs"] == 0 and z["busiest_rank_bytes"] == 0 and z["comm_s"] == z["latency_s"] == 0
    assert cm.step_cost(cm.MODELS["llama-1b"], 8, "teon", "deepspeed", a)["busiest_rank_bytes"] == 0


def test_deepspeed_at_zero0_is_replicated_compute_on_the_tp_local_shard():
    """DeepSpeed's Muon at ZeRO stage 0: every rank orthogonalizes every matrix it holds, no exchange.
    Without TP that is Muon replicated; under TP each shard alone (fewer FLOPs, a different update)."""
    a = cm.Assumptions()
    ds, rep = (
        cm.step_cost(cm.MODELS["llama-1b"], 64, "muon", mode, a) for mode in ("deepspeed0", "replicated")
    )
    assert ds["compute_s"] == pytest.approx(rep["compute_s"]) and ds["comm_s"] == 0
    ds, rep = (
        cm.step_cost(cm.MODELS["llama-7b"], 64, "muon", mode, a) for mode in ("deepspeed0", "replicated")
    )
    assert ds["compute_s"] < 0.75 * rep["compute_s"] and ds["busiest_rank_bytes"] == 0


@pytest.mark.parametrize("gpus", [64, 512])
def test_zero_moe_partitions_the_experts_over_expert_dp(gpus):
    """MoE under ZeRO-1/2: one EP rank's experts are planned over expert-DP (gpus / EP ranks), the
    attention over DP; each group is computed once, and the busiest rank holds at least an expert-DP
    rank's share of the expert work (over the dense DP it would be EP times less)."""
    a, model = cm.Assumptions(), cm.MODELS["moe-64e"]
    dp, edp = gpus // (model.tp * model.pp), gpus // (model.ep * model.pp)
    experts = cm.zero_plan(cm.zero_layout(model, "teon", a, edp, expert=True), 1, edp, a.ns_steps, a.cluster)
    dense = cm.zero_plan(cm.zero_layout(model, "teon", a, dp), model.tp, dp, a.ns_steps, a.cluster)
    expert_flops = sum(
        cm.ns_flops(g.stacked, a.ns_steps) for g in cm.stage_groups(model, "teon", a, expert=True)
    )
    assert len(experts.loads) == edp and sum(experts.loads) == pytest.approx(expert_flops)
    z = cm.step_cost(model, gpus, "teon", "zero", a)
    assert z["jobs"] == len(dense.jobs) + len(experts.jobs)
    assert z["busiest_rank_flops"] >= expert_flops / edp * (1 - 1e-9)
