"""Megatron-core's `use_distributed_optimizer=True` with teonspeed: Megatron's own buckets and collectives.

Megatron DDP with the distributed optimizer reduce-scatters each bucket's gradients so that DP rank d
holds the d-th equal partition of the bucket, and after the step all-gathers the bucket's parameters
from those partitions. teonspeed steps exactly that partition: the AdamW parameters and the momentum
element-wise, and the orthogonalization planned like DeepSpeed's ZeRO-1/2 partitions
(`parallel/zero_partition.py`): a matrix inside one partition is computed there (TP-gathered if sharded),
only matrices cut by a partition boundary travel. Megatron's `DistributedOptimizer` class itself is not
used: it accepts only Adam-family inner optimizers and (in 0.16) CUDA tensors.
"""
from __future__ import annotations

from typing import List

import torch

from .optim import OrthoOptimizer
from .parallel.flat import BucketShard, FlatEntry, FlatPartition


_NO_CHECKPOINT = ("teonspeed: saving or loading optimizer state with use_distributed_optimizer=True is not supported "
                  "yet (the state lives in per-rank bucket partitions); train with use_distributed_optimizer=False "
                  "to checkpoint the optimizer")


def check_supported(config, model_chunks) -> None:
    """Refuse, before any state exists, what this path does not do (yet)."""
    if config.bf16 or config.fp16:
        raise ValueError("teonspeed: use_distributed_optimizer=True is supported in fp32 only (bf16/fp16 need "
                         "fp32 main-parameter shards); set use_distributed_optimizer=False for bf16/fp16")
    if config.clip_grad > 0:
        raise ValueError("teonspeed: clip_grad with use_distributed_optimizer=True is not supported yet (the norm "
                         "needs the partitions of every rank); set clip_grad=0.0 or use_distributed_optimizer=False")
    for chunk in model_chunks:
        ddp_config = getattr(chunk, "ddp_config", None)
        if ddp_config is None or not ddp_config.use_distributed_optimizer:
            raise ValueError("teonspeed: use_distributed_optimizer=True needs the model chunks wrapped in megatron "
                             "DistributedDataParallel with DistributedDataParallelConfig(use_distributed_optimizer=True)")
        if ddp_config.overlap_param_gather:
            raise ValueError("teonspeed: overlap_param_gather=True is not supported with teonspeed's distributed "
                             "optimizer; set DistributedDataParallelConfig(overlap_param_gather=False)")


def bucket_shards(optimizer: OrthoOptimizer, model_chunks) -> List[BucketShard]:
    """This rank's partition of every DDP bucket, with every parameter's offset in its bucket."""
    shards = []
    for chunk in model_chunks:
        for buffer in list(chunk.buffers) + list(getattr(chunk, "expert_parallel_buffers", [])):
            group = buffer.data_parallel_group
            size, rank = group.size(), group.rank()
            for bucket in buffer.buckets:
                entries = sorted((FlatEntry(optimizer._names[id(p)], buffer.param_index_map[p][0] - bucket.offset,
                                            tuple(p.shape)) for p in bucket.params), key=lambda e: e.offset)
                n = bucket.grad_data.numel() // size
                shards.append(BucketShard(FlatPartition(entries, n, group, rank, size),
                                          bucket.grad_data[rank * n:(rank + 1) * n],
                                          bucket.param_data[rank * n:(rank + 1) * n]))
    return shards


def wrap(optimizer: OrthoOptimizer, config, model_chunks):
    """The MegatronOptimizer: Megatron's FP32 wrapper whose step ends with DDP's parameter all-gather."""
    from .megatron import TeonFP32Optimizer

    class TeonDistributedOptimizer(TeonFP32Optimizer):
        @torch.no_grad()
        def step(self):
            result = super().step()
            for chunk in model_chunks:
                chunk.start_param_sync(force_sync=True)
            return result

        def state_dict(self):
            raise NotImplementedError(_NO_CHECKPOINT)

        def load_state_dict(self, state_dict):
            raise NotImplementedError(_NO_CHECKPOINT)

        def sharded_state_dict(self, *args, **kwargs):
            raise NotImplementedError(_NO_CHECKPOINT)

    shards = bucket_shards(optimizer, model_chunks)
    optimizer.attach_bucket_shards(shards, device=shards[0].grad.device if shards else None)
    return TeonDistributedOptimizer(optimizer, config, init_state_fn=lambda opt, config=None: None)
