"""Parameter names -> layer types, blocks and experts; routing (orthogonalized vs AdamW); TEON groups.

Nothing here touches tensor values: the result is a list of `OrthoGroup`s of `MatrixRef`s that the
optimizer step turns into tensor slices. Rules, in order:

1. AdamW: any parameter with fewer than 2 dims, embeddings, the output head and the MoE router.
2. Every other parameter is orthogonalized. A fused weight (Megatron `linear_qkv`, gated `linear_fc1`,
   MLA `linear_kv_up_proj`) is split into its parts when `split_fused` and its layout is known; a 3-D
   weight is a stack of independent matrices (grouped-GEMM experts), one per leading index.
3. TEON: matrices whose layer type is in `teon_types` are stacked with the *same type* (and the same
   expert index) from `teon_k` consecutive blocks, aligned at block 0: blocks (0,1), (2,3), ... for K=2.
   A block without its partners (an odd last layer, a pipeline-stage boundary) falls back to Muon; a
   teon_k that forms no stack at all is refused (require_teon_stacks) unless teon_per_layer_fallback.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .fused import LAYOUT_ATTR, FusedLayout

ADAMW_NAME_MARKERS = (
    "embedding",
    "embed_tokens",
    "word_embeddings",
    "position_embeddings",
    "wte",
    "wpe",
    "lm_head",
    "output_layer",
    "router",
)

# (regex on the module path just before ".weight", layer type). First match wins.
_TYPE_RULES: Sequence[Tuple[str, str]] = (
    (r"linear_qkv$", "qkv"),
    (r"linear_q_proj$|(^|\.)q_proj$", "q"),
    (r"(^|\.)k_proj$", "k"),
    (r"(^|\.)v_proj$", "v"),
    (r"linear_q_down_proj$", "q_down"),
    (r"linear_q_up_proj$", "q_up"),
    (r"linear_kv_down_proj$", "kv_down"),
    (r"linear_kv_up_proj$", "kv_up"),
    (r"self_attention\.linear_proj$|(^|\.)o_proj$|attn\.c_proj$", "attn_out"),
    (r"linear_fc1$|(^|\.)c_fc$|(^|\.)fc1$", "fc1"),
    (r"(^|\.)gate_proj$", "gate"),
    (r"(^|\.)up_proj$", "up"),
    (r"linear_fc2$|(^|\.)down_proj$|mlp\.c_proj$|(^|\.)fc2$", "fc2"),
)
_BLOCK_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_LOCAL_EXPERT_RE = re.compile(r"(?:local_experts|experts)\.(\d+)\.")
_TE_GROUPED_EXPERT_RE = re.compile(r"experts\.linear_fc[12]\.weight(\d+)$")

LAYER_TYPES = (
    "q",
    "k",
    "v",
    "qkv",
    "q_down",
    "q_up",
    "kv_down",
    "kv_up",
    "k_up",
    "v_up",
    "attn_out",
    "fc1",
    "gate",
    "up",
    "fc2",
    "other",
)


@dataclass(frozen=True)
class LayerRef:
    """What a parameter name says: its layer type, transformer block and expert index (if any)."""

    layer_type: str
    block: Optional[int] = None
    expert: Optional[int] = None


@dataclass(frozen=True)
class MatrixRef:
    """One matrix to orthogonalize: a parameter, or a part / expert slice of one."""

    name: str
    layer: LayerRef
    shape: Tuple[int, int]  # (out, in) in the full (unsharded) model
    part: Optional[str] = None  # part of a fused weight
    expert_index: Optional[int] = None  # leading index of a 3-D (grouped-GEMM) weight

    @property
    def label(self) -> str:
        s = self.name
        if self.expert_index is not None:
            s += f"[{self.expert_index}]"
        if self.part is not None:
            s += f"<{self.part}>"
        return s


@dataclass(frozen=True)
class OrthoGroup:
    """Matrices orthogonalized together: K stacked members (TEON) or one (Muon)."""

    members: Tuple[MatrixRef, ...]
    mode: int = 1  # unfolding mode of the stack

    @property
    def stacked_shape(self) -> Tuple[int, int]:
        m, n = self.members[0].shape
        k = len(self.members)
        return (m, n * k) if self.mode == 1 else (m * k, n)

    @property
    def is_teon(self) -> bool:
        return len(self.members) > 1


@dataclass
class Routing:
    """Per parameter: where it goes and why."""

    name: str
    shape: Tuple[int, ...]
    route: str  # "adamw" | "ortho"
    reason: str


@dataclass
class GroupingResult:
    routing: List[Routing]
    groups: List[OrthoGroup]
    notes: List[str] = field(default_factory=list)
    partial: List[Tuple[Tuple[int, ...], Tuple[str, ...]]] = field(default_factory=list)
    """TEON windows that fell back to Muon: (missing blocks, labels of the members present)."""

    def ortho_names(self) -> List[str]:
        return [r.name for r in self.routing if r.route == "ortho"]


def layer_ref(name: str) -> LayerRef:
    """The built-in name rules (Megatron-core GPT/LLaMA/MoE/MLA and Hugging Face LLaMA-style names)."""
    module = re.sub(r"\.weight\d*$", "", name)
    te_grouped = _TE_GROUPED_EXPERT_RE.search(name)
    layer_type = "other"
    for pattern, t in _TYPE_RULES:
        if re.search(pattern, module):
            layer_type = t
            break
    block = _BLOCK_RE.search(name)
    expert = None
    if ".experts." in name and "shared_experts" not in name:
        found = te_grouped or _LOCAL_EXPERT_RE.search(name)
        expert = int(found.group(1)) if found else None
    return LayerRef(layer_type, int(block.group(1)) if block else None, expert)


def param_shape(p: torch.Tensor) -> Tuple[int, ...]:
    """A parameter's (local) shape. DeepSpeed's zero.Init (Hugging Face's from_pretrained under ZeRO-3)
    leaves an empty placeholder in the parameter and its shape in `ds_shape`."""
    return tuple(getattr(p, "ds_shape", p.shape))


def adamw_reason(name: str, param: torch.Tensor) -> Optional[str]:
    ndim = len(param_shape(param))
    if ndim < 2:
        return f"{ndim}-D (norm gain, bias or scalar)"
    lowered = name.lower()
    for marker in ADAMW_NAME_MARKERS:
        if marker in lowered:
            kind = {"lm_head": "output head", "output_layer": "output head", "router": "MoE router"}.get(
                marker, "embedding"
            )
            return f"{kind} ({marker!r} in name)"
    return None


def build_groups(
    named_params: Iterable[Tuple[str, torch.Tensor]],
    teon_k: int = 1,
    teon_mode: int = 1,
    teon_types: Sequence[str] = (),
    split_fused: bool = True,
    grouping_rule: Optional[Callable[[str], Optional[LayerRef]]] = None,
    full_shape: Optional[Callable[[str, torch.Tensor], Tuple[int, ...]]] = None,
    relocate: Optional[Callable[[str, LayerRef], LayerRef]] = None,
    force_route: Optional[Dict[str, str]] = None,
) -> GroupingResult:
    """Route every parameter and form the orthogonalization groups (deterministic, name-sorted).

    full_shape(name, p) gives the unsharded shape (default p.shape); relocate(name, ref) turns the local
    block / expert numbers parsed from a name into global ones (pipeline stages number their layers
    locally, expert-parallel ranks their experts); force_route maps a
    name to "adamw"/"ortho" when the user's param groups say so.
    """
    routing: List[Routing] = []
    matrices: List[MatrixRef] = []
    notes: List[str] = []
    for name, p in named_params:
        shape = tuple(full_shape(name, p)) if full_shape else param_shape(p)
        forced = (force_route or {}).get(name)
        reason = adamw_reason(name, p)
        if forced == "adamw" or (forced is None and reason is not None):
            routing.append(
                Routing(name, shape, "adamw", reason if forced is None else "param group says adamw")
            )
            continue
        if len(param_shape(p)) < 2:
            raise ValueError(
                f"teonspeed: parameter {name!r} has shape {shape} but its param group asks for an "
                f"orthogonalized update, which needs a matrix; put it in an AdamW group"
            )
        ref = grouping_rule(name) if grouping_rule else None
        if ref is None:
            ref = layer_ref(name)
        if relocate is not None:
            ref = relocate(name, ref)
        layout: Optional[FusedLayout] = getattr(p, LAYOUT_ATTR, None) if split_fused else None
        routing.append(Routing(name, shape, "ortho", _ortho_reason(ref, layout)))
        matrices.extend(_matrices_of(name, shape, ref, layout))
    partial: List[Tuple[Tuple[int, ...], Tuple[str, ...]]] = []
    groups = _stack(matrices, teon_k, teon_mode, set(teon_types), notes, partial)
    return GroupingResult(routing, groups, notes, partial)


def _ortho_reason(ref: LayerRef, layout: Optional[FusedLayout]) -> str:
    where = f"block {ref.block}" if ref.block is not None else "no block"
    if ref.expert is not None:
        where += f", expert {ref.expert}"
    split = f", split into {'/'.join(layout.part_names)}" if layout else ""
    return f"{ref.layer_type} ({where}){split}"


def _matrices_of(
    name: str, shape: Tuple[int, ...], ref: LayerRef, layout: Optional[FusedLayout]
) -> List[MatrixRef]:
    experts: List[Optional[int]] = [None]
    if len(shape) == 3:
        experts = list(range(shape[0]))
        shape = shape[1:]
    elif len(shape) > 3:
        shape = (shape[0], int(torch.Size(shape[1:]).numel()))
    out = []
    for e in experts:
        expert_ref = ref if e is None else LayerRef(ref.layer_type, ref.block, e)
        if layout is None:
            out.append(MatrixRef(name, expert_ref, (shape[0], shape[1]), None, e))
            continue
        for part, rows in layout.part_rows(shape[0]):
            # A part is a layer type of its own (q/k/v, gate/up, k_up/v_up), so Q stacks with Q.
            part_ref = LayerRef(part, ref.block, expert_ref.expert)
            out.append(MatrixRef(name, part_ref, (len(rows), shape[1]), part, e))
    return out


def _stack(
    matrices: List[MatrixRef],
    k: int,
    mode: int,
    stacked_types: set,
    notes: List[str],
    partial: List[Tuple[Tuple[int, ...], Tuple[str, ...]]],
) -> List[OrthoGroup]:
    singles: List[MatrixRef] = []
    by_key: Dict[Tuple, List[MatrixRef]] = {}
    for m in matrices:
        if k > 1 and m.layer.layer_type in stacked_types and m.layer.block is not None:
            by_key.setdefault((m.layer.layer_type, m.layer.expert), []).append(m)
        else:
            singles.append(m)
    groups: List[OrthoGroup] = []
    for (layer_type, expert), members in sorted(by_key.items(), key=lambda kv: (kv[0][0], kv[0][1] or -1)):
        blocks: Dict[int, MatrixRef] = {}
        for m in members:
            if m.layer.block in blocks:
                raise ValueError(
                    f"teonspeed: two {layer_type!r} matrices in block {m.layer.block}: "
                    f"{blocks[m.layer.block].label} and {m.label}; give them distinct types with "
                    f"grouping_rule= or remove {layer_type!r} from teon_types"
                )
            blocks[m.layer.block] = m
        for start in sorted({b // k * k for b in blocks}):
            window = [blocks.get(b) for b in range(start, start + k)]
            present = [m for m in window if m is not None]
            if len(present) < k:
                missing = tuple(b for b in range(start, start + k) if b not in blocks)
                partial.append((missing, tuple(m.label for m in present)))
                for m in present:
                    notes.append(
                        f"{m.label}: no TEON partner in blocks {start}..{start + k - 1} "
                        f"(only {len(present)} of {k} present), falls back to Muon"
                    )
                    groups.append(OrthoGroup((m,), mode))
                continue
            shapes = {m.shape for m in present}
            if len(shapes) > 1:
                raise ValueError(
                    "teonspeed: TEON group of "
                    + ", ".join(f"{m.label} {m.shape}" for m in present)
                    + " has members of different shapes; stacking needs equal shapes. Fix: remove "
                    f"{layer_type!r} from teon_types, set teon_k=1, or give them different types with "
                    "grouping_rule="
                )
            groups.append(OrthoGroup(tuple(present), mode))
    groups.extend(OrthoGroup((m,), mode) for m in singles)
    return groups


FALLBACK_OPTION = "teon_per_layer_fallback"


def require_teon_stacks(grouping: GroupingResult, teon_k: int, teon_types, fallback: bool) -> None:
    """TEON stacks matrices of `teon_types` from teon_k consecutive blocks; with more than the blocks a
    pipeline stage holds, no stack forms and every matrix silently gets Muon. Refuse a run that forms
    no stack unless `fallback` (the option `teon_per_layer_fallback`) says so. Every stage of an even
    pipeline split holds as many blocks, so every rank decides alike."""
    if teon_k <= 1 or fallback or any(g.is_teon for g in grouping.groups):
        return
    types = set(teon_types)
    blocks = sorted(
        {
            m.layer.block
            for g in grouping.groups
            for m in g.members
            if m.layer.block is not None and m.layer.layer_type in types
        }
    )
    if blocks:
        # the count, not the block numbers: every pipeline stage raises the same line
        where = f"{len(blocks)} block(s) with {'/'.join(sorted(types))} matrices (per pipeline stage)"
    else:
        where = (
            f"no {'/'.join(sorted(types))} matrix in a recognised transformer block (layer names like "
            f"layers.<i>.self_attn.q_proj; see grouping_rule=)"
        )
    raise ValueError(
        f"teonspeed: teon_k={teon_k} forms no TEON stack: the model has {where}, so every matrix would fall "
        f"back to per-layer Muon. Use a teon_k that divides the layers per pipeline stage, or pass "
        f"{FALLBACK_OPTION}=True to accept the per-layer fallback"
    )
