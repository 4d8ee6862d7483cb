"""ZeRO-style flat partitions: a param group flattened into one buffer and cut into equal data-parallel
partitions, each rank holding one (DeepSpeed ZeRO-1/2 and its BF16 optimizer hand the inner optimizer
exactly that). The momentum is element-wise and runs on the partition; the orthogonalization needs
whole matrices, so the partitions of the momentum direction are all-gathered over DP, viewed as the
parameters again, and after the (owner-computed) transform each rank keeps its partition's slice.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist


@dataclass
class FlatEntry:
    name: str
    offset: int  # element offset in the flat (unpartitioned) buffer
    shape: Tuple[int, ...]

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


@dataclass
class FlatPartition:
    entries: List[FlatEntry]
    partition_size: int
    dp_group: Optional[dist.ProcessGroup]
    dp_rank: int
    dp_size: int

    @property
    def start(self) -> int:
        return self.dp_rank * self.partition_size

    def names(self) -> List[str]:
        return [e.name for e in self.entries]

    def all_gather(self, local: torch.Tensor) -> Tuple[torch.Tensor, int]:
        """The whole flat buffer from every rank's partition; also returns the bytes received."""
        if self.dp_size == 1:
            return local, 0
        pieces = [torch.empty_like(local) for _ in range(self.dp_size)]
        dist.all_gather(pieces, local.contiguous(), group=self.dp_group)
        return torch.cat(pieces), local.numel() * local.element_size() * (self.dp_size - 1)

    def unflatten(self, full: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {e.name: full[e.offset:e.offset + e.numel].view(e.shape) for e in self.entries}

    def local_slice(self, tensors: Dict[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """This rank's partition of the flat buffer holding `tensors` (zeros where a name is absent)."""
        out = torch.zeros_like(like)
        lo, hi = self.start, self.start + self.partition_size
        for e in self.entries:
            a, b = max(lo, e.offset), min(hi, e.offset + e.numel)
            if a < b and e.name in tensors:
                out[a - lo:b - lo].copy_(tensors[e.name].reshape(-1)[a - e.offset:b - e.offset])
        return out
