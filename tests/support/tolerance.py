"""The suite's equality bounds, derived from the arithmetic that differs between the two sides (never
fitted to what one CPU printed). Each bound is a product of these factors, stated where it is used:

- `u(dtype)`: the unit roundoff, half the gap from 1 to the next number: fp64 2⁻⁵³ = 1.1e-16,
  fp32 2⁻²⁴ = 6.0e-8, bf16 2⁻⁸ = 3.9e-3.
- `sums(dtype, n)`: two evaluations of the same sums of n products in another order (another blocking,
  another CPU's kernels, a TP split, an all-reduce) differ by ≈ √n·u relative per sum, each rounding
  independent and zero-mean (the probabilistic bound of Higham & Mary, SIAM J. Sci. Comput. 41(5),
  2019), so by √2·√n·u between the two; LAMBDA = 3 standard deviations on top.
- `ns_gain(method, steps, sigma_min)`: how much the odd-polynomial iteration can grow a perturbation of
  its normalised input, from the composed polynomial f itself: max |f'| and f(σ)/σ over the input's
  singular values. For a rank-deficient input (a tiny batch's momentum) that is the product of the
  slopes at 0, Π aₖ: a direction at rounding level stays in the linear range and is multiplied by aₖ at
  every step: 485 for ns5 × 5, 967 for Polar Express × 5 (its TP differences in the suite are about
  twice Muon's). A well-conditioned input (σ_min given) is grown far less.
- `ns_error(...)`: an orthogonalization's output error (relative, Frobenius) from an input error
  `eps_in` plus the rounding of its own 3 products per step (each grown by the later steps).
- `RoundingBudget`: the same, summed over the steps an optimizer really took (the spectra it saw).
- the float64 oracle (`oracle_bound`): for whole training runs, a run in fp64 measures the fp32 run's
  own rounding, and another layout of the same training is within (1 + LAMBDA) of it.

pytest.approx's default (relative 1e-6) on Python-float formulas elsewhere (cost model, memory, lr
schedules) is left as it is: fp64 sums of ≤ 10³ terms are within 10³·u₆₄ ≈ 1e-13 of each other, so the
default bounds them from above by a wide margin; tolerances there that are larger (a greedy balance
within 5%, a model's size within 2%) are modelling claims, not rounding.
"""

from __future__ import annotations

import math
import torch

from teonspeed.ortho import schedule_for

UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}
LAMBDA = 3.0  # standard deviations of the probabilistic rounding bound


def u(dtype: torch.dtype = torch.float32) -> float:
    return UNIT_ROUNDOFF[dtype]


def product_rms(dtype: torch.dtype, n: int) -> float:
    """Relative rms rounding of a matrix product whose sums have n terms: √n·u where every addition
    rounds (fp32, fp64); one rounding of the fp32-accumulated result for bf16/fp16 (what CPU and GPU
    kernels do), u, plus the fp32 accumulation's √n·u₃₂."""
    if dtype in (torch.bfloat16, torch.float16):
        return u(dtype) + math.sqrt(n) * u(torch.float32)
    return math.sqrt(n) * u(dtype)


def sums(dtype: torch.dtype, n: int) -> float:
    """Relative difference of two evaluations of length-n sums of products in different orders (LAMBDA
    standard deviations of the difference of two independent roundings)."""
    return LAMBDA * math.sqrt(2) * product_rms(dtype, n)


def _after(coefficients, s: torch.Tensor):
    """The composed odd polynomials at s, with their derivative (chain rule)."""
    value, slope = s.clone(), torch.ones_like(s)
    for a, b, c in coefficients:
        slope = slope * (a + 3 * b * value**2 + 5 * c * value**4)
        value = a * value + b * value**3 + c * value**5
    return value, slope


def _gain(coefficients, low: torch.Tensor, high: torch.Tensor) -> float:
    """The most the composed map grows a perturbation of a matrix whose singular values lie in
    [low, high]: max |f'(σ)| and f(σ)/σ over the interval (the Fréchet derivative of a matrix function
    σ ↦ f(σ) on singular values is bounded by its divided differences, which the mean value theorem
    bounds by these two)."""
    if not coefficients:
        return 1.0
    grid = torch.cat(
        [
            torch.linspace(0, 1, 4001, dtype=torch.float64) * (high - low) + low,
            torch.logspace(-12, 0, 2001, dtype=torch.float64) * (high - low) + low,
        ]
    )
    value, slope = _after(coefficients, grid)
    ratio = torch.where(grid > 0, value / grid.clamp_min(1e-300), slope)
    return float(torch.maximum(slope.abs(), ratio.abs()).max())


def ns_gain(method: str, steps: int = 5, sigma_min: float = 0.0) -> float:
    """How much `steps` iterations grow a perturbation of their input (relative to its Frobenius norm)
    when the input's smallest singular value is `sigma_min` of that norm (0: rank-deficient, the worst
    case, where it is the product of the slopes at 0, Π aₖ)."""
    schedule = schedule_for(method, steps)
    margin = schedule.input_margin
    low = torch.tensor(sigma_min / margin, dtype=torch.float64)
    return _gain(schedule.steps, low, torch.tensor(1 / margin, dtype=torch.float64)) / margin


