"""Who computes which group: a deterministic cost-balanced assignment, identical on every rank."""

from __future__ import annotations

import heapq
from typing import List, Sequence, Tuple


def ns_flops(shape: Tuple[int, int], steps: int) -> float:
    """FLOPs of one quintic iteration run on (m × n), oriented wide (m ≤ n): X Xᵀ (2m²n), A² (2m³),
    B X (2m²n), times the steps. Used only to balance work, so the exact constant does not matter."""
    m, n = sorted(shape)
    return steps * (4.0 * m * m * n + 2.0 * m**3)


def assign_owners(costs: Sequence[float], num_ranks: int) -> List[int]:
    """Longest-processing-time-first: the next most expensive group goes to the least loaded rank
    (ties: lower group index first, lower rank first). Returns the owner of each group."""
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    heap = [(0.0, r) for r in range(num_ranks)]
    owners = [0] * len(costs)
    for i in order:
        load, rank = heapq.heappop(heap)
        owners[i] = rank
        heapq.heappush(heap, (load + costs[i], rank))
    return owners
