"""teonspeed vs DeepSpeed's own ZeRO-3 Muon, paired in one run on CPU/gloo: bytes per rank, Newton–Schulz
FLOPs per rank, iteration time, and whether the updates agree.

    .venv/bin/python bench/zero3_side_by_side.py                 # 2 and 4 ranks
    .venv/bin/python bench/zero3_side_by_side.py --smoke         # 2 ranks, tiny, one timed step

Ranks are forked (tests/support/harness.py run_ranks, gloo on loopback); each arm builds the same LLaMA-named
model (tests/tiny_models.TinyLlama) and trains it through `deepspeed.initialize` with the same data:

- AdamW ZeRO-3          `"type": "AdamW"`, `"zero_optimization": {"stage": 3}`: what any ZeRO-3 run moves
- DeepSpeed Muon ZeRO-3 `"type": "Muon"` as a user configures it, with `"reduce_scatter": false` (DeepSpeed
                        0.19.8 raises "Muon and reduce scatter cannot be used together" otherwise) and
                        ns_method "standard" (bf16 NS5, Keller's coefficients; its ZeRO-3 default "gram" is
                        another kernel), momentum 0.95 Nesterov EMA, update × √max(1, rows/cols)
- DeepSpeed Muon ZeRO-0 the same optimizer unsharded: the rule both sharded runs should reproduce
- teonspeed Muon / TEON `"type": "TeonspeedMuon"` / `"TEON"` with the same rule (ns5, lr_scale
                        "spectral" = √max(1, r/c), momentum 0.95 Nesterov EMA, ns_dtype "bf16", AdamW for the
                        same 1-D / embedding / head parameters), at ZeRO-3 with DeepSpeed's default
                        reduce_scatter where teonspeed supports stage 3; until then at ZeRO-1, labelled as a
                        placeholder and never reported as ZeRO-3
- teonspeed Muon fp32 NS the same with ns_dtype "fp32": the size of bf16 rounding alone

`stage3_param_persistence_threshold` is 0 in every ZeRO-3 arm: this model's matrices are all below
DeepSpeed's default 1e5 elements and would otherwise stay whole on every rank, which no real-size model does.

Bytes: every torch.distributed collective a rank issues during the timed steps, ring model (all-reduce
2(W−1)/W·n, all-gather / reduce-scatter (W−1)/W·n of the full buffer, point-to-point the bytes sent), per
step, split into forward+backward and the optimizer step (`engine.step()`). DeepSpeed's step bytes are
predicted too, by bench/costmodel_sharded.deepspeed_cost on this model's Muon matrices (its reading of
stage3.py); ours by the plan (`opt.zero_expected_bytes()` where the optimizer has it). NS FLOPs: per rank per
step, steps·(4m²n + 2m³) for every NS call (DeepSpeed's zeropower functions are wrapped; teonspeed reports
opt.comm_stats.flops). Time: median over the timed steps of forward+backward+step and of the step alone,
slowest rank. Equality: max over parameters of ‖a − b‖/‖b‖ after the run.

Results: bench/results/zero3_side_by_side_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
from zero_side_by_side import VARIANTS as ZERO1_VARIANTS  # noqa: E402  (the same rules, one definition)
from zero_side_by_side import CollectiveBytes, ns_flops_of, rel_max  # noqa: E402

ZERO3 = {"stage": 3, "stage3_param_persistence_threshold": 0}
TEON_PARAMS = {k: v for k, v in ZERO1_VARIANTS["teonspeed Muon"]["params"].items()}
ARMS: Dict[str, Dict[str, Any]] = {
    "AdamW ZeRO-3": dict(optimizer=ZERO1_VARIANTS["AdamW"], zero=ZERO3),
    "DeepSpeed Muon ZeRO-3": dict(
        optimizer=ZERO1_VARIANTS["DeepSpeed Muon"], zero=dict(ZERO3, reduce_scatter=False)
    ),
    "DeepSpeed Muon ZeRO-0": dict(optimizer=ZERO1_VARIANTS["DeepSpeed Muon"], zero={"stage": 0}),
    # DeepSpeed's default gradient_clipping (1.0): its ZeRO-3 Muon takes the norm over the orthogonalized
    # update and clips that, so its step shrinks by the update's norm; every other arm clips nothing
    "DeepSpeed Muon ZeRO-3, default clipping": dict(
        optimizer=ZERO1_VARIANTS["DeepSpeed Muon"], zero=dict(ZERO3, reduce_scatter=False), clip=1.0
    ),
    "teonspeed Muon": dict(optimizer=ZERO1_VARIANTS["teonspeed Muon"], zero="ours"),
    "teonspeed TEON": dict(optimizer={"type": "TEON", "params": TEON_PARAMS}, zero="ours"),
    "teonspeed Muon fp32 NS": dict(optimizer=ZERO1_VARIANTS["teonspeed Muon fp32 NS"], zero="ours"),
}
VOCAB, SEQ, MICRO = 256, 32, 4


def ours_stage() -> int:
    """3 where teonspeed's DeepSpeed integration accepts ZeRO-3, else 1 (the placeholder arm)."""
    from teonspeed.integrations import deepspeed as integration

    return 3 if 3 in getattr(integration, "SUPPORTED_ZERO_STAGES", (3,)) else 1


