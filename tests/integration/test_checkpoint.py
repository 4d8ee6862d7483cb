"""launch/checkpoint.py's guarantees, on real files: a damaged checkpoint is detected and skipped (truncated,
a flipped byte), --keep-last keeps a checkpoint that verifies, every file is fsynced before the marker, a
full disk on one of 2 ranks ends the save on both with one message and leaves the earlier checkpoint as
the one --resume picks, a planted pickle cannot run code, and a resume with other optimizer options or
model shapes is refused naming them before any state changes.

The engine is a small stand-in with the interface of launch/engines.py (save/load/model/basic_optimizer)
writing one torch.save file per rank; the real backends go through tests/integration/test_pretrain.py."""

import errno
import json
import os
from pathlib import Path

import pytest
import torch

from support.harness import run_ranks

torch.set_num_threads(1)  # before any tensor op: run_ranks forks this process
from launch import checkpoint, engines  # noqa: E402

LAYOUT = dict(backend="toy", world=1, tp=1, pp=1, ep=1, zero_stage=None)


class ToyEngine:
    def __init__(self, out=3, momentum=0.9, fail_save=None, teon_lr=None):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(4, out)
        if teon_lr is not None:
            from teonspeed import TEON

            # a Linear has no transformer blocks: TEON's per-layer fallback, said explicitly
            self.basic_optimizer = TEON(
                self.model.named_parameters(), lr=teon_lr, teon_per_layer_fallback=True
            )
        else:
            self.basic_optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=momentum)
        self.fail_save = fail_save

    def _file(self, root, tag):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return Path(root) / tag / f"engine_rank{rank}.pt"

    def save(self, root, tag, state):
        if self.fail_save is not None:
            self.fail_save()
        torch.save(
            {
                "model": self.model.state_dict(),
                "optimizer": self.basic_optimizer.state_dict(),
                "state": dict(state),
            },
            self._file(root, tag),
        )

    def load(self, root, tag):
        ckpt = checkpoint.safe_load(self._file(root, tag))
        self.model.load_state_dict(ckpt["model"])
        self.basic_optimizer.load_state_dict(ckpt["optimizer"])


def _save(root, engine, step, layout=LAYOUT, keep_last=0):
    with torch.no_grad():
        engine.model.weight.fill_(float(step))
    return checkpoint.save(root, step, engine, {"step": step, "micro_batches": step}, None, layout, keep_last)


def _damage(file: Path, how: str):
    data = bytearray(file.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "flipped byte"])
def test_damaged_latest_is_named_and_skipped(how, tmp_path):
    engine = ToyEngine()
    _save(tmp_path, engine, 2)
    _save(tmp_path, engine, 4)
    bad = tmp_path / "step_00000004" / "engine_rank0.pt"
    _damage(bad, how)
    assert checkpoint.latest_checkpoint(tmp_path).name == "step_00000004"  # the marker alone says "complete"
    logged = []
    picked = checkpoint.resume_point(tmp_path, log=logged.append)
    assert picked.name == "step_00000002"
    assert any(str(bad) in line for line in logged), logged
    with pytest.raises(checkpoint.CheckpointError, match="engine_rank0.pt"):
        checkpoint.resume_point(tmp_path, strict=True, log=logged.append)
    state = checkpoint.load(picked, ToyEngine(), LAYOUT)
    assert state["step"] == 2
    (tmp_path / "step_00000002" / "rng_rank0.pt").write_bytes(b"")
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint .* verifies"):
        checkpoint.resume_point(tmp_path, log=logged.append)


def test_keep_last_keeps_the_checkpoint_that_verifies(tmp_path):
    engine = ToyEngine()
    _save(tmp_path, engine, 2)
    _save(tmp_path, engine, 4)
    _damage(tmp_path / "step_00000004" / "engine_rank0.pt", "flipped byte")
    resumed = checkpoint.resume_point(tmp_path, log=lambda _: None)
    assert resumed.name == "step_00000002"
    checkpoint.load(resumed, engine, LAYOUT)
    _save(tmp_path, engine, 3, keep_last=1)  # the resumed run saves again; step 4 is still the damaged one
    assert (tmp_path / "step_00000003").is_dir() and not (tmp_path / "step_00000002").exists()
    assert checkpoint.resume_point(tmp_path, log=lambda _: None).name == "step_00000003"


