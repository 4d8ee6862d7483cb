"""Make DeepSpeed 0.19.8 and megatron-core 0.16.x run on a CPU-only machine (tests and the CPU path only).

Each shim is the smallest change that was measured to be needed (shared/research/feasibility.md):
- DeepSpeed JIT-compiles a shared-memory comm op at every initialize (+35 s cold): skip it.
- Megatron asks CUDA for the current device (attention buffers, RoPE) and for its RNG tracker:
  answer "cpu", and use the inference RNG tracker whose fork() does nothing.
- Megatron's pipeline schedules and MoE utils hard-code CUDA / Transformer-Engine symbols.
- Megatron's bf16 wrapper and gradient clipping check for CUDA tensor types.
`apply()` is idempotent. It never runs on a machine with CUDA. Like every patch it checks the installed
versions first (WRITTEN_FOR) and refuses others: these shims reach into private names.
"""

from __future__ import annotations

import importlib
import types

_APPLIED = False
# The versions these shims were written against: "deepspeed" exact releases, megatron-core a minor series.
WRITTEN_FOR = {"deepspeed": ("0.19.8",), "megatron-core": ("0.16.",)}


class UnsupportedVersion(RuntimeError):
    pass


def check_versions() -> None:
    """Refuse an installed DeepSpeed or megatron-core these shims were not written for (absent is fine)."""
    from importlib import metadata

    for dist_name, prefixes in WRITTEN_FOR.items():
        try:
            version = metadata.version(dist_name)
        except metadata.PackageNotFoundError:
            continue
        if not any(version == p or (p.endswith(".") and version.startswith(p)) for p in prefixes):
            wanted = " or ".join(p + "x" if p.endswith(".") else p for p in prefixes)
            raise UnsupportedVersion(
                "teonspeed: the CPU shims (teonspeed/patches/cpu_shims.py) were written "
                f"for {dist_name} {wanted}, "
                f"but {dist_name} {version} is installed; install {dist_name} {wanted} to run on a "
                "CPU-only machine"
            )


def apply() -> None:
    global _APPLIED
    import torch

    if _APPLIED or torch.cuda.is_available():
        return
    check_versions()
    _APPLIED = True
    torch.cuda.current_device = lambda: "cpu"  # Megatron builds buffers on torch.cuda.current_device()
    _patch_deepspeed()
    _patch_megatron()
    _patch_megatron_tied_embeddings()
    _patch_megatron_optimizer_cuda_checks()


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
    for module in (
        schedules,
        transformer_utils,
        megatron_optimizer,
        clip_grads,
        grad_scaler,
        filesystem_async,
    ):
        if not isinstance(module.torch, _CpuTorchProxy):
            module.torch = _CpuTorchProxy(module.torch)


def _patch_megatron_tied_embeddings() -> None:
    """Tied input/output embeddings under pipeline parallelism:
    LanguageModule.setup_embeddings_and_output_layer moves the last stage's copy with `weight.data.cuda()`
    before all-reducing it with the first stage's.
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


def _patch_megatron_optimizer_cuda_checks() -> None:
    """Megatron's bf16/fp16 wrapper (Float16OptimizerWithFloat16Params.__init__) and its gradient clipping
    (clip_grad_by_total_norm_fp32) accept tensors by their CUDA type name; during those calls only,
    Tensor.type() names a CPU tensor by its CUDA type. Without Apex/TE the clip's norm falls back to
    megatron.core.utils.local_multi_tensor_l2_norm, which puts its result on CUDA: the same norm of the
    per-tensor norms is kept on the tensors' device instead."""
    try:
        from megatron.core import utils as megatron_utils
        from megatron.core.optimizer import clip_grads
        from megatron.core.optimizer import optimizer as megatron_optimizer
    except ImportError:
        return
    import functools

    import torch

    def as_cuda_types(original):
        if getattr(original, "_teonspeed_cpu", False):
            return original

        @functools.wraps(original)
        def on_cpu(*args, **kwargs):
            real = torch.Tensor.type
            torch.Tensor.type = lambda t, *a, **k: (
                real(t, *a, **k) if a or k or t.is_cuda else real(t).replace("torch.", "torch.cuda.", 1)
            )
            try:
                return original(*args, **kwargs)
            finally:
                torch.Tensor.type = real

        on_cpu._teonspeed_cpu = True
        return on_cpu

    wrapper = megatron_optimizer.Float16OptimizerWithFloat16Params
    wrapper.__init__ = as_cuda_types(wrapper.__init__)
    megatron_optimizer.clip_grad_by_total_norm_fp32 = as_cuda_types(
        megatron_optimizer.clip_grad_by_total_norm_fp32
    )
    if clip_grads.l2_norm_impl is megatron_utils.local_multi_tensor_l2_norm:

        def l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
            norms = torch.stack([torch.norm(t) for t in tensor_lists[0]])
            return torch.norm(norms).reshape(1).float(), None

        clip_grads.l2_norm_impl = l2_norm


def megatron_seed(seed: int) -> None:
    """model_parallel_cuda_manual_seed without CUDA: seeds torch and installs a no-op RNG tracker."""
    import torch
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True)


def local_transformer_options() -> dict:
    """TransformerConfig options for a megatron-core model built from its local modules (no Transformer
    Engine or apex), as the tests, bench/ and launch/ build theirs, on the CPU and on CUDA: the full
    weights are initialised on the CPU and sliced (the same numbers at any TP/PP), none of the fused kernels
    (they need Transformer Engine or apex), and pipeline sends one at a time. A new dict each call."""
    return dict(
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        batch_p2p_comm=False,
    )


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


__all__ = ["apply", "local_transformer_options", "megatron_seed"]
