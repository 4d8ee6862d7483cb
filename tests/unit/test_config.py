"""teonspeed.config: one frozen OptimizerConfig, every default written once, every option checked when
the config is made (type, finite number, range), before any optimizer state exists."""

import dataclasses
import math
import re

import pytest
import torch

import teonspeed
from teonspeed.config import ACCEPTED_OPTIONS, CHECKS, OPTION_NAMES, OptimizerConfig, default, make_config
from teonspeed.kinds import KIND_DEFAULTS, OPTIMIZER_KINDS
from tiny_models import TinyLlama


def test_every_option_has_a_check():
    assert set(CHECKS) == set(OPTION_NAMES)


@pytest.mark.parametrize("kind", OPTIMIZER_KINDS)
def test_no_option_is_left_unresolved_and_each_kind_gets_its_defaults(kind):
    config = make_config(kind, {})
    nullable = {"cluster", "grouping_rule", "qk_clip"}  # None: no overrides, the name rules, QK-clip off
    assert all(getattr(config, name) is not None for name in OPTION_NAMES if name not in nullable)
    assert {k: getattr(config, k) for k in KIND_DEFAULTS[kind]} == KIND_DEFAULTS[kind]
    assert all(getattr(config, name) == default(name, kind) for name in OPTION_NAMES)


def test_an_option_given_as_none_takes_its_default():
    assert make_config("teon", {"teon_k": None, "ns_steps": None}) == make_config("teon", {})


