"""launch/memory.py's estimate against the measured peak memory of small real runs.

    .venv/bin/python -m launch.memory_check               # CPU: peak RSS of `python -m launch.pretrain`
    .venv/bin/python -m launch.memory_check --device cuda # GPU: torch.cuda.max_memory_allocated (1 GPU)

On CPU the peak RSS of a process includes the Python, torch, megatron-core and DeepSpeed libraries and
the BPE trainer (about a GB) that the estimate leaves out, so each comparison is of two runs that differ
only in the global batch: the measured difference of their peaks against the estimated difference
(activations and logits). Every run is one process (world 1), fp32 on CPU, a few steps.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Sequence

from launch import cli
from launch.configs import REPO
from launch.estimator import GIB, estimate, setup_from_launch

PAIRS = [
    ("llama_small_cpu", 256, 8, 32),
    ("gpt2_tiny", 256, 8, 32),
]  # (config, seq, small batch, large batch)


def run_argv(config: str, seq: int, batch: int, device: str, runs: Path) -> List[str]:
    return [
        "--model-config",
        config,
        "--seq",
        str(seq),
        "--global-batch",
        str(batch),
        "--steps",
        "3",
        "--eval-every",
        "1000",
        "--eval-batches",
        "1",
        "--log-every",
        "1000",
        "--progress",
        "off",
        "--no-tensorboard",
        "--no-plot",
        "--device",
        device,
        "--runs-dir",
        str(runs),
        "--optimizer",
        "teon",
    ]


def measured_peak_bytes(argv: Sequence[str], device: str) -> float:
    """Peak resident memory of one `python -m launch.pretrain` process (CPU), or the GPU's
    max_memory_allocated reported by the run (CUDA)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    if device == "cuda":
        code = (
            "import sys, torch; from launch import pretrain; pretrain.main(sys.argv[1:]); "
            "print('PEAK', torch.cuda.max_memory_allocated())"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, *argv], cwd=REPO, env=env, capture_output=True, text=True, check=True
        ).stdout
        return float(next(line.split()[1] for line in out.splitlines() if line.startswith("PEAK")))
    # stderr to a file, not a pipe: a pipe nobody reads while wait4 waits fills up and stalls the child.
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "launch.pretrain", *argv],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            stderr.seek(0)
            raise SystemExit(f"launch.pretrain {' '.join(argv)} failed:\n{stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss * 1024.0  # KiB on Linux


def estimated_bytes(argv: Sequence[str]) -> float:
    spec, par, train = setup_from_launch(argv, 1, overhead_gib=0.0)
    return estimate(spec, par, train).bytes["total"]


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.parser(prog="python -m launch.memory_check", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="cpu: peak RSS differences of two runs; cuda: torch.cuda.max_memory_allocated (1 GPU)",
    )
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        print(
            f"{'config':16} {'seq':>4} {'batch':>9} | {'estimated':>10} {'measured':>10} {'error':>7}   (MiB)"
        )
        for config, seq, small, large in PAIRS:
            est, meas = [], []
            for i, batch in enumerate((small, large)):
                run = run_argv(config, seq, batch, args.device, Path(tmp) / f"{config}_{i}")
                est.append(estimated_bytes(run))
                meas.append(measured_peak_bytes(run, args.device))
            if args.device == "cuda":
                rows = [(f"{small}", est[0], meas[0]), (f"{large}", est[1], meas[1])]
            else:
                rows = [(f"{large}-{small}", est[1] - est[0], meas[1] - meas[0])]
            for label, e, m in rows:
                print(
                    f"{config:16} {seq:>4} {label:>9} "
                    f"| {e / 2**20:10.1f} {m / 2**20:10.1f} {(e - m) / m:+7.1%}"
                )
            if args.device == "cpu":
                print(
                    f"{'':16} {'':>4} {'baseline':>9} | peak RSS of the small run {meas[0] / GIB:.2f} "
                    f"GiB, estimate {est[0] / GIB:.3f} GiB (the rest: libraries, BPE trainer, data)"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
