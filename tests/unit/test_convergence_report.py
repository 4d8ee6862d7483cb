"""The convergence study's reporting (bench/convergence.py) on synthetic curves: the study itself is a
benchmark, run by its command, not by the tests."""
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import convergence  # noqa: E402


def test_steps_to_reach_interpolates_between_evaluations():
    curve = [[0, 7.0], [50, 5.0], [100, 4.0], [150, 3.5]]
    assert convergence.steps_to_reach(curve, 4.5) == pytest.approx(75.0)
    assert convergence.steps_to_reach(curve, 4.0) == pytest.approx(100.0)
    assert convergence.steps_to_reach(curve, 3.0) is None


def _run(opt, lr, final, seed=1234):
    return {"optimizer": opt, "lr": lr, "seed": seed, "val_curve": [[0, 7.0], [100, final + 0.5], [200, final]]}


def test_summary_reports_mean_std_perplexity_and_steps_to_adamw():
    results = {"sizes": {"tiny": {
        "steps": 200, "model_config": "x",
        "sweep": {"adamw": [_run("adamw", lr, 5.0 + lr) for lr in (1e-3, 3e-3, 1e-2)]},
        "seeds": {"adamw": [_run("adamw", 1e-3, 5.0), _run("adamw", 1e-3, 5.2, 1)],
                  "teon": [_run("teon", 0.02, 4.5), _run("teon", 0.02, 4.7, 1)]},
        "teon_k": {"1": _run("teon", 0.02, 4.8), "2": _run("teon", 0.02, 4.5)}}},
        "architectures": {"moe_tiny": {o: _run(o, 0.02, 5.0) for o in ("adamw", "muon", "teon")}}}
    table = convergence.summarize(results)
    assert "| teon | 0.02 | 4.6000 ± 0.1000 | 99.48 |" in table
    assert "| adamw | 0.001 | 5.1000 ± 0.1000 |" in table
    assert "| moe_tiny | 5.0000 | 5.0000 | 5.0000 |" in table


# -- the TEON study's protocol helpers -------------------------------------------------------------

class _FakeRun:
    def __init__(self, lr, final):
        self.lr, self.final_val = lr, final


def test_adaptive_sweep_extends_until_the_best_lr_is_bracketed():
    loss = lambda lr: (math.log(lr) - math.log(0.08)) ** 2  # noqa: E731  (minimum at 0.08)
    runs = convergence.adaptive_sweep(lambda lr: _FakeRun(lr, loss(lr)), (0.01, 0.02, 0.04), max_extensions=5)
    lrs = [r.lr for r in runs]
    assert lrs == pytest.approx([0.01, 0.02, 0.04, 0.08, 0.16])  # stepped up by the grid's ratio, then stopped
    best = min(runs, key=lambda r: r.final_val).lr
    assert lrs[0] < best < lrs[-1]
    down = convergence.adaptive_sweep(lambda lr: _FakeRun(lr, loss(lr * 16)), (0.01, 0.02, 0.04))
    assert [r.lr for r in down] == pytest.approx([0.0025, 0.005, 0.01, 0.02, 0.04])


def test_paired_difference_uses_the_seed_by_seed_spread():
    p = convergence.paired([4.10, 4.20, 4.30], [4.12, 4.21, 4.33])
    assert p["diffs"] == pytest.approx([-0.02, -0.01, -0.03])
    assert p["mean"] == pytest.approx(-0.02) and p["sd"] == pytest.approx(0.01)
    assert p["t"] == pytest.approx(-0.02 / (0.01 / math.sqrt(3)))


