"""Test scripts in subprocesses: their environment, and the real `deepspeed` launcher on 2 CPU ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from support.harness import free_port

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent


def script_env(**extra: str) -> dict:
    """The environment for a test script in a subprocess: single-threaded, without TorchDynamo, with
    tests/integration (ds_helpers) and tests (support, megatron_models) importable."""
    path = os.pathsep.join([str(TESTS / "integration"), str(TESTS), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1", PYTHONPATH=path, **extra)


def run_deepspeed(script: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus=2 script args...` from the repository root in script_env(); fails with the
    tail of its output unless every rank exited 0."""
    launcher = str(Path(sys.executable).parent / "deepspeed")
    cmd = [launcher, "--num_gpus=2", "--no_local_rank", "--master_port", str(free_port()), str(script), *args]
    proc = subprocess.run(cmd, env=script_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc
