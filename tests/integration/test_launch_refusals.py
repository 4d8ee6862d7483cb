"""One line per mistake: a setup the launcher (or teonspeed inside it) refuses is printed once, by rank 0,
message first, with no traceback, under one rank, several ranks, torchrun and the deepspeed launcher."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import teonspeed
from launch import refusal
from launch.configs import ConfigError
from support.harness import free_port

REPO = Path(__file__).resolve().parents[2]
ENV = dict(
    os.environ,
    OMP_NUM_THREADS="1",
    TORCHDYNAMO_DISABLE="1",
    PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "plugin"), os.environ.get("PYTHONPATH", "")]),
)


def teonspeed_refuses():
    teonspeed.TEON(torch.nn.Linear(4, 4), lrr=0.02)  # an unknown option: teonspeed's own ValueError


def a_bug():
    raise ValueError("a bug, not a refusal")


def refuse_config():
    raise ConfigError("--tp 3 does not divide the world size 2")


@pytest.mark.parametrize("rank", ["0", None])
def test_rank_0_or_a_single_process_prints_the_one_line(rank, monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    if rank is not None:
        monkeypatch.setenv("RANK", rank)
    assert refusal.run(teonspeed_refuses, grace_s=0) == refusal.REFUSED
    err = capsys.readouterr().err
    assert err.startswith("error: teonspeed: unknown option(s) 'lrr' (did you mean 'lr'?)")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert refusal.run(refuse_config) == refusal.REFUSED
    assert capsys.readouterr().err == "error: --tp 3 does not divide the world size 2\n"


def test_other_ranks_stay_silent_when_rank_0_refuses_the_same(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    assert refusal.run(refuse_config) == refusal.REFUSED  # the flags: the same on every rank, said by rank 0
    assert capsys.readouterr().err == ""
    # Any other refusal: a rank other than 0 waits for the launcher to end it after rank 0's exit; if rank 0
    # did not refuse (nothing ends this rank), its message is printed, naming the rank, instead of being lost.
    assert refusal.run(teonspeed_refuses, grace_s=0) == refusal.REFUSED
    assert capsys.readouterr().err.rstrip().endswith("(rank 1)")


def test_an_error_that_is_no_refusal_keeps_its_traceback():
    with pytest.raises(ValueError, match="a bug"):
        refusal.run(a_bug)


FAILING_RANKS = """
import os, sys, time
if os.environ["RANK"] == "0":
    print("error: the one line", file=sys.stderr)
    sys.exit(int(sys.argv[1]))
time.sleep(float(sys.argv[2]))  # rank 1: still running when rank 0 exits (torchrun ends it) or exits too
sys.exit(int(sys.argv[1]))
"""


@pytest.mark.parametrize("rank1_s", [0, 30])
def test_torchrun_adds_nothing_to_a_refusal_and_reports_a_crash(tmp_path, rank1_s):
    script = tmp_path / "ranks.py"
    script.write_text(FAILING_RANKS)

    def torchrun(code):
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "launch.torchrun",
                "--nnodes=1",
                "--nproc_per_node=2",
                f"--master_port={free_port()}",
                str(script),
                str(code),
                str(rank1_s),
            ],
            cwd=REPO,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=120,
        )

    refused = torchrun(refusal.REFUSED)
    assert refused.returncode == refusal.REFUSED
    assert refused.stdout + refused.stderr == "error: the one line\n"
    crashed = torchrun(3)  # not a refusal: torchrun's report stays
    assert crashed.returncode != 0
    assert "ChildFailedError" in crashed.stderr and "exitcode: 3" in crashed.stderr


def test_deepspeed_launcher_prints_a_refused_optimizer_option_once(tmp_path):
    """The real launcher on 2 ranks (its --local_rank flag included): teonspeed refuses the JSON's option at
    the optimizer's construction inside deepspeed.initialize, on both ranks; one line, no traceback."""
    config = {
        "train_micro_batch_size_per_gpu": 16,
        "zero_optimization": {"stage": 1},
        "optimizer": {"type": "TEON", "params": {"lrr": 0.02}},
    }
    (tmp_path / "ds.json").write_text(json.dumps(config))
    cmd = [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus=2",
        "--master_port",
        str(free_port()),
        "--module",
        "launch.pretrain",
        "--ds-config",
        str(tmp_path / "ds.json"),
        "--steps",
        "2",
        "--runs-dir",
        str(tmp_path / "runs"),
        "--progress",
        "off",
        "--no-tensorboard",
        "--no-plot",
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env=dict(ENV, PYTHONWARNINGS="ignore"), capture_output=True, text=True, timeout=240
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == refusal.REFUSED, out[-3000:]
    lines = [line for line in out.splitlines() if "unknown option(s) 'lrr'" in line]
    assert len(lines) == 1 and lines[0].startswith("error: teonspeed: unknown option(s) 'lrr'"), out[-3000:]
    assert "Traceback" not in out and "(rank 1)" not in out
