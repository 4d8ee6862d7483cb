"""A tiny LLaMA-named model and a DeepSpeed training loop that runs inside forked ranks."""

from __future__ import annotations

import copy
import os

import torch

from teonspeed.patches import cpu_shims

cpu_shims.apply()

import deepspeed  # noqa: E402
from support import tolerance as tol  # noqa: E402
from tiny_models import TinyLlama  # noqa: E402

VOCAB, SEQ, HIDDEN = 48, 8, 16


def TinyLM():
    return TinyLlama(layers=2, d=HIDDEN, kv=8, ffn=24, vocab=VOCAB)


def batch(step, rank, micro=0):
    g = torch.Generator().manual_seed(10_000 * step + 100 * rank + micro)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    return tokens, torch.roll(tokens, -1, dims=1)


def ds_config(optimizer="TEON", stage=0, bf16=False, params=None, **extra):
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": optimizer, "params": dict({"lr": 0.02, "adamw_lr": 3e-3}, **(params or {}))},
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10_000,
        "wall_clock_breakdown": False,
    }
    config.update(extra)
    return config


def train(rank, world_size, config, steps=5, model_fn=TinyLM, checkpoint=None, mpu=None, rounding=None):
    """Train `steps` optimizer steps; returns the losses (averaged over ranks) and final parameters.
    rounding: the gradients' relative rounding error; then also returns the bound that rounding puts on
    the weights through the steps taken (tol.RoundingBudget)."""
    import torch.distributed as dist

    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    deepspeed.init_distributed(dist_backend="gloo")
    model = model_fn()
    engine, opt, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=model.parameters(),
        config=copy.deepcopy(config),
        mpu=mpu() if mpu else None,
    )
    budget = tol.RoundingBudget(engine.basic_optimizer, eps_in=rounding) if rounding is not None else None
    losses = []
    start = 0
    if checkpoint and checkpoint.get("load"):
        engine.load_checkpoint(checkpoint["dir"])
        start = checkpoint["start"]
    for step in range(start, steps):
        for micro in range(engine.gradient_accumulation_steps()):
            tokens, labels = batch(step, dist.get_rank(), micro)
            loss = engine(tokens, labels)
            engine.backward(loss)
            engine.step()
        value = loss.detach().float().clone()
        dist.all_reduce(value)
        losses.append(float(value) / world_size)
        if checkpoint and checkpoint.get("save_at") == step + 1:
            engine.save_checkpoint(checkpoint["dir"])
    params = gathered_params(engine)
    result = losses, params, type(engine.optimizer).__name__, type(engine.basic_optimizer).__name__
    return result + (budget.weights(config["optimizer"]["params"]["lr"]),) if budget else result


def gathered_params(engine):
    """Name -> the whole parameter (fp32 copy); under ZeRO-3 gathered from the ranks' slices."""
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        return {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}


def train_megatron(rank, world_size, config, tp=1, steps=3):
    """A tiny megatron-core GPT at TP=`tp` inside the DeepSpeed engine, DeepSpeed's mpu given by teonspeed's
    adapter over megatron.core.parallel_state. Returns the (TP-rank, partition) of each parameter too."""
    from megatron.core import parallel_state as ps

    import megatron_models as mm
    from teonspeed.deepspeed import MegatronMPU

    deepspeed.init_distributed(dist_backend="gloo")
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    model = mm.tiny_gpt(mm.tiny_config(tp=tp))
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=copy.deepcopy(config), mpu=MegatronMPU()
    )
    dp_rank = ps.get_data_parallel_rank()
    losses = []
    for step in range(steps):
        tokens, position_ids, labels = mm.batch(seed=100 * step + dp_rank)
        loss = engine(tokens, position_ids, None, labels=labels).mean()
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    params = {
        n: (
            p.detach().float().clone(),
            getattr(p, "partition_dim", -1) if getattr(p, "tensor_model_parallel", False) else None,
            getattr(p, "partition_stride", 1),
            ps.get_tensor_model_parallel_rank(),
        )
        for n, p in engine.module.named_parameters()
    }
    return losses, params, dp_rank


def megatron_plain(rank, world_size, steps=3, dp=2, float64=False):
    """train_megatron's training without DeepSpeed: TEON in one process (TP=1), the DP ranks' batches
    averaged and clipped at DeepSpeed's default norm (1.0). float64: the same initial weights and
    training in fp64, tol's float64 oracle. Returns the weights, losses and gradient norms."""
    import teonspeed
    from megatron.core import parallel_state as ps

    import megatron_models as mm

    ps.initialize_model_parallel()
    model = mm.tiny_gpt(mm.tiny_config())
    if float64:
        model = model.double()
    opt = teonspeed.TEON(model, lr=0.02, adamw_lr=3e-3)
    losses, grad_norms = [], []
    for step in range(steps):
        opt.zero_grad()
        loss = 0.0
        for r in range(dp):
            tokens, position_ids, labels = mm.batch(seed=100 * step + r)
            value = model(tokens, position_ids, None, labels=labels).mean()
            (value / dp).backward()
            loss += float(value) / dp
        losses.append(loss)
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, losses, grad_norms


def train_comm(rank, world_size, config, steps=2):
    """Train, then report this rank's measured optimizer bytes of the last step, the plans' prediction,
    what the old DP all-gather of the momentum alone received, and the jobs (local, cut)."""
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    model = TinyLM()
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=copy.deepcopy(config)
    )
    opt = engine.basic_optimizer
    for step in range(steps):
        tokens, labels = batch(step, dist.get_rank())
        engine.backward(engine(tokens, labels))
        engine.step()
    stats = opt.comm_stats
    all_gather = sum(fp.partition_size * 4 * (fp.dp_size - 1) for fp in opt.partitions.values())
    jobs = [(j.cut, j.owner) for plan in opt.zero_plans for j in plan.jobs]
    matrices = sum(
        p.numel()
        for n, p in model.named_parameters()
        if n in {m.name for g in opt.grouping.groups for m in g.members}
    )
    return (
        (stats.sent, stats.received),
        opt.zero_expected_bytes(),
        all_gather,
        jobs,
        (stats.adamw_bytes, matrices),
    )
