"""`"optimizer": {"type": "TEON"}` in DeepSpeed configs: ZeRO stages agree, DeepSpeed's engine steps our
optimizer exactly as a plain loop would, DeepSpeed's own Muon is an external oracle, checkpoints resume."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ds_helpers as h
import teonspeed
from support import tolerance as tol
from support.harness import RankError, free_port, run_ranks
from support.launcher import run_deepspeed, script_env

TYPES = {"TEON": teonspeed.TEON, "TeonspeedMuon": teonspeed.Muon, "TeonspeedHTMuon": teonspeed.HTMuon}
REPO = Path(__file__).resolve().parents[2]


def run(config, world_size=2, **kw):
    return run_ranks(h.train, world_size, config, timeout=120, **kw)[0]


PARAMS = {"lr": 0.02, "adamw_lr": 3e-3}  # ds_config's default params
DEFAULT_CLIP = 1.0  # DeepSpeed clips to 1.0 when the config does not name gradient_clipping


def oracle(optimizer, params_cfg=PARAMS, steps=5, world_size=2, lrs=None, clip=DEFAULT_CLIP, accumulation=1):
    """The plain loop in fp32 and in fp64: the fp64 run is tol's float64 oracle of this training, whose
    distance from the fp32 one measures the training's rounding (tol.oracle_bound)."""
    lrs = lrs or [params_cfg["lr"]] * steps
    exact = {k: v for k, v in params_cfg.items() if k != "ns_dtype"}  # fp64 data: an fp64 iteration
    return (
        plain_run(optimizer, params_cfg, steps, world_size, lrs, clip, accumulation, torch.float32),
        plain_run(optimizer, exact, steps, world_size, lrs, clip, accumulation, torch.float64),
    )


def assert_same_training(run_a, run_b, ref32, ref64, measured=False):
    """Two runs of the same training (losses, weights) equal but for rounding: the weights within
    tol.oracle_bound (2λ·e for two runs neither of which is the measured one); the losses within
    ‖∇L‖ times that, plus their own rounding (tol.losses_bound)."""
    bound = tol.oracle_bound(ref32.weights, ref64.weights, measured)
    assert tol.distance(run_a[1], run_b[1]) <= bound, (tol.distance(run_a[1], run_b[1]), bound)
    own_rounding = tol.losses_bound(ref32.losses, ref64.losses, measured, h.VOCAB)
    for a, b, own, g in zip(run_a[0], run_b[0], own_rounding, ref64.grad_norms):
        assert abs(a - b) <= own + g * bound, (a, b)


@pytest.mark.parametrize("optimizer", sorted(TYPES))
def test_zero_stages_0_1_2_agree_in_fp32(optimizer):
    results = [run(h.ds_config(optimizer, stage=s)) for s in (0, 1, 2)]
    assert [r[2] for r in results] == [
        TYPES[optimizer].__name__,
        "DeepSpeedZeroOptimizer",
        "DeepSpeedZeroOptimizer",
    ]
    ref32, ref64 = oracle(optimizer)
    for result in results[1:]:
        assert_same_training(result, results[0], ref32, ref64)


def test_zero_stages_agree_in_bf16_and_every_bf16_wrapper_is_close_to_fp32():
    variants = [
        (0, {}, "FP16_UnfusedOptimizer"),
        (1, {}, "DeepSpeedZeroOptimizer"),
        (2, {}, "DeepSpeedZeroOptimizer"),
        (1, {"data_types": {"grad_accum_dtype": "fp32"}}, "BF16_Optimizer"),
    ]
    fp32 = run(h.ds_config("TEON", stage=0))
    results = []
    for stage, extra, wrapper in variants:
        losses, params, final, basic, budget = run(
            h.ds_config("TEON", stage=stage, bf16=True, **extra), rounding=tol.sums(torch.bfloat16, h.HIDDEN)
        )
        assert (final, basic) == (wrapper, "TEON")
        results.append((losses, params, budget))
    _, exact = oracle("TEON")
    # stage 0's bf16 training measured against the fp64 oracle: every other wrapper is within λ as
    # accurate (two runs neither of which is exact: 2λ·e₁₆)
    e16 = tol.distance(results[0][1], exact.weights)
    for losses, params, _ in results[1:]:
        assert tol.distance(params, results[0][1]) <= 2 * tol.LAMBDA * e16
    # and within the bf16 rounding budget of the fp32 run: the bf16 forward/backward's gradients are off by
    # sums(bf16, hidden) relative, grown through every step the optimizer took (tol.RoundingBudget)
    for losses, params, budget in results:
        assert tol.distance(params, fp32[1]) <= budget
        for a, b, g in zip(losses, fp32[0], exact.grad_norms):
            assert abs(a - b) <= g * budget + tol.sums(torch.bfloat16, h.HIDDEN) * abs(b)


