"""The one contract every executor of the step implements, and the one stack → transform → fold loop they
share.

A step hands its runner the groups to orthogonalize and a `StepIO`: this rank's momentum direction of every
tensor it steps (a parameter or its TP shard, a ZeRO flat partition, a Megatron bucket partition), where
each update goes, the rule's transform, and the fused-matrix I/O that finds a matrix inside a tensor. Where
each matrix's pieces live (`pieces.Pieces`) decides which runner gathers what; the runner's only job is to
bring every group's whole members together on some rank, transform them there (`transform_stacks`), and
write each holder's piece of the update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Hashable, List, Mapping, Optional, Protocol, Sequence, Tuple

import torch

from ..grouping import MatrixRef, OrthoGroup
from ..ortho.unfold import fold, unfold

TransformFn = Callable[[torch.Tensor], torch.Tensor]
ViewFn = Callable[[MatrixRef, torch.Tensor], torch.Tensor]  # (matrix, tensor holding it) -> the matrix
StoreFn = Callable[[MatrixRef, torch.Tensor, torch.Tensor], None]  # (matrix, tensor holding it, value)
Key = Hashable  # a stepped tensor: a parameter's name, or the key of a flat partition


@dataclass(frozen=True)
class StepIO:
    """What a runner reads and writes in one step.

    `directions[key]`: this rank's momentum direction of every tensor the step updates; `updates[key]`
    (zeros, the same shapes) receives the scaled orthogonalized update. A parameter stepped whole (or as
    its TP shard) is keyed by its name; a flat partition by the key its runner was planned with.
    `view`/`store` find matrix m inside a tensor holding its parameter (fused parts, expert slices);
    `scale(m)` is the update's size rule for m (lr_scale). `new_step`: this call starts an optimizer step
    (False where a step arrives in several calls, as DeepSpeed's ZeRO steps one param group per call:
    the counters then add up over the calls)."""

    directions: Mapping[Key, torch.Tensor]
    updates: Mapping[Key, torch.Tensor]
    transform: TransformFn
    view: ViewFn
    store: StoreFn
    scale: Callable[[MatrixRef], float]
    new_step: bool = True

    def read(self, m: MatrixRef) -> torch.Tensor:
        """m's momentum matrix as this rank holds it (whole, or its TP shard): parameters stepped whole."""
        return self.view(m, self.directions[m.name])

    def write(self, m: MatrixRef, value: torch.Tensor) -> None:
        """This rank's piece of m's update (whole, or its TP shard), scaled by the size rule."""
        self.store(m, self.updates[m.name], value * self.scale(m))

    def source(self, m: MatrixRef) -> torch.Tensor:
        """The tensor m is read from (its dtype and device, no copy)."""
        return self.directions[m.name]

    def group_dtype(self, g: OrthoGroup) -> torch.dtype:
        """The dtype a group is stacked and transformed in: its members' promoted dtype (a bf16 matrix
        next to fp32 ones is computed in fp32, the same on every rank), written back in each one's own."""
        dtype = self.source(g.members[0]).dtype
        for m in g.members[1:]:
            dtype = torch.promote_types(dtype, self.source(m).dtype)
        return dtype


@dataclass(frozen=True)
class StepCheck:
    """What every rank sharing a step must agree on, gathered before anything changes: whether all its
    gradients are finite (a 0-dim bool on the gradients' device, never read here), and a digest of the
    plan it will run per topology; `plan_lines` (called only when digests differ) says what it is."""

    finite: torch.Tensor
    digests: Dict[str, int]
    plan_lines: Callable[[], Dict[str, List[str]]]
    norm_sq: Optional[torch.Tensor] = None
    """This rank's share of the squared global gradient norm (0-dim, on the gradients' device) when the
    step clips: the runner sums every sharing rank's share in the same collective and host read."""


StepVerdict = Tuple[bool, Optional[float]]  # (every gradient finite, the summed norm_sq or None)


class Runner(Protocol):
    """Where the step's groups are orthogonalized. `check_step` is the step's one collective and host read;
    `run` fills io.updates; the rest describe the plan (who computes what, bytes per step)."""

    stats: Optional[object]
    policy: Optional[str]

    def check_step(self, check: StepCheck) -> StepVerdict: ...
    def run(self, groups: Sequence[OrthoGroup], io: StepIO) -> None: ...
    def topology_of(self, group: OrthoGroup) -> str: ...
    def describe(self, groups: Sequence[OrthoGroup]) -> Dict[int, str]: ...
    def expected_bytes(
        self, groups: Sequence[OrthoGroup], itemsize: Optional[int] = None
    ) -> Tuple[int, int]: ...
    def adamw_bytes(self, groups: Sequence[OrthoGroup], itemsize: int = 4) -> int: ...


Whole = Callable[[OrthoGroup, int, MatrixRef], torch.Tensor]  # (group, member index, member) -> whole matrix
Put = Callable[[OrthoGroup, int, MatrixRef, torch.Tensor], None]  # ... and the member's piece of the result


def transform_stacks(
    groups: Sequence[OrthoGroup],
    whole: Whole,
    dtype_of: Callable[[OrthoGroup], torch.dtype],
    transform: TransformFn,
    put: Put,
) -> None:
    """Stack → transform → fold, the one loop of every runner: each group's whole members (`whole`, cast
    to the group's dtype) unfolded into one matrix, groups of the same stacked shape and dtype transformed
    in one batched call, and each member's piece of the result handed to `put`, in group order."""
    buckets: Dict[Tuple, List[OrthoGroup]] = {}
    for g in groups:
        buckets.setdefault((g.stacked_shape, dtype_of(g)), []).append(g)
    for (_, dtype), bucket in buckets.items():
        stacked = [
            unfold([whole(g, i, m).to(dtype) for i, m in enumerate(g.members)], g.mode) for g in bucket
        ]
        for g, out in zip(bucket, list(transform(torch.stack(stacked)).unbind(0))):
            for i, (m, piece) in enumerate(zip(g.members, fold(out, g.mode, len(g.members)))):
                put(g, i, m, piece)
