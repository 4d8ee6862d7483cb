"""One distributed step at world size 1 against the local step: the exchange code on real device tensors.

    python bench/gpu_world1.py              # CUDA + NCCL when a GPU is there (writes world1_gpu.{json,md})
    python bench/gpu_world1.py --cpu-smoke  # CPU + gloo, same checks (writes world1_cpu_smoke.{json,md})

For Muon, TEON and HTMuon on the tiny LLaMA parameter set (bench/optimizer_step.py), the same
parameters and gradients are stepped twice: by the optimizer built with no parallel context (the local
runner) and by one given the world group as TP and DP groups with parallel_mode="distributed", which at
world size 1 must still take the distributed runner (the owner exchange: all-to-alls, the non-finite
flag's all-reduce) on NCCL. The weights after --steps steps must agree: exactly in exact arithmetic,
here within --atol (the NS iteration runs in fp32 for this check so bf16 batching cannot hide a wrong
exchange). Reports which runner each optimizer took, the max abs difference, that every state tensor
is on the device, and the step times.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # the tests' harness (free_port)

import gpu_report  # noqa: E402
from optimizer_step import llama_param_shapes  # noqa: E402


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="CPU tensors and gloo (no GPU needed)")
    p.add_argument("--size", default="tiny")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--results-dir", type=Path, default=gpu_report.RESULTS_DIR)
    return p.parse_args(argv)


def make_params(size: str, device: torch.device):
    gen = torch.Generator(device="cpu").manual_seed(0)
    out = []
    for name, shape in llama_param_shapes(size):
        w = (torch.randn(*shape, generator=gen) * 0.02).to(device)
        g = (torch.randn(*shape, generator=gen) * 1e-3).to(device)
        out.append((name, w, g))
    return out


def run(kind: str, params, parallel, steps: int, sync) -> dict:
    import teonspeed

    named = []
    for name, w, g in params:
        p = torch.nn.Parameter(w.clone())
        p.grad = g.clone()
        named.append((name, p))
    cls = {"muon": teonspeed.Muon, "teon": teonspeed.TEON, "htmuon": teonspeed.HTMuon}[kind]
    # The reference (parallel=None) takes the local runner; only the distributed run forces the exchange.
    forced = {"parallel_mode": "distributed"} if parallel is not None else {}
    opt = cls(named, parallel=parallel, ns_dtype="fp32", **forced)
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        opt.step()
        sync()
        times.append(1e3 * (time.perf_counter() - t0))
    devices = {str(t.device) for st in opt.state.values() for t in st.values() if torch.is_tensor(t)}
    return {
        "runner": type(opt.runner).__name__,
        "weights": [p.detach() for _, p in named],
        "step_ms": times,
        "state_devices": sorted(devices),
    }


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if not cuda and not args.cpu_smoke:
        print("no CUDA device: run with --cpu-smoke", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    from support.harness import free_port

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1, **({"device_id": device} if cuda else {}))
    from teonspeed.parallel.context import ParallelContext

    world = dist.group.WORLD
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    params = make_params(args.size, device)
    rows = []
    try:
        for kind in ("muon", "teon", "htmuon"):
            local = run(kind, params, None, args.steps, sync)
            distributed = run(kind, params, ParallelContext(tp_group=world, dp_group=world), args.steps, sync)
            diff = max((a - b).abs().max().item() for a, b in zip(local["weights"], distributed["weights"]))
            took_exchange = distributed["runner"] == "DistributedRunner"
            on_device = distributed["state_devices"] == [str(device)]
            ok = took_exchange and diff <= args.atol and on_device
            status = (
                "passed"
                if ok
                else "FAILED: "
                + "; ".join(
                    m
                    for m, bad in (
                        (
                            "the distributed runner was not taken at world size 1 (forced parallel_mode="
                            "'distributed' not in this build?)",
                            not took_exchange,
                        ),
                        (f"max abs diff {diff:.3g} > atol {args.atol}", diff > args.atol),
                        (f"state on {distributed['state_devices']}, not {device}", not on_device),
                    )
                    if bad
                )
            )
            rows.append(
                {
                    "optimizer": kind,
                    "local_runner": local["runner"],
                    "distributed_runner": distributed["runner"],
                    "max_abs_diff": diff,
                    "state_devices": distributed["state_devices"],
                    "local_step_ms": local["step_ms"],
                    "distributed_step_ms": distributed["step_ms"],
                    "status": status,
                }
            )
            print(f"{kind}: {status} (diff {diff:.3g}, runner {distributed['runner']})", flush=True)
    finally:
        dist.destroy_process_group()
    env = gpu_report.environment()
    stem = "world1_gpu" if cuda else "world1_cpu_smoke"
    md = [
        f"# Distributed step at world size 1 ({backend}, {device}) vs the local step",
        "",
        gpu_report.environment_line(env),
        "",
        f"Parameter set {args.size}, {args.steps} steps, fp32 Newton–Schulz, tolerance {args.atol}. "
        "Times: each step's wall time (ms), the first includes state allocation.",
        "",
        "| optimizer | local runner | distributed runner | max abs diff | state on | local ms | "
        "distributed ms | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    md += [
        f"| {r['optimizer']} | {r['local_runner']} | {r['distributed_runner']} | {r['max_abs_diff']:.3g} | "
        f"{', '.join(r['state_devices'])} | {', '.join(f'{t:.1f}' for t in r['local_step_ms'])} | "
        f"{', '.join(f'{t:.1f}' for t in r['distributed_step_ms'])} | {r['status']} |"
        for r in rows
    ]
    gpu_report.write_result(
        stem,
        {
            "environment": env,
            "backend": backend,
            "device": str(device),
            "size": args.size,
            "steps": args.steps,
            "atol": args.atol,
            "rows": rows,
        },
        "\n".join(md),
        args.results_dir,
    )
    return 0 if all(r["status"] == "passed" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