class PlainRun:
    def __init__(self, weights, losses, grad_norms):
        self.weights, self.losses, self.grad_norms = weights, losses, grad_norms


def plain_run(optimizer, params_cfg, steps, world_size, lrs, clip=None, accumulation=1, dtype=torch.float32):
    """The oracle: our optimizer in one process, fed the rank-averaged (accumulated, clipped) gradients
    and the learning rates DeepSpeed's scheduler produced. `clip` must be the engine's gradient_clipping:
    DeepSpeed clips to 1.0 when the config does not name it. dtype=fp64: the same initial weights and
    training in fp64. Records each step's loss (the ranks' average, as ds_helpers.train reports it) and
    gradient norm (before clipping)."""
    model = h.TinyLM().to(dtype)
    opt = TYPES[optimizer](model.named_parameters(), **params_cfg)
    losses, grad_norms = [], []
    for step in range(steps):
        opt.zero_grad()
        loss = 0.0
        for rank in range(world_size):
            for micro in range(accumulation):
                tokens, labels = h.batch(step, rank, micro)
                value = model(tokens, labels)
                (value / (world_size * accumulation)).backward()
            loss += float(value) / world_size  # the last micro-batch's, as the engine's loop reports
        losses.append(loss)
        grad_norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])))
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        for group in opt.param_groups:
            group["lr"] = lrs[step]
        opt.step()
    return PlainRun({n: p.detach().clone() for n, p in model.named_parameters()}, losses, grad_norms)


def plain_loop(optimizer, params_cfg, steps, world_size, lrs, clip=None, accumulation=1):
    return plain_run(optimizer, params_cfg, steps, world_size, lrs, clip, accumulation).weights


def _train_recording_lr(rank, world_size, config, steps):
    """Like ds_helpers.train, and also returns the lr of every param group at every step."""
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    model = h.TinyLM()
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=copy.deepcopy(config)
    )
    lrs = []
    for step in range(steps):
        lrs.append([g["lr"] for g in engine.optimizer.param_groups])
        for micro in range(engine.gradient_accumulation_steps()):
            tokens, labels = h.batch(step, dist.get_rank(), micro)
            engine.backward(engine(tokens, labels))
            engine.step()
    return lrs, {n: p.detach().clone() for n, p in engine.module.named_parameters()}


SCHEDULERS = {
    "WarmupLR": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.02, "warmup_num_steps": 3, "warmup_type": "linear"},
    "WarmupDecayLR": {
        "warmup_min_lr": 0.0,
        "warmup_max_lr": 0.02,
        "warmup_num_steps": 2,
        "total_num_steps": 5,
        "warmup_type": "linear",
    },
    "WarmupCosineLR": {
        "total_num_steps": 5,
        "warmup_num_steps": 2,
        "warmup_min_ratio": 0.0,
        "cos_min_ratio": 0.1,
    },
}


