"""The one step shared by Muon, TEON and HTMuon; they differ only in their defaults and their rule.

    1. check   every gradient finite, every rank sharing the step on the same plan, the global gradient
               norm where the step clips: one collective and one host read (step_check.py)
    2. momentum, element-wise, on each tensor the step updates in this layout (stepped.py: parameters,
               TP shards, ZeRO flat partitions, Megatron bucket partitions)
    3. runner.run(groups, io): each group's momentum matrices gathered wherever their pieces live,
               stacked, transformed, and each holder's piece of the update written (parallel/runner.py)
    4. apply   W ← W(1 − lr·wd) − lr·update, and an AdamW step for the non-matrix parameters

The layout is a description handed to this step (which tensors it updates, which runner gathers the
matrices), never a step path of its own.
"""

from __future__ import annotations

import weakref
from types import MappingProxyType
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..config import OptimizerConfig, make_config
from ..fused import LAYOUT_ATTR
from ..grouping import GroupingResult, MatrixRef, OrthoGroup
from ..matrix_io import matrix_view, write_matrix
from ..ortho import heavy_tail, orthogonalize
from ..ortho.compute_dtype import check_cpu_bf16_env
from ..parallel.context import DTensorContext, ParallelContext, build_grouping
from ..parallel.cost import adamw_bytes, cluster_profile
from ..parallel.distributed import DistributedRunner
from ..parallel.flat import BucketShard, FlatPartition
from ..parallel.local import LocalRunner
from ..parallel.partitioned import Layout, PartitionRunner, check_groups_within_partitions
from ..parallel.runner import Runner, StepIO
from ..parallel.topology import build_step_group, build_topology
from .checkpoint import LAYOUT_KEY, CheckpointState  # noqa: F401  (LAYOUT_KEY: re-exported)
from .checks import agreed_construction
from .dtensor_stepped import attach_dtensor_layout
from ..params import internal_groups
from ..plan import Plan
from ..qk_clip import attach_from_options
from .scaling import lr_multiplier
from .step_check import check_step
from .stepped import BucketTensors, FlatTensors, ParamTensors, Stepped, part
from .updates import adamw_step, momentum_direction


