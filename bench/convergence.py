"""Convergence study: AdamW vs Muon vs TEON vs HTMuon on the embedded corpus, at equal tokens.

    .venv/bin/python bench/convergence.py            # the default study (every model in DEFAULT_MODELS)
    .venv/bin/python bench/convergence.py --models tiny,mla_moe_tiny,dense_mha_tiny   # a subset, in order
    .venv/bin/python bench/convergence.py --quick    # a few minutes: the same protocol, tiny budgets
    .venv/bin/python bench/convergence.py --teon-study [--size small --arms muon,teon_mode1]
                                                     # TEON vs Muon, fairly
    .venv/bin/python bench/convergence.py --teon-study --seeds 1234,1,2,3,4 --more-seeds OLD.json
    python3 bench/convergence.py --gpu [--arm teon_mode2]   # LLaMA-60M on one GPU (bench/gpu_preset.py)

The protocol, per model (MODELS): AdamW's lr is swept (ADAMW_GRID, extended until its best lr has a worse
lr on both sides). Every orthogonalizing optimizer has two learning rates, its matrices' (`lr`) and its
AdamW part's (`adamw_lr`: embeddings, output head, norms, router), and both are swept jointly: `lr` over
MATRIX_LR_GRID (HTMuon: Muon's best lr and 3x it, the authors' ratio) times `adamw_lr` over the AdamW arm's
best lr x ADAMW_PART_FACTORS, each axis extended through the best cell until bracketed. Every row's best
setting is re-run with 3 seeds; each optimizer is compared with AdamW seed by seed (same seed: same data
order and, within a model, the same initialisation): the paired difference of the final validation loss
with its t statistic, the perplexity difference in %, and the steps each seed needs to reach AdamW's final
validation loss of the same seed. On the dense models TEON's group size K in {1, 2, 4} is re-run at TEON's
best setting. The seed paper's comparison (Muon with MLA+MoE, arXiv 2509.24406) is read off mla_moe_tiny
and dense_mha_tiny (a dense multi-head-attention LLaMA of the same width and depth, AdamW).

Every run is launch/pretrain.py's main() on 2 data-parallel ranks forked from this process, reading the
Megatron indexed datasets that `launch/prepare_data.py --embedded` writes once, with the orthogonalizer in
fp32 (TEONSPEED_CPU_BF16=0, so no timing probe decides the arithmetic). Run directories go to a temporary
folder (removed at the end) unless --runs-dir names one. Every finished run is recorded in
bench/results/<stem>.partial.json as it finishes, and in <stem>.json with the tables; the same command run
again reuses both (the protocol is deterministic given the results), so an interrupted study continues where
it stopped. The tables are
rewritten after each model (marked partial until every model is done): bench/results/<stem>.{json,md,png}.
The ordering is a measurement, not a test: nothing here asserts it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
PY = Path(sys.executable)
OPTIMIZERS = ("adamw", "muon", "teon", "htmuon")

# Starting grids (each sweep extends itself until its best value is bracketed). AdamW: around the tiny
# models' optimum (issue 24: 0.006 on both tiny models); the matrices' lr in spectral units, around the
# papers' small-model values (algorithms.md: Muon 0.01-0.02, TEON 0.02 with fan_ratio scaling).
ADAMW_GRID = (3e-3, 6e-3, 1.2e-2)
MATRIX_LR_GRID = {"muon": (0.005, 0.01, 0.02), "teon": (0.01, 0.02, 0.04)}
HTMUON_RATIO = 3.0  # HTMuon's lr / Muon's (the authors': 0.03 vs 0.01 at 60M-135M)
ADAMW_PART_FACTORS = (0.5, 1.0, 2.0)  # the AdamW part's lr: the AdamW arm's best lr times these
# Rounds of extension of a joint sweep (each runs the best cell's missing neighbours). 3 left four rows of
# the first study at an edge of their sweep; 6 is a cap against a sweep that never turns, not a budget.
JOINT_SWEEP_ROUNDS = 6
Train = Callable[["Run"], "Run"]


@dataclass
class Size:
    name: str
    model_config: Optional[str]  # configs/models/<name>.yaml, None: pretrain.py's default tiny LLaMA
    steps: int
    extra: List[str] = field(default_factory=list)  # more launch/pretrain.py flags (the model's shape)
    optimizers: tuple = OPTIMIZERS
    teon_ks: tuple = ()  # re-run TEON's best setting at these group sizes K (the default is 2); each must
    # divide the model's layers (the launcher refuses a K that leaves layers to Muon)
    what: str = ""


MODELS = {
    s.name: s
    for s in [
        Size(
            "tiny",
            None,
            200,
            teon_ks=(1, 4),
            what="pretrain.py's default: LLaMA-style, 4 layers, hidden 64, GQA 4 heads / 2 groups, "
            "dense SwiGLU",
        ),
        Size(
            "mla_moe_tiny",
            "mla_moe_tiny",
            200,
            what="MLA (q/kv low rank) + MoE (4 experts top-2 + shared expert, first layer dense)",
        ),
        Size(
            "dense_mha_tiny",
            None,
            200,
            ["--groups", "4"],
            optimizers=("adamw",),
            what="the seed paper's baseline at tiny size: tiny with multi-head attention (4 heads / 4 "
            "groups), dense SwiGLU, AdamW only",
        ),
        Size("moe_tiny", "moe_tiny", 200, what="LLaMA-style MoE, 4 experts top-2 in every layer"),
        Size("small", "llama_small_cpu", 150, teon_ks=(1, 3), what="llama_small_cpu (6 layers, hidden 128)"),
    ]
}
DEFAULT_MODELS = ("tiny", "mla_moe_tiny", "dense_mha_tiny", "moe_tiny", "small")
QUICK_STEPS = 30


@dataclass
class Run:
    size: str
    optimizer: str
    lr: float  # the matrices' lr; AdamW's own for optimizer adamw
    adamw_lr: Optional[float] = None  # the AdamW part's lr (None for optimizer adamw)
    seed: int = 1234
    teon_k: Optional[int] = None
    model_config: Optional[str] = None
    steps: int = 200
    extra: List[str] = field(default_factory=list)
    arm: Optional[str] = None  # a named variant (ARMS): its optimizer options go through a DeepSpeed config
    options: Dict = field(default_factory=dict)
    val_curve: List[List[float]] = field(default_factory=list)  # [step, validation loss]
    seconds: float = 0.0

    @property
    def name(self) -> str:
        k = f"_k{self.teon_k}" if self.teon_k else ""
        part = f"_alr{self.adamw_lr:g}" if self.adamw_lr is not None else ""
        return f"conv_{self.size}_{self.arm or self.optimizer}{k}_lr{self.lr:g}{part}_s{self.seed}"

    @property
    def key(self) -> str:
        """What the run is (not what it measured): equal keys, equal runs."""
        what = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("val_curve", "seconds")}
        for lr in ("lr", "adamw_lr"):
            what[lr] = None if what[lr] is None else float(f"{what[lr]:.10g}")
        return json.dumps(what, sort_keys=True)

    @property
    def final_val(self) -> float:
        return self.val_curve[-1][1] if self.val_curve else math.inf


def score(run) -> float:
    """The final validation loss, a diverged (NaN) run ranked last."""
    return run.final_val if math.isfinite(run.final_val) else math.inf


def as_run(record: Dict) -> Run:
    return Run(**{f.name: record[f.name] for f in fields(Run) if f.name in record})


def prepare_data(data_dir: Path) -> None:
    if (data_dir / "train.idx").exists() or any(data_dir.glob("*train*.idx")):
        return
    subprocess.run(
        [str(PY), "-m", "launch.prepare_data", "--embedded", "--output-dir", str(data_dir)],
        cwd=REPO,
        check=True,
    )


DS_TYPES = {"teon": "TEON", "muon": "TeonspeedMuon", "htmuon": "TeonspeedHTMuon"}


def write_ds_config(run: Run, directory: Path) -> Path:
    """The optimizer block of a variant run (pretrain.py has flags only for lr, K and the optimizer; the
    orthogonalizer, scaling and unfolding mode go through --ds-config). Everything else (scheduler,
    ZeRO stage, clipping, weight decay 0.01) is what the flag path gives."""
    params = {"lr": run.lr, "adamw_lr": run.adamw_lr, "weight_decay": 0.01, **run.options}
    if run.teon_k:
        params["teon_k"] = run.teon_k
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{run.name}.json"
    path.write_text(json.dumps({"optimizer": {"type": DS_TYPES[run.optimizer], "params": params}}, indent=1))
    return path


def _rank_main(rank, world_size, argv):
    from launch import pretrain

    return pretrain.main(argv)


def pretrain_argv(run: Run, data_dir: Path, eval_every: int, runs_dir: Path) -> List[str]:
    """launch/pretrain.py's flags for `run`; its run directory goes under `runs_dir`."""
    argv = [
        "--steps",
        str(run.steps),
        "--seed",
        str(run.seed),
        "--name",
        run.name,
        "--runs-dir",
        str(runs_dir),
        "--eval-every",
        str(eval_every),
        "--data-dir",
        str(data_dir),
        "--progress",
        "off",
        "--no-plot",
        "--no-tensorboard",
        "--overwrite",
    ]
    if run.options:
        argv += ["--ds-config", str(write_ds_config(run, runs_dir / "ds_configs"))]
    else:
        argv += ["--optimizer", run.optimizer]
        argv += (
            ["--adamw-lr", str(run.lr)]
            if run.optimizer == "adamw"
            else ["--lr", str(run.lr), "--adamw-lr", str(run.adamw_lr)]
        )
        if run.teon_k:
            argv += ["--teon-k", str(run.teon_k)]
    if run.model_config:
        argv += ["--model-config", run.model_config]
    return argv + list(run.extra)


