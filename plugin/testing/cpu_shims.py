"""Make DeepSpeed 0.19.8 and megatron-core 0.16.x run on a CPU-only machine (tests and the CPU path only).

Each shim is the smallest change that was measured to be needed (shared/research/feasibility.md):
- DeepSpeed JIT-compiles a shared-memory comm op at every initialize (+35 s cold): skip it.
- Megatron asks CUDA for the current device (attention buffers, RoPE) and for its RNG tracker:
  answer "cpu", and use the inference RNG tracker whose fork() does nothing.
- Megatron's pipeline schedules and MoE utils hard-code CUDA / Transformer-Engine symbols.
`apply()` is idempotent. It never runs on a machine with CUDA.
"""
from __future__ import annotations

import importlib
import types

_APPLIED = False


def apply() -> None:
    global _APPLIED
    import torch
    if _APPLIED or torch.cuda.is_available():
        return
    _APPLIED = True
    torch.cuda.current_device = lambda: "cpu"  # Megatron builds buffers on torch.cuda.current_device()
    _patch_deepspeed()
    _patch_megatron()
    _patch_megatron_tied_embeddings()


def _patch_deepspeed() -> None:
    try:
        comm_torch = importlib.import_module("deepspeed.comm.torch")
    except ImportError:
        return
    comm_torch.build_shm_op = lambda: None


def _patch_megatron() -> None:
    try:
        from megatron.core.optimizer import clip_grads, grad_scaler
        from megatron.core.optimizer import optimizer as megatron_optimizer
        from megatron.core.pipeline_parallel import schedules
        from megatron.core.transformer import utils as transformer_utils
        from megatron.core.transformer.moe import moe_utils
    except ImportError:
        return
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    moe_utils.te_general_gemm = getattr(moe_utils, "te_general_gemm", None)
    # Modules that allocate with device="cuda" (pipeline buffers, the default causal mask, the optimizer
    # wrappers' loss-scale and overflow tensors; torch_dist checkpoint writes sync CUDA before copying).
    for module in (schedules, transformer_utils, megatron_optimizer, clip_grads, grad_scaler, filesystem_async):
        if not isinstance(module.torch, _CpuTorchProxy):
            module.torch = _CpuTorchProxy(module.torch)


def _patch_megatron_tied_embeddings() -> None:
    """Tied input/output embeddings under pipeline parallelism: LanguageModule.setup_embeddings_and_output_layer
    moves the last stage's copy with `weight.data.cuda()` before all-reducing it with the first stage's.
    During that call only, Tensor.cuda() returns the tensor itself (a method, so the module proxy cannot)."""
    try:
        from megatron.core.models.common.language_module.language_module import LanguageModule
    except ImportError:
        return
    original = LanguageModule.setup_embeddings_and_output_layer
    if getattr(original, "_teonspeed_cpu", False):
        return
    import functools

    import torch

    @functools.wraps(original)
    def on_cpu(self, *args, **kwargs):
        real = torch.Tensor.cuda
        torch.Tensor.cuda = lambda t, *a, **k: t
        try:
            return original(self, *args, **kwargs)
        finally:
            torch.Tensor.cuda = real

    on_cpu._teonspeed_cpu = True
    LanguageModule.setup_embeddings_and_output_layer = on_cpu


def megatron_seed(seed: int) -> None:
    """model_parallel_cuda_manual_seed without CUDA: seeds torch and installs a no-op RNG tracker."""
    import torch
    from megatron.core import tensor_parallel
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True)


class _CpuTorchProxy(types.ModuleType):
    """`torch` as seen by one Megatron module, with device="cuda" sent to the CPU and no CUDA syncs."""

    def __init__(self, real):
        super().__init__("torch")
        self._real = real

    def __getattr__(self, name):
        attr = getattr(self._real, name)
        if name in ("zeros", "empty", "ones", "tensor", "full"):
            def on_cpu(*args, **kwargs):
                if str(kwargs.get("device", "")).startswith("cuda"):
                    kwargs["device"] = "cpu"
                return attr(*args, **kwargs)
            return on_cpu
        if name == "cuda":
            return _CpuCuda(attr)
        return attr


class _CpuCuda:
    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        if name in ("synchronize", "empty_cache"):
            return lambda *a, **k: None
        if name == "current_device":
            return lambda: "cpu"
        return getattr(self._real, name)


__all__ = ["apply", "megatron_seed"]
