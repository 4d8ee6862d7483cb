"""Megatron's optimizer wrappers around a teonspeed optimizer (FP32Optimizer, the bf16/fp16 wrapper), with
what they need to checkpoint it. Shared by the plain (megatron.py) and distributed (megatron_distributed.py)
paths."""

from __future__ import annotations

from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params, FP32Optimizer

from ..optim import OrthoOptimizer
from ..optim.checkpoint import LAYOUT_KEY


def init_state(optimizer: OrthoOptimizer, config=None) -> None:
    """Megatron's init_state_fn: before a torch_dist load, every state tensor must exist to be asked for."""
    optimizer.init_state()


class _TeonCheckpointing:
    """What Megatron's wrappers need to checkpoint a teonspeed optimizer.

    - Megatron matches saved param groups to current ones by (wd_mult, lr_mult, ...) keys, which cannot
      tell our matrix and AdamW groups apart: ours are saved and loaded in one order, by position.
    - torch_dist checkpoints store each state tensor sharded like its parameter, so they reshard to
      another TP/PP/EP layout on load by themselves: the layout check of a plain state dict is dropped.
    """

    @staticmethod
    def _filter_and_reorder_param_groups(current_groups, state_dict_groups):
        if len(current_groups) != len(state_dict_groups):
            raise ValueError(
                f"teonspeed: the checkpoint has {len(state_dict_groups)} optimizer param groups, this "
                f"optimizer {len(current_groups)}: it was saved with other teonspeed options"
            )
        return state_dict_groups

    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, metadata=None):
        state = super().sharded_state_dict(model_sharded_state_dict, is_loading=is_loading, metadata=metadata)
        state.get("optimizer", state).pop(LAYOUT_KEY, None)
        return state


class TeonFP32Optimizer(_TeonCheckpointing, FP32Optimizer):
    """Megatron's FP32Optimizer around a teonspeed optimizer."""


class TeonFloat16Optimizer(_TeonCheckpointing, Float16OptimizerWithFloat16Params):
    """Megatron's bf16/fp16 wrapper (fp32 main params) around a teonspeed optimizer."""


def grad_scaler(config: OptimizerConfig):
    from megatron.core.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler

    if config.bf16:
        return None
    if config.loss_scale:
        return ConstantGradScaler(config.loss_scale)
    return DynamicGradScaler(
        initial_scale=config.initial_loss_scale,
        min_scale=config.min_loss_scale,
        growth_factor=2.0,
        backoff_factor=0.5,
        growth_interval=config.loss_scale_window,
        hysteresis=config.hysteresis,
    )
