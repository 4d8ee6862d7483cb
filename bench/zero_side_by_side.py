"""teonspeed vs DeepSpeed's built-in Muon under the same DeepSpeed ZeRO-1 config and model, side by side:
bytes per rank, Newton–Schulz FLOPs per rank, step time, and whether the two updates agree.

    .venv/bin/python bench/zero_side_by_side.py                      # 2 and 4 ranks
    .venv/bin/python bench/zero_side_by_side.py --ranks 2,4,8 --steps 6

Ranks are forked in-process (tests/support/harness.py run_ranks, gloo on loopback); each builds the same
LLaMA-named model (tests/tiny_models.TinyLlama at --hidden/--layers) and trains it through
`deepspeed.initialize` with `"zero_optimization": {"stage": 1}` and one of:

- AdamW         DeepSpeed's AdamW (torch implementation): the communication any ZeRO-1 run pays
- DeepSpeed Muon  `"type": "Muon"` (MuonWithAuxAdam; ns_method "standard" = bf16 NS5 with Keller's
                coefficients, update scaled by √max(1, rows/cols), EMA momentum 0.95 with Nesterov)
- teonspeed Muon  `"type": "TeonspeedMuon"` with the same rule: ns5, lr_scale "spectral" (= √max(1, r/c)),
                momentum 0.95 Nesterov EMA, ns_dtype "bf16", AdamW for the same 1-D/embedding/head params

Bytes: every torch.distributed collective a rank issues during the timed steps (gradient reduction,
parameter all-gather and the optimizer's own), counted per rank with the ring model (all-reduce
2(W−1)/W·n, all-gather/reduce-scatter/reduce/broadcast (W−1)/W·n, all-to-all the bytes sent to other
ranks), per step. *extra* is that minus AdamW's. NS FLOPs: per rank per step, 5·(4m²n + 2m³) (m ≤ n)
for every NS call (DeepSpeed's zeropower functions are wrapped; teonspeed reports opt.comm_stats.flops).
Step time: median over the timed steps of forward+backward+step (DeepSpeed runs its Muon inside the
gradient path), slowest rank. Equality: max over parameters of ‖ours − DeepSpeed‖/‖DeepSpeed‖ after the
run, next to the same distance between our bf16-NS and fp32-NS runs (the size of bf16 rounding alone).

Results: bench/results/zero_side_by_side_cpu.{json,md}.
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
from typing import Any, Dict

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
from scaling import MIXED_CLUSTER  # noqa: E402  (a slow-compute, cheap-link cluster for the `cluster` option)

SHARED = {"lr": 0.02, "weight_decay": 0.01}
VARIANTS = {
    "AdamW": {
        "type": "AdamW",
        "params": {"lr": 3e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.01, "torch_adam": True},
    },
    "DeepSpeed Muon": {
        "type": "Muon",
        "params": dict(
            SHARED,
            muon_lr=0.02,
            adam_lr=3e-3,
            betas=[0.9, 0.95],
            eps=1e-8,
            momentum=0.95,
            ns_method="standard",
            torch_adam=True,
        ),
    },
    "teonspeed Muon": {
        "type": "TeonspeedMuon",
        "params": dict(
            SHARED,
            adamw_lr=3e-3,
            adamw_betas=[0.9, 0.95],
            adamw_eps=1e-8,
            adamw_weight_decay=0.01,
            ns_dtype="bf16",
        ),
    },
    "DeepSpeed Muon ZeRO-0": {
        "stage": 0,
        "type": "Muon",
        "params": dict(
            SHARED,
            muon_lr=0.02,
            adam_lr=3e-3,
            betas=[0.9, 0.95],
            eps=1e-8,
            momentum=0.95,
            ns_method="standard",
            torch_adam=True,
        ),
    },
    # The same, planned with a `cluster` override (1 TFLOP/s, 2 GB/s, 1 µs): on the default H100 constants
    # no move of this tiny model's microsecond jobs pays for a collective's latency; here the balancer moves
    # some.
    "teonspeed Muon cluster": {
        "type": "TeonspeedMuon",
        "params": dict(
            SHARED,
            adamw_lr=3e-3,
            adamw_betas=[0.9, 0.95],
            adamw_eps=1e-8,
            adamw_weight_decay=0.01,
            ns_dtype="bf16",
            cluster=MIXED_CLUSTER,
        ),
    },
    "teonspeed Muon fp32 NS": {
        "type": "TeonspeedMuon",
        "params": dict(
            SHARED,
            adamw_lr=3e-3,
            adamw_betas=[0.9, 0.95],
            adamw_eps=1e-8,
            adamw_weight_decay=0.01,
            ns_dtype="fp32",
        ),
    },
}


def ns_flops_of(shape, steps=5) -> float:
    from teonspeed.parallel.owners import ns_flops

    return ns_flops((int(shape[-2]), int(shape[-1])), steps)


class CollectiveBytes:
    """Wraps torch.distributed's collectives; counts ring-model bytes each rank sends while `on`."""

    NAMES = (
        "all_reduce",
        "reduce",
        "broadcast",
        "all_gather",
        "all_gather_into_tensor",
        "all_gather_single",  # torch 2.13's name (FSDP2 calls it)
        "_all_gather_base",
        "reduce_scatter",
        "reduce_scatter_tensor",
        "reduce_scatter_single",
        "_reduce_scatter_base",
        "all_to_all_single",
        "send",
        "batch_isend_irecv",
    )  # not isend: P2POp accepts only the original function

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist, self.on, self.bytes, self.calls = dist, False, 0.0, 0
        self.point_to_point = 0.0  # batch_isend_irecv's sends alone: teonspeed's flat exchange
        for name in self.NAMES:
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            if self.on:
                cost = self._cost(name, args, kwargs)
                self.bytes += cost
                self.point_to_point += cost if name == "batch_isend_irecv" else 0.0
                self.calls += 1
            return fn(*args, **kwargs)

        return counted

    def _cost(self, name, args, kwargs) -> float:
        if name == "batch_isend_irecv":  # point-to-point: the bytes of its sends
            return sum(
                op.tensor.numel() * op.tensor.element_size() for op in args[0] if op.op is self.dist.isend
            )
        group = kwargs.get("group")
        w = self.dist.get_world_size(group) if group is not None else self.dist.get_world_size()
        if w == 1:
            return 0.0

        def nbytes(t):
            if isinstance(t, (list, tuple)):
                return sum(nbytes(x) for x in t)
            return t.numel() * t.element_size()

        first = args[0] if args else kwargs.get("tensor", kwargs.get("output", kwargs.get("output_tensor")))
        if name == "all_gather" and not args:  # deepspeed.comm passes tensor_list= by keyword: the output
            first = kwargs["tensor_list"]
        if name == "all_reduce":
            return 2 * (w - 1) / w * nbytes(first)
        if name in (
            "reduce",
            "broadcast",
            "all_gather",
            "all_gather_into_tensor",
            "all_gather_single",
            "_all_gather_base",
        ):
            return (w - 1) / w * nbytes(first)  # the full buffer (all-gather: its output)
        if name in (
            "reduce_scatter",
            "reduce_scatter_tensor",
            "reduce_scatter_single",
            "_reduce_scatter_base",
        ):
            source = args[1] if len(args) > 1 else kwargs.get("input", kwargs.get("input_list"))
            return (w - 1) / w * nbytes(source)
        if name == "all_to_all_single":
            source = args[1] if len(args) > 1 else kwargs["input"]
            splits = args[3] if len(args) > 3 else kwargs.get("input_split_sizes")
            me = self.dist.get_rank(group) if group is not None else self.dist.get_rank()
            if splits:
                row = source.numel() // max(1, source.size(0)) if source.ndim > 1 else 1
                return (sum(splits) - splits[me]) * row * source.element_size()
            return (w - 1) / w * nbytes(source)
        return nbytes(first)  # send / isend


