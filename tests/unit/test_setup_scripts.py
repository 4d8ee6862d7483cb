"""scripts/pretrain.sh and scripts/test.sh on a fresh clone: each does all the setup, through the one
scripts/setup_env.sh, and installs only the extras its job needs.

The Python they would install into is a recorder (a shell script standing in for `python3` and for the
venv's `python`): it writes each command line to a log and succeeds, so the tests see exactly which pip
installs the scripts ask for, in which order, without a network or minutes of installing.
"""

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECORDER = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$RECORD_LOG"
if [[ "$1 $2" == "-m venv" ]]; then
  mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && cp "$0" "$3/bin/torchrun"
fi
[[ "$*" == "-" ]] && cat > /dev/null   # the torch version check read from stdin
exit 0
"""
MAIN_EXTRAS = ".[deepspeed,launch,megatron]"  # sorted, as setup_env.sh writes them
TEST_EXTRAS = ".[deepspeed,dev,launch,megatron]"  # after the main job's: the union


def run(script: str, tmp_path: Path, *args: str) -> list:
    python3 = tmp_path / "python3"
    python3.write_text(RECORDER)
    python3.chmod(0o755)
    log = tmp_path / "record.log"
    log.write_text("")
    env = dict(
        os.environ, PYTHON=str(python3), TEONSPEED_VENV=str(tmp_path / "venv"), RECORD_LOG=str(log), NPROC="2"
    )
    proc = subprocess.run(
        ["bash", script, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return log.read_text().splitlines()


def pip_installs(calls: list) -> list:
    return [c.split("--disable-pip-version-check ")[1] for c in calls if " -m pip install " in c]


def test_a_fresh_clone_runs_the_main_job_with_the_main_jobs_packages_only(tmp_path):
    calls = run("scripts/pretrain.sh", tmp_path, "--steps", "5")
    assert calls[0].startswith("python3 -m venv ")  # the venv is made
    assert pip_installs(calls) == ["torch==2.13.0", f"-e {MAIN_EXTRAS}"]  # torch first, pinned
    assert not any("dev" in c or "triton" in c or "transformers" in c for c in pip_installs(calls))
    assert calls[-1] == (
        "python -m launch.torchrun --standalone --nproc_per_node=2 -m launch.pretrain --steps 5"
    )
    again = run("scripts/pretrain.sh", tmp_path, "--steps", "5")
    assert pip_installs(again) == [] and not any("venv" in c for c in again)  # the stamp: nothing to install


def test_the_tests_add_their_extras_and_the_main_job_then_installs_nothing(tmp_path):
    run("scripts/pretrain.sh", tmp_path)
    calls = run("scripts/test.sh", tmp_path, "-k", "teon")
    assert pip_installs(calls) == ["torch==2.13.0", f"-e {TEST_EXTRAS}"]
    assert calls[-1] == "python -m pytest -q -k teon"
    assert pip_installs(run("scripts/pretrain.sh", tmp_path)) == []


def test_the_tests_on_a_fresh_clone_do_all_the_setup(tmp_path):
    calls = run("scripts/test.sh", tmp_path)
    assert calls[0].startswith("python3 -m venv ")
    assert pip_installs(calls) == ["torch==2.13.0", "-e .[dev,launch]"]
    assert pip_installs(run("scripts/test.sh", tmp_path)) == []
