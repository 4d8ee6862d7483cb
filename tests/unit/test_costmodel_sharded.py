"""The sharded-layout cost rows (bench/costmodel_sharded.py): each strategy's bytes and FLOPs per rank
against counts written out by hand for layouts small enough to enumerate, and AdamW's yardstick
(teonspeed.parallel.cost.sharded_adamw_bytes) against the ring formulas. DeepSpeed's strategy is checked
against DeepSpeed itself by bench/zero3_side_by_side.py (tests/distributed/test_zero3_bench_smoke.py)."""

import sys
from pathlib import Path

import pytest

from teonspeed.parallel.cost import adamw_bytes, sharded_adamw_bytes
from teonspeed.parallel.owners import ns_flops

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import costmodel_sharded as cs  # noqa: E402

A = cs.Assumptions()
ITEM = A.comm_itemsize


def test_holder_pieces_follow_each_layouts_split():
    # ZeRO-3: ceil(n/W) flat elements each, the last rank the rest; FSDP2: torch.chunk on dim 0
    assert cs.holder_pieces("x", (5, 3), "zero3", 4).tolist() == [4, 4, 4, 3]
    assert cs.holder_pieces("x", (5, 3), "fsdp2", 4).tolist() == [6, 6, 3, 0]
    hsdp = cs.holder_pieces("x", (16, 2), "hsdp", 16)  # shard 8 x 2 replicas: the same chunks twice
    assert hsdp.tolist() == [4] * 16
    # FSDP2 x TP 8: q_proj column-parallel (rows / 8), then dim 0 over DP 2 -> rank d*8 + t
    tp = cs.holder_pieces("model.layers.0.self_attn.q_proj.weight", (32, 4), "fsdp2_tp", 16)
    assert tp.tolist() == [2 * 4] * 16
    down = cs.holder_pieces("model.layers.0.mlp.down_proj.weight", (6, 16), "fsdp2_tp", 16)
    assert down.tolist() == [3 * 2] * 16  # row-parallel: cols / 8, rows 6 over DP 2


def test_one_job_goes_to_one_owner_and_comes_back():
    # one 8x8 matrix over 4 ZeRO-3 ranks (16 elements each): the owner receives 3 pieces and sends them
    # back, every other rank sends and receives its 16
    cost = cs.teonspeed_cost([([("w", (8, 8))], (8, 8))], "zero3", 4, A)
    assert cost.bytes_max == 3 * 16 * ITEM
    assert cost.flops_max == ns_flops((8, 8), A.ns_steps)
    assert cost.flops_mean == cost.flops_max / 4


def test_lpt_owners_balance_equal_jobs_and_need_no_bytes_for_held_pieces():
    # 4 equal jobs over 4 ranks: one each; a rank sends its piece of 3 jobs and receives 3 pieces of its own
    jobs = [([(f"w{i}", (8, 8))], (8, 8)) for i in range(4)]
    cost = cs.teonspeed_cost(jobs, "zero3", 4, A)
    assert cost.flops_max == cost.flops_mean
    assert cost.bytes_max == 2 * 3 * 16 * ITEM  # round A out 3 pieces + round B out 3 slices


def test_hsdp_reads_the_nearest_holder_and_sends_every_replica_its_slice():
    # 16 GPUs = 2 replicas x shard 8; one 16x2 matrix (4 elements per shard rank). Owner: rank 0.
    job = [([("w", (16, 2))], (16, 2))]
    direct = cs.teonspeed_cost(job, "hsdp", 16, A)
    # the 7 other chunks come from its own replica (nearer than the other's), and the update's slice goes
    # to all 15 other holders: sent 15*4, received 7*4
    assert direct.bytes_max == 15 * 4 * ITEM
    # hierarchical: slices to its own replica only (7*4 out, 7*4 in); round C, the ring over the 2
    # replicas, has each of replica 0's holders pass its 4-element slice on to replica 1's: rank 0 sends
    # 7*4 + 4 (its own slice too), replica 1's ranks receive 4 each
    tree = cs.teonspeed_cost(job, "hsdp", 16, A, hierarchical=True)
    assert tree.bytes_max == (7 * 4 + 4) * ITEM
    # the nearest holder: a tie (as far in each replica) goes to the lower rank
    assert cs._nearest_holders(2, 4, 2).tolist() == [2, 1]
    assert cs._nearest_holders(1, 4, 2).tolist() == [0, 1]


