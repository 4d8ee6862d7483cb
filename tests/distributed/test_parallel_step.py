"""The parallel step equals the single-process step on the full model, for every topology.

Each rank builds a tiny megatron-core GPT for its (TP, PP, EP) position, so shard specs, layer offsets
and expert offsets come from Megatron itself. Weights and gradients are deterministic functions of the
*global* parameter name, cut into shards with Megatron's own rule, so the full model (one process) and
every sharded layout start from, and receive, exactly the same numbers.
"""

import pytest
import torch

import megatron_models as mm
import teonspeed
from teonspeed.parallel.shard_spec import assemble, megatron_shard_specs
from support import tolerance as tol
from support.harness import run_ranks
from support.synthetic import global_name, local_tensor

OPTIMIZERS = {"muon": teonspeed.Muon, "teon": teonspeed.TEON, "htmuon": teonspeed.HTMuon}
STEPS = 3


def train(
    rank,
    world_size,
    tp=1,
    pp=1,
    ep=1,
    optimizer="teon",
    moe=False,
    num_layers=4,
    mode="distributed",
    options=None,
):
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep
    )
    extra = dict(num_moe_experts=4, moe_router_topk=2, moe_token_dispatcher_type="allgather") if moe else {}
    config = mm.tiny_config(num_layers=num_layers, tp=tp, pp=pp, expert_model_parallel_size=ep, **extra)
    model = mm.tiny_gpt(
        config, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage()
    )
    specs = megatron_shard_specs(model)
    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    etp_rank, etp_size = ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()

    def local_of(name, p, salt):
        spec = specs[name]
        r, size = (etp_rank, etp_size) if spec.is_expert else (tp_rank, tp_size)
        return local_tensor(name, p, spec, r, size, salt)

    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(local_of(name, p, 0))
    opt = OPTIMIZERS[optimizer](
        model, lr=0.02, adamw_lr=1e-3, weight_decay=0.01, parallel_mode=mode, **(options or {})
    )
    # what rounding alone may move (a single process sees every stack): a bf16 exchange rounds the
    # directions an owner receives and the updates it sends back, u_bf16 each
    bf16 = tol.u(torch.bfloat16) if (options or {}).get("comm_dtype") == "bf16" else 0.0
    budget = tol.RoundingBudget(opt, eps_in=bf16, out_rounding=bf16)
    for step in range(1, STEPS + 1):
        for name, p in model.named_parameters():
            p.grad = local_of(name, p, step)
        opt.step()
    out = {}
    for name, p in model.named_parameters():
        spec = specs[name]
        out[global_name(name, spec)] = (
            p.detach().clone(),
            spec.tp_partition_dim,
            spec.tp_partition_stride,
            etp_rank if spec.is_expert else tp_rank,
            ps.get_data_parallel_rank(),
        )
    stats = opt.comm_stats
    moved = (stats.sent, stats.received, stats.flops, stats.adamw_bytes) if stats else None
    expected = opt.runner.expected_bytes(opt.grouping.groups) if stats else None
    return out, moved, expected, str(opt.plan), budget.weights(0.02)


def gather_full(results):
    """Global name -> full tensor, assembled from the TP shards of data-parallel replica 0, after
    checking every replica holds identical values."""
    shards = {}
    for params, *_ in results:
        for name, (t, dim, stride, tp_rank, dp_rank) in params.items():
            shards.setdefault(name, {}).setdefault(dp_rank, {})[tp_rank] = (t, dim, stride)
    full = {}
    for name, by_dp in shards.items():
        replicas = []
        for dp_rank in sorted(by_dp):
            by_tp = by_dp[dp_rank]
            dim, stride = by_tp[0][1], by_tp[0][2]
            replicas.append(
                assemble([by_tp[r][0] for r in sorted(by_tp)], dim, stride)
                if dim is not None
                else by_tp[0][0]
            )
        for other in replicas[1:]:
            assert torch.equal(other, replicas[0]), f"{name} differs across data-parallel replicas"
        full[name] = replicas[0]
    return full


def reference(optimizer, moe=False, num_layers=4, options=None):
    """The single process's full model, and the rounding budget of its steps (tol.RoundingBudget)."""
    results = run_ranks(
        train, 1, optimizer=optimizer, moe=moe, num_layers=num_layers, options=options, timeout=120
    )
    return gather_full(results), results[0][4]