def test_variant_runs_carry_their_options_through_a_deepspeed_config(tmp_path):
    run = convergence.Run("tiny", "teon", 0.02, arm="teon_mode2", options={"teon_mode": 2, "lr_scale": "fan_ratio"})
    config = json.loads(convergence.write_ds_config(run, tmp_path).read_text())
    assert config["optimizer"] == {"type": "TEON", "params": {"lr": 0.02, "adamw_lr": 0.003, "weight_decay": 0.01,
                                                              "teon_mode": 2, "lr_scale": "fan_ratio"}}
    # and the launcher's DeepSpeed config keeps them (no --optimizer/--lr flags to override the block)
    from launch import engines, options
    args = options.check(["--ds-config", str(tmp_path / f"{run.name}.json"), "--steps", "5",
                          "--runs-dir", str(tmp_path / "runs")], world=2)
    assert engines.deepspeed_config(args, dp=2)["optimizer"] == config["optimizer"]


def test_gpu_preset_builds_a_corpus_and_trains_every_arm_at_tiny_size_on_cpu(tmp_path):
    import torch
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import gpu_preset
    from gpu_corpus import build_corpus
    root = tmp_path / "text"
    root.mkdir()
    for i in range(40):
        (root / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + sum(range({i}))\n" * 30)
    (root / "dup.py").write_text((root / "m0.py").read_text())  # an exact duplicate is dropped
    meta = build_corpus(tmp_path / "corpus", 20_000, roots=[root], vocab=512, log=lambda m: None)
    assert meta["documents"] == 40 and meta["train_tokens"] >= 20_000 and meta["vocab"] <= 512
    assert (tmp_path / "corpus" / "valid.bin").stat().st_size == 2 * meta["valid_tokens"]
    torch.set_num_threads(1)
    results = gpu_preset.run_gpu_preset([], tmp_path / "out", tmp_path / "corpus",
                                        gpu_preset.TINY_PRESET, device="cpu", log=lambda m: None)
    assert set(results["runs"]) == {"adamw", "muon", "teon_mode1", "teon_mode2", "htmuon"}
    for r in results["runs"].values():
        assert r["steps"] == 4 and math.isfinite(r["val_curve"][-1][1])
        assert r["val_curve"][-1][1] < r["val_curve"][0][1]  # it learns
    md = (tmp_path / "out" / "convergence_gpu.md").read_text()
    assert results["device"] in md and "teon_mode2" in md


def test_teon_study_protocol_with_a_fake_trainer(monkeypatch):
    """Every arm at its own bracketed best lr, HTMuon at 1x and 3x Muon's best, paired seeds; then
    --more-seeds reuses the sweeps and runs only the new seeds."""
    launched = []

    def fake_launch(run, data_dir, eval_every, log):
        launched.append((run.arm, run.lr, run.seed))
        best = {"muon": 0.01, "htmuon": 0.03}.get(run.arm, 0.014)
        run.val_curve = [[0, 7.0], [run.steps, 4.0 + (math.log(run.lr / best)) ** 2 + 0.01 * run.seed % 3]]
        return run

    monkeypatch.setattr(convergence, "launch", fake_launch)
    size = convergence.Size("tiny", None, 10)
    first = convergence.teon_study(size, [1234, 1, 2], Path("."), 5, lambda m: None)
    assert first["arms"]["muon"]["best_lr"] == pytest.approx(0.01)
    assert first["arms"]["teon_mode2"]["best_lr"] == pytest.approx(0.01 * math.sqrt(2))
    # HTMuon starts at 1x and 3x Muon's best and is bracketed like the others (its optimum here is 0.03)
    assert [r["lr"] for r in first["arms"]["htmuon"]["sweep"]] == pytest.approx([0.01, 0.03, 0.09])
    assert first["arms"]["teon_ns5_spectral"]["options"]["orthogonalizer"] == "ns5"
    assert first["pairs"]["teon_mode2 - muon"]["n"] == 3
    table = convergence.summarize_teon(first)
    assert "| teon_mode2 - muon |" in table and "grid edge" not in table
    launched.clear()
    more = convergence.teon_study(size, [1234, 1, 2, 3], Path("."), 5, lambda m: None, previous=first)
    assert {seed for _, _, seed in launched} == {3} and len(launched) == len(convergence.TEON_ARMS)
    assert more["pairs"]["teon_mode1 - muon"]["n"] == 4
