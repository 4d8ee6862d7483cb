"""Transient memory of the Muon / TEON / HTMuon step: the full (stacked) matrices each rank owns and the
Newton-Schulz buffers of its largest shape batch, in fp32.

ZeRO-3 (integrations/deepspeed_zero3.py) steps the same way, one DeepSpeed sub-group at a time: each owner
assembles the whole matrices / TEON stacks of the sub-group it owns from the ranks' pieces. Counted here
for the whole stage at once, which is exact while the stage's parameters fit one sub-group (DeepSpeed
0.19.8's sub_group_size default: 1e9 elements) and an upper bound beyond it."""

from __future__ import annotations

import math
from typing import Dict, Tuple

from launch import rules
from launch.estimator.activations import Training
from launch.estimator.params import ModelSpec, Parallel, parameter_tensors, stage_of


def ortho_workspace_bytes(spec: ModelSpec, par: Parallel, train: Training, stage: int) -> float:
    """Transient fp32 memory of a Muon/TEON step on one rank: the full matrices it owns (gathered input
    and result) plus Newton-Schulz buffers (X, X Xᵀ, its square, the next X) for one shape batch.
    Owners spread the groups of a shape over the TP x DP work group (expert-TP x expert-DP for experts)."""
    if train.optimizer not in rules.ORTHO_OPTIMIZERS:
        return 0.0
    k = rules.teon_k(train.optimizer, train.teon_k)
    shapes: Dict[Tuple[int, int, bool], float] = {}  # (rows, stacked cols, expert) -> number of groups
    for t in parameter_tensors(spec, par):
        if t.route != "ortho" or stage not in stage_of(t, spec, par.pp):
            continue
        for part, (m, n) in t.parts or (("other", t.shape),):
            kk = k if part in rules.TEON_TYPES else 1  # TEON stacks K blocks of the same type: [M1 | M2]
            key = (m, n * kk, t.expert)
            shapes[key] = shapes.get(key, 0) + t.copies / kk
    total, peak_ns = 0.0, 0.0
    for (m, n, expert), groups in shapes.items():
        workers = par.expert_tp * par.expert_dp * par.ep if expert else par.tp * par.dp
        owned = math.ceil(groups / workers)
        total += owned * 2 * m * n * 4
        small = min(m, n)
        peak_ns = max(peak_ns, owned * (2 * m * n + 2 * small * small) * 4)
    return total + peak_ns
