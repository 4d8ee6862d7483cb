"""The one step shared by Muon, TEON and HTMuon; they differ only in their defaults and their rule.

    1. check every gradient is finite (else skip the step untouched)
    2. momentum, element-wise, on each parameter (works on shards as well as on full tensors)
    3. for each group of matrices: read the momentum matrices, stack, transform, split, scale
       (where that happens — here or on an owner rank — is the runner's business)
    4. W ← W(1 − lr·wd) − lr·update, and an AdamW step for the non-matrix parameters
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist

from ..config import OptimizerConfig, make_config
from ..fused import LAYOUT_ATTR, FusedLayout, annotate_model
from ..grouping import GroupingResult, MatrixRef, OrthoGroup, build_groups
from ..ortho import heavy_tail, orthogonalize
from ..parallel.context import ParallelContext, check_stage_cuts, megatron_context, megatron_context_of_parameters
from ..parallel.distributed import DistributedRunner
from ..parallel.flat import FlatPartition
from ..parallel.local import LocalRunner
from ..parallel.topology import build_topology
from .scaling import lr_multiplier
from .updates import adamw_step, momentum_direction

# Keys a user's param group may override, and the internal group key each one sets.
_ORTHO_GROUP_KEYS = {"lr": "lr", "weight_decay": "weight_decay", "momentum": "momentum", "nesterov": "nesterov"}
_ADAMW_GROUP_KEYS = {"adamw_lr": "lr", "adamw_weight_decay": "weight_decay", "adamw_betas": "betas",
                     "adamw_eps": "eps"}
_ROUTE_KEY = "route"  # "ortho" | "adamw": force every parameter of a user group to one side
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
        self._runner = self._make_runner()

    # -- hooks for wrappers that replace the parameters (DeepSpeed's fp32 masters, ZeRO partitions) ----
    def rebind(self, pairs: Iterable[Tuple[torch.Tensor, torch.Tensor]]) -> None:
        """(new, old): `new` (e.g. an fp32 master copy) now stands for parameter `old`."""
        for new, old in pairs:
            name = self._names[id(old)]
            self._names[id(new)] = name
            self._params_by_name[name] = new

    def attach_flat_partitions(self, partitions: Dict[int, FlatPartition]) -> None:
        """ZeRO-1/2: each param group now holds one flat partition; `partitions` maps the id of that
        tensor to its layout. A TEON group must then live inside one param group (they are stepped one
        group at a time)."""
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

    def _make_runner(self):
        ctx = self.parallel
        if not ctx.distributed:
            return LocalRunner()
        # Collective over the world: every rank builds its optimizer at the same point.
        topologies = {"dense": build_topology(ctx.tp_group, ctx.dp_group),
                      "expert": build_topology(ctx.expert_tp_group, ctx.expert_dp_group)}
        return DistributedRunner(topologies, ctx.specs, self.config.parallel_mode, self.config.ns_steps or 5,
                                 waves=self.config.overlap_waves)

    @property
    def comm_stats(self):
        """Bytes sent/received and FLOPs of the last step on this rank (None in a single process)."""
        return getattr(self._runner, "stats", None)

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
        if self.config.skip_nonfinite and not self._grads_finite():
            return loss
        if self._flat:
            self._flat_step()
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
        for group in self.param_groups:
            group["step"] += 1
            flat = group["params"][0]
            if flat.grad is None:
                continue
            if group["route"] == "adamw":
                self._adamw(flat, group)
                continue
            partition = self._flat[id(flat)]
            full, received = partition.all_gather(self._momentum(flat, group))
            updates = self._ortho_updates(partition.unflatten(full), step=group["step"] - 1)
            stats = self.comm_stats
            if stats is not None:
                stats.add(received, received)  # all-gather: each partition goes to the dp-1 others
            _apply(flat, partition.local_slice(updates, like=flat), group)

    def _grads_finite(self) -> bool:
        bad = [self._names.get(id(p), "a flat ZeRO partition") for g in self.param_groups for p in g["params"]
               if p.grad is not None and not torch.isfinite(p.grad).all()]
        if not self._runner.all_finite(not bad):
            where = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "") if bad else "another rank's parameters"
            warnings.warn(f"teonspeed: non-finite gradient in {where}; step skipped, weights and optimizer "
                          f"state unchanged", RuntimeWarning, stacklevel=3)
            return False
        return True

    def _ortho_updates(self, directions: Dict[str, torch.Tensor], step: Optional[int] = None) -> Dict[str, torch.Tensor]:
        """Name -> the scaled orthogonalized update, for every matrix parameter with a direction."""
        updates = {n: torch.zeros_like(d) for n, d in directions.items()}
        groups = []
        for g in self.grouping.groups:
            present = [m for m in g.members if m.name in directions]
            if len(present) == len(g.members):
                groups.append(g)
            else:  # a TEON group whose members did not all get gradients: member by member
                groups.extend(OrthoGroup((m,), g.mode) for m in present)
        step = self._ortho_step_count() if step is None else step
        scale = self.config.lr_scale

        def read(m: MatrixRef) -> torch.Tensor:
            return matrix_view(directions[m.name], m, self._layouts[m.name])

        def write(m: MatrixRef, value: torch.Tensor) -> None:
            write_matrix(updates[m.name], m, self._layouts[m.name], value * lr_multiplier(scale, *m.shape))

        self._runner.run(groups, read, write, lambda x: self.transform(x, step))
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


def _compute_dtype(ns_dtype: str) -> Optional[torch.dtype]:
    return {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}[ns_dtype]


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
        t = t.index_select(0, _part_rows(layout, m, t.size(0)).to(t.device))
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
        target.index_copy_(0, _part_rows(layout, m, target.size(0)).to(target.device), value.to(target.dtype))


def _part_rows(layout: FusedLayout, m: MatrixRef, num_rows: int) -> torch.Tensor:
    return dict(layout.part_rows(num_rows))[m.part]


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
    allowed = set(_ORTHO_GROUP_KEYS) | set(_ADAMW_GROUP_KEYS) | {"params", "names", _ROUTE_KEY}
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
