"""QK-clip's rescale (MuonClip, Kimi K2), as pure tensor functions: no modules, no communication.

After a step, a head whose largest pre-softmax logit S over the step's batch exceeds the threshold τ gets
η = τ / S (1 otherwise); its query rows are multiplied by η^α and its key rows by η^(1−α), so each of its
logits q·k scales by η and the largest becomes τ.

- GQA: a key head serves a group of query heads, so the group takes the largest S of its heads and every
  query head of the group and its key head get that η (megatron-core 0.16.1 `Attention.clip_qk`).
- MLA (`MultiLatentAttention.clip_qk`): per head, the query's no-RoPE rows get η^α and its RoPE rows η, the
  key's no-RoPE rows η^(1−α); the RoPE key is shared by all heads and is left alone (q_pe·k_pe scales by η).

A weight's rows are described as repeating units (a query group, an MLA head) of `RowPart`s; the same
description covers the full matrix and a tensor-parallel shard, because Megatron gives each TP rank whole
query groups (whole heads for MLA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

Q, K, FULL, NONE = "q", "k", "full", "none"  # the factor of a part: η^α, η^(1−α), η, 1


@dataclass(frozen=True)
class RowPart:
    rows: int
    """rows of this part in one unit"""
    factor: str
    """Q (η^α), K (η^(1−α)), FULL (η: MLA's RoPE query rows) or NONE (value rows)"""


def group_eta(head_max: torch.Tensor, heads_per_group: int, threshold: float) -> torch.Tensor:
    """η per query group (per head when heads_per_group is 1): τ / S of the group's largest logit S where
    S > τ, else 1 (Megatron: clamp(τ / S, max=1), the same wherever S > 0; a head that saw no logit, -inf,
    or a non-finite S keeps 1). fp32, on head_max's device; no host read."""
    grouped = head_max.float().view(-1, heads_per_group).amax(dim=1)
    return torch.where(grouped > threshold, threshold / grouped, torch.ones_like(grouped))


def row_scale(eta: torch.Tensor, parts: Sequence[RowPart], alpha: float) -> torch.Tensor:
    """The factor of every row of a weight made of len(eta) units of `parts` (fp32, eta's device). The powers
    are Megatron's (torch.pow of the fp32 η), so the rescaled rows equal its clip_qk bit for bit."""
    columns = []
    for part in parts:
        if part.factor == Q:
            f = torch.pow(eta, alpha)
        elif part.factor == K:
            f = torch.pow(eta, 1 - alpha)
        elif part.factor == FULL:
            f = eta
        elif part.factor == NONE:
            f = torch.ones_like(eta)
        else:
            raise ValueError(f"teonspeed: unknown QK-clip row factor {part.factor!r}")
        columns.append(f.unsqueeze(1).expand(eta.numel(), part.rows))
    return torch.cat(columns, dim=1).reshape(-1)


def scale_rows(weight: torch.Tensor, scale: torch.Tensor) -> None:
    """weight[r, ...] *= scale[r], in place (a matrix, or a bias with one value per row)."""
    if weight.size(0) != scale.numel():
        raise ValueError(
            f"teonspeed: QK-clip: a weight with {weight.size(0)} rows got {scale.numel()} row factors"
        )
    weight.mul_(scale.view(-1, *([1] * (weight.dim() - 1))))


def scale_flat_rows(flat: torch.Tensor, first: int, row_len: int, scale: torch.Tensor) -> None:
    """`flat` holds elements [first, first + flat.numel()) of a row-major weight with rows of `row_len`
    elements (a ZeRO partition or a Megatron bucket cuts weights anywhere): scale each element by its row's
    factor, in place, without building a per-element factor (a partial first row, whole rows, a partial
    last row)."""
    pos, end = first, first + flat.numel()
    if pos % row_len and pos < end:  # the partial first row
        stop = min(end, (pos // row_len + 1) * row_len)
        flat[: stop - first].mul_(scale[pos // row_len])
        pos = stop
    whole = (end - pos) // row_len
    if whole:
        row = pos // row_len
        flat[pos - first : pos - first + whole * row_len].view(whole, row_len).mul_(
            scale[row : row + whole].unsqueeze(1)
        )
        pos += whole * row_len
    if pos < end:  # the partial last row
        flat[pos - first :].mul_(scale[pos // row_len])
