"""QK-clip (MuonClip, Kimi K2): keep every attention head's largest pre-softmax logit at or below τ by
rescaling its query and key rows after each optimizer step.

    opt = teonspeed.Muon(model, qk_clip=100.0)      # attached through the model, runs in opt.step()
    clip = teonspeed.qk_clip.attach(model, opt)      # or explicitly (named_parameters(), any optimizer)
    opt.qk_clip.max_logit                            # the last step's largest logit (device tensor)

Attention layers found: megatron-core SelfAttention (local DotProductAttention, any core attention taking
Megatron's query/key, Transformer Engine's own max logit) and MultiLatentAttention; Hugging Face LLaMA-style
attention (eager and SDPA). See docs/qk-clip.md.
"""

from __future__ import annotations

import math
import sys
from typing import List, Optional

import torch
import torch.distributed as dist

from .capture import ClipLayer
from .clip import Models, QKClip
from . import hf_layers as hf, megatron_layers as megatron
from .rescale import RowPart, group_eta, row_scale, scale_flat_rows, scale_rows

__all__ = [
    "attach",
    "QKClip",
    "ClipLayer",
    "find_layers",
    "RowPart",
    "group_eta",
    "row_scale",
    "scale_rows",
    "scale_flat_rows",
]


def find_layers(models: Models) -> List[ClipLayer]:
    """Every attention layer QK-clip knows in the model (or model chunks), with its capture hooks."""
    chunks = [models] if isinstance(models, torch.nn.Module) else list(models)
    layers = []
    for i, chunk in enumerate(chunks):
        prefix = f"chunk{i}." if len(chunks) > 1 else ""
        layers += megatron.megatron_layers(chunk, prefix) + hf.hf_layers(chunk, prefix)
    return layers


def attach(
    models: Models,
    optimizer=None,
    *,
    threshold: Optional[float] = None,
    alpha: Optional[float] = None,
    log_only: Optional[bool] = None,
    group=None,
) -> QKClip:
    """QK-clip for `models` (a module or Megatron's model chunks). With `optimizer` the clip runs after each
    of its steps (teonspeed's optimizers: also under ZeRO-1/2, Megatron's distributed optimizer and fp32
    masters; any other optimizer must step the model's own parameters); without, call `.step()` after yours.
    threshold/alpha/log_only default to the optimizer's qk_clip/qk_clip_alpha/qk_clip_log options. `group`:
    the ranks whose batches the maxima are reduced over (default: Megatron's data-parallel group with
    context parallelism, else the optimizer's data-parallel group, else the world for a model that is not
    model-parallel)."""
    config = getattr(optimizer, "config", None)
    threshold = threshold if threshold is not None else getattr(config, "qk_clip", None)
    alpha = alpha if alpha is not None else getattr(config, "qk_clip_alpha", 0.5)
    log_only = log_only if log_only is not None else bool(getattr(config, "qk_clip_log", False))
    _check_options(threshold, alpha, log_only)
    if optimizer is not None and getattr(optimizer, "qk_clip", None) is not None:
        raise ValueError(
            "teonspeed: QK-clip is already attached to this optimizer (passing the model with "
            "qk_clip set attaches it); call attach() once"
        )
    layers = find_layers(models)
    if not layers:
        raise ValueError(
            "teonspeed: QK-clip found no attention layer it knows (megatron-core "
            "SelfAttention / MultiLatentAttention, Hugging Face LLaMA-style q_proj/k_proj "
            "attention) in the model"
        )
    clip = QKClip(
        layers,
        threshold=threshold,
        alpha=alpha,
        log_only=log_only,
        group=group if group is not None else _default_group(optimizer),
        optimizer=optimizer,
    )
    if optimizer is not None:
        optimizer.qk_clip = clip
    return clip


def attach_from_options(params, optimizer) -> Optional[QKClip]:
    """OrthoOptimizer's construction: with qk_clip or qk_clip_log set, attach through the model when it was
    passed; otherwise leave it to the integration (DeepSpeed, Megatron's builder) or the user, and refuse a
    step taken before anyone did."""
    config = optimizer.config
    if config.qk_clip is None and not config.qk_clip_log:
        return None
    if isinstance(params, torch.nn.Module):
        optimizer.qk_clip = None
        return attach(params, optimizer)

    def needs_model(opt, args, kwargs):
        if getattr(opt, "qk_clip", None) is None:
            raise ValueError(
                "teonspeed: option 'qk_clip'/'qk_clip_log' needs the model to capture "
                "attention logits: pass the nn.Module to the optimizer (teonspeed.Muon(model, "
                "qk_clip=...)) or call teonspeed.qk_clip.attach(model, optimizer) before the "
                "first step"
            )

    optimizer.register_step_pre_hook(needs_model)  # (kept: torch iterates the hooks while calling them)
    return None


def _check_options(threshold, alpha, log_only) -> None:
    if log_only and threshold is not None:
        raise ValueError(
            "teonspeed: options 'qk_clip' and 'qk_clip_log' both set: qk_clip_log logs the max "
            "logit without clipping; keep one"
        )
    if not log_only and threshold is None:
        raise ValueError(
            "teonspeed: QK-clip needs a threshold (option 'qk_clip', e.g. 100) or log-only mode "
            "('qk_clip_log')"
        )
    if threshold is not None and (
        isinstance(threshold, bool)
        or not isinstance(threshold, (int, float))
        or not math.isfinite(threshold)
        or threshold <= 0
    ):
        raise ValueError(
            f"teonspeed: option 'qk_clip' must be a finite number > 0 (the max logit τ), got {threshold!r}"
        )
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"teonspeed: option 'qk_clip_alpha' must be a number in [0, 1], got {alpha!r}")


def _default_group(optimizer):
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    megatron_group = (
        megatron.data_context_parallel_group() if "megatron.core.parallel_state" in sys.modules else None
    )
    if megatron_group is not None:
        return megatron_group
    ctx = getattr(optimizer, "parallel", None)
    if ctx is not None and ctx.dp_group is not None:
        return ctx.dp_group
    if ctx is not None and (ctx.tp_group is not None or ctx.pipeline_group is not None):
        raise ValueError(
            "teonspeed: QK-clip cannot tell which ranks share this model's heads (a "
            "model-parallel layout without a data-parallel group); pass group= to "
            "teonspeed.qk_clip.attach"
        )
    return dist.group.WORLD
