"""Odd-polynomial Newton–Schulz iteration towards the polar factor, batched over leading dims."""

from __future__ import annotations

import torch

from .coefficients import Schedule

NORM_EPS = 1e-7
# The Gram form (below) pays off only for clearly wide matrices and is kept to precise dtypes; small
# matrices keep the plain form, whose rounding the kernels' tests are written against.
GRAM_MIN_ROWS = 256
GRAM_MIN_SAVING = 0.9


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
    if X.ndim == 2:
        X = _iterate_matrix(X, schedule)
    elif X.device.type == "cpu":
        # One matrix at a time: a CPU matrix product of this size already fills the cores, and a
        # batched product plus separate scale-and-add passes is measurably slower than addmm per matrix.
        flat = X.reshape(-1, *X.shape[-2:])
        out = torch.empty_like(flat)
        for i in range(flat.size(0)):
            out[i] = _iterate_matrix(flat[i], schedule)
        X = out.view(X.shape)
    else:
        flat = X.reshape(-1, *X.shape[-2:])
        for a, b, c in schedule.steps:
            A = torch.bmm(flat, flat.mT)
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)
            flat = torch.baddbmm(flat, B, flat, beta=a)
        X = flat.view(X.shape)
    if tall:
        X = X.mT
    return X


def _iterate_matrix(X: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """The iteration on one wide matrix (m <= n)."""
    if _use_gram_form(X, len(schedule.steps)):
        return _iterate_gram(X, schedule)
    for a, b, c in schedule.steps:
        A = X @ X.mT
        B = torch.addmm(A, A, A, beta=b, alpha=c)
        X = torch.addmm(X, B, X, beta=a)
    return X


def gram_form_flops(m: int, n: int, steps: int) -> int:
    """Gram form: X Xᵀ once, Q X once, and per step R², P·Q and P·R·P (the last step needs no R)."""
    return 4 * m * m * n + steps * 8 * m**3 - 4 * m**3


def plain_form_flops(m: int, n: int, steps: int) -> int:
    return steps * (4 * m * m * n + 2 * m**3)


def _use_gram_form(X: torch.Tensor, steps: int) -> bool:
    m, n = X.shape[-2:]
    return (
        X.dtype in (torch.float32, torch.float64)
        and m >= GRAM_MIN_ROWS
        and gram_form_flops(m, n, steps) < GRAM_MIN_SAVING * plain_form_flops(m, n, steps)
    )


def _iterate_gram(X: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """The same iteration carried on the small m × m side: every iterate is Xₖ = Qₖ X₀ with Qₖ a
    polynomial in R₀ = X₀X₀ᵀ, so with Rₖ = XₖXₖᵀ and Pₖ = aI + bRₖ + cRₖ², X ← Pₖ X means Q ← Pₖ Q and
    R ← Pₖ R Pₖ. For wide X (n ≳ 1.6 m) this is fewer FLOPs than touching X every step. Exact algebra,
    so only rounding differs; kept to fp32/fp64, where the accumulated Q needs no restarts."""
    R = X @ X.mT
    Q = None
    last = len(schedule.steps) - 1
    for i, (a, b, c) in enumerate(schedule.steps):
        P = torch.addmm(R, R, R, beta=b, alpha=c)
        P.diagonal().add_(a)
        Q = P if Q is None else P @ Q
        if i < last:
            R = P @ (R @ P)
    return Q @ X
