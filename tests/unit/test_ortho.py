"""The orthogonalization core against exact oracles (SVD in fp64, the polynomial's scalar map)."""

import importlib

import pytest
import torch

from teonspeed import heavy_tail, orthogonalize
from teonspeed.ortho import matrix_root_newton_schulz, newton_schulz, schedule_for
from teonspeed.ortho.coefficients import POLAR_EXPRESS_CANONICAL_8, POLAR_EXPRESS_SAFETY
from support import tolerance as tol

SHAPES = [(16, 16), (12, 40), (40, 12), (3, 7, 9)]


def exact_polar(x):
    U, _, Vh = torch.linalg.svd(x.double(), full_matrices=False)
    return U @ Vh


def scalar_map(schedule, s):
    """What the iteration does to each singular value: the composed odd polynomials."""
    for a, b, c in schedule.steps:
        s = a * s + b * s**3 + c * s**5
    return s


@pytest.mark.parametrize("shape", SHAPES)
def test_svd_is_the_exact_polar_factor(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # the same LAPACK SVD of the same matrix (the rank mask multiplies by exactly 1): at most the product
    # U·Vᵀ (sums of ≤ 16 products of entries ≤ 1) is rounded differently
    torch.testing.assert_close(
        orthogonalize(x, "svd"), exact_polar(x), rtol=0, atol=tol.sums(torch.float64, 16)
    )


@pytest.mark.parametrize("method", ["ns5", "polar_express"])
@pytest.mark.parametrize("shape", SHAPES)
def test_iteration_applies_its_polynomial_to_each_singular_value(method, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    schedule = schedule_for(method, 5)
    s_in = torch.linalg.svdvals(x)
    norm = torch.linalg.matrix_norm(x, keepdim=False).unsqueeze(-1)
    expected = scalar_map(schedule, s_in / (norm * schedule.input_margin + 1e-7))
    out = orthogonalize(x, method)
    got = torch.linalg.svdvals(out)
    # fp64 rounding of the iteration, δ = ‖out − U f(Σ) Vᵀ‖_F ≤ ns_error·‖out‖_F, moves each singular
    # value by at most ‖δ‖₂ ≤ ‖δ‖_F (Weyl), and the two SVDs by √k·u·σ_max each
    sigma_min, k = tol.normalised_sigma_min(x), min(shape[-2:])
    size = float(out.norm(dim=(-2, -1)).max())
    delta = tol.ns_error(0.0, method, 5, torch.float64, max(shape[-2:]), sigma_min) * size
    torch.testing.assert_close(
        got.sort(-1).values, expected.sort(-1).values, rtol=0, atol=delta + tol.sums(torch.float64, k) * 2
    )
    # ...and keeps the singular vectors: its own polar factor is the input's. The polar factor moves by
    # at most 2‖δ‖/(σ_min(out) + σ_min(x)) (Li's bound), σ_min(out) = f(σ_min) of the normalised input
    f_min = float(expected.min())
    torch.testing.assert_close(
        exact_polar(out), exact_polar(x), rtol=0, atol=2 * delta / f_min + tol.sums(torch.float64, k)
    )


@pytest.mark.parametrize("method,band", [("ns5", (0.45, 1.21)), ("polar_express", (0.83, 1.13))])
def test_singular_values_stay_in_the_known_band(method, band):
    # Gaussian 64x128: normalised singular values lie in about [0.04, 0.2], inside [1e-3, 1].
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    s = torch.linalg.svdvals(orthogonalize(x, method))
    assert band[0] <= s.min() and s.max() <= band[1], (s.min(), s.max())


def test_polar_express_uses_the_canonical_list_with_safety_factor():
    schedule = schedule_for("polar_express", 8)
    a, b, c = POLAR_EXPRESS_CANONICAL_8[0]
    assert schedule.steps[0] == pytest.approx((a / 1.01, b / 1.01**3, c / 1.01**5))
    assert schedule.steps[-1] == POLAR_EXPRESS_CANONICAL_8[-1]  # the last polynomial keeps no safety factor
    assert schedule.input_margin == POLAR_EXPRESS_SAFETY
    assert schedule_for("polar_express", 10).steps[9] == (1.875, -1.25, 0.375)


def test_all_three_agree_on_a_well_conditioned_matrix():
    g = torch.Generator().manual_seed(3)
    U, _ = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(48, 32, generator=g, dtype=torch.float64))
    x = U @ torch.diag(torch.linspace(1.0, 2.0, 32, dtype=torch.float64)) @ V.T  # condition number 2
    ref = exact_polar(x)
    # the iteration's known error: U f(Σ) Vᵀ − U Vᵀ has spectral norm max |f(σ) − 1| over the input's
    # normalised singular values (computed from the polynomials), plus its fp64 rounding
    sched = schedule_for("polar_express", 8)
    sigmas = torch.linalg.svdvals(x) / (torch.linalg.matrix_norm(x) * sched.input_margin)
    known = float((scalar_map(sched, sigmas) - 1).abs().max())
    rounding = tol.ns_error(0.0, "polar_express", 8, torch.float64, 48, tol.normalised_sigma_min(x)) * 32**0.5
    assert (orthogonalize(x, "polar_express", steps=8) - ref).abs().max() <= known + rounding
    # the same SVD and product
    assert (orthogonalize(x, "svd") - ref).abs().max() <= tol.sums(torch.float64, 32)
    # ns5 does not converge to 1 by design (Jordan: S' ~ U(0.5, 1.5)); it keeps U and V exactly.
    out = orthogonalize(x, "ns5")
    s = torch.linalg.svdvals(out)
    assert 0.5 < s.min() and s.max() < 1.25
    delta = tol.ns_error(0.0, "ns5", 5, torch.float64, 48, tol.normalised_sigma_min(x)) * float(out.norm())
    assert (exact_polar(out) - ref).abs().max() <= 2 * delta / float(s.min()) + tol.sums(torch.float64, 32)


@pytest.mark.parametrize("method", ["ns5", "polar_express", "svd"])
def test_batched_equals_looped(method):
    x = torch.randn(5, 24, 40, generator=torch.Generator().manual_seed(4))
    looped = torch.stack([orthogonalize(m, method) for m in x])
    batched = orthogonalize(x, method)
    # a batched product may block its sums differently: the iteration's own rounding in the dtype it
    # computes in (fp32, or bf16 under TEONSPEED_CPU_BF16=1); svd runs in fp64 and returns fp32 (u32)
    bound = (
        tol.u(torch.float32)
        if method == "svd"
        else tol.ns_error(0.0, method, 5, tol.ns_dtype(), 40, tol.normalised_sigma_min(x))
    )
    assert tol.rel(batched, looped) <= bound


@pytest.mark.parametrize("method", ["ns5", "polar_express", "svd"])
def test_zero_matrices_give_zeros_not_nan(method):
    x = torch.randn(3, 8, 5)
    x[1] = 0
    out = orthogonalize(x, method)
    assert torch.isfinite(out).all()
    assert (out[1] == 0).all()
    assert out[0].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["ns5", "polar_express", "svd"])
