"""The fork-based multi-process harness itself."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from support.harness import RankError, run_ranks


def _all_reduce(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return float(t), int(os.environ["RANK"]), dist.get_backend()


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_share_a_gloo_group(world_size):
    results = run_ranks(_all_reduce, world_size, timeout=60)
    total = world_size * (world_size + 1) / 2
    assert results == [(total, r, "gloo") for r in range(world_size)]


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
