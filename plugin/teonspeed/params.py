"""The user's parameters -> the optimizer's param groups: names for every parameter, the keys a user group
may override (each checked like the option of the same name), and the split of each user group into its
orthogonalized and its AdamW side."""

from __future__ import annotations

from typing import Any, Dict, List

import torch

from .config import CHECKS, OptimizerConfig
from .fused import annotate_model

# Keys a user's param group may override, and the internal group key each one sets.
ORTHO_GROUP_KEYS = {
    "lr": "lr",
    "weight_decay": "weight_decay",
    "momentum": "momentum",
    "nesterov": "nesterov",
}
ADAMW_GROUP_KEYS = {
    "adamw_lr": "lr",
    "adamw_weight_decay": "weight_decay",
    "adamw_betas": "betas",
    "adamw_eps": "eps",
}
ROUTE_KEY = "route"  # "ortho" | "adamw": force every parameter of a user group to one side
# DeepSpeed MoE's group marks (deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer):
# ZeRO partitions a group with moe=True over the expert-data-parallel group of its `name`; kept as given.
DEEPSPEED_MOE_KEYS = ("moe", "name")


def normalize_params(params) -> List[Dict[str, Any]]:
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
    allowed = (
        set(ORTHO_GROUP_KEYS) | set(ADAMW_GROUP_KEYS) | {"params", "names", ROUTE_KEY, *DEEPSPEED_MOE_KEYS}
    )
    counter = 0
    out = []
    for index, group in enumerate(params):
        unknown = sorted(set(group) - allowed)
        if unknown:
            raise ValueError(
                f"teonspeed: unknown param-group key(s) {unknown}; a group may set: {sorted(allowed)}"
            )
        if ROUTE_KEY in group and group[ROUTE_KEY] not in ("ortho", "adamw"):
            raise ValueError(
                f"teonspeed: param-group 'route' must be 'ortho' or 'adamw', got {group[ROUTE_KEY]!r}"
            )
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
        # a group's override is checked like the option of the same name
        overrides = {
            k: CHECKS[k](f"param_groups[{index}].{k}", v) if k in CHECKS else v
            for k, v in group.items()
            if k not in ("params", "names", ROUTE_KEY)
        }
        entry = {
            "named": [(n, p) for n, p in named if p.requires_grad],
            "unnamed": unnamed,
            "overrides": overrides,
        }
        if ROUTE_KEY in group:
            entry[ROUTE_KEY] = group[ROUTE_KEY]
        out.append(entry)
    return out


def internal_groups(c: OptimizerConfig, user_groups, route: Dict[str, str]) -> List[Dict[str, Any]]:
    """Each user group split into its orthogonalized and its AdamW param group (either may be absent)."""
    out = []
    for group in user_groups:
        overrides = group["overrides"]
        for side in ("ortho", "adamw"):
            members = [(n, p) for n, p in group["named"] if route[n] == side]
            if not members:
                continue
            if side == "ortho":
                g = dict(lr=c.lr, weight_decay=c.weight_decay, momentum=c.momentum, nesterov=c.nesterov)
                keys = ORTHO_GROUP_KEYS
            else:
                g = dict(
                    lr=c.adamw_lr, weight_decay=c.adamw_weight_decay, betas=c.adamw_betas, eps=c.adamw_eps
                )
                keys = ADAMW_GROUP_KEYS
            g.update({keys[k]: v for k, v in overrides.items() if k in keys})
            g.update({k: v for k, v in overrides.items() if k in DEEPSPEED_MOE_KEYS})
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