@pytest.mark.parametrize(
    "stage,scheduler", [(0, "WarmupLR"), (2, "WarmupLR"), (2, "WarmupDecayLR"), (2, "WarmupCosineLR")]
)
def test_engine_with_clipping_scheduler_and_accumulation_equals_a_plain_loop(stage, scheduler):
    params_cfg = {"lr": 0.02, "adamw_lr": 3e-3, "weight_decay": 0.1}
    config = h.ds_config(
        "TEON",
        stage=stage,
        params=params_cfg,
        gradient_clipping=0.05,
        gradient_accumulation_steps=2,
        scheduler={"type": scheduler, "params": SCHEDULERS[scheduler]},
    )
    lrs, params = run_ranks(_train_recording_lr, 2, config, 4, timeout=120)[0]
    assert all(len(set(step)) == 1 for step in lrs)  # one schedule drives the AdamW and the matrix groups
    assert lrs[0][0] == 0.0 and lrs[-1][0] > 0
    ref32, ref64 = oracle("TEON", params_cfg, 4, 2, [step[0] for step in lrs], clip=0.05, accumulation=2)
    assert tol.distance(params, ref32.weights) <= tol.oracle_bound(ref32.weights, ref64.weights)


@pytest.mark.parametrize("optimizer", ["TEON", "TeonspeedMuon"])
def test_one_rank_engine_equals_a_plain_loop_clipped_at_deepspeeds_default_norm(optimizer):
    """A config without gradient_clipping clips the global gradient norm to 1.0 (DeepSpeed's default), at
    every DP size: this one-rank batch has norm 1.31, so an unclipped oracle drifts (2.6e-6 after one step,
    where only AdamW's eps sees the scale; 4.9e-4 after three, as the momentum mixes differently scaled
    gradients), while the DP=2 average (norm 0.95) is never clipped. Stage 2 runs the flat path at dp_size
    1."""
    from deepspeed.runtime.constants import GRADIENT_CLIPPING_DEFAULT

    assert GRADIENT_CLIPPING_DEFAULT == 1.0
    # an fp32 iteration whatever TEONSPEED_CPU_BF16 says: a bf16 one's rounding would hide the clip's effect
    fp32 = dict(PARAMS, ns_dtype="fp32")
    (clipped, clipped64), (unclipped, unclipped64) = (
        oracle(optimizer, fp32, steps=3, world_size=1, clip=c) for c in (1.0, None)
    )
    bound = tol.oracle_bound(clipped.weights, clipped64.weights)
    # the clipping is active (its effect is beyond the rounding), so the comparisons below can fail
    assert tol.distance(clipped.weights, unclipped.weights) > bound
    default = run(h.ds_config(optimizer, stage=2, params=fp32), world_size=1, steps=3)[1]
    assert tol.distance(default, clipped.weights) <= bound
    off = run(h.ds_config(optimizer, stage=0, params=fp32, gradient_clipping=0.0), world_size=1, steps=3)[1]
    assert tol.distance(off, unclipped.weights) <= tol.oracle_bound(unclipped.weights, unclipped64.weights)


def test_scheduler_lr_zero_freezes_both_sides():
    config = h.ds_config(
        "TEON",
        params={"weight_decay": 0.1, "adamw_weight_decay": 0.1},
        scheduler={
            "type": "WarmupLR",
            "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.02, "warmup_num_steps": 10},
        },
    )
    _, params, *_ = run(config | {"train_micro_batch_size_per_gpu": 2}, steps=1)
    initial = dict(h.TinyLM().named_parameters())
    for n, p in params.items():
        assert torch.equal(p, initial[n].detach()), n


def test_our_muon_matches_deepspeeds_builtin_muon_at_stage_0():
    shared = {"lr": 0.02, "weight_decay": 0.01}
    ours = run(
        h.ds_config(
            "TeonspeedMuon",
            params=dict(
                shared,
                adamw_lr=3e-3,
                adamw_betas=[0.9, 0.95],
                adamw_eps=1e-8,
                adamw_weight_decay=0.01,
                ns_dtype="bf16",
            ),
        )
    )
    theirs = run(
        h.ds_config(
            "Muon",
            params=dict(
                shared,
                muon_lr=0.02,
                adam_lr=3e-3,
                betas=[0.9, 0.95],
                eps=1e-8,
                momentum=0.95,
                ns_method="standard",
                torch_adam=True,
            ),
        )
    )
    assert theirs[3] == "MuonWithAuxAdam" and ours[3] == "Muon"
    # both compute the same rule with a bf16 iteration: DeepSpeed's, measured against the fp64 oracle of the
    # rule, sets the scale; ours is within (1 + λ) of it (tol.oracle_bound with theirs as the reference)
    _, exact = oracle(
        "TeonspeedMuon",
        dict(shared, adamw_lr=3e-3, adamw_betas=[0.9, 0.95], adamw_eps=1e-8, adamw_weight_decay=0.01),
    )
    bound = tol.oracle_bound(theirs[1], exact.weights)
    assert tol.distance(ours[1], theirs[1]) <= bound
    scale = max(abs(a - b) for a, b in zip(theirs[0], exact.losses))
    for a, b, g in zip(ours[0], theirs[0], exact.grad_norms):
        assert abs(a - b) <= (1 + tol.LAMBDA) * scale + g * bound


