"""Optional Triton kernels. Importing this package never fails: without triton (or with a broken
install) the kernel entry points below are stubs that raise ImportError when called.

    from teonspeed.ortho.kernels import triton_available, newton_schulz_triton
    if triton_available(x):
        X = newton_schulz_triton(x, schedule, torch.bfloat16)

`newton_schulz_triton` has the contract of teonspeed.ortho.newton_schulz.newton_schulz.

When triton is installed this package imports it (about 0.3 s) so that `newton_schulz_triton` here is
always the function, never the submodule of the same name. The kernels themselves are wrapped with
triton.jit only at their first call. The CPU interpreter (TRITON_INTERPRET=1) must be switched on
before triton's first import in the process (torch._dynamo imports triton, for one).
Nothing in teonspeed imports this package unless the Triton backend is asked for.
"""

from __future__ import annotations

import os
from typing import Optional

from .tiling import Blocks, default_blocks, flops_per_step, lower_tile_pairs, sym_grid  # no triton needed

TRITON_IMPORT_ERROR: Optional[str]
try:
    from .newton_schulz_triton import interpreter_ready, newton_schulz_triton, ns_update, sym_matmul

    TRITON_IMPORT_ERROR = None
except Exception as _exc:  # ImportError, or a triton install that fails while loading its libraries
    TRITON_IMPORT_ERROR = f"{type(_exc).__name__}: {_exc}"

    def _missing(*_args, **_kwargs):
        raise ImportError(
            f"teonspeed.ortho.kernels needs triton (pip install 'teonspeed[triton]'): {TRITON_IMPORT_ERROR}"
        )

    newton_schulz_triton = sym_matmul = ns_update = _missing  # type: ignore[assignment]

    def interpreter_ready() -> bool:
        return False


def triton_importable() -> bool:
    """Whether triton imported successfully (with the kernels module)."""
    return TRITON_IMPORT_ERROR is None


def triton_available(x) -> bool:
    """True when the Triton kernels can run on tensor x: triton imports, and x is on a CUDA device or
    TRITON_INTERPRET=1 (the CPU interpreter, for tests; it must have been set before triton was
    imported, else the interpreter cannot run and this is False for non-CUDA tensors)."""
    if not triton_importable():
        return False
    if bool(getattr(x, "is_cuda", False)):
        return True
    return os.environ.get("TRITON_INTERPRET") == "1" and interpreter_ready()


__all__ = [
    "triton_available",
    "triton_importable",
    "TRITON_IMPORT_ERROR",
    "newton_schulz_triton",
    "interpreter_ready",
    "sym_matmul",
    "ns_update",
    "lower_tile_pairs",
    "sym_grid",
    "Blocks",
    "default_blocks",
    "flops_per_step",
]
