"""Per-matrix learning-rate multipliers for an orthogonalized update of an (m × n) = (out × in) matrix.

The conventions differ between the reference implementations; each is named after its source:
- spectral  √max(1, m/n)    Keller Jordan's Muon (and HTMuon's code)
- fan_ratio √(m/n)          the TEON authors' code (`adjust_lr_for_muon`); < 1 for wide matrices
- rms_match 0.2·√max(m, n)  Moonlight: matches AdamW's update RMS so AdamW's lr and wd transfer
- none      1
m and n are always the full (unsharded, per-part) shape, never a tensor-parallel shard's.
"""

from __future__ import annotations

import math


def lr_multiplier(rule: str, m: int, n: int) -> float:
    if rule == "spectral":
        return math.sqrt(max(1.0, m / n))
    if rule == "fan_ratio":
        return math.sqrt(m / n)
    if rule == "rms_match":
        return 0.2 * math.sqrt(max(m, n))
    if rule == "none":
        return 1.0
    raise ValueError(f"teonspeed: unknown lr_scale {rule!r}")
