"""Reading and writing one matrix of a tensor: a parameter, one expert's slice of a 3-D (grouped-GEMM)
weight, or one part (q, k, v; gate, up) of a fused weight, in the fused layout `fused.py` describes. Every
runner reads its momentum matrices and writes their updates through these two functions, whatever holds
the tensor (a parameter, its TP shard, a unit assembled from ZeRO partitions)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .fused import FusedLayout
from .grouping import MatrixRef


def matrix_view(t: torch.Tensor, m: MatrixRef, layout: Optional[FusedLayout]) -> torch.Tensor:
    """The (rows × cols) matrix of `m` inside tensor `t` (a copy for fused parts)."""
    if m.expert_index is not None:
        t = t[m.expert_index]
    if t.ndim > 2:
        t = t.reshape(t.size(0), -1)
    if m.part is not None:
        t = t.index_select(0, _part_rows(layout, m, t.size(0), t.device))
    return t


def write_matrix(
    target: torch.Tensor, m: MatrixRef, layout: Optional[FusedLayout], value: torch.Tensor
) -> None:
    """Store `value` as matrix `m` of `target`, in the fused layout if any."""
    if m.expert_index is not None:
        target = target[m.expert_index]
    if target.ndim > 2:
        target = target.view(target.size(0), -1)
    if m.part is None:
        target.copy_(value)
    else:
        target.index_copy_(0, _part_rows(layout, m, target.size(0), target.device), value.to(target.dtype))


def in_unit(m: MatrixRef) -> MatrixRef:
    """`m` as read from its ZeRO unit tensor, which already is the expert's slice of a 3-D weight."""
    return m if m.expert_index is None else dataclasses.replace(m, expert_index=None)


def _part_rows(layout: FusedLayout, m: MatrixRef, num_rows: int, device: torch.device) -> torch.Tensor:
    return dict(layout.part_rows(num_rows, device))[m.part]
