"""Megatron's distributed optimizer with several DDP buckets per buffer, as Megatron-LM trains
(overlap_grad_reduce=True cuts each buffer into buckets of `bucket_size` elements, default 40M): TEON stacks
and fused weights whose members lie in different buckets are planned over all the buckets of a rank at
once. Oracles: one process holding the whole model, the non-distributed teonspeed path, Megatron's own
clip, and a float64 norm of the same reduced gradients."""

import os

import pytest
import torch

import megatron_models as mm
from support import tolerance as tol
from support.harness import run_ranks
from test_megatron_builder import build, local_params
from test_megatron_moe_distributed_optimizer import assert_same, bucket_layout, full_model, train

# The tiny model's layer holds 7744 elements (hidden 32), 3872 per TP rank at TP=2. Per TP rank, buckets of
# 8000 / TP give about one layer per bucket; of 3000 / TP, every layer is cut into ~3 buckets, like a
# 1B-class layer (~45M elements) at Megatron's default 40M. Either way every TEON pair's members (q, k, v
# of layers 2i and 2i+1) lie in different buckets (asserted).
SMALL_BUCKETS = {"layer-per-bucket": 8000, "layer-over-buckets": 3000}
FP32 = dict(ns_dtype="fp32")  # fp32 Newton–Schulz everywhere: the layouts differ only in fp32 rounding
# Every layout orthogonalizes bitwise-equal matrices (gathers and exchanges copy; DP=2's reduce-scatter of
# equal replicas adds two exact halves); only which stacks are batched together differs, and a batched
# matmul may round its sums differently: up to ~2 ulps of fp32 (2 x 2^-24 = 1.2e-7) per matmul, carried
# through 3 matmuls x 5 iterations x 3 steps = 45 matmuls: 45 x 1.2e-7 = 5.4e-6 < TOL. A piece written to
# the wrong place, or a bucket's momentum missing from its stack, is O(1).
TOL = 1e-5


def dense(**kw):
    return dict(experts=0, optimizer="teon", layers=4, **FP32, **kw)


@pytest.fixture(scope="module")
def one_process():
    return full_model(run_ranks(train, 1, **dense(), timeout=120))


def check_layout(results):
    for r in results:
        buckets, straddling, cross_jobs = r[6]
        assert max(buckets) > 1 and straddling > 0 and cross_jobs > 0, r[6]
        assert r[4] == r[5]  # bytes moved == bytes the plan predicts


