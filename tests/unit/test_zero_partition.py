"""The ZeRO-1/2 flat-partition planner on synthetic layouts: which jobs are local, which are cut, who
owns them, and the bytes each rank moves."""

import pytest

from teonspeed.grouping import LayerRef, MatrixRef, OrthoGroup
from teonspeed.parallel.cost import ClusterProfile
from teonspeed.parallel.owners import ns_flops
from teonspeed.parallel.zero_planner import exchange_seconds, plan_zero_buckets, plan_zero_partition


def matrix(name, shape, block=0, part=None, expert=None, layer_type="other"):
    return MatrixRef(name, LayerRef(layer_type, block, expert), shape, part, expert)


def single(m):
    return OrthoGroup((m,))


def grid(tp, dp):
    """(tp rank, partition) -> work rank, Megatron-style (TP ranks adjacent)."""
    return {(t, d): d * tp + t for t in range(tp) for d in range(dp)}


def plan(groups, entries, partition_size, dp, tp=1, sharded=(), cluster=ClusterProfile()):
    offsets = {n: off for n, off, _ in entries}
    shapes = {n: shape for n, _, shape in entries}
    return plan_zero_partition(
        groups,
        offsets,
        shapes,
        partition_size,
        dp,
        tp,
        grid(tp, dp),
        cost=lambda g: ns_flops(g.stacked_shape, 5),
        tp_sharded=lambda m: m.name in sharded,
        cluster=cluster,
    )


def by_label(p):
    return {" + ".join(m.label for g in j.groups for m in g.members): j for j in p.jobs}


def test_a_matrix_spanning_three_partitions_is_cut_and_balanced_onto_the_idle_rank():
    a, big, c = matrix("a", (4, 4)), matrix("big", (8, 8)), matrix("c", (4, 4))
    # flat: a [0,16)  big [16,80)  c [80,96); partitions of 32: big covers all three
    p = plan(
        [single(a), single(big), single(c)], [("a", 0, (4, 4)), ("big", 16, (8, 8)), ("c", 80, (4, 4))], 32, 3
    )
    jobs = by_label(p)
    assert (jobs["a"].partitions, jobs["a"].cut, jobs["a"].owner) == ((0,), False, 0)
    assert (jobs["c"].partitions, jobs["c"].cut, jobs["c"].owner) == ((2,), False, 2)
    assert (jobs["big"].partitions, jobs["big"].cut, jobs["big"].owner) == ((0, 1, 2), True, 1)
    # Only big's pieces move: 16 elements from partition 0 and 16 from partition 2 to rank 1, and back.
    sent, received = p.bytes_per_rank(4)
    assert sent == [64, 128, 64] and received == [64, 128, 64]
    assert [j for j in p.exchanged_jobs()] == [jobs["big"]]


SLOW_FLOPS = dict(peak_flops=1e6, ns_efficiency=1.0)  # seconds of NS per matrix: the FLOPs decide


def test_cut_jobs_go_where_they_finish_first_and_the_imbalance_is_reported():
    # Equal-byte partitions of 400: h0 and most of h1 in partition 0, the light l in partition 1.
    heavy0, heavy1, light = matrix("h0", (16, 16)), matrix("h1", (16, 16)), matrix("l", (4, 8))
    entries = [("h0", 0, (16, 16)), ("h1", 256, (16, 16)), ("l", 512, (4, 8))]
    groups = [single(heavy0), single(heavy1), single(light)]
    p = plan(groups, entries, 400, 2, cluster=ClusterProfile(**SLOW_FLOPS))
    jobs = by_label(p)
    assert jobs["h0"].owner == 0 and jobs["h1"].partitions == (0, 1) and jobs["h1"].cut
    assert jobs["h1"].owner == 1  # rank 1 has only the light matrix: the cut one goes there
    assert jobs["l"].owner == 1 and not jobs["l"].cut
    assert p.partition_flops() == [jobs["h0"].flops + jobs["h1"].flops, jobs["l"].flops]
    assert p.partition_imbalance > 1.9 and p.imbalance < 1.1
    assert p.loads == [jobs["h0"].flops, jobs["h1"].flops + jobs["l"].flops]
    # At H100 rates these matrices take picoseconds of NS and the bytes decide: h1 stays with the holder
    # of its larger piece (144 of its 256 elements), so only the 112 others travel, each way.
    fast = by_label(plan(groups, entries, 400, 2))
    assert fast["h1"].owner == 0
    assert plan(groups, entries, 400, 2).bytes_per_rank(4) == ([112 * 4, 112 * 4], [112 * 4, 112 * 4])


