"""Everything the optimizer needs to know about the parallel layout, in one object, built from
megatron-core's parallel_state or from explicit process groups and ShardSpecs."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

from ..grouping import GroupingResult, LayerRef
from .shard_spec import ShardSpec, full_shape, megatron_shard_specs


@dataclass
class ParallelContext:
    specs: Dict[str, ShardSpec] = field(default_factory=dict)
    tp_group: Optional[dist.ProcessGroup] = None
    dp_group: Optional[dist.ProcessGroup] = None
    expert_tp_group: Optional[dist.ProcessGroup] = None
    expert_dp_group: Optional[dist.ProcessGroup] = None
    pipeline_group: Optional[dist.ProcessGroup] = None
    """The model's pipeline-parallel group: the stages skip a non-finite step together."""
    num_layers: Optional[int] = None
    """Layers of the whole model (all pipeline stages): lets a stage tell a cut TEON group from an odd
    last layer."""

    @property
    def distributed(self) -> bool:
        return dist.is_initialized() and dist.get_world_size() > 1

    def tp_size(self, expert: bool) -> int:
        group = self.expert_tp_group if expert else self.tp_group
        return dist.get_world_size(group) if group is not None and self.distributed else 1

    def spec(self, name: str) -> ShardSpec:
        return self.specs.get(name, ShardSpec())

    def full_shape(self, name: str, p: torch.Tensor) -> Tuple[int, ...]:
        spec = self.spec(name)
        return full_shape(tuple(p.shape), spec, self.tp_size(spec.is_expert))

    def relocate(self, name: str, ref: LayerRef) -> LayerRef:
        spec = self.spec(name)
        block = None if ref.block is None else ref.block + spec.layer_offset
        expert = None if ref.expert is None else ref.expert + spec.expert_offset
        return LayerRef(ref.layer_type, block, expert)


def megatron_context(model: torch.nn.Module) -> Optional[ParallelContext]:
    """The context of a megatron-core model chunk when megatron's parallel state is initialised."""
    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is None or not ps.model_parallel_is_initialized():
        return None
    config = getattr(model, "config", None)
    return ParallelContext(
        specs=megatron_shard_specs(model),
        tp_group=ps.get_tensor_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        expert_tp_group=ps.get_expert_tensor_parallel_group(),
        expert_dp_group=ps.get_expert_data_parallel_group(),
        pipeline_group=ps.get_pipeline_model_parallel_group(),
        num_layers=getattr(config, "num_layers", None),
    )


def check_stage_cuts(grouping: GroupingResult, context: ParallelContext, allow_cut: bool) -> None:
    """A TEON window whose missing partner lives on another pipeline stage changes the update with the
    PP size: refuse it (before any state exists) unless the user opted in to cutting at stages."""
    if context.num_layers is None or allow_cut:
        return
    for missing, present in grouping.partial:
        cut = [b for b in missing if 0 <= b < context.num_layers]
        if cut:
            raise ValueError(
                f"teonspeed: TEON group of {', '.join(present)} needs block(s) {cut} from another pipeline stage. "
                f"Groups never cross stages: use a teon_k that divides the layers per stage (and stages that start at "
                f"a multiple of teon_k), or pass cut_groups_at_stage_boundary=True to fall back to Muon there")