class Trainer:
    """Runs a Run: launch/pretrain.py on 2 data-parallel ranks forked from this process (which has imported
    torch, DeepSpeed and Megatron once: a run starts in ~0.1 s instead of ~20 s under torchrun)."""

    def __init__(self, data_dir: Path, eval_every: int, runs_dir: Path, log):
        self.data_dir, self.eval_every, self.runs_dir, self.log = data_dir, eval_every, runs_dir, log
        self.loads: List[float] = []  # the 1-minute load average after each run (machine())
        self.trained: List[str] = []  # the models this invocation trained runs of, in order

    def __call__(self, run: Run) -> Run:
        sys.path.insert(0, str(REPO / "tests"))  # the tests' fork-based rank harness
        from support.harness import RankError, run_ranks

        argv = pretrain_argv(run, self.data_dir, self.eval_every, self.runs_dir)
        start = time.perf_counter()
        try:
            summary = run_ranks(_rank_main, 2, argv, timeout=3600)[0]
        except RankError as err:
            self.log(f"  FAILED {run.name}:\n{str(err)[-3000:]}")
            return run
        run.seconds = time.perf_counter() - start
        run.val_curve = [[int(step), float(val)] for step, val in summary["vals"]]
        self.loads.append(os.getloadavg()[0])
        if run.size not in self.trained:
            self.trained.append(run.size)
        self.log(f"  {run.name}: final val {run.final_val:.4f} ({run.seconds:.0f} s)")
        return run


