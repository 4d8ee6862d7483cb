"""bench/zero3_side_by_side.py in its smoke mode (2 gloo ranks, a tiny model, one timed step): the harness
runs every arm, DeepSpeed's measured ZeRO-3 Muon step bytes equal the cost model's reading of stage3.py
(bench/costmodel_sharded.deepspeed_cost), and the arms that compute the same rule agree. No timing is
asserted."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

pytest.importorskip("deepspeed")


def test_zero3_side_by_side_smoke(tmp_path):
    import zero3_side_by_side as bench

    torch.set_num_threads(1)  # run_ranks forks: no OpenMP threads in the parent
    data = bench.main(["--smoke", "--out", str(tmp_path / "smoke")])
    (row,) = data["rows"]
    ds = row["DeepSpeed Muon ZeRO-3"]
    # DeepSpeed's step: the cost model's all-gathers, plus its scalar all-reduces (overflow check and
    # gradient norm: a few fp32/fp64 values, under 64 bytes)
    assert 0 <= ds["step_bytes"] - row["deepspeed_predicted_step_bytes"] <= 64
    assert ds["flops_max"] > 0 and row["teonspeed Muon"]["flops_max"] > 0
    # Same rule, same data. e = our bf16-NS run's distance to our fp32-NS run (bf16 rounding alone).
    # DeepSpeed's ZeRO-3 and ZeRO-0 run the same bf16 NS on gradients summed in another order: two bf16
    # roundings of nearly the same input, each ~e from the exact result, so ≤ 2e (triangle inequality).
    # Ours vs DeepSpeed's: the same, doubled again for the different points where each casts to bf16.
    e = row["rel_bf16_vs_fp32_ns"]
    assert 0 < e < 1e-2  # bf16 has 8 mantissa bits: rounding alone stays well under 1%
    assert row["rel_deepspeed_zero3_vs_zero0"] <= 2 * e
    assert row["rel_ours_vs_deepspeed_zero0"] <= 4 * e
    # DeepSpeed's default gradient_clipping clips its ZeRO-3 Muon update (norm ≫ 1): a different step
    assert row["rel_deepspeed_zero3_default_clipping_vs_zero0"] > 10 * e
    if row["ours_stage"] == 3:
        # teonspeed's exchange: the plan's pieces and slices, as the cost model counts them
        ours = row["teonspeed Muon"]
        assert ours["plan_equals_counters"] and ours["wrapper_equals_counters"]
        sent = max(ours["exchange_sent_max"], ours["exchange_received_max"])
        assert sent == row["teonspeed_muon_predicted_step_bytes"]
    md = (tmp_path / "smoke.md").read_text()
    if row["ours_stage"] != 3:
        assert "PLACEHOLDER" in md  # never reported as ZeRO-3
    assert (tmp_path / "smoke.json").exists()
