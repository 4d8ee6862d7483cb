"""Polynomial coefficient schedules for the odd-quintic orthogonalization iteration.

Every step maps X -> a X + b (X Xᵀ) X + c (X Xᵀ)² X, i.e. each singular value s -> a s + b s³ + c s⁵.
A schedule is the list of (a, b, c) triples for each step plus the factor that the input is divided by
on top of its Frobenius norm (so that every singular value starts inside the interval the polynomials
were designed for).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

Triple = Tuple[float, float, float]

# Keller Jordan's Muon: one quintic, repeated. Chosen to maximise the slope at zero rather than to
# converge, so the outputs' singular values land roughly in [0.5, 1.2] instead of exactly 1.
JORDAN_NS5: Triple = (3.4445, -4.7750, 2.0315)

# Polar Express (Amsel, Persson, Musco, Gower, arXiv 2505.16932), the canonical 8-step list of the
# authors' `basic.py`: minimax-optimal odd quintics for l = 1e-3 with cushion 0.02407, *before* the
# safety factor. The list is what `optimal_composition(l=1e-3, num_iters=8, safety_factor_eps=0,
# cushion=0.02407327424182761)` returns; the TEON group's code uses the same list.
POLAR_EXPRESS_CANONICAL_8: List[Triple] = [
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
]
# The authors shrink every polynomial but the last, p(x) -> p(x / 1.01), so that bf16 rounding cannot
# push a singular value past the interval's right end, where the quintics blow up.
POLAR_EXPRESS_SAFETY = 1.01


@dataclass(frozen=True)
class Schedule:
    name: str
    steps: Tuple[Triple, ...]
    input_margin: float  # the input is divided by ‖X‖_F · input_margin (+ eps)


def jordan_schedule(steps: int) -> Schedule:
    return Schedule("ns5", (JORDAN_NS5,) * steps, 1.0)


def polar_express_schedule(steps: int) -> Schedule:
    """The first `steps` polynomials of the canonical list with the safety factor applied.

    Past the 8th step the last polynomial (the classical Newton–Schulz quintic, which fixes 1) repeats.
    """
    s = POLAR_EXPRESS_SAFETY
    raw = POLAR_EXPRESS_CANONICAL_8
    safe = [(a / s, b / s**3, c / s**5) for a, b, c in raw[:-1]] + [raw[-1]]
    chosen = [safe[min(i, len(safe) - 1)] for i in range(steps)]
    return Schedule("polar_express", tuple(chosen), POLAR_EXPRESS_SAFETY)


def schedule_for(method: str, steps: int) -> Schedule:
    if steps < 1:
        raise ValueError(f"ns_steps must be >= 1, got {steps}")
    if method == "ns5":
        return jordan_schedule(steps)
    if method == "polar_express":
        return polar_express_schedule(steps)
    raise ValueError(f"no polynomial schedule for orthogonalizer {method!r}; use 'ns5' or 'polar_express'")