class NotRun(Exception):
    """--report-only: the protocol asked for a run that the cache does not hold."""


def not_run(run: Run) -> Run:
    raise NotRun(run.name)


class RunCache:
    """Every finished run, by its key; a run already done is not run again. `save` is called with the
    records after each new run (the study's partial file), so a restarted study resumes."""

    def __init__(
        self,
        train: Train,
        records: List[Dict] = (),
        save: Callable[[List[Dict]], None] = lambda records: None,
    ):
        self.train, self.save = train, save
        self.done = {as_run(r).key: dict(r) for r in records if r.get("val_curve")}

    def __call__(self, run: Run) -> Run:
        record = self.done.get(run.key)
        if record is not None:
            return as_run(record)
        run = self.train(run)
        if run.val_curve:
            self.done[run.key] = asdict(run)
            self.save(self.records())
        return run

    def records(self) -> List[Dict]:
        return list(self.done.values())


def _prepare_parent() -> None:
    """Import the training stack once, single-threaded, so the ranks can be forked from here."""
    import warnings

    os.environ.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", MPLBACKEND="Agg")
    os.environ.setdefault("TEONSPEED_CPU_BF16", "0")  # fp32 orthogonalization: no timing probe decides
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(REPO))
    from teonspeed.patches import cpu_shims

    cpu_shims.apply()  # (what launch.pretrain does under --device cpu, once here for the forked ranks)
    from launch import pretrain, train  # noqa: F401  (megatron, deepspeed, teonspeed)


# ---------------------------------------------------------------------------------------------------
# The protocol's arithmetic
# ---------------------------------------------------------------------------------------------------
def steps_to_reach(curve: List[List[float]], target: float) -> Optional[float]:
    """First step at which the validation loss is <= target, linearly interpolated between evaluations."""
    for (s0, v0), (s1, v1) in zip(curve, curve[1:]):
        if v1 <= target:
            return s1 if v0 == v1 else s0 + (s1 - s0) * (v0 - target) / (v0 - v1)
    return None


def next_lr(grid: List[float], upward: bool) -> float:
    """One grid step beyond the edge (the grid's own ratio at that edge)."""
    lo, hi = (grid[-2], grid[-1]) if upward else (grid[1], grid[0])
    return float(f"{hi * hi / lo:.6g}")


def adaptive_sweep(run_at, grid, max_extensions: int = 3) -> List[Run]:
    """Sweep `grid`; while the best lr is at an edge, add the next lr beyond that edge (at most
    `max_extensions` times), so the reported best is bracketed on both sides."""
    runs = {lr: run_at(lr) for lr in grid}
    for _ in range(max_extensions):
        lrs = sorted(runs)
        best = min(lrs, key=lambda lr: score(runs[lr]))
        if len(lrs) < 2 or (lrs[0] < best < lrs[-1]) or not math.isfinite(score(runs[best])):
            break
        lr = next_lr(lrs, upward=best == lrs[-1])
        runs[lr] = run_at(lr)
    return [runs[lr] for lr in sorted(runs)]


def _neighbours(values: List[float], x: float) -> tuple:
    """The values either side of x in the sorted `values`; beyond an edge, the next grid step."""
    i = values.index(x)
    below = values[i - 1] if i > 0 else next_lr(values, upward=False)
    above = values[i + 1] if i + 1 < len(values) else next_lr(values, upward=True)
    return below, above