def test_the_config_cannot_change_after_it_was_checked():
    config = make_config("muon", {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = float("inf")


@pytest.mark.parametrize(
    "option",
    [
        "lr",
        "weight_decay",
        "adamw_lr",
        "adamw_eps",
        "adamw_weight_decay",
        "momentum",
        "ht_power",
        "qk_clip",
        "qk_clip_alpha",
    ],
)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_numbers_are_refused_naming_the_option(option, value):
    # a bounded range ("a number in [0, 1)") leaves out the non-finite values by itself
    with pytest.raises(
        ValueError,
        match=rf"^teonspeed: option '{option}' must be (None \(off\) or )?a "
        rf"(finite number|number in)",
    ):
        make_config("teon", {option: value})


@pytest.mark.parametrize(
    "option, value, expected",
    [
        ("lr", "0.02x", r"a finite number >= 0, got '0.02x' \(str\)"),
        ("momentum", "0.9", r"a number in \[0, 1\), got '0.9' \(str\)"),
        ("lr", True, r"a finite number >= 0, got True \(bool\)"),
        ("ns_steps", "5", r"an integer >= 1, got '5' \(str\)"),
        ("teon_k", 2.0, r"an integer >= 1, got 2.0 \(float\)"),
        ("teon_mode", True, r"one of \(1, 2\), got True \(bool\)"),
        ("nesterov", "yes", r"true or false, got 'yes' \(str\)"),
        ("skip_nonfinite", 1, r"true or false, got 1 \(int\)"),
        ("orthogonalizer", 5, r"one of \('ns5', 'polar_express', 'svd'\), got 5 \(int\)"),
        ("teon_types", "q", r"a list of layer types"),
        ("adamw_betas", (0.9, "0.95"), r"two numbers in \[0, 1\)"),
        ("cluster", [1.0], r"a mapping of teonspeed.parallel.cost.ClusterProfile fields"),
        ("grouping_rule", "q", r"a callable name -> LayerRef"),
    ],
)
def test_a_wrong_type_names_the_option_and_the_expected_type(option, value, expected):
    with pytest.raises(ValueError, match=rf"^teonspeed: option '{option}' must be {expected}"):
        make_config("teon", {option: value})


@pytest.mark.parametrize(
    "option, value",
    [
        ("lr", -0.1),
        ("momentum", 1.0),
        ("weight_decay", -1e-3),
        ("adamw_weight_decay", -0.1),
        ("adamw_eps", 0.0),
        ("adamw_betas", (0.9, 1.0)),
        ("ns_steps", 0),
        ("teon_k", 0),
        ("teon_mode", 3),
        ("ht_interval", 0),
        ("overlap_waves", 0),
        ("parallel_mode", "owners"),
        ("comm_dtype", "fp16"),
        ("ns_dtype", "fp64"),
        ("lr_scale", "rms"),
        ("ht_method", "qr"),
    ],
)
def test_values_out_of_range_are_refused(option, value):
    with pytest.raises(ValueError, match=rf"^teonspeed: option '{option}' must be"):
        make_config("teon", {option: value})


def test_cluster_fields_must_be_known_positive_finite_numbers():
    with pytest.raises(ValueError, match=r"option 'cluster' has unknown field\(s\) \['nope'\]"):
        make_config("teon", {"cluster": {"nope": 1.0}})
    field = teonspeed.parallel.cost.FIELDS[0]
    for bad in (math.nan, math.inf, 0.0, True):
        with pytest.raises(ValueError, match=rf"option 'cluster' fields \['{field}'\] must be positive"):
            make_config("teon", {"cluster": {field: bad}})


def test_the_documented_auto_values_are_accepted_and_a_numeric_auto_says_who_fills_it_in():
    config = make_config(
        "teon", {"ns_dtype": "auto", "ns_backend": "auto", "parallel_mode": "auto", "comm_dtype": "auto"}
    )
    assert (config.ns_dtype, config.ns_backend, config.parallel_mode, config.comm_dtype) == ("auto",) * 4
    # Hugging Face's DeepSpeed templates write "lr": "auto"; its Trainer replaces them, DeepSpeed does not
    with pytest.raises(
        ValueError,
        match=r"option 'lr' must be a finite number >= 0, got 'auto' \(str\); "
        r"\"auto\" is filled in by the Hugging Face Trainer",
    ):
        make_config("teon", {"lr": "auto"})


def test_lists_from_json_are_stored_as_tuples():
    config = make_config("teon", {"adamw_betas": [0.8, 0.9], "teon_types": ["q", "k"]})
    assert config.adamw_betas == (0.8, 0.9) and config.teon_types == ("q", "k")


def test_the_unknown_option_message_lists_every_accepted_name():
    with pytest.raises(ValueError) as err:
        make_config("teon", {"teon_kk": 2})
    message = str(err.value)
    assert "'teon_kk' (did you mean 'teon_k'?)" in message
    listed = set(re.findall(r"\b[a-z][a-z0-9_]*\b", message.split("valid options are:")[1]))
    assert set(ACCEPTED_OPTIONS) <= listed
    # ...and each listed name is one make_config takes
    samples = {"betas": (0.9, 0.95), "eps": 1e-8, "adam_lr": 1e-3, "muon_lr": 0.02, "adam_w_mode": True}
    for name in ACCEPTED_OPTIONS:
        make_config("teon", {name: samples[name] if name in samples else default(name, "teon")})


@pytest.mark.parametrize("cls", [teonspeed.Muon, teonspeed.TEON, teonspeed.HTMuon])
def test_a_bad_option_is_refused_before_the_optimizer_exists(cls):
    model = TinyLlama()
    with pytest.raises(ValueError, match=r"option 'adamw_lr' must be a finite number"):
        cls(model, adamw_lr=math.inf)
    with pytest.raises(ValueError, match=r"option 'weight_decay' must be a finite number"):
        cls(model, weight_decay=math.inf)


def test_a_param_group_override_is_checked_like_the_option():
    model = TinyLlama()
    groups = [
        {"params": list(model.named_parameters())[:3], "lr": "0.02x"},
        {"params": list(model.named_parameters())[3:]},
    ]
    with pytest.raises(
        ValueError,
        match=r"option 'param_groups\[0\].lr' must be a finite number >= 0, "
        r"got '0.02x'",
    ):
        teonspeed.TEON(groups)
    groups[0]["lr"], groups[1]["adamw_betas"] = 0.01, [0.8, 0.9]
    opt = teonspeed.TEON(groups)
    assert {tuple(g["betas"]) for g in opt.param_groups if g["route"] == "adamw"} >= {(0.8, 0.9)}


def test_the_optimizers_and_the_plan_read_the_same_defaults():
    model = TinyLlama()
    assert teonspeed.TEON(model).config == teonspeed.plan(model, "teon").config == make_config("teon", {})
    assert teonspeed.Muon(model).config.ns_steps == default("ns_steps") == teonspeed.ortho.NS_STEPS
    assert "x5" in str(teonspeed.plan(model, "muon")).splitlines()[0]
    assert isinstance(make_config("teon", {}), OptimizerConfig) and torch.is_grad_enabled()
