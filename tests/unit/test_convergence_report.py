"""The convergence study's reporting (bench/convergence.py) on synthetic curves: the study itself is a
benchmark, run by its command, not by the tests."""

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import convergence  # noqa: E402
import convergence_report  # noqa: E402


def test_steps_to_reach_interpolates_between_evaluations():
    curve = [[0, 7.0], [50, 5.0], [100, 4.0], [150, 3.5]]
    assert convergence.steps_to_reach(curve, 4.5) == pytest.approx(75.0)
    assert convergence.steps_to_reach(curve, 4.0) == pytest.approx(100.0)
    assert convergence.steps_to_reach(curve, 3.0) is None


def _curve(final):
    return [[0, 7.0], [100, final + 0.5], [200, final]]


def test_versus_pairs_by_seed_and_counts_steps_to_the_baseline_of_the_same_seed():
    adamw = [{"seed": s, "val_curve": _curve(f)} for s, f in ((1234, 5.0), (1, 5.2))]
    muon = [{"seed": s, "val_curve": _curve(f)} for s, f in ((1, 4.9), (1234, 4.6))]  # another order
    v = convergence.versus(muon, adamw)
    assert v["seeds"] == [1, 1234] and v["diffs"] == pytest.approx([-0.3, -0.4])
    assert v["ppl_pct"] == pytest.approx([100 * math.expm1(-0.3), 100 * math.expm1(-0.4)])
    # seed 1: AdamW ends at 5.2; Muon's curve 7.0 -> 5.4 (step 100) -> 4.9 (200) crosses 5.2 at
    # 100 + 100 * 0.2 / 0.5
    # seed 1234: AdamW ends at 5.0; Muon's 7.0 -> 5.1 -> 4.6 crosses it at 100 + 100 * 0.1 / 0.5
    assert v["steps_to_target"] == pytest.approx([140.0, 120.0])
    assert v["fraction_of_steps"] == pytest.approx([0.7, 0.6])
    worse = convergence.versus([{"seed": 1234, "val_curve": _curve(5.1)}], adamw)
    assert worse["steps_to_target"] == [None] and worse["t"] == math.inf


def test_joint_sweep_brackets_both_learning_rates():
    # A bowl in (log lr, log adamw_lr) with its minimum at lr 0.04, adamw_lr 0.003: both outside the start
    # grid.
    def loss(lr, a):
        return (math.log(lr / 0.04)) ** 2 + (math.log(a / 0.003)) ** 2

    seen = []

    def run_at(lr, a):
        seen.append((lr, a))
        return _FakeRun(lr, loss(lr, a), a)

    runs = convergence.joint_sweep(run_at, (0.005, 0.01, 0.02), (0.006, 0.012, 0.024))
    assert len(seen) == len(set(seen))  # no cell twice
    best = min(runs, key=lambda r: r.final_val)
    assert (best.lr, best.adamw_lr) == pytest.approx((0.04, 0.003))
    row = sorted(r.lr for r in runs if r.adamw_lr == best.adamw_lr)
    column = sorted(r.adamw_lr for r in runs if r.lr == best.lr)
    assert row[0] < best.lr < row[-1] and column[0] < best.adamw_lr < column[-1]


