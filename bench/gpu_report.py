"""What scripts/gpu_check.sh records: the machine, each stage's outcome, and the result files.

    python bench/gpu_report.py env                                   # print the environment as JSON
    python bench/gpu_report.py stage --name kernel_bench --rc 0 --seconds 93.1 --log LOG
    python bench/gpu_report.py junit --xml kernels_junit.xml --stem kernels_gpu
    python bench/gpu_report.py pretrain --run adamw=runs/gpu_check_adamw --run teon=runs/gpu_check_teon
    python bench/gpu_report.py summary --mode gpu

Every command writes into --results-dir (default bench/results) and, when $OUT is set (the device
machine's folder that comes back), nowhere else: scripts/gpu_check.sh packs the results for $OUT itself,
because only a few files may come back from there. Needs no GPU: on a CPU machine the environment says so.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
STAGES_FILE = "gpu_check_stages.jsonl"
STAGES = ("kernel_tests", "kernel_bench", "optimizer_step", "world1_step", "pretrain_adamw", "pretrain_teon")


# ------------------------------------------------------------------------------------------ environment


def _version(module: str) -> Optional[str]:
    try:
        mod = __import__(module)
        return str(getattr(mod, "__version__", "unknown"))
    except Exception as exc:  # noqa: BLE001 - a report never fails on a missing package
        return f"not importable ({type(exc).__name__})"


def nvidia_smi(query: str = "name,driver_version,memory.total") -> Optional[List[str]]:
    """One CSV row per GPU from nvidia-smi, or None where there is no nvidia-smi / no driver."""
    try:
        proc = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    return [ln.strip() for ln in proc.stdout.splitlines() if ln.strip()]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(smi=nvidia_smi) -> dict:
    """The machine and software versions every *_gpu result names (safe to call with no GPU)."""
    import torch

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "triton": _version("triton"),
        "deepspeed": _version("deepspeed"),
        "megatron_core": _megatron_version(),
        "gpu": None,
        "gpu_count": 0,
        "driver": None,
        "gpu_memory": None,
        "compute_capability": None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
        info["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    rows = smi()
    if rows:
        name, driver, memory = (part.strip() for part in (rows[0].split(",") + ["", "", ""])[:3])
        info.update(driver=driver, gpu_memory=memory)
        info["gpu"] = info["gpu"] or name
        info["gpu_count"] = info["gpu_count"] or len(rows)
    info.update(git_state())
    return info


def _megatron_version() -> Optional[str]:
    try:
        from megatron.core import package_info

        return package_info.__version__
    except Exception as exc:  # noqa: BLE001
        return f"not importable ({type(exc).__name__})"


def git_state() -> dict:
    """{"git_commit", "git_dirty"} of this checkout (None where git cannot tell)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], capture_output=True, text=True, cwd=REPO
        ).stdout
        return {"git_commit": commit or None, "git_dirty": bool(dirty.strip())}
    except OSError:
        return {"git_commit": None, "git_dirty": None}


def environment_line(env: dict) -> str:
    """One line naming the GPU, driver, torch, Triton and CUDA versions (the header of every *_gpu.md)."""
    gpu = f"{env['gpu']} (driver {env['driver']}, {env['gpu_memory']})" if env.get("gpu") else "no GPU"
    return (
        f"{gpu}; torch {env['torch']}, CUDA {env['cuda_runtime']}, Triton {env['triton']}, DeepSpeed "
        f"{env['deepspeed']}, megatron-core {env['megatron_core']}, Python {env['python']}; {env['cpu']}, "
        f"{env['cpu_count']} CPUs; {env['date']}; git {str(env.get('git_commit'))[:12]}"
        f"{' (dirty tree)' if env.get('git_dirty') else ''}"
    )


# ------------------------------------------------------------------------------------------ writing


def write_result(stem: str, payload: dict, markdown: str, results_dir: Path = RESULTS_DIR) -> List[Path]:
    """<stem>.json and <stem>.md in results_dir; returns both paths."""
    results_dir.mkdir(parents=True, exist_ok=True)
    paths = [results_dir / f"{stem}.json", results_dir / f"{stem}.md"]
    paths[0].write_text(json.dumps(payload, indent=2, default=str) + "\n")
    paths[1].write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    return paths