def test_dion_pads_to_a_multiple_of_the_world():
    # 3 matrices of 8x4 over 4 ranks: padded to 4, each rank owns one; its shard is 2 rows of 4;
    # it sends 3 shards out and 3 back
    params = [(f"w{i}", (8, 4)) for i in range(3)]
    cost = cs.dion_cost(params, "fsdp2", 4, A)
    assert cost.bytes_max == 2 * 3 * 2 * 4 * ITEM
    assert cost.flops_max == ns_flops((8, 4), A.ns_steps)  # one matrix (or a zero pad) per rank


def test_deepspeed_rounds_gather_padded_to_the_largest_in_its_sorted_order():
    # 4 parameters over 2 ranks, one bucket. MuonWithAuxAdam sorts them by shape, largest first: (4,4),
    # (4,4), (2,4), (2,4), so both rounds are uniform (in model order, both would mix shapes and be padded
    # to 16: 2 * 16 * 2 gathers). Gradients + momentum all-gathered ((W-1) x local each), then per round
    # the updates and momenta ((W-1) x the round's width each).
    params = [("a", (2, 4)), ("b", (4, 4)), ("c", (2, 4)), ("d", (4, 4))]
    cost = cs.deepspeed_cost(params, 2, A)
    local = 4 + 8 + 4 + 8
    assert cost.bytes_max == (2 * local + 2 * 16 + 2 * 8) * ITEM
    # rank 0 computes b and a, rank 1 d and c
    assert cost.flops_max == ns_flops((4, 4), A.ns_steps) + ns_flops((2, 4), A.ns_steps)
    assert cost.extra_backward_bytes == pytest.approx(0.5 * 48 * ITEM)  # all-reduce over reduce-scatter


def test_deepspeed_pads_a_short_round_to_the_world():
    # 3 parameters over 4 ranks: one round of 3, padded to 4 x the largest
    params = [("a", (4, 4)), ("b", (2, 4)), ("c", (4, 2))]
    cost = cs.deepspeed_cost(params, 4, A)
    local = 4 + 2 + 2
    assert cost.bytes_max == (2 * 3 * local + 2 * 3 * 16) * ITEM


def test_sharded_adamw_bytes_is_the_ring_sum():
    n, s = 1000, 4
    assert sharded_adamw_bytes(n, s, 4, 2) == n * 4 * 3 // 4 + 2 * (n * 2 * 3 // 4)
    # HSDP: + the all-reduce of the 1/S shard over R replicas
    assert sharded_adamw_bytes(n, s, 4, 2, replicate_size=2) == (
        n * 4 * 3 // 4 + 2 * 250 * 4 * 1 // 2 + 2 * (n * 2 * 3 // 4)
    )
    # one gather and no replicas: ZeRO-1/2's reduce-scatter + all-gather
    assert sharded_adamw_bytes(n, s, 4, 2, param_gathers=1) == adamw_bytes(
        n, s, 4, 2, gradient_allreduce=False
    )


def test_rows_cover_every_layout_and_name_the_target():
    pred = cs.predict(A, ["llama-350m"], [8, 16])
    rows = pred["llama-350m"]
    assert [r["gpus"] for r in rows["zero3"]] == [8, 16]
    assert [r["gpus"] for r in rows["hsdp"]] == [16]  # one node is plain FSDP2
    assert "DeepSpeed muon" in rows["zero3"][0] and "dion muon" in rows["fsdp2"][0]
    for r in rows["zero3"]:  # fewer bytes than DeepSpeed's all-gathers in the same layout
        assert r["teonspeed muon"]["bytes_max"] < r["DeepSpeed muon"]["bytes_max"]
