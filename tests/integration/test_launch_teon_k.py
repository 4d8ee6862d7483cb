"""The launcher refuses a --teon-k that cannot give the TEON run it names, before anything is spawned:
more than the layers per pipeline stage (no stack would form), not a divisor of them (`--help` says it
must divide them), below 1, or given to an optimizer that would ignore it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch import options

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "argv,world,message",
    [
        (["--teon-k", "8"], 2, r"--teon-k 8 is more than the 4 layers .*no TEON stack would form"),
        (["--teon-k", "3"], 2, r"--teon-k 3 does not divide the 4 layers .*fall back to Muon"),
        (["--teon-k", "4", "--pp", "2"], 2, r"--teon-k 4 is more than the 2 layers per pipeline stage"),
        (["--teon-k", "0"], 2, r"--teon-k must be at least 1, got 0"),
        (["--optimizer", "muon", "--teon-k", "2"], 2, r"--optimizer muon would ignore it"),
    ],
)
def test_a_teon_k_that_cannot_stack_is_refused(argv, world, message):
    with pytest.raises(SystemExit, match=message):
        options.check(argv + ["--runs-dir", "/nonexistent-runs"], world)


def test_the_check_that_scripts_pretrain_sh_runs_prints_the_refusal():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "launch.options", "--world", "2", "--teon-k", "3"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "ok:" not in proc.stdout
    assert "--teon-k 3 does not divide the 4 layers" in proc.stderr and len(proc.stderr.splitlines()) == 1
    for k in ("1", "2", "4"):  # the divisors still pass
        assert options.check(["--teon-k", k, "--runs-dir", "/nonexistent-runs"], 2).teon_k == int(k)
