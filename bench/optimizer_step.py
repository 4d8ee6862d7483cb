"""Step time and peak memory of teonspeed.TEON / Muon / HTMuon vs torch.optim.AdamW and DeepSpeed's shipped
Muon on LLaMA parameter sets, side by side in one run.

    .venv/bin/python bench/optimizer_step.py                        # CPU: --sizes 130m; GPU: 130m,1b
    .venv/bin/python bench/optimizer_step.py --sizes tiny,130m --repeats 3
    .venv/bin/python bench/optimizer_step.py --optimizers adamw,muon
    .venv/bin/python bench/optimizer_step.py --sizes 60m --optimizers muon,muon:fp32,ds_muon,ds_muon:fp32

Optimizer names: adamw | muon | teon | htmuon | ds_muon | ds_muon_standard, optionally with ":fp32" / ":bf16"
(the Newton–Schulz compute dtype; without it each optimizer picks its own: ours by ns_dtype="auto", see
teonspeed.ortho.compute_dtype; DeepSpeed's by ns_compute_dtype()) and "+compile" (run that process with
torch.compile enabled; DeepSpeed's muon_update is decorated with torch.compile, which the driver otherwise
disables with TORCHDYNAMO_DISABLE=1). ds_muon is deepspeed.runtime.zero.muon.muon_optimizer.MuonWithAuxAdam,
the optimizer DeepSpeed's engine builds for "type": "Muon", with its default ns_method="gram" (fp16 where
the accelerator supports it, else fp32); ds_muon_standard is the same with ns_method="standard" (bf16 where
supported). Its non-matrix parameters (embeddings, head, gains: the same split as ours) take its inline
Adam on the CPU and torch's fused AdamW on CUDA (the engine passes its FusedAdam there).

Writes bench/results/optimizer_step_cpu.{json,md} (or optimizer_step_gpu.* on CUDA). A run restricted
with --sizes tiny alone writes optimizer_step_<cpu|gpu>_tiny.* so that a smoke run never overwrites the
real table.

What is measured. Each (size, optimizer) runs in a fresh subprocess, so its memory high-water mark is
its own. The process builds the parameters of a HF-style LLaMA (model.embed_tokens.weight,
model.layers.N.self_attn.{q,k,v,o}_proj.weight, model.layers.N.mlp.{gate,up,down}_proj.weight, the two
RMSNorm gains per layer, model.norm.weight and an untied lm_head.weight) in fp32 with random fp32
gradients, builds the optimizer through the public API (teonspeed.TEON(named_params) etc., library
defaults), runs `--warmup` steps (the first allocates the optimizer state; its time is reported as
first step), then times `--repeats` more steps (median and min). Gradients stay fixed between steps.
  - GPU: CUDA-synchronised wall time; memory = torch.cuda.max_memory_allocated during the steps minus
    the memory allocated before the first step (parameters + gradients), i.e. optimizer state plus
    step temporaries. AdamW is fused=True.
  - CPU: wall time; memory = the rise of the process's resident-set high-water mark (VmHWM) over the
    steps, which also counts allocator slack; AdamW is torch's default (foreach) implementation.
  - state MiB: the bytes of the tensors held in optimizer.state after the steps (exact, both devices).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# name: (hidden, layers, heads, ffn, vocab)
SIZES: Dict[str, Tuple[int, int, int, int, int]] = {
    "tiny": (128, 2, 4, 352, 1024),
    "60m": (512, 8, 8, 1376, 32000),
    "130m": (768, 12, 12, 2048, 32000),
    "1b": (2048, 24, 32, 5461, 32000),
}
OPTIMIZERS = ("adamw", "muon", "teon", "htmuon", "ds_muon", "ds_muon_standard")
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def parse_variant(spec: str) -> Tuple[str, Optional[str], bool]:
    """ "muon:fp32+compile" -> ("muon", "fp32", True); ValueError naming the bad part otherwise."""
    compile_ = spec.endswith("+compile")
    base = spec[: -len("+compile")] if compile_ else spec
    name, _, dtype = base.partition(":")
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r} in {spec!r}; choose from {OPTIMIZERS}")
    if dtype and (dtype not in DTYPES or name == "adamw"):
        raise ValueError(f"bad dtype {dtype!r} in {spec!r}: use :fp32 or :bf16 on a Muon-family optimizer")
    return name, dtype or None, compile_


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--sizes", default=None, help=f"comma list of {list(SIZES)} (default: 130m on CPU, 130m,1b on GPU)"
    )
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    p.add_argument("--repeats", type=int, default=3, help="timed steps after warmup (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per (size, optimizer) subprocess")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--stem", default=None, help="output file stem (default optimizer_step_<cpu|gpu>[_tiny])")
    p.add_argument(
        "--budget-s",
        type=float,
        default=0,
        help="stop starting new rows after this many seconds (0: no limit); the rest are listed as skipped",
    )
    p.add_argument("--worker", nargs=2, metavar=("SIZE", "OPTIMIZER"), help=argparse.SUPPRESS)
    p.add_argument(
        "--paired",
        action="store_true",
        help="run all optimizers of a size in one process with interleaved steps (fair ratios on a "
        "loaded machine; no memory figures)",
    )
    p.add_argument("--worker-paired", nargs=2, metavar=("SIZE", "OPTIMIZERS"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def llama_param_shapes(size: str) -> List[Tuple[str, Tuple[int, ...]]]:
    hidden, layers, _heads, ffn, vocab = SIZES[size]
    shapes: List[Tuple[str, Tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        pre = f"model.layers.{i}"
        for proj in ("q", "k", "v", "o"):
            shapes.append((f"{pre}.self_attn.{proj}_proj.weight", (hidden, hidden)))
        shapes += [
            (f"{pre}.mlp.gate_proj.weight", (ffn, hidden)),
            (f"{pre}.mlp.up_proj.weight", (ffn, hidden)),
            (f"{pre}.mlp.down_proj.weight", (hidden, ffn)),
            (f"{pre}.input_layernorm.weight", (hidden,)),
            (f"{pre}.post_attention_layernorm.weight", (hidden,)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return shapes


def num_params(size: str) -> int:
    total = 0
    for _, shape in llama_param_shapes(size):
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


# ----------------------------------------------------------------------------------------- worker


def _vm_kib(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _state_bytes(opt) -> int:
    seen, total = set(), 0

    def visit(v):
        nonlocal total
        if hasattr(v, "untyped_storage") and hasattr(v, "nbytes"):
            key = (v.untyped_storage().data_ptr(), v.storage_offset(), v.nbytes)
            if key not in seen:
                seen.add(key)
                total += v.nbytes
        elif isinstance(v, dict):
            for x in v.values():
                visit(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                visit(x)

    for st in opt.state.values():
        visit(st)
    return total


def _is_adamw_side(name: str, p) -> bool:
    from teonspeed.grouping import adamw_reason  # teonspeed's own routing rule, for DeepSpeed's groups too

    return adamw_reason(name, p) is not None


def build_deepspeed_muon(named, ns_method: str, dtype: Optional[str], cuda: bool):
    """DeepSpeed's shipped Muon (MuonWithAuxAdam) on the same split as ours; `dtype` forces its NS dtype."""
    import torch
    from deepspeed.runtime.zero.muon import muon_optimizer, original_muon

    if dtype is not None:
        forced = getattr(torch, DTYPES[dtype])
        original_muon.ns_compute_dtype = lambda ns_method="gram": (
            forced
        )  # read at call time by both NS kernels
    groups = [
        dict(
            params=[p for n, p in named if not _is_adamw_side(n, p)],
            use_muon=True,
            lr=0.02,
            momentum=0.95,
            weight_decay=0.0,
            ns_method=ns_method,
        ),
        dict(
            params=[p for n, p in named if _is_adamw_side(n, p)],
            use_muon=False,
            lr=3e-4,
            betas=(0.9, 0.95),
            eps=1e-8,
            weight_decay=0.0,
        ),
    ]
    kw = dict(adam_optimizer=torch.optim.AdamW, adam_optimizer_kwargs={"fused": True}) if cuda else {}
    opt = muon_optimizer.MuonWithAuxAdam(groups, **kw)
    picked = str(original_muon.ns_compute_dtype(ns_method)).replace("torch.", "")
    label = (
        f"deepspeed MuonWithAuxAdam (ns_method={ns_method}, NS dtype {picked}"
        f"{' forced' if dtype else ' (its own pick)'}, aux Adam {'torch fused' if cuda else 'inline'})"
    )
    return opt, label, picked


