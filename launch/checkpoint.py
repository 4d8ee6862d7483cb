"""Checkpoints of launch/pretrain.py: verified, durable, atomic directories under runs/<name>/checkpoints/.

A save (collective: every rank calls `save`):
  1. every rank writes its files into `.tmp-step_00000010/` (the engine's files and `rng_rank<r>.pt`);
     `torch.save` calls are recorded, so each rank knows exactly which files it wrote,
  2. each rank fsyncs its own files (on a shared filesystem only the writer's node can flush them) and
     computes their size and CRC-32,
  3. the ranks agree, in one gather, that every write succeeded; if one failed (a full disk, a quota), every
     rank raises `CheckpointError` with that rank's message, the partial directory is removed and earlier
     checkpoints are untouched,
  4. rank 0 writes the marker `COMPLETE` (JSON: step, layout, teonspeed version, the model/optimizer config and
     the manifest of every file with its size, CRC-32 and writer rank), fsyncs it and the directory, and
     renames the directory to `step_00000010/`.
A directory is a checkpoint only with that name and that marker. `--keep-last K` then removes the oldest
ones, never the one just written (which its own read-back verified).

A resume (`select_for_resume`, collective) verifies the newest checkpoint (each rank the files it wrote, so
the cost is spread like the save's) and, if a file is missing, short or changed, says which and falls back to
the newest checkpoint that verifies (or stops, with `strict`). `load` refuses a checkpoint whose layout,
model or optimizer options differ from this run's, naming each difference, before any state is changed, and
reads our files with `torch.load(weights_only=True)`: a checkpoint on shared storage is input from outside
the job, and a pickle could run code. (DeepSpeed 0.19.8's own engine files are read by DeepSpeed with
`weights_only=False`; the manifest catches their corruption, not a deliberate rewrite.)
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

MARKER = "COMPLETE"
PATTERN = re.compile(r"^step_(\d{8})$")
TMP_PREFIX = ".tmp-"
_CHUNK = 1 << 22


class CheckpointError(SystemExit):
    """A save or resume that cannot go on; the message says why and what to do (one line, no traceback)."""


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


# -- RNG state: plain tensors and tuples of ints, so it loads with weights_only=True ----------------------

def rng_state() -> Dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def safe_load(path: Path) -> Any:
    """torch.load that executes no pickled code: tensors, containers and primitives only."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # UnpicklingError, or a zip error for a damaged file
        raise CheckpointError(f"--resume: {path} cannot be loaded safely ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}); it is damaged or holds objects "
                              f"other than tensors, containers and numbers. Resume from another checkpoint or "
                              f"start a new --name") from None


# -- files: who wrote what, durably ----------------------------------------------------------------------

@contextlib.contextmanager
def recording_writes(directory: Path) -> Iterator[List[Path]]:
    """Record the files that `torch.save` writes under `directory` in this process (the engines, DeepSpeed's
    checkpoint engine included, write through it)."""
    written: List[Path] = []
    original = torch.save
    directory = Path(directory).resolve()

    def save(obj, f, *args, **kwargs):
        result = original(obj, f, *args, **kwargs)
        if isinstance(f, (str, os.PathLike)):
            path = Path(f).resolve()
            if directory in path.parents:
                written.append(path)
        return result

    torch.save = save
    try:
        yield written
    finally:
        torch.save = original


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_digest(path: Path) -> Tuple[int, int]:
    """(size in bytes, CRC-32): fast enough to read every byte of a checkpoint at disk speed."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return size, crc


def _describe(path: Path) -> Dict[str, int]:
    size, crc = file_digest(path)
    return {"size": size, "crc32": crc}


def verify_files(path: Path, manifest: Dict[str, Dict[str, int]], files: List[str]) -> List[str]:
    """Problems of `files` (names in `manifest`) under checkpoint `path`: missing, short, or changed."""
    problems = []
    for name in files:
        want, f = manifest[name], path / name
        if not f.is_file():
            problems.append(f"{f} is missing")
            continue
        size, crc = file_digest(f)
        if size != want["size"]:
            problems.append(f"{f} has {size} bytes, the manifest says {want['size']}")
        elif crc != want["crc32"]:
            problems.append(f"{f} has checksum {crc:08x}, the manifest says {want['crc32']:08x}")
    return problems


# -- collectives that work with or without a process group ------------------------------------------------

def _rank_world() -> Tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(obj: Any) -> List[Any]:
    if not dist.is_initialized():
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# -- save ---------------------------------------------------------------------------------------------------

def save(root: Path, step: int, engine, state: Dict[str, Any], metrics_csv: Optional[Path], layout: Dict[str, Any],
         keep_last: int = 0, config: Optional[Dict[str, Any]] = None) -> Path:
    """Collective: every rank calls it. Returns the final directory; raises CheckpointError on every rank
    if any rank's write failed (the partial directory is removed, earlier checkpoints are intact)."""
    rank, _ = _rank_world()
    name = tag(step)
    tmp, final = root / (TMP_PREFIX + name), root / name
    error = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(TMP_PREFIX + "*"):  # a save that was interrupted, or this one's leftovers
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        except OSError as err:
            error = _failure(rank, err, tmp)
    _barrier()
    mine: Dict[str, Dict[str, int]] = {}
    try:
        if error is None:
            with recording_writes(tmp) as written:
                engine.save(root, tmp.name, state)
                torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
                if rank == 0:
                    _write_text(tmp / "state.json", json.dumps(state, indent=1))
                    written.append((tmp / "state.json").resolve())
                    if metrics_csv is not None and metrics_csv.exists():
                        shutil.copyfile(metrics_csv, tmp / "metrics.csv")
                        written.append((tmp / "metrics.csv").resolve())
            for path in sorted(set(written)):
                fsync_file(path)
                mine[str(path.relative_to(tmp.resolve()))] = _describe(path)
    except Exception as err:  # noqa: BLE001 - torch.save reports a full disk as a RuntimeError
        error = _failure(rank, err, tmp)
    reports = _gather((error, mine))
    failed = [e for e, _ in reports if e is not None]
    if failed:
        _barrier()
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        raise CheckpointError(f"checkpoint at step {step} failed ({'; '.join(failed)}); the partial directory was "
                              f"removed and earlier checkpoints are intact. Free space (or fix the storage) and "
                              f"continue with --resume")
    if rank == 0:
        manifest: Dict[str, Dict[str, Any]] = {}
        for writer, (_, files) in enumerate(reports):
            for rel, entry in files.items():
                manifest[rel] = dict(entry, rank=writer)
        # Files no rank claimed (written by other means inside the engine) are described by rank 0.
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            rel = str(path.relative_to(tmp))
            if rel not in manifest:
                fsync_file(path)
                manifest[rel] = dict(_describe(path), rank=0)
        marker = dict(step=step, **layout, teonspeed_version=_version(), config=config or {}, files=manifest)
        _write_text(tmp / MARKER, json.dumps(marker, indent=1, default=str))
        for d in sorted({p.parent for p in tmp.rglob("*")} | {tmp}, key=lambda p: -len(p.parts)):
            fsync_dir(d)
        if final.exists():  # saved again at the same step (e.g. after a resume): replace it
            old = root / (TMP_PREFIX + "old-" + name)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        fsync_dir(root)
        if keep_last > 0:
            # The newest is the one just written and verified by its own read-back: it is always kept.
            for old in complete_checkpoints(root)[:-keep_last]:
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _failure(rank: int, err: BaseException, where: Path) -> str:
    if isinstance(err, OSError):
        code = errno.errorcode.get(err.errno, err.errno)
        return f"rank {rank}: {err.strerror or err} ({code}) writing {err.filename or where}"
    return f"rank {rank}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _version() -> str:
    try:
        import teonspeed
        return teonspeed.__version__
    except Exception:  # launch/ used without the package installed
        return "unknown"


