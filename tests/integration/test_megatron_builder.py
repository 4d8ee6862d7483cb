"""teonspeed.megatron.get_megatron_optimizer: a MegatronOptimizer over Megatron DDP's main_grad buffers."""

import copy

import pytest
import torch

import megatron_models as mm
from support import tolerance as tol
from support.harness import RankError, run_ranks


def build(tp=1, optimizer="teon", layers=None, float64=False, **config_kw):
    """A tiny GPT (bf16 where config bf16=True) in Megatron DDP, and teonspeed's MegatronOptimizer for it.
    float64: the same model, initial weights and training in fp64 (the oracle of tol.oracle_bound)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from teonspeed.megatron import TeonOptimizerConfig, get_megatron_optimizer

    config = mm.tiny_config(tp=tp, **({"num_layers": layers} if layers else {}))
    # ddp_use_distributed_optimizer: DDP's own flag where it differs from the optimizer config's
    distributed = config_kw.pop(
        "ddp_use_distributed_optimizer", config_kw.get("use_distributed_optimizer", False)
    )
    # ddp_options: more DistributedDataParallelConfig fields (overlap_grad_reduce, bucket_size)
    ddp_options = config_kw.pop("ddp_options", {})
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=not float64, use_distributed_optimizer=distributed, **ddp_options
    )
    model = mm.tiny_gpt(config).double() if float64 else mm.tiny_gpt(config)
    ddp = DistributedDataParallel(config, ddp_config, model.bfloat16() if config_kw.get("bf16") else model)
    opt = get_megatron_optimizer(
        TeonOptimizerConfig(
            optimizer=optimizer, **{"lr": 0.02, "adamw_lr": 3e-3, "clip_grad": 0.0, **config_kw}
        ),
        [ddp],
    )
    return ddp, opt


def run_steps(ddp, opt, steps, same_batch=False, sched=None, bf16_only=False):
    """Train on the steps' batches; (losses, lrs, step() results, this rank's gradient norms). bf16_only: the
    fp32 masters restart from the bf16 weights before every step (reload_model_params), i.e. a bf16-only
    update."""
    from megatron.core import parallel_state as ps

    losses, lrs, results, grad_norms = [], [], [], []
    for step in steps:
        ddp.zero_grad_buffer()
        opt.zero_grad()
        tokens, position_ids, labels = mm.batch(
            seed=(0 if same_batch else 100 * step) + ps.get_data_parallel_rank()
        )
        loss = ddp(tokens, position_ids, None, labels=labels).float().mean()
        loss.backward()
        ddp.finish_grad_sync()
        main_grads = [p.main_grad for p in ddp.module.parameters()]
        grad_norms.append(float(torch.nn.utils.get_total_norm(main_grads)))
        if bf16_only:
            opt.reload_model_params()
        results.append(opt.step())
        lrs.append([g["lr"] for g in opt.param_groups])
        if sched:
            sched.step(1)
        losses.append(float(loss))
    return losses, lrs, results, grad_norms


def local_params(ddp):
    """name -> (this rank's tensor, TP split dim or None, stride, TP rank), for mm.full_params_of_replica0."""
    from megatron.core import parallel_state as ps

    return {
        n: (
            p.detach().clone(),
            getattr(p, "partition_dim", -1) if getattr(p, "tensor_model_parallel", False) else None,
            getattr(p, "partition_stride", 1),
            ps.get_tensor_model_parallel_rank(),
        )
        for n, p in ddp.module.named_parameters()
    }


def train(
    rank,
    world_size,
    tp=1,
    optimizer="teon",
    steps=3,
    scheduler=False,
    same_batch=False,
    layers=None,
    bf16_only=False,
    float64=False,
    **config_kw,
):
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    ddp, opt = build(tp, optimizer, layers, float64, **config_kw)
    sched = (
        OptimizerParamScheduler(
            opt,
            init_lr=0.0,
            max_lr=0.02,
            min_lr=0.002,
            lr_warmup_steps=2,
            lr_decay_steps=10,
            lr_decay_style="cosine",
            start_wd=0.01,
            end_wd=0.01,
            wd_incr_steps=10,
            wd_incr_style="constant",
        )
        if scheduler
        else None
    )
    losses, lrs, results, grad_norms = run_steps(ddp, opt, range(steps), same_batch, sched, bf16_only)
    params = local_params(ddp)
    plans = getattr(opt.optimizer, "zero_plans", [])
    stats = opt.optimizer.comm_stats
    moved = (
        (
            sum(j.cut for p in plans for j in p.jobs),
            (stats.sent, stats.received),
            opt.optimizer.zero_expected_bytes(),
            stats.adamw_bytes,
            _matrix_numel(ddp, opt),
        )
        if plans and stats
        else None
    )
    return losses, params, ps.get_data_parallel_rank(), type(opt).__name__, results, lrs, moved, grad_norms


def _matrix_numel(ddp, opt):
    """Elements of this rank's (TP-local) orthogonalized matrices."""
    inner = opt.optimizer
    return sum(
        p.numel()
        for n, p in ddp.module.named_parameters()
        if inner.group_of(inner.name_of(p))["route"] == "ortho"
    )


def weights(result):
    """name -> tensor of one rank's local_params (TP=1: the full model)."""
    return {name: value[0] for name, value in result[1].items()}


def assert_within_oracle(got_losses, got_params, ref, oracle, measured=True):
    """A run of the same training in another layout equals the reference but for rounding: the weights
    within tol.oracle_bound of the fp64 oracle's measure of the reference's own rounding. The TP=2
    forward/backward rounds differently from TP=1, and every orthogonalizer grows that (Polar Express
    ×967 in rank-deficient directions, HTMuon's σᵖ lifts rounding-level σ to ≈ 0.13 of the top one): the
    oracle measures how much, for this run; a wrong shard is O(1). The losses then differ by at most
    ‖∇L‖ times the weights' distance (first order, the distance growing with the steps) plus their own
    rounding (tol.losses_bound)."""
    bound = tol.oracle_bound(weights(ref), weights(oracle), measured)
    assert tol.distance(got_params, weights(ref)) <= bound, (tol.distance(got_params, weights(ref)), bound)
    for a, b, own, grad_norm in zip(
        got_losses, ref[0], tol.losses_bound(ref[0], oracle[0], measured), ref[7]
    ):
        assert abs(a - b) <= own + grad_norm * bound, (a, b)


@pytest.mark.parametrize("optimizer", ["muon", "teon", "htmuon"])
def test_tp2_dp2_equals_tp1_dp2(optimizer):
    ref = run_ranks(train, 2, optimizer=optimizer, timeout=180)
    oracle = run_ranks(train, 2, optimizer=optimizer, float64=True, timeout=180)
    got = run_ranks(train, 4, tp=2, optimizer=optimizer, timeout=180)
    assert got[0][3] == "TeonFP32Optimizer" and got[0][4][0] == (True, None, None)
    assert_within_oracle(got[0][0], mm.full_params_of_replica0(got), ref[0], oracle[0])


def test_the_optimizer_steps_and_the_loss_goes_down():
    losses = run_ranks(train, 2, steps=12, same_batch=True, timeout=180)[0][0]  # memorise one batch
    assert losses[-1] < losses[0] - 0.5


def test_megatrons_lr_scheduler_drives_both_parts():
    lrs = run_ranks(train, 2, steps=4, scheduler=True, timeout=180)[0][5]
    assert lrs[0] == [0.0, 0.0]  # warmup starts at 0 for the matrix group and the AdamW group alike
    assert all(len(set(step)) == 1 for step in lrs) and lrs[2][0] > 0


@pytest.mark.parametrize("optimizer", ["muon", "teon"])
def test_distributed_optimizer_tp2_dp2_equals_tp1_and_the_non_distributed_path(optimizer):
    """Megatron's use_distributed_optimizer=True: DDP's reduce-scatter and parameter all-gather, each rank
    stepping its bucket partitions."""
    plain = run_ranks(train, 2, optimizer=optimizer, layers=3, timeout=180)
    ref = run_ranks(train, 2, optimizer=optimizer, layers=3, use_distributed_optimizer=True, timeout=180)
    got = run_ranks(
        train, 4, tp=2, optimizer=optimizer, layers=3, use_distributed_optimizer=True, timeout=180
    )
    assert ref[0][3] == got[0][3] == "TeonDistributedOptimizer"
    for rank in (
        ref + got
    ):  # a matrix is cut by the partition boundary; only it (and TP shards) moved, as planned
        cut, measured, predicted, adamw, matrices = rank[6]
        assert cut >= 1 and measured == predicted
        # AdamW's yardstick: DDP's reduce-scatter of the fp32 gradients and all-gather of the fp32 parameters
        assert adamw == 2 * (2 - 1) * matrices * 4 // 2 > 0
    oracle = run_ranks(train, 2, optimizer=optimizer, layers=3, float64=True, timeout=180)  # the plain path
    assert_within_oracle(ref[0][0], weights(ref[0]), plain[0], oracle[0])
    for name in plain[0][1]:
        assert torch.equal(ref[0][1][name][0], ref[1][1][name][0]), (
            name
        )  # the all-gather left the replicas equal
    # TP2 against TP1, both distributed: two runs off the exact one by the reference's rounding each
    assert_within_oracle(got[0][0], mm.full_params_of_replica0(got), plain[0], oracle[0])


def test_distributed_optimizer_refuses_what_it_does_not_do_with_the_fix():
    with pytest.raises(RankError, match="use_distributed_optimizer=True supports fp32 and bf16, not fp16"):
        run_ranks(train, 2, use_distributed_optimizer=True, fp16=True, timeout=120)
    with pytest.raises(
        RankError, match="log_num_zeros_in_grad=True is not supported with use_distributed_optim"
    ):
        run_ranks(train, 2, use_distributed_optimizer=True, log_num_zeros_in_grad=True, timeout=120)


def test_a_ddp_that_reduce_scatters_needs_the_distributed_optimizer_in_the_optimizer_config():
    # DDP built with use_distributed_optimizer=True reduce-scatters the gradients (each rank's buffer is
    # reduced only in its partition) and the plain optimizer would step the rest unreduced: replicas
    # diverge, 10-50% off in 3 steps. Refused at construction, naming the flag to set.
    with pytest.raises(
        RankError, match=r"use_distributed_optimizer=True.*TeonOptimizerConfig\(use_distributed_optim"
    ):
        run_ranks(train, 2, layers=1, ddp_use_distributed_optimizer=True, timeout=120)


def _state_round_trip(rank, world_size):
    from megatron.core import parallel_state as ps
    from teonspeed.megatron import TeonOptimizerConfig, get_megatron_optimizer

    ps.initialize_model_parallel()
    models, opts = [], []
    for _ in range(2):
        model = mm.tiny_gpt()
        models.append(model)
        opts.append(get_megatron_optimizer(TeonOptimizerConfig(lr=0.02, clip_grad=0.0), [model]))
    for step in range(4):
        if step == 2:  # the second optimizer takes over the first one's state and weights
            opts[1].load_state_dict(copy.deepcopy(opts[0].state_dict()))  # torch would share tensors
            models[1].load_state_dict(models[0].state_dict())
        for model, opt in zip(models, opts):
            if step < 2 and model is models[1]:
                continue
            opt.zero_grad()
            tokens, position_ids, labels = mm.batch(seed=step)
            model(tokens, position_ids, None, labels=labels).mean().backward()
            opt.step()
    return [torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters())]