def build(size: str, spec: str, device):
    """(optimizer, named parameters with gradients, label, NS compute dtype) for one optimizer spec."""
    import torch
    import teonspeed
    from teonspeed.ortho import default_compute_dtype

    name, dtype, _compile = parse_variant(spec)
    cuda = device.type == "cuda"
    gen = torch.Generator(device=device).manual_seed(0)
    named = []
    for pname, shape in llama_param_shapes(size):
        p = torch.nn.Parameter(torch.randn(*shape, device=device, generator=gen) * 0.02)
        p.grad = torch.randn(*shape, device=device, generator=gen) * 1e-3
        named.append((pname, p))
    ns_compute = None
    if name == "adamw":
        kw = {"fused": True} if cuda else {}
        opt = torch.optim.AdamW([p for _, p in named], lr=3e-4, betas=(0.9, 0.95), weight_decay=0.0, **kw)
        label = "torch.optim.AdamW" + (" (fused)" if cuda else " (foreach)")
    elif name.startswith("ds_muon"):
        opt, label, ns_compute = build_deepspeed_muon(
            named, "standard" if name == "ds_muon_standard" else "gram", dtype, cuda
        )
    else:
        cls = {"muon": teonspeed.Muon, "teon": teonspeed.TEON, "htmuon": teonspeed.HTMuon}[name]
        opt = cls(named, ns_dtype=dtype or "auto")
        c = opt.config
        ns_compute = (
            str(default_compute_dtype(named[0][1])) if c.ns_dtype == "auto" else "torch." + DTYPES[c.ns_dtype]
        ).replace("torch.", "")
        label = (
            f"teonspeed.{cls.__name__} (orthogonalizer={c.orthogonalizer} x{c.ns_steps}, "
            f"ns_dtype={c.ns_dtype} -> {ns_compute}, teon_k={c.teon_k}"
            + (f", ht_method={c.ht_method}, ht_power={c.ht_power}" if name == "htmuon" else "")
            + ")"
        )
    return opt, named, label, ns_compute


