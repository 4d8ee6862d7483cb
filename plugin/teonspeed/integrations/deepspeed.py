"""DeepSpeed integration: `"optimizer": {"type": "TEON", "params": {...}}` in a DeepSpeed config.

    import teonspeed                      # registers the types when DeepSpeed is imported
    engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                             config="ds_config.json", mpu=teonspeed.deepspeed.MegatronMPU())

Types: "TEON", "TeonspeedMuon", "TeonspeedHTMuon" (kinds.DEEPSPEED_TYPE_NAMES). DeepSpeed lower-cases
"Muon" to its own built-in optimizer, so ours carry a prefix that cannot collide (and "Muon" with
teonspeed imported warns, naming "TeonspeedMuon"). ZeRO stages 0, 1, 2 and 3 (fp32, bf16) are supported
(stage 3: deepspeed_zero3.py); fp16, ZeRO-Offload and universal checkpoints are refused when the engine
starts. This module
builds the optimizer and describes DeepSpeed's buffers to it; the changes to DeepSpeed's classes
themselves live in patches/.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from ..fused import annotate_model
from ..kinds import DEEPSPEED_TYPE_NAMES
from ..optim import HTMuon, Muon, OrthoOptimizer, TEON
from ..parallel.context import ParallelContext
from ..parallel.cost import adamw_bytes
from ..parallel.flat import FlatEntry, FlatPartition
from ..parallel.shard_spec import megatron_shard_specs
from .. import qk_clip
from .deepspeed_zero3 import attach_zero_stage_3, check_zero3  # noqa: F401  (the ZeRO-3 layout)

DEEPSPEED_TYPES = {DEEPSPEED_TYPE_NAMES[cls.kind]: cls for cls in (TEON, Muon, HTMuon)}
SUPPORTED_ZERO_STAGES = (0, 1, 2, 3)


class MegatronMPU:
    """DeepSpeed's `mpu` interface over megatron.core.parallel_state (DeepSpeed asks for
    get_model_parallel_*; Megatron calls the same thing get_tensor_model_parallel_*)."""

    def __init__(self):
        from megatron.core import parallel_state

        self.ps = parallel_state

    def get_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_rank(self):
        return self.ps.get_tensor_model_parallel_rank()

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()

    def get_data_parallel_world_size(self):
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_rank(self):
        return self.ps.get_data_parallel_rank()

    def get_pipeline_model_parallel_group(self):
        return self.ps.get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_world_size(self):
        return self.ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_rank(self):
        return self.ps.get_pipeline_model_parallel_rank()

    def get_tensor_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_rank(self):
        return self.ps.get_tensor_model_parallel_rank()


def our_optimizer_name(engine) -> Optional[str]:
    """The teonspeed optimizer this engine is being built with (a config type of ours, or an instance or
    class of ours passed as `optimizer=`), or None."""
    client = engine.client_optimizer
    if isinstance(client, type) and issubclass(client, OrthoOptimizer):
        return client.__name__
    if isinstance(client, OrthoOptimizer):
        return type(client).__name__
    name = engine.optimizer_name()
    return name if client is None and name in DEEPSPEED_TYPES else None


def check_engine(engine, name: str) -> None:
    """What teonspeed refuses in a DeepSpeed config, checked where the engine starts (before DeepSpeed's
    own device checks and before any collective of the engine), the same on every rank: one line naming
    the setting and what to use instead."""
    if engine.fp16_enabled():
        # DeepSpeed's fp16 wrappers (dynamic loss scaling, overflow-skipped steps) are not verified with
        # our step, and CPUs differ in whether DeepSpeed takes fp16 at all; bf16 needs no loss scale.
        raise ValueError(
            f"teonspeed: optimizer {name!r} is not verified under DeepSpeed's fp16 "
            f'(loss-scaled) training; set "bf16": {{"enabled": true}} instead of "fp16" '
            f"(or train in fp32)"
        )
    stage = engine.zero_optimization_stage()
    if stage not in SUPPORTED_ZERO_STAGES:
        raise ValueError(
            f"teonspeed: optimizer {name!r} supports ZeRO stages {SUPPORTED_ZERO_STAGES}, not "
            f"zero_optimization.stage={stage}; use one of those"
        )
    if stage == 3:
        check_zero3(engine, name)
    offload = engine.zero_offload_optimizer()
    device = str(getattr(getattr(offload, "device", None), "value", getattr(offload, "device", "none")))
    if offload is not None and device not in ("none", "None"):
        # ZeRO-Offload keeps the partitions on the host while NCCL moves only device tensors, and the
        # step would run the orthogonalization on the CPU: refused rather than slow or broken.
        raise ValueError(
            f"teonspeed: optimizer {name!r} does not support ZeRO-Offload "
            f"(zero_optimization.offload_optimizer.device={device!r}): its exchange needs the "
            f"optimizer partitions on the GPU. Remove zero_optimization.offload_optimizer (or "
            f'set its device to "none"); ZeRO-1/2 already partition the optimizer state over '
            f"data-parallel ranks"
        )
    if engine.load_universal_checkpoint():
        # Universal checkpoints re-cut Adam-named state fragments per parameter; ours (momentum of flat
        # partitions, TEON groups) is not converted by ds_to_universal, so it would be lost or misplaced.
        raise ValueError(
            f"teonspeed: optimizer {name!r} cannot load DeepSpeed universal checkpoints "
            f"(checkpoint.load_universal=true): ds_to_universal does not convert its state. "
            f"Resume from the regular checkpoint at the DP size it was saved with (ZeRO-0 "
            f"checkpoints also load at another DP size), or through Megatron's torch_dist "
            f"checkpoints, which reshard"
        )


# What DeepSpeed's own Muon reads from "params" (engine._MUON_HALF_KEYS, _ADAM_HALF_KEYS and the lrs).
_DEEPSPEED_MUON_KEYS = {
    "lr",
    "muon_lr",
    "adam_lr",
    "momentum",
    "weight_decay",
    "ns_method",
    "betas",
    "eps",
    "adam_w_mode",
    "torch_adam",
}


def builtin_muon_warning(engine) -> Optional[str]:
    """`"type": "Muon"` is DeepSpeed's own Muon (DeepSpeed lower-cases the name), whatever teonspeed
    options its params hold: the one line that says so, or None for any other type."""
    if engine.client_optimizer is not None or engine.optimizer_name() != "muon":
        return None
    from ..config import OPTION_NAMES

    params = engine.optimizer_params() or {}
    ignored = sorted(k for k in params if k in OPTION_NAMES and k not in _DEEPSPEED_MUON_KEYS)
    message = (
        'teonspeed: "type": "Muon" runs DeepSpeed\'s own Muon, not teonspeed\'s'
        + (f" (it ignores {', '.join(ignored)})" if ignored else "")
        + '; use "type": "TeonspeedMuon" (or "TEON") for teonspeed\'s optimizer'
    )
    mpu = engine.mpu
    tp = mpu.get_model_parallel_world_size() if hasattr(mpu, "get_model_parallel_world_size") else 1
    tp = max(tp, engine.autotp_size() or 1)
    if tp > 1:
        message += (
            f"; under tensor parallelism ({tp}) DeepSpeed's Muon orthogonalizes each shard alone, "
            f"not the whole matrix"
        )
    return message


def build_optimizer(engine, model_parameters) -> OrthoOptimizer:
    """What DeepSpeed's engine calls for our config types (see patches/deepspeed_0_19.py); the engine's
    settings were checked by `check_engine` when it started."""
    name = engine.optimizer_name()
    options = dict(engine.optimizer_params() or {})
    annotate_model(engine.module)  # tag Megatron's fused QKV / gated-MLP weights so they are split
    names = {id(p): n for n, p in engine.module.named_parameters()}
    groups = _named_groups(model_parameters, names)
    for group in groups:
        for _, p in group["params"]:
            if getattr(p, "use_muon", False):
                # DeepSpeed's ZeRO applies its own muon_update to tagged parameters of an optimizer whose
                # class name contains "muon": untag, so only our step runs.
                p.use_muon = False
    parallel = deepspeed_context(engine)
    optimizer = DEEPSPEED_TYPES[name](groups, parallel=parallel, **options)
    if optimizer.config.qk_clip is not None or optimizer.config.qk_clip_log:
        qk_clip.attach(engine.module, optimizer)  # clips the fp32 masters / ZeRO partitions inside step()
    return optimizer


def deepspeed_context(engine) -> ParallelContext:
    """The layout the engine runs with: TP from its mpu (if any), DP from the engine's DP group."""
    mpu = getattr(engine, "mpu", None)
    tp_group = mpu.get_model_parallel_group() if mpu is not None else None
    dp_group = (
        engine.data_parallel_group
        if getattr(engine, "data_parallel_group", None) is not None
        else (mpu.get_data_parallel_group() if mpu is not None else None)
    )
    if dp_group is None and dist.is_initialized():
        dp_group = dist.group.WORLD
    pp_group = (
        mpu.get_pipeline_model_parallel_group()
        if mpu is not None and hasattr(mpu, "get_pipeline_model_parallel_group")
        else None
    )
    config = getattr(engine.module, "config", None)
    return ParallelContext(
        specs=megatron_shard_specs(engine.module),
        tp_group=tp_group,
        dp_group=dp_group,
        expert_dp_group=_expert_data_parallel_group(engine.module),
        pipeline_group=pp_group,
        num_layers=getattr(config, "num_layers", None),
    )


