"""megatron-core's attention layers, as QK-clip sees them (found by their attributes: megatron is not
imported here).

- SelfAttention: `linear_qkv` is fused per query group, [q heads of the group; k; v] (fused.qkv_layout),
  and under tensor parallelism each rank holds whole groups: this rank's heads are exactly the rows it
  holds, so it clips them alone (no exchange).
- MultiLatentAttention: `linear_q_proj` (or `linear_q_up_proj` with q_lora_rank) holds per head [no-RoPE;
  RoPE] query rows, `linear_kv_up_proj` per head [no-RoPE key; value] rows; the RoPE key comes out of
  `linear_kv_down_proj`, shared by all heads, and is not touched.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .capture import (
    ClipLayer,
    LogitRecord,
    TEMaxLogits,
    is_transformer_engine,
    watch_qk_inputs,
    watch_softmax,
)
from .rescale import FULL, K, NONE, Q, RowPart


def is_self_attention(m: torch.nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("core_attention", "linear_qkv", "num_query_groups_per_partition"))


def is_mla(m: torch.nn.Module) -> bool:
    return hasattr(m, "core_attention") and hasattr(m, "linear_kv_up_proj")


def megatron_layers(model: torch.nn.Module, prefix: str = "") -> List[ClipLayer]:
    layers = []
    for name, m in model.named_modules():
        if is_self_attention(m):
            layers.append(_self_attention(prefix + name, m))
        elif is_mla(m):
            layers.append(_mla(prefix + name, m))
    return layers


def _self_attention(name: str, m: torch.nn.Module) -> ClipLayer:
    if _normalises(getattr(m, "q_layernorm", None)) or _normalises(getattr(m, "k_layernorm", None)):
        raise ValueError(
            f"teonspeed: QK-clip on {name}: qk_layernorm normalises every query and key head, "
            f"which undoes a rescale of their rows (and bounds the logits already); drop "
            f"qk_clip for this model or set qk_layernorm=False"
        )
    heads, groups = m.num_attention_heads_per_partition, m.num_query_groups_per_partition
    head_dim = m.hidden_size_per_attention_head
    parts = (RowPart(heads // groups * head_dim, Q), RowPart(head_dim, K), RowPart(head_dim, NONE))
    targets = _targets(name, m.linear_qkv, parts, groups)
    return _layer(name, m.core_attention, heads, heads // groups, targets)


def _normalises(norm) -> bool:
    return norm is not None and type(norm).__name__ != "IdentityOp"  # megatron's stand-in for "no norm"


def _mla(name: str, m: torch.nn.Module) -> ClipLayer:
    c = m.config
    heads = m.num_attention_heads_per_partition
    q_proj = m.linear_q_up_proj if getattr(c, "q_lora_rank", None) is not None else m.linear_q_proj
    q_parts = (RowPart(c.qk_head_dim, Q), RowPart(c.qk_pos_emb_head_dim, FULL))
    kv_parts = (RowPart(c.qk_head_dim, K), RowPart(c.v_head_dim, NONE))
    targets = _targets(name, q_proj, q_parts, heads) + _targets(name, m.linear_kv_up_proj, kv_parts, heads)
    return _layer(name, m.core_attention, heads, 1, targets)


def _targets(
    name: str, linear: torch.nn.Module, parts: Tuple[RowPart, ...], units: int
) -> List[Tuple[torch.nn.Parameter, Tuple[RowPart, ...]]]:
    """The linear's weight and (if it has one) bias: both hold one value per output row, so both are
    rescaled (megatron's clip_qk leaves a bias alone, and then the logits do not scale by exactly η)."""
    rows = units * sum(p.rows for p in parts)
    out = []
    for pname in ("weight", "bias"):
        p = getattr(linear, pname, None)
        if not isinstance(p, torch.nn.Parameter):
            continue
        if p.size(0) != rows:
            raise ValueError(
                f"teonspeed: QK-clip on {name}: {pname} has {p.size(0)} rows on this rank, "
                f"expected {units} x {[(x.rows, x.factor) for x in parts]} = {rows}"
            )
        out.append((p, parts))
    return out


def _layer(
    name: str, core_attention: torch.nn.Module, heads: int, heads_per_group: int, targets
) -> ClipLayer:
    """The layer with its source of maxima: Transformer Engine's own, the local softmax's input, or the query
    and key any other core attention receives."""
    if is_transformer_engine(core_attention):
        if not hasattr(core_attention, "current_max_attn_logits"):
            raise ValueError(
                f"teonspeed: QK-clip on {name}: Transformer Engine's attention computes the max "
                f"logit only when the model's TransformerConfig sets "
                f"log_max_attention_logit=True (or qk_clip) before the model is built; set "
                f"log_max_attention_logit=True (and leave Megatron's own qk_clip off, teonspeed "
                f"clips)"
            )
        return ClipLayer(name, TEMaxLogits(core_attention, heads), heads, heads_per_group, targets)
    record = LogitRecord(heads)
    softmax = getattr(core_attention, "scale_mask_softmax", None)
    if softmax is not None:
        if getattr(softmax, "window_size", None) is not None:
            raise ValueError(
                f"teonspeed: QK-clip on {name}: sliding-window attention (window_size) is not "
                f"captured by the local DotProductAttention path; use Transformer Engine's "
                f"attention"
            )
        hook = watch_softmax(softmax, record)
    else:
        hook = watch_qk_inputs(core_attention, record)
    return ClipLayer(name, record, heads, heads_per_group, targets, [hook])


def data_context_parallel_group() -> Optional[object]:
    """Megatron's data-parallel group with context parallelism: every rank that saw a part of the batch of
    this rank's heads (Megatron's clip_qk reduces over the same group). None when megatron's parallel state
    is not initialised."""
    import sys

    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is None or not ps.model_parallel_is_initialized():
        return None
    return ps.get_data_parallel_group(with_context_parallel=True)