def worker(size: str, spec: str, args: argparse.Namespace) -> dict:
    import torch

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(args.threads)
    opt, named, label, ns_compute = build(size, spec, device)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = (_vm_kib("VmHWM") or 0) * 1024
    step_ms = []
    for _ in range(args.warmup + args.repeats):
        t0 = time.perf_counter()
        opt.step()
        sync()
        step_ms.append(1e3 * (time.perf_counter() - t0))
    if cuda:
        peak_extra = torch.cuda.max_memory_allocated() - base
        mem_kind = "cuda max_memory_allocated - allocated before the first step"
    else:
        hwm = _vm_kib("VmHWM")
        peak_extra = (hwm * 1024 - base) if hwm is not None else None
        mem_kind = "rise of the process RSS high-water mark (VmHWM) over the steps"
    timed = step_ms[args.warmup :] or step_ms
    return {
        "size": size,
        "optimizer": spec,
        "label": label,
        "device": str(device),
        "ns_compute_dtype": ns_compute,
        "torch_compile": parse_variant(spec)[2],
        "num_params": num_params(size),
        "first_step_ms": step_ms[0],
        "median_ms": statistics.median(timed),
        "min_ms": min(timed),
        "timed_steps": len(timed),
        "all_steps_ms": step_ms,
        "peak_extra_mib": None if peak_extra is None else peak_extra / 2**20,
        "peak_memory_measure": mem_kind,
        "state_mib": _state_bytes(opt) / 2**20,
        "param_mib": sum(p.numel() * p.element_size() for _, p in named) / 2**20,
    }