def _expert_data_parallel_group(module):
    """DeepSpeed MoE: the expert-data-parallel group its expert parameters (allreduce=False) are reduced and
    ZeRO-partitioned over; None without experts. Experts are not TP-sharded by DeepSpeed MoE."""
    names = sorted(
        {getattr(p, "group_name", None) for p in module.parameters() if not getattr(p, "allreduce", True)}
    )
    if not names:
        return None
    if len(names) > 1 or names[0] is None:
        raise ValueError(
            f"teonspeed: the model's expert parameters belong to expert-parallel groups {names}; "
            f"teonspeed takes one expert-parallel size per model (DeepSpeed MoE layers with one ep_size)"
        )
    from deepspeed.utils import groups

    return groups._get_expert_data_parallel_group(names[0])


def _named_groups(model_parameters, names: Dict[int, str]) -> List[Dict[str, Any]]:
    items = list(model_parameters)
    if items and isinstance(items[0], dict):
        return [dict(g, params=[_named(p, names) for p in g["params"]]) for g in items]
    return [{"params": [_named(p, names) for p in items]}]


def _named(p: torch.Tensor, names: Dict[int, str]):
    if id(p) not in names:
        raise ValueError(
            "teonspeed: a parameter given to deepspeed.initialize is not in the model's "
            "named_parameters(); teonspeed needs names to group layers"
        )
    return (names[id(p)], p)


