"""Hugging Face LLaMA-style attention (LLaMA, Mistral, Qwen2, ...: separate q_proj / k_proj, heads in
contiguous row blocks, GQA by repeat_kv), as QK-clip sees it.

The logits are captured where the attention itself gets its query and key (after RoPE, with the scaling
and mask it uses): transformers calls the function registered for `config._attn_implementation` in its
`ALL_ATTENTION_FUNCTIONS`. `install()` puts a wrapper in front of "eager" and "sdpa" there (the mapping's
own per-instance override, process-wide): for an attention module with a record (an attached layer, in
training mode) it computes the per-head maximum chunk by chunk (logits.head_max_logits), then calls the
original; for every other module it only forwards the call.
"""

from __future__ import annotations

import sys
from typing import Callable, Dict, List

import torch

from .capture import ClipLayer, LogitRecord
from .logits import head_max_logits
from .rescale import K, Q, RowPart

RECORD_ATTR = "_teonspeed_qk_record"
IMPLEMENTATIONS = ("eager", "sdpa")
_WRAPPED: Dict[str, Callable] = {}  # implementation -> the wrapper installed for it


def is_llama_attention(m: torch.nn.Module) -> bool:
    linears = all(isinstance(getattr(m, n, None), torch.nn.Linear) for n in ("q_proj", "k_proj"))
    return linears and hasattr(m, "head_dim") and hasattr(getattr(m, "config", None), "num_attention_heads")


def hf_layers(model: torch.nn.Module, prefix: str = "") -> List[ClipLayer]:
    found = [(prefix + name, m) for name, m in model.named_modules() if is_llama_attention(m)]
    if found:
        install()
    return [_layer(name, m) for name, m in found]


def _layer(name: str, m: torch.nn.Module) -> ClipLayer:
    config = m.config
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in IMPLEMENTATIONS:
        raise ValueError(
            f"teonspeed: QK-clip on {name}: attn_implementation {impl!r} does not expose its "
            f"logits; load the model with attn_implementation='sdpa' (or 'eager')"
        )
    if getattr(m, "q_norm", None) is not None or getattr(m, "k_norm", None) is not None:
        raise ValueError(
            f"teonspeed: QK-clip on {name}: q_norm/k_norm normalise every query and key head, "
            f"which undoes a rescale of their rows; drop qk_clip for this model"
        )
    _check_interface(name, m)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    d = m.head_dim
    if m.q_proj.out_features != heads * d or m.k_proj.out_features != kv_heads * d:
        raise ValueError(
            f"teonspeed: QK-clip on {name}: q_proj/k_proj have {m.q_proj.out_features}/"
            f"{m.k_proj.out_features} rows, expected {heads}x{d} / {kv_heads}x{d} (LLaMA "
            f"layout)"
        )
    group = heads // kv_heads
    # One unit per key head: its query heads' rows (contiguous in q_proj), its own rows in k_proj.
    targets = []
    for linear, part in ((m.q_proj, RowPart(group * d, Q)), (m.k_proj, RowPart(d, K))):
        targets += [(p, (part,)) for p in (linear.weight, linear.bias) if isinstance(p, torch.nn.Parameter)]
    record = LogitRecord(heads)
    setattr(m, RECORD_ATTR, record)
    return ClipLayer(name, record, heads, group, targets, [_Unset(m), _check_reached(name, m, record)])


def _check_reached(name: str, m: torch.nn.Module, record: LogitRecord):
    """A model file that calls its attention function without the shared mapping (older transformers
    called eager directly) would leave the record empty and the clip silently off: refuse instead."""

    def hook(module, args, output):
        if module.training and record.observed == seen[0]:
            raise RuntimeError(
                f"teonspeed: QK-clip on {name}: the attention ran without passing through "
                f"transformers' ALL_ATTENTION_FUNCTIONS, so its logits were not captured; use "
                f"attn_implementation='sdpa' (or a transformers version that dispatches eager "
                f"there)"
            )
        seen[0] = record.observed

    def before(module, args):
        seen[0] = record.observed

    seen = [record.observed]
    return _Handles(m.register_forward_pre_hook(before), m.register_forward_hook(hook))


class _Handles:
    def __init__(self, *handles) -> None:
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _Unset:
    """Detaching a layer takes its record off the module (the installed wrapper then only forwards)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def remove(self) -> None:
        if hasattr(self.module, RECORD_ATTR):
            delattr(self.module, RECORD_ATTR)


def _interface():
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError as err:  # transformers before 4.48 had no attention interface
        raise ValueError(
            f"teonspeed: QK-clip on Hugging Face models needs transformers >= 4.48 (its "
            f"ALL_ATTENTION_FUNCTIONS): {err}"
        ) from None
    return ALL_ATTENTION_FUNCTIONS


def _check_interface(name: str, m: torch.nn.Module) -> None:
    """The model's file must dispatch through the shared mapping (a file with its own AttentionInterface
    instance would bypass the wrapper and nothing would be recorded)."""
    own = getattr(sys.modules.get(type(m).__module__), "ALL_ATTENTION_FUNCTIONS", None)
    if own is not None and own is not _interface():
        raise ValueError(
            f"teonspeed: QK-clip on {name}: {type(m).__module__} dispatches attention through "
            f"its own AttentionInterface, which the capture does not reach"
        )


def install() -> None:
    """Wrap "eager" and "sdpa" in transformers' ALL_ATTENTION_FUNCTIONS (idempotent)."""
    interface = _interface()
    for impl in IMPLEMENTATIONS:
        current = interface.get(impl) if impl in interface else None
        if current is not None and current is _WRAPPED.get(impl):
            continue
        _WRAPPED[impl] = interface[impl] = _wrapper(impl, current)


def _wrapper(impl: str, original: Callable):
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        record = getattr(module, RECORD_ATTR, None)
        if record is not None and module.training:
            record.observe(_head_max(impl, module, query, key, attention_mask, kwargs))
        target = original if original is not None else _eager_of(module)
        return target(module, query, key, value, attention_mask, *args, **kwargs)

    attention.__name__ = f"teonspeed_qk_clip_{impl}"
    return attention


def _eager_of(module: torch.nn.Module) -> Callable:
    """The eager function the model's own file defines (transformers falls back to it for "eager")."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise ValueError(
            f"teonspeed: QK-clip: {type(module).__module__} has no eager_attention_forward to call"
        )
    return fn


def _head_max(impl: str, module, query: torch.Tensor, key: torch.Tensor, mask, kwargs) -> torch.Tensor:
    """As each implementation masks: eager adds the mask it is given (causality included) and nothing else;
    SDPA uses a given mask (bool: True attends; float: added), else is_causal for a causal module."""
    scale = kwargs.get("scaling")
    scale = module.scaling if scale is None else scale
    if impl == "eager":
        return head_max_logits(query, key, scale, causal=False, allowed=mask)
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    causal = bool(query.size(2) > 1 and mask is None and causal)
    return head_max_logits(query, key, scale, causal=causal, allowed=mask)