def _tagged_model():
    model = h.TinyLM()
    for p in model.parameters():
        p.use_muon = p.ndim >= 2  # as DeepSpeed's set_optimizer_flags would for "type": "Muon"
    return model


def test_deepspeeds_builtin_muon_path_does_not_take_over_our_optimizer():
    reference = run(h.ds_config("TeonspeedMuon", stage=0))
    tagged = run(h.ds_config("TeonspeedMuon", stage=2), model_fn=_tagged_model)
    assert tagged[2] == "DeepSpeedZeroOptimizer"
    assert_same_training(tagged, reference, *oracle("TeonspeedMuon"))  # DeepSpeed's muon_update would be O(1)


@pytest.mark.parametrize("stage", [0, 2])
def test_checkpoint_resume_matches_an_uninterrupted_run(stage, tmp_path):
    config = h.ds_config("TEON", stage=stage)
    full = run(config, steps=6)
    run(config, steps=3, checkpoint={"dir": str(tmp_path), "save_at": 3})
    resumed = run(config, steps=6, checkpoint={"dir": str(tmp_path), "load": True, "start": 3})
    assert resumed[0] == full[0][3:]
    for n, p in resumed[1].items():
        assert torch.equal(p, full[1][n]), n


def test_unknown_option_is_refused_with_the_valid_names():
    with pytest.raises(RankError, match="unknown option\\(s\\) 'teon_kk' \\(did you mean 'teon_k'\\?\\)"):
        run(h.ds_config("TEON", params={"teon_kk": 2}))


def _instance_config(config):
    """The same config with our optimizer passed as an instance (`deepspeed.initialize(optimizer=...)`)."""
    return {k: v for k, v in config.items() if k != "optimizer"} | {"zero_allow_untested_optimizer": True}


def _engine_with_instance(rank, world_size, config):
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    model = h.TinyLM()
    deepspeed.initialize(model=model, optimizer=teonspeed.TEON(model, lr=0.02), config=copy.deepcopy(config))


def _refusals(config):
    """The errors of both ranks, through the JSON type and through an instance: every rank raises the same
    one line (no rank waits in a collective)."""
    texts = []
    for fn, cfg in ((h.train, config), (_engine_with_instance, _instance_config(config))):
        with pytest.raises(RankError) as err:
            run_ranks(fn, 2, cfg, timeout=120)
        messages = [line for line in str(err.value).splitlines() if line.startswith("ValueError: teonspeed:")]
        assert len(messages) == 2 and len(set(messages)) == 1, str(err.value)[-2000:]
        texts.append(messages[0])
    return texts


def test_fp16_is_refused_naming_bf16_whatever_the_cpu():
    # DeepSpeed's CPU accelerator takes fp16 only where the CPU has it (torch.ops.mkldnn._is_mkldnn_fp16_
    # supported()); teonspeed refuses it first, on every machine: its fp16 wrappers are not verified with us.
    for text in _refusals(h.ds_config("TEON") | {"fp16": {"enabled": True}}):
        assert "not verified under DeepSpeed's fp16" in text and '"bf16": {"enabled": true}' in text


