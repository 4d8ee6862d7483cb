"""Megatron-core's `use_distributed_optimizer=True` with teonspeed: Megatron's own buckets and collectives.

Megatron DDP with the distributed optimizer reduce-scatters each bucket's gradients so that DP rank d
holds the d-th equal partition of the bucket, and after the step all-gathers the bucket's parameters
from those partitions. teonspeed steps exactly that partition: the AdamW parameters and the momentum
element-wise, and the orthogonalization planned like DeepSpeed's ZeRO-1/2 partitions
(`parallel/zero_partition.py`): a matrix inside one partition is computed there (TP-gathered if sharded),
only matrices cut by a partition boundary travel. With overlap_grad_reduce a buffer is cut into many
buckets (Megatron's default 40M elements: smaller than a 1B-class layer); the buckets of one topology are
planned together, so a TEON stack whose members lie in different buckets is one job. Megatron's
`DistributedOptimizer` class itself is not used: it accepts only Adam-family inner optimizers and (in 0.16)
CUDA tensors. What it does around the step is done the same way here:
- clip_grad: the global norm of the reduced gradients, each element once (the partitions are disjoint
  over DP; a TP-duplicated parameter counts on TP rank 0 only, like Megatron's get_grad_norm_fp32),
  accumulated in float64. Each rank's share rides in the step check's all-reduce
  (`DistributedRunner.check_step`): no collective or host read of its own, where Megatron pays one
  all-reduce and one `.item()`.
- bf16: an fp32 master copy of this rank's partition (Megatron's main-param shard) is stepped, with fp32
  gradients (the DDP buffer itself under grad_reduce_in_fp32), and copied into the bf16 parameter buffer
  that DDP's all-gather spreads. fp16 (a loss scaler) is refused.
- checkpoints: `state_dict()` is this rank's state (momentum, Adam moments, fp32 masters, step counters)
  with its bucket layout, loaded only into the same layout. `sharded_state_dict()` (dist-checkpointing)
  writes what Megatron's non-distributed wrappers write, each state tensor whole and sharded like its
  parameter (all-gathered over DP at save time, like Megatron's "fully_reshardable" format), so it loads
  at another TP/DP size and with or without the distributed optimizer.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from .megatron_wrappers import TeonFP32Optimizer
from ..optim import OrthoOptimizer
from ..optim.checkpoint import LAYOUT_KEY
from ..optim.checks import names_differ
from ..parallel.flat import BucketShard, FlatEntry, FlatPartition


def check_supported(config, model_chunks) -> None:
    """Refuse, before any state exists, what this path does not do (yet)."""
    if config.fp16:
        raise ValueError(
            "teonspeed: use_distributed_optimizer=True supports fp32 and bf16, not fp16 (fp16 needs a "
            "loss scaler); set bf16=True, or use_distributed_optimizer=False for fp16"
        )
    if config.log_num_zeros_in_grad:
        raise ValueError(
            "teonspeed: log_num_zeros_in_grad=True is not supported with use_distributed_optimizer=True "
            "(the gradients live in per-rank bucket partitions); set log_num_zeros_in_grad=False"
        )
    for chunk in model_chunks:
        ddp_config = getattr(chunk, "ddp_config", None)
        if ddp_config is None or not ddp_config.use_distributed_optimizer:
            raise ValueError(
                "teonspeed: use_distributed_optimizer=True needs the model chunks wrapped in megatron "
                "DistributedDataParallel with DistributedDataParallelConfig(use_distributed_optimizer=True)"
            )
        if ddp_config.overlap_param_gather:
            raise ValueError(
                "teonspeed: overlap_param_gather=True is not supported with teonspeed's distributed "
                "optimizer; set DistributedDataParallelConfig(overlap_param_gather=False)"
            )


def bucket_shards(optimizer: OrthoOptimizer, model_chunks) -> List[BucketShard]:
    """This rank's partition of every DDP bucket, with every parameter's offset in its bucket, an fp32
    master copy of a bf16/fp16 partition, and the ranges that count in the gradient norm."""
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    shards = []
    for chunk in model_chunks:
        for buffer in list(chunk.buffers) + list(getattr(chunk, "expert_parallel_buffers", [])):
            group = buffer.data_parallel_group
            size, rank = group.size(), group.rank()
            for bucket in buffer.buckets:
                entries = sorted(
                    (
                        FlatEntry(
                            optimizer.name_of(p), buffer.param_index_map[p][0] - bucket.offset, tuple(p.shape)
                        )
                        for p in bucket.params
                    ),
                    key=lambda e: e.offset,
                )
                # Megatron's get_main_grads_for_grad_norm: a TP-duplicated (or pipeline-shared) parameter once
                counted = {
                    optimizer.name_of(p)
                    for p in bucket.params
                    if param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p)
                }
                n = bucket.grad_data.numel() // size
                param = bucket.param_data[rank * n : (rank + 1) * n]
                shard = BucketShard(
                    FlatPartition(entries, n, group, rank, size),
                    bucket.grad_data[rank * n : (rank + 1) * n],
                    param,
                    master=param.detach().float() if param.dtype != torch.float32 else None,
                )
                shard.counted = _merged(((lo, hi) for e, lo, hi in shard.slices() if e.name in counted))
                shards.append(shard)
    return shards


def _merged(ranges) -> Tuple[Tuple[int, int], ...]:
    """Sorted (lo, hi) ranges with touching neighbours joined (fewer, longer norm kernels)."""
    out: List[List[int]] = []
    for lo, hi in sorted(ranges):
        if out and out[-1][1] == lo:
            out[-1][1] = hi
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)


ADAMW_KEYS = ("exp_avg", "exp_avg_sq")


class TeonDistributedOptimizer(TeonFP32Optimizer):
    """Megatron's optimizer interface over this rank's bucket partitions: the step clips (where
    config.clip_grad > 0) and steps the partitions, then DDP all-gathers the parameters. Its state lives
    in the partitions (momentum, Adam moments, fp32 masters)."""

    def __init__(self, optimizer: OrthoOptimizer, config, model_chunks, shards: List[BucketShard]):
        super().__init__(optimizer, config, init_state_fn=lambda opt, config=None: None)
        self.model_chunks, self.shards = model_chunks, shards

    def prepare_grads(self) -> bool:
        return False  # the reduced gradients are the bucket partitions; nothing to copy or unscale

    @torch.no_grad()
    def step(self):
        """(success, grad_norm, num_zeros) like Megatron's optimizers: success is False when a non-finite
        gradient skipped the step; grad_norm is the global norm before clipping (None without clip_grad)."""
        inner = self.optimizer
        steps = inner.param_groups[0]["step"]
        inner.step()
        for chunk in self.model_chunks:
            chunk.start_param_sync(force_sync=True)
        return inner.param_groups[0]["step"] != steps, inner.grad_norm, None

    def clip_grad_norm(self, clip_grad: float) -> float:
        raise NotImplementedError(
            "teonspeed: the distributed optimizer clips inside step() (its norm rides in the "
            "step's one collective); read the norm from step()'s result"
        )

    def reload_model_params(self, state_dict=None) -> None:
        """The model's parameters changed (a model-only checkpoint load): refresh the fp32 masters."""
        for shard in self.shards:
            if shard.master is not None:
                shard.master.copy_(shard.param)

    # -- checkpoints: per rank, in the layout they were saved in ---------------------------------------
    def layout(self) -> Dict[str, Any]:
        """What the saved state depends on: this rank's place in the world and every bucket partition
        (its data-parallel rank and size, its length, what lies in it, whether it keeps fp32 masters)."""
        ranked = dist.is_initialized()
        return {
            "rank": dist.get_rank() if ranked else 0,
            "world_size": dist.get_world_size() if ranked else 1,
            "buckets": [
                [
                    s.partition.dp_size,
                    s.partition.partition_size,
                    [[e.name, e.offset, list(e.shape)] for e in s.partition.entries],
                    s.partition.dp_rank,
                    s.master is not None,
                ]
                for s in self.shards
            ],
        }

    def state_dict(self) -> Dict[str, Any]:
        inner = self.optimizer
        buckets = []
        for shard in self.shards:
            state = dict(inner.state.get(shard.param, {}))
            if shard.master is not None:
                state["master"] = shard.master
            buckets.append(state)
        return {
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups],
            "buckets": buckets,
            LAYOUT_KEY: self.layout(),
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a per-rank state (saved by the same rank of the same layout, checked before anything
        changes) or what dist-checkpointing loaded for `sharded_state_dict(..., is_loading=True)`."""
        if LAYOUT_KEY not in state_dict and ("state" in state_dict or "optimizer" in state_dict):
            return self._load_whole_parameters(state_dict)
        _check_same_layout(state_dict.get(LAYOUT_KEY), self.layout())
        inner = self.optimizer
        self._restore_param_groups(state_dict["param_groups"])
        for shard, saved in zip(self.shards, state_dict["buckets"]):
            state = inner.state[shard.param]
            for key, value in saved.items():
                if key == "master":
                    shard.master.copy_(value)
                else:
                    state[key] = value.to(device=shard.weights.device, dtype=shard.weights.dtype, copy=True)

    # -- dist-checkpointing: whole parameters, in the non-distributed wrappers' format, resharded by Megatron
    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, metadata=None):
        """The state as Megatron's non-distributed wrapper (FP32Optimizer; Float16OptimizerWithFloat16Params
        with bf16 masters) saves it: per parameter, sharded like the parameter. Saving all-gathers each
        bucket's state over its data-parallel group (a checkpoint-time collective, as Megatron's
        DistributedOptimizer does for its reshardable format); loading reads each parameter whole and keeps
        this rank's partition. So a checkpoint loads at another TP/DP size, or with(out) the distributed
        optimizer."""
        from megatron.core.dist_checkpointing.optimizer import (
            get_param_id_to_sharded_param_map,
            make_sharded_optimizer_tensor,
            optim_state_to_sharding_state,
        )

        inner = self.optimizer
        params = self.get_parameters()
        whole = self._whole_parameters(gather=not is_loading)
        state = {}
        for i, p in enumerate(params):
            keys = (
                ("momentum_buffer",) if inner.group_of(inner.name_of(p))["route"] == "ortho" else ADAMW_KEYS
            )
            state[i] = {k: whole[inner.name_of(p)][k] for k in keys}
        ids = {id(p): i for i, p in enumerate(params)}
        optimizer_state = {
            "state": state,
            "param_groups": [
                {**{k: v for k, v in g.items() if k != "params"}, "params": [ids[id(p)] for p in g["params"]]}
                for g in inner.param_groups
            ],
        }
        id_to_sharded = get_param_id_to_sharded_param_map(model_sharded_state_dict, params)
        optim_state_to_sharding_state(optimizer_state, id_to_sharded)
        adamw_steps = [g["step"] for g in inner.param_groups if g["route"] == "adamw"]
        if adamw_steps:  # Megatron's wrappers save the AdamW step as one common step
            optimizer_state["state"]["common_step"] = adamw_steps[0]
        if not any(s.master is not None for s in self.shards):
            return optimizer_state
        masters = [
            [
                make_sharded_optimizer_tensor(
                    id_to_sharded[ids[id(p)]],
                    whole[inner.name_of(p)]["master"],
                    prefix="optimizer.state.fp32_param",
                )
                for p in g["params"]
            ]
            for g in inner.param_groups
        ]
        return {"optimizer": optimizer_state, "fp32_from_fp16_params": masters}

    def _whole_parameters(self, gather: bool) -> Dict[str, Dict[str, torch.Tensor]]:
        """name -> {state key or "master": this TP rank's whole tensor of that parameter}, every bucket's
        partitions all-gathered over its data-parallel group (gather=False: empty, to be loaded into)."""
        out = {}
        for shard in self.shards:
            part, state = shard.partition, self.optimizer.bucket_state(shard)
            sources = {k: state[k] for k in OrthoOptimizer.BUCKET_STATE_KEYS}
            if shard.master is not None:
                sources["master"] = shard.master
            bucket = {}
            for key, local in sources.items():
                bucket[key] = local.new_empty(part.partition_size * part.dp_size)
                if gather:
                    dist.all_gather_into_tensor(bucket[key], local, group=part.dp_group)
            for e in part.entries:
                out[e.name] = {
                    k: v[e.offset : e.offset + e.numel].view(e.shape).clone() for k, v in bucket.items()
                }
        return out

    def _restore_param_groups(self, saved_groups) -> None:
        """The saved settings of every param group (lr, step, ...), not its parameter list."""
        for group, saved in zip(self.optimizer.param_groups, saved_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})

    def _load_whole_parameters(self, state_dict: Dict[str, Any]) -> None:
        """Keep this rank's partition of every loaded whole-parameter tensor."""
        inner = self.optimizer
        loaded = state_dict.get("optimizer", state_dict)
        masters = state_dict.get("fp32_from_fp16_params")
        if (masters is None) != all(s.master is None for s in self.shards):
            raise ValueError(
                "teonspeed: this checkpoint's optimizer "
                + ("has no" if masters is None else "has")
                + " fp32 master parameters, this model's parameters are "
                + ("bf16" if masters is None else "fp32")
                + ": resume with the precision (bf16 or not) it was saved with"
            )
        self._restore_param_groups(
            self._filter_and_reorder_param_groups(inner.param_groups, loaded["param_groups"])
        )
        params = self.get_parameters()
        values = {inner.name_of(p): dict(loaded["state"][i]) for i, p in enumerate(params)}
        for g, saved_group in zip(inner.param_groups, masters or []):
            for p, master in zip(g["params"], saved_group):
                values[inner.name_of(p)]["master"] = master
        for shard in self.shards:
            state, start = self.optimizer.bucket_state(shard), shard.partition.start
            targets = {**state, **({"master": shard.master} if shard.master is not None else {})}
            for (
                e,
                lo,
                hi,
            ) in shard.slices():  # partition coordinates; the entry's element = start + lo - offset
                for key, value in values[e.name].items():
                    if key in targets:
                        targets[key][lo:hi].copy_(
                            value.reshape(-1)[start + lo - e.offset : start + hi - e.offset]
                        )


def _check_same_layout(saved: Optional[Dict[str, Any]], current: Dict[str, Any]) -> None:
    if saved is None:
        raise ValueError(
            "teonspeed: this state dict was not saved by teonspeed's distributed optimizer "
            "(use_distributed_optimizer=True); it has no per-rank bucket layout to load into"
        )
    problem = None
    if (saved["rank"], saved["world_size"]) != (current["rank"], current["world_size"]):
        problem = (
            f"it was saved by rank {saved['rank']} of {saved['world_size']}, this is rank "
            f"{current['rank']} of {current['world_size']}"
        )
    elif len(saved["buckets"]) != len(current["buckets"]):
        problem = f"it holds {len(saved['buckets'])} DDP buckets, this model has {len(current['buckets'])}"
    else:
        fields = (
            "data-parallel size",
            "partition size",
            "parameters and offsets",
            "data-parallel rank",
            "fp32 masters (bf16 parameters)",
        )
        for i, (a, b) in enumerate(zip(saved["buckets"], current["buckets"])):
            diff = next(((f, x, y) for f, x, y in zip(fields, a, b) if x != y), None)
            if diff is not None:
                what, x, y = diff
                problem = f"bucket {i} differs in its {what}: " + (
                    _entries_differ(x, y) if what == fields[2] else f"{x} saved, {y} here"
                )
                break
    if problem is not None:
        raise ValueError(
            f"teonspeed: this distributed-optimizer state was saved in another layout ({problem}). With "
            f"use_distributed_optimizer=True each rank's state holds its own bucket partitions and is not "
            "resharded: resume with the same TP/PP/DP sizes, model, DDP bucket size and precision, "
            "each rank "
            "loading the file it saved; or resume from a checkpoint saved with "
            "use_distributed_optimizer=False through megatron.core.dist_checkpointing, which reshards"
        )


def _entries_differ(saved: List, current: List) -> str:
    """Which parameters of a bucket partition differ ([name, offset, shape] entries), by name."""
    named = names_differ([e[0] for e in saved], [e[0] for e in current])
    if named is not None:
        return named
    a, b = next((a, b) for a, b in zip(saved, current) if a != b)
    return f"{a[0]!r} at offset {a[1]} with shape {tuple(a[2])} saved, at {b[1]} with {tuple(b[2])} here"


def wrap(optimizer: OrthoOptimizer, config, model_chunks) -> TeonDistributedOptimizer:
    """The MegatronOptimizer over this rank's bucket partitions."""
    shards = bucket_shards(optimizer, model_chunks)
    optimizer.attach_bucket_shards(shards, clip_grad=config.clip_grad)
    return TeonDistributedOptimizer(optimizer, config, model_chunks, shards)