def test_state_dict_round_trip_through_megatrons_wrapper():
    assert all(run_ranks(_state_round_trip, 1, timeout=120)[0])


# A value other than teonspeed's default (and other than Megatron's, where Megatron holds the option), for
# every option: a new option without one fails test_every_teonspeed_option_is_reachable_from_the_config.
NON_DEFAULT = dict(
    lr=0.03,
    momentum=0.9,
    nesterov=True,
    weight_decay=0.02,
    orthogonalizer="svd",
    ns_steps=6,
    ns_dtype="fp32",
    ns_backend="torch",
    lr_scale="rms_match",
    teon_k=1,
    teon_mode=2,
    teon_types=("q",),
    split_fused=False,
    ht_power=0.25,
    ht_method="ns",
    ht_interval=2,
    adamw_lr=1e-3,
    adamw_betas=(0.8, 0.9),
    adamw_eps=1e-6,
    adamw_weight_decay=0.03,
    skip_nonfinite=False,
    cut_groups_at_stage_boundary=True,
    parallel_mode="replicated",
    overlap_waves=3,
    comm_dtype="bf16",
    cluster={"peak_flops": 1e12},
    qk_clip=50.0,
    qk_clip_alpha=0.25,
    qk_clip_log=True,
    teon_per_layer_fallback=True,
    grouping_rule=len,
)