def joint_sweep(run_at, lr_grid, adamw_grid, max_rounds: int = JOINT_SWEEP_ROUNDS) -> List[Run]:
    """`run_at(lr, adamw_lr)` over the product of the two grids; then, while a neighbour of the best cell
    along either axis has not run (the next value of that axis, or the next grid step beyond its edge),
    run those neighbours (at most `max_rounds` rounds), so the best setting ends with a worse neighbour on
    all four sides."""
    runs = {(lr, a): run_at(lr, a) for lr in lr_grid for a in adamw_grid}
    for _ in range(max_rounds):
        best = min(runs, key=lambda cell: score(runs[cell]))
        if not math.isfinite(score(runs[best])):
            break
        lrs, parts = sorted({lr for lr, _ in runs}), sorted({a for _, a in runs})
        wanted = [(lr, best[1]) for lr in _neighbours(lrs, best[0])] + [
            (best[0], a) for a in _neighbours(parts, best[1])
        ]
        missing = [cell for cell in wanted if cell not in runs]
        if not missing:
            break
        for cell in missing:
            runs[cell] = run_at(*cell)
    return [runs[cell] for cell in sorted(runs)]


def paired(a: List[float], b: List[float]) -> Dict:
    """Seed-by-seed difference a − b: mean, sample std, standard error and t = mean / se."""
    diffs = [x - y for x, y in zip(a, b)]
    mean = statistics.mean(diffs)
    sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    se = sd / math.sqrt(len(diffs)) if diffs else 0.0
    t = mean / se if se > 0 else (math.copysign(math.inf, mean) if mean else 0.0)
    return {"diffs": diffs, "mean": mean, "sd": sd, "se": se, "t": t, "n": len(diffs)}


def versus(runs: List[Dict], baseline: List[Dict]) -> Dict:
    """One optimizer's seeded runs against the baseline's, seed by seed: the paired loss difference, the
    perplexity ratio − 1 in % (exp of the loss difference), and the steps each seed takes to reach the
    baseline's final validation loss of the same seed (None: not reached), also as a fraction of the
    baseline's steps."""
    by_seed = {r["seed"]: r for r in baseline}
    pairs = [(r, by_seed[r["seed"]]) for r in runs if r["seed"] in by_seed]
    p = paired([_final(r) for r, _ in pairs], [_final(b) for _, b in pairs])
    reach = [steps_to_reach(r["val_curve"], _final(b)) for r, b in pairs]
    total = [b["val_curve"][-1][0] for _, b in pairs]
    return {
        **p,
        "seeds": [r["seed"] for r, _ in pairs],
        "ppl_pct": [100.0 * math.expm1(d) for d in p["diffs"]],
        "ppl_pct_mean": 100.0 * math.expm1(p["mean"]),
        "steps_to_target": reach,
        "fraction_of_steps": [None if s is None else s / n for s, n in zip(reach, total)],
    }


def _final(record: Dict) -> float:
    return record["val_curve"][-1][1] if record["val_curve"] else math.inf


# ---------------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------------
def round_lr(x: float) -> float:
    return float(f"{x:.6g}")


def model_study(size: Size, seeds: List[int], train: Train, log) -> Dict:
    """The protocol (module docstring) on one model."""

    def run(opt: str, lr: float, adamw_lr: Optional[float] = None, seed: int = seeds[0], teon_k=None) -> Run:
        return train(
            Run(size.name, opt, lr, adamw_lr, seed, teon_k, size.model_config, size.steps, list(size.extra))
        )

    rows: Dict[str, Dict] = {}
    log(f"[{size.name}] AdamW lr sweep")
    sweep = adaptive_sweep(lambda lr: run("adamw", lr), ADAMW_GRID)
    rows["adamw"] = {"sweep": sweep, "best": min(sweep, key=score)}
    adamw_axis = tuple(round_lr(rows["adamw"]["best"].lr * f) for f in ADAMW_PART_FACTORS)
    for opt in size.optimizers[1:]:
        if opt == "htmuon":
            muon = rows["muon"]["best"].lr
            lr_grid = (muon, round_lr(HTMUON_RATIO * muon))
        else:
            lr_grid = MATRIX_LR_GRID[opt]
        log(f"[{size.name}] {opt}: joint sweep of lr {lr_grid} x adamw_lr {adamw_axis}")
        sweep = joint_sweep(lambda lr, a: run(opt, lr, a), lr_grid, adamw_axis)
        rows[opt] = {"sweep": sweep, "best": min(sweep, key=score)}
    out: Dict = {
        "what": size.what,
        "model_config": size.model_config or "pretrain.py default",
        "extra": size.extra,
        "steps": size.steps,
        "seeds_used": seeds,
        "adamw_part_grid": adamw_axis,
        "rows": {},
    }
    for opt, row in rows.items():
        best = row["best"]
        part = f", adamw_lr {best.adamw_lr:g}" if best.adamw_lr else ""
        log(f"[{size.name}] {opt}: best lr {best.lr:g}{part}; seeds {seeds[1:]}")
        seeded = [best] + [run(opt, best.lr, best.adamw_lr, seed) for seed in seeds[1:]]
        out["rows"][opt] = {
            "best_lr": best.lr,
            "best_adamw_lr": best.adamw_lr,
            "sweep": [asdict(r) for r in row["sweep"]],
            "seeds": [asdict(r) for r in seeded],
        }
    adamw_seeds = out["rows"]["adamw"]["seeds"]
    out["versus_adamw"] = {
        opt: versus(row["seeds"], adamw_seeds) for opt, row in out["rows"].items() if opt != "adamw"
    }
    if "muon" in out["rows"]:
        out["versus_muon"] = {
            opt: versus(out["rows"][opt]["seeds"], out["rows"]["muon"]["seeds"])
            for opt in ("teon", "htmuon")
            if opt in out["rows"]
        }
    if size.teon_ks and "teon" in rows:
        best = rows["teon"]["best"]
        log(f"[{size.name}] TEON group size at lr {best.lr:g}, adamw_lr {best.adamw_lr:g}")
        out["teon_k"] = {
            "2": asdict(best),
            **{str(k): asdict(run("teon", best.lr, best.adamw_lr, teon_k=k)) for k in size.teon_ks},
        }
    return out


