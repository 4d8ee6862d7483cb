"""The changes teonspeed makes to DeepSpeed 0.19.8, applied at runtime (never to site-packages).

1. Config types: DeepSpeedEngine knows optimizers by a fixed if/elif chain. "TEON", "TeonspeedMuon" and
   "TeonspeedHTMuon" are accepted by `_is_supported_optimizer` and built by `_configure_basic_optimizer`.
2. ZeRO's "tested optimizer" list gains our classes (tested: stages 0, 1, 2, 3 in fp32 and bf16).
3. The wrappers that replace parameters by other buffers tell our optimizer what those buffers are:
   DeepSpeedZeroOptimizer (ZeRO-1/2 flat partitions), DeepSpeedZeroOptimizer_Stage3 (ZeRO-3 sub-groups
   of evenly split parameters), BF16_Optimizer (bf16 ZeRO-1
   flat partitions),
   FP16_UnfusedOptimizer (bf16 stage 0 fp32 masters, without its zero-gradient warm-up step). Each
   wrapper is patched by wrapping a method, so DeepSpeed's own code runs.
4. Where the engine starts (`_do_sanity_check`, before its device checks and its first collective):
   a config that teonspeed refuses with our optimizer (fp16, ZeRO-Offload, ZeRO-3 with offload or TP,
   universal checkpoints)
   raises one line on every rank, and the process group is torn down at exit so that the failing ranks
   exit cleanly; `"type": "Muon"` logs one warning line (rank 0) naming "TeonspeedMuon".
5. ZeRO-3's gradient partitions are zeroed after each step (with our optimizer). DeepSpeed fills
   `grad_partitions_flat_buffer` with zeros once, at init, and afterwards only writes the partitions of
   parameters whose backward hook fired (`partition_grads`: copy on a window's first micro-step, add
   after). A parameter with no gradient in a step (a branch not taken) keeps the partition of the last
   step that had one, and `independent_gradient_partition_epilogue` hands that stale gradient to the
   optimizer, where ZeRO-0/1/2 step it with a zero gradient. Zeroing after the step (also after a step
   skipped for overflow) makes a missing gradient zero, as at the other stages.
"""

from __future__ import annotations

import atexit
import functools
import logging

WRITTEN_FOR = ("0.19.8",)
_APPLIED = False
_TEARDOWN_REGISTERED = False


class UnsupportedVersion(RuntimeError):
    pass


def check_version() -> None:
    import deepspeed

    if deepspeed.__version__ not in WRITTEN_FOR:
        raise UnsupportedVersion(
            f"teonspeed: the DeepSpeed patch was written for deepspeed {', '.join(WRITTEN_FOR)}, but "
            f"deepspeed {deepspeed.__version__} is installed; install deepspeed=={WRITTEN_FOR[-1]} "
            "(pip install 'teonspeed[deepspeed]') or pass a teonspeed optimizer instance instead of a "
            "config type"
        )


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
    from deepspeed.utils import log_dist

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
    after_init(DeepSpeedZeroOptimizer_Stage3, integration.attach_zero_stage_3)
    _zero_stage3_grad_partitions_after_step(DeepSpeedZeroOptimizer_Stage3, OrthoOptimizer)

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

    original_sanity_check = Engine._do_sanity_check

    @functools.wraps(original_sanity_check)
    def _do_sanity_check(self):
        name = integration.our_optimizer_name(self)
        if name is not None:
            try:
                integration.check_engine(self, name)
            except ValueError:
                _tear_down_at_exit()
                raise
        warning = integration.builtin_muon_warning(self)
        if warning is not None:
            log_dist(warning, ranks=[0], level=logging.WARNING)
        original_sanity_check(self)

    Engine._do_sanity_check = _do_sanity_check
    _APPLIED = True


def _zero_stage3_grad_partitions_after_step(Stage3, OrthoOptimizer) -> None:
    """Change 5 above. After step() the partitions have been consumed: `_prepare_fp32_grad_for_sub_group`
    flattens them into a copy (the fp32 `.grad`), and the next window's first micro-step overwrites them.
    Not with ZeRO-Offload, where DeepSpeed moves only the parameters used in the window (teonspeed refuses
    offload at stage 3 anyway). Not after a step that raised: its state stays as it was."""
    original_step = Stage3.step

    @functools.wraps(original_step)
    def step(self, *args, **kwargs):
        result = original_step(self, *args, **kwargs)
        if isinstance(self.optimizer, OrthoOptimizer) and not self.offload_optimizer:
            self.grad_partitions_flat_buffer.zero_()
        return result

    Stage3.step = step


def _tear_down_at_exit() -> None:
    """A refused engine ends the script with the process group alive; a rank exiting so can abort in
    gloo's teardown ("terminate called without an active exception", SIGABRT), so destroy the group
    at exit instead (once; only if the script has not)."""
    global _TEARDOWN_REGISTERED
    if not _TEARDOWN_REGISTERED:
        atexit.register(_destroy_process_group)
        _TEARDOWN_REGISTERED = True


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
