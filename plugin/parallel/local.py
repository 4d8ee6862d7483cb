"""Single-process execution of the orthogonalization groups: every group is computed here, and groups
with the same stacked shape are batched into one call of the transform."""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import torch

from ..grouping import MatrixRef, OrthoGroup
from ..ortho.unfold import fold, unfold

ReadFn = Callable[[MatrixRef], torch.Tensor]
WriteFn = Callable[[MatrixRef, torch.Tensor], None]
TransformFn = Callable[[torch.Tensor], torch.Tensor]


def bucket_by_shape(groups: Sequence[OrthoGroup]) -> Dict[Tuple[int, int], List[OrthoGroup]]:
    buckets: Dict[Tuple[int, int], List[OrthoGroup]] = {}
    for g in groups:
        buckets.setdefault(g.stacked_shape, []).append(g)
    return buckets


def transform_groups(groups: Sequence[OrthoGroup], stacked: List[torch.Tensor],
                     transform: TransformFn) -> List[torch.Tensor]:
    """Apply the transform to same-shape stacked matrices in one batched call."""
    if not stacked:
        return []
    return list(transform(torch.stack(stacked)).unbind(0))


class LocalRunner:
    """Runs every group in this process (no collectives)."""

    def all_finite(self, local_finite: bool) -> bool:
        return local_finite

    def run(self, groups: Sequence[OrthoGroup], read: ReadFn, write: WriteFn, transform: TransformFn) -> None:
        for bucket in bucket_by_shape(groups).values():
            stacked = [unfold([read(m) for m in g.members], g.mode) for g in bucket]
            for g, out in zip(bucket, transform_groups(bucket, stacked, transform)):
                for member, piece in zip(g.members, fold(out, g.mode, len(g.members))):
                    write(member, piece)
