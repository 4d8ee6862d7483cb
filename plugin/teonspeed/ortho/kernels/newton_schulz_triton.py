"""Batched Newton–Schulz in Triton: a symmetric (lower-triangle-only) Gram kernel and a fused update.

One quintic step X ← a X + (b A + c A²) X with A = X Xᵀ becomes two kernel kinds, three launches,
each launch covering every matrix of the batch (grid axis 1 is the batch index):

    _sym_kernel  out = α · P Pᵀ + β · C      (C optional, symmetric, same shape as out)
        step 1:  A = X Xᵀ                    (P = X, α = 1, no C)
        step 2:  B = c · A A + b · A          (P = A: A is symmetric, so A Aᵀ = A A; α = c, C = A, β = b)
        Only the tiles (i, j) with i >= j are computed; each stores its tile at (i, j) and the
        transpose at (j, i). The diagonal tiles are symmetrised, so A and B are exactly symmetric.
    _update_kernel  X' = a · X + B X          (a GEMM whose epilogue adds a · X)

Accumulation is fp32; A, B and X are stored in the compute dtype, as in the torch path
(teonspeed.ortho.newton_schulz), which `newton_schulz_triton` matches in contract: same
normalisation (‖X‖_F · schedule.input_margin + 1e-7, in fp32), same wide orientation (tall inputs are
transposed), same per-step (a, b, c) triples, result in compute_dtype.

Under TRITON_INTERPRET=1 (CPU tests) the bf16 operands are upcast to fp32 before tl.dot: the
interpreter's bf16 dot is wrong (shared/research/feasibility.md). bf16 products are exact in fp32, so
this computes what the GPU's bf16 MMA with fp32 accumulation does (up to summation order).

The kernels are decorated with triton.jit on first use, not at import. Interpreted runs still need
TRITON_INTERPRET=1 before triton is first imported (see `interpreter_ready`); compiled runs need a GPU.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..coefficients import Schedule
from ..newton_schulz import NORM_EPS, newton_schulz
from .kernel_bodies import _sym_kernel, _update_kernel  # plain functions, jitted lazily in _kernels()
from .tiling import Blocks, default_blocks, lower_tile_pairs, pow2_clamp as _pow2_clamp, sym_grid

SUPPORTED_COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def interpreter_ready() -> bool:
    """Whether triton itself was imported with TRITON_INTERPRET=1. Its standard library (tl.zeros,
    tl.cdiv, ...) is wrapped for the interpreter at *triton's* import, so setting the variable later
    is not enough: the interpreted kernel then fails with "Cannot call @triton.jit'd outside of the
    scope of a kernel"."""
    return type(tl.zeros).__name__ == "InterpretedFunction"


_JITTED: Dict[bool, Tuple[object, object]] = {}


def _kernels():
    """(sym, update) wrapped by triton.jit for the current TRITON_INTERPRET mode."""
    mode = interpreting()
    if mode and not interpreter_ready():
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after triton was imported (torch._dynamo, for one, "
            "imports it): set it before the first import of torch/triton, e.g. in the "
            "environment of a fresh process"
        )
    if mode not in _JITTED:
        _JITTED[mode] = (triton.jit(_sym_kernel), triton.jit(_update_kernel))
    return _JITTED[mode]


# --------------------------------------------------------------------------------------- launch helpers

_PAIRS_CACHE: Dict[Tuple[int, str], torch.Tensor] = {}


def _pairs_tensor(num_tiles: int, device: torch.device) -> torch.Tensor:
    key = (num_tiles, str(device))
    t = _PAIRS_CACHE.get(key)
    if t is None:
        t = torch.tensor(lower_tile_pairs(num_tiles), dtype=torch.int32).reshape(-1).to(device)
        _PAIRS_CACHE[key] = t
    return t


def _upcast(dtype: torch.dtype) -> bool:
    return interpreting() and dtype != torch.float32


def _rne_bf16(dtype: torch.dtype) -> bool:
    # Triton 3.9's interpreter casts fp32 -> bf16 by truncation (cast_impl ignores the rounding mode);
    # compiled kernels round to nearest even. Rounding by hand keeps the interpreted run faithful.
    return interpreting() and dtype == torch.bfloat16


def _check_3d(t: torch.Tensor, name: str) -> None:
    if t.ndim != 3:
        raise ValueError(f"{name} must be (batch, rows, cols), got shape {tuple(t.shape)}")


