"""Optional Triton kernels. Importing this package never fails: without triton (or with a broken
install) the kernel entry points below are stubs that raise ImportError when called.

    from teonspeed.kernels import triton_available, newton_schulz_triton
    if triton_available(x):
        X = newton_schulz_triton(x, schedule, torch.bfloat16)

`newton_schulz_triton` has the contract of teonspeed.ortho.newton_schulz.newton_schulz.

When triton is installed this package imports it (about 0.3 s) so that `newton_schulz_triton` here is
always the function, never the submodule of the same name. The kernels themselves are wrapped with
triton.jit only at their first call, so TRITON_INTERPRET may be set any time before that.
Nothing in teonspeed imports this package unless the Triton backend is asked for.
"""
from __future__ import annotations

import os

try:
    from .newton_schulz_triton import (Blocks, default_blocks, flops_per_step, lower_tile_pairs,
                                       newton_schulz_triton, ns_update, sym_grid, sym_matmul)
    TRITON_IMPORT_ERROR = None
except Exception as _exc:  # ImportError, or a triton install that fails while loading its libraries
    TRITON_IMPORT_ERROR = f"{type(_exc).__name__}: {_exc}"

    def _missing(*_args, **_kwargs):
        raise ImportError(f"teonspeed.kernels needs triton (pip install 'teonspeed[triton]'): {TRITON_IMPORT_ERROR}")

    newton_schulz_triton = sym_matmul = ns_update = lower_tile_pairs = sym_grid = _missing
    default_blocks = flops_per_step = Blocks = _missing


def triton_importable() -> bool:
    """Whether triton imported successfully (with the kernels module)."""
    return TRITON_IMPORT_ERROR is None


def triton_available(x) -> bool:
    """True when the Triton kernels can run on tensor x: triton imports, and x is on a CUDA device or
    TRITON_INTERPRET=1 (the CPU interpreter, for tests)."""
    if not triton_importable():
        return False
    return bool(getattr(x, "is_cuda", False)) or os.environ.get("TRITON_INTERPRET") == "1"


__all__ = ["triton_available", "triton_importable", "TRITON_IMPORT_ERROR", "newton_schulz_triton",
           "sym_matmul", "ns_update", "lower_tile_pairs", "sym_grid", "Blocks", "default_blocks",
           "flops_per_step"]
