"""Tiling and FLOP bookkeeping of the Triton Newton–Schulz kernels. Pure Python: no triton import, so
benchmarks and tests can use it on machines without triton."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2_clamp(v: int, lo: int, hi: int) -> int:
    """The next power of two >= v, clamped to [lo, hi]."""
    p = 1
    while p < max(int(v), 1):
        p *= 2
    return max(lo, min(hi, p))


@dataclass(frozen=True)
class Blocks:
    """Tile sizes and launch options. sym_m: the square tile of the symmetric kernel; upd_*: the update
    GEMM."""

    sym_m: int = 128
    sym_k: int = 64
    upd_m: int = 128
    upd_n: int = 128
    upd_k: int = 64
    num_warps: int = 8
    num_stages: int = 3


def default_blocks(m: int, n: int) -> Blocks:
    """Tiles for a wide (m <= n) problem. tl.dot needs every block dim >= 16; small matrices get
    smaller tiles so that masked-off lanes do not dominate. Interpreted runs use the same rule (the
    interpreter is fastest with big tiles, which this picks for the small test shapes anyway)."""
    return Blocks(
        sym_m=pow2_clamp(m, 16, 128),
        sym_k=pow2_clamp(n, 16, 64),
        upd_m=pow2_clamp(m, 16, 128),
        upd_n=pow2_clamp(n, 16, 128),
        upd_k=pow2_clamp(m, 16, 64),
    )


def lower_tile_pairs(num_tiles: int) -> List[Tuple[int, int]]:
    """The (i, j) tile pairs the symmetric kernel computes, i >= j, in program-id order:
    num_tiles·(num_tiles+1)/2 programs per matrix instead of num_tiles²."""
    return [(i, j) for i in range(num_tiles) for j in range(i + 1)]


def sym_grid(m: int, batch: int, block_m: int) -> Tuple[int, int]:
    """Launch grid of the symmetric kernel: (lower-triangle tile pairs, batch)."""
    t = cdiv(m, block_m)
    return (t * (t + 1) // 2, batch)


def flops_per_step(m: int, n: int, symmetric: bool) -> int:
    """Multiply-add FLOPs (2 per MAC) of one quintic step on a wide (m <= n) matrix.

    symmetric=True counts what the Triton path executes: X Xᵀ as m²n and A A as m³ (half of the
    2m²n and 2m³ of a full product: only one triangle of tiles is computed; the diagonal tiles'
    redundant half is ignored), plus 2m²n for B X. symmetric=False counts the full products, which is
    what the torch path executes: 4m²n + 2m³. Elementwise epilogues are not counted.
    """
    m, n = min(m, n), max(m, n)
    if symmetric:
        return m * m * n + m**3 + 2 * m * m * n
    return 2 * m * m * n + 2 * m**3 + 2 * m * m * n