def test_every_teonspeed_option_is_reachable_from_the_config():
    """Each option set through the field that holds it (its own, teon_/muon_-prefixed, or Megatron's name
    for it) reaches the optimizer's config; Megatron's other fields keep their meaning."""
    import dataclasses

    from teonspeed.config import OPTION_NAMES, make_config
    from teonspeed.megatron import MEGATRON_NAMES, TeonOptimizerConfig, teonspeed_options

    assert set(NON_DEFAULT) == set(OPTION_NAMES)
    fields = {f.name for f in dataclasses.fields(TeonOptimizerConfig)}
    for option, value in NON_DEFAULT.items():
        where = MEGATRON_NAMES.get(option) or next(
            n for n in (f"teon_{option}", f"muon_{option}", option) if n in fields
        )
        given = dict(zip(where, value)) if isinstance(where, tuple) else {where: value}
        if option == "weight_decay":  # Megatron's one weight decay sets both parts
            given["weight_decay"] = value
        config = TeonOptimizerConfig(optimizer="htmuon", **given)
        got = getattr(make_config("htmuon", teonspeed_options(config)), option)
        assert got == (tuple(value) if isinstance(value, list) else value), (option, where)
    defaults = teonspeed_options(TeonOptimizerConfig(lr=0.02))
    assert defaults["adamw_lr"] == 0.02 and defaults["adamw_betas"] == (0.9, 0.999)  # Megatron's lr and Adam
    assert defaults["nesterov"] is False and defaults["teon_k"] is None  # Megatron's default; teonspeed's


