"""The `run:` line (launch.options.summary) names the optimizer and learning rates the engine uses when they
come from a --ds-config optimizer block. Oracle: teonspeed.make_config over the params that
launch.engines.deepspeed_config hands DeepSpeed: what the optimizer itself builds from them."""

import json

import pytest

import teonspeed
from launch import engines, options


def _check(tmp_path, block, *argv):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"optimizer": block}))
    args = options.check(
        ["--ds-config", str(path), "--runs-dir", str(tmp_path / "runs"), "--steps", "10", *argv], 2
    )
    return args, engines.deepspeed_config(args, dp=2)["optimizer"]


def _engine_lrs(engine_block):
    kind = options.KIND_OF_TYPE[engine_block["type"].lower()]
    cfg = teonspeed.make_config(kind, engine_block["params"])
    return kind, cfg.lr, cfg.adamw_lr


@pytest.mark.parametrize(
    "block",
    [
        # what bench/convergence.py writes for a variant arm: its lrs differ from the CLI defaults
        # (0.02 / 0.003)
        {
            "type": "TeonspeedMuon",
            "params": {"lr": 0.01, "adamw_lr": 0.01, "weight_decay": 0.01, "lr_scale": "fan_ratio"},
        },
        # DeepSpeed's names: muon_lr for the matrices, then lr is the AdamW part's
        {"type": "TeonspeedHTMuon", "params": {"muon_lr": 0.05, "lr": 0.002}},
        {"type": "TEON", "params": {"lr": 0.014, "adam_lr": 0.004, "teon_k": 4}},
        # no lrs at all: the engine gets the launcher's, and the run line says so
        {"type": "TEON", "params": {"teon_mode": 2}},
    ],
)
def test_run_line_reports_the_engine_lrs_of_a_ds_config_block(tmp_path, block):
    args, engine_block = _check(tmp_path, block)
    kind, lr, adamw_lr = _engine_lrs(engine_block)
    line = options.summary(args)
    assert line.startswith(f"{kind} on ") and f"lr {lr:g} (AdamW part {adamw_lr:g})" in line, line
    assert args.name.startswith(f"{kind}_tp1")
    if "teon_k" in block["params"]:
        assert args.teon_k == block["params"]["teon_k"]


def test_an_lr_flag_replaces_the_block_and_the_run_line_follows_it(tmp_path):
    block = {"type": "TeonspeedMuon", "params": {"lr": 0.01, "adamw_lr": 0.01}}
    args, engine_block = _check(tmp_path, block, "--lr", "0.03")
    kind, lr, adamw_lr = _engine_lrs(engine_block)
    assert (kind, lr) == ("teon", 0.03)  # the flags build the block: the CLI's optimizer, its lrs
    assert f"lr 0.03 (AdamW part {adamw_lr:g})" in options.summary(args)


def test_run_line_of_a_deepspeed_adamw_block(tmp_path):
    args, engine_block = _check(tmp_path, {"type": "AdamW", "params": {"lr": 7e-4, "betas": [0.9, 0.95]}})
    assert engine_block["params"]["lr"] == 7e-4
    assert options.summary(args).startswith("adamw on ") and "lr 0.0007," in options.summary(args)


def test_adamw_lr_default_is_the_one_of_what_it_sets(tmp_path):
    """--adamw-lr's default: AdamW's own lr for --optimizer adamw, the AdamW part's for the others (they
    differ: launch.options.ADAMW_LR_DEFAULT), also when a --ds-config block, not a flag, names the
    optimizer."""
    part, own = options.ADAMW_LR_DEFAULT["adamw_part"], options.ADAMW_LR_DEFAULT["adamw"]
    assert (
        options.parse_args([]).adamw_lr == part
        and options.parse_args(["--optimizer", "adamw"]).adamw_lr == own
    )
    assert options.parse_args(["--optimizer", "adamw", "--adamw-lr", "0.05"]).adamw_lr == 0.05
    args, engine_block = _check(tmp_path, {"type": "AdamW", "params": {"betas": [0.9, 0.95]}})
    assert engine_block["params"]["lr"] == own and f"lr {own:g}," in options.summary(args)
    args, engine_block = _check(
        tmp_path, {"type": "TeonspeedMuon", "params": {"lr": 0.01}}, "--optimizer", "adamw"
    )
    assert engine_block["type"] == "AdamW" and engine_block["params"]["lr"] == own