@pytest.mark.parametrize("bucket_size", SMALL_BUCKETS.values(), ids=SMALL_BUCKETS.keys())
@pytest.mark.parametrize("tp", [1, 2], ids=["TP1xDP2", "TP2xDP2"])
def test_small_buckets_equal_one_process_and_the_non_distributed_path(one_process, tp, bucket_size):
    buckets = dict(overlap_grad_reduce=True, bucket_size=bucket_size // tp)
    got = run_ranks(
        train, 2 * tp, tp=tp, distributed_optimizer=True, ddp_options=buckets, **dense(), timeout=180
    )
    check_layout(got)
    assert_same(full_model(got), one_process, TOL)
    plain = run_ranks(train, 2 * tp, tp=tp, ddp_options=buckets, **dense(), timeout=180)
    assert plain[0][6][2] == 0  # no bucket plan on the non-distributed path
    assert_same(full_model(got), full_model(plain), TOL)


# MoE: every matrix type TEON-stacked, so the expert buffers (reduce-scattered over expert-DP) hold stacks
# of expert e of layers 0 and 1 in different buckets too.
MOE = dict(optimizer="teon", teon_types=("qkv", "attn_out", "fc1", "fc2"), **FP32)


@pytest.mark.parametrize(
    "tp,etp", [(1, None), (2, None), (1, 2)], ids=["TP1xEP2xDP2", "TP2xEP2", "TP1xEP2xETP2"]
)
def test_moe_expert_buckets_equal_one_process(tp, etp):
    buckets = dict(overlap_grad_reduce=True, bucket_size=2000)
    got = run_ranks(
        train, 4, tp=tp, ep=2, etp=etp, distributed_optimizer=True, ddp_options=buckets, **MOE, timeout=180
    )
    check_layout(got)
    assert all(r[2] == ["dense", "expert"] for r in got)
    assert all(min(r[6][0][1:]) > 1 for r in got), [r[6][0] for r in got]  # several expert buckets
    assert_same(full_model(got), full_model(run_ranks(train, 1, **MOE, timeout=120)), TOL)


# -- the real backward: DDP's hooks reduce-scatter each bucket as its gradients complete -------------------
CLIP = 0.05  # the tiny model's gradient norm is ~1.5: every step clips


def _reduced_grads_norm_fp64(ddp):
    """The float64 norm of the reduced gradients, each parameter once (TP=1), read from the whole bucket
    buffers all-gathered over DP: independent of the optimizer's partition ranges."""
    import torch.distributed as dist

    total = 0.0
    for buffer in ddp.buffers:
        group = buffer.data_parallel_group
        for bucket in buffer.buckets:
            n = bucket.grad_data.numel() // group.size()
            whole = bucket.grad_data.new_empty(bucket.grad_data.numel())
            mine = bucket.grad_data[group.rank() * n : (group.rank() + 1) * n]
            dist.all_gather_into_tensor(whole, mine, group=group)
            # bucket.params is a set (its order differs between processes): sum in buffer order
            for start, end, _ in sorted(buffer.param_index_map[p] for p in bucket.params):
                total += float(whole[start - bucket.offset : end - bucket.offset].double().square().sum())
    return total**0.5, sum(p.numel() for p in ddp.module.parameters())


OVERLAPPED = dict(overlap_grad_reduce=True, bucket_size=3000)  # 8 buckets (asserted)


def overlapped(rank, world_size, distributed, clip_grad=0.0, ddp_options=OVERLAPPED, steps=3, float64=False):
    """3 steps of real batches; the weights, each step's (returned norm, float64 norm of the same reduced
    gradients, elements summed), and the number of buckets. float64: the training in fp64 (tol's oracle)."""
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel()
    ddp, opt = build(
        1,
        "teon",
        3,
        float64,
        use_distributed_optimizer=distributed,
        clip_grad=clip_grad,
        adam_eps=1e-3,
        ddp_options=ddp_options,
        **({} if float64 else FP32),
    )
    norms = []
    for step in range(steps):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        tokens, position_ids, labels = mm.batch(seed=100 * step + ps.get_data_parallel_rank())
        loss = ddp(tokens, position_ids, None, labels=labels).float().mean()
        loss.backward()  # the hooks start each bucket's reduce-scatter
        ddp.finish_grad_sync()
        oracle = _reduced_grads_norm_fp64(ddp) if distributed and clip_grad else None
        success, norm, _ = opt.step()
        assert success
        norms.append((norm, oracle))
    return local_params(ddp), norms, len(ddp.buffers[0].buckets)


def _max_relative(got, ref):
    return max(float((got[n][0] - full).norm() / full.norm()) for n, (full, *_rest) in ref.items())


def test_overlapped_grad_reduce_equals_the_non_distributed_path():
    got = run_ranks(overlapped, 2, True, timeout=180)
    plain = run_ranks(overlapped, 2, False, timeout=180)
    assert got[0][2] > 3  # several buckets, each reduce-scattered by its hooks during the backward
    assert _max_relative(got[0][0], plain[0][0]) <= TOL


def test_the_clip_norm_is_accumulated_in_float64_no_worse_than_megatrons_own():
    got = run_ranks(overlapped, 2, True, CLIP, timeout=180)
    megatron = run_ranks(overlapped, 2, False, CLIP, timeout=180)  # FP32Optimizer's get_grad_norm_fp32
    one_bucket = run_ranks(overlapped, 2, True, CLIP, {}, timeout=180)  # no overlap: DDP's one bucket
    for step, ((norm, (oracle, numel)), (megatron_norm, _)) in enumerate(zip(got[0][1], megatron[0][1])):
        assert norm > 10 * CLIP
        # Each side sums `numel` squares in float64 (unit roundoff 2^-53): relative error <= numel·2^-53
        # each (Higham's bound for recursive summation of non-negative terms), twice for both sides, and the
        # square root halves it. An fp32 accumulation (~1e-6 here, 1e-5 per 1M elements on CPU) fails it.
        bound = 2 * numel * 2.0**-53
        error = abs(norm / oracle - 1)
        assert error <= bound, (step, norm, oracle)
        assert error <= abs(megatron_norm / oracle - 1) + bound  # no worse than Megatron's own
    returned = [[norm for norm, _ in norms] for _, norms, _ in got]
    assert all(r == returned[0] for r in returned)  # the same norm on every rank, bit for bit
    # The same clip over 8 buckets as over one (the norm differs by float64 rounding only). Against
    # Megatron's own clip, its fp32 norm (~1e-7 off) moves the clip coefficient and the rank-deficient
    # momenta's polar factors amplify that: within (1 + λ) of Megatron's own rounding, which the same
    # training in fp64 measures (tol.oracle_bound; our clip, Megatron's is fp32-only).
    assert _max_relative(got[0][0], one_bucket[0][0]) <= TOL
    exact = run_ranks(overlapped, 2, True, CLIP, float64=True, timeout=180)[0][0]
    weights = {name: value[0] for name, value in megatron[0][0].items()}
    bound = tol.oracle_bound(weights, {name: value[0] for name, value in exact.items()})
    assert tol.distance({name: value[0] for name, value in got[0][0].items()}, weights) <= bound


# -- Megatron's default bucket size with a 1B-class layer: construction, the plan and its exchange ---------
def one_b_class(rank, world_size):
    """Two layers of a 1B-class model (hidden 2048, FFN 5632, 16 heads, 4 query groups: ~45M elements a
    layer, more than Megatron's default bucket of 40M) in DDP with overlap_grad_reduce=True and the
    default bucket size; the optimizer's plan, and its exchange run once with the identity for Newton–Schulz
    (each rank must get back exactly the momentum it holds, having moved exactly the planned bytes)."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from teonspeed.megatron import TeonOptimizerConfig, get_megatron_optimizer
    from teonspeed.matrix_io import matrix_view, write_matrix
    from teonspeed.parallel.runner import StepIO
    from teonspeed.parallel.stats import CommStats

    ps.initialize_model_parallel()
    config = mm.tiny_config(num_layers=2, hidden=2048, heads=16, groups=4, ffn=5632)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=True, overlap_grad_reduce=True
    )  # bucket_size: Megatron's default
    ddp = DistributedDataParallel(config, ddp_config, mm.tiny_gpt(config))
    config = TeonOptimizerConfig(optimizer="teon", use_distributed_optimizer=True, lr=0.02, clip_grad=1.0)
    opt = get_megatron_optimizer(config, [ddp])
    inner = opt.optimizer
    layer_numel = sum(p.numel() for n, p in ddp.module.named_parameters() if ".layers.0." in n)
    ((keys, flat_step),) = inner.runner.steps.items()  # the buckets planned together, and their step
    shards = [opt.shards[k] for k in keys]
    plan = flat_step.plan
    planned = sorted(m.label for j in plan.jobs for g in j.groups for m in g.members)
    grouped = sorted(m.label for g in inner.grouping.groups for m in g.members)
    # The exchange, with the identity for the transform: the update is the direction itself.
    g = torch.Generator().manual_seed(rank)
    direction = torch.zeros(plan.partition_size)
    for shard, part in zip(shards, direction.split(plan.partition_sizes)):
        for entry, lo, hi in shard.slices():
            if inner.group_of(entry.name)["route"] == "ortho":
                part[lo:hi] = torch.randn(hi - lo, generator=g)
    update, stats = torch.zeros_like(direction), CommStats()
    io = StepIO(
        {},
        {},
        lambda x: x,
        view=lambda m, unit: matrix_view(unit, m, inner._layouts[m.name]),
        store=lambda m, unit, value: write_matrix(unit, m, inner._layouts[m.name], value),
        scale=lambda m: 1.0,
    )  # FlatStep reads a unit as the expert's slice already (matrix_io.in_unit)
    flat_step.run(direction, update, io, inner.runner.tp_split, stats)
    sent, received = stats.sent, stats.received
    return dict(
        bucket_size=ddp.ddp_config.bucket_size,
        layer_numel=layer_numel,
        layout=bucket_layout(ddp, inner),
        planned=planned,
        grouped=grouped,
        cut=sum(j.cut for j in plan.jobs),
        round_trip=torch.equal(update, direction),
        moved=(sent, received),
        expected=flat_step.expected_bytes(4),
        plan_bytes=plan.bytes_per_rank(4),
    )


def test_a_1b_class_layer_larger_than_megatrons_default_bucket_builds_and_plans_across_buckets():
    results = run_ranks(one_b_class, 2, timeout=600)
    for r in results:
        buckets, straddling, cross_jobs = r["layout"]
        assert r["bucket_size"] == 40_000_000 and r["layer_numel"] > r["bucket_size"]
        assert buckets[0] >= 2 and straddling >= 3 and cross_jobs >= 1  # the pair's q, k and v straddle
        assert r["planned"] == r["grouped"]  # every matrix planned, once
        assert r["round_trip"] and r["moved"] == r["expected"] and r["cut"] >= 1
    sent, received = results[0]["plan_bytes"]
    assert [r["expected"] for r in results] == list(zip(sent, received)) and sum(sent) == sum(received) > 0


ONE_B_CLASS = dict(hidden=2048, heads=16, groups=4, ffn=5632)


@pytest.mark.skipif(
    os.environ.get("TEONSPEED_LARGE_TESTS") != "1",
    reason="~10 TFLOP of fp32 Newton–Schulz (minutes on a CPU core); set TEONSPEED_LARGE_TESTS=1",
)
def test_a_1b_class_layer_at_megatrons_default_bucket_size_steps_like_the_non_distributed_path():
    """The full step at the layout above (one step, synthetic weights and gradients): the distributed
    optimizer over 3 buckets == the non-distributed path == one process."""
    kw = dict(experts=0, optimizer="teon", layers=2, model=ONE_B_CLASS, steps=1, **FP32)
    got = run_ranks(
        train, 2, distributed_optimizer=True, ddp_options=dict(overlap_grad_reduce=True), **kw, timeout=3000
    )
    check_layout(got)
    plain = run_ranks(train, 2, ddp_options=dict(overlap_grad_reduce=True), **kw, timeout=3000)
    assert_same(full_model(got), full_model(plain), TOL)
    assert_same(full_model(got), full_model(run_ranks(train, 1, **kw, timeout=3000)), TOL)