def worker(rank: int, world_size: int, variant: str, hidden: int, layers: int, warmup: int, steps: int):
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
    vocab, seq = 256, 32
    model = TinyLlama(layers=layers, d=hidden, kv=hidden // 2, ffn=int(hidden * 8 / 3), vocab=vocab)
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "optimizer": {k: copy.deepcopy(v) for k, v in VARIANTS[variant].items() if k != "stage"},
        "zero_optimization": {"stage": VARIANTS[variant].get("stage", 1)},
        "steps_per_print": 10_000,
        "wall_clock_breakdown": False,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    opt = engine.basic_optimizer
    times, bytes_per_step, flops_per_step, exchange = [], [], [], []
    expected = opt.zero_expected_bytes() if hasattr(opt, "zero_expected_bytes") else (0, 0)
    for step in range(warmup + steps):
        g = torch.Generator().manual_seed(1000 * step + rank)
        tokens = torch.randint(0, vocab, (4, seq), generator=g)
        labels = torch.roll(tokens, -1, dims=1)
        dist.barrier()
        counter.on, counter.bytes, counter.point_to_point, ds_flops[0] = step >= warmup, 0.0, 0.0, 0.0
        start = time.perf_counter()
        loss = engine(tokens, labels)
        engine.backward(loss)
        engine.step()
        elapsed = time.perf_counter() - start
        counter.on = False
        if step >= warmup:
            times.append(elapsed)
            bytes_per_step.append(counter.bytes)
            stats = getattr(opt, "comm_stats", None)
            flops_per_step.append(stats.flops if stats is not None else ds_flops[0])
            # teonspeed's own counters of this step, and what the collective wrapper saw of its exchange
            exchange.append(
                (stats.sent, stats.received, counter.point_to_point)
                if stats is not None
                else (0, 0, counter.point_to_point)
            )
    params = (
        {n: p.detach().float().clone() for n, p in engine.module.named_parameters()} if rank == 0 else None
    )
    numel = sum(p.numel() for p in model.parameters())
    plans = getattr(opt, "zero_plans", [])
    plan = dict(
        jobs=sum(len(p.jobs) for p in plans),
        cut=sum(j.cut for p in plans for j in p.jobs),
        imbalance=max((p.imbalance for p in plans if p.jobs), default=1.0),
        partition_imbalance=max((p.partition_imbalance for p in plans if p.jobs), default=1.0),
        old_all_gather=sum(
            fp.partition_size * 4 * (fp.dp_size - 1)
            for fp in getattr(opt, "partitions", {}).values()
            if any(j for p in plans for j in p.jobs)
        ),
    )
    return dict(
        plan=plan,
        expected=expected,
        exchange=exchange,
        step_s=statistics.median(times),
        bytes=statistics.median(bytes_per_step),
        flops=statistics.median(flops_per_step),
        params=params,
        numel=numel,
        optimizer=type(engine.optimizer).__name__,
        basic=type(opt).__name__,
    )


def rel_max(a: Dict[str, Any], b: Dict[str, Any]) -> float:
    return max(float((a[n] - b[n]).norm() / b[n].norm()) for n in b)


def measure(world_size: int, args) -> Dict[str, Any]:
    from support.harness import run_ranks

    runs = {
        v: run_ranks(worker, world_size, v, args.hidden, args.layers, args.warmup, args.steps, timeout=900)
        for v in VARIANTS
    }
    row: Dict[str, Any] = dict(ranks=world_size, params=runs["AdamW"][0]["numel"])
    adamw_bytes = max(r["bytes"] for r in runs["AdamW"])
    for v, ranks in runs.items():
        row[v] = dict(
            bytes_max=max(r["bytes"] for r in ranks),
            extra_bytes_max=max(r["bytes"] for r in ranks) - adamw_bytes,
            flops_max=max(r["flops"] for r in ranks),
            flops_total=sum(r["flops"] for r in ranks),
            step_ms=1e3 * max(r["step_s"] for r in ranks),
            wrapper=ranks[0]["optimizer"],
            optimizer=ranks[0]["basic"],
            plan=ranks[0]["plan"],
            # measured == predicted: every timed step's counters equal the plans' expected_bytes
            # (FlatStep), and the wrapper's point-to-point bytes equal the counters' sent
            counter_equals_plan=all(
                (sent, received) == tuple(r["expected"]) for r in ranks for sent, received, _ in r["exchange"]
            ),
            wrapper_equals_counter=all(sent == p2p for r in ranks for sent, _, p2p in r["exchange"]),
            exchange_sent_max=max((sent for r in ranks for sent, _, _ in r["exchange"]), default=0),
            exchange_received_max=max((rec for r in ranks for _, rec, _ in r["exchange"]), default=0),
        )
    ours, theirs = runs["teonspeed Muon"][0]["params"], runs["DeepSpeed Muon"][0]["params"]
    rule = runs["DeepSpeed Muon ZeRO-0"][0]["params"]
    row["rel_diff_ours_vs_deepspeed"] = rel_max(ours, theirs)
    row["rel_diff_ours_vs_deepspeed_zero0"] = rel_max(ours, rule)
    row["rel_diff_deepspeed_zero1_vs_zero0"] = rel_max(theirs, rule)
    row["rel_diff_bf16_vs_fp32_ns"] = rel_max(ours, runs["teonspeed Muon fp32 NS"][0]["params"])
    return row


def write_md(data: Dict[str, Any], path: Path) -> None:
    m = data["machine"]
    a = data["args"]
    lines = [
        "# teonspeed vs DeepSpeed's built-in Muon, DeepSpeed ZeRO-1 on CPU/gloo",
        "",
        f"{m['cpu']}, {m['cpus']} CPUs; torch {m['torch']}, deepspeed {m['deepspeed']}, "
        f"Python {m['python']}; "
        f"{m['date']}; git {m['git']}; load average at the end: {m['load_average']}.",
        "",
        f"**Note:** {m['note']}. Bytes and FLOPs are exact counters and do not depend on the load.",
        "",
        f"Model: LLaMA-named TinyLlama, hidden {a['hidden']}, {a['layers']} layers (parameters: "
        f"{data['rows'][0]['params']:,}), micro-batch 4 x 32 tokens per rank, ZeRO stage 1, fp32; "
        f"{a['steps']} timed steps after {a['warmup']} warm-up. Bytes: per rank per training step, every "
        "collective (ring model), busiest rank; *extra* = over AdamW's in the same run. NS GFLOPs: busiest "
        "rank per step (and the sum over ranks). Step: median forward+backward+step, slowest rank. "
        "*ours vs DS*: max over parameters of the relative distance after the run; *bf16 vs fp32 NS*: the "
        "same distance between our bf16-NS and fp32-NS runs (bf16 rounding alone). *teonspeed exchange*: the "
        "busiest rank's bytes sent / received by the flat step's point-to-point exchange (opt.comm_stats); "
        "*plan*: on every rank and timed step the counters equal the plans' prediction "
        "(`zero_expected_bytes`, from FlatStep.expected_bytes) and the sent bytes equal what the collective "
        "wrapper saw in `batch_isend_irecv` (both teonspeed runs). *with `cluster`*: our run planned "
        "with the "
        f"`cluster` override {json.dumps(MIXED_CLUSTER)} (NS GFLOP max, max/mean, exchange KiB sent max), "
        "where moving a job pays off; the default H100 constants keep this tiny model's jobs where they are "
        "(a move costs a collective's latency, more than the microseconds of Newton–Schulz it would save).",
        "",
        "| ranks | AdamW KiB | DS Muon KiB (extra) | teonspeed KiB (extra) | old teonspeed all-gather KiB | "
        "DS NS GFLOP max (sum) | teonspeed NS GFLOP max (sum) | cut / jobs | NS max/mean (equal-byte) | "
        "AdamW ms | DS Muon ms | teonspeed ms | ours vs DS ZeRO-0 | DS ZeRO-1 vs DS ZeRO-0 | ours vs "
        "DS ZeRO-1 | "
        "bf16 vs fp32 NS | teonspeed exchange KiB sent / recv | plan | with `cluster`: NS GFLOP max, "
        "max/mean, KiB |",
        "|" + "---|" * 19,
    ]
    for r in data["rows"]:
        ad, ds, us, cl = r["AdamW"], r["DeepSpeed Muon"], r["teonspeed Muon"], r["teonspeed Muon cluster"]
        plan = us["plan"]
        counters_ok = all(x["counter_equals_plan"] and x["wrapper_equals_counter"] for x in (us, cl))
        lines.append(
            f"| {r['ranks']} | {ad['bytes_max'] / 1024:.1f} | {ds['bytes_max'] / 1024:.1f} "
            f"({ds['extra_bytes_max'] / 1024:+.1f}) | "
            f"{us['bytes_max'] / 1024:.1f} ({us['extra_bytes_max'] / 1024:+.1f}) "
            f"| {plan['old_all_gather'] / 1024:.1f} | "
            f"{ds['flops_max'] / 1e9:.3f} ({ds['flops_total'] / 1e9:.3f}) | {us['flops_max'] / 1e9:.3f} "
            f"({us['flops_total'] / 1e9:.3f}) | {plan['cut']} / {plan['jobs']} | {plan['imbalance']:.2f} "
            f"({plan['partition_imbalance']:.2f}) | {ad['step_ms']:.0f} | {ds['step_ms']:.0f} "
            f"| {us['step_ms']:.0f} | "
            f"{r['rel_diff_ours_vs_deepspeed_zero0']:.1e} | {r['rel_diff_deepspeed_zero1_vs_zero0']:.1e} | "
            f"{r['rel_diff_ours_vs_deepspeed']:.1e} | {r['rel_diff_bf16_vs_fp32_ns']:.1e} | "
            f"{us['exchange_sent_max'] / 1024:.1f} / {us['exchange_received_max'] / 1024:.1f} | "
            f"{'yes' if counters_ok else 'NO'} | "
            f"{cl['flops_max'] / 1e9:.3f}, {cl['plan']['imbalance']:.2f}, "
            f"{cl['exchange_sent_max'] / 1024:.1f} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    import torch

    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", default="2,4")
    parser.add_argument("--hidden", type=int, default=96)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default=str(RESULTS_DIR / "zero_side_by_side_cpu"))
    args = parser.parse_args()
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    from teonspeed.patches import cpu_shims

    cpu_shims.apply()
    import deepspeed  # noqa: F401  (imported before forking, like the tests)
    import scaling

    rows = []
    for w in [int(x) for x in args.ranks.split(",")]:
        rows.append(measure(w, args))
        print(json.dumps(rows[-1], default=float)[:600], flush=True)
    info = scaling.machine()
    info.update(
        deepspeed=deepspeed.__version__,
        note="shared 2-core machine used by several engineers at once; up to 8 single-threaded rank "
        "processes share 2 cores, so step times measure oversubscribed CPU + loopback gloo",
    )
    data = dict(machine=info, args=vars(args), rows=rows)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    write_md(data, out.with_suffix(".md"))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
