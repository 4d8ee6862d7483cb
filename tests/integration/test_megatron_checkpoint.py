"""Megatron distributed checkpoints (megatron.core.dist_checkpointing, torch_dist format, on disk) carry
every optimizer state tensor and step counter: 4 steps == 2 steps + save + load into a fresh model and
optimizer + 2 steps, exactly, at TP=1 and TP=2; a TP=2 checkpoint reshards into TP=1. A plain state dict
cannot reshard and refuses another layout, naming both."""

import pytest
import torch

import megatron_models as mm
from support import tolerance as tol
from support.harness import RankError, run_ranks

STEPS, SAVE_AT = 4, 2


def build(tp, bf16=False, float64=False):
    from teonspeed.megatron import TeonOptimizerConfig, get_megatron_optimizer

    model = mm.tiny_gpt(mm.tiny_config(tp=tp))
    if bf16:
        model = model.bfloat16()
    if float64:  # the same initial weights and training in fp64: tol.oracle_bound's oracle
        model = model.double()
    opt = get_megatron_optimizer(
        TeonOptimizerConfig(
            optimizer="teon", lr=0.02, adamw_lr=3e-3, weight_decay=0.01, clip_grad=0.0, bf16=bf16
        ),
        [model],
    )
    return model, opt


def train(model, opt, steps):
    for step in steps:
        opt.zero_grad()
        tokens, position_ids, labels = mm.batch(seed=step)
        model(tokens, position_ids, None, labels=labels).float().mean().backward()
        opt.step()


def save(model, opt, directory):
    import os

    from megatron.core import dist_checkpointing

    os.makedirs(directory, exist_ok=True)
    model_sd = model.sharded_state_dict()
    dist_checkpointing.save(
        {"model": model_sd, "optimizer": opt.sharded_state_dict(model_sd)},
        directory,
        sharded_strategy=("torch_dist", 1),
    )


def load(model, opt, directory):
    from megatron.core import dist_checkpointing

    model_sd = model.sharded_state_dict()
    loaded = dist_checkpointing.load(
        {"model": model_sd, "optimizer": opt.sharded_state_dict(model_sd, is_loading=True)}, directory
    )
    model.load_state_dict(loaded["model"])
    opt.load_state_dict(loaded["optimizer"])


def snapshot(model, opt):
    from megatron.core import parallel_state as ps

    inner = opt.optimizer
    state = {
        f"{inner.name_of(p)}.{key}": (v.detach().clone() if torch.is_tensor(v) else v)
        for p, s in inner.state.items()
        for key, v in s.items()
        if key != "step" or "exp_avg" in s
    }
    weights = {
        n: (
            p.detach().float().clone(),
            getattr(p, "partition_dim", -1) if getattr(p, "tensor_model_parallel", False) else None,
            getattr(p, "partition_stride", 1),
            ps.get_tensor_model_parallel_rank(),
        )
        for n, p in model.named_parameters()
    }
    return weights, state, [g["step"] for g in inner.param_groups]


def uninterrupted_and_resumed(rank, world_size, directory, bf16=False):
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=world_size)
    model, opt = build(world_size, bf16)
    train(model, opt, range(STEPS))
    reference = snapshot(model, opt)
    model, opt = build(world_size, bf16)
    train(model, opt, range(SAVE_AT))
    save(model, opt, directory)
    model, opt = build(world_size, bf16)
    load(model, opt, directory)
    train(model, opt, range(SAVE_AT, STEPS))
    return reference, snapshot(model, opt)


# (Megatron's bf16 wrapper accepts only CUDA tensors: its resume is checked on GPU machines only.)
@pytest.mark.parametrize("tp", [1, 2], ids=["TP1", "TP2"])
def test_resume_from_a_torch_dist_checkpoint_is_exact(tp, tmp_path):
    for reference, resumed in run_ranks(uninterrupted_and_resumed, tp, str(tmp_path / "ckpt"), timeout=180):
        (ref_weights, ref_state, ref_steps), (weights, state, steps) = reference, resumed
        assert steps == ref_steps == [STEPS] * len(steps)
        assert set(state) == set(ref_state) and any(k.endswith("momentum_buffer") for k in state)
        for key, value in ref_state.items():
            assert torch.equal(torch.as_tensor(state[key]), torch.as_tensor(value)), key
        for name, (value, *_) in ref_weights.items():
            assert torch.equal(weights[name][0], value), name


def train_then_save(rank, world_size, directory, steps):
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=world_size)
    model, opt = build(world_size)
    train(model, opt, range(steps))
    save(model, opt, directory)
    return opt.state_dict() if world_size > 1 else None


def load_then_train(rank, world_size, directory, plain_state=None):
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel()
    model, opt = build(1)
    if plain_state is not None:
        opt.load_state_dict(plain_state)
    load(model, opt, directory)
    train(model, opt, range(SAVE_AT, STEPS))
    return snapshot(model, opt)


def test_a_tp2_checkpoint_resumes_at_tp1(tmp_path):
    directory = str(tmp_path / "ckpt")
    run_ranks(train_then_save, 2, directory, SAVE_AT, timeout=120)
    weights, state, steps = run_ranks(load_then_train, 1, directory, timeout=120)[0]
    ref_weights = run_ranks(_four_steps_at_tp1, 1, timeout=120)[0]
    oracle = run_ranks(_four_steps_at_tp1, 1, float64=True, timeout=120)[0]
    assert steps == [STEPS] * len(steps)
    # TP=2 rounds its forward differently for the first two steps: within the fp64 oracle's measure of the
    # TP=1 run's own rounding
    first = {name: value[0] for name, value in ref_weights.items()}
    bound = tol.oracle_bound(first, {name: value[0] for name, value in oracle.items()})
    assert tol.distance({name: value[0] for name, value in weights.items()}, first) <= bound


def _four_steps_at_tp1(rank, world_size, float64=False):
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel()
    model, opt = build(1, float64=float64)
    train(model, opt, range(STEPS))
    return snapshot(model, opt)[0]


def test_a_plain_tp2_state_dict_is_refused_at_tp1_naming_both_layouts(tmp_path):
    plain = run_ranks(train_then_save, 2, str(tmp_path / "ckpt"), SAVE_AT, timeout=120)[0]
    with pytest.raises(
        RankError, match=r"saved with \{'tp': 2, 'expert_tp': 2\}, loading into \{'tp': 1, 'expert_tp': 1\}"
    ):
        run_ranks(load_then_train, 1, str(tmp_path / "ckpt"), plain_state=plain, timeout=120)
