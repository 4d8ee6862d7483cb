"""The single-process runner: every group computed here, no collective."""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch

from ..grouping import OrthoGroup
from .runner import StepCheck, StepIO, StepVerdict, transform_stacks


class LocalRunner:
    """Runs every group in this process (no collectives); its one host read is the step check's."""

    stats = None
    policy = None

    def check_step(self, check: StepCheck) -> StepVerdict:
        if check.norm_sq is None:
            return bool(check.finite.item()), None  # the step's one host read
        finite, norm_sq = torch.stack([check.finite.to(check.norm_sq.dtype), check.norm_sq]).tolist()
        return bool(finite), norm_sq

    def topology_of(self, group: OrthoGroup) -> str:
        return "dense"

    def describe(self, groups: Sequence[OrthoGroup]) -> Dict[int, str]:
        return {}

    def expected_bytes(self, groups: Sequence[OrthoGroup], itemsize: Optional[int] = None) -> Tuple[int, int]:
        return 0, 0

    def adamw_bytes(self, groups: Sequence[OrthoGroup], itemsize: int = 4) -> int:
        return 0

    def run(self, groups: Sequence[OrthoGroup], io: StepIO) -> None:
        transform_stacks(
            groups,
            lambda g, i, m: io.read(m),
            io.group_dtype,
            io.transform,
            lambda g, i, m, piece: io.write(m, piece),
        )
