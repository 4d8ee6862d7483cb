"""Benchmark of batched Newton–Schulz: Triton kernels vs the torch bf16 path vs torch.compile of it.

    .venv/bin/python bench/kernel.py                  # GPU: the full table (needs CUDA + triton)
    .venv/bin/python bench/kernel.py --no-compile     # GPU, skipping the torch.compile path
    .venv/bin/python bench/kernel.py --cpu-smoke      # any machine: tiny shapes, the CPU torch path and
                                                      # one interpreted Triton run; GPU rows are listed as
                                                      # "not measured yet (no GPU in this session)"

Writes bench/results/kernel_gpu.{json,md} or bench/results/kernel_cpu_smoke.{json,md}.

Paths (all with the same contract, x (B, m, n) fp32 in, compute dtype bf16 out; the Frobenius
normalisation is inside every timed call):
  torch     teonspeed.ortho.newton_schulz.newton_schulz(x, schedule, bf16)
  compile   torch.compile(newton_schulz) (default mode; the batch dim is marked dynamic, so one graph per
            matrix shape for batches >= 2 and one for batch 1, which keeps the compile time of the
            20-row table to a few graphs)
  triton    teonspeed.ortho.kernels.newton_schulz_triton(x, schedule, bf16)

FLOP convention (2 FLOPs per multiply-add, elementwise work not counted), per quintic step of a wide
m × n matrix (m <= n; tall ones run transposed):
  executed, torch/compile:  X Xᵀ 2m²n + A A 2m³ + B X 2m²n  =  4m²n + 2m³
  executed, triton:         X Xᵀ  m²n + A A  m³ + B X 2m²n  =  3m²n +  m³
The Triton kernels compute only the lower-triangle tiles of the two symmetric products, so they are
credited with half of those products (this ignores the redundant half of the diagonal tiles; it is the
honest count, not an inflated one). Columns:
  TFLOP/s executed   executed FLOPs / time: how hard the hardware works
  TFLOP/s effective  torch's 4m²n + 2m³ / time for every path: the rate of useful work, comparable
                     across paths (for triton it exceeds the executed rate by the skipped triangles)
  % peak             TFLOP/s executed / the bf16 peak measured in the same run with a large
                     torch.matmul (8192³ on GPU)
"""

from __future__ import annotations

import os
import sys

if "--cpu-smoke" in sys.argv:
    # The Triton interpreter must be switched on before triton (or torch._dynamo) is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Dict, List, Optional, Tuple  # noqa: E402

import torch  # noqa: E402

from teonspeed.ortho import kernels  # noqa: E402
from teonspeed.ortho.kernels import flops_per_step  # noqa: E402
from teonspeed.ortho.coefficients import schedule_for  # noqa: E402
from teonspeed.ortho.newton_schulz import newton_schulz  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GPU_SHAPES: List[Tuple[int, int]] = [(1024, 1024), (4096, 4096), (4096, 11008), (2048, 5632)]
GPU_BATCHES: List[int] = [1, 2, 4, 8, 16]
GPU_PATHS = ("torch", "compile", "triton")
NO_GPU = "not measured yet (no GPU in this session)"
PEAK_N_GPU = 8192


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny CPU run; GPU rows marked as not measured")
    p.add_argument("--method", default="ns5", choices=("ns5", "polar_express"))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--shapes", default=None, help="e.g. 1024x1024,4096x11008 (default: the GPU list)")
    p.add_argument("--batches", default=None, help="e.g. 1,4,16 (default: 1,2,4,8,16)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per row after warmup (GPU)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile path")
    p.add_argument("--threads", type=int, default=2, help="torch threads for --cpu-smoke")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    return p.parse_args(argv)


def parse_shapes(text: Optional[str]) -> List[Tuple[int, int]]:
    if not text:
        return list(GPU_SHAPES)
    return [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",")]  # type: ignore[misc]


def parse_batches(text: Optional[str]) -> List[int]:
    return [int(v) for v in text.split(",")] if text else list(GPU_BATCHES)


# ------------------------------------------------------------------------------------------- timing


def time_gpu(fn: Callable[[], object], warmup: int, repeats: int) -> List[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))  # ms
    return times


