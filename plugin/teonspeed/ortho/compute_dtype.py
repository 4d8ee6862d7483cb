"""The dtype the Newton–Schulz iteration runs in when the user leaves it to us (ns_dtype="auto").

Chosen by what the device does, not by a guess about it:
  - fp64 input stays fp64 (a reference computation asked for it);
  - CUDA: bf16 (tensor cores; the iteration is built to tolerate bf16 rounding);
  - CPU: bf16 only where a bf16 matrix product is clearly faster than an fp32 one. CPUs range from
    AVX512-BF16/AMX parts, where bf16 runs 2-3x faster, to ones that emulate it 5-80x slower, and
    torch reports no capability that predicts which; so the decision is a small timing probe, run
    once per process and cached. TEONSPEED_CPU_BF16=1/0 fixes the answer (reproducible runs, tests);
  - anything else (meta, mps, xpu...): fp32, the dtype every backend runs well.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Callable, Optional, Tuple

import torch

CPU_BF16_ENV = "TEONSPEED_CPU_BF16"
PROBE_SIZE = 384  # big enough to reach the matmul kernels' steady rate, small enough for ~50 ms
PROBE_REPEATS = 2
PROBE_ROUNDS = 3
MIN_BF16_SPEEDUP = 1.2  # bf16 costs precision: take it only for a margin above timing noise

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_cpu_bf16_env(value: Optional[str]) -> Optional[bool]:
    """TEONSPEED_CPU_BF16's value -> True/False, or None when unset or empty (then the probe decides)."""
    if value is None or value.strip() == "":
        return None
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(
        f"{CPU_BF16_ENV} must be 1 or 0 (bf16 or fp32 for ns_dtype='auto' on the CPU), got {value!r}; "
        f"unset it to let a timing probe decide"
    )


def check_cpu_bf16_env() -> None:
    """Raise now if TEONSPEED_CPU_BF16 is set to something other than 1/0."""
    parse_cpu_bf16_env(os.environ.get(CPU_BF16_ENV))


def prefers_bf16(fp32_seconds: float, bf16_seconds: float, min_speedup: float = MIN_BF16_SPEEDUP) -> bool:
    """The decision, as a pure function of the two measured times."""
    return bf16_seconds * min_speedup < fp32_seconds


def time_cpu_matmul(dtype: torch.dtype, n: int = PROBE_SIZE, repeats: int = PROBE_REPEATS) -> float:
    """Best-of-`repeats` seconds of one n×n×n CPU matrix product in `dtype` (after one warm-up)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return best


def probe_cpu_bf16(
    timer: Callable[[torch.dtype], float] = time_cpu_matmul, rounds: int = PROBE_ROUNDS
) -> Tuple[bool, float, float]:
    """(bf16 chosen, fp32 seconds, bf16 seconds): the best of `rounds` alternating timings of each, so
    that a load spike on a shared machine hits both dtypes rather than deciding between them."""
    fp32 = bf16 = float("inf")
    for _ in range(rounds):
        fp32 = min(fp32, timer(torch.float32))
        bf16 = min(bf16, timer(torch.bfloat16))
    return prefers_bf16(fp32, bf16), fp32, bf16


@functools.lru_cache(maxsize=1)
def _cached_cpu_probe() -> Tuple[bool, float, float]:
    return probe_cpu_bf16()


def cpu_bf16_decision() -> dict:
    """How ns_dtype="auto" resolves on this process's CPU, and why (for benches and reports)."""
    forced = parse_cpu_bf16_env(os.environ.get(CPU_BF16_ENV))
    if forced is not None:
        return {"bf16": forced, "source": f"{CPU_BF16_ENV}={os.environ[CPU_BF16_ENV]}"}
    chosen, fp32, bf16 = _cached_cpu_probe()
    return {
        "bf16": chosen,
        "source": "probe",
        "probe_size": PROBE_SIZE,
        "fp32_ms": 1e3 * fp32,
        "bf16_ms": 1e3 * bf16,
        "bf16_speedup": fp32 / bf16 if bf16 > 0 else None,
        "min_speedup": MIN_BF16_SPEEDUP,
    }


def compute_dtype_for(x: torch.Tensor) -> torch.dtype:
    """The iteration's dtype for data `x` when none was asked for."""
    if x.dtype == torch.float64:
        return torch.float64
    if x.device.type == "cuda":
        return torch.bfloat16
    if x.device.type == "cpu":
        return torch.bfloat16 if cpu_bf16_decision()["bf16"] else torch.float32
    return torch.float32


__all__ = [
    "CPU_BF16_ENV",
    "check_cpu_bf16_env",
    "compute_dtype_for",
    "cpu_bf16_decision",
    "parse_cpu_bf16_env",
    "prefers_bf16",
    "probe_cpu_bf16",
    "time_cpu_matmul",
]
