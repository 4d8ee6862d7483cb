"""TEON's matricization: K same-shape (m × n) matrices as the 3-order tensor T[:, :, k], unfolded.

mode 1 → [M¹ | M² | … | Mᴷ] of shape (m, K·n): the layers share the row space, and the polar factor
         couples their top *right* singular vectors (the paper's choice for Q/K/V).
mode 2 → [M¹; M²; …; Mᴷ] of shape (K·m, n).
"""

from __future__ import annotations

from typing import List, Sequence

import torch


def unfold(members: Sequence[torch.Tensor], mode: int) -> torch.Tensor:
    """Works batched too: members of shape (..., m, n)."""
    if mode not in (1, 2):
        raise ValueError(f"teon_mode must be 1 or 2, got {mode}")
    return torch.cat(list(members), dim=-1 if mode == 1 else -2)


def fold(stacked: torch.Tensor, mode: int, k: int) -> List[torch.Tensor]:
    """Inverse of `unfold`: split back into the K member matrices."""
    return list(stacked.chunk(k, dim=-1 if mode == 1 else -2))
