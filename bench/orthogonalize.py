"""CPU benchmark of teonspeed.orthogonalize: wall time and accuracy against the exact polar factor.

    .venv/bin/python bench/orthogonalize.py            # full run, under 2 minutes on 2 idle cores
    .venv/bin/python bench/orthogonalize.py --quick    # smoke run: two small shapes, one repeat

Writes bench/results/orthogonalize_cpu.{json,md} (the --quick run writes orthogonalize_cpu_quick.*, so
a smoke run never overwrites the full results). The reference U Vᵀ is taken in float64 from the same
fp32 input, so the error column measures the method, not the input's rounding.
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
from typing import Dict, List, Optional, Tuple

import torch

import teonspeed
from teonspeed.ortho import default_compute_dtype

from gpu_report import cpu_model  # bench/: one description of the machine

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
# CPU bf16 matmuls run ~50-80x slower than fp32 here (1024x1024 ns5: ~25 s per call), so the bf16 rows
# are limited to single matrices this small, and to fewer repeats, to keep the run within minutes.
BF16_MAX_ELEMENTS = 512 * 512
BF16_MAX_REPEATS = 3


@dataclass(frozen=True)
class Config:
    method: str
    compute_dtype: Optional[torch.dtype]  # None: the library's default for the input
    repeats: int


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


def configs_for(shape: Tuple[int, ...], repeats: int) -> List[Config]:
    configs = [Config(method, None, repeats) for method in METHODS]
    single_matrix = len(shape) == 2
    if single_matrix and shape[0] * shape[1] <= BF16_MAX_ELEMENTS:
        configs += [Config(m, torch.bfloat16, min(repeats, BF16_MAX_REPEATS)) for m in BF16_METHODS]
    return configs


def run(x: torch.Tensor, config: Config) -> torch.Tensor:
    return teonspeed.orthogonalize(x, config.method, compute_dtype=config.compute_dtype)


def time_interleaved(x: torch.Tensor, configs: List[Config]) -> Dict[Config, List[float]]:
    """Wall times per config, one warmup each, repeats taken round-robin across configs.

    Interleaving matters on a shared machine: a burst of foreign load then inflates one sample of
    every method rather than all samples of one, so the comparison within a shape stays fair.
    """
    for config in configs:
        run(x, config)  # warmup: first-call allocation and kernel selection are not what we measure
    times: Dict[Config, List[float]] = {config: [] for config in configs}
    for round_ in range(max(c.repeats for c in configs)):
        for config in configs:
            if round_ < config.repeats:
                start = time.perf_counter()
                run(x, config)
                times[config].append(time.perf_counter() - start)
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


def make_row(label: str, x: torch.Tensor, reference: torch.Tensor, config: Config, times: List[float]) -> Row:
    effective = config.compute_dtype or (
        torch.float32 if config.method == "svd" else default_compute_dtype(x)
    )
    return Row(
        case=label,
        shape=list(x.shape),
        method=config.method,
        compute_dtype=str(effective).replace("torch.", ""),
        bf16_on_cpu=effective == torch.bfloat16,
        repeats=len(times),
        median_ms=1e3 * statistics.median(times),
        min_ms=1e3 * min(times),
        **accuracy(run(x, config), reference),
    )


def bench_shape(label: str, shape: Tuple[int, ...], args: argparse.Namespace) -> Tuple[List[Row], float]:
    """The rows of one shape, and the input's smallest singular value over its Frobenius norm."""
    x = gaussian(shape, args.seed)
    reference = exact_polar(x)
    configs = configs_for(shape, args.repeats)
    times = time_interleaved(x, configs)
    rows = [make_row(label, x, reference, c, times[c]) for c in configs]
    return rows, normalised_sigma_min(x)


def normalised_sigma_min(x: torch.Tensor) -> float:
    # The scale the iterations start from: singular values far below the polynomials' design interval
    # (l = 1e-3 for Polar Express) cannot reach 1 in 5 steps, whatever the implementation.
    x64 = x.to(torch.float64)
    ratio = torch.linalg.svdvals(x64).amin(-1) / torch.linalg.matrix_norm(x64, ord="fro")
    return ratio.min().item()


def print_row(r: Row) -> None:
    print(
        f"{r.case:26s} {r.method:14s} {r.compute_dtype:9s} {r.median_ms:9.1f} ms (min {r.min_ms:8.1f})  "
        f"err {r.rel_fro_error:.2e}  σ [{r.sigma_min:.3g}, {r.sigma_max:.4f}]",
        flush=True,
    )


def machine_info(threads: int) -> dict:
    return {
        "processor": platform.processor(),
        "cpu_model": cpu_model(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        # Other processes on the same cores inflate the timings; a load above `threads` says so.
        "loadavg_1_5_15": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def markdown(rows: List[Row], info: dict, inputs: Dict[str, float]) -> str:
    header = (
        "| case | method | compute dtype | median ms | min ms | rel Frobenius err | σ min | σ p01 | σ max |"
    )
    lines = [
        "# teonspeed.orthogonalize on CPU",
        "",
        f"{info['cpu_model'] or info['processor']}, {info['torch_threads']} torch threads "
        f"(os.cpu_count()={info['cpu_count']}), torch {info['torch']}, Python {info['python']}, "
        f"{info['date']}; load average (1/5/15 min) at the end: {info['loadavg_1_5_15']}.",
        "",
        "Inputs: seeded Gaussian fp32. Error and σ (singular values of the output) are against the exact "
        "U Vᵀ of the same input computed in float64. σ p01 is the 1st percentile of the output's singular "
        "values. Rows marked **bfloat16** force compute_dtype=torch.bfloat16 (the CPU default is fp32). "
        "Repeats are interleaved across a shape's rows; under foreign load, trust min ms over median ms.",
        "",
        header,
        "|" + "---|" * (header.count("|") - 1),
    ]
    for r in rows:
        dtype = f"**{r.compute_dtype}**" if r.bf16_on_cpu else r.compute_dtype
        lines.append(
            f"| {r.case} | {r.method} | {dtype} | {r.median_ms:.1f} | {r.min_ms:.1f} "
            f"| {r.rel_fro_error:.2e} | {r.sigma_min:.3g} | {r.sigma_p01:.3g} | {r.sigma_max:.4f} |"
        )
    lines += [
        "",
        "Input conditioning: smallest singular value of the input over its Frobenius norm, the "
        "scale the iterations start from. Square Gaussians sit far below Polar Express's design "
        "bound l = 1e-3, which is why their σ min stays far below 1 for ns5 and polar_express.",
        "",
    ]
    lines += [f"- {label}: {v:.2e}" for label, v in inputs.items()]
    return "\n".join(lines) + "\n"


def write_results(args: argparse.Namespace, rows: List[Row], inputs: Dict[str, float]) -> None:
    info = machine_info(args.threads)
    stem = "orthogonalize_cpu_quick" if args.quick else "orthogonalize_cpu"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": info,
        "seed": args.seed,
        "repeats": args.repeats,
        "quick": args.quick,
        "input_sigma_min_over_fro": inputs,
        "rows": [asdict(r) for r in rows],
    }
    (args.out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.out_dir / f"{stem}.md").write_text(markdown(rows, info, inputs))
    print(f"wrote {args.out_dir / stem}.json and .md")


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows: List[Row] = []
    inputs: Dict[str, float] = {}
    for label, shape in QUICK_SHAPES if args.quick else FULL_SHAPES:
        shape_rows, inputs[label] = bench_shape(label, shape, args)
        for row in shape_rows:
            print_row(row)
        rows += shape_rows
    write_results(args, rows, inputs)


if __name__ == "__main__":
    main()
