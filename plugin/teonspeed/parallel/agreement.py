"""The step's one collective and one host read: every rank sharing the step agrees, before anything
changes, that all gradients are finite, that they will run the same plan, and (when the step clips) on
the global gradient norm."""

from __future__ import annotations

import struct
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from .runner import StepCheck, StepVerdict
from .topology import StepGroup

INT64_MAX = 2**63 - 1


class PlanMismatch(RuntimeError):
    """Ranks that share a step would run different plans (different parameters have gradients)."""


def agree(check: StepCheck, step_group: Optional[StepGroup], topology_names) -> StepVerdict:
    """ONE all-reduce (MIN over the step group) and ONE host read per step carry the non-finite
    decision, every rank's plan digest and, when the step clips, every rank's share of the squared
    gradient norm: slot 0 the finite flag, then one slot per (topology, rank) holding that rank's
    digest, then one slot per rank holding the bits of its float64 norm share (INT64_MAX, the MIN
    identity, everywhere else). The shares are summed on the host in rank order, so every rank
    gets the same norm to the bit."""
    keys = sorted(topology_names)
    sg = step_group or StepGroup(None, 1, 0, tuple((k, (0,)) for k in keys))
    norm_at = 1 + len(keys) * sg.size
    size = norm_at + (sg.size if check.norm_sq is not None else 0)
    flags = torch.full((size,), INT64_MAX, dtype=torch.int64, device=check.finite.device)
    flags[0].copy_(check.finite)
    for i, key in enumerate(keys):
        flags[1 + i * sg.size + sg.rank] = check.digests.get(key, 0)
    if check.norm_sq is not None:
        flags[norm_at + sg.rank : norm_at + sg.rank + 1].copy_(
            check.norm_sq.to(torch.float64).reshape(1).view(torch.int64)
        )
    if sg.group is not None:
        dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=sg.group)
    values = flags.tolist()  # the step's one host read
    for key, members in sg.work_groups:
        seen = {values[1 + keys.index(key) * sg.size + j] for j in members}
        if len(seen) > 1:  # every rank sees the same values, so every rank raises here
            _raise_plan_mismatch(key, members, values, keys, sg, check)
    norm_sq = None
    if check.norm_sq is not None:
        norm_sq = sum(struct.unpack("<d", struct.pack("<q", v))[0] for v in values[norm_at:])
    return bool(values[0]), norm_sq


def _raise_plan_mismatch(key, members, values, keys, sg: StepGroup, check: StepCheck) -> None:
    # Only now, a second (diagnostic) collective: every rank's plan, to name the first difference.
    lines: List[Optional[Dict[str, List[str]]]] = [None] * sg.size
    mine = check.plan_lines()
    if sg.group is not None:
        dist.all_gather_object(lines, mine, group=sg.group)
    else:
        lines = [mine]
    digest = [values[1 + keys.index(key) * sg.size + j] for j in members]
    a = members[0]
    b = next(j for j, d in zip(members, digest) if d != digest[0])
    la, lb = lines[a].get(key, []), lines[b].get(key, [])
    first = next((i for i, (x, y) in enumerate(zip(la, lb)) if x != y), min(len(la), len(lb)))
    what_a = la[first] if first < len(la) else "(nothing)"
    what_b = lb[first] if first < len(lb) else "(nothing)"
    raise PlanMismatch(
        f"teonspeed: the ranks sharing this optimizer step disagree on its plan ({key} parameters): rank "
        f"{sg.ranks[a]} has {what_a!r} where rank {sg.ranks[b]} has {what_b!r}. Usually a parameter got a "
        f"gradient on some ranks and not on others (an unused layer, a branch taken on one rank only); "
        f"the owners and message layouts would diverge and corrupt the weights. Give every rank the same "
        f"set of gradients (e.g. zero-fill unused parameters' grads on every rank, or set "
        f"requires_grad=False on all of them)"
    )
