"""launch/slurm/launch.py: SLURM environment -> one torchrun command per node; and a real run of the
generated single-node command (1 node x 2 processes, gloo, CPU) on a trivial all-reduce script."""

import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
from launch.slurm import launch as slurm  # noqa: E402

SLURM_VARS = [
    "SLURM_JOB_NODELIST",
    "SLURM_NODELIST",
    "SLURM_JOB_NUM_NODES",
    "SLURM_NNODES",
    "SLURM_NODEID",
    "SLURM_GPUS_ON_NODE",
    "SLURM_GPUS_PER_NODE",
    "SLURM_JOB_ID",
]


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("gpu07", ["gpu07"]),
        ("gpu[07-08]", ["gpu07", "gpu08"]),
        ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
        ("node[8-11],login1", ["node8", "node9", "node10", "node11", "login1"]),
        ("a[1-2]-ib[01-02]", ["a1-ib01", "a1-ib02", "a2-ib01", "a2-ib02"]),
        ("x[098-100],y[3]", ["x098", "x099", "x100", "y3"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert slurm.expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["gpu[07-08", "gpu07]", "gpu[08-07]", "gpu[a-b]"])
def test_expand_nodelist_rejects(bad):
    with pytest.raises(ValueError):
        slurm.expand_nodelist(bad)


def fake_slurm(monkeypatch, **values):
    for var in SLURM_VARS:
        monkeypatch.delenv(var, raising=False)
    for key, value in values.items():
        monkeypatch.setenv(key, str(value))


def parse_dry_run(out):
    """(the allocation's summary, the run's lines, [((node rank, host), command)])."""
    lines = out.strip().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("# node "))
    head, body = lines[:first], lines[first:]
    nodes = [
        (re.match(r"# node (\d+): (\S+)", a).groups(), shlex.split(b)) for a, b in zip(body[0::2], body[1::2])
    ]
    return head[0], nodes


def flags(cmd):
    return dict(re.match(r"--(\w+)=(.*)", a).groups() for a in cmd if re.match(r"--\w+=", a))


def test_two_nodes_two_ranks(monkeypatch, capsys, tmp_path):
    fake_slurm(
        monkeypatch,
        SLURM_JOB_NODELIST="gpu[07-08]",
        SLURM_JOB_NUM_NODES=2,
        SLURM_NODEID=1,
        SLURM_GPUS_ON_NODE=2,
        SLURM_JOB_ID=4242,
    )
    layout = slurm.slurm_layout()
    assert (layout.hosts, layout.master_addr, layout.node_rank) == (["gpu07", "gpu08"], "gpu07", 1)
    assert (layout.nnodes, layout.nproc_per_node, layout.world_size, layout.master_port) == (2, 2, 4, 14242)

    hostfile = tmp_path / "hostfile"
    assert (
        slurm.main(
            [
                "--dry-run",
                "--torchrun",
                "torchrun",
                "--hostfile",
                str(hostfile),
                "--",
                "--tp",
                "2",
                "--name",
                "two words",
            ]
        )
        == 0
    )
    summary, nodes = parse_dry_run(capsys.readouterr().out)
    assert "2 nodes x 2 processes = world 4" in summary and "master gpu07:14242" in summary
    assert [n for n, _ in nodes] == [("0", "gpu07"), ("1", "gpu08")]
    for rank, (_, cmd) in enumerate(nodes):
        assert cmd[0] == "torchrun"
        assert flags(cmd) == {
            "nnodes": "2",
            "node_rank": str(rank),
            "master_addr": "gpu07",
            "master_port": "14242",
            "nproc_per_node": "2",
        }
        assert cmd[-6:-4] == ["-m", "launch.pretrain"]
        assert cmd[-4:] == ["--tp", "2", "--name", "two words"]
    assert hostfile.read_text() == "gpu07 slots=2\ngpu08 slots=2\n"


def test_overrides_and_fallbacks(monkeypatch):
    fake_slurm(
        monkeypatch, SLURM_NODELIST="n[1-3]", SLURM_NNODES=3, SLURM_NODEID=2, SLURM_GPUS_PER_NODE="h100:8"
    )
    layout = slurm.slurm_layout()
    assert (layout.master_addr, layout.nproc_per_node, layout.world_size, layout.master_port) == (
        "n1",
        8,
        24,
        29500,
    )
    layout = slurm.slurm_layout(nproc_per_node=4, master_port=12345, master_addr="10.0.0.1")
    assert (layout.master_addr, layout.master_port, layout.world_size) == ("10.0.0.1", 12345, 12)
    fake_slurm(monkeypatch, SLURM_JOB_NODELIST="gpu[07-08]", SLURM_JOB_NUM_NODES=3)
    with pytest.raises(SystemExit, match="has 2 hosts"):
        slurm.slurm_layout()
    fake_slurm(monkeypatch)  # outside SLURM: one local node
    layout = slurm.slurm_layout()
    assert (layout.hosts, layout.node_rank, layout.world_size) == (["localhost"], 0, 1)


def test_sbatch_script():
    text = (REPO / "launch" / "slurm" / "pretrain.sbatch").read_text()
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.M))
    assert (
        directives["ntasks-per-node"] == "1"
        and int(directives["nodes"]) >= 2
        and "gpus-per-node" in directives
    )
    # sbatch stops reading #SBATCH lines at the first command: all of them come before it
    first_command = next(
        i for i, line in enumerate(text.splitlines()) if line.strip() and not line.startswith("#")
    )
    assert all(i < first_command for i, line in enumerate(text.splitlines()) if line.startswith("#SBATCH"))
    assert re.search(r'^srun .*python" -m launch\.slurm\.launch -- "\$@"$', text, re.M)
    subprocess.run(["bash", "-n", str(REPO / "launch" / "slurm" / "pretrain.sbatch")], check=True)


TARGET = """
import os, sys
import torch
import torch.distributed as dist
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
out = sys.argv[sys.argv.index("--out") + 1]
with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
    f.write(" ".join(map(str, [rank, world, os.environ["LOCAL_RANK"], os.environ["MASTER_ADDR"],
                               os.environ["MASTER_PORT"], t.item(), sys.argv[-1]])))
dist.destroy_process_group()
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_single_node_run(tmp_path):
    """The generated command, run for real: 1 node x 2 processes, gloo, all-reduce of rank + 1 = 3."""
    script = tmp_path / "allreduce.py"
    script.write_text(TARGET)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(
        SLURM_JOB_NODELIST="localhost",
        SLURM_JOB_NUM_NODES="1",
        SLURM_NODEID="0",
        SLURM_GPUS_ON_NODE="2",
        SLURM_JOB_ID="77",
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
    )
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch" / "slurm" / "launch.py"),
            "--script",
            str(script),
            "--master-port",
            str(port),
            "--",
            "--out",
            str(tmp_path),
            "last-arg",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "world 2" in proc.stderr and f"--master_port={port}" in proc.stderr
    got = sorted((tmp_path / f"rank{r}.txt").read_text().split() for r in range(2))
    assert got == [[str(r), "2", str(r), "localhost", str(port), "3.0", "last-arg"] for r in range(2)]
    assert time.perf_counter() - t0 < 60
