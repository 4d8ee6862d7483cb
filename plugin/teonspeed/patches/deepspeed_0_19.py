"""The changes teonspeed makes to DeepSpeed 0.19.8, applied at runtime (never to site-packages).

1. Config types: DeepSpeedEngine knows optimizers by a fixed if/elif chain. "TEON", "TeonspeedMuon" and
   "TeonspeedHTMuon" are accepted by `_is_supported_optimizer` and built by `_configure_basic_optimizer`.
2. ZeRO's "tested optimizer" list gains our classes (tested: stages 0, 1, 2 in fp32 and bf16).
3. The wrappers that replace parameters by other buffers tell our optimizer what those buffers are:
   DeepSpeedZeroOptimizer (ZeRO-1/2 flat partitions), BF16_Optimizer (bf16 ZeRO-1 flat partitions),
   FP16_UnfusedOptimizer (bf16 stage 0 fp32 masters, without its zero-gradient warm-up step). ZeRO-3
   refuses our optimizer. Each wrapper is patched by wrapping a method, so DeepSpeed's own code runs.
"""
from __future__ import annotations

import functools

WRITTEN_FOR = ("0.19.8",)
_APPLIED = False


class UnsupportedVersion(RuntimeError):
    pass


def check_version() -> None:
    import deepspeed
    if deepspeed.__version__ not in WRITTEN_FOR:
        raise UnsupportedVersion(
            f"teonspeed: the DeepSpeed patch was written for deepspeed {', '.join(WRITTEN_FOR)}, but "
            f"deepspeed {deepspeed.__version__} is installed; install deepspeed=={WRITTEN_FOR[-1]} "
            f"(pip install 'teonspeed[deepspeed]') or pass a teonspeed optimizer instance instead of a config type")


def apply() -> None:
    global _APPLIED
    if _APPLIED:
        return
    check_version()
    from deepspeed.runtime import engine as engine_module
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero import utils as zero_utils
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from teonspeed.integrations import deepspeed as integration
    from teonspeed.optim import OrthoOptimizer

    Engine = engine_module.DeepSpeedEngine
    original_supported = Engine._is_supported_optimizer
    original_basic = Engine._configure_basic_optimizer

    def _is_supported_optimizer(self, optimizer_name):
        return optimizer_name in integration.DEEPSPEED_TYPES or original_supported(self, optimizer_name)

    def _configure_basic_optimizer(self, model_parameters):
        if self.optimizer_name() in integration.DEEPSPEED_TYPES:
            return integration.build_optimizer(self, model_parameters)
        return original_basic(self, model_parameters)

    Engine._is_supported_optimizer = _is_supported_optimizer
    Engine._configure_basic_optimizer = _configure_basic_optimizer

    for cls in integration.DEEPSPEED_TYPES.values():
        if cls not in zero_utils.ZERO_SUPPORTED_OPTIMIZERS:
            zero_utils.ZERO_SUPPORTED_OPTIMIZERS.append(cls)

    def after_init(cls, hook):
        original = cls.__init__

        @functools.wraps(original)
        def __init__(self, *args, **kwargs):
            original(self, *args, **kwargs)
            if isinstance(getattr(self, "optimizer", None), OrthoOptimizer):
                hook(self)

        cls.__init__ = __init__

    after_init(DeepSpeedZeroOptimizer, integration.attach_zero_stage_1_2)
    after_init(BF16_Optimizer, integration.attach_bf16_optimizer)

    # FP16_UnfusedOptimizer builds optimizer state with a zero-gradient step() inside __init__. For us that
    # would be a real step (decoupled weight decay, a step count): tell the optimizer about its fp32 masters
    # instead; our state is created at the first real step.
    original_init_states = FP16_UnfusedOptimizer.initialize_optimizer_states

    @functools.wraps(original_init_states)
    def initialize_optimizer_states(self):
        if isinstance(self.optimizer, OrthoOptimizer):
            integration.attach_unfused_fp32_masters(self)
            return
        original_init_states(self)

    FP16_UnfusedOptimizer.initialize_optimizer_states = initialize_optimizer_states

    original_stage3 = DeepSpeedZeroOptimizer_Stage3.__init__

    @functools.wraps(original_stage3)
    def stage3_init(self, module, init_optimizer, *args, **kwargs):
        if isinstance(init_optimizer, OrthoOptimizer):
            raise ValueError(f"teonspeed: {type(init_optimizer).__name__} supports ZeRO stages "
                             f"{integration.SUPPORTED_ZERO_STAGES}, not stage 3 (its parameters are partitioned "
                             f"before the optimizer could see whole matrices); use zero_optimization.stage 1 or 2")
        original_stage3(self, module, init_optimizer, *args, **kwargs)

    DeepSpeedZeroOptimizer_Stage3.__init__ = stage3_init
    _APPLIED = True
