"""The CPU-runnable parts of scripts/gpu_check.sh: argument parsing, the environment report with no GPU,
result and stage writing, the summaries it builds from pytest and launch/pretrain.py output."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import gpu_report  # noqa: E402
import optimizer_step  # noqa: E402

H100_ROW = "NVIDIA H100 80GB HBM3, 580.159.04, 81559 MiB"


def test_environment_without_a_gpu_says_so():
    env = gpu_report.environment(smi=lambda: None)
    import torch

    assert env["torch"] == torch.__version__
    if not torch.cuda.is_available():
        assert env["gpu"] is None and env["driver"] is None and env["gpu_count"] == 0
        assert gpu_report.environment_line(env).startswith("no GPU;")
    for key in ("triton", "deepspeed", "megatron_core", "cuda_runtime", "python", "cpu", "git_commit"):
        assert key in env


def test_environment_reads_driver_and_gpu_from_nvidia_smi():
    env = gpu_report.environment(smi=lambda: [H100_ROW])
    assert env["driver"] == "580.159.04" and env["gpu_memory"] == "81559 MiB"
    assert env["gpu"] in ("NVIDIA H100 80GB HBM3",) or env["cuda_available"]
    line = gpu_report.environment_line(env)
    assert "driver 580.159.04" in line and "torch " in line and "Triton " in line and "CUDA " in line


def test_nvidia_smi_absent_is_none(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert gpu_report.nvidia_smi() is None


def test_parse_args():
    a = gpu_report.parse_args(
        [
            "--results-dir",
            "/x",
            "stage",
            "--name",
            "kernel_bench",
            "--rc",
            "124",
            "--seconds",
            "3.5",
            "--timeout",
            "150",
        ]
    )
    assert (a.command, a.name, a.rc, a.seconds, a.timeout, a.results_dir) == (
        "stage",
        "kernel_bench",
        124,
        3.5,
        150.0,
        Path("/x"),
    )
    with pytest.raises(SystemExit):
        gpu_report.parse_args(["stage", "--name", "no_such_stage", "--rc", "0", "--seconds", "1"])
    with pytest.raises(SystemExit):
        gpu_report.parse_args(["pretrain", "--run", "runs/without_label"])
    with pytest.raises(SystemExit):
        gpu_report.parse_args(["summary", "--mode", "tpu"])
    assert gpu_report.parse_args(["pretrain", "--run", "teon=r/t"]).run == ["teon=r/t"]


def test_stages_and_summary_round_trip(tmp_path):
    log = tmp_path / "kernel_bench.log"
    log.write_text("\n".join(f"line {i}" for i in range(40)) + "\nTraceback: boom\n")
    gpu_report.record_stage(tmp_path, "kernel_tests", 0, 12.0, None, 60)
    entry = gpu_report.record_stage(tmp_path, "kernel_bench", 124, 150.2, log, 150)
    assert entry["status"] == "timed out" and entry["log_tail"][-1] == "Traceback: boom"
    gpu_report.record_stage(tmp_path, "optimizer_step", 1, 3.0, None, 130)
    stages = gpu_report.read_stages(tmp_path)
    assert [s["stage"] for s in stages] == ["kernel_tests", "kernel_bench", "optimizer_step"]
    assert gpu_report.main(["--results-dir", str(tmp_path), "summary", "--mode", "cpu_smoke"]) == 0
    md = (tmp_path / "gpu_check_cpu_smoke.md").read_text()
    assert "| kernel_bench | timed out | 150.2 | 150 |" in md
    assert "failed (rc 1)" in md and "Traceback: boom" in md
    assert "Not run: world1_step, pretrain_adamw, pretrain_teon." in md
    payload = json.loads((tmp_path / "gpu_check_cpu_smoke.json").read_text())
    assert (
        payload["mode"] == "cpu_smoke" and len(payload["stages"]) == 3 and "torch" in payload["environment"]
    )


def test_write_result(tmp_path):
    paths = gpu_report.write_result("x_gpu", {"a": 1, "p": Path("/q")}, "# t", tmp_path / "new")
    assert json.loads(paths[0].read_text()) == {"a": 1, "p": "/q"}
    assert paths[1].read_text() == "# t\n"


def test_junit_summary(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text("""<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="3">
      <testcase classname="tests.unit.test_kernels" name="test_a" time="0.5"/>
      <testcase classname="tests.unit.test_kernels" name="test_b[ns5]" time="1.25">
        <failure message="rel 0.3 &gt; 1e-4"/></testcase>
      <testcase classname="tests.unit.test_kernels" name="test_c" time="0">
        <skipped message="needs CUDA"/></testcase>
      </testsuite></testsuites>""")
    s = gpu_report.junit_summary(xml)
    assert s["counts"] == {"passed": 1, "failed": 1, "skipped": 1}
    assert s["tests"][1] == {
        "name": "tests.unit.test_kernels::test_b[ns5]",
        "outcome": "failed",
        "seconds": 1.25,
        "message": "rel 0.3 > 1e-4",
    }


def test_metrics_summary(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text(
        "step,train_loss,val_loss,lr,tokens_per_s\n0,,7.0,,\n25,6.1,,0.01,1000\n"
        "50,5.2,5.5,0.01,3000\n75,4.9,,0.01,2000\n"
    )
    s = gpu_report.metrics_summary(run)
    assert s == {
        "run_dir": str(run),
        "status": "measured",
        "steps": 75,
        "final_train_loss": 4.9,
        "final_val_loss": 5.5,
        "median_tokens_per_s": 2000.0,
    }
    assert gpu_report.metrics_summary(tmp_path / "missing")["status"] == "no metrics.csv"


def test_gpu_check_dry_run_lists_every_stage_with_a_limit():
    out = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    for stage in gpu_report.STAGES:
        assert f"{stage} " in out.stdout
    assert "--device cuda --sizes 130m,1b" in out.stdout and "ds_muon" in out.stdout
    assert "--zero-stage 1" in out.stdout and "llama_60m" in out.stdout
    # the pretraining stages run on the GPU (launch/pretrain.py defaults to the CPU)
    pretrain = [line for line in out.stdout.splitlines() if "launch/pretrain.py" in line]
    assert len(pretrain) == 2 and all("--device cuda" in line for line in pretrain), pretrain
    smoke = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--cpu-smoke", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        smoke.returncode == 0
        and "--cpu-smoke" in smoke.stdout
        and "/tmp/teonspeed_gpu_check_smoke" in smoke.stdout
    )
    bad = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--fast"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "unknown option --fast" in bad.stderr


def test_optimizer_variants_parse():
    assert optimizer_step.parse_variant("muon") == ("muon", None, False)
    assert optimizer_step.parse_variant("ds_muon:fp32+compile") == ("ds_muon", "fp32", True)
    for bad in ("adam", "muon:fp16", "adamw:bf16"):
        with pytest.raises(ValueError, match=bad.split(":")[0] if bad == "adam" else "dtype"):
            optimizer_step.parse_variant(bad)


def test_side_by_side_pairs_matching_dtype_choices():
    rows = [
        {"size": "60m", "optimizer": "muon", "median_ms": 90.0, "ns_compute_dtype": "float32"},
        {"size": "60m", "optimizer": "muon:fp32", "median_ms": 90.0, "ns_compute_dtype": "float32"},
        {"size": "60m", "optimizer": "ds_muon", "median_ms": 100.0, "ns_compute_dtype": "float32"},
        {"size": "60m", "optimizer": "ds_muon_standard", "median_ms": 80.0, "ns_compute_dtype": "bfloat16"},
        {"size": "60m", "optimizer": "ds_muon:fp32", "median_ms": 120.0, "ns_compute_dtype": "float32"},
        {"size": "60m", "optimizer": "teon", "status": "timed out"},
    ]
    pairs = {p["dtypes"]: p for p in optimizer_step.side_by_side(rows)}
    assert set(pairs) == {"own pick", "fp32"}
    assert pairs["own pick"]["deepspeed"] == "ds_muon_standard"  # DeepSpeed's faster one is the bar
    assert pairs["own pick"]["ratio_ours_over_ds"] == pytest.approx(90 / 80)
    assert pairs["fp32"]["ratio_ours_over_ds"] == pytest.approx(90 / 120)
