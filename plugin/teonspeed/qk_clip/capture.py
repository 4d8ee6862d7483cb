"""Where each attention layer's per-head maximum logit comes from during the forward, and what the clip
needs to know about the layer (`ClipLayer`).

- `LogitRecord`: the running maximum since the clip last took it, fed by a forward hook (every micro-batch
  of a step, and a recomputed forward, count). Only forwards in training mode are recorded: evaluation
  batches do not clip the weights.
- `TEMaxLogits`: Transformer Engine computes the maximum itself (megatron's TEDotProductAttention with
  return_max_logit keeps it in `current_max_attn_logits`); read and reset there, as Megatron's clip_qk does.
- Megatron's local attention: `watch_softmax` reads the logits DotProductAttention already materialises
  (the input of its softmax, no extra matmul); `watch_qk_inputs` recomputes them chunk by chunk from the
  query and key a core attention receives (e.g. an SDPA-based one, which never materialises them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, Tuple, Union

import torch

from .logits import head_max_logits, head_max_of_scores
from .rescale import RowPart


class LogitRecord:
    """Per-head running maximum of one layer's logits since the clip last took it (a device tensor)."""

    def __init__(self, num_heads: int) -> None:
        self.num_heads = num_heads
        self.value = None
        self.observed = 0  # forwards recorded, ever (lets an adapter check its hook was reached)

    def observe(self, head_max: torch.Tensor) -> None:
        head_max = head_max.detach()
        self.observed += 1
        self.value = head_max if self.value is None else torch.maximum(self.value, head_max)

    @property
    def fresh(self) -> bool:
        """A forward was recorded since the last take (a host-side flag: no device read)."""
        return self.value is not None

    def take(self, device: torch.device) -> torch.Tensor:
        value, self.value = self.value, None
        return _or_unseen(value, self.num_heads, device)


class TEMaxLogits:
    """Transformer Engine's own maximum, kept by megatron-core's TEDotProductAttention when its config sets
    qk_clip or log_max_attention_logit (TE >= 2.9 computes it inside the fused kernel)."""

    def __init__(self, core_attention: torch.nn.Module, num_heads: int) -> None:
        self.core_attention = core_attention
        self.num_heads = num_heads

    @property
    def fresh(self) -> bool:
        return getattr(self.core_attention, "current_max_attn_logits", None) is not None

    def take(self, device: torch.device) -> torch.Tensor:
        value = self.core_attention.current_max_attn_logits
        self.core_attention.current_max_attn_logits = None  # the next step starts afresh (Megatron: clip_qk)
        return _or_unseen(value, self.num_heads, device)


def _or_unseen(value, num_heads: int, device: torch.device) -> torch.Tensor:
    if value is None:  # no forward in training mode: nothing to clip (-inf never exceeds a threshold)
        return torch.full((num_heads,), float("-inf"), dtype=torch.float32, device=device)
    if value.numel() != num_heads:
        raise ValueError(
            f"teonspeed: QK-clip: an attention layer reported {value.numel()} per-head maxima "
            f"for its {num_heads} heads on this rank"
        )
    return value.float().reshape(num_heads).to(device)


Source = Union[LogitRecord, TEMaxLogits]


@dataclass
class ClipLayer:
    """One attention layer: where its maxima come from and the rows they rescale. `targets` pairs each
    weight (or bias) holding query/key rows with the parts of one unit (a query group; an MLA head)."""

    name: str
    source: Source
    num_heads: int
    """query heads on this rank (TP shard)"""
    heads_per_group: int
    """query heads per key head (GQA); 1 for MHA and MLA"""
    targets: List[Tuple[torch.nn.Parameter, Tuple[RowPart, ...]]]
    hooks: List[Any] = field(default_factory=list)

    def remove_hooks(self) -> None:
        for handle in self.hooks:
            handle.remove()
        self.hooks.clear()


def is_transformer_engine(module: torch.nn.Module) -> bool:
    return any(
        c.__module__.startswith("transformer_engine") or c.__name__.startswith("TEDotProductAttention")
        for c in type(module).__mro__
    )


def _mask_type_is_causal(mask_type) -> bool:
    return getattr(mask_type, "name", mask_type) == "causal"  # megatron's AttnMaskType, not imported here


def watch_softmax(softmax: torch.nn.Module, record: LogitRecord):
    """megatron-core's FusedScaleMaskSoftmax gets the scores Q·Kᵀ·softmax_scale [b, np, sq, sk] and multiplies
    them by its `scale` (the layer-scaling coefficient) before masking: the logits, with no extra matmul.
    Masking as its torch path does: the given mask (True = left out), else causal for a causal layer."""

    def hook(module, args):
        if not module.training:
            return
        scores, mask = args[0], args[1] if len(args) > 1 else None
        causal = mask is None and _mask_type_is_causal(module.attn_mask_type) and scores.size(2) > 1
        record.observe(head_max_of_scores(scores, float(module.scale or 1.0), causal=causal, blocked=mask))

    return softmax.register_forward_pre_hook(hook)


def watch_qk_inputs(core_attention: torch.nn.Module, record: LogitRecord):
    """A core attention called as megatron's are, (query [sq, b, np, hn], key [sk, b, ng, hn], value,
    attention_mask, attn_mask_type=...): recompute its logits from query and key, chunk by chunk, with its
    softmax_scale (1/√hn when None). Mask: the given one (True = left out), else causal per attn_mask_type."""

    def hook(module, args, kwargs):
        if not module.training:
            return
        if kwargs.get("packed_seq_params") is not None:
            raise ValueError(
                "teonspeed: QK-clip cannot recompute the logits of packed sequences "
                "(packed_seq_params) outside Transformer Engine; use TEDotProductAttention with "
                "log_max_attention_logit=True"
            )
        query, key = args[0], args[1]
        mask = args[3] if len(args) > 3 else kwargs.get("attention_mask")
        mask_type = kwargs.get("attn_mask_type") or getattr(module, "attn_mask_type", "causal")
        scale = getattr(module, "softmax_scale", None) or 1.0 / math.sqrt(query.size(-1))
        causal = mask is None and _mask_type_is_causal(mask_type) and query.size(0) > 1
        q, k = query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3)  # [b, n, s, d] views
        record.observe(head_max_logits(q, k, scale, causal=causal, blocked=mask))

    return core_attention.register_forward_pre_hook(hook, with_kwargs=True)