def ns_error(
    eps_in: float, method: str, steps: int, dtype: torch.dtype, n: int, sigma_min: float = 0.0
) -> float:
    """Output error (relative Frobenius) of `steps` iterations on an n-wide matrix computed in `dtype`,
    whose input is off by `eps_in` (relative) and whose smallest singular value is `sigma_min` of its
    norm: the input error grown by the whole map, plus each step's own rounding (3 products of length
    ≤ n, `sums`) grown by the steps after it over the interval its singular values have reached."""
    schedule = schedule_for(method, steps)
    margin = schedule.input_margin
    low = torch.tensor(sigma_min / margin, dtype=torch.float64)
    high = torch.tensor(1 / margin, dtype=torch.float64)
    total = ns_gain(method, steps, sigma_min) * eps_in
    for k in range(1, steps + 1):
        done, rest = schedule.steps[:k], schedule.steps[k:]
        reached = _after(done, torch.stack([low, high]))[0]
        total += 3 * sums(dtype, n) * _gain(rest, reached.min(), reached.max())
    return total


def _rms_gain(coefficients, s: torch.Tensor, m: int, n: int) -> float:
    """The rms growth of an isotropic perturbation (independent entries, as rounding makes) of an m×n
    matrix with singular values s under X ↦ U f(Σ) Vᵀ: its Fréchet derivative acts on each entry of
    Uᵀ E V by f'(sᵢ) (diagonal), by the divided differences (f(sᵢ) ∓ f(sⱼ))/(sᵢ ∓ sⱼ) on the symmetric
    and antisymmetric parts of each off-diagonal pair, and by f(sᵢ)/sᵢ on the rectangular rest."""
    if not coefficients:
        return 1.0
    f, slope = _after(coefficients, s)
    si, sj, fi, fj = s[:, None], s[None, :], f[:, None], f[None, :]
    gap = si - sj
    close = gap.abs() <= 1e-12
    mean_slope = (slope[:, None] + slope[None, :]) / 2
    minus = torch.where(close, mean_slope, (fi - fj) / torch.where(close, 1.0, gap))
    plus = torch.where(si + sj > 0, (fi + fj) / (si + sj).clamp_min(1e-300), slope[:, None].expand_as(si))
    pairs = 0.5 * (minus**2 + plus**2)
    pairs.fill_diagonal_(0)
    ratio = torch.where(s > 0, f / s.clamp_min(1e-300), slope)
    total = (slope**2).sum() + pairs.sum() + (max(m, n) - s.numel()) * (ratio**2).sum()
    return math.sqrt(float(total) / (m * n))


def ns_error_rms(eps_in: float, method, steps: int, dtype: torch.dtype, x: torch.Tensor) -> float:
    """Like ns_error, for the test's own input x: the expected growth of isotropic errors from x's actual
    spectrum instead of the worst direction's, times LAMBDA (the largest over a batch of matrices).
    `eps_in` is the input's relative rms error; each step's 3 products round by product_rms each.
    `method`: an orthogonalizer name or a Schedule."""
    schedule = schedule_for(method, steps) if isinstance(method, str) else method
    m, n = x.shape[-2:]
    worst = 0.0
    for matrix in x.reshape(-1, m, n).double():
        s = torch.linalg.svdvals(matrix) / (torch.linalg.matrix_norm(matrix) * schedule.input_margin)
        total = _rms_gain(schedule.steps, s, m, n) * eps_in
        for k in range(1, len(schedule.steps) + 1):
            reached = _after(schedule.steps[:k], s)[0]
            total += 3 * product_rms(dtype, max(m, n)) * _rms_gain(schedule.steps[k:], reached, m, n)
        worst = max(worst, LAMBDA * total)
    return worst