def _fake_train(best):
    """A trainer whose final loss is a bowl around `best[optimizer]` = (lr, adamw_lr), plus a seed offset."""
    launched = []

    def train(run):
        launched.append(run)
        lr0, a0 = best[run.optimizer]
        final = 4.0 + math.log(run.lr / lr0) ** 2 + (math.log(run.adamw_lr / a0) ** 2 if a0 else 0.0)
        final += {1234: 0.0, 1: 0.01, 2: 0.02}[run.seed] + (0.002 if run.teon_k else 0.0)
        run.val_curve = [[0, 7.0], [run.steps // 2, final + 0.5], [run.steps, final]]
        return run

    return train, launched


def test_model_study_sweeps_the_adamw_part_with_every_optimizer_and_seeds_every_best():
    best = {"adamw": (0.006, None), "muon": (0.01, 0.012), "teon": (0.02, 0.012), "htmuon": (0.03, 0.006)}
    train, launched = _fake_train(best)
    size = convergence.Size("tiny", None, 40, teon_ks=(1, 4))
    model = convergence.model_study(size, [1234, 1, 2], train, lambda m: None)
    rows = model["rows"]
    assert (rows["adamw"]["best_lr"], rows["adamw"]["best_adamw_lr"]) == (0.006, None)
    assert model["adamw_part_grid"] == pytest.approx((0.003, 0.006, 0.012))
    for opt in ("muon", "teon", "htmuon"):
        assert (rows[opt]["best_lr"], rows[opt]["best_adamw_lr"]) == pytest.approx(best[opt])
        assert [r["seed"] for r in rows[opt]["seeds"]] == [1234, 1, 2]
        assert {r["adamw_lr"] for r in rows[opt]["seeds"]} == {best[opt][1]}
        assert len({r["adamw_lr"] for r in rows[opt]["sweep"]}) >= 3  # the AdamW part was swept
    # HTMuon starts at Muon's best lr and 3x it (the authors' ratio)
    assert {0.01, 0.03} <= {r["lr"] for r in rows["htmuon"]["sweep"]}
    assert model["versus_adamw"]["muon"]["n"] == 3
    assert set(model["versus_muon"]) == {"teon", "htmuon"} and model["versus_muon"]["teon"]["n"] == 3
    assert set(model["teon_k"]) == {"1", "2", "4"} and model["teon_k"]["2"]["teon_k"] is None
    # every run of the orthogonalizing optimizers carries its AdamW part's lr to the launcher
    argv = convergence.pretrain_argv(launched[-1], Path("/d"), 20, Path("/r"))
    assert argv[argv.index("--adamw-lr") + 1] == str(launched[-1].adamw_lr)


def test_a_restarted_study_reuses_every_finished_run(tmp_path):
    best = {"adamw": (0.006, None), "muon": (0.01, 0.012), "teon": (0.02, 0.012), "htmuon": (0.03, 0.006)}
    train, launched = _fake_train(best)
    saved = {}
    cache = convergence.RunCache(train, save=lambda records: saved.update(records=records))
    sizes = [
        convergence.Size("tiny", None, 40),
        convergence.Size("dense_mha_tiny", None, 40, ["--groups", "4"], optimizers=("adamw",)),
    ]
    first = convergence.study(sizes, [1234, 1, 2], cache, lambda m: None)
    n = len(launched)
    assert n == len(saved["records"]) and first["pending"] == []
    # A crash after some runs: a new process starts from the saved records and runs only the rest.
    launched.clear()
    half = saved["records"][: n // 2]
    again = convergence.study(sizes, [1234, 1, 2], convergence.RunCache(train, half), lambda m: None)
    assert len(launched) == n - len(half)
    assert json.dumps(again["models"], sort_keys=True) == json.dumps(first["models"], sort_keys=True)
    table = convergence_report.summarize({**again, "machine": {}})
    assert "| muon | 0.01 | 0.012 | 4.0100 ± 0.0100 |" in table and "PARTIAL" not in table
    assert "| adamw | 0.006 | – | 4.0100 ± 0.0100 |" in table


def test_the_seed_paper_comparison_pairs_mla_moe_muon_with_dense_mha_adamw():
    def seeded(finals):
        return {"seeds": [{"seed": s, "val_curve": _curve(f)} for s, f in zip((1234, 1, 2), finals)]}

    mla = {
        "rows": {"adamw": seeded([4.2, 4.2, 4.2]), "muon": seeded([4.0, 4.1, 4.05])},
        "versus_adamw": {"muon": "as measured"},
    }
    dense = {"rows": {"adamw": seeded([4.3, 4.3, 4.3])}}
    paper = convergence.seed_paper({"mla_moe_tiny": mla, "dense_mha_tiny": dense})
    assert paper["muon_vs_adamw_on_mla_moe"] == "as measured"
    v = paper["mla_moe_muon_vs_dense_mha_adamw"]
    assert v["diffs"] == pytest.approx([-0.3, -0.2, -0.25]) and v["ppl_pct_mean"] == pytest.approx(
        100 * math.expm1(-0.25)
    )
    assert paper["mla_moe_adamw_vs_dense_mha_adamw"]["mean"] == pytest.approx(-0.1)


def test_runs_go_outside_the_checkout(tmp_path):
    run = convergence.Run("tiny", "muon", 0.01, 0.006, arm="x", options={"teon_mode": 2})
    argv = convergence.pretrain_argv(run, tmp_path / "data", 20, tmp_path / "runs")
    assert argv[argv.index("--runs-dir") + 1] == str(tmp_path / "runs")
    ds = Path(argv[argv.index("--ds-config") + 1])
    assert ds.parent == tmp_path / "runs" / "ds_configs"
    from launch import options

    assert (
        Path(options.parse_args(argv).runs_dir) == tmp_path / "runs"
    )  # (not the default: the checkout's runs/)


# -- the TEON study's protocol helpers -------------------------------------------------------------


class _FakeRun:
    def __init__(self, lr, final, adamw_lr=None):
        self.lr, self.final_val, self.adamw_lr = lr, final, adamw_lr


def test_adaptive_sweep_extends_until_the_best_lr_is_bracketed():
    loss = lambda lr: (math.log(lr) - math.log(0.08)) ** 2  # noqa: E731  (minimum at 0.08)
    runs = convergence.adaptive_sweep(lambda lr: _FakeRun(lr, loss(lr)), (0.01, 0.02, 0.04), max_extensions=5)
    lrs = [r.lr for r in runs]
    assert lrs == pytest.approx(
        [0.01, 0.02, 0.04, 0.08, 0.16]
    )  # stepped up by the grid's ratio, then stopped
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
    run = convergence.Run(
        "tiny", "teon", 0.02, 0.012, arm="teon_mode2", options={"teon_mode": 2, "lr_scale": "fan_ratio"}
    )
    config = json.loads(convergence.write_ds_config(run, tmp_path).read_text())
    assert config["optimizer"] == {
        "type": "TEON",
        "params": {
            "lr": 0.02,
            "adamw_lr": 0.012,
            "weight_decay": 0.01,
            "teon_mode": 2,
            "lr_scale": "fan_ratio",
        },
    }
    # and the launcher's DeepSpeed config keeps them (no --optimizer/--lr flags to override the block)
    from launch import engines, options

    args = options.check(
        [
            "--ds-config",
            str(tmp_path / f"{run.name}.json"),
            "--steps",
            "5",
            "--runs-dir",
            str(tmp_path / "runs"),
        ],
        world=2,
    )
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
    results = gpu_preset.run_gpu_preset(
        [], tmp_path / "out", tmp_path / "corpus", gpu_preset.TINY_PRESET, device="cpu", log=lambda m: None
    )
    assert set(results["runs"]) == {"adamw", "muon", "teon_mode1", "teon_mode2", "htmuon"}
    for r in results["runs"].values():
        assert r["steps"] == 4 and math.isfinite(r["val_curve"][-1][1])
        assert r["val_curve"][-1][1] < r["val_curve"][0][1]  # it learns
    md = (tmp_path / "out" / "convergence_gpu.md").read_text()
    assert results["device"] in md and "teon_mode2" in md


def test_teon_study_protocol_with_a_fake_trainer():
    """Every arm at its own bracketed best lr, HTMuon at 1x and 3x Muon's best, paired seeds; then
    --more-seeds reuses the sweeps and runs only the new seeds."""
    launched = []

    def fake_train(run):
        assert run.adamw_lr == 0.01  # every arm's AdamW part at the study's adamw_lr
        launched.append((run.arm, run.lr, run.seed))
        best = {"muon": 0.01, "htmuon": 0.03}.get(run.arm, 0.014)
        run.val_curve = [[0, 7.0], [run.steps, 4.0 + (math.log(run.lr / best)) ** 2 + 0.01 * run.seed % 3]]
        return run

    size = convergence.Size("tiny", None, 10)
    first = convergence.teon_study(size, [1234, 1, 2], fake_train, lambda m: None, adamw_lr=0.01)
    assert first["arms"]["muon"]["best_lr"] == pytest.approx(0.01)
    assert first["arms"]["teon_mode2"]["best_lr"] == pytest.approx(0.01 * math.sqrt(2))
    # HTMuon starts at 1x and 3x Muon's best and is bracketed like the others (its optimum here is 0.03)
    assert [r["lr"] for r in first["arms"]["htmuon"]["sweep"]] == pytest.approx([0.01, 0.03, 0.09])
    assert first["arms"]["teon_ns5_spectral"]["options"]["orthogonalizer"] == "ns5"
    assert first["pairs"]["teon_mode2 - muon"]["n"] == 3
    table = convergence_report.summarize_teon(first)
    assert "| teon_mode2 - muon |" in table and "grid edge" not in table
    launched.clear()
    more = convergence.teon_study(
        size, [1234, 1, 2, 3], fake_train, lambda m: None, adamw_lr=0.01, previous=first
    )
    assert {seed for _, _, seed in launched} == {3} and len(launched) == len(convergence.TEON_ARMS)
    assert more["pairs"]["teon_mode1 - muon"]["n"] == 4
    # A reused run must be the same run: teon_ns5_spectral's unfolding follows the better mode, which more
    # seeds may flip; its earlier runs in the other mode are trained again, not reused.
    picked = more["arms"]["teon_ns5_spectral"]["options"]["teon_mode"]
    for r in more["arms"]["teon_ns5_spectral"]["sweep"] + more["arms"]["teon_ns5_spectral"]["seeds"]:
        r["options"] = {**r["options"], "teon_mode": 3 - picked}
    launched.clear()
    convergence.teon_study(size, [1234, 1, 2, 3], fake_train, lambda m: None, adamw_lr=0.01, previous=more)
    assert launched and {arm for arm, _, _ in launched} == {"teon_ns5_spectral"}


def test_report_only_reports_the_finished_models_and_leaves_the_rest_pending():
    best = {"adamw": (0.006, None), "muon": (0.01, 0.012), "teon": (0.02, 0.012), "htmuon": (0.03, 0.006)}
    train, launched = _fake_train(best)
    cache = convergence.RunCache(train)
    tiny = convergence.Size("tiny", None, 40)
    convergence.study([tiny], [1234, 1, 2], cache, lambda m: None)
    other = convergence.Size("moe_tiny", "moe_tiny", 40)
    report = convergence.study(
        [tiny, other],
        [1234, 1, 2],
        convergence.RunCache(convergence.not_run, cache.records()),
        lambda m: None,
    )
    assert list(report["models"]) == ["tiny"] and report["pending"] == ["moe_tiny"]
    assert "PARTIAL" in convergence_report.summarize({**report, "machine": {}})


def test_the_machine_line_names_the_cpu_its_microarchitecture_and_the_load():
    # A VM's /proc/cpuinfo hides the generation behind "Intel(R) Xeon(R) Processor"; family 6 model 207 is
    # Emerald Rapids (143 would be Sapphire Rapids).
    cpuinfo = (
        "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 207\n"
        "model name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu avx512_bf16 amx_bf16 amx_tile\n\n"
        "processor\t: 1\nmodel name\t: another block\n"
    )
    cpu = convergence.cpu_description(cpuinfo)
    assert cpu.startswith("Intel(R) Xeon(R) Processor, Emerald Rapids") and "amx_bf16, avx512_bf16" in cpu
    amd = cpuinfo.replace("Intel(R) Xeon(R) Processor", "AMD EPYC 9654").replace("207", "17")
    assert "Rapids" not in convergence.cpu_description(amd)
    m = convergence.machine(0.0, loads=[2.0, 4.0, 6.0], trained=["small"])
    assert m["load_average_during"] == {"min": 2.0, "mean": 4.0, "max": 6.0, "samples": 3}
    line = convergence_report.machine_line(m)
    assert line.startswith("small: ") and f"torch {m['torch']}" in line
    assert "load average 4.0 (min 2.0, max 6.0)" in line
    # A study finished by a second invocation names both, each with the models it trained.
    earlier = {"platform": "old", "load_average_at_end": 4.2, "trained": ["tiny"]}
    table = convergence_report.summarize({"models": {}, "machines": [earlier, m], "machine": m})
    assert "by 2 invocations" in table and "- tiny: CPU not recorded" in table and "- small: " in table


def test_the_teon_study_takes_the_adamw_part_from_muons_joint_sweep(tmp_path):
    size = convergence.Size("small", "llama_small_cpu", 150)
    results = tmp_path / "convergence.json"
    seeds = [{"steps": 150}]
    results.write_text(
        json.dumps({"models": {"small": {"rows": {"muon": {"best_adamw_lr": 0.006, "seeds": seeds}}}}})
    )
    assert convergence.tuned_adamw_part(results, size) == 0.006
    with pytest.raises(SystemExit, match="--adamw-lr"):  # a study at other steps: tuned elsewhere
        convergence.tuned_adamw_part(results, convergence.Size("small", "llama_small_cpu", 30))
    with pytest.raises(SystemExit, match="no tuned AdamW part for tiny"):
        convergence.tuned_adamw_part(results, convergence.Size("tiny", None, 150))
    with pytest.raises(SystemExit, match="no tuned AdamW part"):
        convergence.tuned_adamw_part(tmp_path / "missing.json", size)


def test_every_teon_group_size_the_study_runs_divides_its_models_layers():
    # (a K that does not divide the layers is refused by the launcher: the small model's K = 4 failed so)
    import yaml

    root = Path(__file__).resolve().parents[2]
    for size in convergence.MODELS.values():
        layers = 4  # launch/pretrain.py's default model
        if size.model_config:
            config = yaml.safe_load((root / "configs" / "models" / f"{size.model_config}.yaml").read_text())
            layers = config["transformer"]["num_layers"]
        assert all(layers % k == 0 for k in size.teon_ks), (size.name, layers, size.teon_ks)