def test_a_teon_stack_whose_members_fall_in_different_partitions_is_one_cut_job():
    q0, q1 = matrix("q0", (4, 4), 0, layer_type="q"), matrix("q1", (4, 4), 1, layer_type="q")
    o0 = matrix("o0", (4, 4), 0)
    p = plan(
        [OrthoGroup((q0, q1)), single(o0)], [("q0", 0, (4, 4)), ("o0", 16, (4, 4)), ("q1", 32, (4, 4))], 32, 2
    )
    jobs = by_label(p)
    stack = jobs["q0 + q1"]
    assert stack.partitions == (0, 1) and stack.cut
    assert [u.name for u in stack.units] == ["q0", "q1"]
    assert jobs["o0"].partitions == (0,) and not jobs["o0"].cut
    # q1 (16 elements) travels to the owner and its update back; q0 stays if rank 0 owns the stack.
    sent, received = p.bytes_per_rank(4)
    assert sum(sent) == sum(received) == 2 * 16 * 4


def bucket_plan(groups, buckets, dp=2):
    """buckets: per bucket, ([(name, offset in the bucket, shape)], partition size)."""
    places = {n: (b, off) for b, (entries, _) in enumerate(buckets) for n, off, _ in entries}
    shapes = {n: shape for entries, _ in buckets for n, _, shape in entries}
    return plan_zero_buckets(
        groups,
        places,
        shapes,
        [size for _, size in buckets],
        dp,
        1,
        grid(1, dp),
        cost=lambda g: ns_flops(g.stacked_shape, 5),
        tp_sharded=lambda m: False,
    )


@pytest.mark.parametrize("q1_partition", [0, 1])
def test_a_teon_stack_over_two_buckets_is_one_job_local_when_both_pieces_are_on_one_rank(q1_partition):
    # Megatron's distributed optimizer: bucket 0 = q0 [0,16) o0 [16,32), bucket 1 = q1 and r; partitions of
    # 16 each. Rank d's local buffer is its partition of bucket 0, then its partition of bucket 1.
    q0, q1 = matrix("q0", (4, 4), 0, layer_type="q"), matrix("q1", (4, 4), 1, layer_type="q")
    o0, r = matrix("o0", (4, 4), 0), matrix("r", (4, 4), 1)
    second = [("q1", 16 * q1_partition, (4, 4)), ("r", 16 * (1 - q1_partition), (4, 4))]
    p = bucket_plan(
        [OrthoGroup((q0, q1)), single(o0), single(r)],
        [([("q0", 0, (4, 4)), ("o0", 16, (4, 4))], 16), (second, 16)],
    )
    jobs = by_label(p)
    stack = jobs["q0 + q1"]
    assert [(u.name, u.bucket) for u in stack.units] == [("q0", 0), ("q1", 1)]
    assert p.partition_size == 32 and [p.local_start(b) for b in (0, 1)] == [0, 16]
    assert p.local(stack.units[1], q1_partition) == (16, 32)  # after the rank's 16 elements of bucket 0
    assert p.local(jobs["o0"].units[0], 1) == (0, 16)
    sent, received = p.bytes_per_rank(4)
    if q1_partition == 0:  # both members on rank 0: computed there, nothing moves
        assert stack.partitions == (0,) and not stack.cut and sum(sent) == 0
    else:  # one member's 16 elements to the owner and its update back
        assert stack.partitions == (0, 1) and stack.cut and sum(sent) == sum(received) == 2 * 16 * 4


