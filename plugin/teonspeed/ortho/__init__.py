"""Pure orthogonalization math: functions of tensors only, no ranks, no optimizer state.

    orthogonalize(x, method, steps)          ≈ U Vᵀ of x = U Σ Vᵀ
    heavy_tail(x, power, method, steps)      ≈ U Σᵖ Vᵀ (HTMuon)

Both are batched over leading dims and return x's dtype.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .compute_dtype import compute_dtype_for as default_compute_dtype
from .coefficients import JORDAN_NS5, POLAR_EXPRESS_CANONICAL_8, Schedule, schedule_for
from .newton_schulz import newton_schulz
from .spectral import heavy_tail_svd, matrix_root_newton_schulz, polar_svd

ORTHOGONALIZERS = ("ns5", "polar_express", "svd")
NS_BACKENDS = ("auto", "torch", "triton")
HEAVY_TAIL_METHODS = ("svd", "ns")
# Iterations of ns5 / polar_express unless told otherwise (the `ns_steps` option's default): Jordan's
# choice for ns5, and where Polar Express's per-step optimal schedule reaches bf16 accuracy.
NS_STEPS = 5


def _newton_schulz_impl(x: torch.Tensor, backend: str):
    """The Newton–Schulz implementation for `x`: "torch" (this package), "triton" (teonspeed.ortho.kernels;
    an error where it cannot run) or "auto" (triton for CUDA tensors when it imports, else torch).
    "auto" never imports triton for a CPU tensor."""
    if backend not in NS_BACKENDS:
        raise ValueError(f"ns_backend must be one of {NS_BACKENDS}, got {backend!r}")
    if backend == "torch" or (backend == "auto" and not x.is_cuda):
        return newton_schulz
    from .kernels import TRITON_IMPORT_ERROR, newton_schulz_triton, triton_available

    if triton_available(x):
        return newton_schulz_triton
    if backend == "triton":
        why = (
            TRITON_IMPORT_ERROR
            or "the tensor is not on a CUDA device (and TRITON_INTERPRET=1 is not in effect)"
        )
        raise RuntimeError(f"ns_backend='triton' cannot run here: {why}")
    return newton_schulz


def orthogonalize(
    x: torch.Tensor,
    method: str = "ns5",
    steps: int = NS_STEPS,
    compute_dtype: Optional[torch.dtype] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """The (approximate) orthogonal polar factor of every matrix in x, shape (..., m, n).

    method: "ns5" (Jordan's quintic), "polar_express" (per-step optimal quintics), each `steps` times,
    or "svd" (exact U Vᵀ; `steps` unused). Zero matrices map to zero.
    backend: the Newton–Schulz implementation, "auto" | "torch" | "triton" (see _newton_schulz_impl);
    ignored for "svd".
    """
    if method not in ORTHOGONALIZERS:
        raise ValueError(f"orthogonalizer must be one of {ORTHOGONALIZERS}, got {method!r}")
    if x.ndim < 2:
        raise ValueError(f"orthogonalize needs a (..., m, n) tensor, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        return x.clone()
    if method == "svd":
        return polar_svd(x).to(x.dtype)
    schedule = schedule_for(method, steps)
    dtype = compute_dtype or default_compute_dtype(x)
    return _newton_schulz_impl(x, backend)(x, schedule, dtype).to(x.dtype)


def heavy_tail(
    x: torch.Tensor,
    power: float,
    method: str = "svd",
    orthogonalizer: str = "ns5",
    steps: int = NS_STEPS,
    compute_dtype: Optional[torch.dtype] = None,
    root_steps: int = 8,
    backend: str = "auto",
) -> torch.Tensor:
    """HTMuon's heavy-tailed transform U diag(σᵖ) Vᵀ of every matrix in x.

    method="svd" is exact. method="ns" is the authors' cheaper form polar(x) · (xᵀx)^{p/2}, with the
    Gram power taken by repeated Newton–Schulz square roots; it needs p = 2⁻ᵏ. The Gram is formed on the
    short side (x xᵀ on the left for wide x), which gives the same U Σᵖ Vᵀ with a smaller root.
    """
    if method not in HEAVY_TAIL_METHODS:
        raise ValueError(f"ht_method must be one of {HEAVY_TAIL_METHODS}, got {method!r}")
    if not power >= 0:
        raise ValueError(f"ht_power must be >= 0, got {power}")
    if method == "svd":
        return heavy_tail_svd(x, power).to(x.dtype)
    num_roots = num_square_roots(power)
    polar = orthogonalize(x, orthogonalizer, steps, compute_dtype, backend).to(torch.float32)
    work = x.to(torch.float32)
    wide = x.size(-2) <= x.size(-1)
    gram = work @ work.mT if wide else work.mT @ work
    k = gram.size(-1)
    # A small shift keeps the coupled iteration away from exactly singular Grams (zero gradients).
    gram = gram + 1e-6 * torch.eye(k, dtype=gram.dtype, device=gram.device)
    for _ in range(num_roots):
        gram = matrix_root_newton_schulz(gram, root_steps)
    out = gram @ polar if wide else polar @ gram
    return out.to(x.dtype)


def num_square_roots(power: float) -> int:
    """(Gram)^{p/2} with p = 2⁻ᵏ is k + 1 nested square roots."""
    if power <= 0:
        raise ValueError("ht_method='ns' needs ht_power = 2^-k with k >= 0 (e.g. 0.125); use ht_method='svd'")
    k = -math.log2(power)
    if abs(k - round(k)) > 1e-9 or round(k) < 0:
        raise ValueError(
            f"ht_method='ns' needs ht_power = 2^-k (1, 0.5, 0.25, 0.125, ...), got {power}; "
            f"use ht_method='svd' for other powers"
        )
    return int(round(k)) + 1


__all__ = [
    "orthogonalize",
    "heavy_tail",
    "num_square_roots",
    "ORTHOGONALIZERS",
    "HEAVY_TAIL_METHODS",
    "NS_BACKENDS",
    "NS_STEPS",
    "JORDAN_NS5",
    "POLAR_EXPRESS_CANONICAL_8",
    "Schedule",
    "schedule_for",
    "newton_schulz",
    "polar_svd",
    "heavy_tail_svd",
    "matrix_root_newton_schulz",
    "default_compute_dtype",
]
