"""The clip of one model: after each optimizer step, reduce the per-head maxima the forward recorded over the
ranks that saw parts of the batch, turn them into row factors (rescale.py) and write them where the
optimizer keeps the weights (weights.py).

Cost per step: one all-reduce (MAX) of one fp32 per local query head over the data(-and-context)-parallel
group, none in a single process; no host read (η is computed on the device and a factor of 1 is exact, so
nothing needs deciding on the host). `max_logit` stays on the device for whoever logs it.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
import torch.distributed as dist

from .capture import ClipLayer
from .rescale import group_eta, row_scale
from .weights import RowWriter, Scales, stepped_counts


class QKClip:
    """QK-clip over `layers`. With an optimizer it runs by itself after every step() (torch's step hooks);
    without one call `step()` after the optimizer's. log_only: reduce and report, never rescale."""

    def __init__(
        self,
        layers: List[ClipLayer],
        *,
        threshold: Optional[float],
        alpha: float,
        log_only: bool,
        group=None,
        optimizer=None,
    ) -> None:
        self.layers = layers
        self.threshold, self.alpha, self.log_only = threshold, alpha, log_only
        self.group = group
        self.optimizer = optimizer
        self.max_logit: Optional[torch.Tensor] = None
        """the largest logit of the last reduced step over this rank's layers (0-dim fp32, on the device)"""
        self.head_max: List[torch.Tensor] = []
        """per layer, its heads' maxima of the last reduced step (after the data-parallel reduction)"""
        self._writer = RowWriter(optimizer)
        self._scales: Optional[Scales] = None
        self._pending: set = set()
        self._counts = None
        self._handles = []
        if optimizer is not None:
            self._handles = [
                optimizer.register_step_pre_hook(self._before_step),
                optimizer.register_step_post_hook(self._after_step),
            ]

    # -- the reduction and the factors ------------------------------------------------------------
    @property
    def fresh(self) -> bool:
        """A training forward was recorded since the last reduction (host flags: the same on every rank of
        the reduction group, which run the same forwards)."""
        return any(layer.source.fresh for layer in self.layers)

    def reduce(self) -> Optional[Scales]:
        """Take every layer's maxima (resetting them), reduce MAX over the group, set max_logit/head_max and
        return the row factors (None in log-only mode). A collective: every rank of the group calls it."""
        device = self._device()
        maxima = torch.cat([layer.source.take(device) for layer in self.layers])
        if self.group is not None and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=self.group)
        self.head_max = list(maxima.split([layer.num_heads for layer in self.layers]))
        self.max_logit = maxima.max()
        if self.log_only:
            return None
        scales: Scales = []
        for layer, head_max in zip(self.layers, self.head_max):
            eta = group_eta(head_max, layer.heads_per_group, self.threshold)
            scales += [(p, row_scale(eta, parts, self.alpha)) for p, parts in layer.targets]
        return scales

    def _device(self) -> torch.device:
        for layer in self.layers:
            for p, _ in layer.targets:
                return p.device
        return torch.device("cpu")

    # -- without an optimizer -------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> Optional[torch.Tensor]:
        """Reduce and rescale the model's parameters in place (after the optimizer's step); returns
        max_logit. For optimizers attached with `optimizer=`, this happens inside their step()."""
        if self.optimizer is not None:
            raise RuntimeError(
                "teonspeed: this QK-clip runs inside its optimizer's step(); do not call step()"
            )
        if self.fresh:
            scales = self.reduce()
            if scales:
                self._writer.write(scales, self._writer.keys())
        return self.max_logit

    # -- inside the optimizer's step ------------------------------------------------------------
    def _before_step(self, optimizer, args, kwargs) -> None:
        self._counts = stepped_counts(optimizer)

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        if self.fresh:  # the first step() call after a training forward
            self._scales = self.reduce()
            self._pending = self._writer.keys()
        now = self._pending & self._writer.keys_in_call()
        before, after = self._counts, stepped_counts(optimizer)
        stepped = before is None or before != after  # a skipped (non-finite) step leaves the weights alone
        if self._scales and now and stepped:
            self._writer.write(self._scales, now)
        self._pending -= now
        if not self._pending:
            self._scales = None

    def detach(self) -> None:
        """Stop capturing and clipping (the hooks are removed; the weights keep what was done)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for layer in self.layers:
            layer.remove_hooks()
        if self.optimizer is not None and getattr(self.optimizer, "qk_clip", None) is self:
            self.optimizer.qk_clip = None


Models = Union[torch.nn.Module, Sequence[torch.nn.Module]]