def record_stage(
    results_dir: Path,
    name: str,
    rc: int,
    seconds: float,
    log: Optional[Path] = None,
    timeout_s: Optional[float] = None,
) -> dict:
    """Append one stage's outcome to the stages file (one JSON object a line)."""
    status = "passed" if rc == 0 else ("timed out" if rc in (124, 137) else f"failed (rc {rc})")
    tail = []
    if log is not None and Path(log).is_file():
        tail = Path(log).read_text(errors="replace").splitlines()[-15:]
    entry = {
        "stage": name,
        "rc": rc,
        "status": status,
        "seconds": round(seconds, 1),
        "timeout_s": timeout_s,
        "log": str(log) if log else None,
        "log_tail": tail,
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    with open(results_dir / STAGES_FILE, "a") as fh:
        fh.write(json.dumps(entry) + "\n")
    return entry


def read_stages(results_dir: Path) -> List[dict]:
    path = results_dir / STAGES_FILE
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


# ------------------------------------------------------------------------------------------ summaries


def junit_summary(xml_path: Path) -> dict:
    """Per-test outcomes of a pytest --junitxml file."""
    root = ET.parse(xml_path).getroot()
    tests = []
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[kind]
                message = (node.get("message") or "")[:300]
                break
        tests.append(
            {
                "name": f"{case.get('classname', '')}::{case.get('name')}",
                "outcome": outcome,
                "seconds": float(case.get("time") or 0),
                "message": message,
            }
        )
    counts: Dict[str, int] = {}
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    return {"counts": counts, "tests": tests}


def metrics_summary(run_dir: Path) -> dict:
    """Final train/val loss and median tokens/s of a launch/pretrain.py run (its metrics.csv)."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        return {"run_dir": str(run_dir), "status": "no metrics.csv"}
    with open(path) as fh:
        rows = list(csv.DictReader(fh))

    def last(field):
        vals = [float(r[field]) for r in rows if r.get(field) not in (None, "")]
        return vals[-1] if vals else None

    rates = [float(r["tokens_per_s"]) for r in rows if r.get("tokens_per_s") not in (None, "")]
    steps = [int(float(r["step"])) for r in rows if r.get("step") not in (None, "")]
    return {
        "run_dir": str(run_dir),
        "status": "measured",
        "steps": max(steps) if steps else 0,
        "final_train_loss": last("train_loss"),
        "final_val_loss": last("val_loss"),
        "median_tokens_per_s": statistics.median(rates) if rates else None,
    }


def fmt(v, spec: str = ".4g") -> str:
    return "—" if v is None else format(v, spec)


def summary_markdown(env: dict, stages: List[dict], mode: str) -> str:
    lines = [
        f"# scripts/gpu_check.sh ({mode})",
        "",
        environment_line(env),
        "",
        "| stage | status | seconds | timeout s |",
        "|---|---|---|---|",
    ]
    for s in stages:
        lines.append(f"| {s['stage']} | {s['status']} | {s['seconds']} | {fmt(s.get('timeout_s'), 'g')} |")
    missing = [name for name in STAGES if name not in {s["stage"] for s in stages}]
    if missing:
        lines += ["", f"Not run: {', '.join(missing)}."]
    failed = [s for s in stages if s["rc"] != 0]
    for s in failed:
        lines += ["", f"## {s['stage']}: {s['status']} (log {s['log']})", "", "```", *s["log_tail"], "```"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ CLI


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="print the environment as JSON")
    st = sub.add_parser("stage", help="record one stage's outcome")
    st.add_argument("--name", required=True, choices=STAGES)
    st.add_argument("--rc", type=int, required=True)
    st.add_argument("--seconds", type=float, required=True)
    st.add_argument("--timeout", type=float, default=None)
    st.add_argument("--log", type=Path, default=None)
    ju = sub.add_parser("junit", help="summarise a pytest --junitxml file")
    ju.add_argument("--xml", type=Path, required=True)
    ju.add_argument("--stem", required=True)
    pr = sub.add_parser("pretrain", help="summarise launch/pretrain.py runs")
    pr.add_argument("--run", action="append", default=[], metavar="LABEL=RUN_DIR", required=True)
    pr.add_argument("--stem", default="pretrain_gpu")
    pr.add_argument("--command-line", default="", help="the pretrain.py flags used (for the report)")
    sm = sub.add_parser("summary", help="write gpu_check_<mode>.{json,md} from the recorded stages")
    sm.add_argument("--mode", required=True, choices=("gpu", "cpu_smoke"))
    args = p.parse_args(argv)
    if args.command == "pretrain":
        for item in args.run:
            if "=" not in item or not item.split("=", 1)[0]:
                p.error(f"--run takes LABEL=RUN_DIR, got {item!r}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    out = args.results_dir
    if args.command == "env":
        print(json.dumps(environment(), indent=2))
    elif args.command == "stage":
        entry = record_stage(out, args.name, args.rc, args.seconds, args.log, args.timeout)
        print(f"[gpu_check] {entry['stage']}: {entry['status']} in {entry['seconds']} s", flush=True)
    elif args.command == "junit":
        env = environment()
        summary = junit_summary(args.xml)
        md = [
            "# tests/unit/test_kernels.py on this machine",
            "",
            environment_line(env),
            "",
            "Counts: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["counts"].items())),
            "",
            "| test | outcome | seconds | message |",
            "|---|---|---|---|",
        ]
        md += [
            f"| {t['name']} | {t['outcome']} | {t['seconds']:.2f} | {t['message'].replace('|', '/')} |"
            for t in summary["tests"]
        ]
        write_result(args.stem, {"environment": env, **summary}, "\n".join(md), out)
    elif args.command == "pretrain":
        env = environment()
        runs = {label: metrics_summary(Path(d)) for label, d in (item.split("=", 1) for item in args.run)}
        md = [
            "# launch/pretrain.py, single process (DeepSpeed engine, bf16, ZeRO-1)",
            "",
            environment_line(env),
            "",
            f"Flags: `{args.command_line}`",
            "",
            "| optimizer | steps | final train loss | final val loss | median tokens/s | status |",
            "|---|---|---|---|---|---|",
        ]
        md += [
            f"| {label} | {r.get('steps', '—')} | {fmt(r.get('final_train_loss'))} "
            f"| {fmt(r.get('final_val_loss'))} | "
            f"{fmt(r.get('median_tokens_per_s'), '.0f')} | {r['status']} |"
            for label, r in runs.items()
        ]
        write_result(
            args.stem,
            {"environment": env, "command_line": args.command_line, "runs": runs},
            "\n".join(md),
            out,
        )
    elif args.command == "summary":
        env = environment()
        stages = read_stages(out)
        write_result(
            f"gpu_check_{args.mode}",
            {"environment": env, "mode": args.mode, "stages": stages},
            summary_markdown(env, stages, args.mode),
            out,
        )
        print(summary_markdown(env, stages, args.mode))
    return 0


if __name__ == "__main__":
    sys.exit(main())