def test_a_group_partly_outside_the_partitions_planned_together_is_refused_naming_it():
    from teonspeed.parallel.flat import FlatEntry, FlatPartition, plan_partitions

    q0, q1 = matrix("q0", (4, 4), 0, layer_type="q"), matrix("q1", (4, 4), 1, layer_type="q")
    dense = FlatPartition([FlatEntry("q0", 0, (4, 4))], 8, None, 0, 2)
    with pytest.raises(ValueError, match=r"q0 \+ q1 is partly outside .*q1 is not in them"):
        plan_partitions(
            [dense], [OrthoGroup((q0, q1))], grid(1, 2), 1, cost=lambda g: 1.0, tp_sharded=lambda m: False
        )


def test_parts_of_one_fused_weight_are_one_job_and_experts_are_their_own_units():
    q, k = matrix("qkv", (4, 4), part="q"), matrix("qkv", (2, 4), part="k")
    e0, e1 = matrix("experts", (4, 4), expert=0), matrix("experts", (4, 4), expert=1)
    entries = [("qkv", 0, (6, 4)), ("experts", 24, (2, 4, 4))]  # experts[0] [24,40), experts[1] [40,56)
    p = plan([single(q), single(k), single(e0), single(e1)], entries, 28, 2)
    jobs = by_label(p)
    assert set(jobs) == {"qkv<q> + qkv<k>", "experts[0]", "experts[1]"}
    assert jobs["qkv<q> + qkv<k>"].partitions == (0,)
    assert jobs["experts[0]"].partitions == (0, 1) and jobs["experts[1]"].partitions == (1,)
    assert [u.offset for u in jobs["experts[1]"].units] == [40]


def test_tp_sharded_members_gather_over_the_tp_peers_holding_the_same_partition():
    a, b = matrix("a", (8, 4)), matrix("b", (8, 4))  # local TP shards (4, 4) each
    entries = [("a", 0, (4, 4)), ("b", 16, (4, 4))]
    p = plan([single(a), single(b)], entries, 16, 2, tp=2, sharded={"a", "b"})
    jobs = by_label(p)
    for name, d in (("a", 0), ("b", 1)):
        job = jobs[name]
        assert job.partitions == (d,) and not job.cut and job.tp_sharded
        assert p.position(job.owner)[1] == d  # computed by a TP peer of that partition
        assert sorted(r for *_, r in p.sources(job)) == [2 * d, 2 * d + 1]
    sent, received = p.bytes_per_rank(4)
    # Each job: the non-owner TP peer sends its 16-element shard and receives its 16-element update.
    assert sum(sent) == sum(received) == 2 * 2 * 16 * 4
    assert all(s == 64 for s in sent)


def test_a_tp_replicated_matrix_is_read_from_the_owner_and_sent_to_its_tp_peers():
    a = matrix("a", (4, 4))
    p = plan([single(a)], [("a", 0, (4, 4))], 8, 2, tp=2)  # cut over partitions 0, 1; not TP-sharded
    job = p.jobs[0]
    assert job.cut and not job.tp_sharded
    owner_tp = p.position(job.owner)[0]
    assert {t for t, *_ in p.sources(job)} == {owner_tp}
    assert len(p.targets(job)) == 4


def test_a_layout_that_does_not_cover_a_matrix_is_refused():
    with pytest.raises(ValueError, match="outside the flat partitions"):
        plan([single(matrix("a", (4, 4)))], [("a", 64, (4, 4))], 16, 2)


# Equal bytes, uneven work: partition 0 holds two 64 x 64 matrices, partitions 1 and 2 eight 4 x 256 each
# (8192 elements per partition); Newton–Schulz on a square matrix costs ~90x a flat one of the same size.
UNEVEN = [("s0", 0, (64, 64)), ("s1", 4096, (64, 64))] + [
    (f"f{i}", 8192 + 1024 * i, (4, 256)) for i in range(16)
]


def uneven_plan(cluster):
    groups = [single(matrix(n, shape, block=i)) for i, (n, _, shape) in enumerate(UNEVEN)]
    return plan(groups, UNEVEN, 8192, 3, cluster=cluster)