def test_output_dtype_matches_input(method, dtype):
    assert orthogonalize(torch.randn(8, 12).to(dtype), method).dtype == dtype


def test_bad_input_is_rejected_with_the_option_named():
    with pytest.raises(ValueError, match="orthogonalizer"):
        orthogonalize(torch.randn(4, 4), "newton")
    with pytest.raises(ValueError, match="m, n"):
        orthogonalize(torch.randn(4), "ns5")


# -- HTMuon's transform ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(10, 16), (16, 10), (2, 6, 6)])
def test_heavy_tail_svd_is_u_sigma_p_vt(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(x, full_matrices=False)
    expected = U @ torch.diag_embed(S**0.125) @ Vh
    # the same fp64 SVD as heavy_tail's: only σᵖ (a few ulp) and the product (sums of ≤ 10) round
    bound = dict(rtol=0, atol=tol.sums(torch.float64, 10) * float(S.max()) ** 0.125 * 4)
    torch.testing.assert_close(heavy_tail(x, 0.125), expected, **bound)
    # Muon
    torch.testing.assert_close(heavy_tail(x, 0.0), exact_polar(x), rtol=0, atol=tol.sums(torch.float64, 10))
    # p=1 is the input: the SVD's backward error, ‖UΣVᵀ − x‖ ≤ k·u·‖x‖ (LAPACK, k = 10), then the product
    torch.testing.assert_close(
        heavy_tail(x, 1.0),
        x,
        rtol=0,
        atol=(10 * tol.u(torch.float64) + tol.sums(torch.float64, 10)) * float(S.max()),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_heavy_tail_keeps_tiny_singular_values_at_sigma_p(dtype):
    # The authors' code raises the whole spectrum to p: σ = 1e-9 (far below any rank cut) still gives
    # σᵖ = 0.075 at p = 1/8. A signed permutation of a diagonal has an exact SVD, so the oracle is exact:
    # U Σᵖ Vᵀ of P·diag(d)·Q is P·diag(sign(d)|d|ᵖ)·Q.
    d = torch.tensor([1.0, -0.5, 1e-9, 3e-11, 0.0], dtype=torch.float64)
    P = torch.eye(5, dtype=torch.float64)[[3, 0, 4, 1, 2]]
    Q = torch.eye(5, dtype=torch.float64)[[1, 4, 2, 0, 3]]
    x = (P @ torch.diag(d) @ Q).to(dtype)
    for p in (0.125, 0.0):
        mapped = torch.where(d != 0, d.sign() * d.abs().pow(p), torch.zeros_like(d))
        expected = (P @ torch.diag(mapped) @ Q).to(dtype)
        # the SVD of a signed permutation of a diagonal is exact (nothing is mixed), so only σᵖ rounds
        # (pow and the casts: a few ulp of values ≤ 1) and each entry of U Σᵖ Vᵀ is one product
        torch.testing.assert_close(heavy_tail(x, p), expected, rtol=0, atol=4 * tol.u(dtype))
    assert heavy_tail(torch.zeros(3, 4, dtype=dtype), 0.0).abs().max() == 0  # σ = 0 stays 0, even at p = 0


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_heavy_tail_newton_schulz_form_approximates_the_exact_one(shape):
    g = torch.Generator().manual_seed(6)
    U, _ = torch.linalg.qr(torch.randn(shape[0], min(shape), generator=g))
    V, _ = torch.linalg.qr(torch.randn(shape[1], min(shape), generator=g))
    x = U @ torch.diag(torch.logspace(-1, 0, min(shape))) @ V.T
    exact = heavy_tail(x, 0.125, "svd")
    approx = heavy_tail(x, 0.125, "ns", orthogonalizer="svd")
    rel = (approx - exact).norm() / exact.norm()
    # the known error of the form: 4 nested 8-step coupled square roots of the shifted Gram, run on each
    # of its eigenvalues alone (the iteration maps eigenvalues independently), against (σ²)^{p/2} = σᵖ
    sigmas = torch.logspace(-1, 0, min(shape), dtype=torch.float64)
    lam = sigmas**2 + 1e-6
    for _ in range(4):
        lam = _scalar_root(lam / float(lam.norm()), 8) * float(lam.norm()) ** 0.5
    known = float(((lam - sigmas**0.125).norm()) / (sigmas**0.125).norm())
    # plus fp32 rounding: the Gram, 4 roots x 8 steps x 2 products and the final product, each ≤ 40 long
    assert rel <= known + (1 + 4 * 8 * 2 + 1) * tol.sums(torch.float32, 40), (rel, known)


def _scalar_root(lam: torch.Tensor, steps: int) -> torch.Tensor:
    """matrix_root_newton_schulz on one eigenvalue (already divided by the Frobenius norm)."""
    y, z = lam.clone(), torch.ones_like(lam)
    for _ in range(steps):
        t = 0.5 * (3 - z * y)
        y, z = y * t, t * z
    return y


def test_heavy_tail_ns_form_needs_a_power_of_two():
    with pytest.raises(ValueError, match="2\\^-k"):
        heavy_tail(torch.randn(4, 6), 0.3, "ns")


def test_matrix_square_root():
    g = torch.Generator().manual_seed(7)
    Q, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
    a = Q @ torch.diag(torch.linspace(0.2, 3.0, 20, dtype=torch.float64)) @ Q.T
    root = matrix_root_newton_schulz(a, steps=12)
    # the iteration's known error on each eigenvalue (scalar run of the same 12 steps) plus fp64 rounding
    lam = torch.linspace(0.2, 3.0, 20, dtype=torch.float64)
    alpha = float(torch.linalg.matrix_norm(a))
    known = float((_scalar_root(lam / alpha, 12) ** 2 * alpha - lam).abs().max())
    torch.testing.assert_close(root @ root, a, rtol=0, atol=known + 3.0 * 12 * tol.sums(torch.float64, 20))


def test_svd_keeps_every_direction_of_an_ill_conditioned_full_rank_matrix():
    g = torch.Generator().manual_seed(8)
    U, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    x = (U @ torch.diag(torch.logspace(0, -6, 64, dtype=torch.float64)) @ V.T).float()  # σ_min/σ_max = 1e-6
    s = torch.linalg.svdvals(orthogonalize(x, "svd").double())
    # U Vᵀ is exact up to fp64 rounding; returned in fp32, each entry rounds by ≤ u₃₂|q|, so the
    # singular values move by ≤ ‖E‖_F ≤ u₃₂·‖Q‖_F = u₃₂·√64 (a dropped direction would give |s − 1| = 1)
    assert (s - 1).abs().max() <= tol.u(torch.float32) * 64**0.5 + tol.sums(torch.float64, 64)


# -- the CPU fast paths of newton_schulz: same iteration, other evaluation order --------------------


def _plain_iteration(x: torch.Tensor, schedule) -> torch.Tensor:
    """The schedule written out as X ← aX + (bA + cA²)X on the wide side (the definition)."""
    X = x.mT if x.size(-2) > x.size(-1) else x
    X = X / (torch.linalg.matrix_norm(X, keepdim=True) * schedule.input_margin + 1e-7)
    for a, b, c in schedule.steps:
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if x.size(-2) > x.size(-1) else X


@pytest.mark.parametrize("method", ["ns5", "polar_express"])
@pytest.mark.parametrize("shape", [(2, 256, 704), (704, 256)])
def test_gram_form_equals_the_plain_iteration(method, shape):
    ns_module = importlib.import_module(
        "teonspeed.ortho.newton_schulz"
    )  # the name is shadowed by the function
    sched = schedule_for(method, 5)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    wide = torch.zeros(256, 704, dtype=torch.float64)
    assert ns_module._use_gram_form(wide, 5), "this size must take the Gram form"
    assert ns_module.gram_form_flops(256, 704, 5) < 0.9 * ns_module.plain_form_flops(256, 704, 5)
    plain = _plain_iteration(x, sched)
    sigma_min = tol.normalised_sigma_min(x)
    # the same polynomials evaluated in another order: both sides' own fp64 rounding
    own64 = tol.ns_error(0.0, method, 5, torch.float64, 704, sigma_min)
    assert tol.rel(newton_schulz(x, sched, torch.float64), plain) <= 2 * own64
    # fp32 Gram form: within fp32 rounding of the exact iteration (the input rounded to fp32: u₃₂)
    out32 = newton_schulz(x.float(), sched, torch.float32).double()
    assert tol.rel(out32, plain) <= tol.ns_error(
        tol.u(torch.float32), method, 5, torch.float32, 704, sigma_min
    )


def test_square_and_bf16_keep_the_plain_form():
    ns_module = importlib.import_module(
        "teonspeed.ortho.newton_schulz"
    )  # the name is shadowed by the function
    assert not ns_module._use_gram_form(torch.zeros(512, 512), 5)
    assert not ns_module._use_gram_form(torch.zeros(512, 1376, dtype=torch.bfloat16), 5)
    assert not ns_module._use_gram_form(torch.zeros(64, 1024), 5)  # small: not worth a second rounding path
