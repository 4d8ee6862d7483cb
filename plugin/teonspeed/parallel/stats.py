"""What the optimizer's own communication and compute cost on this rank, counted as it happens."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CommStats:
    """Bytes this rank sent and received in the optimizer's collectives (last step, and in total)."""

    sent: int = 0
    received: int = 0
    total_sent: int = 0
    total_received: int = 0
    flops: float = 0.0  # transform FLOPs (estimated) computed on this rank in the last step
    adamw_bytes: int = 0
    """Last step, for comparison: what AdamW moves per rank and direction for the same matrices in the
    same layout (the data-parallel all-reduce of their gradients, paid by every optimizer)."""

    def start_step(self) -> None:
        self.sent = self.received = self.adamw_bytes = 0
        self.flops = 0.0

    def add(self, sent: int, received: int) -> None:
        self.sent += sent
        self.received += received
        self.total_sent += sent
        self.total_received += received