_EXIT_PROBE = """
import atexit, json, sys
import torch, torch.distributed as dist
atexit.register(lambda: print("group alive at exit:", dist.is_initialized(), flush=True))  # runs last
import ds_helpers as h, teonspeed, deepspeed
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%d", rank=0, world_size=1)
model = h.TinyLM()
deepspeed.initialize(model=model, model_parameters=model.parameters(), config=json.loads(sys.argv[1]))
"""


def test_a_refused_engine_exits_without_the_process_group_alive():
    """A rank that exits by an uncaught refusal with its gloo group alive can abort in the group's teardown
    ("terminate called without an active exception", exit -6; about one exit in twelve here). The refusal
    tears the group down at exit; the script's own atexit hook, registered first, runs last and sees it."""
    env = script_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    refused = h.ds_config("TEON", stage=3)
    refused["zero_optimization"]["offload_param"] = {"device": "cpu"}
    config = json.dumps(refused)
    proc = subprocess.run(
        [sys.executable, "-c", _EXIT_PROBE % free_port(), config],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "ValueError: teonspeed: optimizer 'TEON' does not support ZeRO-3 offload" in proc.stderr
    assert "group alive at exit: False" in proc.stdout, proc.stdout[-2000:]


def _engine_logging(rank, world_size, config, tp=1):
    """Build an engine from `config` and return the warnings DeepSpeed's logger printed on this rank."""
    import logging

    import deepspeed
    from deepspeed.utils import logger

    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logger.addHandler(handler)
    deepspeed.init_distributed(dist_backend="gloo")
    if tp > 1:
        import megatron_models as mm
        from megatron.core import parallel_state as ps
        from teonspeed.deepspeed import MegatronMPU

        ps.initialize_model_parallel(tensor_model_parallel_size=tp)
        model, mpu = mm.tiny_gpt(mm.tiny_config(tp=tp)), MegatronMPU()
    else:
        model, mpu = h.TinyLM(), None
    deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=copy.deepcopy(config), mpu=mpu
    )
    logger.removeHandler(handler)
    return [r for r in records if "teonspeed" in r]


def test_deepspeeds_own_muon_type_warns_once_naming_ours():
    config = h.ds_config(
        "Muon", params={"muon_lr": 0.02, "teon_k": 2, "orthogonalizer": "polar_express", "torch_adam": True}
    )  # not FusedAdam: no JIT build
    first, second = run_ranks(_engine_logging, 2, config, timeout=120)
    assert second == [] and len(first) == 1 and "\n" not in first[0]  # one line, rank 0 only
    assert '"type": "Muon" runs DeepSpeed\'s own Muon' in first[0] and '"TeonspeedMuon"' in first[0]
    assert "ignores adamw_lr, orthogonalizer, teon_k" in first[0] and "tensor parallelism" not in first[0]
    tp = run_ranks(_engine_logging, 2, config, tp=2, timeout=180)[0]
    assert len(tp) == 1
    assert "under tensor parallelism (2) DeepSpeed's Muon orthogonalizes each shard alone" in tp[0]
    assert run_ranks(_engine_logging, 1, h.ds_config("TeonspeedMuon"), timeout=120) == [[]]  # ours: silent


def test_unsupported_deepspeed_version_is_refused_naming_both(monkeypatch):
    import deepspeed
    from teonspeed.patches import deepspeed_0_19

    monkeypatch.setattr(deepspeed, "__version__", "0.20.1")
    with pytest.raises(
        deepspeed_0_19.UnsupportedVersion, match="written for deepspeed 0.19.8.*0.20.1 is installed"
    ):
        deepspeed_0_19.check_version()


def test_deepspeed_launcher_trains_from_a_json_config(tmp_path):
    config = h.ds_config("TEON", stage=2)
    (tmp_path / "ds_config.json").write_text(json.dumps(config))
    out = tmp_path / "losses.json"
    script = Path(__file__).parent / "ds_launch_script.py"
    run_deepspeed(script, str(tmp_path / "ds_config.json"), str(out), timeout=240)
    result = json.loads(out.read_text())
    assert result["optimizer"] == "DeepSpeedZeroOptimizer" and result["basic"] == "TEON"
    assert result["world_size"] == 2 and len(result["losses"]) == 4