def seed_paper(models: Dict[str, Dict]) -> Dict:
    """arXiv 2509.24406's claims, as far as the tiny models test them: Muon vs AdamW on MLA+MoE (steps to
    AdamW's final loss, perplexity difference), and MLA+MoE+Muon vs a dense MHA model with AdamW at equal
    tokens (paired by seed: the same data order)."""
    out: Dict = {}
    mla = models.get("mla_moe_tiny")
    if mla and "muon" in mla["rows"]:
        out["muon_vs_adamw_on_mla_moe"] = mla["versus_adamw"]["muon"]
    dense = models.get("dense_mha_tiny")
    if mla and dense and "muon" in mla["rows"]:
        dense_adamw = dense["rows"]["adamw"]["seeds"]
        out["mla_moe_muon_vs_dense_mha_adamw"] = versus(mla["rows"]["muon"]["seeds"], dense_adamw)
        out["mla_moe_adamw_vs_dense_mha_adamw"] = versus(
            mla["rows"]["adamw"]["seeds"], dense["rows"]["adamw"]["seeds"]
        )
    return out


def study(
    sizes: List[Size],
    seeds: List[int],
    train: Train,
    log,
    checkpoint: Callable[[Dict], None] = lambda results: None,
) -> Dict:
    """The protocol on every model; `checkpoint(results)` after each model (the tables so far)."""
    results: Dict = {"protocol": protocol(), "models": {}, "pending": [s.name for s in sizes]}
    for size in sizes:
        try:
            results["models"][size.name] = model_study(size, seeds, train, log)
        except NotRun as missing:  # (--report-only: this model's runs are not all done)
            log(f"[{size.name}] not reported: {missing} has not run")
            break
        results["pending"].remove(size.name)
        results["seed_paper"] = seed_paper(results["models"])
        checkpoint(results)
    return results


def protocol() -> Dict:
    return {
        "adamw_grid": ADAMW_GRID,
        "matrix_lr_grid": MATRIX_LR_GRID,
        "htmuon_ratio": HTMUON_RATIO,
        "adamw_part_factors": ADAMW_PART_FACTORS,
        "joint_sweep_rounds": JOINT_SWEEP_ROUNDS,
    }


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
    Arm(
        "teon_mode1",
        "teon",
        {"teon_mode": 1, **PE_FAN},
        (0.01 / SQRT2, 0.01, 0.01 * SQRT2, 0.02),
        "TEON, concatenated along the input dim (mode 1), PE, √(m/n)",
    ),
    Arm(
        "teon_mode2",
        "teon",
        {"teon_mode": 2, **PE_FAN},
        (0.01 / SQRT2, 0.01, 0.01 * SQRT2, 0.02),
        "TEON, concatenated along the output dim (mode 2), PE, √(m/n)",
    ),
    Arm("muon_pe_fan", "muon", dict(PE_FAN), (0.005, 0.01, 0.02), "Muon with TEON's settings: PE, √(m/n)"),
    Arm(
        "teon_ns5_spectral",
        "teon",
        dict(NS5_SPECTRAL),
        (0.01 / SQRT2, 0.01, 0.01 * SQRT2, 0.02),
        "TEON (the better mode) with Muon's settings: NS5, √max(1, m/n)",
    ),
    Arm(
        "htmuon",
        "htmuon",
        {},
        (),
        "HTMuon (p = 0.125, exact SVD), swept from 1× and 3× Muon's best lr (the authors' ratio)",
    ),
]
# Which arm each arm is compared with, seed by seed (same seeds: same init and data order).
PAIRS = [
    ("teon_mode1", "muon"),
    ("teon_mode2", "muon"),
    ("teon_mode2", "teon_mode1"),
    ("muon_pe_fan", "muon"),
    ("teon_mode1", "muon_pe_fan"),
    ("teon_mode2", "muon_pe_fan"),
    ("teon_ns5_spectral", "muon"),
    ("htmuon", "muon"),
]


