"""What a Newton–Schulz FLOP and an exchanged byte cost on a cluster: the constants every placement
decision of the step is made with (owner-compute vs replicated under plain data parallelism, moving a
job off an overloaded ZeRO partition) and that `bench/costmodel.py` predicts the step with.

The decisions must be identical on every rank, so they are made from these constants (the same config on
every rank), never from timings measured at run time. The defaults are H100 SXM datasheet values with
400 Gb/s InfiniBand per GPU; a user on other hardware overrides fields with the `cluster` option.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional


@dataclass(frozen=True)
class ClusterProfile:
    peak_flops: float = 989e12
    """bf16 dense tensor-core peak per GPU (H100 SXM)."""
    ns_efficiency: float = 0.45
    """Achieved fraction of peak for the Newton–Schulz matmuls (batched same-shape stacks)."""
    gpus_per_node: int = 8
    nvlink_bw: float = 450e9
    """Bytes/s per GPU per direction inside a node (NVLink 4)."""
    ib_bw: float = 50e9
    """Bytes/s per GPU per direction across nodes (400 Gb/s NDR InfiniBand per GPU)."""
    latency_intra: float = 15e-6
    """Seconds per collective inside a node."""
    latency_inter: float = 40e-6
    """Seconds per collective that leaves the node."""
    latency_per_peer: float = 0.5e-6
    """Extra seconds per peer of a collective (NCCL issues one send/recv pair, or one ring hop, per peer)."""

    def ns_seconds(self, flops: float) -> float:
        return flops / (self.peak_flops * self.ns_efficiency)

    def latency(self, ranks_spanned: int) -> float:
        """Seconds of one collective over `ranks_spanned` consecutive ranks, without the per-peer part."""
        return self.latency_intra if ranks_spanned <= self.gpus_per_node else self.latency_inter

    def collective_latency(self, ranks: int, nodes: int) -> float:
        """Seconds of fixed cost of one collective over `ranks` ranks spread over `nodes` nodes."""
        return (self.latency_intra if nodes <= 1 else self.latency_inter) + self.latency_per_peer * (
            ranks - 1
        )

    def bandwidth(self, nodes: int) -> float:
        """Bytes/s per GPU of a collective whose ranks lie on `nodes` nodes."""
        return self.nvlink_bw if nodes <= 1 else self.ib_bw


def adamw_bytes(
    numel: int, dp_size: int, grad_itemsize: int, param_itemsize: int = 0, gradient_allreduce: bool = True
) -> int:
    """Bytes AdamW moves per rank and direction for `numel` local elements over `dp_size` data-parallel ranks
    (ring collectives): the gradients' reduction, an all-reduce (2(D-1)/D of them) or a reduce-scatter
    ((D-1)/D), plus, where the optimizer state is partitioned, the parameters' all-gather after the step
    ((D-1)/D at `param_itemsize`; 0 under plain data parallelism). The yardstick of
    `comm_stats.adamw_bytes`."""
    per_element = (2 if gradient_allreduce else 1) * grad_itemsize + param_itemsize
    return numel * per_element * (dp_size - 1) // dp_size


def sharded_adamw_bytes(
    numel: int,
    shard_size: int,
    grad_itemsize: int,
    param_itemsize: int,
    replicate_size: int = 1,
    param_gathers: int = 2,
) -> int:
    """Bytes AdamW moves per rank and direction for `numel` local elements when the parameters themselves
    are sharded over `shard_size` ranks (DeepSpeed ZeRO-3, PyTorch FSDP2; ring collectives): the gradients'
    reduce-scatter ((S-1)/S), the all-reduce of the rank's 1/S over `replicate_size` HSDP replicas
    (2(R-1)/R of it), and the parameters' all-gather `param_gathers` times per step (2: forward, and again
    in backward after resharding, ZeRO-3's and fully_shard's default). The yardstick of
    `comm_stats.adamw_bytes` in these layouts."""
    s, r = shard_size, replicate_size
    grads = numel * grad_itemsize * (s - 1) // s + 2 * (numel // s) * grad_itemsize * (r - 1) // r
    return grads + param_gathers * (numel * param_itemsize * (s - 1) // s)


FIELDS = tuple(f.name for f in dataclasses.fields(ClusterProfile))


def cluster_profile(overrides: Optional[Mapping[str, Any]] = None) -> ClusterProfile:
    """The default profile with the user's `cluster` option applied (unknown fields named)."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(FIELDS))
    if unknown:
        raise ValueError(
            f"teonspeed: option 'cluster' has unknown field(s) {unknown}; valid fields: {', '.join(FIELDS)}"
        )
    bad = [
        k
        for k, v in overrides.items()
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0
    ]
    if bad:
        raise ValueError(f"teonspeed: option 'cluster' fields {bad} must be positive finite numbers")
    return ClusterProfile(**overrides)
