"""Megatron-core integration: the same entry point as Megatron's own builder.

    from teonspeed.megatron import TeonOptimizerConfig, get_megatron_optimizer
    config = TeonOptimizerConfig(optimizer="teon", lr=0.02, adamw_lr=3e-4, weight_decay=0.1, clip_grad=1.0)
    optimizer = get_megatron_optimizer(config, model_chunks)   # a MegatronOptimizer
    success, grad_norm, num_zeros = optimizer.step()

`TeonOptimizerConfig` is Megatron's `OptimizerConfig` plus teonspeed's options. Megatron's own Muon fields
keep their meaning: muon_momentum → momentum, muon_use_nesterov → nesterov (Megatron's default is off),
muon_num_ns_steps → ns_steps, muon_split_qkv → split_fused; adam_beta1/2 and adam_eps configure the AdamW
part, `lr` is the scheduled lr of both parts and `adamw_lr` (default: lr) the AdamW part's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..config import QKV_TYPES
from ..fused import annotate_model
from ..optim import HTMuon, Muon, OrthoOptimizer, TEON
from ..parallel.context import megatron_groups_context
from ..parallel.shard_spec import megatron_shard_specs
from .. import qk_clip

from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer.optimizer import MegatronOptimizer

from . import megatron_distributed
from .megatron_wrappers import TeonFloat16Optimizer, TeonFP32Optimizer, grad_scaler, init_state

MEGATRON_TYPES = {"muon": Muon, "teon": TEON, "htmuon": HTMuon}


@dataclass
class TeonOptimizerConfig(OptimizerConfig):
    """Megatron's OptimizerConfig with `optimizer` in {"teon", "muon", "htmuon"} and teonspeed's options."""

    optimizer: str = "teon"
    adamw_lr: Optional[float] = None
    """lr of the AdamW part (embeddings, output head, norms, biases); None: the same as `lr`."""
    orthogonalizer: Optional[str] = None
    ns_dtype: str = "auto"
    ns_backend: str = "auto"
    lr_scale: Optional[str] = None
    teon_k: Optional[int] = None
    teon_mode: int = 1
    teon_types: Tuple[str, ...] = QKV_TYPES
    ht_power: float = 0.125
    ht_method: str = "svd"
    ht_interval: int = 1
    parallel_mode: str = "auto"
    cluster: Optional[Dict[str, float]] = None
    """Overrides of teonspeed.parallel.cost.ClusterProfile, which parallel_mode="auto" decides with."""
    cut_groups_at_stage_boundary: bool = False
    qk_clip: Optional[float] = None
    """QK-clip threshold τ (teonspeed.qk_clip, after each step; None: off). Megatron's own TransformerConfig
    qk_clip stays off: with Transformer Engine set log_max_attention_logit=True on the model's config."""
    qk_clip_alpha: float = 0.5
    qk_clip_log: bool = False


def teonspeed_options(config: TeonOptimizerConfig) -> Dict[str, Any]:
    """The teonspeed options a TeonOptimizerConfig stands for (validated by the optimizer)."""
    lr = config.lr if config.lr is not None else 0.02
    options = dict(
        lr=lr, weight_decay=config.weight_decay, momentum=config.muon_momentum, nesterov=config.muon_use_nesterov,
        ns_steps=config.muon_num_ns_steps, split_fused=config.muon_split_qkv,
        adamw_lr=config.adamw_lr if config.adamw_lr is not None else lr,
        adamw_betas=(config.adam_beta1, config.adam_beta2), adamw_eps=config.adam_eps,
        adamw_weight_decay=config.weight_decay, orthogonalizer=config.orthogonalizer, ns_dtype=config.ns_dtype,
        ns_backend=config.ns_backend,
        lr_scale=config.lr_scale, teon_mode=config.teon_mode, teon_types=config.teon_types,
        parallel_mode=config.parallel_mode, cluster=config.cluster,
        cut_groups_at_stage_boundary=config.cut_groups_at_stage_boundary,
        qk_clip=config.qk_clip, qk_clip_alpha=config.qk_clip_alpha, qk_clip_log=config.qk_clip_log)
    if config.optimizer != "muon":
        options["teon_k"] = config.teon_k
    if config.optimizer == "htmuon":
        options.update(ht_power=config.ht_power, ht_method=config.ht_method, ht_interval=config.ht_interval)
    return options


def get_megatron_optimizer(config: TeonOptimizerConfig, model_chunks: List[torch.nn.Module],
                           **unused: Any) -> MegatronOptimizer:
    """Build teonspeed's optimizer for Megatron model chunks (DDP-wrapped or not), wrapped like Megatron's
    own: FP32Optimizer in fp32, Float16OptimizerWithFloat16Params (fp32 main params) in bf16/fp16."""
    kind = config.optimizer.lower()
    if kind not in MEGATRON_TYPES:
        raise ValueError(f"teonspeed: TeonOptimizerConfig.optimizer must be one of {sorted(MEGATRON_TYPES)}, "
                         f"got {config.optimizer!r}; use megatron.core.optimizer.get_megatron_optimizer for Adam/SGD")
    if config.use_distributed_optimizer:
        megatron_distributed.check_supported(config, model_chunks)
    elif any(getattr(getattr(c, "ddp_config", None), "use_distributed_optimizer", False) for c in model_chunks):
        # DDP then reduce-scatters: only this rank's bucket partition of each gradient is reduced
        raise ValueError("teonspeed: the model chunks are wrapped in megatron DistributedDataParallel with "
                         "use_distributed_optimizer=True, the optimizer config has use_distributed_optimizer=False "
                         "(it would step gradients DDP left unreduced outside this rank's partition); set "
                         "TeonOptimizerConfig(use_distributed_optimizer=True), or DistributedDataParallelConfig("
                         "use_distributed_optimizer=False)")
    named, specs = [], {}
    for i, chunk in enumerate(model_chunks):
        annotate_model(chunk)
        prefix = f"chunk{i}." if len(model_chunks) > 1 else ""
        specs.update({prefix + n: s for n, s in megatron_shard_specs(chunk).items()})
        named += [(prefix + n, p) for n, p in chunk.named_parameters() if p.requires_grad]
    first = model_chunks[0]
    model_config = getattr(getattr(first, "module", first), "config", None)
    parallel = megatron_groups_context(parallel_state, specs, getattr(model_config, "num_layers", None))
    optimizer: OrthoOptimizer = MEGATRON_TYPES[kind](named, parallel=parallel, **teonspeed_options(config))
    if config.qk_clip is not None or config.qk_clip_log:
        qk_clip.attach(model_chunks, optimizer)  # runs inside the inner step, before the wrappers copy back
    if config.use_distributed_optimizer:
        return megatron_distributed.wrap(optimizer, config, model_chunks)
    if not (config.bf16 or config.fp16):
        return TeonFP32Optimizer(optimizer, config, init_state_fn=init_state)
    wrapper = TeonFloat16Optimizer(optimizer, config, grad_scaler=grad_scaler(config), init_state_fn=init_state)
    # Megatron swapped the bf16/fp16 parameters for fp32 main copies in the param groups.
    optimizer.rebind(zip((p for g in wrapper.fp32_from_float16_groups for p in g),
                         (p for g in wrapper.float16_groups for p in g)))
    return wrapper
