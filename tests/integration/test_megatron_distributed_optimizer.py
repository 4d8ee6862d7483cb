"""Megatron's use_distributed_optimizer=True as Megatron-LM pretraining runs set it: clip_grad (the global
norm over every rank's bucket partitions), bf16 parameters with fp32 master partitions, and optimizer
checkpoints (per-rank state dicts; dist-checkpointing, resharded). Oracles: Megatron's own non-distributed
wrappers (FP32Optimizer's clip, Float16OptimizerWithFloat16Params' fp32 main params) and the uninterrupted
run."""

import pytest
import torch

import megatron_models as mm
from support import tolerance as tol
from support.harness import run_ranks
from test_megatron_builder import build, local_params, run_steps, train, weights as weights_of

CLIP = 0.05  # the tiny model's gradient norm is ~1.5: every step clips (asserted)


def _relative(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _norms_bound(ref, oracle, numel):
    """Per step: the global gradient norm of another layout against the reference's. The gradients differ
    by the layouts' rounding, whose effect on the norm the fp64 oracle measures for the reference (the
    steps' largest deviation, a scalar per step); the sum of squares itself is reduced pairwise
    (≤ log₂N·u relative, worst case; the square root halves it) on each side."""
    ref_norms, oracle_norms = ([n for _, n, _ in run[4]] for run in (ref, oracle))
    scale = max(abs(a - b) for a, b in zip(ref_norms, oracle_norms))
    return [(1 + tol.LAMBDA) * scale + numel.bit_length() * tol.u() * n for n in ref_norms]


def test_clip_grad_clips_the_global_norm_tp2_dp2_equals_tp1_and_megatrons_own_clip():
    # adam_eps ~ the clipped gradients' size: the AdamW part's update depends on the clip coefficient
    # (Muon's polar factor alone would hide a wrong one), so a clip applied wrongly moves the weights.
    kw = dict(optimizer="teon", layers=3, adam_eps=1e-3, clip_grad=CLIP, timeout=180)
    megatron = run_ranks(train, 2, **kw)  # FP32Optimizer: Megatron's get_grad_norm_fp32 and its clip
    # the same in fp64 (tol.oracle_bound), clipped by our distributed optimizer (Megatron's clip is fp32-only)
    oracle = run_ranks(train, 2, float64=True, use_distributed_optimizer=True, **kw)
    unclipped = run_ranks(train, 2, **{**kw, "clip_grad": 0.0})
    tp1 = run_ranks(train, 2, use_distributed_optimizer=True, **kw)
    tp2 = run_ranks(train, 4, tp=2, use_distributed_optimizer=True, **kw)
    norms = [norm for _, norm, _ in megatron[0][4]]
    assert min(norms) > 10 * CLIP
    numel = sum(p.numel() for p in weights_of(megatron[0]).values())
    norms_bound = _norms_bound(megatron[0], oracle[0], numel)
    for rank in (
        tp1 + tp2
    ):  # the same norm on every rank; TP-duplicated norms' grads counted once, as Megatron does
        assert [success for success, _, _ in rank[4]] == [True] * len(norms)
        assert all(abs(n - m) <= b for (_, n, _), m, b in zip(rank[4], norms, norms_bound))
    bound = tol.oracle_bound(weights_of(megatron[0]), weights_of(oracle[0]))
    assert tol.distance(weights_of(tp1[0]), weights_of(megatron[0])) <= bound
    assert tol.distance(mm.full_params_of_replica0(tp2), weights_of(megatron[0])) <= bound
    # so a wrong clip would show
    assert tol.distance(weights_of(unclipped[0]), weights_of(megatron[0])) > bound
    # A world of one on the single-process runner: the norm rides in its one host read instead.
    alone = dict(kw, parallel_mode="replicated", steps=2)
    megatron, local = (
        run_ranks(train, 1, **alone),
        run_ranks(train, 1, use_distributed_optimizer=True, **alone),
    )
    # the same gradients, their squares summed in another order (pairwise: ≤ log₂N·u on each side)
    for (_, n, _), (_, m, _) in zip(local[0][4], megatron[0][4]):
        assert abs(n - m) <= 2 * numel.bit_length() * tol.u() * m


def test_bf16_keeps_fp32_master_partitions_like_megatrons_bf16_optimizer():
    # lr = adamw_lr = 1e-3: an AdamW step moves a norm weight (1.0) by about 1e-3, under half a bf16 ulp
    # of 1.0 (2^-9): a bf16-only update rounds every step away, fp32 masters add the steps up.
    kw = dict(optimizer="muon", layers=2, bf16=True, lr=1e-3, adamw_lr=1e-3, steps=8, timeout=180)
    megatron = run_ranks(train, 2, **kw)  # Float16OptimizerWithFloat16Params: fp32 main params
    oracle = run_ranks(train, 2, float64=True, **{**kw, "bf16": False})  # the same training, exact to fp64
    got = run_ranks(train, 4, tp=2, use_distributed_optimizer=True, **kw)
    bf16_only = run_ranks(train, 4, tp=2, use_distributed_optimizer=True, bf16_only=True, **kw)
    assert got[0][3] == "TeonDistributedOptimizer" and megatron[0][3] == "TeonFloat16Optimizer"
    sharded, rounded = mm.full_params_of_replica0(got), mm.full_params_of_replica0(bf16_only)
    norms = [n for n in megatron[0][1] if "layernorm" in n]
    assert norms
    assert all(sharded[name].dtype == torch.bfloat16 for name in megatron[0][1])
    # both bf16 runs are off the exact training by bf16 rounding (the forward, the bf16 weights): the fp64
    # oracle measures the reference's; TP=2 rounds its bf16 forward differently
    bound = tol.oracle_bound(weights_of(megatron[0]), weights_of(oracle[0]))
    assert tol.distance(sharded, weights_of(megatron[0])) <= bound
    for name in norms:
        full = megatron[0][1][name][0]
        assert bool((full != 1).any()) and bool((sharded[name] != 1).any()), name  # the masters moved them
        assert bool((rounded[name] == 1).all()), name  # a bf16-only update never does
        # The two runs' fp32 masters of these weights differ by far less than a bf16 ulp (each AdamW step of
        # ~1e-3 differs by the bf16 forward's ~1% between TP layouts), so their bf16 copies are at most one
        # ulp apart (2u|w|), in the few entries where a master lies that close to a rounding boundary; the
        # bf16-only run misses the whole movement instead
        one_ulp = 2 * tol.u(torch.bfloat16) * full.float().abs()
        assert ((sharded[name].float() - full.float()).abs() <= one_ulp).all()
        assert tol.distance({name: sharded[name]}, {name: full}) < tol.distance(
            {name: rounded[name]}, {name: full}
        )


def _state(ddp, opt):
    """This rank's weights and every optimizer state tensor and step counter."""
    weights = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}
    state = opt.state_dict()
    buckets = [{k: v.detach().clone() for k, v in b.items()} for b in state["buckets"]]
    return weights, buckets, [g["step"] for g in state["param_groups"]]


