"""Fused weights and their parts: Megatron's fused QKV (per-query-group interleaved, GQA aware), the
gated-MLP fc1 ([gate; up]) and MLA's kv up-projection (per-head [k_nope, v]).

A `FusedLayout` describes the rows of a fused weight as repeating *units* (a query group, a head)
made of named parts of fixed row counts, or, without unit sizes, as equal contiguous blocks. Because
Megatron's tensor parallelism gives each rank whole units (whole query groups; for fc1, stride 2 gives
each rank its own [gate_r; up_r]), the same layout splits a TP shard as well as the full matrix, and
each part of a shard is exactly that rank's shard of the part.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

import torch

LAYOUT_ATTR = "teon_fused_layout"


@dataclass(frozen=True)
class FusedLayout:
    part_names: Tuple[str, ...]
    unit_sizes: Optional[Tuple[int, ...]] = None  # rows of each part per unit; None = equal blocks

    def part_rows(
        self, num_rows: int, device: Optional[torch.device] = None
    ) -> List[Tuple[str, torch.Tensor]]:
        """Row indices of each part in a (local or full) fused weight with `num_rows` rows, on `device`
        (the device of the weight they index; made once per layout, size and device)."""
        return _part_rows(self, num_rows, torch.device("cpu") if device is None else torch.device(device))

    def _rows(self, num_rows: int, device: torch.device) -> List[Tuple[str, torch.Tensor]]:
        if self.unit_sizes is None:
            k = len(self.part_names)
            if num_rows % k:
                raise ValueError(
                    f"fused weight with {num_rows} rows cannot be split into {k} equal parts "
                    f"{self.part_names}"
                )
            size = num_rows // k
            return [
                (name, torch.arange(i * size, (i + 1) * size, device=device))
                for i, name in enumerate(self.part_names)
            ]
        unit = sum(self.unit_sizes)
        if num_rows % unit:
            raise ValueError(
                f"fused weight with {num_rows} rows is not a whole number of units of "
                f"{dict(zip(self.part_names, self.unit_sizes))} rows"
            )
        starts = torch.arange(num_rows // unit, device=device).unsqueeze(1) * unit
        out, offset = [], 0
        for name, size in zip(self.part_names, self.unit_sizes):
            out.append((name, (starts + offset + torch.arange(size, device=device)).reshape(-1)))
            offset += size
        return out


@lru_cache(maxsize=512)
def _part_rows(layout: FusedLayout, num_rows: int, device: torch.device) -> List[Tuple[str, torch.Tensor]]:
    return layout._rows(num_rows, device)


def qkv_layout(num_heads: int, num_query_groups: int, head_dim: int) -> FusedLayout:
    """Megatron `linear_qkv`: per query group, its query heads then one key and one value head."""
    if num_heads % num_query_groups:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_query_groups={num_query_groups}")
    q_rows = num_heads // num_query_groups * head_dim
    return FusedLayout(("q", "k", "v"), (q_rows, head_dim, head_dim))


def gated_mlp_layout(gate: str = "gate", up: str = "up") -> FusedLayout:
    """Megatron gated `linear_fc1` (SwiGLU): [gate; up] halves (per TP shard, thanks to stride 2)."""
    return FusedLayout((gate, up))


def mla_kv_up_layout(qk_head_dim: int, v_head_dim: int) -> FusedLayout:
    """Megatron MLA `linear_kv_up_proj`: per head, its no-RoPE key rows then its value rows."""
    return FusedLayout(("k_up", "v_up"), (qk_head_dim, v_head_dim))


def split(x: torch.Tensor, layout: FusedLayout) -> Dict[str, torch.Tensor]:
    """The parts of a fused matrix (rows along dim 0), each a new contiguous tensor."""
    return {name: x.index_select(0, rows) for name, rows in layout.part_rows(x.size(0), x.device)}


def fuse(parts: Dict[str, torch.Tensor], layout: FusedLayout) -> torch.Tensor:
    """Inverse of `split`: put the parts back in the fused row order."""
    num_rows = sum(p.size(0) for p in parts.values())
    first = next(iter(parts.values()))
    out = first.new_empty((num_rows,) + tuple(first.shape[1:]))
    for name, rows in layout.part_rows(num_rows, out.device):
        out.index_copy_(0, rows, parts[name])
    return out


def annotate_model(model: torch.nn.Module) -> int:
    """Tag the fused weights of a Megatron-core model with their `FusedLayout` (read from each module's
    TransformerConfig), so grouping can split them. Returns how many weights were tagged. Idempotent."""
    tagged = 0
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is None:
            continue
        for child_name, layout in _fused_children(module, config):
            child = getattr(module, child_name, None)
            for pname, param in child.named_parameters(recurse=False) if child is not None else ():
                if pname.startswith("weight"):
                    setattr(param, LAYOUT_ATTR, layout)
                    tagged += 1
    return tagged


def _fused_children(module: torch.nn.Module, config) -> List[Tuple[str, FusedLayout]]:
    out = []
    if hasattr(module, "linear_qkv"):
        heads = config.num_attention_heads
        groups = getattr(config, "num_query_groups", None) or heads
        head_dim = getattr(config, "kv_channels", None) or config.hidden_size // heads
        out.append(("linear_qkv", qkv_layout(heads, groups, head_dim)))
    if hasattr(module, "linear_fc1") and getattr(config, "gated_linear_unit", False):
        out.append(("linear_fc1", gated_mlp_layout()))
    if hasattr(module, "linear_kv_up_proj"):
        out.append(("linear_kv_up_proj", mla_kv_up_layout(config.qk_head_dim, config.v_head_dim)))
    return out