def product_abs(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Entrywise bound on the difference of two evaluations of a @ b in different orders:
    sums(dtype, k) · (|a| @ |b|) (the rounding of each sum is relative to the sum of its terms' sizes)."""
    return sums(dtype, a.shape[-1]) * (a.double().abs() @ b.double().abs())


def normalised_sigma_min(x: torch.Tensor) -> float:
    """The smallest singular value of each matrix of x over its Frobenius norm (the iteration's input
    scale), the least over a batch: computed in fp64 from the test's own input."""
    x = x.double()
    return float((torch.linalg.svdvals(x)[..., -1] / torch.linalg.matrix_norm(x)).min())


def ns_dtype() -> torch.dtype:
    """What ns_dtype="auto" computes in on the CPU in this run: bf16 under TEONSPEED_CPU_BF16=1, else fp32
    (tests/conftest.py sets 0 unless the environment says otherwise)."""
    import os

    return torch.bfloat16 if os.environ.get("TEONSPEED_CPU_BF16") == "1" else torch.float32


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖_F / ‖b‖_F, in fp64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


class RoundingBudget:
    """How far two evaluations of the same optimizer steps (another layout, batching or exchange) may end
    apart by rounding alone, from what the optimizer really orthogonalized: wraps `opt.transform` and,
    for every stack it transforms, adds the stack's output error (absolute, Frobenius):

        ‖δO‖ ≤ (the iteration's error from `eps_in` and its own rounding, tol.ns_error_rms, or the
               SVD's: u of the fp32 cast for the fp64 polar factor, Li's bound √n·u·‖X‖/σ_min^(1−p)
               for HTMuon's fp32 U Σᵖ Vᵀ) · ‖O‖ + out_rounding · ‖O‖ (e.g. a bf16 exchange of O).

    Each step moves the matrices by lr·mult·O (mult ≤ the largest lr_scale multiplier of the model), so
    the weights of all matrices together differ by at most Σ_steps lr·mult·√(Σ_stacks ‖δO‖²), √2 of it
    for two sides that both round. Weight decay only shrinks old differences."""

    def __init__(self, opt, eps_in: float = 0.0, out_rounding: float = 0.0, dtype: torch.dtype = None):
        from teonspeed.optim.scaling import lr_multiplier

        self.opt, self.eps_in, self.out_rounding = opt, eps_in, out_rounding
        self.dtype = dtype or (
            ns_dtype()
            if opt.config.ns_dtype == "auto"
            else {"fp32": torch.float32, "bf16": torch.bfloat16}[opt.config.ns_dtype]
        )
        members = [m for g in opt.grouping.groups for m in g.members]
        self.mult = max(lr_multiplier(opt.config.lr_scale, *m.shape) for m in members)
        self.steps: dict = {}
        original = opt.transform

        def transform(x, step):
            out = original(x, step)
            self.steps[step] = self.steps.get(step, 0.0) + sum(
                self._error(xi, oi, step) ** 2 for xi, oi in zip(x, out)
            )
            return out

        opt.transform = transform

    def _error(self, x: torch.Tensor, out: torch.Tensor, step: int) -> float:
        c = self.opt.config
        size = float(out.double().norm())
        heavy = self.opt.kind == "htmuon" and step % c.ht_interval == 0
        if heavy:  # fp32 SVD (fp64 for fp64 input): Li's bound through σᵖ's divided differences
            s = torch.linalg.svdvals(x.double())
            if float(s.min()) <= 0:
                return float("inf")
            grow = float(x.double().norm()) * float(s.min()) ** (c.ht_power - 1)
            return (sums(torch.float32, max(x.shape)) + self.eps_in) * grow + self.out_rounding * size
        if c.orthogonalizer == "svd":  # the fp64 polar factor, cast back: u of the cast (both sides alike)
            s = torch.linalg.svdvals(x.double())
            grown_input = self.eps_in * float(x.double().norm()) / float(s.min())
            return (u(x.dtype) + grown_input + self.out_rounding) * size
        iteration = ns_error_rms(self.eps_in, c.orthogonalizer, c.ns_steps or 5, self.dtype, x)
        return (iteration + self.out_rounding) * size

    def weights(self, lr: float, sides: int = 2) -> float:
        """The bound on ‖ΔW‖_F over all orthogonalized matrices after the recorded steps."""
        return math.sqrt(sides) * sum(lr * self.mult * math.sqrt(sq) for sq in self.steps.values())


# -- the float64 oracle, for whole training runs ------------------------------------------------------
# Two fp32 runs of the same training that differ only in the order of their roundings (a TP or ZeRO
# layout, a bucket partition, an exchange) are each off the exact run by a rounding error of the same
# distribution; a float64 run of the reference measures the reference's own error, e = ‖ref − exact‖
# (fp64's rounding is 2⁻²⁹ of it). The other run's error is within LAMBDA of e, so
#     ‖run − ref‖ ≤ (1 + LAMBDA)·e,        and two unmeasured runs differ by ≤ 2·LAMBDA·e.
# This is the rounding of this very computation on this very CPU (bf16 where TEONSPEED_CPU_BF16=1 makes
# the iteration bf16: the fp64 oracle stays fp64), so no constant is fitted to any machine's output.


def distance(a, b, names=None) -> float:
    """‖a − b‖_F over the named tensors of two {name: tensor} dicts (all shared names by default), fp64."""
    names = sorted(set(a) & set(b)) if names is None else names
    return math.sqrt(sum(float((a[n].double() - b[n].double()).norm()) ** 2 for n in names))


def oracle_bound(ref, oracle64, measured: bool = True) -> float:
    """The bound above: (1 + LAMBDA)·‖ref − oracle64‖ against the measured reference, 2·LAMBDA·‖ref −
    oracle64‖ between two runs neither of which was measured (`measured=False`)."""
    e = distance(ref, oracle64)
    return (1 + LAMBDA) * e if measured else 2 * LAMBDA * e


def losses_bound(ref, oracle64, measured: bool = True, n: int = 64):
    """The same bound for the per-step losses, one per step. A single scalar's deviation is one sample,
    not a norm over many, so the steps' largest deviation is the scale; plus the fp32 rounding of the
    loss's own reductions (length n: the vocabulary's log-softmax)."""
    factor = 1 + LAMBDA if measured else 2 * LAMBDA
    scale = max(abs(a - b) for a, b in zip(ref, oracle64))
    return [factor * scale + sums(torch.float32, n) * abs(a) for a in ref]
