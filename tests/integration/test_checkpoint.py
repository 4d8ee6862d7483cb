"""launch/checkpoint.py: a checkpoint is verified before it is resumed from, durable before it is marked
complete, never half-written after a failed save, loaded without running pickled code, and refused when the
run's options differ. The engine is a stand-in that writes one torch file per rank (as both backends do)."""
import importlib.util
import os
import random
import errno
from pathlib import Path

import pytest
import torch

from teonspeed.testing.harness import run_ranks

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("launch_checkpoint_under_test", REPO / "launch" / "checkpoint.py")
checkpoint = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(checkpoint)

LAYOUT = {"backend": "fake", "world": 1, "tp": 1}
CONFIG = {"model": {"hidden": 64, "layers": 4}, "optimizer": {"optimizer": "teon", "lr": 0.02, "teon_k": 2}}


class FakeEngine:
    """Writes and reads one file per rank through torch.save/torch.load, like the real backends."""

    def __init__(self, value: float = 1.0, fail: bool = False):
        self.weights = torch.full((256,), value)
        self.fail = fail
        self.loaded = False

    def _file(self, root, tag):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return Path(root) / tag / f"engine_rank{rank}.pt"

    def save(self, root, tag, state):
        if self.fail:
            raise OSError(errno.ENOSPC, "No space left on device", str(self._file(root, tag)))
        torch.save({"weights": self.weights, "state": dict(state)}, self._file(root, tag))

    def load(self, root, tag):
        self.weights = torch.load(self._file(root, tag), weights_only=True)["weights"]
        self.loaded = True


def _save(root, step, engine=None, **kw):
    return checkpoint.save(root, step, engine or FakeEngine(step), {"step": step, "micro_batches": step}, None,
                           LAYOUT, config=CONFIG, **kw)


def test_manifest_lists_every_file_and_the_checkpoint_verifies(tmp_path):
    path = _save(tmp_path, 1)
    marker = checkpoint.read_marker(path)
    on_disk = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != "COMPLETE")
    assert sorted(marker["files"]) == on_disk
    assert marker["teonspeed_version"] and marker["config"] == CONFIG
    assert checkpoint.verify(path) == []


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "delete"])
def test_damaged_latest_checkpoint_falls_back_to_the_newest_that_verifies(tmp_path, damage):
    older, newest = _save(tmp_path, 1), _save(tmp_path, 2)
    victim = newest / "engine_rank0.pt"
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "flip_byte":
        victim.write_bytes(data[:100] + bytes([data[100] ^ 0x01]) + data[101:])
    else:
        victim.unlink()
    said = []
    assert checkpoint.select_for_resume(tmp_path, strict=False, log=said.append) == older
    assert len(said) == 1 and str(victim) in said[0]
    with pytest.raises(checkpoint.CheckpointError, match="engine_rank0.pt"):
        checkpoint.select_for_resume(tmp_path, strict=True, log=said.append)


def test_no_verifying_checkpoint_means_no_resume(tmp_path):
    only = _save(tmp_path, 1)
    (only / "rng_rank0.pt").write_bytes(b"")
    assert checkpoint.select_for_resume(tmp_path, log=lambda s: None) is None


def test_every_file_and_directory_is_fsynced_before_the_marker(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    path = _save(tmp_path, 3)
    # Paths were recorded while the directory still had its temporary name.
    tmp_name = str(path.parent / (checkpoint.TMP_PREFIX + path.name))
    synced = {s.replace(tmp_name, str(path)) for s in synced}
    files = {str(p) for p in path.rglob("*") if p.is_file()}
    assert files <= synced, sorted(files - synced)
    assert str(path) in synced and str(tmp_path) in synced  # the directory entries too


def test_keep_last_keeps_the_checkpoint_just_written(tmp_path):
    _save(tmp_path, 1)
    (tmp_path / "step_00000001" / "engine_rank0.pt").write_bytes(b"junk")
    _save(tmp_path, 2)
    newest = _save(tmp_path, 3, keep_last=1)
    assert checkpoint.complete_checkpoints(tmp_path) == [newest]
    assert checkpoint.verify(newest) == []


def test_rng_state_round_trips_through_a_safe_load(tmp_path):
    random.seed(7)
    torch.manual_seed(7)
    path = _save(tmp_path, 1)
    expect = (random.random(), torch.rand(3))
    random.seed(99)
    torch.manual_seed(99)
    engine = FakeEngine(0.0)
    checkpoint.load(path, engine, LAYOUT, CONFIG)
    assert engine.loaded and torch.equal(engine.weights, torch.full((256,), 1.0))
    assert (random.random(), *torch.rand(3).tolist()) == (expect[0], *expect[1].tolist())


class _RunsCode:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    path = _save(tmp_path, 1)
    evidence = tmp_path / "code_ran"
    torch.save({"torch": torch.get_rng_state(), "python": _RunsCode(evidence)}, path / "rng_rank0.pt")
    engine = FakeEngine(0.0)
    with pytest.raises(checkpoint.CheckpointError, match="cannot be loaded safely"):
        checkpoint.load(path, engine, LAYOUT, CONFIG)
    assert not evidence.exists()
    assert not engine.loaded  # refused before the engine's state changed


@pytest.mark.parametrize("change,expect", [
    (("optimizer", "lr", 0.03), "optimizer.lr=0.02 (now 0.03)"),
    (("model", "hidden", 128), "model.hidden=64 (now 128)"),
])
def test_changed_options_are_named_before_any_state_changes(tmp_path, change, expect):
    path = _save(tmp_path, 1)
    section, key, value = change
    now = {s: dict(v) for s, v in CONFIG.items()}
    now[section][key] = value
    engine = FakeEngine(0.0)
    state = random.getstate()
    with pytest.raises(checkpoint.CheckpointError, match=expect.replace("(", r"\(").replace(")", r"\)")):
        checkpoint.load(path, engine, LAYOUT, now)
    assert not engine.loaded and random.getstate() == state


def _save_with_one_rank_out_of_space(rank, world, root):
    root = Path(root)
    layout = dict(LAYOUT, world=world)
    checkpoint.save(root, 1, FakeEngine(1.0), {"step": 1}, None, layout, config=CONFIG)
    try:
        checkpoint.save(root, 2, FakeEngine(2.0, fail=(rank == 1)), {"step": 2}, None, layout, config=CONFIG)
    except checkpoint.CheckpointError as err:
        error = str(err)
    else:
        error = None
    return error, [p.name for p in sorted(root.iterdir())], checkpoint.verify(root / "step_00000001"), \
        checkpoint.read_marker(root / "step_00000001")["files"]


def test_a_full_disk_on_one_rank_fails_the_save_on_every_rank_and_keeps_earlier_ones(tmp_path):
    results = run_ranks(_save_with_one_rank_out_of_space, 2, str(tmp_path), timeout=60)
    for error, names, problems, files in results:
        assert error is not None and "rank 1" in error and "ENOSPC" in error and "earlier checkpoints are intact" in error
        assert names == ["step_00000001"]  # no half directory that --resume could pick
        assert problems == []
        assert files["engine_rank1.pt"]["rank"] == 1 and files["engine_rank0.pt"]["rank"] == 0
