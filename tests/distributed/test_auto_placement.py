"""parallel_mode="auto": each group computed by an owner or by every rank, as the cluster's constants
predict is cheaper. A mixed plan equals the single-process step, its measured bytes equal its plan's, and
ranks configured with different constants fail loudly instead of running different plans.

The `cluster` constants below are chosen so that the tiny GPT's plan really mixes: its k/v TEON stacks
(16 × 64) carry about half the Newton–Schulz FLOPs per byte of every other group (smallest side 32), and
the FLOP rate / link bandwidth ratio is set between the two, with latencies made negligible.
"""
import pytest

from teonspeed.testing.harness import RankError, run_ranks
from test_parallel_step import assert_same_model, gather_full, reference, train

# FLOP/s over bytes/s: 140 puts the break-even between k/v (90 FLOP/byte) and the rest (≥ 200) with one
# replica per TP position pair (DP only); with TP2 the shard halves the bytes, so the ratio triples.
FAST_LINKS = dict(ns_efficiency=1.0, nvlink_bw=1e10, latency_intra=1e-9, latency_per_peer=1e-12)
MIXING = {1: dict(FAST_LINKS, peak_flops=1.4e12), 2: dict(FAST_LINKS, peak_flops=4.2e12)}  # by TP size

LAYOUTS = [
    pytest.param(dict(), 2, id="DP2"),
    pytest.param(dict(tp=2), 4, id="TP2xDP2"),
    pytest.param(dict(ep=2, moe=True), 4, id="EP2xDP2-moe"),
]


def _choices(plan_text):
    """(groups computed by every rank, groups computed by an owner) as the plan lists them."""
    lines = [line for line in plan_text.splitlines() if "[owner: " in line]
    return sum("[owner: every rank" in line for line in lines), sum("work rank" in line for line in lines)


@pytest.mark.parametrize("layout,world_size", LAYOUTS)
def test_a_mixed_plan_equals_the_single_process_step_and_moves_what_it_predicts(layout, world_size):
    cluster = MIXING[layout.get("tp", 1)]
    results = run_ranks(train, world_size, optimizer="teon", mode="auto", options={"cluster": cluster},
                        timeout=120, **layout)
    replicated, owned = _choices(results[0][3])
    assert replicated > 0 and owned > 0, results[0][3]  # the plan really mixes both ways
    assert_same_model(gather_full(results), reference("teon", moe=layout.get("moe", False)))
    for _, (sent, received, _, _), expected, _ in results:
        assert (sent, received) == expected


def test_tp_only_computes_at_the_owners_when_latency_is_cheap_and_everywhere_when_it_is_not():
    """One replica: owners halve the FLOPs for the same TP bytes, so only the collectives' latency can
    make replicating worth it (the default H100 constants, for matrices this small)."""
    fast = run_ranks(train, 2, tp=2, optimizer="teon", mode="auto", options={"cluster": MIXING[2]}, timeout=120)
    slow = run_ranks(train, 2, tp=2, optimizer="teon", mode="auto", timeout=120)
    assert _choices(fast[0][3])[0] == 0 and _choices(slow[0][3])[1] == 0
    ref = reference("teon")
    for results in (fast, slow):
        assert_same_model(gather_full(results), ref)
        assert all((r[1][0], r[1][1]) == r[2] for r in results)


def _train_with_rank_cluster(rank, world_size, clusters):
    return train(rank, world_size, optimizer="teon", mode="auto", options={"cluster": clusters[rank]})


def test_ranks_with_different_cluster_constants_fail_loudly():
    with pytest.raises(RankError, match="disagree on its plan(.|\n)*parallel_mode=auto"):
        run_ranks(_train_with_rank_cluster, 2, [MIXING[1], dict(MIXING[1], nvlink_bw=2e10)], timeout=120)