def teon_study(
    size: Size,
    seeds: List[int],
    train: Train,
    log,
    arms=None,
    *,
    adamw_lr: float,
    checkpoint=lambda results: None,
    previous: Optional[Dict] = None,
) -> Dict:
    """Every arm's AdamW part at `adamw_lr`. `previous`: an earlier result of the same size, steps and
    adamw_lr. Its runs are reused (same arm, lr and seed) and only the missing ones run: more seeds, or a
    sweep extended further, without redoing the rest."""
    arms = arms or TEON_ARMS
    out: Dict = {
        "size": size.name,
        "steps": size.steps,
        "model_config": size.model_config or "pretrain.py default",
        "seeds_used": seeds,
        "adamw_lr": adamw_lr,
        "arms": {},
    }
    if previous and (previous["size"], previous["steps"]) != (size.name, size.steps):
        raise ValueError(f"--more-seeds: {previous['size']} at {previous['steps']} steps is another study")
    if previous and previous.get("adamw_lr", 3e-3) != adamw_lr:
        raise ValueError(
            f"--more-seeds: its AdamW part ran at {previous.get('adamw_lr', 3e-3):g}, not {adamw_lr:g}"
        )
    # (the options are part of what a run is: teon_ns5_spectral's unfolding follows the better mode, which
    # more seeds may change)
    done = {
        (r["arm"], round(r["lr"], 12), r["seed"], json.dumps(r["options"], sort_keys=True)): r
        for a in (previous or {}).get("arms", {}).values()
        for r in a["sweep"] + a["seeds"]
    }

    def run_at(arm: Arm, lr: float, seed: int = seeds[0]) -> Run:
        earlier = done.get((arm.name, round(lr, 12), seed, json.dumps(arm.options, sort_keys=True)))
        if earlier is not None:
            return as_run(earlier)
        return train(
            Run(
                size.name,
                arm.optimizer,
                lr,
                adamw_lr,
                seed=seed,
                model_config=size.model_config,
                steps=size.steps,
                arm=arm.name,
                options=dict(arm.options),
            )
        )

    for arm in arms:
        if arm.name == "teon_ns5_spectral":  # the unfolding mode that did better, with Muon's settings
            better = min((1, 2), key=lambda m: _seed_mean(out["arms"].get(f"teon_mode{m}")))
            arm = Arm(arm.name, arm.optimizer, {**arm.options, "teon_mode": better}, arm.grid, arm.what)
        grid = arm.grid
        if arm.name == "htmuon":  # the authors' ratio: HTMuon lr = 3 × Muon's (0.03 vs 0.01 at 60M)
            if "muon" not in out["arms"]:
                raise ValueError("the htmuon arm is placed by Muon's best lr: include the muon arm")
            muon_best = out["arms"]["muon"]["best_lr"]
            grid = (muon_best, HTMUON_RATIO * muon_best)
        sweep = adaptive_sweep(lambda lr: run_at(arm, lr), grid)
        best = min(sweep, key=score)
        log(f"[{size.name}] {arm.name}: best lr {best.lr:g}; seeds {seeds[1:]}")
        seeded = [best] + [run_at(arm, best.lr, seed) for seed in seeds[1:]]
        out["arms"][arm.name] = {
            "what": arm.what,
            "optimizer": arm.optimizer,
            "options": arm.options,
            "best_lr": best.lr,
            "sweep": [asdict(r) for r in sweep],
            "seeds": [asdict(r) for r in seeded],
        }
        checkpoint(out)
    out["pairs"] = {
        f"{a} - {b}": paired(_finals(out["arms"][a]), _finals(out["arms"][b]))
        for a, b in PAIRS
        if a in out["arms"] and b in out["arms"]
    }
    return out


def _finals(arm: Dict) -> List[float]:
    return [_final(r) for r in arm["seeds"]]


def _seed_mean(arm: Optional[Dict]) -> float:
    return statistics.mean(_finals(arm)) if arm else math.inf


# ---------------------------------------------------------------------------------------------------
# Intel's family-6 server model numbers: a VM's /proc/cpuinfo often names only "Intel(R) Xeon(R) Processor".
INTEL_SERVER_MODELS = {
    85: "Skylake/Cascade Lake",
    106: "Ice Lake",
    143: "Sapphire Rapids",
    207: "Emerald Rapids (5th-gen Xeon, Sapphire Rapids' ISA)",
    173: "Granite Rapids",
}


