"""--qk-clip / --qk-clip-alpha / --qk-clip-log in launch/pretrain.py (2 forked CPU ranks): the quickstart
model's logged maximum held within 1.2 τ at τ = half the unclipped run's maximum, the metrics.csv column,
AdamW logging only, bad flags refused. (Pipeline stages: test_qk_clip_megatron.py.)"""

import csv
import math
import os

import pytest

from support.harness import run_ranks
from test_pretrain import _main, _refused, data_dir  # noqa: F401  (data_dir: the module's fixture)

QUICK = [
    "--progress",
    "off",
    "--no-plot",
    "--eval-every",
    "1000",
    "--eval-batches",
    "2",
    "--log-every",
    "1000",
]


def train(argv, world=2, timeout=240):
    return run_ranks(_main, world, argv, timeout=timeout)[0]


def _column(path):
    rows = list(csv.DictReader(open(path)))
    return [r["max_attn_logit"] for r in rows]


def test_clipping_the_quickstart_model_at_half_its_maximum_logs_and_lowers_it(data_dir, tmp_path):  # noqa: F811
    """The quickstart's model and batch (llama_tiny, TEON, DeepSpeed ZeRO-1, DP 2, 32 x 64 tokens) for 30
    steps: the column holds the run's maxima, nothing changes while every head is below τ, and afterwards
    the clipped run's largest logit stays below the unclipped one's."""
    common = ["--data-dir", str(data_dir), "--runs-dir", str(tmp_path), "--steps", "30", *QUICK]
    free = train(common + ["--name", "free", "--qk-clip-log"])["max_attn_logits"]
    assert len(free) == 30 and all(m > 0 for m in free)
    column = _column(tmp_path / "free" / "metrics.csv")
    assert column[0] == "" and [float(v) for v in column[1:]] == pytest.approx(free, rel=1e-12)
    tau = max(free) / 2
    clipped = train(common + ["--name", "clipped", "--qk-clip", repr(tau)])["max_attn_logits"]
    first = next(i for i, m in enumerate(free) if m > tau)
    assert clipped[: first + 1] == free[: first + 1]  # nothing is rescaled while every head is below τ
    assert max(clipped[first + 1 :]) < max(free[first + 1 :])


@pytest.mark.skipif(
    os.environ.get("TEONSPEED_LARGE_TESTS") != "1",
    reason="two 200-step quickstart runs (~2 minutes on 2 CPU cores); set "
    "TEONSPEED_LARGE_TESTS=1 (recorded in bench/results/qk_clip_cpu.md)",
)
def test_the_quickstart_stays_within_1_2_tau_at_half_its_unclipped_maximum(tmp_path):
    """The issue's criterion, on `python -m launch.pretrain`'s defaults as scripts/pretrain.sh runs them
    (llama_tiny, TEON, DeepSpeed ZeRO-1, 2 data-parallel ranks, 200 steps of 32 x 64 tokens, the embedded
    corpus; ~1 minute a run): log the maxima, then clip at half of their largest. The clip reads the step's
    forward (before its update), so the next forward may exceed τ by one update's growth; 1.2 τ bounds it
    here (bench/results/qk_clip_cpu.md: 1.12 τ); a 40-step run, which reaches τ at a higher lr, overshot to
    1.26 τ once."""
    common = ["--runs-dir", str(tmp_path), *QUICK]
    free = train(common + ["--name", "free", "--qk-clip-log"], timeout=900)
    maxima = free["max_attn_logits"]
    assert len(maxima) == 200 and all(m > 0 for m in maxima)
    column = _column(tmp_path / "free" / "metrics.csv")
    assert column[0] == "" and [float(v) for v in column[1:]] == pytest.approx(maxima, rel=1e-12)
    tau = max(maxima) / 2
    clipped = train(common + ["--name", "clipped", "--qk-clip", repr(tau)], timeout=900)["max_attn_logits"]
    first = next(i for i, m in enumerate(maxima) if m > tau)
    assert clipped[: first + 1] == maxima[: first + 1]  # nothing is rescaled while every head is below τ
    assert max(clipped[2:]) <= 1.2 * tau, (tau, clipped)  # the bound, from step 3 on
    assert max(maxima[first + 1 :]) > 1.5 * tau  # ... which the unclipped run exceeds by far


@pytest.mark.parametrize("backend", ["deepspeed", "megatron"])
def test_adamw_logs_the_max_logit_without_clipping(backend, data_dir, tmp_path):  # noqa: F811
    """--qk-clip-log with another optimizer than teonspeed's: the backend steps a log-only clip itself."""
    out = train(
        [
            "--data-dir",
            str(data_dir),
            "--runs-dir",
            str(tmp_path),
            "--name",
            "adamw",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--optimizer",
            "adamw",
            "--qk-clip-log",
            "--micro-batch",
            "4",
            "--seq",
            "32",
            "--backend",
            backend,
            *QUICK,
        ]
    )
    maxima = out["max_attn_logits"]
    assert len(maxima) == 3 and all(m > 0 for m in maxima)
    column = _column(tmp_path / "adamw" / "metrics.csv")
    assert [float(v) for v in column[1:]] == pytest.approx(maxima, rel=1e-12)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "adamw" / "tensorboard"))
    events.Reload()
    logged = [e.value for e in events.Scalars("train/max_attn_logit")]
    assert logged == pytest.approx(maxima, rel=1e-6)  # (TensorBoard stores float32)


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--qk-clip", "0"], r"--qk-clip must be a finite number > 0"),
        (["--qk-clip", "nan"], r"--qk-clip must be a finite number > 0"),
        (
            ["--qk-clip", "50", "--qk-clip-log"],
            r"--qk-clip-log logs the max logit without clipping .* give one of them",
        ),
        (
            ["--qk-clip", "50", "--optimizer", "adamw"],
            r"--qk-clip rescales the weights through teonspeed's optimizer",
        ),
        (["--qk-clip", "50", "--qk-clip-alpha", "1.5"], r"--qk-clip-alpha must be in \[0, 1\]"),
        (["--qk-clip-alpha", "0.3"], r"--qk-clip-alpha needs --qk-clip TAU"),
    ],
)
def test_bad_qk_clip_flags_are_refused_before_anything_runs(argv, match, tmp_path, monkeypatch):
    _refused(argv, match, tmp_path=tmp_path, monkeypatch=monkeypatch)


@pytest.mark.parametrize("config", ["gpt2_tiny", "mla_moe_tiny"])
def test_the_other_tiny_configs_clip_too(config, data_dir, tmp_path):  # noqa: F811
    """GPT-2 (fused QKV with biases, learned positions) and MLA + MoE (the launcher's SDPA core attention,
    the q LoRA and kv up-projections): the clip acts and training goes on."""
    common = [
        "--model-config",
        config,
        "--data-dir",
        str(data_dir),
        "--runs-dir",
        str(tmp_path),
        "--steps",
        "3",
        "--warmup",
        "1",
        "--micro-batch",
        "4",
        "--seq",
        "32",
        *QUICK,
    ]
    free = train(common + ["--name", "free", "--qk-clip-log"])["max_attn_logits"]
    tau = min(free) / 2  # every step clips
    out = train(common + ["--name", "clipped", "--qk-clip", repr(tau)])
    assert out["max_attn_logits"][0] == free[0] > tau
    assert out["max_attn_logits"][1] < free[1] and all(math.isfinite(x) for x in out["losses"])