class OrthoOptimizer(CheckpointState, torch.optim.Optimizer):
    """Orthogonalized-update optimizer with an AdamW part for the non-matrix parameters.

    params: an nn.Module (its fused weights are annotated and split automatically), an iterable of
    (name, parameter) pairs such as `model.named_parameters()`, or a list of param-group dicts whose
    "params" hold (name, parameter) pairs or parameters (unnamed ones are named param_<i>). A group
    may set `route` ("ortho"/"adamw") and override lr, weight_decay, momentum, nesterov, adamw_lr,
    adamw_weight_decay, adamw_betas, adamw_eps.
    """

    kind = "muon"

    def __init__(self, params, *, parallel: Optional[ParallelContext] = None, **options: Any) -> None:
        # Every rank raises the same refusal, before the runner's first collective (none is left waiting).
        with agreed_construction():
            named = self._construct(params, parallel, options)
        self._params_by_name = {n: p for n, p in named}
        # the model it was built from, if any (a step on parameters the model no longer has is refused)
        self._model = weakref.ref(params) if isinstance(params, torch.nn.Module) else None
        self._layouts = {n: getattr(p, LAYOUT_ATTR, None) for n, p in named}
        self._tensors: ParamTensors = ParamTensors()  # what the step updates: the parameters, until attached
        if isinstance(self.parallel, DTensorContext):  # FSDP2, HSDP, FSDP2 x TP: local tensors, FSDP chunks
            attach_dtensor_layout(self)
        else:
            self._runner: Runner = self._make_runner()
        self._plan_cache: Dict[Tuple, Tuple[Dict[str, int], Dict[str, List[str]]]] = {}
        self.grad_norm: Optional[float] = None  # the last step's global gradient norm, where it clips
        # QK-clip runs after each step through torch's step hooks (teonspeed.qk_clip), not inside step():
        # attached here when the model was passed, else by the integration or teonspeed.qk_clip.attach.
        self.qk_clip = attach_from_options(params, self)

    def _construct(
        self, params, parallel: Optional[ParallelContext], options: Dict[str, Any]
    ) -> List[Tuple[str, torch.Tensor]]:
        """Options, parameters, layout and groups: everything that can refuse the optimizer, made
        without any collective. Returns the named parameters."""
        self.config: OptimizerConfig = make_config(self.kind, options)
        # parallel_mode="distributed" named explicitly: run the exchange code even in a world of one rank
        # (one GPU with an NCCL group exercises it); otherwise a one-rank world takes the local path.
        self._mode_forced = options.get("parallel_mode") == "distributed"
        check_cpu_bf16_env()  # a bad TEONSPEED_CPU_BF16 fails here, not mid-step after the momentum moved
        setup = build_grouping(params, self.config, parallel)  # the same call as teonspeed.plan's
        user_groups, named = setup.groups, setup.named
        self.parallel: ParallelContext = setup.parallel
        self.grouping: GroupingResult = setup.grouping
        self._names: Dict[int, str] = {id(p): n for n, p in named}
        route = {r.name: r.route for r in self.grouping.routing}
        super().__init__(internal_groups(self.config, user_groups, route), {})
        return named

    # -- the layout: what the step updates and who gathers the matrices ---------------------------------
    def rebind(self, pairs: Iterable[Tuple[torch.Tensor, torch.Tensor]]) -> None:
        """(new, old): `new` (e.g. an fp32 master copy) now stands for parameter `old`."""
        for new, old in pairs:
            name = self._names[id(old)]
            self._names[id(new)] = name
            self._params_by_name[name] = new

    def attach_flat_partitions(
        self,
        partitions: Dict[int, FlatPartition],
        device: Optional[torch.device] = None,
        adamw_bytes: int = 0,
    ) -> None:
        """ZeRO-1/2: each param group now holds one flat partition; `partitions` maps the id of that
        tensor to its layout. A TEON group must then live inside one param group (they are stepped one
        group at a time). Plans who orthogonalizes what (a collective over tp × dp: every rank attaches
        at the same point); `device` is the partitions' device; `adamw_bytes`: what AdamW moves per rank
        and direction for the same matrices in this layout, reported in comm_stats."""
        check_groups_within_partitions(partitions, self.grouping.groups)
        self.attach_layouts(partitions, FlatTensors(partitions), device, adamw_bytes)

    def attach_layouts(
        self,
        layouts: Mapping[Any, Layout],
        tensors: ParamTensors,
        device: Optional[torch.device] = None,
        adamw_bytes: int = 0,
        together: bool = False,
        itemsize: int = 4,
    ) -> None:
        """Any layout of sharded pieces (parallel/sharded.py): `layouts` say where the data-parallel ranks
        hold each parameter's pieces (flat partitions, or `PieceLayout`s whose holds name this rank's
        stepped tensors by their key), `tensors` what the step updates (optim/stepped.py, keyed the same
        way). Plans who orthogonalizes what: a collective over each plan's tp × dp work group, so every
        rank attaches at the same point. `device`: the stepped tensors' device; `adamw_bytes`: what AdamW
        moves per rank and direction for the same matrices in this layout (comm_stats); `together`: plan
        flat partitions of one topology as one local buffer (Megatron's buckets); `itemsize`: the stepped
        tensors' element size (4 for fp32 masters; 2 where bf16 parameters are stepped themselves), what the
        exchange moves per element, for the planner's balancing and the predicted bytes."""
        self._runner = PartitionRunner(
            self._make_runner(),
            layouts,
            self.grouping.groups,
            self.config,
            lambda key: device or torch.device("cpu"),
            adamw_bytes,
            together,
            itemsize,
        )
        self._tensors = tensors

    def attach_bucket_shards(
        self, buckets: List[BucketShard], device: Optional[torch.device] = None, clip_grad: float = 0.0
    ) -> None:
        """Megatron's distributed optimizer: DDP reduce-scatters each bucket's gradients and all-gathers its
        parameters; the step updates only this rank's partition of every bucket (a collective over
        tp × dp at attach, like attach_flat_partitions). `clip_grad` > 0: clip the gradients to that
        global norm (over every rank's counted partition ranges) before the step."""
        # comm_stats.adamw_bytes: what AdamW moves for the same matrices here, DDP's reduce-scatter of their
        # gradients and all-gather of their parameters
        ortho = set(self.grouping.ortho_names())
        moved = sum(
            adamw_bytes(
                sum(e.numel for e in b.partition.entries if e.name in ortho),
                b.partition.dp_size,
                b.grad.element_size(),
                b.param.element_size(),
                gradient_allreduce=False,
            )
            for b in buckets
        )
        # The buckets of one topology (dense, or expert) are planned together, so a TEON stack or fused
        # weight whose members lie in different buckets is planned like one inside a bucket.
        self._runner = PartitionRunner(
            self._make_runner(),
            {i: b.partition for i, b in enumerate(buckets)},
            self.grouping.groups,
            self.config,
            lambda i: device or buckets[i].grad.device,
            moved,
            together=True,
        )
        group_of = {n: g for g in self.param_groups for n in g["names"]}
        self._tensors = BucketTensors(buckets, clip_grad, group_of)

    def _make_runner(self) -> Runner:
        ctx = self.parallel
        if not (ctx.distributed or (self._mode_forced and dist.is_initialized())):
            return LocalRunner()
        # Collective over the world: every rank builds its optimizer at the same point.
        topologies = {
            "dense": build_topology(ctx.tp_group, ctx.dp_group),
            "expert": build_topology(ctx.expert_tp_group, ctx.expert_dp_group),
        }
        comm_dtype = _compute_dtype(self.config.comm_dtype)
        return DistributedRunner(
            topologies,
            ctx.specs,
            self.config.parallel_mode,
            self.config.ns_steps,
            step_group=build_step_group(topologies, ctx.pipeline_group),
            waves=self.config.overlap_waves,
            comm_dtype=comm_dtype,
            profile=cluster_profile(self.config.cluster),
        )

    # -- introspection --------------------------------------------------------------------------------
    @property
    def runner(self) -> Runner:
        """Where the step's groups are orthogonalized: local, distributed, or over flat partitions."""
        return self._runner

    @property
    def comm_stats(self):
        """Bytes sent/received and FLOPs of the last step on this rank (None in a single process)."""
        return self._runner.stats

    @property
    def partitions(self) -> Dict[Any, FlatPartition]:
        """ZeRO-1/2 and the distributed optimizer: the flat partitions the step updates, by key; empty in
        other layouts."""
        return dict(getattr(self._runner, "partitions", {}))

    @property
    def zero_plans(self):
        """ZeRO-1/2 and the distributed optimizer: the plan of each flat partition (jobs local or cut,
        owners, bytes, FLOP balance); empty in other layouts."""
        return [s.plan for s in getattr(self._runner, "steps", {}).values()]

    def zero_expected_bytes(self) -> Tuple[int, int]:
        """Sharded layouts (ZeRO, Megatron buckets, FSDP2): (sent, received) bytes of one step on this rank,
        by the plans (in the stepped tensors' element size given at attach: fp32 masters under ZeRO)."""
        return self._runner.expected_bytes(self.grouping.groups) if self.zero_plans else (0, 0)

    @property
    def plan(self) -> Plan:
        return Plan(self.kind, self.config, self.grouping, self._runner)

    def name_of(self, p: torch.Tensor) -> str:
        """The name of parameter `p`, or of the parameter a tensor stands for after `rebind` (an fp32
        master copy)."""
        try:
            return self._names[id(p)]
        except KeyError:
            raise ValueError(
                f"teonspeed: a tensor of shape {tuple(p.shape)} is not a parameter of this "
                f"optimizer (nor rebound to one)"
            ) from None

    @property
    def parameters_by_name(self) -> Mapping[str, torch.Tensor]:
        """Name -> the tensor the step updates for it (read-only)."""
        return MappingProxyType(self._params_by_name)

    def matrix_of(self, t: torch.Tensor, m: MatrixRef) -> torch.Tensor:
        """Matrix `m` of `t` (its parameter, its gradient or a state buffer of the same shape): the
        expert's slice of a 3-D weight, or its part of a fused weight (a copy)."""
        return matrix_view(t, m, self._layouts[m.name])

    # -- the step -------------------------------------------------------------------------------------
    def transform(self, stacked: torch.Tensor, step: int) -> torch.Tensor:
        """The rule: what a stack of momentum matrices (B, m, n) becomes. Muon/TEON: the polar factor."""
        c = self.config
        return orthogonalize(stacked, c.orthogonalizer, c.ns_steps, _compute_dtype(c.ns_dtype), c.ns_backend)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not check_step(self):
            return loss
        count = self._ortho_step_count()
        for group in self.param_groups:
            if group["params"]:  # ZeRO-3 empties every param group but the sub-group it steps
                group["step"] += 1
        tensors = self._tensors.stepped(self)
        directions = {t.key: d for t in tensors for d in [self._momentum(t)] if d is not None}
        names = [n for t in tensors if t.key in directions for n in t.names]
        updates = self._ortho_updates(directions, count, names, self._tensors.new_step(self))
        for t in tensors:
            self._apply(t, updates.get(t.key))
        return loss

    def _momentum(self, t: Stepped) -> Optional[torch.Tensor]:
        """The direction to orthogonalize: the momentum of the tensor's orthogonalized ranges (zeros
        elsewhere in a partition), or None for a tensor stepped whole by AdamW."""
        ortho = [(where, g) for where, g in t.segments if g["route"] == "ortho"]
        if t.whole and not ortho:
            return None
        if "momentum_buffer" not in t.state:
            t.state["momentum_buffer"] = torch.zeros_like(t.weights)
        buffer = t.state["momentum_buffer"]
        if t.whole:
            g = t.segments[0][1]
            return momentum_direction(t.grad, buffer, g["momentum"], g["nesterov"])
        direction = torch.zeros_like(t.weights)
        for where, g in ortho:
            direction[where] = momentum_direction(t.grad[where], buffer[where], g["momentum"], g["nesterov"])
        return direction

    def _ortho_updates(
        self, directions: Dict[Any, torch.Tensor], step: int, names: Sequence[str], new_step: bool = True
    ) -> Dict[Any, torch.Tensor]:
        """Key -> the scaled orthogonalized update of every tensor with a direction (runner.run)."""
        updates = {key: torch.zeros_like(d) for key, d in directions.items()}
        layouts, lr_scale = self._layouts, self.config.lr_scale
        io = StepIO(
            directions,
            updates,
            transform=lambda x: self.transform(x, step),
            view=lambda m, t: matrix_view(t, m, layouts[m.name]),
            store=lambda m, t, value: write_matrix(t, m, layouts[m.name], value),
            scale=lambda m: lr_multiplier(lr_scale, *m.shape),
            new_step=new_step,
        )
        self._runner.run(self.groups_for(set(names)), io)
        return updates

    def _apply(self, t: Stepped, update: Optional[torch.Tensor]) -> None:
        """W ← W(1 − lr·wd) − lr·update on the orthogonalized ranges, an AdamW step on the others."""
        for where, g in t.segments:
            lr = g["lr"] * g["lr_ratio"]
            if g["route"] == "ortho":
                if update is not None:
                    weights = part(t.weights, where)
                    weights.mul_(1 - lr * g["weight_decay"])
                    weights.add_(part(update, where), alpha=-lr)
                continue
            state = t.state
            if "exp_avg" not in state:
                zeros = torch.zeros_like
                state.update(step=0, exp_avg=zeros(t.weights), exp_avg_sq=zeros(t.weights))
            if t.group_steps:
                count = g["step"]
            else:
                state["step"] += 1
                count = state["step"]
            adamw_step(
                part(t.weights, where),
                part(t.grad, where),
                part(state["exp_avg"], where),
                part(state["exp_avg_sq"], where),
                count,
                lr,
                g["betas"],
                g["eps"],
                g["weight_decay"],
            )
        if t.after is not None:
            t.after()

    def group_of(self, name: str) -> Dict[str, Any]:
        """The param group that steps parameter `name`."""
        return next(g for g in self.param_groups if name in g["names"])

    def groups_for(self, names) -> List[OrthoGroup]:
        """The groups a step runs when the matrices `names` have a direction: whole TEON groups, or member
        by member where a TEON group did not get all its gradients."""
        groups = []
        for g in self.grouping.groups:
            present = [m for m in g.members if m.name in names]
            if len(present) == len(g.members):
                groups.append(g)
            else:
                groups.extend(OrthoGroup((m,), g.mode) for m in present)
        return groups

    def _ortho_step_count(self) -> int:
        """Steps taken so far by the orthogonalized groups (the same in all of them once a step is over;
        during a ZeRO-3 step, read from the group being stepped, the only one holding params)."""
        ortho = [g for g in self.param_groups if g["route"] == "ortho"]
        return next((g["step"] for g in ortho if g["params"]), next((g["step"] for g in ortho), 0))


class HeavyTailMixin:
    """HTMuon's rule: U Σᵖ Vᵀ every `ht_interval` steps, the plain polar factor in between."""

    def transform(self, stacked: torch.Tensor, step: int) -> torch.Tensor:
        c = self.config
        if step % c.ht_interval != 0:
            return super().transform(stacked, step)
        return heavy_tail(
            stacked,
            c.ht_power,
            c.ht_method,
            c.orthogonalizer,
            c.ns_steps,
            _compute_dtype(c.ns_dtype),
            backend=c.ns_backend,
        )


def _compute_dtype(option: str) -> Optional[torch.dtype]:
    """ns_dtype / comm_dtype: None for "auto" (decided from the data), else the named dtype."""
    return {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}[option]
