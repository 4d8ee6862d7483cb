"""The Megatron-core entry, named like Megatron's own builder (imports megatron-core):

    from teonspeed.megatron import TeonOptimizerConfig, get_megatron_optimizer

The integration itself is `teonspeed.integrations.megatron` (and `.megatron_distributed` for
use_distributed_optimizer=True)."""

from .integrations.megatron import (
    MEGATRON_NAMES,
    MEGATRON_TYPES,
    TeonOptimizerConfig,
    get_megatron_optimizer,
    teonspeed_options,
)

__all__ = [
    "MEGATRON_NAMES",
    "MEGATRON_TYPES",
    "TeonOptimizerConfig",
    "get_megatron_optimizer",
    "teonspeed_options",
]
