"""The DeepSpeed entry (`teonspeed.deepspeed.MegatronMPU`, `register`); the integration itself is
`teonspeed.integrations.deepspeed`. Importing this module does not import DeepSpeed."""

from .integrations.deepspeed import DEEPSPEED_TYPES, SUPPORTED_ZERO_STAGES, MegatronMPU, build_optimizer
from .integrations.deepspeed_hook import register

__all__ = ["DEEPSPEED_TYPES", "SUPPORTED_ZERO_STAGES", "MegatronMPU", "build_optimizer", "register"]