# -- describing DeepSpeed's replacement buffers to the optimizer --------------------------------------


def attach_zero_stage_1_2(zero_optimizer) -> None:
    """DeepSpeedZeroOptimizer: each group is flattened (with per-parameter alignment padding) and cut
    into equal DP partitions; the inner optimizer holds this rank's fp32 partition. The optimizer then
    orthogonalizes each matrix where its partition lives and exchanges only the cut ones."""
    opt: OrthoOptimizer = zero_optimizer.optimizer
    partitions = {}
    for i, params in enumerate(zero_optimizer.round_robin_bit16_groups):
        offsets = zero_optimizer.round_robin_bit16_offsets[i]
        group = zero_optimizer.real_dp_process_group[i]
        partitions[id(zero_optimizer.single_partition_of_fp32_groups[i])] = FlatPartition(
            entries=[FlatEntry(opt.name_of(p), off, tuple(p.shape)) for p, off in zip(params, offsets)],
            partition_size=int(zero_optimizer.partition_size[i]),
            dp_group=group,
            dp_rank=dist.get_rank(group=group),
            dp_size=dist.get_world_size(group=group),
        )
    # DeepSpeed 0.19.8 all-reduces every gradient bucket unless reduce_scatter is on and multi-rank bucket
    # all-reduce off (then each slice is reduced to its partition's rank), in communication_data_type.
    allreduce = not zero_optimizer.reduce_scatter or zero_optimizer.use_multi_rank_bucket_allreduce
    comm_itemsize = torch.empty(0, dtype=zero_optimizer.communication_data_type).element_size()
    opt.attach_flat_partitions(
        partitions,
        device=zero_optimizer.single_partition_of_fp32_groups[0].device,
        adamw_bytes=_adamw_bytes(
            opt,
            zero_optimizer.round_robin_bit16_groups,
            zero_optimizer.real_dp_process_group,
            comm_itemsize,
            allreduce,
        ),
    )


def _adamw_bytes(opt: OrthoOptimizer, groups, dp_groups, comm_itemsize: int, allreduce: bool) -> int:
    """comm_stats.adamw_bytes in this ZeRO layout: the orthogonalized matrices' gradient reduction and
    parameter all-gather, per flat group over its data-parallel group."""
    ortho = set(opt.grouping.ortho_names())
    return sum(
        adamw_bytes(
            sum(p.numel() for p in params if opt.name_of(p) in ortho),
            dist.get_world_size(group=group),
            comm_itemsize,
            params[0].element_size() if params else 0,
            gradient_allreduce=allreduce,
        )
        for params, group in zip(groups, dp_groups)
    )


def attach_bf16_optimizer(bf16_optimizer) -> None:
    """BF16_Optimizer (bf16 with ZeRO-1): flat groups padded at the end only, equal DP partitions."""
    opt: OrthoOptimizer = bf16_optimizer.optimizer
    partitions = {}
    for i, params in enumerate(bf16_optimizer.bf16_groups):
        group = bf16_optimizer.real_dp_process_group[i]
        size = dist.get_world_size(group=group)
        entries, offset = [], 0
        for p in params:
            entries.append(FlatEntry(opt.name_of(p), offset, tuple(p.shape)))
            offset += p.numel()
        partitions[id(bf16_optimizer.fp32_groups_flat_partition[i])] = FlatPartition(
            entries=entries,
            partition_size=bf16_optimizer.bf16_groups_flat[i].numel() // size,
            dp_group=group,
            dp_rank=dist.get_rank(group=group),
            dp_size=size,
        )
    # The engine all-reduces the gradients before this optimizer sees them, in its communication_data_type:
    # bf16 unless the config sets it (not visible from here), so bf16 is what the counter assumes.
    opt.attach_flat_partitions(
        partitions,
        device=bf16_optimizer.fp32_groups_flat_partition[0].device,
        adamw_bytes=_adamw_bytes(
            opt, bf16_optimizer.bf16_groups, bf16_optimizer.real_dp_process_group, 2, True
        ),
    )


def attach_unfused_fp32_masters(wrapper) -> None:
    """FP16_UnfusedOptimizer (bf16, stage 0): one fp32 master copy per parameter."""
    wrapper.optimizer.rebind(
        (master, low)
        for masters, lows in zip(wrapper.fp32_groups, wrapper.fp16_groups)
        for master, low in zip(masters, lows)
    )
