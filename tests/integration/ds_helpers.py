"""A tiny LLaMA-named model and a DeepSpeed training loop that runs inside forked ranks."""
from __future__ import annotations

import copy
import os

import torch

from teonspeed.testing import cpu_shims

cpu_shims.apply()

import deepspeed  # noqa: E402

VOCAB, SEQ, HIDDEN = 48, 8, 16


class TinyLM(torch.nn.Module):
    def __init__(self, layers=2, d=HIDDEN, kv=8, ffn=24):
        super().__init__()
        torch.manual_seed(0)
        self.embed_tokens = torch.nn.Embedding(VOCAB, d)
        self.layers = torch.nn.ModuleList()
        for _ in range(layers):
            block = torch.nn.Module()
            block.self_attn = torch.nn.Module()
            for name, rows in (("q_proj", d), ("k_proj", kv), ("v_proj", kv), ("o_proj", d)):
                setattr(block.self_attn, name, torch.nn.Linear(d if name != "o_proj" else d, rows if name != "o_proj" else d, bias=False))
            block.self_attn.o_proj = torch.nn.Linear(d + 2 * kv, d, bias=False)
            block.mlp = torch.nn.Module()
            block.mlp.up_proj = torch.nn.Linear(d, ffn, bias=False)
            block.mlp.down_proj = torch.nn.Linear(ffn, d, bias=False)
            block.norm = torch.nn.LayerNorm(d)
            self.layers.append(block)
        self.lm_head = torch.nn.Linear(d, VOCAB, bias=False)

    def forward(self, tokens, labels):
        h = self.embed_tokens(tokens)
        for b in self.layers:
            x = b.norm(h)
            a = b.self_attn
            h = h + a.o_proj(torch.cat([a.q_proj(x), torch.tanh(a.k_proj(x)), a.v_proj(x)], dim=-1))
            h = h + b.mlp.down_proj(torch.nn.functional.silu(b.mlp.up_proj(x)))
        logits = self.lm_head(h).float()
        return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))


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


def train(rank, world_size, config, steps=5, model_fn=TinyLM, checkpoint=None, mpu=None):
    """Train `steps` optimizer steps; returns the losses (averaged over ranks) and final parameters."""
    import torch.distributed as dist
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    deepspeed.init_distributed(dist_backend="gloo")
    model = model_fn()
    engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                             config=copy.deepcopy(config), mpu=mpu() if mpu else None)
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
    params = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
    return losses, params, type(engine.optimizer).__name__, type(engine.basic_optimizer).__name__


def train_megatron(rank, world_size, config, tp=1, steps=3):
    """A tiny megatron-core GPT at TP=`tp` inside the DeepSpeed engine, DeepSpeed's mpu given by teonspeed's
    adapter over megatron.core.parallel_state. Returns the (TP-rank, partition) of each parameter too."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    import megatron_models as mm
    from teonspeed.deepspeed import MegatronMPU
    deepspeed.init_distributed(dist_backend="gloo")
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    model = mm.tiny_gpt(mm.tiny_config(tp=tp))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=copy.deepcopy(config),
                                      mpu=MegatronMPU())
    dp_rank = ps.get_data_parallel_rank()
    losses = []
    for step in range(steps):
        tokens, position_ids, labels = mm.batch(seed=100 * step + dp_rank)
        loss = engine(tokens, position_ids, None, labels=labels).mean()
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    params = {n: (p.detach().float().clone(), getattr(p, "partition_dim", -1) if getattr(p, "tensor_model_parallel", False)
                  else None, getattr(p, "partition_stride", 1), ps.get_tensor_model_parallel_rank())
              for n, p in engine.module.named_parameters()}
    return losses, params, dp_rank