def assert_same_model(got, ref):
    """Every parameter equal but for rounding: the layouts feed the same gradients (synthetic), and the
    AdamW parameters are stepped by the same elementwise operations, so only the orthogonalized
    matrices may differ, by what each side's iteration rounds (another batch composition or blocking
    on an owner): ‖Δ‖_F over all of them within the reference's rounding budget."""
    full, budget = ref
    assert set(got) == set(full)
    total = sum(float((got[name] - full[name]).double().norm()) ** 2 for name in full) ** 0.5
    assert total <= budget, f"‖Δ‖_F = {total:.2e} > {budget:.2e}: " + ", ".join(
        f"{name} {float((got[name] - full[name]).norm() / full[name].norm()):.1e}"
        for name in sorted(full)
        if not torch.equal(got[name], full[name])
    )


TOPOLOGIES = [
    pytest.param(dict(tp=2), 2, id="TP2"),
    pytest.param(dict(pp=2), 2, id="PP2"),
    pytest.param(dict(), 2, id="DP2"),
    pytest.param(dict(tp=2, pp=2), 4, id="TP2xPP2"),
    pytest.param(dict(tp=2), 4, id="TP2xDP2"),
]


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("layout,world_size", TOPOLOGIES)
def test_sharded_step_equals_single_process(layout, world_size, optimizer):
    got = gather_full(run_ranks(train, world_size, optimizer=optimizer, timeout=120, **layout))
    assert_same_model(got, reference(optimizer))


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_expert_parallel_step_equals_single_process(optimizer):
    got = gather_full(run_ranks(train, 2, ep=2, moe=True, optimizer=optimizer, timeout=120))
    ref = reference(optimizer, moe=True)
    assert any("local_experts.3." in n for n in ref[0])
    assert_same_model(got, ref)


def test_eight_ranks_tp2_pp2_dp2():
    got = gather_full(run_ranks(train, 8, tp=2, pp=2, optimizer="teon", timeout=180))
    assert_same_model(got, reference("teon"))


def test_distributed_equals_replicated():
    a = gather_full(run_ranks(train, 4, tp=2, optimizer="teon", timeout=120))
    replicated = run_ranks(train, 4, tp=2, optimizer="teon", mode="replicated", timeout=120)
    assert_same_model(a, (gather_full(replicated), replicated[0][4]))


