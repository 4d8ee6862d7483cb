"""Everything the optimizer needs to know about the parallel layout, in one object, built from
megatron-core's parallel_state or from explicit process groups and ShardSpecs; and `build_grouping`, the
user's parameters in that layout -> routing and groups: the one builder of the optimizers and of
`teonspeed.plan`, so a plan printed before training is the plan the optimizer runs, in every layout."""

from __future__ import annotations

import gc
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
import torch.distributed as dist

from ..config import OptimizerConfig
from ..fused import annotate_model
from ..grouping import GroupingResult, LayerRef, build_groups, param_shape, require_teon_stacks
from ..params import ROUTE_KEY, normalize_params
from .dtensor_layout import DTensorLayout, describe_parameter, is_dtensor
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
        return full_shape(param_shape(p), spec, self.tp_size(spec.is_expert))

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
    return megatron_groups_context(ps, megatron_shard_specs(model), getattr(config, "num_layers", None))


def megatron_groups_context(ps, specs: Dict[str, ShardSpec], num_layers: Optional[int]) -> ParallelContext:
    """The context of Megatron's parallel state `ps` (megatron.core.parallel_state): every group the step
    uses, whichever entry (model, named_parameters(), Megatron's builder) found the specs."""
    return ParallelContext(
        specs=specs,
        tp_group=ps.get_tensor_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        expert_tp_group=ps.get_expert_tensor_parallel_group(),
        expert_dp_group=ps.get_expert_data_parallel_group(),
        pipeline_group=ps.get_pipeline_model_parallel_group(),
        num_layers=num_layers,
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
                f"teonspeed: TEON group of {', '.join(present)} needs block(s) {cut} from another "
                "pipeline stage. "
                "Groups never cross stages: use a teon_k that divides the layers per stage (and "
                "stages that start at "
                f"a multiple of teon_k), or pass cut_groups_at_stage_boundary=True to fall back to Muon there"
            )


def megatron_context_of_parameters(
    named: List[Tuple[str, torch.Tensor]], unnamed: Set[int] = frozenset()
) -> Tuple[Optional[ParallelContext], Dict[int, str]]:
    """`named_parameters()` or param groups of a megatron-core model, given without the model: the same
    layout as `megatron_context(model)` (and the same fused-weight tags as passing the model).

    Megatron's parameters carry only their TP dim; layer offsets, expert offsets and the fused QKV /
    gated-fc1 layouts live on their modules, so the modules are found from the parameters (one pass
    over the live objects; only when Megatron's TP attributes are present). Returns the context (None for
    parameters that Megatron did not make, or when its parallel state is not initialised) and, for the
    parameters given without a name (ids in `unnamed`), their names in their module: layer grouping
    needs them.
    """
    megatron_made = {id(p) for _, p in named if hasattr(p, "tensor_model_parallel")}
    if not megatron_made:
        return None, {}
    roots = _root_modules_holding(megatron_made)
    spec_of: Dict[int, ShardSpec] = {}
    module_name: Dict[int, str] = {}
    for root in roots:
        annotate_model(root)
        specs = megatron_shard_specs(root)
        spec_of.update({id(p): specs[n] for n, p in root.named_parameters()})
        module_name.update({id(p): n for n, p in root.named_parameters()})
    renamed = {i: module_name[i] for i in unnamed if i in module_name}
    named = [(renamed.get(id(p), n), p) for n, p in named]
    missing = [n for n, p in named if id(p) in megatron_made and id(p) not in spec_of]
    if missing:
        raise ValueError(
            f"teonspeed: parameter {missing[0]!r} carries Megatron's tensor-parallel attributes but no live "
            "module holds it, so its layout (TP shard, layer, fused QKV/fc1 parts) is unknown; pass "
            "the model "
            f"itself (teonspeed.TEON(model, ...)) or parallel=teonspeed.megatron_context(model)"
        )
    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is None or not ps.model_parallel_is_initialized():
        return None, renamed
    num_layers = next(
        (
            m.config.num_layers
            for r in roots
            for m in r.modules()
            if hasattr(getattr(m, "config", None), "num_layers")
        ),
        None,
    )
    return megatron_groups_context(
        ps, {n: spec_of[id(p)] for n, p in named if id(p) in spec_of}, num_layers
    ), renamed


