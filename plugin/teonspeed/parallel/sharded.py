"""Sharded pieces: where the data-parallel ranks hold each parameter's elements, for every layout the
partition planner (`zero_planner.plan_pieces`) and its exchange (`flat.FlatStep`) serve.

A layout is a `PieceLayout`: per parameter (or its TP shard: "local" always means this TP rank's tensor),
the `Hold`s of its flattened elements, i.e. which data-parallel index holds which range and where in which
of its stepped tensors. The three ways libraries cut parameters, each a constructor here:

- `flat_holds`: ZeRO-1/2 and Megatron's distributed optimizer, one flat buffer (or several buckets) of
  parameters at offsets, cut into equal partitions (the partition of bucket b is stepped tensor b);
- `even_split_holds`: DeepSpeed ZeRO-3, every parameter flattened and split evenly over the ranks,
  ceil(numel / dp) elements each (the last padded), rank d's stepped tensor the concatenation of its slice
  of every parameter of the sub-group;
- `dim0_chunk_holds`: PyTorch FSDP2, each parameter cut on dim 0 as `torch.chunk` does (uneven, trailing
  ranks possibly empty), every parameter its own stepped tensor; with HSDP, several ranks (replicas) hold
  the same chunk.
Nothing here touches process groups: every rank derives every rank's holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import torch.distributed as dist

from .zero_partition import Hold

Holds = Dict[str, Tuple[Hold, ...]]  # parameter name -> the holds of its flattened local elements


@dataclass
class PieceLayout:
    """What a partition runner plans over: the holds of every parameter it covers (in the order units are
    exchanged), their local shapes, and the data-parallel group whose indices the holds name (this rank
    is `dp_rank` of `dp_size`). `flat_sizes`: flat layouts' partition size per bucket (else ())."""

    holds: Holds
    shapes: Dict[str, Tuple[int, ...]]
    dp_group: Optional[dist.ProcessGroup]
    dp_rank: int
    dp_size: int
    flat_sizes: Tuple[int, ...] = ()

    def names(self) -> List[str]:
        return list(self.holds)

    def keys(self, holder: Optional[int] = -1) -> List[Hashable]:
        """The stepped tensors this rank (or data-parallel index `holder`; None: any) holds pieces in, in
        order of first use."""
        holder = self.dp_rank if holder == -1 else holder
        seen: Dict[Hashable, None] = {}
        for holds in self.holds.values():
            for h in holds:
                if holder is None or h.holder == holder:
                    seen.setdefault(h.key, None)
        return list(seen)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def flat_holds(
    places: Dict[str, Tuple[int, int]],
    shapes: Dict[str, Tuple[int, ...]],
    partition_sizes: Sequence[int],
    dp_size: int,
) -> Holds:
    """Flat buffers cut into `dp_size` equal partitions: places gives each parameter's (bucket, offset in
    the bucket); partition d of bucket b holds [d·size_b, (d+1)·size_b) of it, stepped as tensor `b`."""
    out: Holds = {}
    for name, (bucket, offset) in sorted(places.items(), key=lambda item: item[1]):
        size, end = partition_sizes[bucket], offset + _numel(shapes[name])
        if end > dp_size * size:
            raise ValueError(
                f"teonspeed: {name!r} lies outside the flat partitions ({dp_size} x {size} elements); the "
                f"ZeRO layout given to the optimizer is wrong"
            )
        holds = []
        for d in range(dp_size):
            lo, hi = max(offset, d * size), min(end, (d + 1) * size)
            if lo < hi:
                holds.append(Hold(d, lo - offset, hi - offset, bucket, lo - d * size))
        out[name] = tuple(holds)
    return out


def even_split_holds(
    entries: Sequence[Tuple[str, Tuple[int, ...]]], dp_size: int, key: Hashable = 0
) -> Holds:
    """DeepSpeed ZeRO-3: each parameter (in sub-group order) split into `dp_size` slices of
    ceil(numel / dp_size) elements (DeepSpeed's `partition_numel`), rank d holding [d·s, min((d+1)·s,
    numel)); rank d's fp32 partition `key` is its slices end to end, padding included."""
    out: Holds = {}
    at = 0
    for name, shape in entries:
        numel = _numel(shape)
        s = -(-numel // dp_size)
        out[name] = tuple(
            Hold(d, d * s, min((d + 1) * s, numel), key, at) for d in range(dp_size) if d * s < numel
        )
        at += s
    return out


def dim0_chunk_holds(
    name: str, shape: Tuple[int, ...], holders: Sequence[Sequence[int]], key: Optional[Hashable] = None
) -> Holds:
    """PyTorch FSDP2: parameter `name` (local shape `shape`, e.g. a TP shard) cut on dim 0 into
    len(holders) chunks as torch.chunk cuts it (ceil(rows / n) rows each, the trailing ones shorter or
    empty); holders[s]: the data-parallel indices holding chunk s (one, or its HSDP replicas). Each rank's
    chunk is its own stepped tensor `key` (default: the parameter's name), from element 0."""
    rows, row = shape[0], _numel(shape[1:])
    step = -(-rows // len(holders)) if rows else 0
    out = []
    for s, ranks in enumerate(holders):
        lo, hi = min(s * step, rows) * row, min((s + 1) * step, rows) * row
        if lo < hi:
            out += [Hold(d, lo, hi, name if key is None else key, 0) for d in ranks]
    return {name: tuple(out)}
