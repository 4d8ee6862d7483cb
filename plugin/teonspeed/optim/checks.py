"""Refusals made before anything changes, each one line naming the parameter or option and the fix.

Construction (the ranks agree on any refusal before the runner's first collective, so every rank
raises the same line; see agreed_construction):
- (parallel.dtensor_layout.describe_placements: a DTensor placement teonspeed cannot describe.)
- (grouping.require_teon_stacks: a TEON run that forms no stack, unless the per-layer fallback is asked.)

Each step, before the first write: every gradient is dense and has its parameter's shape, dtype and
device. Metadata only (no device work, no host read), so the step keeps its one host read.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist


@contextlib.contextmanager
def agreed_construction() -> Iterator[None]:
    """Around everything that may refuse an optimizer, before its first collective: in a job of several
    ranks (where constructing is already collective, every rank at the same point), the ranks exchange
    their refusals in one all_gather_object, and every rank raises: its own refusal, or the lowest
    refusing rank's, word for word. A refusal on some stages only (their layers differ) cannot leave the
    other ranks waiting in the runner's collectives."""
    error: Optional[BaseException] = None
    try:
        yield
    except Exception as err:  # noqa: BLE001 - every refusal is shared, whatever its type
        error = err
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        everyone: List[Optional[str]] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, None if error is None else str(error))
        first = next((text for text in everyone if text is not None), None)
        if error is None and first is not None:
            raise ValueError(first)
    if error is not None:
        raise error


class GradientError(ValueError):
    """A gradient the step cannot use; raised before any weight or optimizer state changes."""


def gradient_problem(named: Iterable[Tuple[str, torch.Tensor]]) -> Optional[str]:
    """The first gradient the step cannot use, as a one-line refusal, or None. Reads tensor metadata
    only: layout, shape, dtype and device (a sparse gradient from nn.Embedding(sparse=True), or one set
    through `.grad.data` with another shape, dtype or device)."""
    for name, p in named:
        g = p.grad
        if g is None:
            continue
        if g.layout != torch.strided:
            return (
                f"teonspeed: parameter {name!r} has a sparse gradient ({g.layout}); the optimizer needs "
                f"dense gradients: build the layer with sparse=False (nn.Embedding(..., sparse=False))"
            )
        for what, got, want in (
            ("shape", tuple(g.shape), tuple(p.shape)),
            ("dtype", g.dtype, p.dtype),
            ("device", g.device, p.device),
        ):
            if got != want:
                return (
                    f"teonspeed: the gradient of parameter {name!r} has {what} {got}, the parameter "
                    f"{want}; the step was refused before any weight or state changed (set .grad to a "
                    f"tensor like the parameter)"
                )
    return None


def mark_plan(lines: Dict[str, List[str]], problem: str) -> Dict[str, List[str]]:
    """The step check's plan lines, marked with this rank's gradient problem: ranks where only some
    refuse disagree on the plan and all raise (naming the line); ranks that all refuse raise their own
    error after the check's collective. Nobody is left waiting in a collective."""
    return {k: list(v) + [f"refused: {problem}"] for k, v in lines.items()}


# -- load_state_dict: the saved layout against this optimizer's ----------------------------------------


def names_differ(saved: List[str], current: List[str], limit: int = 3) -> Optional[str]:
    """What differs between two lists of parameter names, naming them (None where they are equal)."""
    if saved == current:
        return None
    gone = [n for n in saved if n not in set(current)]
    new = [n for n in current if n not in set(saved)]

    def some(names: List[str]) -> str:
        more = f" and {len(names) - limit} more" if len(names) > limit else ""
        return ", ".join(repr(n) for n in names[:limit]) + more

    parts = []
    if gone:
        parts.append(f"the checkpoint has {some(gone)}, which this model lacks")
    if new:
        parts.append(f"this model has {some(new)}, which the checkpoint lacks")
    if not parts:
        first = next(i for i, (a, b) in enumerate(zip(saved, current)) if a != b)
        parts.append(
            f"the same parameters in another order (position {first}: {saved[first]!r} saved, "
            f"{current[first]!r} here)"
        )
    return "; ".join(parts)


def check_same_layout(saved: Dict, current: Dict) -> None:
    """Refuse, before anything changes, a state saved for other parameters or another parallel layout,
    naming what differs: the parameters (another model, other param groups), a parameter's local
    shape, or the parallel sizes (only then is the advice about TP/EP/DP sizes)."""
    if saved["sizes"] != current["sizes"]:
        raise ValueError(
            f"teonspeed: this optimizer state was saved in another parallel layout: saved with "
            f"{saved['sizes']}, loading into {current['sizes']}. A plain state dict holds each rank's shards "
            f"only and is not resharded; resume with the saved TP/EP sizes (and, under ZeRO-1/2, DP size), "
            f"or save and load through megatron.core.dist_checkpointing (teonspeed.megatron) or, under "
            f"FSDP2, torch.distributed.checkpoint (get/set_optimizer_state_dict), which reshard"
        )
    fix = (
        "load it into the model and param groups it was saved from (the same layers, the same "
        "requires_grad, the same param-group split)"
    )
    if len(saved["names"]) != len(current["names"]):
        every = names_differ([n for g in saved["names"] for n in g], [n for g in current["names"] for n in g])
        raise ValueError(
            f"teonspeed: this optimizer state was saved for {len(saved['names'])} param "
            f"group(s), this optimizer has {len(current['names'])}"
            + (f" ({every})" if every else "")
            + f"; {fix}"
        )
    for i, (a, b) in enumerate(zip(saved["names"], current["names"])):
        problem = names_differ(a, b)
        if problem is not None:
            raise ValueError(
                f"teonspeed: this optimizer state was saved for other parameters (param group "
                f"{i}: {problem}); {fix}"
            )
    for i, (names, a, b) in enumerate(zip(current["names"], saved["shapes"], current["shapes"])):
        # under ZeRO-1/2 a param group holds one flat partition of all its parameters
        labels = [repr(n) for n in names] if len(names) == len(b) else [f"param group {i}'s flat partition"]
        for label, x, y in zip(labels, a, b):
            if x != y:
                raise ValueError(
                    f"teonspeed: this optimizer state was saved for another shape of {label}: "
                    f"local shape {x} in the checkpoint, {y} here (another model size, or "
                    f"another DP/TP size: saved with {saved['sizes']}); {fix}"
                )


def replaced_parameters(opt) -> Optional[str]:
    """A step where no parameter the optimizer holds has a gradient while the model it was built from
    has gradients on parameters it does not hold: the model's parameters were re-created after the
    optimizer was built (FSDP2's fully_shard, parallelize_module and FSDP1 replace them), so the step would
    silently change nothing. Host-only; called only on a step without gradients."""
    model = opt._model() if opt._model is not None else None
    if model is None:
        return None
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    stray = next((n for n, p in model.named_parameters() if p.grad is not None and id(p) not in held), None)
    if stray is None:
        return None
    return (
        f"teonspeed: the model's parameter {stray!r} has a gradient but is not one this optimizer holds, "
        f"and none it holds has one: the model's parameters were replaced after the optimizer was built "
        f"(fully_shard / parallelize_module / FSDP re-create them); build the optimizer after sharding"
    )