def cpu_description(cpuinfo: Optional[str] = None) -> str:
    """The CPU's model name, its microarchitecture where the family/model number identifies it, and the
    matrix ISA extensions it has (AMX, AVX512-BF16/FP16 decide which CPU kernels torch picks).
    `cpuinfo`: /proc/cpuinfo's text (read when not given)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return platform.processor() or "unknown CPU"
    info = cpuinfo.split("\n\n")[0]  # the first processor's block
    fields_ = dict(
        (k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in info.splitlines()) if k
    )
    name = fields_.get("model name", "unknown CPU")
    family, model = fields_.get("cpu family"), fields_.get("model")
    arch = INTEL_SERVER_MODELS.get(int(model)) if family == "6" and "Intel" in name and model else None
    flags = set(fields_.get("flags", "").split())
    isa = [f for f in ("amx_bf16", "avx512_bf16", "avx512_fp16") if f in flags]
    return (
        f"{name}{f', {arch}' if arch else ''} (family {family}, model {model}"
        f"{'; ' + ', '.join(isa) if isa else ''})"
    )


def machine(start: float, loads: List[float] = (), trained: List[str] = ()) -> Dict:
    """This invocation's machine: `loads`, the 1-minute load average after each run it trained (the
    machine is shared: the load says how busy it was; results do not depend on it, timings do);
    `trained`, the models whose runs it trained (the others' runs were reused)."""
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": cpu_description(),
        "cpus": os.cpu_count(),
        "date": datetime.datetime.now().isoformat(),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "load_average_at_end": os.getloadavg()[0],
        "load_average_during": (
            {"min": min(loads), "mean": statistics.mean(loads), "max": max(loads), "samples": len(loads)}
            if loads
            else None
        ),
        "trained": list(trained),
        "orthogonalizer_dtype": "fp32" if os.environ.get("TEONSPEED_CPU_BF16") == "0" else "auto",
    }


def machines_of(results: Dict) -> List[Dict]:
    """The invocations that trained a result's runs (results written before "machines": its one machine)."""
    return results.get("machines") or ([results["machine"]] if results.get("machine") else [])


def load_records(*paths: Path) -> List[Dict]:
    """The finished runs an earlier (partial or complete) result file holds."""
    records = []
    for path in paths:
        if path.is_file():
            records += json.loads(path.read_text()).get("runs", [])
    return records


def main() -> None:
    from convergence_report import plot, summarize, summarize_teon

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny budgets: checks the pipeline in a few minutes")
    p.add_argument(
        "--models",
        default=None,
        help=f"comma-separated, run in this order (default {','.join(DEFAULT_MODELS)}; --quick: tiny)",
    )
    p.add_argument(
        "--teon-study",
        action="store_true",
        help="the TEON study: unfolding modes, matched settings, own lr sweeps, paired seeds (tiny model)",
    )
    p.add_argument(
        "--adamw-lr",
        type=float,
        default=None,
        help="--teon-study: the AdamW part's lr of every arm (default: the best AdamW part of Muon's joint "
        "sweep on that model, from <out-dir>/convergence.json)",
    )
    p.add_argument(
        "--gpu",
        action="store_true",
        help="LLaMA-60M on one GPU on a >= 100M-token corpus built offline (bench/gpu_preset.py)",
    )
    p.add_argument(
        "--arm",
        action="append",
        default=[],
        help="--gpu: only this arm (adamw, muon, teon_mode1, teon_mode2, htmuon); repeatable",
    )
    p.add_argument(
        "--corpus-dir", default=str(REPO / "data" / "gpu_corpus"), help="--gpu: where the corpus goes"
    )
    p.add_argument("--time-limit", type=float, default=None, help="--gpu: seconds of training per arm (480)")
    p.add_argument("--steps", type=int, default=None, help="override the steps per run")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 1234,1,2)")
    p.add_argument("--size", default="tiny", choices=["tiny", "small"], help="--teon-study: the model")
    p.add_argument("--arms", default=None, help="--teon-study: comma-separated arm names (default: all)")
    p.add_argument(
        "--more-seeds",
        default=None,
        help="--teon-study: an earlier result JSON; reuse its runs, run only the missing ones",
    )
    p.add_argument(
        "--reuse",
        action="append",
        default=[],
        help="an earlier result JSON whose finished runs are reused (besides "
        "<stem>.partial.json and <stem>.json)",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: the tables of the models whose runs are all in the result files",
    )
    p.add_argument("--data-dir", default=str(REPO / "data" / "embedded"))
    p.add_argument(
        "--runs-dir",
        default=None,
        help="keep the run directories here (default: a temporary folder, removed at the end)",
    )
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
        results = run_gpu_preset(
            args.arm,
            Path(args.out_dir),
            Path(args.corpus_dir),
            preset,
            log=lambda msg: print(msg, flush=True),
        )
        print(summarize_gpu(results))
        return
    seeds = [1234, 1] if args.quick else [1234, 1, 2]
    if args.seeds:
        seeds = [int(x) for x in args.seeds.split(",")]
    eval_every = 10 if args.quick else 20
    data_dir = Path(args.data_dir)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    _prepare_parent()
    prepare_data(data_dir)
    start = time.perf_counter()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs_dir = Path(args.runs_dir or tempfile.mkdtemp(prefix="teonspeed-convergence-"))
    try:
        trainer = Trainer(data_dir, eval_every, runs_dir, log)
        if args.teon_study:
            teon_main(args, seeds, trainer, out, start, log, summarize_teon)
        else:
            study_main(args, seeds, trainer, out, start, log, summarize, plot)
    finally:
        if not args.runs_dir:
            shutil.rmtree(runs_dir, ignore_errors=True)


