"""Start `-m launch.pretrain` (or another torchrun script) on every node of a SLURM allocation.

Run once per node (srun --ntasks-per-node=1, as launch/slurm/pretrain.sbatch does); each copy reads the
SLURM environment, checks the setup with launch/pretrain.py's own validator (launch/options.py) for the
allocation's world size, derives the rendezvous and replaces itself with this node's torchrun:

    srun python -m launch.slurm.launch [--nproc-per-node 8] -- --optimizer teon --tp 2 ...
    python -m launch.slurm.launch --dry-run -- --tp 2        # check, print every node's command, run nothing

    MASTER_ADDR  first host of SLURM_JOB_NODELIST (bracket ranges expanded here: scontrol is not needed)
    MASTER_PORT  --master-port, else 10000 + SLURM_JOB_ID % 20000 (below Linux's ephemeral ports; two
                 jobs sharing a node get different ports), else 29500
    node rank    SLURM_NODEID        nnodes  SLURM_JOB_NUM_NODES / SLURM_NNODES (else the node list's length)
    GPUs / node  --nproc-per-node, else SLURM_GPUS_ON_NODE, else SLURM_GPUS_PER_NODE ("8" or "h100:8"), else 1

Everything after `--` goes to the script unchanged. Without SLURM variables (no SLURM_JOB_NODELIST) there
is no allocation to plan: --dry-run refuses, a real launch runs on this host alone and says so. --hostfile
PATH also writes a DeepSpeed hostfile ("host slots=N" per node, see launch/hostfile.example).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

if __name__ == "__main__" and not __package__:
    # `python launch/slurm/launch.py`: run as the module `launch.slurm.launch`.
    import runpy

    sys.path[0] = str(Path(__file__).resolve().parents[2])
    runpy.run_module("launch.slurm.launch", run_name="__main__", alter_sys=True)
    raise SystemExit(0)

from launch import cli  # noqa: E402
from launch.options import check, summary as run_summary  # noqa: E402  (light: no torch, no megatron)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODULE = "launch.pretrain"
DEFAULT_PORT = 29500


# ---------------------------------------------------------------------------------------------------
# SLURM host lists: "gpu07", "gpu[07-08]", "node[01-03,07],login1", "rack[1-2]-n[01-02]"
# ---------------------------------------------------------------------------------------------------
def _split_top_level(text: str, sep: str = ",") -> List[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in node list {text!r}")
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise ValueError(f"unbalanced '[' in node list {text!r}")
    parts.append("".join(cur))
    return [p for p in (s.strip() for s in parts) if p]


def _expand_range(body: str) -> List[str]:
    """'01-03,07' -> ['01', '02', '03', '07'] (zero padding kept from the range's first bound)."""
    out = []
    for item in body.split(","):
        item = item.strip()
        if re.fullmatch(r"\d+", item):
            out.append(item)
        elif (m := re.fullmatch(r"(\d+)-(\d+)", item)) is not None:
            lo, hi = m.group(1), m.group(2)
            if int(hi) < int(lo):
                raise ValueError(f"descending range {item!r}")
            width = len(lo)
            out += [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
        else:
            raise ValueError(f"bad range {item!r} in [{body}]")
    return out


def expand_nodelist(nodelist: str) -> List[str]:
    """SLURM's compressed host list, expanded in SLURM's order (several bracket groups in one name
    expand as a product, the leftmost varying slowest)."""
    hosts: List[str] = []
    for entry in _split_top_level(nodelist):
        expanded = [""]
        for text, body in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", entry):
            options = _expand_range(body) if body else [""]
            expanded = [e + text + o for e in expanded for o in options]
        hosts += expanded
    return hosts


# ---------------------------------------------------------------------------------------------------
# The layout of the job
# ---------------------------------------------------------------------------------------------------
@dataclass
class Layout:
    hosts: List[str]
    node_rank: int
    nproc_per_node: int
    master_addr: str
    master_port: int
    job_id: Optional[str] = None
    env: Dict[str, str] = field(default_factory=dict)

    @property
    def nnodes(self) -> int:
        return len(self.hosts)

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


def _gpus_from_env(env: Mapping[str, str]) -> Optional[int]:
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        value = env.get(key)
        if value:
            m = re.search(r"(\d+)\s*$", value.split(",")[0])  # "8", "h100:8" (first type if several)
            if m:
                return int(m.group(1))
    return None


def slurm_layout(
    env: Optional[Mapping[str, str]] = None,
    nproc_per_node: Optional[int] = None,
    master_port: Optional[int] = None,
    master_addr: Optional[str] = None,
) -> Layout:
    env = os.environ if env is None else env
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    hosts = expand_nodelist(nodelist) if nodelist else ["localhost"]
    nnodes = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")
    if nnodes is not None and int(nnodes) != len(hosts):
        raise SystemExit(
            f"SLURM_JOB_NUM_NODES={nnodes} but the node list {nodelist!r} has {len(hosts)} hosts"
        )
    node_rank = int(env.get("SLURM_NODEID", "0"))
    if not 0 <= node_rank < len(hosts):
        raise SystemExit(f"SLURM_NODEID={node_rank} outside 0..{len(hosts) - 1}")
    nproc = nproc_per_node or _gpus_from_env(env) or 1
    job_id = env.get("SLURM_JOB_ID")
    if master_port is None:
        master_port = 10000 + int(job_id) % 20000 if job_id and job_id.isdigit() else DEFAULT_PORT
    return Layout(
        hosts=hosts,
        node_rank=node_rank,
        nproc_per_node=nproc,
        master_addr=master_addr or hosts[0],
        master_port=master_port,
        job_id=job_id,
    )


def torchrun_command(
    layout: Layout,
    node_rank: int,
    script_args: Sequence[str] = (),
    script: Optional[str | Path] = None,
    torchrun: Optional[Sequence[str]] = None,
) -> List[str]:
    """One node's command: torchrun with a static rendezvous at MASTER_ADDR:MASTER_PORT, running `script`
    (a path), by default the module launch.pretrain (from the repository root)."""
    target = [str(script)] if script is not None else ["-m", DEFAULT_MODULE]
    return [
        *(torchrun or default_torchrun()),
        f"--nnodes={layout.nnodes}",
        f"--node_rank={node_rank}",
        f"--master_addr={layout.master_addr}",
        f"--master_port={layout.master_port}",
        f"--nproc_per_node={layout.nproc_per_node}",
        *target,
        *script_args,
    ]


def default_torchrun() -> List[str]:
    """The torchrun of the Python running this file (the job's venv), else the one on PATH."""
    beside = Path(sys.executable).with_name("torchrun")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("torchrun")
    return [found] if found else [sys.executable, "-m", "torch.distributed.run"]


def hostfile_text(layout: Layout) -> str:
    return "".join(f"{host} slots={layout.nproc_per_node}\n" for host in layout.hosts)


# ---------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    script_args: List[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, script_args = argv[:cut], argv[cut + 1 :]
    p = cli.parser(prog="python -m launch.slurm.launch", description=__doc__)
    p.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        help="processes (GPUs) per node (default: SLURM_GPUS_ON_NODE, else SLURM_GPUS_PER_NODE, else 1)",
    )
    p.add_argument(
        "--master-port",
        type=int,
        default=None,
        help="rendezvous port (default: 10000 + SLURM_JOB_ID %% 20000, else 29500)",
    )
    p.add_argument("--master-addr", default=None, help="default: the first host of the node list")
    p.add_argument(
        "--script",
        default=None,
        help="a torchrun target script (default: the module launch.pretrain, whose arguments are checked "
        "before anything starts)",
    )
    p.add_argument(
        "--torchrun", default=None, help="torchrun executable (default: the one beside this Python)"
    )
    p.add_argument("--dry-run", action="store_true", help="print every node's command and exit")
    p.add_argument(
        "--hostfile",
        default=None,
        help="also write a DeepSpeed hostfile for this allocation there (default: none)",
    )
    args = p.parse_args(argv)
    return args, script_args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, script_args = parse_args(argv)
    outside = not (os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST"))
    if outside and args.dry_run:
        raise SystemExit(
            "error: --dry-run: no SLURM allocation in the environment (SLURM_JOB_NODELIST is unset); run "
            "it inside `salloc --nodes=N --gpus-per-node=G`, or set SLURM_JOB_NODELIST, "
            "SLURM_JOB_NUM_NODES and SLURM_GPUS_ON_NODE (or --nproc-per-node) to plan one"
        )
    layout = slurm_layout(
        nproc_per_node=args.nproc_per_node, master_port=args.master_port, master_addr=args.master_addr
    )
    if outside:
        print(
            f"[launch] no SLURM variables: running on this host alone, {layout.nproc_per_node} process(es)",
            file=sys.stderr,
        )
    run = check(script_args, layout.world_size) if args.script is None else None  # before anything starts
    if run is not None and run.device == "cpu" and _gpus_from_env(os.environ):
        run.notes.append("warning: the allocation has GPUs but the run is on --device cpu; add --device cuda")
    torchrun = shlex.split(args.torchrun) if args.torchrun else default_torchrun()
    commands = [torchrun_command(layout, r, script_args, args.script, torchrun) for r in range(layout.nnodes)]
    summary = (
        f"{layout.nnodes} nodes x {layout.nproc_per_node} processes = world {layout.world_size}; "
        f"master {layout.master_addr}:{layout.master_port}"
        + (f"; job {layout.job_id}" if layout.job_id else "")
    )
    if args.hostfile:
        Path(args.hostfile).write_text(hostfile_text(layout))
    if args.dry_run:
        print(f"# {summary}")
        if run is not None:
            for note in run.notes:
                print(f"# {note}")
            print(f"# run: {run_summary(run)}; run directory {Path(run.runs_dir) / run.name}")
        for rank, (host, cmd) in enumerate(zip(layout.hosts, commands)):
            print(f"# node {rank}: {host}")
            print(shlex.join(cmd))
        return 0
    if run is not None:
        for note in run.notes:
            print(f"[launch] {note}", file=sys.stderr)
    cmd = commands[layout.node_rank]
    print(
        f"[launch node {layout.node_rank} {layout.hosts[layout.node_rank]}] {summary}\n  {shlex.join(cmd)}",
        file=sys.stderr,
        flush=True,
    )
    os.execvp(cmd[0], cmd)  # torchrun replaces this process: srun sees its exit status and signals
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