def paired_worker(size: str, specs: List[str], args: argparse.Namespace) -> List[dict]:
    """All `specs` in one process, their timed steps interleaved (round r steps each optimizer once, in an
    order rotated by r), so that a shared machine's load swings hit every optimizer alike. Memory is not
    separable here and is not reported."""
    import torch

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(args.threads)
    built = [build(size, spec, device) for spec in specs]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times: List[List[float]] = [[] for _ in specs]
    for r in range(args.warmup + args.repeats):
        order = list(range(len(specs)))
        order = order[r % len(order) :] + order[: r % len(order)]
        for i in order:
            sync()
            t0 = time.perf_counter()
            built[i][0].step()
            sync()
            times[i].append(1e3 * (time.perf_counter() - t0))
    rows = []
    for spec, (opt, named, label, ns_compute), step_ms in zip(specs, built, times):
        timed = step_ms[args.warmup :] or step_ms
        rows.append(
            {
                "size": size,
                "optimizer": spec,
                "label": label,
                "device": str(device),
                "ns_compute_dtype": ns_compute,
                "torch_compile": False,
                "paired": True,
                "num_params": num_params(size),
                "first_step_ms": step_ms[0],
                "median_ms": statistics.median(timed),
                "min_ms": min(timed),
                "timed_steps": len(timed),
                "all_steps_ms": step_ms,
                "peak_extra_mib": None,
                "peak_memory_measure": "not measured (--paired: all optimizers share one process)",
                "state_mib": _state_bytes(opt) / 2**20,
            }
        )
    return rows


# ----------------------------------------------------------------------------------------- driver


def machine_info(device: str) -> dict:
    import torch

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": device,
        "loadavg_1_5_15": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    import gpu_report

    info["cpu_model"] = gpu_report.cpu_model()
    info["cpu_bf16_flags"] = cpu_bf16_flags()
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    else:
        from teonspeed.ortho.compute_dtype import cpu_bf16_decision

        info["ns_dtype_auto_cpu"] = cpu_bf16_decision()
    info["deepspeed"] = gpu_report._version("deepspeed")
    info["teonspeed"] = gpu_report._version("teonspeed")
    info.update(gpu_report.git_state())
    return info


def cpu_bf16_flags() -> List[str]:
    """The CPU's bf16-related feature flags (avx512_bf16, amx_bf16...), from /proc/cpuinfo."""
    try:
        flags = next(
            (
                ln.split(":", 1)[1].split()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("flags")
            ),
            [],
        )
    except OSError:
        return []
    return sorted(f for f in flags if "bf16" in f or f.startswith("amx"))


def fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def _auto_text(d: dict) -> str:
    if d.get("source") != "probe":
        return f"{'bf16' if d['bf16'] else 'fp32'} (set by {d['source']})"
    return (
        f"{'bf16' if d['bf16'] else 'fp32'} (probe at {d['probe_size']}³: fp32 {d['fp32_ms']:.2f} ms, bf16 "
        f"{d['bf16_ms']:.2f} ms, bf16 speedup {d['bf16_speedup']:.2f}x; bf16 needs > {d['min_speedup']}x)"
    )


