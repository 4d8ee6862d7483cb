"""The fork-based multi-process harness itself."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from support.harness import RankError, destroy_parallel_state, free_port, run_ranks


def _all_reduce(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return float(t), int(os.environ["RANK"]), dist.get_backend()


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_share_a_gloo_group(world_size):
    results = run_ranks(_all_reduce, world_size, timeout=60)
    total = world_size * (world_size + 1) / 2
    assert results == [(total, r, "gloo") for r in range(world_size)]


def _megatron_tp_all_reduce(rank, world_size):
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=world_size)
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t, group=ps.get_tensor_model_parallel_group())
    return float(t)


def test_ranks_initialise_megatrons_parallel_state():
    assert run_ranks(_megatron_tp_all_reduce, 2, timeout=60) == [3.0, 3.0]


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom on purpose")
    return rank


def test_a_rank_exception_is_raised_in_the_parent_with_its_traceback():
    with pytest.raises(RankError, match="rank 1 raised:(.|\n)*ValueError: boom on purpose"):
        run_ranks(_fail_on_rank_one, 2, timeout=60)


def _hang(rank, world_size):
    time.sleep(60)


def test_a_hung_run_is_killed_at_the_timeout():
    start = time.monotonic()
    with pytest.raises(RankError, match="timed out"):
        run_ranks(_hang, 2, timeout=2)
    assert time.monotonic() - start < 15


def _large_result(rank, world_size):
    return torch.arange(500_000, dtype=torch.float32) * rank


def test_large_results_come_back_whole():
    results = run_ranks(_large_result, 2, timeout=60)
    assert torch.equal(results[1], torch.arange(500_000, dtype=torch.float32))


def test_parent_must_be_single_threaded():
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError, match="set_num_threads"):
            run_ranks(_all_reduce, 2)
    finally:
        torch.set_num_threads(1)


def test_a_parent_with_a_live_process_group_is_refused_in_one_line():
    """A gloo group in the parent runs threads (tcp loop, run loops, TCPStore server); children forked
    from it inherit their state without them and used to hang until the timeout."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        with pytest.raises(
            RuntimeError, match="torch.distributed threads running .*gloo.*destroy_parallel_state"
        ):
            run_ranks(_all_reduce, 2, timeout=20)
    finally:
        destroy_parallel_state()
    assert run_ranks(_all_reduce, 2, timeout=60) == [(3.0, r, "gloo") for r in range(2)]


def test_megatrons_parallel_state_torn_down_in_the_parent_leaves_forked_ranks_working():
    """The unit tests that initialise Megatron in the pytest process, then forked ranks, in one pytest
    run: Megatron's destroy_model_parallel forgets groups whose threads made the ranks hang."""
    root = Path(__file__).resolve().parents[2]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(root / "plugin"), os.environ.get("PYTHONPATH", "")])
    )
    tests = [
        "tests/unit/test_megatron_layout.py",
        "tests/distributed/test_harness.py::test_ranks_initialise_megatrons_parallel_state",
    ]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:warnings", *tests],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
