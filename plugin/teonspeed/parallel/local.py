"""Where the orthogonalization groups run: the `Runner` protocol, and its single-process version (every
group computed here; groups with the same stacked shape and dtype batched into one call)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Protocol, Sequence, Tuple

import torch

from ..grouping import MatrixRef, OrthoGroup
from ..ortho.unfold import fold, unfold

ReadFn = Callable[[MatrixRef], torch.Tensor]
WriteFn = Callable[[MatrixRef, torch.Tensor], None]
TransformFn = Callable[[torch.Tensor], torch.Tensor]
SourceFn = Callable[[MatrixRef], torch.Tensor]  # the whole tensor a matrix is read from (dtype, device)


@dataclass(frozen=True)
class MatrixIO:
    """How a runner reaches the step's matrices: `read` a member's momentum matrix, `write` its update,
    `transform` a stack, and `source` the tensor a member lives in (its dtype and device, no copy)."""
    read: ReadFn
    write: WriteFn
    transform: TransformFn
    source: SourceFn

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
    stats: Optional[object]

    def check_step(self, check: StepCheck) -> StepVerdict: ...
    def run(self, groups: Sequence[OrthoGroup], io: MatrixIO) -> None: ...
    def topology_of(self, group: OrthoGroup) -> str: ...
    def describe(self, groups: Sequence[OrthoGroup]) -> Dict[int, str]: ...
    def expected_bytes(self, groups: Sequence[OrthoGroup], itemsize: int = 4) -> Tuple[int, int]: ...


def bucket_by_shape(groups: Sequence[OrthoGroup], io: MatrixIO) -> Dict[Tuple, List[OrthoGroup]]:
    """Groups that can be transformed in one batched call: same stacked shape and dtype."""
    buckets: Dict[Tuple, List[OrthoGroup]] = {}
    for g in groups:
        buckets.setdefault((g.stacked_shape, io.group_dtype(g)), []).append(g)
    return buckets


def transform_groups(stacked: List[torch.Tensor], transform: TransformFn) -> List[torch.Tensor]:
    """Apply the transform to same-shape stacked matrices in one batched call."""
    if not stacked:
        return []
    return list(transform(torch.stack(stacked)).unbind(0))


class LocalRunner:
    """Runs every group in this process (no collectives)."""

    stats = None

    def check_step(self, check: StepCheck) -> StepVerdict:
        if check.norm_sq is None:
            return bool(check.finite.item()), None  # the step's one host read
        finite, norm_sq = torch.stack([check.finite.to(check.norm_sq.dtype), check.norm_sq]).tolist()
        return bool(finite), norm_sq

    def topology_of(self, group: OrthoGroup) -> str:
        return "dense"

    def describe(self, groups: Sequence[OrthoGroup]) -> Dict[int, str]:
        return {}

    def expected_bytes(self, groups: Sequence[OrthoGroup], itemsize: int = 4) -> Tuple[int, int]:
        return 0, 0

    def run(self, groups: Sequence[OrthoGroup], io: MatrixIO) -> None:
        for (_, dtype), bucket in bucket_by_shape(groups, io).items():
            stacked = [unfold([io.read(m).to(dtype) for m in g.members], g.mode) for g in bucket]
            for g, out in zip(bucket, transform_groups(stacked, io.transform)):
                for member, piece in zip(g.members, fold(out, g.mode, len(g.members))):
                    io.write(member, piece)
