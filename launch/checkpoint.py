"""Checkpoints of launch/pretrain.py: verified, durable, atomic directories under runs/<name>/checkpoints/.

A save (collective; every rank calls save()):
  1. every rank writes its files into `.tmp-step_00000010/` (the engine's files, `rng_rank<r>.pt`; rank 0
     also `state.json` and `metrics.csv`), recording which files it wrote itself;
  2. every rank fsyncs its own files (rank 0 also any file no rank claims, e.g. DeepSpeed's copied
     zero_to_fp32.py) and writes `manifest_rank<r>.json`: size and CRC-32 of each, and the shapes of its
     part of the model;
  3. the ranks agree (one all_gather): if any rank failed (a full disk, a failing write), rank 0 removes
     the temporary directory and every rank raises CheckpointError naming the rank and the error; earlier
     checkpoints are untouched;
  4. rank 0 writes the marker `COMPLETE` (step, layout, package versions, optimizer options, the CRC of
     each manifest), fsyncs it and the directory, renames the directory to `step_00000010/` and fsyncs
     the parent; `--keep-last K` then removes older checkpoints, never the one just written.
A directory is a checkpoint only with that name and that marker, so a run killed halfway through a save
leaves a `.tmp-*` directory that is ignored (and removed by the next save).

Resume: resume_point() verifies the newest checkpoint (each rank re-reads a share of the files against the
manifests) and falls back to the newest one that verifies, saying which file is wrong (or stops, strict).
load() refuses a checkpoint whose layout, optimizer options or model shapes differ from the run's, naming
them, before any state changes, and unpickles our own files with weights_only=True.

What each backend puts in the directory is the engine's business (launch/engines.py): DeepSpeed's
engine.save_checkpoint files, or one torch.save file per rank for the Megatron backend.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist

MARKER = "COMPLETE"
PATTERN = re.compile(r"^step_(\d{8})$")
TMP_PREFIX = ".tmp-"
MANIFEST = "manifest_rank{}.json"
CHUNK = 1 << 24


class CheckpointError(SystemExit):
    """A save or resume that cannot go on; the message says why (raised on every rank alike)."""


def tag(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: Path) -> List[Path]:
    """Complete checkpoint directories under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if p.is_dir() and (m := PATTERN.match(p.name)) and (p / MARKER).is_file()
    ]
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
    random.setstate(tuple(state["python"]))


def safe_load(path: Path, map_location: Any = "cpu", allow: Sequence[type] = ()) -> Any:
    """torch.load that builds only tensors, plain containers and the `allow`ed classes: a checkpoint on
    shared storage is input from outside the job, and a full unpickle runs whatever code a file names."""
    with torch.serialization.safe_globals(list(allow)):
        return torch.load(path, map_location=map_location, weights_only=True)