def time_cpu(fn: Callable[[], object], warmup: int, repeats: int) -> List[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return times


def matmul_peak(device: str, dtype: torch.dtype, sizes: Tuple[int, ...], warmup: int, repeats: int) -> dict:
    """The best rate of a square torch.matmul over `sizes` (one size on GPU: 8192³ saturates it; on the
    CPU the rate depends strongly on the size, so the best of several is the peak)."""
    timer = time_gpu if device == "cuda" else time_cpu
    per_size = {}
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        times = timer(lambda: torch.matmul(a, b), warmup, repeats)
        per_size[n] = {
            "median_ms": statistics.median(times),
            "min_ms": min(times),
            "tflops": 2 * n**3 / (min(times) * 1e-3) / 1e12,
        }
    best_n = max(per_size, key=lambda n: per_size[n]["tflops"])
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "n": best_n,
        "tflops": per_size[best_n]["tflops"],
        "per_size": per_size,
    }


# ------------------------------------------------------------------------------------------- rows


def row_flops(m: int, n: int, batch: int, steps: int, path: str) -> Tuple[int, int]:
    executed = batch * steps * flops_per_step(m, n, symmetric=(path == "triton"))
    effective = batch * steps * flops_per_step(m, n, symmetric=False)
    return executed, effective


def make_row(shape, batch, path, dtype, times_ms, peak_tflops, steps, **extra) -> dict:
    m, n = shape
    executed, effective = row_flops(m, n, batch, steps, path if path != "triton-interpreter" else "triton")
    med = statistics.median(times_ms)
    row = {
        "shape": f"{m}x{n}",
        "batch": batch,
        "path": path,
        "compute_dtype": dtype,
        "status": "measured",
        "repeats": len(times_ms),
        "median_ms": med,
        "min_ms": min(times_ms),
        "flops_executed": executed,
        "flops_effective": effective,
        "tflops_executed": executed / (med * 1e-3) / 1e12,
        "tflops_effective": effective / (med * 1e-3) / 1e12,
        "pct_peak": None,
    }
    if peak_tflops:
        row["pct_peak"] = 100.0 * row["tflops_executed"] / peak_tflops
    row.update(extra)
    return row


def pending_row(shape, batch, path, status) -> dict:
    m, n = shape
    return {
        "shape": f"{m}x{n}",
        "batch": batch,
        "path": path,
        "compute_dtype": "bfloat16",
        "status": status,
        "repeats": 0,
        "median_ms": None,
        "min_ms": None,
        "flops_executed": row_flops(m, n, batch, 5, path)[0],
        "flops_effective": row_flops(m, n, batch, 5, path)[1],
        "tflops_executed": None,
        "tflops_effective": None,
        "pct_peak": None,
    }


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------- GPU run