def _assert_byte_totals(results, tp, dp, itemsize=4):
    """Summed over ranks, independent of who owns what (S: one TP shard of every member):
    sent  = phase A (T-1)·S + phase B (1) (T-1)·S + (2) each replica's chunk once per column, T·S;
    received = the same, but each column's chunks reach the D-1 other replicas: T·(D-1)·S.
    (Before: phase B sent every update to all W-1 other ranks: the owners' bytes grew with W.)"""
    plan_groups = teonspeed.plan(_full_named_params(), "teon").groups
    shard = sum(itemsize * m.shape[0] * m.shape[1] // tp for g in plan_groups for m in g.members)
    b2 = tp * shard if dp > 1 else 0
    assert sum(r[1][0] for r in results) == 2 * (tp - 1) * shard + b2
    assert sum(r[1][1] for r in results) == 2 * (tp - 1) * shard + b2 * (dp - 1)
    for r in results:  # each rank's counter equals what its own plan predicts
        assert (r[1][0], r[1][1]) == r[2]
        # and AdamW's DP all-reduce of the same gradients moves 2(D-1)/D of the local shard each way
        assert r[1][3] == 2 * (dp - 1) * (shard // itemsize * 4) // dp


def test_byte_counter_matches_the_analytical_count():
    _assert_byte_totals(run_ranks(train, 4, tp=2, optimizer="teon", timeout=120), tp=2, dp=2)


@pytest.mark.parametrize(
    "layout,dp", [pytest.param(dict(), 8, id="DP8"), pytest.param(dict(tp=2), 4, id="TP2xDP4")]
)
def test_eight_ranks_data_parallel_phase_b(layout, dp):
    """8 ranks: equality with one process, and phase B's bytes per rank do not grow with the ranks
    (each rank sends its replica's chunk once; no owner sends W-1 copies)."""
    results = run_ranks(train, 8, optimizer="teon", timeout=180, **layout)
    assert_same_model(gather_full(results), reference("teon"))
    _assert_byte_totals(results, tp=layout.get("tp", 1), dp=dp)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_bf16_exchange_equals_single_process_at_bf16_tolerance(optimizer):
    """comm_dtype=bf16 on TP2xDP2: within bf16 rounding of the fp32 single process, replicas bitwise
    identical (gather_full checks: owners write the same rounded values as everyone), half the bytes."""
    # the iteration in fp32 (whatever TEONSPEED_CPU_BF16 says), so that the exchange's bf16 shows
    fp32 = {"ns_dtype": "fp32"}
    results = run_ranks(
        train, 4, tp=2, optimizer=optimizer, options=dict(fp32, comm_dtype="bf16"), timeout=120
    )
    got = gather_full(results)
    full, fp32_budget = reference(optimizer, options=fp32)
    # the single process's budget with the bf16 exchange's roundings counted (it computes the same steps)
    bf16_budget = reference(optimizer, options=dict(fp32, comm_dtype="bf16"))[1]
    assert_same_model(got, (full, bf16_budget))
    with pytest.raises(AssertionError):  # the bf16 budget is needed: the exchange really is bf16
        assert_same_model(got, (full, fp32_budget))
    if optimizer == "teon":
        _assert_byte_totals(results, tp=2, dp=2, itemsize=2)


def test_comm_dtype_is_validated():
    with pytest.raises(ValueError, match="comm_dtype"):
        teonspeed.plan(_full_named_params(), "teon", comm_dtype="fp8")


def _full_named_params():
    """Names and full shapes of the tiny GPT's matrices (every matrix is TP-sharded in Megatron)."""
    heads, groups, hd, hidden, ffn = 4, 2, 8, 32, 48
    named = []
    for b in range(4):
        qkv = torch.zeros((heads + 2 * groups) * hd, hidden)
        setattr(qkv, teonspeed.fused.LAYOUT_ATTR, teonspeed.qkv_layout(heads, groups, hd))
        fc1 = torch.zeros(2 * ffn, hidden)
        setattr(fc1, teonspeed.fused.LAYOUT_ATTR, teonspeed.gated_mlp_layout())
        named += [
            (f"decoder.layers.{b}.self_attention.linear_qkv.weight", qkv),
            (f"decoder.layers.{b}.self_attention.linear_proj.weight", torch.zeros(hidden, hidden)),
            (f"decoder.layers.{b}.mlp.linear_fc1.weight", fc1),
            (f"decoder.layers.{b}.mlp.linear_fc2.weight", torch.zeros(hidden, ffn)),
        ]
    return [(n, p.requires_grad_()) for n, p in named]


def test_ns_flops_are_balanced_across_ranks():
    results = run_ranks(train, 4, tp=2, optimizer="teon", num_layers=8, timeout=120)
    flops = [r[1][2] for r in results]
    mean = sum(flops) / len(flops)
    assert max(flops) <= 1.10 * mean and min(flops) >= 0.90 * mean, flops


def test_plan_shows_owners_and_bytes_per_rank():
    plan_text = run_ranks(train, 2, tp=2, optimizer="teon", timeout=120)[0][3]
    assert "owner: dense work rank" in plan_text and "This rank per step: sends" in plan_text
    assert "AdamW in the same layout: 0 bytes" in plan_text  # TP2, one replica: no data-parallel all-reduce


def test_a_teon_group_spanning_pipeline_stages_is_rejected_before_any_step():
    with pytest.raises(Exception, match="another pipeline stage(.|\n)*teon_k"):
        run_ranks(train, 2, pp=2, num_layers=6, optimizer="teon", timeout=120)


def test_cutting_at_the_stage_boundary_is_an_opt_in():
    results = run_ranks(
        train,
        2,
        pp=2,
        num_layers=6,
        optimizer="teon",
        timeout=120,
        options={"cut_groups_at_stage_boundary": True},
    )
    assert any("falls back to Muon" in r[3] for r in results)


@pytest.mark.parametrize("waves", [1, 3])
def test_overlap_waves_do_not_change_the_update(waves):
    a = gather_full(
        run_ranks(train, 4, tp=2, optimizer="teon", options={"overlap_waves": waves}, timeout=120)
    )
    replicated = run_ranks(train, 4, tp=2, optimizer="teon", mode="replicated", timeout=120)
    assert_same_model(a, (gather_full(replicated), replicated[0][4]))