def test_balancing_moves_a_local_job_off_the_busiest_rank_and_reports_max_over_mean_before_and_after():
    p = uneven_plan(ClusterProfile(**SLOW_FLOPS))
    jobs = by_label(p)
    assert not any(j.cut for j in p.jobs)
    assert p.placed_loads == p.partition_flops()  # before: every job where it lives
    assert p.imbalance_before_balancing > 2.7 and p.imbalance < 1.4
    # the busiest rank now holds one square matrix: the least any placement of whole jobs can give it
    assert max(p.loads) == jobs["s0"].flops and sum(p.loads) == pytest.approx(sum(p.placed_loads))
    squares = [j for j in p.moved if j.units[0].shape == (64, 64)]
    assert (
        len(squares) == 1
        and squares[0].owner != 0
        and {jobs["s0"].owner, jobs["s1"].owner} == {0, squares[0].owner}
    )
    # each moved job's elements travel to its new owner and its update back; nothing else moves
    sent, received = p.bytes_per_rank(4)
    assert sent[0] == received[0] == 4096 * 4
    assert sum(sent) == sum(received) == 2 * 4 * sum(j.units[0].numel for j in p.moved)
    assert f"{p.imbalance:.2f} after balancing, {p.imbalance_before_balancing:.2f} before" in p.describe()


@pytest.mark.parametrize("link", ["nvlink_bw", "ib_bw"])
def test_balancing_never_moves_a_job_when_moving_costs_more_than_it_saves(link):
    """Same layout; the link the move would use carries 1 byte/s: 32 KiB take hours, the NS saved seconds."""
    slow = ClusterProfile(**SLOW_FLOPS, **{link: 1.0}, gpus_per_node=8 if link == "nvlink_bw" else 1)
    p = uneven_plan(slow)
    assert p.moved == [] and p.loads == p.placed_loads and p.imbalance_before_balancing > 2.7
    assert sum(p.bytes_per_rank(4)[0]) == 0  # nothing exchanged at all
    s1 = by_label(p)["s1"]
    assert exchange_seconds(p, s1, 1, slow, 4) == pytest.approx(2 * 4096 * 4)
    assert (
        by_label(uneven_plan(ClusterProfile()))["s1"].owner == 0
    )  # H100 rates: microseconds of NS, not worth it


def _replicated_plan(replicas, shards, gpus_per_node, relay=None, shape=(2048, 2048)):
    from teonspeed.grouping import LayerRef, MatrixRef, OrthoGroup
    from teonspeed.parallel.cost import ClusterProfile
    from teonspeed.parallel.owners import ns_flops
    from teonspeed.parallel.sharded import dim0_chunk_holds
    from teonspeed.parallel.zero_planner import plan_pieces

    holders = [[r * shards + s for r in range(replicas)] for s in range(shards)]
    dp = replicas * shards
    return plan_pieces(
        [OrthoGroup((MatrixRef("w", LayerRef("other", None), shape),))],
        dim0_chunk_holds("w", shape, holders),
        {"w": shape},
        dp,
        1,
        {(0, d): d for d in range(dp)},
        cost=lambda g: ns_flops(g.stacked_shape, 5),
        tp_sharded=lambda m: False,
        cluster=ClusterProfile(gpus_per_node=gpus_per_node),
        relay=relay,
    )


def test_hsdp_relays_the_update_when_the_cluster_constants_predict_it_faster():
    # one 2048x2048 fp32 matrix (16 MiB), 8 replicas x 2 shards, one replica per node: each holder keeps
    # 8 MiB. Flat: the owner sends its 8 MiB slice to each of the 15 other holders (120 MiB); relayed: to its
    # shard partner only, and every rank passes 8 MiB on around its ring of 8 replicas (owner: 8 + 8 MiB)
    mib = 2**20
    flat = _replicated_plan(8, 2, 2, relay=False)
    chosen = _replicated_plan(8, 2, 2)
    assert not flat.relay and chosen.relay
    assert max(flat.bytes_per_rank(4)[0]) == 15 * 8 * mib
    assert max(chosen.bytes_per_rank(4)[0]) == 16 * mib
    assert len(chosen.relay_rounds()) == 7  # R - 1 hops
    # tiny matrices: the 7 extra rounds' latency outweighs the bytes saved, so the flat plan is kept
    assert not _replicated_plan(8, 2, 2, shape=(64, 64)).relay
    # no replicas (FSDP2): nothing to relay, whatever is asked
    assert not _replicated_plan(1, 4, 2, relay=True).relay
