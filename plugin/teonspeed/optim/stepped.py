"""What the step updates on this rank, in each layout: tensors made of ranges, each range stepped with one
param group's settings. The step itself (base.py) is the same for all of them.

- `ParamTensors`: each parameter (or its TP shard) whole, in the param group that holds it;
- `FlatTensors`: DeepSpeed ZeRO-1/2, where each param group holds one flat fp32 partition of its
  parameters (a flat partition is stepped like a parameter, keyed by its id);
- `BucketTensors`: Megatron's distributed optimizer, where each DDP bucket's partition holds parameters
  of several param groups side by side (matrices and AdamW parameters), with an fp32 master for bf16
  parameters, gradients clipped to the global norm the step check agreed on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple

import torch

from ..parallel.flat import BucketShard
from .updates import clip_coefficient

Group = Dict[str, Any]
BUCKET_STATE_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq")  # each over a whole bucket partition


@dataclass
class Stepped:
    """One tensor the step updates. `segments`: (slice of it or None for all of it, its param group);
    `names`: the parameters it holds (what its direction stands for); `group_steps`: AdamW counts steps
    per param group (Megatron's buckets) rather than per tensor; `after`: run once it is updated."""

    key: Hashable
    weights: torch.Tensor
    grad: torch.Tensor
    state: Dict[str, Any]
    segments: List[Tuple[Optional[slice], Group]]
    names: Sequence[str]
    group_steps: bool = False
    after: Optional[Callable[[], None]] = None

    @property
    def whole(self) -> bool:
        return len(self.segments) == 1 and self.segments[0][0] is None


def part(t: torch.Tensor, where: Optional[slice]) -> torch.Tensor:
    return t if where is None else t[where]


class ParamTensors:
    """Each parameter with a gradient, whole (or its TP shard), keyed by its name."""

    per_partition_state = False  # the state is replicated over data parallelism, not partitioned

    def key_of(self, opt, p: torch.Tensor) -> Hashable:
        return opt._names[id(p)]

    def names_of(self, opt, p: torch.Tensor) -> Sequence[str]:
        return [opt._names[id(p)]]

    def stepped(self, opt) -> List[Stepped]:
        return [
            Stepped(self.key_of(opt, p), p, p.grad, opt.state[p], [(None, group)], self.names_of(opt, p))
            for group in opt.param_groups
            for p in group["params"]
            if p.grad is not None
        ]

    def new_step(self, opt) -> bool:
        """Whether this call of step() starts an optimizer step (see StepIO.new_step)."""
        return True

    def grads(self, opt) -> List[torch.Tensor]:
        """The gradients the step check reads."""
        return [self.local_grad(p) for g in opt.param_groups for p in g["params"] if p.grad is not None]

    def norm_sq(self) -> Optional[torch.Tensor]:
        """This rank's share of the squared global gradient norm, where the step clips."""
        return None

    def local_grad(self, p: torch.Tensor) -> torch.Tensor:
        """The gradient of `p` as this rank holds it (the step never reads a DTensor through dispatch)."""
        return p.grad

    def nonfinite(self, opt) -> List[str]:
        """What holds a non-finite gradient (the skip path only: one host read per gradient)."""
        return [
            opt._names.get(id(p), "a flat ZeRO partition")
            for g in opt.param_groups
            for p in g["params"]
            if p.grad is not None and not bool(torch.isfinite(self.local_grad(p)).all())
        ]

    def plan_lines(self, opt, lines: Dict[str, List[str]]) -> None:
        """This rank's plan, as the text every rank sharing the step must agree on: the AdamW parameters,
        then the groups the runner will run (members, shapes, dtypes), then what decides their owners."""
        for group in opt.param_groups:
            for p in group["params"]:
                if group["route"] != "ortho":
                    lines["dense"].append(
                        f"{group['route']} {opt._names.get(id(p), '?')} {tuple(p.shape)} "
                        f"{p.dtype} grad={p.grad is not None}"
                    )
        with_grad = {n for n, p in opt._params_by_name.items() if p.grad is not None}
        dtypes = {n: p.dtype for n, p in opt._params_by_name.items()}
        for g in opt.groups_for(with_grad):
            members = " + ".join(f"{m.label} {m.shape} {dtypes[m.name]}" for m in g.members)
            lines[opt._runner.topology_of(g)].append(f"group mode {g.mode}: {members}")
        if opt._runner.policy:  # auto mode: the constants its choices follow from
            for v in lines.values():
                v.append(opt._runner.policy)


class FlatTensors(ParamTensors):
    """ZeRO-1/2 (and ZeRO-3's sub-groups): each param group holds one flat partition (keys: id of the
    partition tensor), described by a `FlatPartition` or a `sharded.PieceLayout`."""

    per_partition_state = True

    def __init__(self, partitions: Mapping[int, Any]) -> None:
        self.partitions = dict(partitions)

    def key_of(self, opt, p: torch.Tensor) -> Hashable:
        return id(p)

    def names_of(self, opt, p: torch.Tensor) -> Sequence[str]:
        return self.partitions[id(p)].names()

    def new_step(self, opt) -> bool:
        """DeepSpeed steps the param groups in order, one per call: a step starts with the first partition."""
        first = next(iter(self.partitions), None)
        return any(id(p) == first for g in opt.param_groups for p in g["params"])

    def plan_lines(self, opt, lines: Dict[str, List[str]]) -> None:
        """What each partition stands for, not its (padded) size."""
        for group in opt.param_groups:
            for p in group["params"]:
                if id(p) in self.partitions:
                    layout = self.partitions[id(p)]
                    shapes = getattr(layout, "shapes", None) or {e.name: e.shape for e in layout.entries}
                    names = layout.names()
                    members = " ".join(f"{n}{tuple(shapes[n])}" for n in names)
                    topology = opt.parallel.spec(names[0]).topology if names else "dense"
                    lines[topology].append(
                        f"{group['route']} flat [{members}] {p.dtype} grad={p.grad is not None}"
                    )
                else:
                    lines["dense"].append(
                        f"{group['route']} {opt._names.get(id(p), '?')} {tuple(p.shape)} "
                        f"{p.dtype} grad={p.grad is not None}"
                    )


class BucketTensors(ParamTensors):
    """Megatron's distributed optimizer: this rank's partition of every DDP bucket (keys: bucket index)."""

    def __init__(
        self, buckets: Sequence[BucketShard], clip_grad: float, group_of: Mapping[str, Group]
    ) -> None:
        self.buckets = list(buckets)
        self.clip_grad = clip_grad  # clip the global gradient norm to this (0: off)
        self.group_of = dict(group_of)

    def stepped(self, opt) -> List[Stepped]:
        clip = clip_coefficient(self.clip_grad, opt.grad_norm) if opt.grad_norm is not None else 1.0
        out = []
        for i, shard in enumerate(self.buckets):
            grad = shard.grad.float()  # fp32 grads (grad_reduce_in_fp32) are the buffer itself, not a copy
            if clip < 1.0:
                grad.mul_(clip)  # like Megatron, the fp32 main gradient is clipped in place
            segments = [(slice(lo, hi), self.group_of[e.name]) for e, lo, hi in shard.slices()]
            after = (lambda s=shard: s.param.copy_(s.master)) if shard.master is not None else None
            out.append(
                Stepped(
                    i,
                    shard.weights,
                    grad,
                    bucket_state(opt.state, shard),
                    segments,
                    shard.partition.names(),
                    group_steps=True,
                    after=after,
                )
            )
        return out

    def grads(self, opt) -> List[torch.Tensor]:
        return [b.grad for b in self.buckets]  # only this rank's partitions hold reduced gradients

    def norm_sq(self) -> Optional[torch.Tensor]:
        if self.clip_grad <= 0:
            return None  # the gradient norm rides in the step check: no collective or host read of its own
        return torch.stack([b.grad_norm_sq() for b in self.buckets]).sum()

    def nonfinite(self, opt) -> List[str]:
        return [
            f"distributed-optimizer bucket {i}"
            for i, b in enumerate(self.buckets)
            if not bool(torch.isfinite(b.grad).all())
        ]


def bucket_state(state: Mapping, shard: BucketShard) -> Dict[str, torch.Tensor]:
    """The state of one distributed-optimizer bucket partition, created (zeros) as the first step does."""
    s = state[shard.param]
    if "momentum_buffer" not in s:
        s.update({k: torch.zeros_like(shard.weights) for k in BUCKET_STATE_KEYS})
    return s


def digest(lines: Sequence[str]) -> int:
    """A plan's lines as a non-negative int64 (the step check's MIN all-reduce carries it)."""
    return int.from_bytes(hashlib.blake2b("\n".join(lines).encode(), digest_size=8).digest(), "big") >> 2
