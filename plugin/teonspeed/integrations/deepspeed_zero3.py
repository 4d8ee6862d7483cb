"""DeepSpeed ZeRO-3 described to the one step: a layout of sharded pieces (parallel/sharded.py).

DeepSpeedZeroOptimizer_Stage3 splits every parameter evenly over the data-parallel ranks (ceil(numel/dp)
elements each, the last slice padded), groups the parameters of each param group into sub-groups
(`sub_group_size` elements), and keeps rank d's fp32 master slices of a sub-group end to end in one flat
tensor. Each step it hands the inner optimizer one sub-group at a time: `param_groups[g]["params"] =
[that flat tensor]`, its `.grad` the rank's reduce-scattered (unscaled, clipped) gradient slices, every
other param group empty. So each sub-group is a `PieceLayout` of even splits keyed by its flat tensor,
stepped like a ZeRO-1/2 partition (`FlatTensors`): each matrix or TEON stack of the sub-group reaches one
owner (balanced by Newton–Schulz FLOPs), is orthogonalized whole, and each rank gets its slice back;
DeepSpeed's parameter all-gathers do the rest.

What is refused, where the engine starts (`check_zero3`): parameter or optimizer offload, tensor
parallelism and QK-clip under ZeRO-3; DeepSpeed MoE and a TEON stack split over sub-groups at attach. A
checkpoint saved at another data-parallel size is refused by DeepSpeed's engine, naming both sizes.
"""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.distributed as dist

from ..optim import OrthoOptimizer
from ..optim.stepped import FlatTensors
from ..parallel.cost import adamw_bytes
from ..parallel.partitioned import check_groups_within_partitions
from ..parallel.sharded import PieceLayout, even_split_holds


def _device(option) -> str:
    device = getattr(option, "device", None)
    return str(getattr(device, "value", device if device is not None else "none"))


def check_zero3(engine, name: str) -> None:
    """What teonspeed refuses with ZeRO-3, one line each, on every rank before any collective."""
    for option, accessor in (("offload_param", engine.zero_offload_param), ("offload_optimizer", None)):
        device = _device(accessor() if accessor else engine.zero_offload_optimizer())
        if device not in ("none", "None"):
            raise ValueError(
                f"teonspeed: optimizer {name!r} does not support ZeRO-3 offload "
                f"(zero_optimization.{option}.device={device!r}): its exchange needs the fp32 partitions "
                f"on the device that trains. Remove zero_optimization.{option} (or set its device to "
                f'"none"); ZeRO-3 already partitions parameters, gradients and optimizer state'
            )
    mpu = engine.mpu
    tp = mpu.get_model_parallel_world_size() if hasattr(mpu, "get_model_parallel_world_size") else 1
    tp = max(tp, engine.autotp_size() or 1)
    if tp > 1:
        raise ValueError(
            f"teonspeed: optimizer {name!r} under zero_optimization.stage=3 is not verified with tensor "
            f"parallelism (model-parallel size {tp}); use stage 1 or 2 with tensor parallelism"
        )
    params = engine.optimizer_params() or {}
    client = engine.client_optimizer
    config = getattr(client, "config", None)
    if params.get("qk_clip") is not None or params.get("qk_clip_log") or getattr(config, "qk_clip", None):
        raise ValueError(
            f"teonspeed: qk_clip with optimizer {name!r} is not supported under zero_optimization.stage=3 "
            f"(the query/key rows are split over ranks); use stage 1 or 2 for QK-clip"
        )


def attach_zero_stage_3(zero3) -> None:
    """DeepSpeedZeroOptimizer_Stage3: each sub-group's fp32 flat partition described as even splits of
    its parameters; a TEON stack must lie in one sub-group. Plans (a collective over the DP group)."""
    opt: OrthoOptimizer = zero3.optimizer
    if any(not getattr(p, "allreduce", True) for params in zero3.fp16_groups for p in params):
        raise ValueError(
            f"teonspeed: optimizer {type(opt).__name__!r} does not support DeepSpeed MoE expert parameters "
            f"under zero_optimization.stage=3; use stage 1 or 2 for MoE models"
        )
    layouts: Dict[int, PieceLayout] = {}
    for i, params in enumerate(zero3.fp16_groups):
        flat = zero3.fp32_partitioned_groups_flat[i]
        group = zero3._get_sub_group_process_group(i)
        size, rank = dist.get_world_size(group=group), dist.get_rank(group=group)
        entries = [(opt.name_of(p), tuple(p.ds_shape)) for p in params]
        for p, (n, _) in zip(params, entries):
            if p.partition_numel() != -(-p.ds_numel // size):
                raise ValueError(
                    f"teonspeed: ZeRO-3 holds {p.partition_numel()} elements of {n!r} per rank, not "
                    f"ceil({p.ds_numel} / {size}); this DeepSpeed partitioning (e.g. "
                    f"zero_hpz_partition_size) is not supported: remove it"
                )
        layouts[id(flat)] = PieceLayout(
            even_split_holds(entries, size, key=id(flat)), dict(entries), group, rank, size
        )
    check_groups_within_partitions(
        layouts, opt.grouping.groups, where="ZeRO-3", fix=lambda keys: _sub_group_fix(zero3, keys)
    )
    comm_itemsize = torch.empty(0, dtype=zero3.communication_data_type).element_size()
    opt.attach_layouts(
        layouts,
        FlatTensors(layouts),
        device=zero3.fp32_partitioned_groups_flat[0].device,
        adamw_bytes=_adamw_bytes(opt, zero3.fp16_groups, zero3, comm_itemsize),
    )


def _sub_group_fix(zero3, keys) -> str:
    """The sub_group_size that keeps the param groups of the sub-groups `keys` (ids of their flat fp32
    partitions) whole: DeepSpeed cuts a param group into sub-groups only when sub_group_size is below the
    group's elements per rank (stage3._create_fp16_sub_groups)."""
    flats = [id(f) for f in zero3.fp32_partitioned_groups_flat]
    group_of = zero3.sub_group_to_group_id
    ids = {group_of[flats.index(k)] for k in keys}
    per_group: Dict[int, int] = {}
    for i, params in enumerate(zero3.fp16_groups):
        per_group[group_of[i]] = per_group.get(group_of[i], 0) + sum(p.partition_numel() for p in params)
    need = max(per_group[g] for g in ids)
    return (
        f"Set zero_optimization.sub_group_size to at least {need} (now {zero3.sub_group_size}; the param "
        f"group's elements per rank, so that DeepSpeed keeps it in one sub-group)"
    )


def _adamw_bytes(opt: OrthoOptimizer, groups: List[list], zero3, comm_itemsize: int) -> int:
    """comm_stats.adamw_bytes under ZeRO-3: the orthogonalized matrices' gradient reduce-scatter (an
    all-reduce where reduce_scatter is off) and one parameter all-gather, per sub-group over its DP group
    (the all-gathers of forward and backward are the layout's, whatever the optimizer)."""
    ortho = set(opt.grouping.ortho_names())
    out = 0
    for i, params in enumerate(groups):
        group = zero3._get_sub_group_process_group(i)
        numel = sum(p.ds_numel for p in params if opt.name_of(p) in ortho)
        itemsize = params[0].element_size() if params else 0
        out += adamw_bytes(
            numel,
            dist.get_world_size(group=group),
            comm_itemsize,
            itemsize,
            gradient_allreduce=not zero3.reduce_scatter,
        )
    return out
