"""Megatron MoE with use_distributed_optimizer=True: the expert buckets (DDP's expert_parallel_buffers) are
reduce-scattered over the expert-data-parallel group, so their partitions are planned on the expert
topology (expert-TP × expert-DP). The result equals the non-distributed teonspeed path and one process
holding the whole model (every expert), from the same deterministic weights and gradients."""

import pytest
import torch

import megatron_models as mm
from teonspeed.parallel.shard_spec import assemble, megatron_shard_specs
from support import tolerance
from support.harness import run_ranks
from support.synthetic import global_name, local_tensor

STEPS = 2


def train(
    rank,
    world_size,
    tp=1,
    ep=1,
    etp=None,
    distributed_optimizer=False,
    optimizer="muon",
    experts=4,
    layers=2,
    ddp_options=None,
    model=None,
    steps=STEPS,
    **options,
):
    """experts=0: a dense model; ddp_options: more DistributedDataParallelConfig fields (bucket_size,
    overlap_grad_reduce); model: more tiny_config fields (hidden, heads, ...); options: more
    TeonOptimizerConfig fields."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from teonspeed.megatron import TeonOptimizerConfig, get_megatron_optimizer

    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp, expert_model_parallel_size=ep, expert_tensor_parallel_size=etp
    )
    moe = (
        dict(
            expert_model_parallel_size=ep,
            expert_tensor_parallel_size=etp,
            num_moe_experts=experts,
            moe_router_topk=2,
            moe_token_dispatcher_type="allgather",
        )
        if experts
        else {}
    )
    config = mm.tiny_config(num_layers=layers, tp=tp, **(model or {}), **moe)
    ddp = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer, **(ddp_options or {})
        ),
        mm.tiny_gpt(config),
    )
    specs = megatron_shard_specs(ddp.module)
    ranks = {
        False: (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()),
        True: (ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()),
    }
    # DDP scales expert gradients by expert-DP / DP (each expert sums over the expert-DP group only):
    # pre-scale so that every layout reduces to the same gradient.
    expert_scale = ps.get_data_parallel_world_size() / ps.get_expert_data_parallel_world_size()

    def local_of(name, p, salt):
        spec = specs[name]
        return local_tensor(name, p, spec, *ranks[spec.is_expert], salt)

    with torch.no_grad():
        for name, p in ddp.module.named_parameters():
            p.copy_(local_of(name, p, 0))
    config = TeonOptimizerConfig(
        optimizer=optimizer,
        lr=0.02,
        adamw_lr=1e-3,
        weight_decay=0.01,
        clip_grad=0.0,
        use_distributed_optimizer=distributed_optimizer,
        **options,
    )
    opt = get_megatron_optimizer(config, [ddp])
    # the same gradients in every layout: rounding of the steps only
    budget = tolerance.RoundingBudget(opt.optimizer)
    for step in range(1, steps + 1):
        ddp.zero_grad_buffer()
        for name, p in ddp.module.named_parameters():
            p.main_grad.copy_(local_of(name, p, step) * (expert_scale if specs[name].is_expert else 1.0))
        if ddp.ddp_config.overlap_grad_reduce:
            ddp.start_grad_sync()  # what the backward hooks do, bucket by bucket, when no backward runs
        ddp.finish_grad_sync()
        assert opt.step()[0]
    params = {}
    for name, p in ddp.module.named_parameters():
        spec = specs[name]
        params[global_name(name, spec)] = (
            p.detach().clone(),
            spec.tp_partition_dim,
            spec.tp_partition_stride,
            ranks[spec.is_expert][0],
        )
    inner = opt.optimizer
    topologies = sorted(
        {
            "expert" if all(inner.parallel.spec(e.name).is_expert for e in p.entries) else "dense"
            for p in inner.partitions.values()
        }
    )
    work_sizes = sorted({plan.work_size for plan in inner.zero_plans})
    return (
        params,
        type(opt).__name__,
        topologies,
        work_sizes,
        (inner.comm_stats.sent, inner.comm_stats.received) if inner.comm_stats else None,
        inner.zero_expected_bytes(),
        bucket_layout(ddp, inner),
        budget.weights(0.02),
    )


def bucket_layout(ddp, inner):
    """(buckets per DDP buffer, TEON groups whose members lie in different buckets, planned jobs whose
    units lie in different buckets): the first two read from DDP's buffers alone."""
    buffers = list(ddp.buffers) + list(getattr(ddp, "expert_parallel_buffers", []))
    bucket_of = {
        inner._names[id(p)]: (i, j)
        for i, buf in enumerate(buffers)
        for j, b in enumerate(buf.buckets)
        for p in b.params
    }
    straddling = sum(len({bucket_of[m.name] for m in g.members}) > 1 for g in inner.grouping.groups)
    cross_jobs = sum(
        len({u.bucket for u in j.units}) > 1 for plan in getattr(inner, "zero_plans", []) for j in plan.jobs
    )
    return [len(buf.buckets) for buf in buffers], straddling, cross_jobs


def full_model(results):
    """Global name -> full tensor, after checking every replica (data- or expert-data-parallel) of a shard
    holds the same values."""
    shards = {}
    for params, *_ in results:
        for name, (t, dim, stride, tp_rank) in params.items():
            seen = shards.setdefault(name, {}).setdefault(tp_rank, (t, dim, stride))
            assert torch.equal(seen[0], t), f"{name} differs across replicas"
    return {
        name: assemble([by_tp[r][0] for r in sorted(by_tp)], by_tp[0][1], by_tp[0][2])
        if len(by_tp) > 1
        else by_tp[0][0]
        for name, by_tp in shards.items()
    }


def assert_same(got, ref, tol):
    assert set(got) == set(ref)
    for name in ref:
        err = float((got[name] - ref[name]).norm() / ref[name].norm())
        assert err <= tol, f"{name}: relative error {err:.2e}"


def assert_within_budget(got, ref, budget):
    """The layouts step the same synthetic gradients: only the iterations' rounding may differ, within the
    single process's rounding budget (tol.RoundingBudget) over all weights."""
    assert set(got) == set(ref)
    assert tolerance.distance(got, ref) <= budget, (tolerance.distance(got, ref), budget)


@pytest.fixture(scope="module")
def single_process():
    """The one-process model and the rounding budget of its steps."""
    results = run_ranks(train, 1, timeout=120)
    return full_model(results), results[0][7]


# world 4: dense TP × DP is 4 ranks; expert-TP × expert-DP is 2 (TP1: expert-DP 2; TP2: expert-TP 2,
# expert-DP 1; TP1 with expert-TP 2: the experts TP-sharded while the dense weights are not)
@pytest.mark.parametrize(
    "tp,etp", [(1, None), (2, None), (1, 2)], ids=["TP1xEP2xDP2", "TP2xEP2", "TP1xEP2xETP2"]
)
def test_moe_distributed_optimizer_equals_the_plain_path_and_one_process(single_process, tp, etp):
    single_process, budget = single_process
    got = run_ranks(train, 4, tp=tp, ep=2, etp=etp, distributed_optimizer=True, timeout=180)
    assert any("local_experts.3." in n for n in single_process)
    assert all(r[1] == "TeonDistributedOptimizer" for r in got)
    assert all(r[2] == ["dense", "expert"] and r[3] == [2, 4] for r in got), [r[2:4] for r in got]
    assert all(r[4] == r[5] for r in got)  # bytes moved == bytes the plans predict
    assert_within_budget(full_model(got), single_process, budget)
    if tp == 1:
        plain = full_model(run_ranks(train, 4, tp=tp, ep=2, timeout=180))
        assert_within_budget(full_model(got), plain, budget)
