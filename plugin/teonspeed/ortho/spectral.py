"""Exact spectral maps through the SVD: the polar factor and HTMuon's heavy-tailed transform."""

from __future__ import annotations

import torch


def _svd(x: torch.Tensor, dtype: torch.dtype):
    return torch.linalg.svd(x.to(dtype), full_matrices=False)


def _numerical_rank_mask(S: torch.Tensor, m: int, n: int) -> torch.Tensor:
    # Singular values below the SVD's own rounding level carry no direction: map them to 0, exactly as
    # the Newton–Schulz polynomials (odd, p(0) = 0) do, so a zero matrix gives zeros and not a random
    # orthogonal matrix.
    tol = S.amax(dim=-1, keepdim=True) * max(m, n) * torch.finfo(S.dtype).eps
    return S > tol


def polar_svd(x: torch.Tensor) -> torch.Tensor:
    """U Vᵀ of x = U Σ Vᵀ (the exact orthogonal polar factor), batched; fp64 result.

    The SVD runs in fp64: it is the reference, and in fp32 the rank cut below would drop genuine
    directions of ill-conditioned full-rank matrices (square Gaussians reach σ_min/σ_max ≈ 1e-5).
    """
    U, S, Vh = _svd(x, torch.float64)
    keep = _numerical_rank_mask(S, x.size(-2), x.size(-1)).to(S.dtype)
    return (U * keep.unsqueeze(-2)) @ Vh


def heavy_tail_svd(x: torch.Tensor, power: float) -> torch.Tensor:
    """HTMuon's update U diag(σᵖ) Vᵀ, exact via the SVD (not renormalised, as in the authors' code).
    fp32 SVD as in the authors' code (fp64 for fp64 input): it runs every step of training.

    Every singular value is raised to p, however small, as the authors' code does (S**p on the whole
    spectrum): σᵖ with p = 0.125 is still 0.24 at σ = 1e-5, so a rank cut would change the update. Only
    σ = 0 exactly maps to 0 (also for p = 0, where 0⁰ would otherwise turn a zero matrix into a random
    orthogonal one).
    """
    U, S, Vh = _svd(x, torch.float64 if x.dtype == torch.float64 else torch.float32)
    S = S.clamp_min(0)
    S_p = torch.where(S > 0, S.pow(power), torch.zeros_like(S))
    return (U * S_p.unsqueeze(-2)) @ Vh


def matrix_root_newton_schulz(a: torch.Tensor, steps: int) -> torch.Tensor:
    """Principal square root of a symmetric positive semi-definite batch (..., k, k).

    Coupled Newton–Schulz (Denman–Beavers form without inverses): with Y₀ = A/α, Z₀ = I,
    T = (3I − Z Y)/2, Y ← Y T, Z ← T Z, Y converges to (A/α)^{1/2}. α = ‖A‖_F puts every eigenvalue in
    (0, 1], where the iteration converges; tiny eigenvalues converge slowly, which is why HTMuon's
    Newton–Schulz form is an approximation and is tested with a tolerance.
    """
    k = a.size(-1)
    eye = torch.eye(k, dtype=a.dtype, device=a.device).expand_as(a)
    alpha = torch.linalg.matrix_norm(a, ord="fro", keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    Y = a / alpha
    Z = eye.clone()
    for _ in range(steps):
        T = 0.5 * (3.0 * eye - Z @ Y)
        Y = Y @ T
        Z = T @ Z
    Y = 0.5 * (Y + Y.mT)  # symmetric by construction; remove the rounding drift
    return Y * alpha.sqrt()
