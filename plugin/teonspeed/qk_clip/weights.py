"""Where the optimizer keeps the rows QK-clip rescales, so that the clip lands on the values the next step
and the next forward start from, and every replica stays identical.

- No optimizer, or one that steps the model's own parameters: the parameters.
- teonspeed's optimizer on whole (or TP-sharded) tensors: the tensor it steps for the parameter (the fp32
  master where DeepSpeed's or Megatron's mixed-precision wrapper rebound it; the wrapper copies it into the
  bf16/fp16 parameter after the step, as it does with the update).
- ZeRO-1/2 (DeepSpeed): the parameter's elements inside this rank's flat fp32 partition of each param group
  stepped by this call (DeepSpeed steps one group per call); DeepSpeed's all-gather then spreads them.
- Megatron's distributed optimizer: the parameter's elements in this rank's partition of every bucket (the
  fp32 master, then copied into the bf16 partition the parameter all-gather spreads).
Every DP rank rescales its own elements with the same (reduced) factors: replicas stay identical.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Set, Tuple

import torch

from .rescale import scale_flat_rows, scale_rows

Scales = List[Tuple[torch.nn.Parameter, torch.Tensor]]  # (parameter, one factor per row)
WHOLE = "whole"  # the key of "every tensor" where nothing is partitioned


class RowWriter:
    """Writes row factors into wherever `optimizer` keeps the parameters (duck-typed on teonspeed's
    OrthoOptimizer: `name_of`, `parameters_by_name` (the rebound tensors), and what its step updates,
    `_tensors`: the parameters, DeepSpeed's flat partitions (`partitions`) or Megatron's bucket shards
    (`buckets`))."""

    def __init__(self, optimizer) -> None:
        self.optimizer = optimizer
        self.teonspeed = optimizer is not None and hasattr(optimizer, "parameters_by_name")

    def _stepped(self):
        return getattr(self.optimizer, "_tensors", None) if self.teonspeed else None

    def _flat(self) -> Dict:
        return dict(getattr(self._stepped(), "partitions", None) or {})

    def keys(self) -> Set:
        """Everything one clip must reach: each flat ZeRO partition (stepped one per call), else WHOLE."""
        flat = self._flat()
        return set(flat) if flat else {WHOLE}

    def keys_in_call(self) -> Set:
        """What the current step() call stepped: under ZeRO the partitions of the groups it was handed."""
        flat = self._flat()
        if not flat:
            return {WHOLE}
        firsts = (g["params"][0] for g in self.optimizer.param_groups if g["params"])
        return {id(p) for p in firsts if id(p) in flat}

    def write(self, scales: Scales, keys: Iterable) -> None:
        keys = set(keys)
        if not self.teonspeed:
            for p, scale in scales:
                scale_rows(p.data, scale)
            return
        opt = self.optimizer
        by_name, missing = {}, []
        for p, scale in scales:
            try:
                by_name[opt.name_of(p)] = scale
            except ValueError:
                missing.append(p)
        if missing:
            shape = tuple(missing[0].shape)
            raise ValueError(
                f"teonspeed: QK-clip: a query/key weight of shape {shape} is not among the "
                f"optimizer's parameters (is it frozen, or in another optimizer?)"
            )
        buckets = getattr(self._stepped(), "buckets", None)
        if buckets:
            self._write_buckets(buckets, by_name)
        elif self._flat():
            self._write_flat(self._flat(), by_name, keys)
        else:
            for name, scale in by_name.items():
                scale_rows(opt.parameters_by_name[name], scale)

    def _write_flat(self, partitions: Dict, by_name: Dict[str, torch.Tensor], keys: Set) -> None:
        for group in self.optimizer.param_groups:
            flat = group["params"][0] if group["params"] else None
            partition = partitions.get(id(flat)) if flat is not None else None
            if partition is None or id(flat) not in keys:
                continue
            start, end = partition.start, partition.start + partition.partition_size
            for e in partition.entries:
                scale = by_name.get(e.name)
                lo, hi = max(e.offset, start), min(e.offset + e.numel, end)
                if scale is not None and lo < hi:
                    mine = flat.data[lo - start : hi - start]
                    scale_flat_rows(mine, lo - e.offset, _row_len(e.shape), scale)

    @staticmethod
    def _write_buckets(buckets, by_name: Dict[str, torch.Tensor]) -> None:
        for shard in buckets:
            for e, lo, hi in shard.slices():
                scale = by_name.get(e.name)
                if scale is None:
                    continue
                first = shard.partition.start + lo - e.offset
                scale_flat_rows(shard.weights[lo:hi], first, _row_len(e.shape), scale)
                if shard.master is not None:  # the bf16 partition DDP all-gathers, from the clipped master
                    shard.param[lo:hi].copy_(shard.master[lo:hi])


def _row_len(shape: Tuple[int, ...]) -> int:
    n = 1
    for s in shape[1:]:
        n *= s
    return n


def stepped_counts(optimizer) -> Optional[List]:
    """The param groups' step counters (teonspeed's optimizer counts per group and leaves them alone on a
    skipped step); None for an optimizer without them."""
    if optimizer is None:
        return None
    counts = [g.get("step") for g in optimizer.param_groups]
    return counts if all(isinstance(c, int) for c in counts) else None