# ---------------------------------------------------------------------------------------------------
# ranks
# ---------------------------------------------------------------------------------------------------
def _rank_world() -> tuple:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(obj: Any) -> List[Any]:
    """Every rank's `obj`; the agreement point of a save or a resume."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _from_rank0(obj: Any) -> Any:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------------
def file_entry(path: Path, sync: bool = False) -> Dict[str, int]:
    """Size and CRC-32 of a file (zlib's, ~1 GB/s: catches truncation and flipped bytes, not forgery)."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        if sync:
            os.fsync(f.fileno())
        while block := f.read(CHUNK):
            crc, size = zlib.crc32(block, crc), size + len(block)
    return {"size": size, "crc32": crc}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def _recording_saves(into: List[Path]) -> Iterator[None]:
    """Record the paths this process passes to torch.save (DeepSpeed's checkpoint engine and ours call it),
    so that each rank fsyncs and lists the files it wrote itself. A failing write (a full disk) is held back
    until the block ends: DeepSpeed's save_checkpoint ends with a barrier, and a rank raising out of it early
    would leave the others waiting there instead of at the agreement that reports the failure."""
    original, failures = torch.save, []

    def recording(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            into.append(Path(f))
        try:
            return original(obj, f, *args, **kwargs)
        except OSError as e:
            failures.append(e)

    torch.save = recording
    try:
        yield
    finally:
        torch.save = original
    if failures:
        raise failures[0]


def _all_files(directory: Path) -> List[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------------
# what the run is: compared on resume
# ---------------------------------------------------------------------------------------------------
def _plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


# How a step is executed, not what it computes: may change between a save and a resume.
EXECUTION_OPTIONS = {"ns_backend", "parallel_mode", "overlap_waves"}


def optimizer_options(engine) -> Dict[str, Any]:
    """The optimizer's class and constructor options: teonspeed's OptimizerConfig, else torch's `defaults`
    (the scheduler moves only the param groups' lr)."""
    opt = engine.basic_optimizer
    config = getattr(opt, "config", None)
    raw = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else getattr(opt, "defaults", {})
    options = {k: v for k, v in sorted(raw.items()) if _plain(v) and k not in EXECUTION_OPTIONS}
    return json.loads(json.dumps({"type": type(opt).__name__, **options}))


def model_shapes(engine) -> Dict[str, List[int]]:
    """This rank's part of the model: parameter name -> shape (under ZeRO-3 the parameter's, not the
    empty placeholder a partitioned parameter holds between gathers)."""
    return {name: list(getattr(p, "ds_shape", p.shape)) for name, p in engine.model.named_parameters()}


def _versions() -> Dict[str, str]:
    from importlib import metadata

    out = {}
    for dist_name in ("teonspeed", "torch", "deepspeed", "megatron-core"):
        try:
            out[dist_name] = metadata.version(dist_name)
        except metadata.PackageNotFoundError:
            pass
    return out


# ---------------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------------
def _write_rank_files(
    tmp: Path, engine, state: Dict[str, Any], metrics_csv: Optional[Path], rank: int
) -> List[str]:
    written: List[Path] = []
    with _recording_saves(written):
        engine.save(tmp.parent, tmp.name, state)
        torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        _write_synced(tmp / "state.json", json.dumps(state, indent=1))
        written.append(tmp / "state.json")
        if metrics_csv is not None and metrics_csv.exists():
            shutil.copyfile(metrics_csv, tmp / "metrics.csv")
            written.append(tmp / "metrics.csv")
    inside = tmp.resolve()
    return sorted(
        {
            str(p.relative_to(inside))
            for p in map(lambda q: Path(q).resolve(), written)
            if p.is_relative_to(inside)
        }
    )


def _write_manifest(tmp: Path, files: List[str], engine, rank: int) -> int:
    entries = {name: file_entry(tmp / name, sync=True) for name in files}
    text = json.dumps(
        {
            "rank": rank,
            "files": entries,
            "optimizer": optimizer_options(engine),
            "model": model_shapes(engine),
        },
        indent=1,
    )
    _write_synced(tmp / MANIFEST.format(rank), text)
    return zlib.crc32(text.encode())


def _failure(results: List[Any], what: str) -> Optional[str]:
    bad = [f"rank {r}: {res[1]}" for r, res in enumerate(results) if res[0] == "error"]
    return f"{what} failed on {len(bad)} rank(s): " + "; ".join(bad) if bad else None


def _attempt(fn: Callable[[], Any]) -> tuple:
    try:
        return ("ok", fn())
    except Exception as e:  # noqa: BLE001 - reported to every rank by the agreement that follows
        return ("error", f"{type(e).__name__}: {e}")


def save(
    root: Path,
    step: int,
    engine,
    state: Dict[str, Any],
    metrics_csv: Optional[Path],
    layout: Dict[str, Any],
    keep_last: int = 0,
) -> Path:
    """Collective: every rank calls it. Returns the final directory; raises CheckpointError on every rank
    if any rank failed, leaving the earlier checkpoints as they were and no directory --resume could pick."""
    rank, _ = _rank_world()
    name = tag(step)
    tmp, final = root / (TMP_PREFIX + name), root / name

    def prepare():
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(TMP_PREFIX + "*"):  # a save that was interrupted, or this one's leftovers
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()

    def abort(message: str):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"checkpoint {final}: {message}. The earlier checkpoints are intact; free space / "
            f"fix the file system, then continue with --resume"
        )

    made = _from_rank0(_attempt(prepare) if rank == 0 else None)
    if made[0] == "error":
        abort(f"creating {tmp} failed: {made[1]}")
    # Phase 1: every rank's files (a failing torch.save is raised after the engine's own collectives).
    written = _gather(_attempt(lambda: _write_rank_files(tmp, engine, state, metrics_csv, rank)))
    if (problem := _failure(written, "writing the files")) is not None:
        abort(problem)
    mine = written[rank][1]
    if rank == 0:  # files no rank recorded (DeepSpeed's copied scripts): rank 0 answers for them
        claimed = {f for _, files in written for f in files}
        mine = mine + [f for f in _all_files(tmp) if f not in claimed and not f.startswith("manifest_rank")]
    # Phase 2: fsync + manifest, then agree.
    manifests = _gather(_attempt(lambda: _write_manifest(tmp, mine, engine, rank)))
    if (problem := _failure(manifests, "syncing the files / writing the manifests")) is not None:
        abort(problem)

    def commit():
        marker = dict(
            step=step,
            **layout,
            versions=_versions(),
            optimizer=optimizer_options(engine),
            manifests={MANIFEST.format(r): crc for r, (_, crc) in enumerate(manifests)},
        )
        _write_synced(tmp / MARKER, json.dumps(marker, indent=1))
        _fsync_dir(tmp)
        if final.exists():  # saved again at the same step (e.g. after a resume): replace it
            old = root / (TMP_PREFIX + "old-" + name)
            os.rename(final, old)
            try:
                os.rename(tmp, final)
            except OSError:
                os.rename(old, final)  # keep the checkpoint that was there
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
        if keep_last > 0:
            prune(root, final, keep_last)

    done = _from_rank0(_attempt(commit) if rank == 0 else None)
    if done[0] == "error":
        abort(f"rank 0: writing the marker / renaming failed: {done[1]}")
    return final


def prune(root: Path, kept: Path, keep_last: int) -> List[Path]:
    """--keep-last: remove complete checkpoints older than `kept` (the one just written, verified by its save)
    beyond the keep_last newest. Never `kept`; never a newer one (left by a run that resumed from an older
    checkpoint because that newer one failed verification: resume skips it again, a save at its step
    replaces it)."""
    step = int(PATTERN.match(kept.name).group(1))
    older = [p for p in complete_checkpoints(root) if int(PATTERN.match(p.name).group(1)) < step]
    gone = older[: max(len(older) - (keep_last - 1), 0)]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


# ---------------------------------------------------------------------------------------------------
# verify and resume
# ---------------------------------------------------------------------------------------------------
def verify(path: Path, share: int = 0, shares: int = 1) -> Optional[str]:
    """None if the checkpoint matches its manifests, else what is wrong (the first file found). Checks the
    marker and the manifests, and the data files of manifests share, share+shares, ... (a rank's part)."""
    try:
        marker = read_marker(path)
    except (OSError, ValueError) as e:
        return f"{path / MARKER} is unreadable ({e})"
    listed = marker.get("manifests")
    if not listed:
        return f"{path} has no manifest (written by an older teonspeed): it cannot be verified"
    for i, (name, crc) in enumerate(sorted(listed.items(), key=lambda kv: int(re.sub(r"\D", "", kv[0])))):
        try:
            text = (path / name).read_text()
        except OSError as e:
            return f"{path / name} is missing or unreadable ({e})"
        if zlib.crc32(text.encode()) != crc:
            return f"{path / name} does not match the CRC the marker records"
        if i % shares != share:
            continue
        for file, want in json.loads(text)["files"].items():
            if not (path / file).is_file():
                return f"{path / file} is missing"
            got = file_entry(path / file)
            if got["size"] != want["size"]:
                return (
                    f"{path / file} has {got['size']} bytes, the manifest records {want['size']} (truncated?)"
                )
            if got["crc32"] != want["crc32"]:
                return (
                    f"{path / file} has CRC-32 {got['crc32']:08x}, the manifest records {want['crc32']:08x}"
                )
    return None


def resume_point(root: Path, strict: bool = False, log: Callable[[str], None] = print) -> Optional[Path]:
    """Collective: the newest complete checkpoint that verifies (each rank checks a share of the files; all
    agree), None if there is none at all. Skips a damaged one saying which file is wrong; with strict=True
    raises CheckpointError instead. Raises if checkpoints exist but none verifies."""
    rank, world = _rank_world()
    found = complete_checkpoints(root)
    if not found:
        return None
    problems = []
    for path in reversed(found):
        results = _gather(verify(path, rank, world))
        problem = next((p for p in results if p is not None), None)
        if problem is None:
            if problems:
                log(f"--resume: falling back to {path}, the newest checkpoint that verifies")
            return path
        problems.append(problem)
        if strict:
            raise CheckpointError(
                f"--resume-strict: the latest checkpoint {path} does not verify: {problem}. "
                f"Drop --resume-strict to fall back to the newest checkpoint that verifies"
            )
        log(f"--resume: skipping {path}: {problem}")
    raise CheckpointError(
        f"--resume: no checkpoint in {root} verifies ({'; '.join(problems)}); restore one "
        f"from a copy, or start a new --name"
    )


def _differences(saved: Dict[str, Any], now: Dict[str, Any]) -> List[str]:
    return [
        f"{k}={saved.get(k)!r} (now {now.get(k)!r})"
        for k in sorted(set(saved) | set(now))
        if saved.get(k) != now.get(k)
    ]


def _shape_differences(saved: Dict[str, List[int]], now: Dict[str, List[int]]) -> List[str]:
    out = [f"{k}: {saved[k]} (now {now[k]})" for k in saved if k in now and saved[k] != now[k]]
    out += [f"{k}: only in the checkpoint" for k in saved if k not in now]
    out += [f"{k}: not in the checkpoint" for k in now if k not in saved]
    return out


def load(path: Path, engine, layout: Dict[str, Any], log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Collective: check that the run matches the checkpoint (layout, optimizer options, this rank's model
    shapes; every rank agrees), then restore the engine and this rank's RNG states; return state.json."""
    rank, _ = _rank_world()
    marker = read_marker(path)
    different = _differences({k: marker.get(k) for k in layout}, layout)
    if different:
        raise CheckpointError(
            f"--resume: checkpoint {path} was written with a different layout "
            + ", ".join(different)
            + "; resume with the same --backend/--tp/--pp/--ep/--zero-stage and number of "
            "processes, or start a new --name"
        )
    mismatch = []
    manifest = path / MANIFEST.format(rank)
    saved = json.loads(manifest.read_text()) if manifest.is_file() else {}
    if "optimizer" in saved or "optimizer" in marker:  # this rank's own entry (the marker holds rank 0's)
        if diff := _differences(saved.get("optimizer", marker.get("optimizer")), optimizer_options(engine)):
            mismatch.append("optimizer options " + ", ".join(diff))
    if "model" in saved:
        if diff := _shape_differences(saved["model"], model_shapes(engine)):
            mismatch.append(
                f"model shapes on rank {rank}: "
                + ", ".join(diff[:8])
                + (f" and {len(diff) - 8} more" if len(diff) > 8 else "")
            )
    everyone = _gather(mismatch)
    reported = sorted({m for ms in everyone for m in ms})
    if reported:
        raise CheckpointError(
            f"--resume: checkpoint {path} was written by a different run: "
            + "; ".join(reported)
            + ". Resume with the checkpoint's options and model, or start a new --name"
        )
    if marker.get("versions", {}).get("teonspeed") != _versions()["teonspeed"]:
        log(
            f"--resume: {path} was written by teonspeed {marker.get('versions', {}).get('teonspeed')}, "
            f"this is {_versions()['teonspeed']}"
        )
    state = json.loads((path / "state.json").read_text())
    engine.load(path.parent, path.name)
    set_rng_state(safe_load(path / f"rng_rank{rank}.pt"))
    return state
