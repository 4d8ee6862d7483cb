"""The one step shared by Muon, TEON and HTMuon; they differ only in their defaults and their rule.

    1. check every gradient is finite (else skip the step untouched)
    2. momentum, element-wise, on each parameter (works on shards as well as on full tensors)
    3. for each group of matrices: read the momentum matrices, stack, transform, split, scale
       (where that happens — here or on an owner rank — is the runner's business)
    4. W ← W(1 − lr·wd) − lr·update, and an AdamW step for the non-matrix parameters
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist

from ..config import OptimizerConfig, make_config
from ..fused import LAYOUT_ATTR, FusedLayout, annotate_model
from ..grouping import GroupingResult, MatrixRef, OrthoGroup, build_groups
from ..ortho import heavy_tail, orthogonalize
from ..ortho.compute_dtype import check_cpu_bf16_env
from ..parallel.context import ParallelContext, check_stage_cuts, megatron_context, megatron_context_of_parameters
from ..parallel.cost import adamw_bytes, cluster_profile
from ..parallel.distributed import DistributedRunner
from ..parallel.flat import BucketShard, FlatPartition, FlatStep, gather_work_ranks, plan_partitions
from ..parallel.local import LocalRunner, MatrixIO, Runner, StepCheck
from ..parallel.owners import ns_flops
from ..parallel.topology import build_step_group, build_topology
from .scaling import lr_multiplier
from .updates import adamw_step, clip_coefficient, momentum_direction

# Keys a user's param group may override, and the internal group key each one sets.
_ORTHO_GROUP_KEYS = {"lr": "lr", "weight_decay": "weight_decay", "momentum": "momentum", "nesterov": "nesterov"}
_ADAMW_GROUP_KEYS = {"adamw_lr": "lr", "adamw_weight_decay": "weight_decay", "adamw_betas": "betas",
                     "adamw_eps": "eps"}
_ROUTE_KEY = "route"  # "ortho" | "adamw": force every parameter of a user group to one side
# DeepSpeed MoE's group marks (deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer):
# ZeRO partitions a group with moe=True over the expert-data-parallel group of its `name`; kept as given.
_DEEPSPEED_MOE_KEYS = ("moe", "name")
LAYOUT_KEY = "teonspeed_layout"  # in state_dict(): the layout the state was saved in


class OrthoOptimizer(torch.optim.Optimizer):
    """Orthogonalized-update optimizer with an AdamW part for the non-matrix parameters.

    params: an nn.Module (its fused weights are annotated and split automatically), an iterable of
    (name, parameter) pairs such as `model.named_parameters()`, or a list of param-group dicts whose
    "params" hold (name, parameter) pairs or parameters (unnamed ones are named param_<i>). A group
    may set `route` ("ortho"/"adamw") and override lr, weight_decay, momentum, nesterov, adamw_lr,
    adamw_weight_decay, adamw_betas, adamw_eps.
    """

    kind = "muon"

    def __init__(self, params, *, parallel: Optional[ParallelContext] = None, **options: Any) -> None:
        self.config: OptimizerConfig = make_config(self.kind, options)
        # parallel_mode="distributed" named explicitly: run the exchange code even in a world of one rank
        # (one GPU with an NCCL group exercises it); otherwise a one-rank world takes the local path.
        self._mode_forced = options.get("parallel_mode") == "distributed"
        check_cpu_bf16_env()  # a bad TEONSPEED_CPU_BF16 fails here, not mid-step after the momentum moved
        user_groups = _normalize_params(params)
        if parallel is None and isinstance(params, torch.nn.Module):
            parallel = megatron_context(params)
        elif parallel is None:
            # named_parameters() and param groups of a Megatron model get the layout passing the model gets
            parallel, renamed = megatron_context_of_parameters([np for g in user_groups for np in g["named"]],
                                                               {i for g in user_groups for i in g["unnamed"]})
            for g in user_groups:
                g["named"] = [(renamed.get(id(p), n), p) for n, p in g["named"]]
        self.parallel = parallel or ParallelContext()
        self._names: Dict[int, str] = {}
        named: List[Tuple[str, torch.Tensor]] = []
        force_route: Dict[str, str] = {}
        for group in user_groups:
            for name, p in group["named"]:
                if id(p) in self._names:
                    raise ValueError(f"teonspeed: parameter {name!r} appears twice in the param groups")
                self._names[id(p)] = name
                named.append((name, p))
                if _ROUTE_KEY in group:
                    force_route[name] = group[_ROUTE_KEY]
        self.grouping: GroupingResult = self._build_grouping(named, force_route)
        check_stage_cuts(self.grouping, self.parallel, self.config.cut_groups_at_stage_boundary)
        route = {r.name: r.route for r in self.grouping.routing}
        super().__init__(self._internal_groups(user_groups, route), {})
        self._params_by_name = {n: p for n, p in named}
        self._layouts = {n: getattr(p, LAYOUT_ATTR, None) for n, p in named}
        self._flat: Dict[int, FlatPartition] = {}  # id(flat partition tensor) -> its layout (ZeRO-1/2)
        self._runner: Runner = self._make_runner()
        self._plan_cache: Dict[Tuple, Tuple[Dict[str, int], Dict[str, List[str]]]] = {}
        self._flat_steps: Dict[int, FlatStep] = {}  # id(flat partition tensor) -> its planned step
        # Megatron distributed optimizer: each bucket partition and the step planned for it (one per topology)
        self._buckets: List[Tuple[BucketShard, FlatStep]] = []
        self._clip_grad = 0.0  # distributed optimizer: clip the global gradient norm to this (0: off)
        self.grad_norm: Optional[float] = None  # the last step's global gradient norm, where it clips

    # -- hooks for wrappers that replace the parameters (DeepSpeed's fp32 masters, ZeRO partitions) ----
    def rebind(self, pairs: Iterable[Tuple[torch.Tensor, torch.Tensor]]) -> None:
        """(new, old): `new` (e.g. an fp32 master copy) now stands for parameter `old`."""
        for new, old in pairs:
            name = self._names[id(old)]
            self._names[id(new)] = name
            self._params_by_name[name] = new

    def attach_flat_partitions(self, partitions: Dict[int, FlatPartition], device: Optional[torch.device] = None,
                               adamw_bytes: int = 0) -> None:
        """ZeRO-1/2: each param group now holds one flat partition; `partitions` maps the id of that
        tensor to its layout. A TEON group must then live inside one param group (they are stepped one
        group at a time). Plans who orthogonalizes what (a collective over tp × dp: every rank attaches
        at the same point); `device` is the partitions' device; `adamw_bytes`: what AdamW moves per rank
        and direction for the same matrices in this layout, reported in comm_stats."""
        owner = {}
        for key, fp in partitions.items():
            for name in fp.names():
                owner[name] = key
        for g in self.grouping.groups:
            keys = {owner.get(m.name) for m in g.members}
            if len(keys) > 1:
                raise ValueError("teonspeed: under ZeRO-1/2 the members of a TEON group must be in the same param "
                                 "group; " + " + ".join(m.label for m in g.members) + " are not. Put them in one group "
                                 "or set teon_k=1")
        self._flat = dict(partitions)
        self._flat_adamw_bytes = adamw_bytes
        device = device or torch.device("cpu")
        self._flat_steps = {key: self._plan_flat([fp], device) for key, fp in partitions.items()}

    def attach_bucket_shards(self, buckets: List[BucketShard], device: Optional[torch.device] = None,
                             clip_grad: float = 0.0) -> None:
        """Megatron's distributed optimizer: DDP reduce-scatters each bucket's gradients and all-gathers its
        parameters; the step updates only this rank's partition of every bucket (a collective over
        tp × dp at attach, like attach_flat_partitions). The buckets of one topology (dense, or expert) are
        planned together, so a TEON stack or fused weight whose members lie in different buckets is planned
        like one inside a bucket. `clip_grad` > 0: clip the gradients to that global norm (over every rank's
        counted partition ranges) before the step."""
        together: Dict[Tuple, List[BucketShard]] = {}  # (topology, data-parallel ranks) -> its buckets
        for b in buckets:
            group = b.partition.dp_group
            ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else ()
            together.setdefault((id(self._flat_topology(b.partition)), ranks), []).append(b)
        self._buckets = []
        for shards in together.values():
            flat_step = self._plan_flat([b.partition for b in shards], device or shards[0].grad.device)
            self._buckets += [(b, flat_step) for b in shards]
        self._clip_grad = clip_grad
        # comm_stats.adamw_bytes: what AdamW moves for the same matrices here, DDP's reduce-scatter of their
        # gradients and all-gather of their parameters
        ortho = set(self.grouping.ortho_names())
        self._bucket_adamw_bytes = sum(
            adamw_bytes(sum(e.numel for e in b.partition.entries if e.name in ortho), b.partition.dp_size,
                        b.grad.element_size(), b.param.element_size(), gradient_allreduce=False) for b in buckets)
        self._group_of = {n: g for g in self.param_groups for n in g["names"]}

    def _topology_name(self, name: str) -> str:
        return self.parallel.spec(name).topology

    def _flat_topology(self, partition: FlatPartition):
        """The topology a flat partition is planned on (None in a single process): the expert one
        (expert-TP × expert-DP) for expert-parallel weights, which DeepSpeed's MoE groups and Megatron's
        expert_parallel_buffers partition over the expert-data-parallel group; the dense one otherwise."""
        if not isinstance(self._runner, DistributedRunner):
            return None
        kinds = {e.name: self._topology_name(e.name) for e in partition.entries}
        if len(set(kinds.values())) > 1:
            dense = next(n for n, kind in kinds.items() if kind == "dense")
            expert = next(n for n, kind in kinds.items() if kind == "expert")
            raise ValueError(f"teonspeed: a ZeRO-1/2 partition (or Megatron distributed-optimizer bucket) holds dense "
                             f"weights ({dense!r}) and expert-parallel weights ({expert!r}); they are partitioned over "
                             f"different data-parallel groups. Put the expert parameters in their own param group "
                             f"(DeepSpeed: deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer)")
        kind = next(iter(kinds.values()), "dense")
        topology = self._runner.topologies[kind]
        cut_over = dist.get_process_group_ranks(partition.dp_group) if partition.dp_group is not None else []
        if not set(cut_over) <= set(topology.work_ranks):
            raise ValueError(f"teonspeed: a ZeRO-1/2 partition of {kind} weights is cut over ranks {cut_over}, outside "
                             f"the {kind} tensor x data-parallel group {list(topology.work_ranks)}: the data-parallel "
                             f"groups given to teonspeed (ParallelContext dp_group / expert_dp_group) are not the ones "
                             f"ZeRO cuts over")
        return topology

    def _plan_flat(self, partitions: List[FlatPartition], device: torch.device) -> FlatStep:
        """One plan and step over this rank's partitions of flat buffers of one topology, cut over the same
        data-parallel ranks (a collective over its tp × dp work group)."""
        partition = partitions[0]
        topology = self._flat_topology(partition)
        tp_size, tp_rank = (topology.tp_size, topology.tp_rank) if topology is not None else (1, 0)
        work_group, work_size, me = ((topology.work_group, topology.work_size, topology.work_rank)
                                     if topology is not None else (None, 1, 0))
        work_rank = gather_work_ranks(partition, tp_rank, tp_size, work_group, work_size, device)
        steps = self.config.ns_steps or 5
        plan = plan_partitions(partitions, self.grouping.groups, work_rank, tp_size,
                              cost=lambda g: ns_flops(g.stacked_shape, steps),
                              tp_sharded=lambda m: self._flat_placement(m)[0] is not None,
                              cluster=cluster_profile(self.config.cluster), itemsize=4)  # fp32 masters
        return FlatStep(plan, partition.dp_rank, me, work_group)

    @property
    def zero_plans(self):
        """ZeRO-1/2: the plan of each flat partition (jobs local or cut, owners, bytes, FLOP balance)."""
        return [s.plan for s in self._flat_steps.values()] + [s.plan for s, _ in self._bucket_sets()]

    def zero_expected_bytes(self) -> Tuple[int, int]:
        """ZeRO-1/2: (sent, received) bytes of one step on this rank, predicted by the plans (fp32 masters)."""
        steps = list(self._flat_steps.values()) + [s for s, _ in self._bucket_sets()]
        pairs = [s.expected_bytes(4) for s in steps]
        return sum(p[0] for p in pairs), sum(p[1] for p in pairs)

    def _make_runner(self) -> Runner:
        ctx = self.parallel
        if not (ctx.distributed or (self._mode_forced and dist.is_initialized())):
            return LocalRunner()
        # Collective over the world: every rank builds its optimizer at the same point.
        topologies = {"dense": build_topology(ctx.tp_group, ctx.dp_group),
                      "expert": build_topology(ctx.expert_tp_group, ctx.expert_dp_group)}
        comm_dtype = _compute_dtype(self.config.comm_dtype)
        return DistributedRunner(topologies, ctx.specs, self.config.parallel_mode, self.config.ns_steps or 5,
                                 step_group=build_step_group(topologies, ctx.pipeline_group),
                                 waves=self.config.overlap_waves, comm_dtype=comm_dtype,
                                 profile=cluster_profile(self.config.cluster))

    @property
    def comm_stats(self):
        """Bytes sent/received and FLOPs of the last step on this rank (None in a single process)."""
        return self._runner.stats

    # -- construction -------------------------------------------------------------------------
    def _build_grouping(self, named, force_route) -> GroupingResult:
        c = self.config
        return build_groups(named, teon_k=c.teon_k, teon_mode=c.teon_mode, teon_types=c.teon_types,
                            split_fused=c.split_fused, grouping_rule=c.grouping_rule, force_route=force_route,
                            full_shape=self.parallel.full_shape, relocate=self.parallel.relocate)

    def _internal_groups(self, user_groups, route) -> List[Dict[str, Any]]:
        c = self.config
        out = []
        for group in user_groups:
            overrides = group["overrides"]
            for side in ("ortho", "adamw"):
                members = [(n, p) for n, p in group["named"] if route[n] == side]
                if not members:
                    continue
                if side == "ortho":
                    g = dict(lr=c.lr, weight_decay=c.weight_decay, momentum=c.momentum, nesterov=c.nesterov)
                    keys = _ORTHO_GROUP_KEYS
                else:
                    g = dict(lr=c.adamw_lr, weight_decay=c.adamw_weight_decay, betas=c.adamw_betas, eps=c.adamw_eps)
                    keys = _ADAMW_GROUP_KEYS
                g.update({keys[k]: v for k, v in overrides.items() if k in keys})
                g.update({k: v for k, v in overrides.items() if k in _DEEPSPEED_MOE_KEYS})
                # group["lr"] is the *scheduled* lr, the same in every group so that any LR scheduler
                # (absolute ones like DeepSpeed's WarmupLR included) drives both sides; AdamW groups
                # keep their own lr as a fixed ratio to it.
                base_lr = overrides.get("lr", c.lr)
                if side == "adamw" and base_lr > 0:
                    g.update(lr_ratio=g["lr"] / base_lr, lr=base_lr)
                else:
                    g.update(lr_ratio=1.0)
                g.update(params=[p for _, p in members], names=[n for n, _ in members], route=side, step=0)
                out.append(g)
        return out

    # -- state --------------------------------------------------------------------------------
    def init_state(self) -> None:
        """Create every state buffer now, as the first step would (zeros; AdamW step 0). Checkpoint
        loaders that ask the optimizer which state to read (Megatron's torch_dist `sharded_state_dict(...,
        is_loading=True)`) see every buffer; creating them early changes no result."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if group["route"] == "ortho":
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                elif "exp_avg" not in state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))

    def layout(self) -> Dict[str, Any]:
        """What the state's shapes depend on: the parallel sizes and, per param group, the parameter
        names and the local shapes of the tensors the state is kept for (flat ZeRO partitions included)."""
        ctx = self.parallel
        sizes = {"tp": ctx.tp_size(False), "expert_tp": ctx.tp_size(True)}
        if self._flat:  # ZeRO-1/2: the state is kept per DP partition; otherwise it is replicated over DP
            sizes.update(dp=_group_size(ctx.dp_group), expert_dp=_group_size(ctx.expert_dp_group))
        tensors = [[list(p.shape) for p in g["params"]] for g in self.param_groups]
        return {"sizes": sizes, "names": [list(g["names"]) for g in self.param_groups], "shapes": tensors}

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state[LAYOUT_KEY] = self.layout()
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a state saved in the same layout (checked before anything changes). Megatron's torch_dist
        checkpoints reshard by themselves and carry no layout; a plain state dict cannot be resharded
        here (each rank holds only its shards), so another layout is refused naming both."""
        saved = state_dict.get(LAYOUT_KEY)
        if saved is not None:
            _check_same_layout(saved, self.layout())
        state_dict = {k: v for k, v in state_dict.items() if k != LAYOUT_KEY}
        super().load_state_dict(state_dict)

    # -- the step -----------------------------------------------------------------------------
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
        if not self._check_step():
            return loss
        if self._flat:
            self._flat_step()
            return loss
        if self._buckets:
            self._bucket_step()
            return loss
        directions = self._momentum_directions()
        updates = self._ortho_updates(directions)
        for group in self.param_groups:
            group["step"] += 1
            if group["route"] == "ortho":
                for p in group["params"]:
                    update = updates.get(self._names[id(p)])
                    if update is not None:
                        _apply(p, update, group)
            else:
                for p in group["params"]:
                    self._adamw(p, group)
        return loss

    def _momentum_directions(self) -> Dict[str, torch.Tensor]:
        directions: Dict[str, torch.Tensor] = {}
        for group in self.param_groups:
            if group["route"] != "ortho":
                continue
            for p in group["params"]:
                if p.grad is not None:
                    directions[self._names[id(p)]] = self._momentum(p, group)
        return directions

    def _momentum(self, p: torch.Tensor, group: Dict[str, Any]) -> torch.Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        return momentum_direction(p.grad, state["momentum_buffer"], group["momentum"], group["nesterov"])

    def _flat_step(self) -> None:
        """ZeRO-1/2: the param groups hold flat DP partitions (DeepSpeed steps them one group at a time)."""
        stats = self.comm_stats
        first = next(iter(self._flat))
        for group in self.param_groups:
            group["step"] += 1
            flat = group["params"][0]
            if stats is not None and id(flat) == first:  # DeepSpeed steps the groups in order, one per call
                stats.start_step()
                stats.adamw_bytes = self._flat_adamw_bytes
            if flat.grad is None:
                continue
            if group["route"] == "adamw":
                self._adamw(flat, group)
                continue
            update = self._flat_update(self._flat_steps[id(flat)], self._momentum(flat, group), group["step"] - 1)
            _apply(flat, update, group)

    def _flat_update(self, flat_step: FlatStep, direction: torch.Tensor, step: int) -> torch.Tensor:
        """The scaled orthogonalized update of a partition's momentum direction (counted in comm_stats)."""
        update, sent, received, flops = flat_step.run(
            direction, lambda x: self.transform(x, step),
            read=lambda m, unit: matrix_view(unit, _in_unit(m), self._layouts[m.name]),
            write=lambda m, unit, value: write_matrix(unit, _in_unit(m), self._layouts[m.name], value),
            placement=self._flat_placement, scale=lambda m: lr_multiplier(self.config.lr_scale, *m.shape))
        stats = self.comm_stats
        if stats is not None:
            stats.add(sent, received)
            stats.flops += flops
        return update

    BUCKET_STATE_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq")  # each over a whole bucket partition

    def bucket_state(self, shard: BucketShard) -> Dict[str, torch.Tensor]:
        """The state of one distributed-optimizer bucket partition, created (zeros) as the first step does."""
        state = self.state[shard.param]
        if "momentum_buffer" not in state:
            state.update({k: torch.zeros_like(shard.weights) for k in self.BUCKET_STATE_KEYS})
        return state

    def _bucket_sets(self) -> List[Tuple[FlatStep, List[BucketShard]]]:
        """Each planned step with its bucket partitions, in the order its local buffer holds them."""
        sets: Dict[int, Tuple[FlatStep, List[BucketShard]]] = {}
        for shard, flat_step in self._buckets:
            sets.setdefault(id(flat_step), (flat_step, []))[1].append(shard)
        return list(sets.values())

    def _bucket_step(self) -> None:
        """Megatron distributed optimizer: every bucket's partition holds matrices and AdamW parameters
        side by side; each part of the partition is stepped with its own param group's settings. The
        momentum directions of all buckets planned together form one local buffer, orthogonalized at once."""
        stats = self.comm_stats
        if stats is not None:
            stats.start_step()
            stats.adamw_bytes = self._bucket_adamw_bytes
        for group in self.param_groups:
            group["step"] += 1
        clip = clip_coefficient(self._clip_grad, self.grad_norm) if self.grad_norm is not None else 1.0
        for flat_step, shards in self._bucket_sets():
            direction = shards[0].weights.new_zeros(flat_step.plan.partition_size)
            ortho = []
            for b, (shard, part) in enumerate(zip(shards, direction.split(flat_step.plan.partition_sizes))):
                weights = shard.weights  # the fp32 master with bf16 parameters
                grad = shard.grad.float()  # fp32 grads (grad_reduce_in_fp32): the buffer itself, not a copy
                if clip < 1.0:
                    grad.mul_(clip)  # like Megatron, the fp32 main gradient is clipped in place
                state = self.bucket_state(shard)
                for entry, lo, hi in shard.slices():
                    group = self._group_of[entry.name]
                    if group["route"] == "ortho":
                        part[lo:hi] = momentum_direction(grad[lo:hi], state["momentum_buffer"][lo:hi],
                                                         group["momentum"], group["nesterov"])
                        ortho.append((weights, flat_step.plan.local_start(b), lo, hi, group))
                    else:
                        adamw_step(weights[lo:hi], grad[lo:hi], state["exp_avg"][lo:hi],
                                   state["exp_avg_sq"][lo:hi], group["step"], group["lr"] * group["lr_ratio"],
                                   group["betas"], group["eps"], group["weight_decay"])
            update = self._flat_update(flat_step, direction, self._ortho_step_count() - 1)
            for weights, start, lo, hi, group in ortho:
                _apply(weights[lo:hi], update[start + lo:start + hi], group)
            for shard in shards:
                if shard.master is not None:  # DDP's parameter all-gather spreads the bf16 partition
                    shard.param.copy_(shard.master)

    def _flat_placement(self, m: MatrixRef):
        if not isinstance(self._runner, DistributedRunner):
            return None, 1
        p = self._runner.placement(m, self._runner.topologies[self._topology_name(m.name)])
        return p.dim, p.stride

    def _check_step(self) -> bool:
        """Before anything changes: are all gradients finite on every rank sharing this step, and do
        those ranks agree on the step's plan? One device reduction, one collective, one host read."""
        params = [p for g in self.param_groups for p in g["params"]]
        # Megatron's distributed optimizer: only this rank's bucket partitions hold reduced gradients.
        grads = [b.grad for b, _ in self._buckets] if self._buckets else [p.grad for p in params if p.grad is not None]
        clips = bool(self._buckets) and self._clip_grad > 0
        self.grad_norm = None
        if not params or (not clips and not self.config.skip_nonfinite and isinstance(self._runner, LocalRunner)):
            return True
        device = (grads[0] if grads else params[0]).device
        if self.config.skip_nonfinite and grads:
            finite = torch.stack([torch.isfinite(g).all().to(device) for g in grads]).all()
        else:
            finite = torch.ones((), dtype=torch.bool, device=device)
        # The gradient norm rides in the step check: no collective or host read of its own.
        norm_sq = torch.stack([b.grad_norm_sq() for b, _ in self._buckets]).sum() if clips else None
        digests, lines = self._step_plan(params)
        ok, total_norm_sq = self._runner.check_step(StepCheck(finite, digests, lambda: lines, norm_sq))
        if total_norm_sq is not None:
            self.grad_norm = math.sqrt(total_norm_sq)
        if ok:
            return True
        # The skip path only (rare): name the culprits, one host read per gradient.
        if self._buckets:
            bad = [f"distributed-optimizer bucket {i}" for i, (b, _) in enumerate(self._buckets)
                   if not bool(torch.isfinite(b.grad).all())]
        else:
            bad = [self._names.get(id(p), "a flat ZeRO partition") for p in params
                   if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        where = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "") if bad else "another rank's parameters"
        warnings.warn(f"teonspeed: non-finite gradient in {where}; step skipped, weights and optimizer "
                      f"state unchanged", RuntimeWarning, stacklevel=4)
        return False

    def _step_plan(self, params: List[torch.Tensor]) -> Tuple[Dict[str, int], Dict[str, List[str]]]:
        """This rank's plan of the step, per topology, as text lines and their digests: the groups it
        will run (members, shapes, dtypes) and which parameters have a gradient. Cached per pattern."""
        key = tuple((p.grad is not None, p.dtype, tuple(p.shape)) for p in params)
        cached = self._plan_cache.get(key)
        if cached is not None:
            return cached
        lines: Dict[str, List[str]] = {"dense": [], "expert": []}
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) in self._flat:  # ZeRO-1/2: what the partition stands for, not its (padded) size
                    entries = self._flat[id(p)].entries
                    members = " ".join(f"{e.name}{e.shape}" for e in entries)
                    lines[self._topology_name(entries[0].name) if entries else "dense"].append(f"{group['route']} flat [{members}] {p.dtype} grad={p.grad is not None}")
                elif self._flat or group["route"] != "ortho":
                    lines["dense"].append(f"{group['route']} {self._names.get(id(p), '?')} {tuple(p.shape)} "
                                          f"{p.dtype} grad={p.grad is not None}")
        if not self._flat:
            with_grad = {n for n, p in self._params_by_name.items() if p.grad is not None}
            dtypes = {n: p.dtype for n, p in self._params_by_name.items()}
            for g in self._groups_for(with_grad):
                lines[self._runner.topology_of(g)].append(
                    f"group mode {g.mode}: " + " + ".join(f"{m.label} {m.shape} {dtypes[m.name]}" for m in g.members))
        policy = getattr(self._runner, "policy", None)  # auto mode: the constants its choices follow from
        if policy and not self._flat:
            for v in lines.values():
                v.append(policy)
        digests = {k: int.from_bytes(hashlib.blake2b("\n".join(v).encode(), digest_size=8).digest(), "big") >> 2
                   for k, v in lines.items()}
        if len(self._plan_cache) > 64:
            self._plan_cache.clear()
        self._plan_cache[key] = (digests, lines)
        return digests, lines

    def _groups_for(self, names) -> List[OrthoGroup]:
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

    def _ortho_updates(self, directions: Dict[str, torch.Tensor], step: Optional[int] = None) -> Dict[str, torch.Tensor]:
        """Name -> the scaled orthogonalized update, for every matrix parameter with a direction."""
        updates = {n: torch.zeros_like(d) for n, d in directions.items()}
        groups = self._groups_for(directions)
        step = self._ortho_step_count() if step is None else step
        scale = self.config.lr_scale

        def read(m: MatrixRef) -> torch.Tensor:
            return matrix_view(directions[m.name], m, self._layouts[m.name])

        def write(m: MatrixRef, value: torch.Tensor) -> None:
            write_matrix(updates[m.name], m, self._layouts[m.name], value * lr_multiplier(scale, *m.shape))

        self._runner.run(groups, MatrixIO(read=read, write=write, transform=lambda x: self.transform(x, step),
                                          source=lambda m: directions[m.name]))
        return updates

    def _ortho_step_count(self) -> int:
        """Steps taken so far by the orthogonalized groups (the same in all of them)."""
        return next((g["step"] for g in self.param_groups if g["route"] == "ortho"), 0)

    def _adamw(self, p: torch.Tensor, group: Dict[str, Any]) -> None:
        if p.grad is None:
            return
        state = self.state[p]
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        adamw_step(p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"], group["lr"] * group["lr_ratio"],
                   group["betas"], group["eps"], group["weight_decay"])

    # -- introspection --------------------------------------------------------------------------
    @property
    def plan(self):
        from ..plan import Plan
        return Plan(self.kind, self.config, self.grouping, self._runner)


class HeavyTailMixin:
    """HTMuon's rule: U Σᵖ Vᵀ every `ht_interval` steps, the plain polar factor in between."""

    def transform(self, stacked: torch.Tensor, step: int) -> torch.Tensor:
        c = self.config
        if step % c.ht_interval != 0:
            return super().transform(stacked, step)
        return heavy_tail(stacked, c.ht_power, c.ht_method, c.orthogonalizer, c.ns_steps,
                          _compute_dtype(c.ns_dtype), backend=c.ns_backend)


def _in_unit(m: MatrixRef) -> MatrixRef:
    """`m` as read from its ZeRO unit tensor, which already is the expert's slice of a 3-D weight."""
    return m if m.expert_index is None else dataclasses.replace(m, expert_index=None)


def _group_size(group) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def _check_same_layout(saved: Dict[str, Any], current: Dict[str, Any]) -> None:
    problem = None
    if saved["sizes"] != current["sizes"]:
        problem = "parallel sizes differ"
    elif saved["names"] != current["names"]:
        problem = "the param groups hold other parameters"
    else:
        for names, a, b in zip(current["names"], saved["shapes"], current["shapes"]):
            if a != b:
                problem = f"the state of {names[0]!r}... has local shape(s) {a} in the checkpoint, {b} here"
                break
    if problem is None:
        return
    raise ValueError(
        f"teonspeed: this optimizer state was saved in another layout ({problem}): saved with "
        f"{saved['sizes']}, loading into {current['sizes']}. A plain state dict holds each rank's shards only "
        f"and is not resharded; resume with the saved TP/EP sizes (and, under ZeRO-1/2, DP size), or save "
        f"and load through megatron.core.dist_checkpointing (teonspeed.megatron), which reshards")


def _compute_dtype(option: str) -> Optional[torch.dtype]:
    """ns_dtype / comm_dtype: None for "auto" (decided from the data), else the named dtype."""
    return {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}[option]


def _apply(p: torch.Tensor, update: torch.Tensor, group: Dict[str, Any]) -> None:
    lr = group["lr"] * group["lr_ratio"]
    p.mul_(1 - lr * group["weight_decay"])
    p.add_(update, alpha=-lr)


def matrix_view(t: torch.Tensor, m: MatrixRef, layout: Optional[FusedLayout]) -> torch.Tensor:
    """The (rows × cols) matrix of `m` inside tensor `t` (a copy for fused parts)."""
    if m.expert_index is not None:
        t = t[m.expert_index]
    if t.ndim > 2:
        t = t.reshape(t.size(0), -1)
    if m.part is not None:
        t = t.index_select(0, _part_rows(layout, m, t.size(0), t.device))
    return t


def write_matrix(target: torch.Tensor, m: MatrixRef, layout: Optional[FusedLayout], value: torch.Tensor) -> None:
    """Store `value` as matrix `m` of `target`, in the fused layout if any."""
    if m.expert_index is not None:
        target = target[m.expert_index]
    if target.ndim > 2:
        target = target.view(target.size(0), -1)
    if m.part is None:
        target.copy_(value)
    else:
        target.index_copy_(0, _part_rows(layout, m, target.size(0), target.device), value.to(target.dtype))


def _part_rows(layout: FusedLayout, m: MatrixRef, num_rows: int, device: torch.device) -> torch.Tensor:
    return dict(layout.part_rows(num_rows, device))[m.part]


def _normalize_params(params) -> List[Dict[str, Any]]:
    """User params -> [{"named": [(name, p)], "unnamed": {ids named param_<i> here}, "overrides": {...},
    ["route": ...]}]."""
    if isinstance(params, torch.nn.Module):
        annotate_model(params)
        params = params.named_parameters()
    params = list(params)
    if not params:
        raise ValueError("teonspeed: the optimizer got an empty parameter list")
    if not isinstance(params[0], dict):
        params = [{"params": params}]
    allowed = set(_ORTHO_GROUP_KEYS) | set(_ADAMW_GROUP_KEYS) | {"params", "names", _ROUTE_KEY, *_DEEPSPEED_MOE_KEYS}
    counter = 0
    out = []
    for group in params:
        unknown = sorted(set(group) - allowed)
        if unknown:
            raise ValueError(f"teonspeed: unknown param-group key(s) {unknown}; a group may set: {sorted(allowed)}")
        if _ROUTE_KEY in group and group[_ROUTE_KEY] not in ("ortho", "adamw"):
            raise ValueError(f"teonspeed: param-group 'route' must be 'ortho' or 'adamw', got {group[_ROUTE_KEY]!r}")
        items = list(group["params"])
        names = list(group.get("names", []))
        named, unnamed = [], set()
        for i, item in enumerate(items):
            if isinstance(item, tuple):
                named.append((item[0], item[1]))
            else:
                if i < len(names):
                    name = names[i]
                else:
                    name, counter = f"param_{counter}", counter + 1
                    unnamed.add(id(item))
                named.append((name, item))
        entry = {"named": [(n, p) for n, p in named if p.requires_grad], "unnamed": unnamed,
                 "overrides": {k: v for k, v in group.items() if k not in ("params", "names", _ROUTE_KEY)}}
        if _ROUTE_KEY in group:
            entry[_ROUTE_KEY] = group[_ROUTE_KEY]
        out.append(entry)
    return out
