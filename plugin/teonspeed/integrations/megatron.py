"""Megatron-core integration: the same entry point as Megatron's own builder.

    from teonspeed.megatron import TeonOptimizerConfig, get_megatron_optimizer
    config = TeonOptimizerConfig(optimizer="teon", lr=0.02, adamw_lr=3e-4, weight_decay=0.1, clip_grad=1.0)
    optimizer = get_megatron_optimizer(config, model_chunks)   # a MegatronOptimizer
    success, grad_norm, num_zeros = optimizer.step()

`TeonOptimizerConfig` is Megatron's `OptimizerConfig` plus every teonspeed option, derived from the fields
of teonspeed's `OptimizerConfig` (a new option needs no glue here). Each option is read from the config's
`teon_<name>`, `muon_<name>` or `<name>` field, whichever exists, like Megatron's `_kwargs_from_config`;
only real renames are spelled out (MEGATRON_NAMES). So Megatron's own fields keep their meaning:
muon_momentum → momentum, muon_use_nesterov → nesterov (Megatron's default is off), muon_num_ns_steps →
ns_steps, muon_split_qkv → split_fused; adam_beta1/2, adam_eps and weight_decay configure the AdamW part;
`lr` is the scheduled lr of both parts and `adamw_lr` (default: lr) the AdamW part's. The options Megatron
does not have are fields of their own, None meaning teonspeed's default. `qk_clip` is teonspeed's QK-clip,
after each step (Megatron's own TransformerConfig qk_clip stays off: with Transformer Engine set
log_max_attention_logit=True on the model's config).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

import torch

from ..config import OPTION_NAMES, OptimizerConfig as TeonspeedConfig, default, make_config
from ..fused import annotate_model
from ..kinds import OPTIMIZER_KINDS
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

# teonspeed options that Megatron's OptimizerConfig holds under another name (its one weight decay
# serves both parts).
MEGATRON_NAMES = {
    "nesterov": "muon_use_nesterov",
    "ns_steps": "muon_num_ns_steps",
    "split_fused": "muon_split_qkv",
    "adamw_betas": ("adam_beta1", "adam_beta2"),
    "adamw_eps": "adam_eps",
    "adamw_weight_decay": "weight_decay",
}
# Megatron's Muon fields that teonspeed does not read, and what to set instead: refused unless at their
# Megatron default, so that a setting never goes silently unused.
NOT_READ = {
    "muon_scale_mode": "lr_scale",
    "muon_extra_scale_factor": "lr",
    "muon_fp32_matmul_prec": "ns_dtype",
    "muon_tp_mode": "parallel_mode (teonspeed always orthogonalizes the whole matrix)",
}

_MEGATRON_FIELDS = {f.name: f for f in dataclasses.fields(OptimizerConfig)}


def _megatron_name(option: str, fields) -> Optional[str]:
    """Which field of a Megatron config holds teonspeed `option`: teon_<name>, muon_<name> or <name>."""
    return next((n for n in (f"teon_{option}", f"muon_{option}", option) if n in fields), None)


def _added_fields():
    """A field, default None (teonspeed's default), for every option Megatron's config lacks."""
    teonspeed_fields = {f.name: f for f in dataclasses.fields(TeonspeedConfig)}
    missing = [
        n for n in OPTION_NAMES if n not in MEGATRON_NAMES and _megatron_name(n, _MEGATRON_FIELDS) is None
    ]
    return [(n, f"Optional[{teonspeed_fields[n].type}]", dataclasses.field(default=None)) for n in missing]


def _check(self) -> None:
    OptimizerConfig.__post_init__(self)
    if str(self.optimizer).lower() not in OPTIMIZER_KINDS:
        raise ValueError(
            f"teonspeed: TeonOptimizerConfig.optimizer must be one of "
            f"{sorted(OPTIMIZER_KINDS)}, got {self.optimizer!r}; use "
            f"megatron.core.optimizer.get_megatron_optimizer for Adam/SGD"
        )
    for name, instead in NOT_READ.items():
        if getattr(self, name) != _MEGATRON_FIELDS[name].default:
            raise ValueError(
                f"teonspeed: TeonOptimizerConfig.{name}={getattr(self, name)!r} is Megatron's "
                f"Muon's; teonspeed does not read it (leave it at "
                f"{_MEGATRON_FIELDS[name].default!r}): set {instead} instead"
            )
    make_config(self.optimizer, teonspeed_options(self))  # every option checked now, not at the first step


TeonOptimizerConfig = dataclasses.make_dataclass(
    "TeonOptimizerConfig",
    [("optimizer", str, dataclasses.field(default="teon")), *_added_fields()],
    bases=(OptimizerConfig,),
    namespace={
        "__post_init__": _check,
        "__module__": __name__,
        "__doc__": (
            'Megatron\'s OptimizerConfig with `optimizer` in {"teon", "muon", "htmuon"} and every teonspeed '
            "option (see teonspeed.OptimizerConfig for each one's meaning and default; None: that default)."
        ),
    },
)


def teonspeed_options(config) -> Dict[str, Any]:
    """The teonspeed options a TeonOptimizerConfig stands for (None: teonspeed's default)."""
    fields = {f.name for f in dataclasses.fields(config)}
    options = {}
    for option in OPTION_NAMES:
        source = MEGATRON_NAMES.get(option) or _megatron_name(option, fields)
        options[option] = (
            tuple(getattr(config, n) for n in source)
            if isinstance(source, tuple)
            else getattr(config, source)
        )
    if options["adamw_lr"] is None:  # Megatron schedules one lr: the AdamW part follows it unless told
        options["adamw_lr"] = default("lr") if options["lr"] is None else options["lr"]
    return options


def get_megatron_optimizer(
    config: TeonOptimizerConfig, model_chunks: List[torch.nn.Module], **unused: Any
) -> MegatronOptimizer:
    """Build teonspeed's optimizer for Megatron model chunks (DDP-wrapped or not), wrapped like Megatron's
    own: FP32Optimizer in fp32, Float16OptimizerWithFloat16Params (fp32 main params) in bf16/fp16."""
    kind = config.optimizer.lower()
    if kind not in MEGATRON_TYPES:
        raise ValueError(
            f"teonspeed: TeonOptimizerConfig.optimizer must be one of {sorted(MEGATRON_TYPES)}, "
            f"got {config.optimizer!r}; use megatron.core.optimizer.get_megatron_optimizer for Adam/SGD"
        )
    if config.use_distributed_optimizer:
        megatron_distributed.check_supported(config, model_chunks)
    elif any(
        getattr(getattr(c, "ddp_config", None), "use_distributed_optimizer", False) for c in model_chunks
    ):
        # DDP then reduce-scatters: only this rank's bucket partition of each gradient is reduced
        raise ValueError(
            "teonspeed: the model chunks are wrapped in megatron DistributedDataParallel with "
            "use_distributed_optimizer=True, the optimizer config has use_distributed_optimizer=False "
            "(it would step gradients DDP left unreduced outside this rank's partition); set "
            "TeonOptimizerConfig(use_distributed_optimizer=True), or DistributedDataParallelConfig("
            "use_distributed_optimizer=False)"
        )
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
    wrapper = TeonFloat16Optimizer(
        optimizer, config, grad_scaler=grad_scaler(config), init_state_fn=init_state
    )
    # Megatron swapped the bf16/fp16 parameters for fp32 main copies in the param groups.
    optimizer.rebind(
        zip(
            (p for g in wrapper.fp32_from_float16_groups for p in g),
            (p for g in wrapper.float16_groups for p in g),
        )
    )
    return wrapper
