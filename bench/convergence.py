"""Convergence study: AdamW vs Muon vs TEON vs HTMuon on the embedded corpus, at equal tokens.

    .venv/bin/python bench/convergence.py            # the default study (~1 hour on 2 CPU cores)
    .venv/bin/python bench/convergence.py --quick    # a few minutes: the same pipeline, tiny budgets
    .venv/bin/python bench/convergence.py --teon-study [--size small --arms muon,teon_mode1]
                                                     # TEON vs Muon, fairly (~25 minutes for tiny)
    .venv/bin/python bench/convergence.py --teon-study --seeds 1234,1,2,3,4 --more-seeds OLD.json
    python3 bench/convergence.py --gpu [--arm teon_mode2]   # LLaMA-60M on one GPU (bench/gpu_preset.py)

The TEON study (`--teon-study`): Muon, TEON with each unfolding mode, Muon with TEON's orthogonalizer and
scaling (Polar Express, √(m/n)), TEON with Muon's (NS5, √max(1, m/n)) and HTMuon at 1× and 3× Muon's lr;
each arm gets its own lr sweep (TEON's steps by √2 = √K), extended until the best lr has a worse lr on
both sides, then its best lr with every seed; arms are compared seed by seed (paired differences).

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
    arm: Optional[str] = None  # a named variant (ARMS): its optimizer options go through a DeepSpeed config
    options: Dict = field(default_factory=dict)
    val_curve: List[List[float]] = field(default_factory=list)  # [step, validation loss]
    seconds: float = 0.0

    @property
    def name(self) -> str:
        k = f"_k{self.teon_k}" if self.teon_k else ""
        return f"conv_{self.size}_{self.arm or self.optimizer}{k}_lr{self.lr:g}_s{self.seed}"

    @property
    def final_val(self) -> float:
        return self.val_curve[-1][1] if self.val_curve else math.inf


def prepare_data(data_dir: Path) -> None:
    if (data_dir / "train.idx").exists() or any(data_dir.glob("*train*.idx")):
        return
    subprocess.run([str(PY), "-m", "launch.prepare_data", "--embedded", "--output-dir", str(data_dir)], cwd=REPO,
                   check=True)


DS_TYPES = {"teon": "TEON", "muon": "TeonspeedMuon", "htmuon": "TeonspeedHTMuon"}


def write_ds_config(run: Run, directory: Path) -> Path:
    """The optimizer block of a variant run (pretrain.py has flags only for lr, K and the optimizer; the
    orthogonalizer, scaling and unfolding mode go through --ds-config). Everything else (scheduler,
    ZeRO stage, clipping, weight decay 0.01) is what the flag path gives."""
    params = {"lr": run.lr, "adamw_lr": ADAMW_LR_FOR_MATRIX_OPTIMIZERS, "weight_decay": 0.01, **run.options}
    if run.teon_k:
        params["teon_k"] = run.teon_k
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{run.name}.json"
    path.write_text(json.dumps({"optimizer": {"type": DS_TYPES[run.optimizer], "params": params}}, indent=1))
    return path


def _rank_main(rank, world_size, argv):
    from launch import pretrain
    return pretrain.main(argv)


def launch(run: Run, data_dir: Path, eval_every: int, log) -> Run:
    """One launch/pretrain.py run on 2 data-parallel ranks forked from this process (which has imported
    torch, DeepSpeed and Megatron once: a run starts in ~0.1 s instead of ~20 s under torchrun)."""
    sys.path.insert(0, str(REPO / "tests"))  # the tests' fork-based rank harness
    from support.harness import RankError, run_ranks
    argv = ["--steps", str(run.steps), "--seed", str(run.seed), "--name", run.name,
            "--eval-every", str(eval_every), "--data-dir", str(data_dir), "--progress", "off", "--no-plot",
            "--overwrite"]
    if run.options:
        argv += ["--ds-config", str(write_ds_config(run, data_dir.parent / "ds_configs"))]
    else:
        argv += ["--optimizer", run.optimizer]
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
    from teonspeed.patches import cpu_shims
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


# ---------------------------------------------------------------------------------------------------
# The TEON study (issue 15): unfolding mode, matched orthogonalizer/scaling, each arm at its own best lr
# ---------------------------------------------------------------------------------------------------
@dataclass
class Arm:
    name: str
    optimizer: str
    options: Dict
    grid: tuple  # the starting lr grid; the sweep extends it until the best lr is inside
    what: str


PE_FAN = {"orthogonalizer": "polar_express", "lr_scale": "fan_ratio"}
NS5_SPECTRAL = {"orthogonalizer": "ns5", "lr_scale": "spectral"}
SQRT2 = math.sqrt(2.0)
# TEON's grids step by √2 = √K so that Muon's lr and Muon's lr × √K (what makes a stacked member's step as
# large as Muon's, algorithms.md §6) are both on it.
TEON_ARMS = [
    Arm("muon", "muon", dict(NS5_SPECTRAL), (0.005, 0.01, 0.02), "Muon default: NS5, √max(1, m/n)"),
    Arm("teon_mode1", "teon", {"teon_mode": 1, **PE_FAN}, (0.01 / SQRT2, 0.01, 0.01 * SQRT2, 0.02),
        "TEON, concatenated along the input dim (mode 1), PE, √(m/n)"),
    Arm("teon_mode2", "teon", {"teon_mode": 2, **PE_FAN}, (0.01 / SQRT2, 0.01, 0.01 * SQRT2, 0.02),
        "TEON, concatenated along the output dim (mode 2), PE, √(m/n)"),
    Arm("muon_pe_fan", "muon", dict(PE_FAN), (0.005, 0.01, 0.02), "Muon with TEON's settings: PE, √(m/n)"),
    Arm("teon_ns5_spectral", "teon", dict(NS5_SPECTRAL), (0.01 / SQRT2, 0.01, 0.01 * SQRT2, 0.02),
        "TEON (the better mode) with Muon's settings: NS5, √max(1, m/n)"),
    Arm("htmuon", "htmuon", {}, (), "HTMuon (p = 0.125, exact SVD), swept from 1× and 3× Muon's best lr (the authors' ratio)"),
]
# Which arm each arm is compared with, seed by seed (same seeds: same init and data order).
PAIRS = [("teon_mode1", "muon"), ("teon_mode2", "muon"), ("teon_mode2", "teon_mode1"), ("muon_pe_fan", "muon"),
         ("teon_mode1", "muon_pe_fan"), ("teon_mode2", "muon_pe_fan"), ("teon_ns5_spectral", "muon"),
         ("htmuon", "muon")]


def next_lr(grid: List[float], upward: bool) -> float:
    """One grid step beyond the edge (the grid's own ratio at that edge)."""
    lo, hi = (grid[-2], grid[-1]) if upward else (grid[1], grid[0])
    return hi * hi / lo


def adaptive_sweep(run_at, grid, max_extensions: int = 3) -> List[Run]:
    """Sweep `grid`; while the best lr is at an edge, add the next lr beyond that edge (at most
    `max_extensions` times), so the reported best is bracketed on both sides."""
    runs = {lr: run_at(lr) for lr in grid}
    for _ in range(max_extensions):
        lrs = sorted(runs)
        best = min(lrs, key=lambda lr: runs[lr].final_val)
        if len(lrs) < 2 or (lrs[0] < best < lrs[-1]) or not math.isfinite(runs[best].final_val):
            break
        lr = next_lr(lrs, upward=best == lrs[-1])
        runs[lr] = run_at(lr)
    return [runs[lr] for lr in sorted(runs)]


def paired(a: List[float], b: List[float]) -> Dict:
    """Seed-by-seed difference a − b: mean, sample std, standard error and t = mean / se."""
    diffs = [x - y for x, y in zip(a, b)]
    mean = statistics.mean(diffs)
    sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    se = sd / math.sqrt(len(diffs)) if diffs else 0.0
    return {"diffs": diffs, "mean": mean, "sd": sd, "se": se, "t": mean / se if se > 0 else math.inf, "n": len(diffs)}


def teon_study(size: Size, seeds: List[int], data_dir: Path, eval_every: int, log, arms=None,
               checkpoint=lambda results: None, previous: Optional[Dict] = None) -> Dict:
    """`previous`: an earlier result of the same size and steps. Its runs are reused (same arm, lr and
    seed) and only the missing ones run: more seeds, or a sweep extended further, without redoing the rest."""
    arms = arms or TEON_ARMS
    out: Dict = {"size": size.name, "steps": size.steps, "model_config": size.model_config or "pretrain.py default",
                 "seeds_used": seeds, "arms": {}}
    if previous and (previous["size"], previous["steps"]) != (size.name, size.steps):
        raise ValueError(f"--more-seeds: {previous['size']} at {previous['steps']} steps is another study")
    done = {(r["arm"], round(r["lr"], 12), r["seed"]): r for a in (previous or {}).get("arms", {}).values()
            for r in a["sweep"] + a["seeds"]}

    def run_at(arm: Arm, lr: float, seed: int = seeds[0]) -> Run:
        earlier = done.get((arm.name, round(lr, 12), seed))
        if earlier is not None:
            return Run(**earlier)
        return launch(Run(size.name, arm.optimizer, lr, seed=seed, model_config=size.model_config, steps=size.steps,
                          arm=arm.name, options=dict(arm.options)), data_dir, eval_every, log)

    for arm in arms:
        if arm.name == "teon_ns5_spectral":  # the unfolding mode that did better, with Muon's settings
            better = min((1, 2), key=lambda m: _seed_mean(out["arms"].get(f"teon_mode{m}")))
            arm = Arm(arm.name, arm.optimizer, {**arm.options, "teon_mode": better}, arm.grid, arm.what)
        grid = arm.grid
        if arm.name == "htmuon":  # the authors' ratio: HTMuon lr = 3 × Muon's (0.03 vs 0.01 at 60M)
            if "muon" not in out["arms"]:
                raise ValueError("the htmuon arm is placed by Muon's best lr: include the muon arm")
            muon_best = out["arms"]["muon"]["best_lr"]
            grid = (muon_best, 3 * muon_best)
        sweep = adaptive_sweep(lambda lr: run_at(arm, lr), grid)
        best = min(sweep, key=lambda r: r.final_val)
        log(f"[{size.name}] {arm.name}: best lr {best.lr:g}; seeds {seeds[1:]}")
        seeded = [best] + [run_at(arm, best.lr, seed) for seed in seeds[1:]]
        out["arms"][arm.name] = {"what": arm.what, "optimizer": arm.optimizer, "options": arm.options,
                                 "best_lr": best.lr, "sweep": [asdict(r) for r in sweep],
                                 "seeds": [asdict(r) for r in seeded]}
        checkpoint(out)
    out["pairs"] = {f"{a} - {b}": paired(_finals(out["arms"][a]), _finals(out["arms"][b]))
                    for a, b in PAIRS if a in out["arms"] and b in out["arms"]}
    return out


def _finals(arm: Dict) -> List[float]:
    return [r["val_curve"][-1][1] if r["val_curve"] else math.inf for r in arm["seeds"]]


def _seed_mean(arm: Optional[Dict]) -> float:
    return statistics.mean(_finals(arm)) if arm else math.inf


def summarize_teon(study_result: Dict) -> str:
    r = study_result
    n = len(r["seeds_used"])
    lines = [f"\n### TEON study: {r['size']} ({r['model_config']}, {r['steps']} steps, 2 ranks, seeds {r['seeds_used']})\n",
             f"| arm | what | best lr | final val loss (mean ± std, {n} seeds) | lr sweep (seed {r['seeds_used'][0]}) |",
             "|---|---|---|---|---|"]
    for name, arm in r["arms"].items():
        finals = _finals(arm)
        std = statistics.stdev(finals) if len(finals) > 1 else 0.0
        sweep = ", ".join(f"{x['lr']:.4g}: {x['val_curve'][-1][1]:.4f}" if x["val_curve"] else f"{x['lr']:.4g}: failed"
                          for x in arm["sweep"])
        lrs = [x["lr"] for x in arm["sweep"]]
        edge = " (grid edge)" if len(lrs) > 2 and arm["best_lr"] in (min(lrs), max(lrs)) else ""
        lines.append(f"| {name} | {arm['what']} | {arm['best_lr']:.4g}{edge} | {statistics.mean(finals):.4f} ± {std:.4f} "
                     f"| {sweep} |")
    if r.get("pairs"):
        lines += ["\nPaired by seed, each arm at its own best lr (difference of final validation loss; negative: "
                  "the first arm is better; t = mean / (sd/√n)):\n",
                  "| comparison | per-seed differences | mean ± sd | t |", "|---|---|---|---|"]
        for name, p in r["pairs"].items():
            diffs = ", ".join(f"{d:+.4f}" for d in p["diffs"])
            lines.append(f"| {name} | {diffs} | {p['mean']:+.4f} ± {p['sd']:.4f} | {p['t']:.1f} |")
    return "\n".join(lines)


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


def machine(start: float) -> Dict:
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": __import__("os").cpu_count(),
            "date": datetime.datetime.now().isoformat(), "wall_seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny budgets: checks the pipeline in a few minutes")
    p.add_argument("--teon-study", action="store_true",
                   help="the TEON study: unfolding modes, matched settings, own lr sweeps, paired seeds (tiny model)")
    p.add_argument("--gpu", action="store_true",
                   help="LLaMA-60M on one GPU on a >= 100M-token corpus built offline (bench/gpu_preset.py)")
    p.add_argument("--arm", action="append", default=[],
                   help="--gpu: only this arm (adamw, muon, teon_mode1, teon_mode2, htmuon); repeatable")
    p.add_argument("--corpus-dir", default=str(REPO / "data" / "gpu_corpus"), help="--gpu: where the corpus goes")
    p.add_argument("--time-limit", type=float, default=None, help="--gpu: seconds of training per arm (480)")
    p.add_argument("--steps", type=int, default=None, help="override the steps per run")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 1234,1,2)")
    p.add_argument("--size", default="tiny", choices=["tiny", "small"], help="--teon-study: the model")
    p.add_argument("--arms", default=None, help="--teon-study: comma-separated arm names (default: all)")
    p.add_argument("--more-seeds", default=None,
                   help="--teon-study: an earlier result JSON; reuse its runs, run only the missing ones")
    p.add_argument("--data-dir", default=str(REPO / "data" / "embedded"))
    p.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    args = p.parse_args()
    if args.gpu:
        import dataclasses
        sys.path.insert(0, str(REPO / "bench"))
        from gpu_preset import Preset, run_gpu_preset, summarize_gpu
        preset = Preset()
        if args.steps:
            preset = dataclasses.replace(preset, steps=args.steps)
        if args.time_limit:
            preset = dataclasses.replace(preset, time_limit=args.time_limit)
        results = run_gpu_preset(args.arm, Path(args.out_dir), Path(args.corpus_dir), preset,
                                 log=lambda msg: print(msg, flush=True))
        print(summarize_gpu(results))
        return
    sizes = QUICK_SIZES if args.quick else DEFAULT_SIZES
    seeds = [1234, 1] if args.quick else [1234, 1, 2]
    if args.seeds:
        seeds = [int(x) for x in args.seeds.split(",")]
    eval_every = 10 if args.quick else 25
    arch_steps = 20 if args.quick else 150
    data_dir = Path(args.data_dir)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    _prepare_parent()
    prepare_data(data_dir)
    start = time.perf_counter()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.teon_study:
        base = next(s for s in DEFAULT_SIZES if s.name == args.size)
        stem = f"convergence_teon{'' if args.size == 'tiny' else '_' + args.size}{'_quick' if args.quick else ''}"
        size = Size(args.size, base.model_config, args.steps or (sizes[0].steps if args.quick else base.steps))
        arms = [a for a in TEON_ARMS if a.name in args.arms.split(",")] if args.arms else None
        previous = json.loads(Path(args.more_seeds).read_text()) if args.more_seeds else None
        partial = out / f"{stem}.partial.json"
        result = teon_study(size, seeds, data_dir, eval_every, log, arms=arms, previous=previous,
                            checkpoint=lambda r: partial.write_text(json.dumps(r, indent=1)))
        partial.unlink(missing_ok=True)
        result["machine"] = machine(start)
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
        m = result["machine"]
        table = summarize_teon(result)
        (out / f"{stem}.md").write_text(
            f"# TEON study{' (quick)' if args.quick else ''}\n\n{m['platform']}, {m['cpus']} CPUs, Python "
            f"{m['python']}, {m['date']}; wall time {m['wall_seconds']:.0f} s. Every run: launch/pretrain.py on 2 "
            f"processes (data parallel), the embedded corpus, equal tokens.\n{table}\n")
        print(table)
        return
    stem = "convergence_quick" if args.quick else "convergence"
    partial = out / f"{stem}.partial.json"
    results = study(sizes, seeds, arch_steps, data_dir, eval_every, log,
                    checkpoint=lambda r: partial.write_text(json.dumps(r, indent=1)))
    partial.unlink(missing_ok=True)
    results["machine"] = machine(start)
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