def run_gpu(
    args: argparse.Namespace, checkpoint: Callable[[dict, List[dict]], None] = lambda peak, rows: None
) -> Tuple[dict, List[dict]]:
    sched = schedule_for(args.method, args.steps)
    bf16 = torch.bfloat16
    peak = {"gpu": matmul_peak("cuda", bf16, (PEAK_N_GPU,), args.warmup, args.repeats)}
    print(f"bf16 matmul peak ({PEAK_N_GPU}³): {peak['gpu']['tflops']:.1f} TFLOP/s", flush=True)
    triton_ok = kernels.triton_available(torch.zeros(1, device="cuda"))
    compiled = None
    if not args.no_compile:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        compiled = torch.compile(newton_schulz)
    rows: List[dict] = []
    for shape in parse_shapes(args.shapes):
        for batch in parse_batches(args.batches):
            m, n = shape
            try:
                x = torch.randn(batch, m, n, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
                if batch > 1:
                    torch._dynamo.mark_dynamic(x, 0)
            except torch.OutOfMemoryError:
                rows += [pending_row(shape, batch, p, "OOM (input)") for p in GPU_PATHS]
                continue
            ref = newton_schulz(x, sched, bf16)
            ref32 = newton_schulz(x, sched, torch.float32)
            paths: Dict[str, Optional[Callable[[], torch.Tensor]]] = {
                "torch": lambda x=x: newton_schulz(x, sched, bf16),
                "compile": (lambda x=x: compiled(x, sched, bf16)) if compiled is not None else None,
                "triton": (lambda x=x: kernels.newton_schulz_triton(x, sched, bf16)) if triton_ok else None,
            }
            for path, fn in paths.items():
                if fn is None:
                    why = "skipped (--no-compile)" if path == "compile" else "skipped (triton not available)"
                    rows.append(pending_row(shape, batch, path, why))
                    continue
                try:
                    torch.cuda.reset_peak_memory_stats()
                    out = fn()
                    times = time_gpu(fn, args.warmup, args.repeats)
                    row = make_row(
                        shape,
                        batch,
                        path,
                        "bfloat16",
                        times,
                        peak["gpu"]["tflops"],
                        args.steps,
                        rel_diff_vs_torch=rel_diff(out, ref),
                        rel_diff_vs_fp32=rel_diff(out, ref32),
                        peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30,
                    )
                except torch.OutOfMemoryError:
                    row = pending_row(shape, batch, path, "OOM")
                rows.append(row)
                print_row(row)
            del x, ref, ref32, paths, fn  # the lambdas hold x: dropped with them
            torch.cuda.empty_cache()
        checkpoint(peak, rows)  # a run stopped by its time limit keeps the shapes it finished
    return peak, rows


# ------------------------------------------------------------------------------------------- CPU smoke


def run_cpu_smoke(args: argparse.Namespace) -> Tuple[dict, List[dict]]:
    torch.set_num_threads(args.threads)
    sched = schedule_for(args.method, args.steps)
    peaks = {
        "float32": matmul_peak("cpu", torch.float32, (256, 512, 1024), 1, 3),
        "bfloat16": matmul_peak("cpu", torch.bfloat16, (64, 128, 256, 512), 1, 3),
    }
    for k, v in peaks.items():
        print(f"CPU {k} matmul peak ({v['n']}³): {v['tflops'] * 1e3:.1f} GFLOP/s", flush=True)
    rows: List[dict] = []
    gen = torch.Generator().manual_seed(0)
    for shape, batch in (((64, 128), 1), ((64, 128), 4), ((128, 256), 1)):
        x = torch.randn(batch, *shape, generator=gen)
        ref32 = newton_schulz(x, sched, torch.float32)
        for dtype in (torch.float32, torch.bfloat16):
            name = str(dtype).replace("torch.", "")
            times = time_cpu(lambda: newton_schulz(x, sched, dtype), 1, 5)
            # No % of peak on the CPU: on a shared 2-core machine both rates swing by 2x between runs.
            row = make_row(
                shape,
                batch,
                "torch (CPU)",
                name,
                times,
                None,
                args.steps,
                rel_diff_vs_fp32=rel_diff(newton_schulz(x, sched, dtype), ref32),
            )
            rows.append(row)
            print_row(row)
    # One interpreted Triton run: a correctness smoke, not a performance number.
    x = torch.randn(2, 16, 32, generator=gen)
    if kernels.triton_available(x):
        out = kernels.newton_schulz_triton(x, sched, torch.bfloat16)  # warm the interpreter's rewrite
        times = time_cpu(lambda: kernels.newton_schulz_triton(x, sched, torch.bfloat16), 0, 1)
        per_matrix = torch.stack([newton_schulz(xi, sched, torch.bfloat16) for xi in x])
        row = make_row(
            (16, 32),
            2,
            "triton-interpreter",
            "bfloat16",
            times,
            None,
            args.steps,
            rel_diff_vs_torch=rel_diff(out, per_matrix),
            rel_diff_vs_fp32=rel_diff(out, newton_schulz(x, sched, torch.float32)),
            note="TRITON_INTERPRET=1 on the CPU: a correctness smoke, the time is the Python "
            "interpreter's and no TFLOP/s are given; rel diff vs torch is against the torch "
            "path run matrix by matrix (same rounding points as the kernels)",
        )
        row["tflops_executed"] = row["tflops_effective"] = None
    else:
        why = kernels.TRITON_IMPORT_ERROR or "TRITON_INTERPRET=1 was not in effect at triton's import"
        row = pending_row((16, 32), 2, "triton-interpreter", f"skipped ({why})")
    rows.append(row)
    print_row(row)
    for shape in GPU_SHAPES:
        for batch in GPU_BATCHES:
            for path in GPU_PATHS:
                rows.append(pending_row(shape, batch, path, NO_GPU))
    return {f"cpu {k}": v for k, v in peaks.items()}, rows


# ------------------------------------------------------------------------------------------- output


def fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def print_row(r: dict) -> None:
    print(
        f"{r['shape']:>10s} x{r['batch']:<3d} {r['path']:20s} {r['compute_dtype']:9s} "
        f"{fmt(r['median_ms'], '10.3f')} ms  exec {fmt(r['tflops_executed'], '.4f')} TFLOP/s  "
        f"eff {fmt(r['tflops_effective'], '.4f')}  peak% {fmt(r['pct_peak'], '.1f')}  "
        f"{r['status'] if r['status'] != 'measured' else ''}",
        flush=True,
    )


def machine_info(gpu: bool) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cuda_available": torch.cuda.is_available(),
        "triton": None,
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "loadavg": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001 - report, never fail
        info["triton"] = f"not importable: {type(exc).__name__}"
    if gpu:
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        try:
            import gpu_report

            env = gpu_report.environment()
            info.update(
                driver=env["driver"],
                gpu_memory=env["gpu_memory"],
                compute_capability=env["compute_capability"],
            )
        except Exception as exc:  # noqa: BLE001 - metadata only
            info["driver"] = f"unknown ({type(exc).__name__})"
    import gpu_report

    info.update(gpu_report.git_state())
    return info


def markdown(title: str, info: dict, peak: dict, rows: List[dict], args: argparse.Namespace) -> str:
    lines = [
        f"# {title}",
        "",
        f"Date {info['date']}; torch {info['torch']}, triton {info['triton']}, Python {info['python']}; "
        f"{info.get('gpu', 'no GPU')}"
        + (f" (driver {info.get('driver')}, CUDA {info.get('cuda')})" if info.get("gpu") else "")
        + f"; {info['platform']}, {info['cpu_count']} CPUs; "
        f"git {info.get('git_commit', '?')[:12]}{' (dirty tree)' if info.get('git_dirty') else ''}.",
        "",
        f"Schedule: {args.method} × {args.steps} steps. Input (B, m, n) fp32 Gaussian; every path includes "
        "the Frobenius normalisation and returns the compute dtype.",
        "",
        "FLOP convention (per step, wide m × n, 2 FLOPs per multiply-add): torch paths execute "
        "4m²n + 2m³; the Triton path computes only the lower-triangle tiles of X Xᵀ and A·A and is "
        "credited with 3m²n + m³. *TFLOP/s exec* = executed FLOPs / median time; *TFLOP/s eff* = "
        "4m²n + 2m³ / median time for every path (useful work, comparable across paths); *% peak* = "
        "exec / the matmul peak measured in this run.",
        "",
        "Rel diffs are relative Frobenius norms of the output against (a) the torch bf16 path, whose "
        "batched form rounds b·A and A·A separately (a few % apart from the kernels' single rounding is "
        "expected) and (b) the same iteration in fp32 (the bf16 rounding error of each path).",
        "",
        "Matmul peak, measured in this run (best rate of a square torch.matmul over the sizes listed):",
        "",
    ]
    for key, pk in peak.items():
        sizes = ", ".join(f"{n}³: {v['tflops']:.4g}" for n, v in pk["per_size"].items())
        lines.append(f"- {key}: **{pk['tflops']:.4g} TFLOP/s** ({sizes})")
    if not info.get("gpu"):
        lines.append(
            "- CPU rows give no % of peak: on this shared 2-core machine both rates swing by about "
            "2x between runs (load average at the end: " + str(info.get("loadavg")) + ")."
        )
    lines.append("")
    header = (
        "| shape | batch | path | dtype | median ms | min ms | TFLOP/s exec | TFLOP/s eff | % peak "
        "| rel diff vs torch bf16 | rel diff vs fp32 iteration | status |"
    )
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['batch']} | {r['path']} | {r['compute_dtype']} | "
            f"{fmt(r['median_ms'], '.3f')} | {fmt(r['min_ms'], '.3f')} | "
            f"{fmt(r['tflops_executed'], '.4g')} | {fmt(r['tflops_effective'], '.4g')} | "
            f"{fmt(r['pct_peak'], '.1f')} | {fmt(r.get('rel_diff_vs_torch'), '.2e')} | "
            f"{fmt(r.get('rel_diff_vs_fp32'), '.2e')} | {r['status']} |"
        )
    notes = [r for r in rows if r.get("note")]
    if notes:
        lines += ["", "Notes:"] + [f"- {r['path']} {r['shape']} x{r['batch']}: {r['note']}" for r in notes]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    gpu = torch.cuda.is_available() and not args.cpu_smoke
    if not gpu and not args.cpu_smoke:
        print(
            "no CUDA device: run with --cpu-smoke (GPU rows are then listed as not measured)", file=sys.stderr
        )
        return 2
    stem = "kernel_gpu" if gpu else "kernel_cpu_smoke"
    title = "Batched Newton–Schulz: Triton vs torch vs torch.compile" + ("" if gpu else " (CPU smoke run)")

    info = machine_info(gpu)  # once: write() runs after every shape

    def write(peak: dict, rows: List[dict]) -> None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        payload = {
            "machine": info,
            "method": args.method,
            "steps": args.steps,
            "peak": peak,
            "flop_convention": {
                "torch": "4*m^2*n + 2*m^3 per step",
                "triton": "3*m^2*n + m^3 per step",
                "m": "min(rows, cols)",
                "n": "max(rows, cols)",
            },
            "rows": rows,
        }
        (args.out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
        (args.out_dir / f"{stem}.md").write_text(markdown(title, info, peak, rows, args))

    peak, rows = run_gpu(args, write) if gpu else run_cpu_smoke(args)
    write(peak, rows)
    print(f"wrote {args.out_dir / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
