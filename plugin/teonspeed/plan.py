"""What the optimizer will do, printable before training: routing, groups, fallbacks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .config import OptimizerConfig, make_config
from .grouping import GroupingResult
from .parallel.context import ParallelContext, build_grouping


@dataclass
class Plan:
    optimizer: str
    config: OptimizerConfig
    grouping: GroupingResult
    runner: Optional[Any] = None  # the optimizer's runner: owners and bytes per rank in a parallel run

    @property
    def groups(self):
        return self.grouping.groups

    @property
    def teon_groups(self):
        return [g for g in self.grouping.groups if g.is_teon]

    def route_of(self, name: str) -> str:
        return next(r.route for r in self.grouping.routing if r.name == name)

    def __str__(self) -> str:
        c = self.config
        steps = "" if c.orthogonalizer == "svd" else f" x{c.ns_steps}"
        head = (
            f"teonspeed plan: {self.optimizer} (orthogonalizer={c.orthogonalizer}{steps}, "
            f"lr_scale={c.lr_scale}, "
            f"teon_k={c.teon_k}, teon_mode={c.teon_mode}"
        )
        if self.optimizer == "htmuon":
            head += f", ht_power={c.ht_power}, ht_method={c.ht_method}, ht_interval={c.ht_interval}"
        lines = [head + ")"]
        adamw = [r for r in self.grouping.routing if r.route == "adamw"]
        lines.append(f"  AdamW ({len(adamw)} parameters):")
        lines += [f"    {r.name:<60} {str(r.shape):<16} {r.reason}" for r in adamw]
        ortho = [r for r in self.grouping.routing if r.route == "ortho"]
        lines.append(f"  Orthogonalized ({len(ortho)} parameters):")
        lines += [f"    {r.name:<60} {str(r.shape):<16} {r.reason}" for r in ortho]
        teon = self.teon_groups
        lines.append(
            f"  Groups: {len(self.groups)} ({len(teon)} TEON stacks, {len(self.groups) - len(teon)} single)"
        )
        owners = self.runner.describe(self.groups) if self.runner is not None else {}
        for g in self.groups:
            tag = f"TEON x{len(g.members)}" if g.is_teon else "Muon"
            where = f" [owner: {owners[id(g)]}]" if id(g) in owners else ""
            lines.append(
                f"    {tag:<8} {g.members[0].layer.layer_type:<9} {str(g.stacked_shape):<14} "
                + " + ".join(m.label for m in g.members)
                + where
            )
        if getattr(self.runner, "stats", None) is not None:  # a parallel run
            sent, received = self.runner.expected_bytes(self.groups)
            replicated = sum(where.startswith("every rank") for where in owners.values())
            chosen = (
                f": {len(owners) - replicated} groups at owners, {replicated} on every rank"
                if self.config.parallel_mode == "auto"
                else ""
            )
            lines.append(
                f"  This rank per step: sends {sent:,} bytes, receives {received:,} bytes "
                f"(parallel_mode={self.config.parallel_mode}{chosen}, comm_dtype={self.config.comm_dtype})"
            )
            if hasattr(self.runner, "adamw_bytes"):
                lines.append(
                    f"  AdamW in the same layout: {self.runner.adamw_bytes(self.groups):,} bytes each way "
                    f"(data-parallel all-reduce of these matrices' fp32 gradients, paid by every optimizer)"
                )
        if self.grouping.notes:
            lines.append("  Notes:")
            lines += [f"    {n}" for n in self.grouping.notes]
        return "\n".join(lines)


def plan(
    params: Any, optimizer: str = "teon", *, parallel: Optional[ParallelContext] = None, **options: Any
) -> Plan:
    """The routing and groups that `optimizer` ("muon" | "teon" | "htmuon") would use for `params`
    (a model, named parameters or param groups, in any layout the optimizer takes: the same grouping
    builder, the same parallel layout found), without building any state or running any collective.
    print() it to see it."""
    config = make_config(optimizer, options)
    return Plan(optimizer.lower(), config, build_grouping(params, config, parallel).grouping)