def sym_matmul(
    p: torch.Tensor,
    *,
    alpha: float = 1.0,
    c: Optional[torch.Tensor] = None,
    beta: float = 0.0,
    out: Optional[torch.Tensor] = None,
    block_m: Optional[int] = None,
    block_k: Optional[int] = None,
    mirror: bool = True,
    num_warps: int = 8,
    num_stages: int = 3,
) -> torch.Tensor:
    """out = α · P Pᵀ + β · C for a batch P of shape (B, m, k); C (B, m, m) must be symmetric.

    Computes the lower-triangle tiles only and mirrors them (mirror=False leaves the strictly-upper
    tiles of `out` untouched, which is how the tests see that they were never computed).
    """
    _check_3d(p, "p")
    batch, m, k = p.shape
    if out is None:
        out = torch.empty((batch, m, m), dtype=p.dtype, device=p.device)
    if c is not None:
        _check_3d(c, "c")
        if c.shape != out.shape:
            raise ValueError(f"c must have shape {tuple(out.shape)}, got {tuple(c.shape)}")
    if batch == 0 or m == 0:
        return out
    bm = block_m or _pow2_clamp(m, 16, 128)
    bk = block_k or _pow2_clamp(k, 16, 64)
    grid = sym_grid(m, batch, bm)
    pairs = _pairs_tensor(triton.cdiv(m, bm), p.device)
    sym, _ = _kernels()
    cc = c if c is not None else out  # never read when HAS_C is False
    sym[grid](
        p,
        cc,
        out,
        pairs,
        m,
        k,
        p.stride(0),
        p.stride(1),
        p.stride(2),
        cc.stride(0),
        cc.stride(1),
        cc.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        float(alpha),
        float(beta),
        HAS_C=c is not None,
        MIRROR=mirror,
        UPCAST=_upcast(p.dtype),
        IEEE=p.dtype == torch.float32,
        RNE_BF16=_rne_bf16(out.dtype),
        BLOCK_M=bm,
        BLOCK_K=bk,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


def ns_update(
    b: torch.Tensor,
    x: torch.Tensor,
    a: float,
    *,
    out: Optional[torch.Tensor] = None,
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
    block_k: Optional[int] = None,
    num_warps: int = 8,
    num_stages: int = 3,
) -> torch.Tensor:
    """out = a · X + B X for batches B (Bt, m, m) and X (Bt, m, n). `out` must not alias X."""
    _check_3d(b, "b")
    _check_3d(x, "x")
    batch, m, n = x.shape
    if b.shape != (batch, m, m):
        raise ValueError(f"b must have shape {(batch, m, m)}, got {tuple(b.shape)}")
    if out is None:
        out = torch.empty_like(x)
    if out.data_ptr() == x.data_ptr() and x.numel() > 0:
        raise ValueError("ns_update cannot write in place: out aliases x")
    if batch == 0 or m == 0 or n == 0:
        return out
    bm = block_m or _pow2_clamp(m, 16, 128)
    bn = block_n or _pow2_clamp(n, 16, 128)
    bk = block_k or _pow2_clamp(m, 16, 64)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn), batch)
    _, upd = _kernels()
    upd[grid](
        b,
        x,
        out,
        m,
        n,
        b.stride(0),
        b.stride(1),
        b.stride(2),
        x.stride(0),
        x.stride(1),
        x.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        float(a),
        UPCAST=_upcast(x.dtype),
        IEEE=x.dtype == torch.float32,
        RNE_BF16=_rne_bf16(out.dtype),
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


# --------------------------------------------------------------------------------------- public entry


def newton_schulz_triton(
    x: torch.Tensor, schedule: Schedule, compute_dtype: torch.dtype, blocks: Optional[Blocks] = None
) -> torch.Tensor:
    """Same contract as teonspeed.ortho.newton_schulz.newton_schulz: x of shape (..., m, n), the
    schedule's quintics, result in compute_dtype with x's shape. float64 is delegated to the torch
    path (tensor-core kernels bring nothing there)."""
    if x.ndim < 2:
        raise ValueError(f"orthogonalize needs a (..., m, n) tensor, got shape {tuple(x.shape)}")
    if compute_dtype == torch.float64 or x.dtype == torch.float64:
        return newton_schulz(x, schedule, compute_dtype)
    if compute_dtype not in SUPPORTED_COMPUTE_DTYPES:
        raise ValueError(
            f"newton_schulz_triton: compute_dtype must be one of {SUPPORTED_COMPUTE_DTYPES}, "
            f"got {compute_dtype}"
        )
    lead = x.shape[:-2]
    tall = x.size(-2) > x.size(-1)
    X = x.to(torch.float32)
    if tall:
        X = X.mT
    m, n = X.shape[-2], X.shape[-1]
    X = X.reshape(-1, m, n)
    norm = torch.linalg.matrix_norm(X, ord="fro", keepdim=True)
    X = (X / (norm * schedule.input_margin + NORM_EPS)).to(compute_dtype).contiguous()
    if X.numel() > 0:
        bl = blocks or default_blocks(m, n)
        batch = X.shape[0]
        A = torch.empty((batch, m, m), dtype=compute_dtype, device=X.device)
        B = torch.empty_like(A)
        Y = torch.empty_like(X)
        launch = dict(num_warps=bl.num_warps, num_stages=bl.num_stages)
        for a, b, c in schedule.steps:
            sym_matmul(X, out=A, block_m=bl.sym_m, block_k=bl.sym_k, **launch)
            sym_matmul(
                A,
                alpha=c,
                c=A,
                beta=b,
                out=B,
                block_m=bl.sym_m,
                block_k=_pow2_clamp(m, 16, bl.sym_k),
                **launch,
            )
            ns_update(B, X, a, out=Y, block_m=bl.upd_m, block_n=bl.upd_n, block_k=bl.upd_k, **launch)
            X, Y = Y, X
    X = X.reshape(*lead, m, n)
    if tall:
        X = X.mT
    return X
