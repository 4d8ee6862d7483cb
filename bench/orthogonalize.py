"""CPU benchmark of teonspeed.orthogonalize: wall time and accuracy against the exact polar factor.

    .venv/bin/python bench/orthogonalize.py            # full run, about 2 minutes on 2 cores
    .venv/bin/python bench/orthogonalize.py --quick    # smoke run: two small shapes, one repeat

Writes bench/results/orthogonalize_cpu{,_quick}.{json,md}. The reference U Vᵀ is taken in float64 from
the same fp32 input, so the error column measures the method, not the input's rounding.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch

import teonspeed

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# (label, shape); a leading dim is a batch of independent matrices.
FULL_SHAPES: List[Tuple[str, Tuple[int, ...]]] = [
    ("256x256", (256, 256)),
    ("512x512", (512, 512)),
    ("512x1376 (LLaMA-60M MLP)", (512, 1376)),
    ("1024x1024", (1024, 1024)),
    ("768x2048", (768, 2048)),
    ("8 x 256x256 (batched)", (8, 256, 256)),
]
QUICK_SHAPES: List[Tuple[str, Tuple[int, ...]]] = [
    ("256x256", (256, 256)),
    ("4 x 128x256 (batched)", (4, 128, 256)),
]
METHODS = ("ns5", "polar_express", "svd")
BF16_METHODS = ("ns5", "polar_express")
# CPU bf16 matmuls run ~80x slower than fp32 here (1024x1024 ns5: ~25 s per call), so the bf16 rows
# are limited to single matrices this small, and to fewer repeats, to keep the run within minutes.
BF16_MAX_ELEMENTS = 512 * 512
BF16_MAX_REPEATS = 3


@dataclass
class Row:
    case: str
    shape: List[int]
    method: str
    compute_dtype: str
    bf16_on_cpu: bool
    repeats: int
    median_ms: float
    min_ms: float
    rel_fro_error: float
    sigma_min: float
    sigma_max: float
    sigma_p01: float  # 1st percentile: where the bulk starts, unlike the single worst direction


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per row after one warmup (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="two small shapes, one repeat (smoke run)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = 1
    return args


def gaussian(shape: Tuple[int, ...], seed: int) -> torch.Tensor:
    # A fresh generator per shape keeps each input independent of which other shapes were run.
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float32)


def exact_polar(x: torch.Tensor) -> torch.Tensor:
    """U Vᵀ in float64, with no rank truncation: the ground truth every method is scored against."""
    U, _, Vh = torch.linalg.svd(x.to(torch.float64), full_matrices=False)
    return U @ Vh


def time_calls(fn, repeats: int) -> List[float]:
    fn()  # warmup: first-call allocation and kernel selection are not what we measure
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def accuracy(out: torch.Tensor, reference: torch.Tensor) -> dict:
    out64 = out.to(torch.float64)
    # Norms over the whole tensor, so a batch is scored as one block-diagonal matrix.
    rel = (torch.linalg.vector_norm(out64 - reference) / torch.linalg.vector_norm(reference)).item()
    sigma = torch.linalg.svdvals(out64).flatten()
    return {
        "rel_fro_error": rel,
        "sigma_min": sigma.min().item(),
        "sigma_max": sigma.max().item(),
        "sigma_p01": torch.quantile(sigma, 0.01).item(),
    }


def row_configs(shape: Tuple[int, ...], repeats: int):
    """(method, compute_dtype or None for the default, repeats) for every row of one shape."""
    for method in METHODS:
        yield method, None, repeats
    single_matrix = len(shape) == 2
    if single_matrix and shape[0] * shape[1] <= BF16_MAX_ELEMENTS:
        for method in BF16_METHODS:
            yield method, torch.bfloat16, min(repeats, BF16_MAX_REPEATS)


def bench_row(label: str, x: torch.Tensor, reference: torch.Tensor, method: str,
              compute_dtype: Optional[torch.dtype], repeats: int) -> Row:
    def call():
        return teonspeed.orthogonalize(x, method, compute_dtype=compute_dtype)

    times = time_calls(call, repeats)
    effective = compute_dtype or (torch.float32 if method == "svd" else teonspeed.default_compute_dtype(x))
    return Row(
        case=label, shape=list(x.shape), method=method,
        compute_dtype=str(effective).replace("torch.", ""),
        bf16_on_cpu=effective == torch.bfloat16, repeats=repeats,
        median_ms=1e3 * statistics.median(times), min_ms=1e3 * min(times),
        **accuracy(call(), reference),
    )


def machine_info(threads: int) -> dict:
    return {
        "processor": platform.processor(),
        "cpu_model": cpu_model(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def cpu_model() -> str:
    # platform.processor() is often empty or just "x86_64" on Linux; /proc/cpuinfo names the part.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def markdown(rows: List[Row], info: dict, inputs: dict) -> str:
    header = ("| case | method | compute dtype | median ms | min ms | rel Frobenius err "
              "| σ min | σ p01 | σ max |")
    lines = [
        "# teonspeed.orthogonalize on CPU",
        "",
        f"{info['cpu_model'] or info['processor']}, {info['torch_threads']} torch threads "
        f"(os.cpu_count()={info['cpu_count']}), torch {info['torch']}, Python {info['python']}, {info['date']}.",
        "",
        "Inputs: seeded Gaussian fp32. Error and σ (singular values of the output) are against the exact "
        "U Vᵀ of the same input computed in float64. σ p01 is the 1st percentile of the output's singular "
        "values. Rows marked **bf16** force compute_dtype=torch.bfloat16 (the CPU default is fp32).",
        "",
        header,
        "|" + "---|" * header.count("|")[:-1] if False else "|" + "---|" * (header.count("|") - 1),
    ]
    for r in rows:
        dtype = f"**{r.compute_dtype}**" if r.bf16_on_cpu else r.compute_dtype
        lines.append(f"| {r.case} | {r.method} | {dtype} | {r.median_ms:.1f} | {r.min_ms:.1f} "
                     f"| {r.rel_fro_error:.2e} | {r.sigma_min:.3g} | {r.sigma_p01:.3g} | {r.sigma_max:.4f} |")
    lines += ["", "Input conditioning (why σ min can sit far below the polynomial's target band): "
              "smallest singular value of the input divided by its Frobenius norm, the scale the "
              "iterations start from.", ""]
    lines += [f"- {label}: {v:.2e}" for label, v in inputs.items()]
    return "\n".join(lines) + "\n"


def normalised_sigma_min(x: torch.Tensor) -> float:
    x64 = x.to(torch.float64)
    ratio = torch.linalg.svdvals(x64).amin(-1) / torch.linalg.matrix_norm(x64, ord="fro")
    return ratio.min().item()


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    rows: List[Row] = []
    inputs = {}
    for label, shape in shapes:
        x = gaussian(shape, args.seed)
        reference = exact_polar(x)
        inputs[label] = normalised_sigma_min(x)
        for method, dtype, repeats in row_configs(shape, args.repeats):
            row = bench_row(label, x, reference, method, dtype, repeats)
            print(f"{label:28s} {method:14s} {row.compute_dtype:9s} {row.median_ms:10.1f} ms  "
                  f"err {row.rel_fro_error:.2e}  σ [{row.sigma_min:.3g}, {row.sigma_max:.4f}]", flush=True)
            rows.append(row)
    write_results(args, rows, inputs)


def write_results(args: argparse.Namespace, rows: List[Row], inputs: dict) -> None:
    info = machine_info(args.threads)
    stem = "orthogonalize_cpu_quick" if args.quick else "orthogonalize_cpu"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"machine": info, "seed": args.seed, "repeats": args.repeats, "quick": args.quick,
               "input_sigma_min_over_fro": inputs, "rows": [asdict(r) for r in rows]}
    (args.out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.out_dir / f"{stem}.md").write_text(markdown(rows, info, inputs))
    print(f"wrote {args.out_dir / stem}.json and .md")


if __name__ == "__main__":
    main()
