"""parallel_mode="auto": each group computed by an owner or by every rank, as the cluster's constants
predict is cheaper. A mixed plan equals the single-process step, its measured bytes equal its plan's, and
ranks configured with different constants fail loudly instead of running different plans.

The `cluster` constants below are chosen so that the tiny GPT's plan really mixes: its k/v TEON stacks
(16 × 64) carry about half the Newton–Schulz FLOPs per byte of every other group (smallest side 32), and
the FLOP rate / link bandwidth ratio is set between the two, with latencies made negligible.
"""

import pytest

from support import tolerance as tol
from support.harness import RankError, run_ranks
from test_parallel_step import assert_same_model, gather_full, reference, train

# FLOP/s over bytes/s: 240 puts the break-even between k/v and the rest (the owners' exchange half hidden
# behind their compute, as the runner's two waves do) with one replica per TP position pair (DP only); with
# TP2 the shard halves the bytes, so the rate goes up with it. Mixed plans hold from about 2.0e12 to 2.8e12.
FAST_LINKS = dict(ns_efficiency=1.0, nvlink_bw=1e10, latency_intra=1e-9, latency_per_peer=1e-12)
MIXING = {1: dict(FAST_LINKS, peak_flops=2.4e12), 2: dict(FAST_LINKS, peak_flops=4.2e12)}  # by TP size

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
    results = run_ranks(
        train, world_size, optimizer="teon", mode="auto", options={"cluster": cluster}, timeout=120, **layout
    )
    replicated, owned = _choices(results[0][3])
    assert replicated > 0 and owned > 0, results[0][3]  # the plan really mixes both ways
    assert f"parallel_mode=auto: {owned} groups at owners, {replicated} on every rank" in results[0][3]
    assert_same_model(gather_full(results), reference("teon", moe=layout.get("moe", False)))
    for _, (sent, received, _, _), expected, *_ in results:
        assert (sent, received) == expected


def test_tp_only_computes_at_the_owners_when_latency_is_cheap_and_everywhere_when_it_is_not():
    """One replica: owners halve the FLOPs for the same TP bytes, so only the collectives' latency can
    make replicating worth it (the default H100 constants, for matrices this small)."""
    fast = run_ranks(
        train, 2, tp=2, optimizer="teon", mode="auto", options={"cluster": MIXING[2]}, timeout=120
    )
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


def _replicated_with_a_whole_matrix(rank, world_size):
    """TP2: fc1 split by rows, fc2 whole on both ranks (a TP-replicated matrix); one replicated step."""
    import torch
    import torch.distributed as dist
    import teonspeed
    from teonspeed.parallel.context import ParallelContext

    full = {"layers.0.mlp.fc1.weight": (8, 6), "layers.0.mlp.fc2.weight": (6, 8)}
    specs = {
        "layers.0.mlp.fc1.weight": teonspeed.ShardSpec(tp_partition_dim=0),
        "layers.0.mlp.fc2.weight": teonspeed.ShardSpec(),
    }
    grads = {
        n: torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, (n, s) in enumerate(full.items())
    }
    local = {
        n: g.chunk(world_size, 0)[rank] if specs[n].tp_partition_dim == 0 else g for n, g in grads.items()
    }
    params = [(n, torch.nn.Parameter(torch.zeros_like(g))) for n, g in local.items()]
    opt = teonspeed.Muon(
        params, parallel=ParallelContext(specs, tp_group=dist.group.WORLD), parallel_mode="replicated"
    )
    for n, p in params:
        p.grad = local[n].clone()
    opt.step()
    ref = [(n, torch.nn.Parameter(torch.zeros(s))) for n, s in full.items()]
    ref_opt = teonspeed.Muon(ref)
    budget = tol.RoundingBudget(ref_opt)  # the gathered matrices are the same numbers: rounding only
    for n, p in ref:
        p.grad = grads[n].clone()
    ref_opt.step()
    want = {
        n: p.detach().chunk(world_size, 0)[rank] if specs[n].tp_partition_dim == 0 else p.detach()
        for n, p in ref
    }
    same = tol.distance({n: p.detach() for n, p in params}, want) <= budget.weights(0.02)
    return (
        same,
        (opt.comm_stats.sent, opt.comm_stats.received),
        opt.runner.expected_bytes(opt.grouping.groups),
    )


def test_the_tp_gather_of_replicated_groups_moves_only_the_split_matrices():
    """A matrix whole on every TP rank needs no gather (it is used as it is, as an owner uses it): the
    counter equals the plan, which counts only fc1's other half (24 fp32 values each way)."""
    for same, measured, expected in run_ranks(_replicated_with_a_whole_matrix, 2, timeout=60):
        assert same and measured == expected == (96, 96)