def test_megatron_muon_fields_teonspeed_does_not_read_are_refused_naming_the_option_to_set():
    from teonspeed.megatron import TeonOptimizerConfig

    with pytest.raises(
        ValueError,
        match=r"muon_tp_mode='duplicated' is Megatron's Muon's; teonspeed does not "
        r"read it \(leave it at 'blockwise'\): set parallel_mode",
    ):
        TeonOptimizerConfig(muon_tp_mode="duplicated")
    with pytest.raises(ValueError, match=r"muon_extra_scale_factor=2.0 .* set lr instead"):
        TeonOptimizerConfig(muon_extra_scale_factor=2.0)
    with pytest.raises(ValueError, match=r"option 'overlap_waves' must be an integer >= 1, got 0"):
        TeonOptimizerConfig(overlap_waves=0)  # checked when the config is made, not at the first step
    with pytest.raises(
        ValueError, match=r"optimizer must be one of \['htmuon', 'muon', 'teon'\], got 'adam'"
    ):
        TeonOptimizerConfig(optimizer="adam")


def _built_options(rank, world_size):
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel()
    _, opt = build(skip_nonfinite=False, overlap_waves=3, comm_dtype="bf16", cluster={"peak_flops": 1e12})
    c = opt.optimizer.config
    return c.skip_nonfinite, c.overlap_waves, c.comm_dtype, c.cluster


def test_the_builder_hands_the_options_megatron_could_not_set_before_to_the_optimizer():
    assert run_ranks(_built_options, 1, timeout=120)[0] == (False, 3, "bf16", {"peak_flops": 1e12})