# -- resume -------------------------------------------------------------------------------------------------

UNVERIFIABLE = "has no manifest (written before checkpoints carried one)"


def verify(path: Path) -> List[str]:
    """Collective: the problems of checkpoint `path`; each rank reads the files it wrote (writers beyond
    this world's size are spread over the ranks), so every rank returns the same full list."""
    rank, world = _rank_world()
    try:
        manifest = read_marker(path).get("files")
        if manifest is None:
            local = [f"{path} {UNVERIFIABLE}"] if rank == 0 else []
        else:
            local = verify_files(path, manifest, [n for n, e in manifest.items() if e.get("rank", 0) % world == rank])
    except (OSError, ValueError) as err:
        local = [f"{path / MARKER} cannot be read ({err})"] if rank == 0 else []
    return sorted(p for problems in _gather(local) for p in problems)


def select_for_resume(root: Path, strict: bool = False, log: Callable[[str], None] = print) -> Optional[Path]:
    """Collective: the newest complete checkpoint that verifies; with `strict`, the newest or an error."""
    for path in reversed(complete_checkpoints(root)):
        problems = verify(path)
        if not problems:
            return path
        if not strict and len(problems) == 1 and problems[0].endswith(UNVERIFIABLE):
            log(f"--resume: {problems[0]}; resuming from it unverified")
            return path
        detail = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
        if strict:
            raise CheckpointError(f"--resume-strict: the latest checkpoint {path} does not verify: {detail}")
        log(f"--resume: skipping {path}: {detail}")
    return None


def load(path: Path, engine, layout: Dict[str, Any], config: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Collective: check the checkpoint fits this run, then restore the engine and this rank's RNG states;
    return state.json (step, data position)."""
    marker = read_marker(path)
    different = {k: (marker.get(k), v) for k, v in layout.items() if marker.get(k) != v}
    if different:
        raise CheckpointError(f"--resume: checkpoint {path} was written with a different layout "
                              + ", ".join(f"{k}={a} (now {b})" for k, (a, b) in different.items())
                              + "; resume with the same --backend/--tp/--pp/--ep/--zero-stage and number of "
                                "processes, or start a new --name")
    changed = config_differences(marker.get("config") or {}, config or {})
    if changed:
        raise CheckpointError(f"--resume: checkpoint {path} (teonspeed {marker.get('teonspeed_version', '?')}) was "
                              f"written with other options: " + ", ".join(changed)
                              + "; resume with the checkpoint's options, or start a new --name")
    state = json.loads((path / "state.json").read_text())
    rank, _ = _rank_world()
    rng = safe_load(path / f"rng_rank{rank}.pt")
    engine.load(path.parent, path.name)
    set_rng_state(rng)
    return state


def config_differences(saved: Dict[str, Any], now: Dict[str, Any], prefix: str = "") -> List[str]:
    """'section.key=saved (now now)' for every key whose value differs (JSON-normalized)."""
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), _jsonable(now.get(key))
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}={a!r} (now {b!r})")
    return out


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