@pytest.mark.parametrize("stage", [0, 2])
def test_megatron_tp2_dp2_through_the_engine_equals_tp1(stage):
    import megatron_models as mm

    config = h.ds_config("TEON", stage=stage)
    ref = run_ranks(h.train_megatron, 2, config, timeout=180)  # TP=1 x DP=2
    got = run_ranks(h.train_megatron, 4, config, tp=2, timeout=180)  # TP=2 x DP=2
    # TP=2 splits the matmuls' reductions: fp32 rounding differences in the gradients grow through three
    # TEON steps (Polar Express grows rank-deficient directions up to ×967). The same training in one
    # process, in fp32 and fp64, measures that rounding (tol.oracle_bound; 2λ·e between two runs neither
    # of which was measured); a sharding or layout mistake is O(1e-2) (59% for the old named_parameters()
    # bug).
    plain32, losses32, _ = run_ranks(h.megatron_plain, 1, timeout=180)[0]
    plain64, losses64, grad_norms = run_ranks(h.megatron_plain, 1, float64=True, timeout=180)[0]
    bound = tol.oracle_bound(plain32, plain64, measured=False)
    assert tol.distance(mm.full_params_of_replica0(got), {n: v[0] for n, v in ref[0][1].items()}) <= bound
    for a, b, own, g in zip(got[0][0], ref[0][0], tol.losses_bound(losses32, losses64, False), grad_norms):
        assert abs(a - b) <= own + g * bound


@pytest.mark.parametrize(
    "path", sorted((REPO / "configs" / "deepspeed").glob("*.json")), ids=lambda p: p.stem
)
def test_shipped_deepspeed_configs_train(path):
    config = json.loads(path.read_text())
    config["train_micro_batch_size_per_gpu"] = 2
    config["scheduler"]["params"].update(total_num_steps=10, warmup_num_steps=1)
    losses, _, final, basic = run(config, steps=2)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    expected = {"TEON": "TEON", "TeonspeedMuon": "Muon", "TeonspeedHTMuon": "HTMuon", "AdamW": "AdamW"}
    assert basic == expected[config["optimizer"]["type"]]


@pytest.mark.parametrize("stage,world_size", [(1, 3), (2, 2)])
def test_zero_moves_only_the_cut_matrices_as_planned(stage, world_size):
    results = run_ranks(h.train_comm, world_size, h.ds_config("TEON", stage=stage), timeout=120)
    jobs = results[0][3]
    assert any(cut for cut, _ in jobs) and not all(cut for cut, _ in jobs)
    for measured, predicted, all_gather, rank_jobs, (adamw_bytes, matrices) in results:
        assert rank_jobs == jobs  # every rank derived the same plan
        assert measured == predicted
        assert measured[1] < all_gather  # less than the old momentum all-gather alone received
        # comm_stats.adamw_bytes: what AdamW moves for the same matrices in this layout, fp32: DeepSpeed's
        # all-reduce of their gradients (2(D-1)/D) and all-gather of their parameters ((D-1)/D)
        assert adamw_bytes == matrices * 4 * 3 * (world_size - 1) // world_size > max(measured)
    assert sum(r[0][0] for r in results) == sum(r[0][1] for r in results) > 0


def test_megatron_tp2_dp2_zero_1_and_2_equal_zero_0():
    """The flat step's TP gather among the ranks holding a partition index, and its cut-job exchange over
    tp x dp, give ZeRO-0's update."""
    import megatron_models as mm

    results = {
        s: mm.full_params_of_replica0(
            run_ranks(h.train_megatron, 4, h.ds_config("TEON", stage=s), tp=2, timeout=180)
        )
        for s in (0, 1, 2)
    }
    # the same training's rounding, measured in one process (fp32 against fp64): 2λ·e between two runs
    plain32, plain64 = (run_ranks(h.megatron_plain, 1, float64=f, timeout=180)[0][0] for f in (False, True))
    for stage in (1, 2):
        bound = tol.oracle_bound(plain32, plain64, measured=False)
        assert tol.distance(results[stage], results[0]) <= bound, stage
