"""The orthogonalization core against exact oracles (SVD in fp64, the polynomial's scalar map)."""
import importlib

import pytest
import torch

from teonspeed import heavy_tail, orthogonalize
from teonspeed.ortho import matrix_root_newton_schulz, newton_schulz, schedule_for
from teonspeed.ortho.coefficients import POLAR_EXPRESS_CANONICAL_8, POLAR_EXPRESS_SAFETY

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
    torch.testing.assert_close(orthogonalize(x, "svd"), exact_polar(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["ns5", "polar_express"])
@pytest.mark.parametrize("shape", SHAPES)
def test_iteration_applies_its_polynomial_to_each_singular_value(method, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    schedule = schedule_for(method, 5)
    s_in = torch.linalg.svdvals(x)
    norm = torch.linalg.matrix_norm(x, keepdim=False).unsqueeze(-1)
    expected = scalar_map(schedule, s_in / (norm * schedule.input_margin + 1e-7))
    got = torch.linalg.svdvals(orthogonalize(x, method))
    torch.testing.assert_close(got.sort(-1).values, expected.sort(-1).values, rtol=1e-9, atol=1e-12)
    # ...and keeps the singular vectors: its own polar factor is the input's.
    torch.testing.assert_close(exact_polar(orthogonalize(x, method)), exact_polar(x), rtol=0, atol=1e-8)


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
    assert (orthogonalize(x, "polar_express", steps=8) - ref).abs().max() < 1e-6
    assert (orthogonalize(x, "svd") - ref).abs().max() < 1e-12
    # ns5 does not converge to 1 by design (Jordan: S' ~ U(0.5, 1.5)); it keeps U and V exactly.
    s = torch.linalg.svdvals(orthogonalize(x, "ns5"))
    assert 0.5 < s.min() and s.max() < 1.25
    assert (exact_polar(orthogonalize(x, "ns5")) - ref).abs().max() < 1e-10


@pytest.mark.parametrize("method", ["ns5", "polar_express", "svd"])
def test_batched_equals_looped(method):
    x = torch.randn(5, 24, 40, generator=torch.Generator().manual_seed(4))
    looped = torch.stack([orthogonalize(m, method) for m in x])
    torch.testing.assert_close(orthogonalize(x, method), looped, rtol=1e-5, atol=1e-6)


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
    torch.testing.assert_close(heavy_tail(x, 0.125), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(heavy_tail(x, 0.0), exact_polar(x), rtol=1e-10, atol=1e-12)  # p=0 is Muon
    torch.testing.assert_close(heavy_tail(x, 1.0), x, rtol=1e-10, atol=1e-12)  # p=1 is the input


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
        torch.testing.assert_close(heavy_tail(x, p), expected, rtol=1e-5, atol=1e-6)
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
    assert rel < 0.02, rel


def test_heavy_tail_ns_form_needs_a_power_of_two():
    with pytest.raises(ValueError, match="2\\^-k"):
        heavy_tail(torch.randn(4, 6), 0.3, "ns")


def test_matrix_square_root():
    g = torch.Generator().manual_seed(7)
    Q, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
    a = Q @ torch.diag(torch.linspace(0.2, 3.0, 20, dtype=torch.float64)) @ Q.T
    root = matrix_root_newton_schulz(a, steps=12)
    torch.testing.assert_close(root @ root, a, rtol=1e-8, atol=1e-8)


def test_svd_keeps_every_direction_of_an_ill_conditioned_full_rank_matrix():
    g = torch.Generator().manual_seed(8)
    U, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    x = (U @ torch.diag(torch.logspace(0, -6, 64, dtype=torch.float64)) @ V.T).float()  # σ_min/σ_max = 1e-6
    s = torch.linalg.svdvals(orthogonalize(x, "svd").double())
    assert (s - 1).abs().max() < 1e-4


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
    ns_module = importlib.import_module("teonspeed.ortho.newton_schulz")  # the name is shadowed by the function
    sched = schedule_for(method, 5)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    wide = torch.zeros(256, 704, dtype=torch.float64)
    assert ns_module._use_gram_form(wide, 5), "this size must take the Gram form"
    assert ns_module.gram_form_flops(256, 704, 5) < 0.9 * ns_module.plain_form_flops(256, 704, 5)
    torch.testing.assert_close(newton_schulz(x, sched, torch.float64), _plain_iteration(x, sched),
                               rtol=1e-9, atol=1e-10)
    # fp32 Gram form: within fp32 rounding of the exact iteration
    out32 = newton_schulz(x.float(), sched, torch.float32).double()
    assert (out32 - _plain_iteration(x, sched)).norm() / out32.norm() < 1e-5


def test_square_and_bf16_keep_the_plain_form():
    ns_module = importlib.import_module("teonspeed.ortho.newton_schulz")  # the name is shadowed by the function
    assert not ns_module._use_gram_form(torch.zeros(512, 512), 5)
    assert not ns_module._use_gram_form(torch.zeros(512, 1376, dtype=torch.bfloat16), 5)
    assert not ns_module._use_gram_form(torch.zeros(64, 1024), 5)  # small: not worth a second rounding path
