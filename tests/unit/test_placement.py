"""The rule of parallel_mode="auto" (teonspeed.parallel.placement): owner-compute where its FLOP saving
outweighs the bytes and latencies it adds, replicated elsewhere, never predicted slower than either."""

import pytest

from teonspeed.parallel.cost import ClusterProfile, cluster_profile
from teonspeed.parallel.owners import ns_flops
from teonspeed.parallel.placement import GroupCost, Layout, choose_owner_compute, layout_of, predicted_step

H100 = ClusterProfile()


def square(n, count, tp=1):
    """`count` Muon groups of n × n fp32 matrices, TP-split over `tp` ranks."""
    shard = 4 * n * n // tp
    return [GroupCost(ns_flops((n, n), 5), shard, shard if tp > 1 else 0)] * count


def data_parallel(ranks, gpus_per_node=8):
    """A DP-only work group over global ranks 0..ranks-1."""
    return layout_of([(0, d) for d in range(ranks)], list(range(ranks)), gpus_per_node)


def test_layout_counts_the_nodes_a_replica_and_a_column_span():
    positions = [(q % 2, q // 2) for q in range(16)]  # TP2 × DP8, TP ranks adjacent
    assert layout_of(positions, list(range(16)), 8) == Layout(2, 8, tp_nodes=1, column_nodes=2)
    assert layout_of(positions, list(range(16)), 1) == Layout(2, 8, tp_nodes=2, column_nodes=8)
    assert data_parallel(8) == Layout(1, 8, 1, 1)


def test_a_fast_interconnect_computes_at_the_owners_a_slow_one_everywhere():
    groups, layout = square(2048, 32), data_parallel(16)
    assert all(choose_owner_compute(groups, layout, H100, waves=2))
    slow = cluster_profile(dict(nvlink_bw=1e9, ib_bw=1e9))
    assert not any(choose_owner_compute(groups, layout, slow, waves=2))


def test_more_replicas_favour_replicating_small_matrices():
    """1024² matrices: inside one node (DP8) NVLink carries an update's shard faster than the owner saves;
    over 8 nodes (DP64) InfiniBand does not. 4096² matrices stay at their owners in both."""
    small, large = square(1024, 64), square(4096, 64)
    assert all(choose_owner_compute(small, data_parallel(8), H100, waves=2))
    assert not any(choose_owner_compute(small, data_parallel(64), H100, waves=2))
    assert all(choose_owner_compute(large, data_parallel(64), H100, waves=2))


def test_small_and_large_matrices_in_one_step_are_split_between_the_two():
    groups = square(1024, 64) + square(4096, 64)
    owned = choose_owner_compute(groups, data_parallel(64), H100, waves=2)
    assert owned == [False] * 64 + [True] * 64


def test_collective_latency_alone_can_make_replicating_everything_cheaper():
    """TP only: owners halve the FLOPs for the same bytes, but pay four collectives to the gather's one."""
    tp2 = layout_of([(0, 0), (1, 0)], [0, 1], 8)
    assert all(choose_owner_compute(square(2048, 16, tp=2), tp2, H100, waves=2))
    assert not any(choose_owner_compute(square(64, 16, tp=2), tp2, H100, waves=2))


@pytest.mark.parametrize("ranks", [2, 8, 64, 1024])
@pytest.mark.parametrize("n", [256, 1024, 4096])
def test_the_chosen_plan_is_never_predicted_slower_than_either_uniform_plan(ranks, n):
    groups = square(n, 24) + square(n // 4, 24)
    layout = data_parallel(ranks)
    chosen = predicted_step(groups, choose_owner_compute(groups, layout, H100, 2), layout, H100, 2)
    for uniform in (True, False):
        assert chosen <= predicted_step(groups, [uniform] * len(groups), layout, H100, 2)


def test_one_rank_replicates_everything():
    assert choose_owner_compute(square(4096, 4), Layout(1, 1), H100, 2) == [False] * 4


@pytest.mark.parametrize("seed", range(40))
def test_the_pruned_search_picks_what_trying_every_prefix_picks(seed):
    """choose_owner_compute evaluates only the prefixes whose lower bound can still win; the answer must
    be the one of evaluating all of them (least predicted step, least k on a tie)."""
    import random
    from teonspeed.parallel.placement import owner_seconds, replicated_seconds

    rng = random.Random(seed)
    tp = rng.choice([1, 2, 4])
    groups = []
    for _ in range(rng.randint(1, 60)):
        m, n = rng.choice([64, 256, 1024, 2048, 4096]), rng.choice([256, 1024, 4096, 8192])
        shard = 4 * m * n // tp
        groups.append(GroupCost(ns_flops((m, n), 5), shard, shard if tp > 1 and rng.random() < 0.8 else 0))
    dp = rng.choice([2, 8, 64, 512])
    layout = layout_of([(t, d) for d in range(dp) for t in range(tp)], list(range(tp * dp)), 8)
    profile = cluster_profile(dict(ib_bw=rng.choice([5e9, 50e9, 400e9])))
    saving = [replicated_seconds(g, layout, profile) - owner_seconds(g, layout, profile) for g in groups]
    order = sorted(range(len(groups)), key=lambda i: (-saving[i] / max(1, groups[i].shard_bytes), i))
    plans = [[i in set(order[:k]) for i in range(len(groups))] for k in range(len(groups) + 1)]
    times = [predicted_step(groups, plan, layout, profile, 2) for plan in plans]
    assert choose_owner_compute(groups, layout, profile, 2) == plans[times.index(min(times))]