def test_every_file_and_directory_is_fsynced_before_the_marker(tmp_path, monkeypatch):
    synced, real_fsync = [], os.fsync

    def recording(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    final = _save(tmp_path, ToyEngine(), 1)
    tmp = str(tmp_path / ".tmp-step_00000001")
    names = sorted(p.name for p in final.iterdir())
    assert {"engine_rank0.pt", "rng_rank0.pt", "state.json", "COMPLETE"} <= set(names)
    for name in names:
        assert os.path.join(tmp, name) in synced, (name, synced)
    data_files = [s for s in synced if not s.endswith("COMPLETE") and s.startswith(tmp + "/")]
    assert synced.index(os.path.join(tmp, "COMPLETE")) > max(synced.index(s) for s in data_files)
    assert tmp in synced and str(tmp_path) in synced  # the directory before the rename, the parent after


def _enospc():
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _save_with_a_full_disk(rank, world, root, where):
    layout = dict(LAYOUT, world=world)
    engine = ToyEngine()
    _save(root, engine, 1, layout)
    if where == "engine file on rank 1" and rank == 1:
        engine.fail_save = _enospc
    if where == "marker on rank 0" and rank == 0:
        write = checkpoint._write_synced
        checkpoint._write_synced = lambda path, text: (
            _enospc() if path.name == "COMPLETE" else write(path, text)
        )
    try:
        _save(root, engine, 2, layout)
    except checkpoint.CheckpointError as e:
        message = str(e)
    else:
        message = None
    return message, checkpoint.resume_point(root, log=lambda _: None).name


@pytest.mark.parametrize("where", ["engine file on rank 1", "marker on rank 0"])
def test_full_disk_on_one_rank_fails_the_save_on_every_rank(where, tmp_path):
    results = run_ranks(_save_with_a_full_disk, 2, tmp_path, where, timeout=30)
    for message, resumable in results:
        assert message is not None and f"rank {where[-1]}" in message and "No space left" in message, message
        assert resumable == "step_00000001"
    assert results[0][0] == results[1][0]  # one message, the same on every rank
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]  # no half directory left
    assert checkpoint.verify(tmp_path / "step_00000001") is None


class Planted:
    """A pickle that runs code when loaded: here it only creates a directory."""

    def __init__(self, flag):
        self.flag = flag

    def __reduce__(self):
        return os.makedirs, (str(self.flag),)


def test_a_planted_pickle_does_not_run(tmp_path):
    final = _save(tmp_path, ToyEngine(), 1)
    flag = tmp_path / "code_ran"
    torch.save(Planted(flag), final / "rng_rank0.pt")
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        checkpoint.load(final, ToyEngine(), LAYOUT)
    assert not flag.exists()

    class Megatron:  # MegatronBackend.load reads this rank's file before touching any state
        def _file(self, root, tag):
            return Path(root) / tag / "rng_rank0.pt"

    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        engines.MegatronBackend.load(Megatron(), tmp_path, final.name)
    assert not flag.exists()


@pytest.mark.parametrize(
    "saved,changed,expected",
    [
        ({}, dict(momentum=0.5), r"momentum=0\.9 \(now 0\.5\)"),
        ({}, dict(out=5), r"weight: \[3, 4\] \(now \[5, 4\]\)"),
        (dict(teon_lr=0.02), dict(teon_lr=0.03), r"lr=0\.02 \(now 0\.03\)"),
    ],
)
def test_a_different_run_is_refused_before_any_state_changes(saved, changed, expected, tmp_path):
    final = _save(tmp_path, ToyEngine(**saved), 7)
    engine = ToyEngine(**changed)
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    rng = torch.get_rng_state()
    with pytest.raises(checkpoint.CheckpointError, match=expected):
        checkpoint.load(final, engine, LAYOUT)
    assert all(torch.equal(before[k], v) for k, v in engine.model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())
    marker = json.loads((final / "COMPLETE").read_text())
    import teonspeed

    assert marker["versions"]["teonspeed"] == teonspeed.__version__
    assert marker["optimizer"]["type"] == ("TEON" if saved else "SGD")


def _deepspeed_zero1(rank, world, root):
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 1},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    }
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    backend = object.__new__(engines.DeepSpeedBackend)  # the backend's save/load on a plain DeepSpeed engine
    backend.engine, backend.optimizer, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=config
    )
    backend.model, layout = model, dict(LAYOUT, world=world)
    final = checkpoint.save(root, 1, backend, {"step": 1}, None, layout)

    # A full disk on rank 1 while DeepSpeed writes its ZeRO partition (its save_checkpoint ends in a barrier).
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if rank == 1 and "optim_states" in str(f):
            _enospc()
        return real_save(obj, f, *args, **kwargs)

    torch.save = full_disk
    try:
        checkpoint.save(root, 2, backend, {"step": 2}, None, layout)
        failed = None
    except checkpoint.CheckpointError as e:
        failed = str(e)
    finally:
        torch.save = real_save
    picked = checkpoint.resume_point(root, log=lambda _: None)
    assert checkpoint.load(picked, backend, layout)["step"] == 1  # DeepSpeed's ZeRO files pass weights_only

    torch.distributed.barrier()
    if rank == 0:
        torch.save(Planted(root / "code_ran"), next(final.glob("zero_pp_rank_0_*optim_states.pt")))
    torch.distributed.barrier()
    try:
        backend.load(root, final.name)
        refused = None
    except Exception as e:  # noqa: BLE001
        refused = f"{type(e).__name__}: {e}"
    return failed, picked.name, refused


def test_deepspeed_full_disk_on_one_rank_and_planted_pickle(tmp_path):
    from teonspeed.patches import cpu_shims

    cpu_shims.apply()
    import deepspeed  # noqa: F401  (in the parent: the forked ranks must not import it)

    results = run_ranks(_deepspeed_zero1, 2, tmp_path, timeout=60)
    for failed, picked, refused in results:
        assert failed is not None and "rank 1" in failed and "No space left" in failed, failed
        assert picked == "step_00000001"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        "step_00000001"
    ]  # (+ DeepSpeed's scripts)
    refused = results[0][2]  # rank 0 reads the planted partition
    assert refused is not None and "Weights only load failed" in refused, refused
    assert not (tmp_path / "code_ran").exists()