def _resume_from_per_rank_files(rank, world_size, directory, tp, load_tp):
    """4 steps == 2 steps + save + load into a fresh model and optimizer + 2 steps (bf16, clipped); then
    the saved state offered to a model of another TP layout."""
    import os

    from megatron.core import parallel_state as ps

    kw = dict(layers=2, use_distributed_optimizer=True, bf16=True, clip_grad=CLIP)
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    ddp, opt = build(tp, **kw)
    run_steps(ddp, opt, range(4))
    reference = _state(ddp, opt)
    ddp, opt = build(tp, **kw)
    run_steps(ddp, opt, range(2))
    path = os.path.join(directory, f"rank{rank}.pt")
    torch.save({"model": ddp.state_dict(), "optimizer": opt.state_dict()}, path)
    ddp, opt = build(tp, **kw)
    checkpoint = torch.load(path, weights_only=True)
    ddp.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["optimizer"])
    results = run_steps(ddp, opt, range(2, 4))[2]
    resumed = _state(ddp, opt)
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=load_tp)
    ddp, opt = build(load_tp, **kw)
    try:
        opt.load_state_dict(checkpoint["optimizer"])
        refusal = None
    except ValueError as e:
        refusal = str(e)
    return reference, resumed, results, refusal


def test_optimizer_state_resumes_exactly_from_per_rank_files_and_another_layout_is_refused(tmp_path):
    for reference, resumed, results, refusal in run_ranks(
        _resume_from_per_rank_files, 4, str(tmp_path), tp=2, load_tp=1, timeout=180
    ):
        assert all(success and norm > CLIP for success, norm, _ in results)  # resumed steps clip
        for name, weight in reference[0].items():
            assert torch.equal(resumed[0][name], weight), name
        assert len(reference[1]) == len(resumed[1]) and reference[2] == resumed[2] == [4] * len(reference[2])
        for saved, loaded in zip(reference[1], resumed[1]):
            assert saved.keys() == loaded.keys() == {"momentum_buffer", "exp_avg", "exp_avg_sq", "master"}
            assert all(torch.equal(saved[k], loaded[k]) for k in saved)
        assert (
            refusal is not None
            and "saved in another layout (bucket 0 differs in its data-parallel size: 2 saved, 4 here)"
            in refusal
            and "is not resharded" in refusal
        )


