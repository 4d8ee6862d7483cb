"""Odd-polynomial Newton–Schulz iteration towards the polar factor, batched over leading dims."""
from __future__ import annotations

import torch

from .coefficients import Schedule

NORM_EPS = 1e-7


def newton_schulz(x: torch.Tensor, schedule: Schedule, compute_dtype: torch.dtype) -> torch.Tensor:
    """Apply the schedule's quintics to `x` of shape (..., m, n); returns compute_dtype.

    The iteration runs on the wide orientation (m <= n) so the Gram matrix X Xᵀ is the small one.
    A zero matrix stays zero: its normalised input is 0 and every odd polynomial maps 0 to 0.
    """
    if x.ndim < 2:
        raise ValueError(f"orthogonalize needs a (..., m, n) tensor, got shape {tuple(x.shape)}")
    tall = x.size(-2) > x.size(-1)
    # Normalise in fp32 or wider so a large gradient cannot overflow before the cast.
    norm_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    X = x.to(norm_dtype)
    if tall:
        X = X.mT
    norm = torch.linalg.matrix_norm(X, ord="fro", keepdim=True)
    X = (X / (norm * schedule.input_margin + NORM_EPS)).to(compute_dtype)
    for a, b, c in schedule.steps:
        A = X @ X.mT
        B = torch.addmm(A, A, A, beta=b, alpha=c) if A.ndim == 2 else b * A + c * (A @ A)
        X = torch.addmm(X, B, X, beta=a) if X.ndim == 2 else a * X + B @ X
    if tall:
        X = X.mT
    return X