def study_main(args, seeds, trainer, out: Path, start: float, log, summarize, plot) -> None:
    names = args.models.split(",") if args.models else (["tiny"] if args.quick else list(DEFAULT_MODELS))
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"--models {','.join(unknown)}: choose from {','.join(MODELS)}")
    steps = args.steps or (QUICK_STEPS if args.quick else None)
    sizes = [Size(**{**asdict(MODELS[n]), "steps": steps or MODELS[n].steps}) for n in names]
    stem = "convergence_quick" if args.quick else "convergence"
    partial = out / f"{stem}.partial.json"
    final = out / f"{stem}.json"
    # The invocations that trained these results' runs (an interrupted study is finished by later ones):
    # every one is named in the tables, with the models it trained.
    earlier_machines = machines_of(json.loads(final.read_text())) if final.is_file() else []
    earlier = load_records(partial, final, *map(Path, args.reuse))
    cache = RunCache(
        not_run if args.report_only else trainer,
        earlier,
        save=lambda records: partial.write_text(json.dumps({"runs": records}, indent=1)),
    )
    if cache.done:
        log(f"reusing {len(cache.done)} finished runs")

    def write(results: Dict) -> None:
        this = machine(start, trainer.loads, trainer.trained)
        results["machines"] = earlier_machines + ([this] if trainer.trained else [])
        results["machine"] = results["machines"][-1] if results["machines"] else this
        results["runs"] = cache.records()
        (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
        (out / f"{stem}.md").write_text(summarize(results, quick=args.quick))
        plot(results, out / f"{stem}.png")

    results = study(sizes, seeds, cache, log, checkpoint=write)
    write(results)
    partial.unlink(missing_ok=True)  # (<stem>.json holds every finished run, the pending models' too)
    print((out / f"{stem}.md").read_text())


def tuned_adamw_part(results_path: Path, size: Size) -> float:
    """The TEON study's AdamW part (every arm's, so the arms differ only in their matrix optimizer): the best
    AdamW-part lr of Muon's joint sweep on the same model (the study's reference arm)."""
    try:
        row = json.loads(results_path.read_text())["models"][size.name]["rows"]["muon"]
    except (OSError, KeyError, ValueError):
        raise SystemExit(
            f"--teon-study --size {size.name}: {results_path} has no tuned AdamW part for {size.name} "
            f"(run `bench/convergence.py --models {size.name}` first, or pass --adamw-lr)"
        ) from None
    if row["seeds"][0]["steps"] != size.steps:
        raise SystemExit(
            f"--teon-study --steps {size.steps}: the AdamW part was tuned at {row['seeds'][0]['steps']} "
            "steps; pass --adamw-lr"
        )
    return row["best_adamw_lr"]


def teon_main(args, seeds, trainer, out: Path, start: float, log, summarize_teon) -> None:
    base = MODELS[args.size]
    stem = f"convergence_teon{'' if args.size == 'tiny' else '_' + args.size}{'_quick' if args.quick else ''}"
    size = Size(args.size, base.model_config, args.steps or (QUICK_STEPS if args.quick else base.steps))
    arms = [a for a in TEON_ARMS if a.name in args.arms.split(",")] if args.arms else None
    previous = json.loads(Path(args.more_seeds).read_text()) if args.more_seeds else None
    if args.adamw_lr is not None:
        adamw_lr, source = args.adamw_lr, "--adamw-lr"
    else:
        adamw_lr = tuned_adamw_part(out / "convergence.json", size)
        source = f"the best AdamW part of Muon's joint sweep on {size.name} (bench/results/convergence.md)"
    partial = out / f"{stem}.partial.json"
    result = teon_study(
        size,
        seeds,
        trainer,
        log,
        arms=arms,
        adamw_lr=adamw_lr,
        previous=previous,
        checkpoint=lambda r: partial.write_text(json.dumps(r, indent=1)),
    )
    partial.unlink(missing_ok=True)
    result["adamw_lr_source"] = source
    # (--more-seeds: the runs reused from the earlier result were trained by its invocations)
    this = machine(start, trainer.loads, trainer.trained)
    result["machines"] = machines_of(previous or {}) + ([this] if trainer.trained else [])
    result["machine"] = result["machines"][-1] if result["machines"] else this
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(summarize_teon(result, quick=args.quick))
    print((out / f"{stem}.md").read_text())


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
