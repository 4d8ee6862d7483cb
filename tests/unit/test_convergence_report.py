"""The convergence study's reporting (bench/convergence.py) on synthetic curves: the study itself is a
benchmark, run by its command, not by the tests."""
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
