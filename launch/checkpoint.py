"""Checkpoints of launch/pretrain.py: atomic directories under runs/<name>/checkpoints/.

A checkpoint is written into `.tmp-step_00000010/` by every rank; once all ranks are done, rank 0 writes
the completion marker `COMPLETE` (JSON: step, backend, layout) and renames the directory to
`step_00000010/`. A directory is picked by --resume only if it has that name and that marker, so a
run killed halfway through a save leaves a `.tmp-*` directory that is ignored (and removed by the next
save). `--keep-last K` removes the oldest complete checkpoints after each save.

What each backend puts in the directory is the engine's business (launch/engines.py): DeepSpeed's
engine.save_checkpoint files, or one torch.save file per rank for the Megatron backend. This module adds,
for every rank, `rng_rank<r>.pt` (torch and python `random` states) and, from rank 0, `state.json`
(step, data position) and `metrics.csv` (the rows logged so far).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

MARKER = "COMPLETE"
PATTERN = re.compile(r"^step_(\d{8})$")
TMP_PREFIX = ".tmp-"


def tag(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: Path) -> List[Path]:
    """Complete checkpoint directories under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := PATTERN.match(p.name)) and (p / MARKER).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Optional[Path]:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def read_marker(path: Path) -> Dict[str, Any]:
    return json.loads((path / MARKER).read_text())


def rng_state() -> Dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(root: Path, step: int, engine, state: Dict[str, Any], metrics_csv: Optional[Path], layout: Dict[str, Any],
         keep_last: int = 0) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    name = tag(step)
    tmp, final = root / (TMP_PREFIX + name), root / name
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(TMP_PREFIX + "*"):  # a save that was interrupted, or this one's leftovers
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    engine.save(root, tmp.name, state)
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    _barrier()  # every rank's files are written
    if rank == 0:
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        if metrics_csv is not None and metrics_csv.exists():
            shutil.copyfile(metrics_csv, tmp / "metrics.csv")
        marker = dict(step=step, **layout)
        with open(tmp / MARKER, "w") as f:
            json.dump(marker, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # saved again at the same step (e.g. after a resume): replace it
            old = root / (TMP_PREFIX + "old-" + name)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
        if keep_last > 0:
            for old in complete_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load(path: Path, engine, layout: Dict[str, Any]) -> Dict[str, Any]:
    """Collective: restore the engine, this rank's RNG states; return state.json (step, data position)."""
    marker = read_marker(path)
    different = {k: (marker.get(k), v) for k, v in layout.items() if marker.get(k) != v}
    if different:
        raise SystemExit(f"--resume: checkpoint {path} was written with a different layout "
                         + ", ".join(f"{k}={a} (now {b})" for k, (a, b) in different.items())
                         + "; resume with the same --backend/--tp/--pp/--ep/--zero-stage and number of processes, "
                           "or start a new --name")
    state = json.loads((path / "state.json").read_text())
    engine.load(path.parent, path.name)
    rank = dist.get_rank() if dist.is_initialized() else 0
    set_rng_state(torch.load(path / f"rng_rank{rank}.pt", weights_only=False))
    return state