def _save(ddp, opt, directory):
    from megatron.core import dist_checkpointing

    model_sd = ddp.module.sharded_state_dict()
    dist_checkpointing.save(
        {"model": model_sd, "optimizer": opt.sharded_state_dict(model_sd)},
        directory,
        sharded_strategy=("torch_dist", 1),
    )


def _load(ddp, opt, directory):
    from megatron.core import dist_checkpointing

    model_sd = ddp.module.sharded_state_dict()
    loaded = dist_checkpointing.load(
        {"model": model_sd, "optimizer": opt.sharded_state_dict(model_sd, is_loading=True)}, directory
    )
    ddp.module.load_state_dict(loaded["model"])
    opt.load_state_dict(loaded["optimizer"])


def _dist_checkpoint_round_trip(rank, world_size, directory, bf16):
    """TP=2 × DP=2: 4 steps, and 2 steps + torch_dist save (on disk) + load into a fresh model and
    optimizer + 2 steps."""
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    kw = dict(layers=2, use_distributed_optimizer=True, bf16=bf16, clip_grad=CLIP)
    ddp, opt = build(2, **kw)
    run_steps(ddp, opt, range(4))
    reference = local_params(ddp), _state(ddp, opt)
    ddp, opt = build(2, **kw)
    run_steps(ddp, opt, range(2))
    _save(ddp, opt, directory)
    ddp, opt = build(2, **kw)
    _load(ddp, opt, directory)
    run_steps(ddp, opt, range(2, 4))
    return reference, (local_params(ddp), _state(ddp, opt)), ps.get_data_parallel_rank()


def _resume_in_another_layout(rank, world_size, directory, tp, distributed):
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    ddp, opt = build(tp, layers=2, use_distributed_optimizer=distributed, clip_grad=CLIP)
    _load(ddp, opt, directory)
    run_steps(ddp, opt, range(2, 4))
    return local_params(ddp), ps.get_data_parallel_rank()


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_dist_checkpointing_resumes_exactly_and_reshards_to_another_layout(bf16, tmp_path):
    directory = str(tmp_path)
    results = run_ranks(_dist_checkpoint_round_trip, 4, directory, bf16, timeout=180)
    for (weights, state), (resumed_weights, resumed_state), _ in results:
        assert all(torch.equal(resumed_weights[n][0], w[0]) for n, w in weights.items())
        for saved, loaded in zip(state[1], resumed_state[1]):
            assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
        assert state[2] == resumed_state[2]
    if bf16:
        return
    # The same checkpoint at TP=1 × DP=2 (other buckets and partitions), with and without the distributed
    # optimizer: the same global batches, so the same weights up to TP=2's rounding.
    uninterrupted = mm.full_params_of_replica0(
        [(w, dp) for (w, _), _, dp in results], name_index=0, dp_index=1
    )
    # the same 4 steps at TP=1 in fp32 and in fp64 measure the training's rounding (tol.oracle_bound); the
    # two runs compared here were not measured: 2λ of it
    same = dict(layers=2, clip_grad=CLIP, steps=4, timeout=180)
    ref = run_ranks(train, 2, **same)[0]
    # Megatron clips fp32 only
    oracle = run_ranks(train, 2, float64=True, use_distributed_optimizer=True, **same)[0]
    bound = tol.oracle_bound(weights_of(ref), weights_of(oracle), measured=False)
    for distributed in (True, False):
        resumed = mm.full_params_of_replica0(
            run_ranks(_resume_in_another_layout, 2, directory, tp=1, distributed=distributed, timeout=180),
            0,
            1,
        )
        assert tol.distance(resumed, uninterrupted) <= bound, distributed
