"""The three public optimizers: one step (base.OrthoOptimizer), different defaults and rules."""

from __future__ import annotations

from .base import HeavyTailMixin, OrthoOptimizer


class Muon(OrthoOptimizer):
    """Momentum + Newton–Schulz orthogonalization of each weight matrix (Keller Jordan), AdamW for the
    rest. Defaults: lr 0.02, momentum 0.95, Nesterov, ns5 × 5, lr_scale "spectral"."""

    kind = "muon"


class TEON(OrthoOptimizer):
    """Muon generalised to stacks of layers (arXiv 2601.23261): the Q, K and V projections of `teon_k`
    consecutive blocks are concatenated along the input dim and orthogonalized as one matrix.
    Defaults: teon_k 2, Polar Express × 5, lr_scale "fan_ratio" (√(m/n) per member)."""

    kind = "teon"


class HTMuon(HeavyTailMixin, OrthoOptimizer):
    """Heavy-tailed Muon (arXiv 2603.10067): update U Σᵖ Vᵀ of the Nesterov momentum, p = ht_power
    (0.125). `ht_method="ns"` uses the Newton–Schulz form, `ht_interval=N` the every-N-steps form;
    `teon_k > 1` composes it with TEON's stacking."""

    kind = "htmuon"