def _root_modules_holding(param_ids) -> List[torch.nn.Module]:
    """The outermost live modules that (recursively) hold any of the parameters with these ids."""
    modules = [
        o for o in gc.get_objects() if issubclass(type(o), torch.nn.Module)
    ]  # type(): no proxy __getattr__
    parent = {}
    for m in modules:
        for child in m._modules.values():
            if child is not None:
                parent.setdefault(id(child), m)
    roots = {}
    for m in modules:
        if any(id(p) in param_ids for p in m._parameters.values() if p is not None):
            seen = {id(m)}
            while id(m) in parent and id(parent[id(m)]) not in seen:
                m = parent[id(m)]
                seen.add(id(m))
            roots[id(m)] = m
    return list(roots.values())


@dataclass(frozen=True)
class ParamSetup:
    """What an optimizer is built on: the user's param groups (normalize_params' form, with their final
    names), the parallel layout they live in, and the routing and groups."""

    groups: List[Dict[str, Any]]
    parallel: ParallelContext
    grouping: GroupingResult

    @property
    def named(self) -> List[Tuple[str, torch.Tensor]]:
        return [np for g in self.groups for np in g["named"]]


def build_grouping(
    params: Any, config: OptimizerConfig, parallel: Optional[ParallelContext] = None
) -> ParamSetup:
    """The routing and groups of `params` under `config`. Without `parallel`, the layout is megatron-core's
    when its parallel state is initialised (found from the model, or from Megatron's parameters given
    without it), DTensor parameters' own (FSDP2, HSDP, FSDP2 x TP: `dtensor_context`), else a single
    process. Refuses a DTensor placement it cannot describe, a parameter given twice, a TEON run
    that forms no stack (unless teon_per_layer_fallback) and, under pipeline parallelism, a TEON group cut
    by a stage boundary (unless config allows it). No collective."""
    user_groups = normalize_params(params)
    dtensors = dtensor_context([np for g in user_groups for np in g["named"]], parallel)
    if dtensors is not None:
        if config.qk_clip is not None or config.qk_clip_log:
            raise ValueError(
                "teonspeed: option 'qk_clip'/'qk_clip_log' is not supported with DTensor parameters (FSDP2, "
                "HSDP, FSDP2 x TP) yet: its rescale writes whole q/k weights; leave it out"
            )
        parallel = dtensors
    elif parallel is None and isinstance(params, torch.nn.Module):
        parallel = megatron_context(params)
    elif parallel is None:
        # named_parameters() and param groups of a Megatron model get the layout passing the model gets
        parallel, renamed = megatron_context_of_parameters(
            [np for g in user_groups for np in g["named"]], {i for g in user_groups for i in g["unnamed"]}
        )
        for g in user_groups:
            g["named"] = [(renamed.get(id(p), n), p) for n, p in g["named"]]
    parallel = parallel or ParallelContext()
    seen, named, force_route = set(), [], {}
    for group in user_groups:
        for name, p in group["named"]:
            if id(p) in seen:
                raise ValueError(f"teonspeed: parameter {name!r} appears twice in the param groups")
            seen.add(id(p))
            named.append((name, p))
            if ROUTE_KEY in group:
                force_route[name] = group[ROUTE_KEY]
    c = config
    grouping = build_groups(
        named,
        teon_k=c.teon_k,
        teon_mode=c.teon_mode,
        teon_types=c.teon_types,
        split_fused=c.split_fused,
        grouping_rule=c.grouping_rule,
        force_route=force_route,
        full_shape=parallel.full_shape,
        relocate=parallel.relocate,
    )
    check_stage_cuts(grouping, parallel, c.cut_groups_at_stage_boundary)
    require_teon_stacks(grouping, c.teon_k, c.teon_types, c.teon_per_layer_fallback)
    return ParamSetup(user_groups, parallel, grouping)


@dataclass
class DTensorContext(ParallelContext):
    """The layout of DTensor parameters (FSDP2's `fully_shard`, HSDP, FSDP2 x TP), read from their meshes
    and placements: `dp_group` is the group FSDP chunks dim 0 over (under HSDP, attach widens it to every
    replica's shard group), `tp_group` the one TP cuts over, `layouts` each parameter's."""

    layouts: Dict[str, DTensorLayout] = field(default_factory=dict)

    def full_shape(self, name: str, p: torch.Tensor) -> Tuple[int, ...]:
        return tuple(p.shape)  # a DTensor's shape is the global one


