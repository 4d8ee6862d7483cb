"""Convergence study: AdamW vs Muon vs TEON vs HTMuon on the embedded corpus, at equal tokens.

    .venv/bin/python bench/convergence.py            # the default study (~1 hour on 2 CPU cores)
    .venv/bin/python bench/convergence.py --quick    # a few minutes: the same pipeline, tiny budgets

For each model size: a learning-rate sweep per optimizer (3 values), the best lr re-run with 3 seeds,
and TEON's group size K in {1, 2, 4} at TEON's best lr (K = 1 is Muon with TEON's other settings); then
one MoE and one MLA+MoE tiny config with AdamW, Muon and TEON. Every run is launch/pretrain.py's main()
on 2 data-parallel ranks forked from this process, reading the Megatron indexed datasets that
`launch/prepare_data.py --embedded` writes once. Results: bench/results/convergence[_quick].{json,md,png}.
The ordering is a measurement, not a test: nothing here asserts it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
PY = Path(sys.executable)
OPTIMIZERS = ("adamw", "muon", "teon", "htmuon")

# Learning-rate grids, centred on the values the papers' small models use (algorithms.md): AdamW 1e-3,
# Muon/TEON 0.01-0.04 (their lr is in spectral units), HTMuon 0.03.
LR_GRID = {"adamw": (1e-3, 3e-3, 1e-2), "muon": (0.01, 0.02, 0.04), "teon": (0.01, 0.02, 0.04),
           "htmuon": (0.01, 0.03, 0.06)}
ADAMW_LR_FOR_MATRIX_OPTIMIZERS = 3e-3  # the AdamW part (embeddings, head, norms) of Muon/TEON/HTMuon


@dataclass
class Size:
    name: str
    model_config: Optional[str]  # configs/models/<name>.yaml, None: pretrain.py's default tiny LLaMA
    steps: int
    extra: List[str] = field(default_factory=list)


DEFAULT_SIZES = [Size("tiny", None, 200), Size("small", "llama_small_cpu", 150)]
QUICK_SIZES = [Size("tiny", None, 30)]
ARCH_CONFIGS = ["moe_tiny", "mla_moe_tiny"]


@dataclass
class Run:
    size: str
    optimizer: str
    lr: float
    seed: int = 1234
    teon_k: Optional[int] = None
    model_config: Optional[str] = None
    steps: int = 200
    val_curve: List[List[float]] = field(default_factory=list)  # [step, validation loss]
    seconds: float = 0.0

    @property
    def name(self) -> str:
        k = f"_k{self.teon_k}" if self.teon_k else ""
        return f"conv_{self.size}_{self.optimizer}{k}_lr{self.lr:g}_s{self.seed}"

    @property
    def final_val(self) -> float:
        return self.val_curve[-1][1] if self.val_curve else math.inf


def prepare_data(data_dir: Path) -> None:
    if (data_dir / "train.idx").exists() or any(data_dir.glob("*train*.idx")):
        return
    subprocess.run([str(PY), "-m", "launch.prepare_data", "--embedded", "--output-dir", str(data_dir)], cwd=REPO,
                   check=True)


def _rank_main(rank, world_size, argv):
    from launch import pretrain
    return pretrain.main(argv)


def launch(run: Run, data_dir: Path, eval_every: int, log) -> Run:
    """One launch/pretrain.py run on 2 data-parallel ranks forked from this process (which has imported
    torch, DeepSpeed and Megatron once: a run starts in ~0.1 s instead of ~20 s under torchrun)."""
    from teonspeed.testing.harness import RankError, run_ranks
    argv = ["--optimizer", run.optimizer, "--steps", str(run.steps), "--seed", str(run.seed), "--name", run.name,
            "--eval-every", str(eval_every), "--data-dir", str(data_dir), "--progress", "off", "--no-plot",
            "--overwrite"]
    argv += ["--adamw-lr", str(run.lr)] if run.optimizer == "adamw" else \
        ["--lr", str(run.lr), "--adamw-lr", str(ADAMW_LR_FOR_MATRIX_OPTIMIZERS)]
    if run.teon_k:
        argv += ["--teon-k", str(run.teon_k)]
    if run.model_config:
        argv += ["--model-config", run.model_config]
    start = time.perf_counter()
    try:
        summary = run_ranks(_rank_main, 2, argv, timeout=3600)[0]
    except RankError as err:
        log(f"  FAILED {run.name}:\n{str(err)[-3000:]}")
        return run
    run.seconds = time.perf_counter() - start
    run.val_curve = [[int(step), float(val)] for step, val in summary["vals"]]
    log(f"  {run.name}: final val {run.final_val:.4f} ({run.seconds:.0f} s)")
    return run


def _prepare_parent() -> None:
    """Import the training stack once, single-threaded, so the ranks can be forked from here."""
    import os
    import warnings
    os.environ.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", MPLBACKEND="Agg")
    warnings.filterwarnings("ignore")
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, str(REPO))
    from teonspeed.testing import cpu_shims
    cpu_shims.apply()  # (what launch.pretrain does under --device cpu, once here for the forked ranks)
    from launch import pretrain, train  # noqa: F401  (megatron, deepspeed, teonspeed)


def steps_to_reach(curve: List[List[float]], target: float) -> Optional[float]:
    """First step at which the validation loss is <= target, linearly interpolated between evaluations."""
    for (s0, v0), (s1, v1) in zip(curve, curve[1:]):
        if v1 <= target:
            return s1 if v0 == v1 else s0 + (s1 - s0) * (v0 - target) / (v0 - v1)
    return None


def study(sizes: List[Size], seeds: List[int], arch_steps: int, data_dir: Path, eval_every: int, log,
          checkpoint=lambda results: None) -> Dict:
    """Run the protocol; `checkpoint(results)` is called after each size / architecture (partial results)."""
    results: Dict = {"sizes": {}, "architectures": {}}
    for size in sizes:
        log(f"[{size.name}] learning-rate sweep")
        sweep = {opt: [launch(Run(size.name, opt, lr, model_config=size.model_config, steps=size.steps), data_dir,
                              eval_every, log) for lr in LR_GRID[opt]] for opt in OPTIMIZERS}
        best = {opt: min(runs, key=lambda r: r.final_val) for opt, runs in sweep.items()}
        log(f"[{size.name}] seeds at the best lr: " + ", ".join(f"{o} {b.lr:g}" for o, b in best.items()))
        seeded = {opt: [best[opt]] + [launch(Run(size.name, opt, best[opt].lr, seed=s, model_config=size.model_config,
                                                 steps=size.steps), data_dir, eval_every, log) for s in seeds[1:]]
                  for opt in OPTIMIZERS}
        log(f"[{size.name}] TEON group size")
        k_runs = {2: best["teon"]}
        for k in (1, 4):
            k_runs[k] = launch(Run(size.name, "teon", best["teon"].lr, teon_k=k, model_config=size.model_config,
                                   steps=size.steps), data_dir, eval_every, log)
        results["sizes"][size.name] = {
            "steps": size.steps, "model_config": size.model_config or "pretrain.py default",
            "sweep": {o: [asdict(r) for r in runs] for o, runs in sweep.items()},
            "seeds": {o: [asdict(r) for r in runs] for o, runs in seeded.items()},
            "teon_k": {str(k): asdict(r) for k, r in sorted(k_runs.items())},
        }
        checkpoint(results)
    for config in ARCH_CONFIGS:
        log(f"[{config}] AdamW vs Muon vs TEON")
        runs = {}
        for opt in ("adamw", "muon", "teon"):
            lr = LR_GRID[opt][1]
            runs[opt] = asdict(launch(Run(config, opt, lr, model_config=config, steps=arch_steps), data_dir,
                                      eval_every, log))
        results["architectures"][config] = runs
        checkpoint(results)
    return results


def summarize(results: Dict) -> str:
    lines = []
    for size, data in results["sizes"].items():
        lines.append(f"\n### {size} ({data['model_config']}, {data['steps']} steps, 2 ranks)\n")
        lines.append("| optimizer | best lr | final val loss (mean ± std, 3 seeds) | perplexity | steps to AdamW's final val loss |")
        lines.append("|---|---|---|---|---|")
        adamw_target = statistics.mean(r["val_curve"][-1][1] for r in data["seeds"]["adamw"] if r["val_curve"])
        for opt, runs in data["seeds"].items():
            finals = [r["val_curve"][-1][1] for r in runs if r["val_curve"]]
            if not finals:
                lines.append(f"| {opt} | {runs[0]['lr']:g} | failed | | |")
                continue
            mean, std = statistics.mean(finals), statistics.pstdev(finals) if len(finals) > 1 else 0.0
            reach = [steps_to_reach(r["val_curve"], adamw_target) for r in runs if r["val_curve"]]
            reach_txt = ", ".join("not reached" if s is None else f"{s:.0f}" for s in reach)
            lines.append(f"| {opt} | {runs[0]['lr']:g} | {mean:.4f} ± {std:.4f} | {math.exp(mean):.2f} | {reach_txt} |")
        lines.append("\nLearning-rate sweep (final validation loss, seed 1234):\n")
        lines.append("| optimizer | " + " | ".join("lr" for _ in range(3)) + " |")
        lines.append("|---|---|---|---|")
        for opt, runs in data["sweep"].items():
            lines.append(f"| {opt} | " + " | ".join(f"{r['lr']:g}: {r['val_curve'][-1][1]:.4f}" if r["val_curve"]
                                                   else f"{r['lr']:g}: failed" for r in runs) + " |")
        lines.append("\nTEON group size K (K = 1 is Muon with TEON's settings):\n")
        lines.append("| K | final val loss |")
        lines.append("|---|---|")
        for k, r in data["teon_k"].items():
            lines.append(f"| {k} | " + (f"{r['val_curve'][-1][1]:.4f}" if r["val_curve"] else "failed") + " |")
    if results["architectures"]:
        lines.append("\n### MoE and MLA+MoE (tiny)\n")
        lines.append("| config | AdamW | Muon | TEON |")
        lines.append("|---|---|---|---|")
        for config, runs in results["architectures"].items():
            cells = [f"{runs[o]['val_curve'][-1][1]:.4f}" if runs[o]["val_curve"] else "failed"
                     for o in ("adamw", "muon", "teon")]
            lines.append(f"| {config} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: Dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sizes = list(results["sizes"].items())
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4), squeeze=False)
    for ax, (size, data) in zip(axes[0], sizes):
        for opt, runs in data["seeds"].items():
            run = runs[0]
            if run["val_curve"]:
                steps, vals = zip(*run["val_curve"])
                ax.plot(steps, vals, "o-", label=f"{opt} (lr {run['lr']:g})")
        ax.set_title(f"{size}: validation loss, best lr")
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny budgets: checks the pipeline in a few minutes")
    p.add_argument("--data-dir", default=str(REPO / "data" / "embedded"))
    p.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    args = p.parse_args()
    sizes = QUICK_SIZES if args.quick else DEFAULT_SIZES
    seeds = [1234, 1] if args.quick else [1234, 1, 2]
    eval_every = 10 if args.quick else 25
    arch_steps = 20 if args.quick else 150
    data_dir = Path(args.data_dir)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    _prepare_parent()
    prepare_data(data_dir)
    start = time.perf_counter()
    stem = "convergence_quick" if args.quick else "convergence"
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / f"{stem}.partial.json"
    results = study(sizes, seeds, arch_steps, data_dir, eval_every, log,
                    checkpoint=lambda r: partial.write_text(json.dumps(r, indent=1)))
    partial.unlink(missing_ok=True)
    results["machine"] = {"python": platform.python_version(), "platform": platform.platform(),
                          "cpus": __import__("os").cpu_count(), "date": datetime.datetime.now().isoformat(),
                          "wall_seconds": round(time.perf_counter() - start, 1)}
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    table = summarize(results)
    m = results["machine"]
    (out / f"{stem}.md").write_text(
        f"# Convergence study{' (quick)' if args.quick else ''}\n\n{m['platform']}, {m['cpus']} CPUs, Python {m['python']}, "
        f"{m['date']}; wall time {m['wall_seconds']:.0f} s. Every run: launch/pretrain.py on 2 processes (data "
        f"parallel), the embedded corpus as Megatron indexed datasets, equal tokens per optimizer.\n{table}\n")
    plot(results, out / f"{stem}.png")
    print(table)


if __name__ == "__main__":
    main()