def zero_config(arm: str, stage: int) -> Dict[str, Any]:
    zero = ARMS[arm]["zero"]
    if zero != "ours":
        return dict(zero)
    return dict(ZERO3) if stage == 3 else {"stage": stage}


def muon_matrices(model) -> List:
    """The parameters DeepSpeed gives Muon (deepspeed.set_optimizer_flags: ≥ 2-D, not embed / lm_head)."""
    return [
        (n, tuple(p.shape))
        for n, p in model.named_parameters()
        if p.dim() >= 2 and not any(k in n.lower() for k in ("embed", "lm_head"))
    ]


def worker(rank, world_size, arm, zero, hidden, layers, warmup, steps):
    import torch
    import torch.distributed as dist
    from teonspeed.patches import cpu_shims

    cpu_shims.apply()
    import deepspeed
    from deepspeed.runtime.zero.muon import original_muon
    from tiny_models import TinyLlama

    counter = CollectiveBytes()
    ds_flops = [0.0]
    for fn_name in ("zeropower_via_newtonschulz5", "zeropower_via_gram_newtonschulz"):
        original = getattr(original_muon, fn_name)

        def counted(G, steps, _original=original):
            batch = G.numel() // (G.size(-2) * G.size(-1))
            ds_flops[0] += batch * ns_flops_of(G.shape, steps)
            return _original(G, steps=steps)

        setattr(original_muon, fn_name, counted)

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = TinyLlama(layers=layers, d=hidden, kv=hidden // 2, ffn=int(hidden * 8 / 3), vocab=VOCAB)
    matrices = muon_matrices(model)
    config = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        "optimizer": copy.deepcopy(ARMS[arm]["optimizer"]),
        "zero_optimization": zero,
        "gradient_clipping": ARMS[arm].get("clip", 0.0),
        "steps_per_print": 10_000,
        "wall_clock_breakdown": False,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    opt = engine.basic_optimizer
    expected = opt.zero_expected_bytes() if hasattr(opt, "zero_expected_bytes") else None
    rows = []
    for step in range(warmup + steps):
        g = torch.Generator().manual_seed(1000 * step + rank)
        tokens = torch.randint(0, VOCAB, (MICRO, SEQ), generator=g)
        labels = torch.roll(tokens, -1, dims=1)
        dist.barrier()
        counter.on, counter.bytes, counter.point_to_point, ds_flops[0] = step >= warmup, 0.0, 0.0, 0.0
        start = time.perf_counter()
        loss = engine(tokens, labels)
        engine.backward(loss)
        backward_bytes = counter.bytes
        mid = time.perf_counter()
        engine.step()
        end = time.perf_counter()
        counter.on = False
        if step >= warmup:
            stats = getattr(opt, "comm_stats", None)
            rows.append(
                dict(
                    iteration_s=end - start,
                    step_s=end - mid,
                    backward_bytes=backward_bytes,
                    step_bytes=counter.bytes - backward_bytes,
                    flops=stats.flops if stats is not None else ds_flops[0],
                    sent=stats.sent if stats is not None else None,
                    received=stats.received if stats is not None else None,
                    adamw_bytes=stats.adamw_bytes if stats is not None else None,
                    point_to_point=counter.point_to_point,
                )
            )
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=zero.get("stage") == 3):
        final = (
            {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
            if rank == 0
            else None
        )
    return dict(
        rows=rows,
        expected=list(expected) if expected is not None else None,
        params=final,
        matrices=matrices,
        optimizer=type(opt).__name__,
        stage=zero.get("stage"),
    )


def summarize(ranks: List[Dict[str, Any]]) -> Dict[str, Any]:
    def med(key, r):
        return statistics.median(x[key] for x in r["rows"])

    out = dict(
        stage=ranks[0]["stage"],
        optimizer=ranks[0]["optimizer"],
        iteration_ms=1e3 * max(med("iteration_s", r) for r in ranks),
        step_ms=1e3 * max(med("step_s", r) for r in ranks),
        backward_bytes=max(med("backward_bytes", r) for r in ranks),
        step_bytes=max(med("step_bytes", r) for r in ranks),
        flops_max=max(med("flops", r) for r in ranks),
        flops_total=sum(med("flops", r) for r in ranks),
    )
    if ranks[0]["rows"][0]["sent"] is not None:
        out.update(
            exchange_sent_max=max(x["sent"] for r in ranks for x in r["rows"]),
            exchange_received_max=max(x["received"] for r in ranks for x in r["rows"]),
            adamw_bytes=max(x["adamw_bytes"] for r in ranks for x in r["rows"]),
            # measured == predicted on every rank and timed step, and the wrapper saw what the counters say
            plan_equals_counters=(
                all((x["sent"], x["received"]) == tuple(r["expected"]) for r in ranks for x in r["rows"])
                if ranks[0]["expected"] is not None
                else None
            ),
            wrapper_equals_counters=all(x["sent"] == x["point_to_point"] for r in ranks for x in r["rows"]),
        )
    return out


def measure(world_size: int, args, stage: int) -> Dict[str, Any]:
    from costmodel_sharded import Assumptions, deepspeed_cost, jobs_of, teonspeed_cost
    from support.harness import run_ranks

    runs = {}
    for arm in ARMS:
        zero = zero_config(arm, stage)
        runs[arm] = run_ranks(
            worker, world_size, arm, zero, args.hidden, args.layers, args.warmup, args.steps, timeout=1200
        )
    row: Dict[str, Any] = dict(ranks=world_size, ours_stage=stage)
    for arm, ranks in runs.items():
        row[arm] = summarize(ranks)
    matrices = runs["DeepSpeed Muon ZeRO-3"][0]["matrices"]
    row["muon_matrix_elements"] = sum(a * b for _, (a, b) in matrices)
    row["deepspeed_predicted_step_bytes"] = deepspeed_cost(matrices, world_size, Assumptions()).bytes_max
    if stage == 3:  # the cost model's teonspeed plan for the same matrices (pieces to owners, slices back)
        for opt in ("muon", "teon"):
            jobs = jobs_of(matrices, opt, Assumptions())
            cost = teonspeed_cost(jobs, "zero3", world_size, Assumptions())
            row[f"teonspeed_{opt}_predicted_step_bytes"] = cost.bytes_max
    final = {arm: r[0]["params"] for arm, r in runs.items()}
    ds3, ds0 = final["DeepSpeed Muon ZeRO-3"], final["DeepSpeed Muon ZeRO-0"]
    row["rel_deepspeed_zero3_vs_zero0"] = rel_max(ds3, ds0)
    row["rel_ours_vs_deepspeed_zero3"] = rel_max(final["teonspeed Muon"], ds3)
    row["rel_ours_vs_deepspeed_zero0"] = rel_max(final["teonspeed Muon"], ds0)
    row["rel_deepspeed_zero3_default_clipping_vs_zero0"] = rel_max(
        final["DeepSpeed Muon ZeRO-3, default clipping"], ds0
    )
    row["rel_bf16_vs_fp32_ns"] = rel_max(final["teonspeed Muon"], final["teonspeed Muon fp32 NS"])
    return row


def ours_label(stage: int) -> str:
    return "ZeRO-3" if stage == 3 else f"ZeRO-{stage} (PLACEHOLDER: teonspeed does not run ZeRO-3 yet)"


def predicted(row: Dict[str, Any], opt: str) -> str:
    value = row.get(f"teonspeed_{opt}_predicted_step_bytes")
    return "" if value is None else f"; cost model {value / 1024:.1f}"


def write_md(data: Dict[str, Any], path: Path) -> None:
    m, a = data["machine"], data["args"]
    stage = data["rows"][0]["ours_stage"]
    lines = [
        "# teonspeed vs DeepSpeed's own ZeRO-3 Muon on CPU/gloo",
        "",
        f"{m['cpu']} ({m['cpu_family']}), {m['cpus']} cores; torch {m['torch']}, deepspeed {m['deepspeed']}, "
        f"gloo, Python {m['python']}; {m['date']}; git {m['git']}; load average at the start "
        f"{m['load_average_start']}, at the end {m['load_average']}. teonspeed: {m['teonspeed']}.",
        "",
        f"**Note:** {m['note']}. Bytes and FLOPs are exact counters and do not depend on the load.",
        "",
        f"Model: LLaMA-named TinyLlama, hidden {a['hidden']}, {a['layers']} layers, micro-batch {MICRO} x "
        f"{SEQ} tokens per rank, fp32; {a['steps']} timed steps after {a['warmup']} warm-up (median, slowest "
        f"rank). teonspeed arms: **{ours_label(stage)}**"
        + (
            "; their bytes, FLOPs and times are those of that layout, not of ZeRO-3, and are shown only so "
            "that the harness is exercised end to end."
            if stage != 3
            else "."
        ),
        "",
        "Bytes are KiB per rank per training step, busiest rank, ring model; *bwd*: collectives during "
        "forward+backward, *step*: during `engine.step()`. *DS step predicted*: "
        "bench/costmodel_sharded.deepspeed_cost on this model's Muon matrices (the cost model's reading of "
        "stage3.py), next to what DeepSpeed moved. *ours exchange*: opt.comm_stats sent / received "
        "(busiest rank); *plan*: on every rank and step the counters equal the plan's prediction and the "
        "point-to-point bytes the collective wrapper saw (*cost model*: bench/costmodel_sharded."
        "teonspeed_cost's busiest-rank bytes for the same matrices, at ZeRO-3); *AdamW yardstick*: "
        "comm_stats.adamw_bytes. NS "
        "GFLOP: busiest rank per step (sum over ranks). Equality: max over parameters of the relative "
        "distance of the final weights.",
        "",
        "| ranks | AdamW Z3 KiB bwd / step | DS Muon Z3 KiB bwd / step (DS step predicted) "
        "| ours Muon KiB bwd / step | ours exchange KiB sent / recv (plan) | AdamW yardstick KiB "
        "| ours TEON KiB step | DS NS GFLOP max (sum) | ours Muon NS GFLOP max (sum) "
        "| ours TEON NS GFLOP max (sum) | iteration ms AdamW / DS / ours Muon / ours TEON "
        "| step ms DS / ours Muon / ours TEON |",
        "|" + "---|" * 12,
    ]
    kib = 1024
    for r in data["rows"]:
        ad, ds, us, te = (
            r["AdamW ZeRO-3"],
            r["DeepSpeed Muon ZeRO-3"],
            r["teonspeed Muon"],
            r["teonspeed TEON"],
        )
        plan = {True: "yes", False: "NO", None: "n/a"}[
            us.get("plan_equals_counters") and us.get("wrapper_equals_counters")
        ]
        lines.append(
            f"| {r['ranks']} | {ad['backward_bytes'] / kib:.1f} / {ad['step_bytes'] / kib:.1f} | "
            f"{ds['backward_bytes'] / kib:.1f} / {ds['step_bytes'] / kib:.1f} "
            f"({r['deepspeed_predicted_step_bytes'] / kib:.1f}) | "
            f"{us['backward_bytes'] / kib:.1f} / {us['step_bytes'] / kib:.1f} | "
            f"{us.get('exchange_sent_max', 0) / kib:.1f} / {us.get('exchange_received_max', 0) / kib:.1f} "
            f"({plan}{predicted(r, 'muon')}) | {us.get('adamw_bytes', 0) / kib:.1f} | "
            f"{te['step_bytes'] / kib:.1f} | "
            f"{ds['flops_max'] / 1e9:.4f} ({ds['flops_total'] / 1e9:.4f}) | "
            f"{us['flops_max'] / 1e9:.4f} ({us['flops_total'] / 1e9:.4f}) | "
            f"{te['flops_max'] / 1e9:.4f} ({te['flops_total'] / 1e9:.4f}) | "
            f"{ad['iteration_ms']:.0f} / {ds['iteration_ms']:.0f} / {us['iteration_ms']:.0f} / "
            f"{te['iteration_ms']:.0f} | {ds['step_ms']:.0f} / {us['step_ms']:.0f} / {te['step_ms']:.0f} |"
        )
    lines += [
        "",
        "Update equality (Muon: both compute the same rule; TEON has no DeepSpeed counterpart):",
        "",
        "| ranks | DS ZeRO-3 vs DS ZeRO-0 | ours vs DS ZeRO-3 | ours vs DS ZeRO-0 | ours bf16 vs fp32 NS "
        "(bf16 rounding alone) | DS ZeRO-3 with its default gradient_clipping 1.0 vs DS ZeRO-0 |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        cells = (
            r["rel_deepspeed_zero3_vs_zero0"],
            r["rel_ours_vs_deepspeed_zero3"],
            r["rel_ours_vs_deepspeed_zero0"],
            r["rel_bf16_vs_fp32_ns"],
            r["rel_deepspeed_zero3_default_clipping_vs_zero0"],
        )
        lines.append(f"| {r['ranks']} | " + " | ".join(f"{c:.1e}" for c in cells) + " |")
    lines += [
        "",
        "Every arm but the last column's sets `gradient_clipping` 0: DeepSpeed 0.19.8's ZeRO-3 Muon takes "
        "the gradient norm over the orthogonalized update (stage3.py: Muon runs before the norm) and clips "
        "that, so with its default clipping of 1.0 the Muon step shrinks by the update's norm (about "
        "√(Σ min(m, n)) ≫ 1), while at ZeRO-0 the clip acts on the raw gradient, which Newton–Schulz "
        "normalizes away. teonspeed's step receives the clipped gradient, as at ZeRO-0.",
    ]
    path.write_text("\n".join(lines) + "\n")


def cpu_family() -> str:
    """Names the microarchitecture class the flags show (this bench's numbers are CPU-specific)."""
    try:
        flags = next(
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
        )
    except (OSError, StopIteration):
        return "unknown"
    return "Sapphire Rapids class: AVX512-BF16, AMX" if "amx_tile" in flags else "no AMX"


def teonspeed_source() -> str:
    """Which teonspeed tree the arms ran (its checkout's commit, and whether it had uncommitted changes)."""
    import subprocess

    import teonspeed

    where = Path(teonspeed.__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=where, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "."], cwd=where, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return str(where)
    if not head:  # not a checkout (e.g. a `git archive` of a branch): the path names it
        return str(where)
    return f"{where} at {head}" + (" with uncommitted changes" if dirty else "")


def main(argv=None) -> Dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", default="2,4")
    parser.add_argument("--hidden", type=int, default=96)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--ours-stage", type=int, default=0, help="0: 3 where supported, else 1")
    parser.add_argument("--smoke", action="store_true", help="2 ranks, hidden 32, 2 layers, 1 step")
    parser.add_argument("--out", default=str(RESULTS_DIR / "zero3_side_by_side_cpu"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.ranks, args.hidden, args.layers, args.warmup, args.steps = "2", 32, 2, 1, 1
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    from teonspeed.patches import cpu_shims

    cpu_shims.apply()
    import deepspeed  # noqa: F401  (imported before forking, like the tests)
    import scaling

    stage = args.ours_stage or ours_stage()
    load_start = [round(x, 2) for x in os.getloadavg()]
    rows = [measure(int(w), args, stage) for w in args.ranks.split(",")]
    info = scaling.machine()
    info.update(
        deepspeed=deepspeed.__version__,
        cpu_family=cpu_family(),
        teonspeed=teonspeed_source(),
        load_average_start=load_start,
        note="shared 2-core machine used by several engineers and a long nice'd job at once; W "
        "single-threaded rank processes share 2 cores, so times measure oversubscribed CPU + loopback gloo",
    )
    data = dict(machine=info, args=vars(args), rows=rows)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1, default=float))
    write_md(data, out.with_suffix(".md"))
    print(out.with_suffix(".md").read_text())
    return data


if __name__ == "__main__":
    main()