def dtensor_context(
    named: List[Tuple[str, torch.Tensor]], given: Optional[ParallelContext]
) -> Optional[DTensorContext]:
    """The layout of DTensor parameters, or None when there are none. Every FSDP-chunked parameter must
    be chunked over the same ranks and every TP-cut one cut over the same ranks (one model, one mesh);
    plain tensors cannot sit beside DTensors, nor can an explicit `parallel` context. No collective."""
    dtensors = [(n, p) for n, p in named if is_dtensor(p)]
    if not dtensors:
        return None
    plain = next((n for n, p in named if not is_dtensor(p)), None)
    if plain is not None:
        raise ValueError(
            f"teonspeed: parameter {plain!r} is a plain tensor beside DTensor parameters "
            f"({dtensors[0][0]!r}, ...); shard the whole model with fully_shard, or pass only its "
            f"DTensor parameters"
        )
    if given is not None:
        raise ValueError(
            "teonspeed: parallel= is not used with DTensor parameters (FSDP2, HSDP, FSDP2 x TP): their "
            "layout is read from their DeviceMesh and placements; leave parallel out"
        )
    layouts, groups = {}, {"dp": {}, "tp": {}}
    for name, p in dtensors:
        layout = layouts[name] = describe_parameter(name, p)
        where, mesh_type = p.to_local().device.type, p.device_mesh.device_type
        if where != mesh_type:  # FSDP2's CPUOffloadPolicy
            raise ValueError(
                f"teonspeed: DTensor parameter {name!r} lives on {where} while its mesh is {mesh_type} "
                f"(FSDP2 offload_policy=CPUOffloadPolicy()); the exchange runs on the mesh's devices: "
                f"leave offload_policy out"
            )
        for kind, mesh_dim in (("dp", layout.fsdp_mesh_dim), ("tp", layout.tp_mesh_dim)):
            if mesh_dim is not None:
                group = p.device_mesh.get_group(mesh_dim)
                groups[kind].setdefault(tuple(dist.get_process_group_ranks(group)), (name, group))
    for kind, found in groups.items():
        if len(found) > 1:
            (a, _), (b, _) = list(found.values())[:2]
            how = "FSDP-chunked" if kind == "dp" else "TP-cut"
            raise ValueError(
                f"teonspeed: DTensor parameters {a!r} and {b!r} are {how} over different ranks "
                f"{list(found)[:2]}; teonspeed steps one model on one DeviceMesh"
            )
    dp = next(iter(groups["dp"].values()), (None, None))[1]
    tp = next(iter(groups["tp"].values()), (None, None))[1]
    if dp is None:  # the TP-only and replicated-DTensor paths are not tested: refused, not guessed
        raise ValueError(
            f"teonspeed: DTensor parameter {dtensors[0][0]!r} (placements {dtensors[0][1].placements}) "
            f"is not chunked by FSDP; DTensor layouts without fully_shard (parallelize_module alone) are "
            f"not supported yet: fully_shard the model too (FSDP2 x TP), or use Megatron-core's tensor "
            f"parallelism"
        )
    both = next((n for n, lay in layouts.items() if lay.replicate_mesh_dims and lay.tp_dim is not None), None)
    if both is not None:
        raise ValueError(
            f"teonspeed: DTensor parameter {both!r} is replicated (HSDP) and TP-cut on a mesh of shape "
            f"{layouts[both].mesh_shape}; HSDP x TP is not supported yet: use HSDP, or FSDP2 x TP"
        )
    unsharded = next((n for n, lay in layouts.items() if lay.fsdp_mesh_dim is None), None)
    if unsharded is not None:
        raise ValueError(
            f"teonspeed: DTensor parameter {unsharded!r} is not chunked by FSDP while others are "
            f"(placements {dict(dtensors)[unsharded].placements}); fully_shard the module holding it"
        )
    specs = {n: ShardSpec(tp_partition_dim=lay.tp_dim) for n, lay in layouts.items()}
    return DTensorContext(specs=specs, tp_group=tp, dp_group=dp, layouts=layouts)
