"""The step's check, before anything changes: are all gradients finite on every rank sharing this step,
do those ranks agree on the step's plan, and (where the step clips) what is the global gradient norm?
One device reduction, one collective, one host read: the runner's `check_step`."""

from __future__ import annotations

import math
import warnings
from typing import Dict, List, Tuple

import torch

from ..parallel.runner import StepCheck
from .checks import GradientError, gradient_problem, mark_plan, replaced_parameters
from .stepped import digest


def check_step(opt) -> bool:
    """True: take the step. False: a non-finite gradient somewhere; skip it (warned, nothing changed)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    # Layout, shape, dtype and device of every gradient (metadata only): a refused step changes nothing.
    problem = gradient_problem((opt._names.get(id(p), "a flat ZeRO partition"), p) for p in params)
    if problem is not None and opt._runner.stats is None:  # no collective to pass through first
        raise GradientError(problem)
    grads = opt._tensors.grads(opt)
    if not grads:
        stale = replaced_parameters(opt)
        if stale is not None:
            raise ValueError(stale)
    norm_sq = opt._tensors.norm_sq()
    opt.grad_norm = None
    # A single process (a runner without counters has no collective) needs the check only to skip or clip.
    if not params or (norm_sq is None and not opt.config.skip_nonfinite and opt._runner.stats is None):
        return True
    device = (grads[0] if grads else params[0]).device
    if opt.config.skip_nonfinite and grads:
        finite = torch.stack([torch.isfinite(g).all().to(device) for g in grads]).all()
    else:
        finite = torch.ones((), dtype=torch.bool, device=device)
    digests, lines = step_plan(opt, params)
    if problem is not None:  # through the step's collective first, so that no rank is left waiting in it
        lines = mark_plan(lines, problem)
        digests = {k: digest(v) for k, v in lines.items()}
    ok, total_norm_sq = opt._runner.check_step(StepCheck(finite, digests, lambda: lines, norm_sq))
    if problem is not None:
        raise GradientError(problem)
    if total_norm_sq is not None:
        opt.grad_norm = math.sqrt(total_norm_sq)
    if ok:
        return True
    bad = opt._tensors.nonfinite(opt)
    where = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "") if bad else "another rank's parameters"
    warnings.warn(
        f"teonspeed: non-finite gradient in {where}; step skipped, weights and optimizer state unchanged",
        RuntimeWarning,
        stacklevel=4,
    )
    return False


def step_plan(opt, params: List[torch.Tensor]) -> Tuple[Dict[str, int], Dict[str, List[str]]]:
    """This rank's plan of the step, per topology, as text lines and their digests: the groups it
    will run (members, shapes, dtypes) and which parameters have a gradient. Cached per pattern."""
    key = tuple((p.grad is not None, p.dtype, tuple(p.shape)) for p in params)
    cached = opt._plan_cache.get(key)
    if cached is not None:
        return cached
    lines: Dict[str, List[str]] = {"dense": [], "expert": []}
    opt._tensors.plan_lines(opt, lines)
    digests = {k: digest(v) for k, v in lines.items()}
    if len(opt._plan_cache) > 64:
        opt._plan_cache.clear()
    opt._plan_cache[key] = (digests, lines)
    return digests, lines