def markdown(info: dict, rows: List[dict], args: argparse.Namespace) -> str:
    where = info.get("gpu") or f"{info.get('cpu_model') or 'CPU'}, {args.threads} torch threads"
    lines = [
        f"# Optimizer step time and memory ({info['device']})",
        "",
        f"{where}; torch {info['torch']}, Python {info['python']}, {info['platform']}, "
        f"{info['cpu_count']} CPUs; {info['date']}; git {info.get('git_commit', '?')[:12]}"
        f"{' (dirty tree)' if info.get('git_dirty') else ''}; load average at the "
        f"end: {info['loadavg_1_5_15']}.",
        "",
        f"LLaMA parameter sets with HF names, fp32 parameters and random fp32 gradients; library defaults; "
        f"{args.warmup} warmup step(s) (the first allocates the state: *first step*), "
        f"then {args.repeats} timed "
        "steps (median, min). Each (size, optimizer) runs in its own process. *extra peak MiB*: "
        + (
            "CUDA max_memory_allocated during the steps minus what was allocated before (parameters and "
            "gradients): optimizer state plus step temporaries."
            if info["device"] == "cuda"
            else "the rise of the process's resident-set high-water mark over the steps (state plus "
            "temporaries, "
            "including allocator slack). CPU timings on a shared 2-core machine vary by up to ~2x "
            "between runs."
        )
        + " *state MiB*: tensors held in optimizer.state.",
        "",
        f"Versions: deepspeed {info.get('deepspeed')}, teonspeed {info.get('teonspeed')}. CPU bf16 flags: "
        f"{', '.join(info.get('cpu_bf16_flags') or []) or 'none'}."
        + (
            f" ns_dtype='auto' on this CPU: {_auto_text(info['ns_dtype_auto_cpu'])}."
            if info.get("ns_dtype_auto_cpu")
            else ""
        ),
        "",
    ]
    pairs = side_by_side(rows)
    if pairs:
        lines += [
            "## Ours vs DeepSpeed's shipped Muon (same parameter set, same run)",
            "",
            "Ratio = our median step / DeepSpeed's (the faster of its gram and standard NS at that dtype "
            "choice); below 1 means ours is faster. "
            + (
                "Steps interleaved in one process (--paired): load swings hit both alike."
                if all(r.get("paired") for r in rows if r.get("median_ms"))
                else "Each optimizer ran in its own process, one after the other: on a shared machine the "
                "load changes between them, so for ratios prefer a --paired run."
            ),
            "",
            "| size | dtype choice | ours | ours ms | DeepSpeed | DeepSpeed ms | ratio ours/DS |",
            "|---|---|---|---|---|---|---|",
        ]
        for q in pairs:
            lines.append(
                f"| {q['size']} | {q['dtypes']} | {q['ours']} ({q['ours_dtype']}) | {q['ours_ms']:.1f} | "
                f"{q['deepspeed']} ({q['deepspeed_dtype']}) | {q['deepspeed_ms']:.1f} | "
                f"**{q['ratio_ours_over_ds']:.2f}** |"
            )
        lines.append("")
    lines += [
        "## All rows",
        "",
        "| size | params | optimizer | median ms | min ms | first step ms | extra peak MiB | state MiB "
        "| status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r.get('num_params', 0) / 1e6:.1f}M | {r.get('label', r['optimizer'])} | "
            f"{fmt(r.get('median_ms'), '.1f')} | {fmt(r.get('min_ms'), '.1f')} | "
            f"{fmt(r.get('first_step_ms'), '.1f')} | {fmt(r.get('peak_extra_mib'), '.0f')} | "
            f"{fmt(r.get('state_mib'), '.0f')} | {r.get('status', 'measured')} |"
        )
    lines.append("")
    lines.append(
        "Sizes: "
        + "; ".join(
            f"{s} = hidden {h}, {nl} layers, {nh} heads, ffn {f}, vocab {v}"
            for s, (h, nl, nh, f, v) in SIZES.items()
        )
        + "."
    )
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker[0], args.worker[1], args)), flush=True)
        return 0
    if args.worker_paired:
        for row in paired_worker(args.worker_paired[0], args.worker_paired[1].split(","), args):
            print("RESULT " + json.dumps(row), flush=True)
        return 0
    sizes = (args.sizes or ("130m,1b" if args.device == "cuda" else "130m")).split(",")
    names = args.optimizers.split(",")
    bad = [s for s in sizes if s not in SIZES]
    try:
        variants = [parse_variant(o) for o in names]
    except ValueError as exc:
        bad.append(str(exc))
        variants = []
    if args.paired and any(compile_ for _, _, compile_ in variants):
        bad.append("+compile variants need their own process: drop them or --paired")
    if bad:
        print(f"unknown size/optimizer: {bad}", file=sys.stderr)
        return 2
    info = machine_info(args.device)
    dev = "gpu" if args.device == "cuda" else "cpu"
    stem = args.stem or (f"optimizer_step_{dev}" + ("_tiny" if sizes == ["tiny"] else ""))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    start = time.perf_counter()
    # One job per (size, optimizer), or with --paired one job per size running all its optimizers.
    # Optimizer-major order: under --budget-s the first optimizers are measured at every size.
    jobs = (
        [(size, names) for size in sizes] if args.paired else [(size, [n]) for n in names for size in sizes]
    )
    for size, job in jobs:
        label = ",".join(job)
        if args.budget_s and time.perf_counter() - start > args.budget_s:
            rows += [
                {
                    "size": size,
                    "optimizer": n,
                    "num_params": num_params(size),
                    "status": f"skipped (--budget-s {args.budget_s} spent)",
                }
                for n in job
            ]
            continue
        flag = ["--worker-paired", size, label] if args.paired else ["--worker", size, label]
        cmd = [
            sys.executable,
            __file__,
            *flag,
            "--device",
            args.device,
            "--repeats",
            str(args.repeats),
            "--warmup",
            str(args.warmup),
            "--threads",
            str(args.threads),
        ]
        env = {**os.environ, "TORCHDYNAMO_DISABLE": os.environ.get("TORCHDYNAMO_DISABLE", "1")}
        if not args.paired and parse_variant(label)[2]:
            env["TORCHDYNAMO_DISABLE"] = "0"
        t0 = time.perf_counter()
        timeout = args.timeout
        if args.budget_s:
            timeout = max(30, min(timeout, args.budget_s - (time.perf_counter() - start) + 30))
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
            results = [json.loads(ln[7:]) for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if not results:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                results = [
                    {
                        "size": size,
                        "optimizer": n,
                        "num_params": num_params(size),
                        "status": f"failed (rc {proc.returncode}): {tail[0][:200]}",
                    }
                    for n in job
                ]
        except subprocess.TimeoutExpired:
            results = [
                {
                    "size": size,
                    "optimizer": n,
                    "num_params": num_params(size),
                    "status": f"timed out after {timeout:.0f} s",
                }
                for n in job
            ]
        for result in results:
            result.setdefault("status", "measured")
            result["wall_s"] = time.perf_counter() - t0
            rows.append(result)
            print(
                f"{size:5s} {result['optimizer']:7s} median {fmt(result.get('median_ms'), '9.1f')} ms  "
                f"first {fmt(result.get('first_step_ms'), '9.1f')} ms  extra peak "
                f"{fmt(result.get('peak_extra_mib'), '7.0f')} MiB  "
                f"state {fmt(result.get('state_mib'), '6.0f')} MiB  {result['status']}",
                flush=True,
            )
        write_results(args, stem, info, sizes, rows)  # after every job: a killed run keeps what it measured
    write_results(args, stem, info, sizes, rows)
    print(f"wrote {args.out_dir / stem}.json and .md")
    return 0


def write_results(args, stem: str, info: dict, sizes: List[str], rows: List[dict]) -> None:
    info = {
        **info,
        "loadavg_1_5_15": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    payload = {
        "machine": info,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "threads": args.threads,
        "sizes": {s: dict(zip(("hidden", "layers", "heads", "ffn", "vocab"), SIZES[s])) for s in sizes},
        "rows": rows,
        "side_by_side": side_by_side(rows),
    }
    (args.out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.out_dir / f"{stem}.md").write_text(markdown(info, rows, args))


def side_by_side(rows: List[dict]) -> List[dict]:
    """Ours / DeepSpeed's median step time for each size, at matched dtype choices:
    "own pick" (each optimizer's default dtype), "fp32" and "bf16" (both forced)."""
    by_key = {(r["size"], r["optimizer"]): r for r in rows if r.get("median_ms")}
    out = []
    for size in dict.fromkeys(r["size"] for r in rows):
        for ours in ("muon", "teon", "htmuon"):
            for suffix, label in (("", "own pick"), (":fp32", "fp32"), (":bf16", "bf16")):
                mine = by_key.get((size, ours + suffix))
                theirs = [
                    by_key[(size, d + suffix)]
                    for d in ("ds_muon", "ds_muon_standard")
                    if (size, d + suffix) in by_key
                ]
                if mine is None or not theirs:
                    continue
                best = min(theirs, key=lambda r: r["median_ms"])
                out.append(
                    {
                        "size": size,
                        "dtypes": label,
                        "ours": mine["optimizer"],
                        "ours_ms": mine["median_ms"],
                        "ours_dtype": mine.get("ns_compute_dtype"),
                        "deepspeed": best["optimizer"],
                        "deepspeed_ms": best["median_ms"],
                        "deepspeed_dtype": best.get("ns_compute_dtype"),
                        "ratio_ours_over_ds": mine["median_ms"] / best["median_ms"],
                    }
                )
    return out


if __name__ == "__main__":
    sys.exit(main())
