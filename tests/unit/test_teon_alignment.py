"""bench/teon_alignment.py's diagnostic on members with a known shared singular vector: the oracle is the
algebra of the two unfoldings (a shared output-side u₁ makes [M¹|M²] gain √2, a shared input-side v₁
makes [M¹;M²] gain √2), and the same quantities computed from teonspeed's own unfold()."""

import math
import sys
from pathlib import Path

import pytest
import torch

from teonspeed.ortho.unfold import unfold

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import teon_alignment  # noqa: E402


def _unit(n, g):
    x = torch.randn(n, generator=g, dtype=torch.float64)
    return x / x.norm()


def _members(shared: str, g):
    """Two rank-1 (out=12, in=20) matrices sharing u (output side) or v (input side), plus small noise."""
    u, v = _unit(12, g), _unit(20, g)
    first = torch.outer(u, v)
    second = torch.outer(u, _unit(20, g)) if shared == "out" else torch.outer(_unit(12, g), v)
    noise = lambda: 1e-3 * torch.randn(12, 20, generator=g, dtype=torch.float64)  # noqa: E731
    return [first + noise(), second + noise()]


@pytest.mark.parametrize("shared", ["out", "in"])
def test_shared_singular_vector_gives_the_matching_mode_its_sqrt_k_gain(shared):
    members = _members(shared, torch.Generator().manual_seed(3))
    r = teon_alignment.group_alignment(members)
    aligned, other = ("out_align", "in_align") if shared == "out" else ("in_align", "out_align")
    assert r[aligned] > 0.99 and r[other] < 0.9
    gain_of_sharing, gain_of_other = (
        ("gain_mode1", "gain_mode2") if shared == "out" else ("gain_mode2", "gain_mode1")
    )
    assert r[gain_of_sharing] == pytest.approx(math.sqrt(2), abs=1e-2)
    assert r[gain_of_other] < 1.3
    # the gains are the operator norms of teonspeed's own unfoldings, over the larger member's
    largest = max(torch.linalg.matrix_norm(m, ord=2) for m in members)
    for mode in (1, 2):
        expected = torch.linalg.matrix_norm(unfold(members, mode), ord=2) / largest
        assert r[f"gain_mode{mode}"] == pytest.approx(float(expected), rel=1e-12)


def test_mode_1_concatenates_along_the_input_dim():
    a, b = torch.zeros(3, 5), torch.ones(3, 5)
    assert unfold([a, b], 1).shape == (3, 10) and unfold([a, b], 2).shape == (6, 5)


def test_members_of_different_shapes_are_refused():
    with pytest.raises(ValueError, match="one shape"):
        teon_alignment.group_alignment([torch.ones(2, 3), torch.ones(3, 2)])
