"""launch/rules.py: the launcher's check (launch/options.py) and the memory estimate (launch/estimator)
apply the same rules, and the launcher's optimizer names and defaults are teonspeed's own."""

import subprocess
import sys
from pathlib import Path

import pytest

import teonspeed
from launch import configs, estimator, options, rules
from teonspeed.config import default
from teonspeed.deepspeed import DEEPSPEED_TYPES

REPO = Path(__file__).resolve().parents[2]


def test_the_launchers_names_and_defaults_are_teonspeeds():
    assert {cls.kind: name for name, cls in DEEPSPEED_TYPES.items()} == rules.ORTHO_TYPES
    assert set(rules.ORTHO_OPTIMIZERS) == {c.kind for c in (teonspeed.Muon, teonspeed.TEON, teonspeed.HTMuon)}
    assert rules.TEON_TYPES == default("teon_types", "teon")
    for kind in ("teon", "htmuon"):
        assert rules.teon_k(kind) == default("teon_k", kind) and rules.teon_k(kind, 3) == 3
    assert rules.teon_k("muon", 3) == rules.teon_k("adamw") == 1  # they never stack


@pytest.mark.parametrize(
    "layout, message",
    [
        (dict(tp=3), r"--tp 3 must divide the attention heads \(32\)"),
        (dict(pp=16), r"--pp 16 does not divide num_layers=24"),
        (dict(ep=2), r"--ep 2 needs a MoE model"),
    ],
)
def test_the_launcher_and_the_memory_estimate_refuse_a_layout_with_the_same_words(layout, message):
    argv = ["--model-config", "llama_1b", "--backend", "megatron"]
    for flag, size in layout.items():
        argv += [f"--{flag}", str(size)]
    with pytest.raises(SystemExit, match=message):
        options.check(argv, 48)
    spec = estimator.ModelSpec.from_config(configs.load_model_config("llama_1b"))
    with pytest.raises(ValueError, match=message):
        estimator.estimate(spec, estimator.Parallel(dp=1, **layout))


def test_the_padded_vocabulary_of_the_model_and_of_the_estimate_is_one_rule():
    spec = estimator.ModelSpec.from_config(configs.load_model_config("llama_1b"), vocab_size=50257)
    assert spec.padded_vocab(2) == rules.padded_vocab(50257, 2) == 50432  # a multiple of 128 x 2


def test_the_teon_rule_across_stages_reads_teonspeeds_default_without_importing_torch():
    code = (
        "import sys\nfrom launch.options import check\n"
        "try:\n    check(['--pp', '2', '--layers', '6', '--optimizer', 'teon'], 2)\n"
        "except SystemExit as e:\n    print(e.code)\n"
        "print('torch' in sys.modules)"
    )
    env = {"PYTHONPATH": f"{REPO}:{REPO / 'plugin'}", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    ).stdout.splitlines()
    assert out == [
        f"error: --teon-k {default('teon_k', 'teon')} does not divide the 3 layers per pipeline "
        "stage (num_layers=6, --pp 2): a TEON group would span two stages; use a --teon-k that "
        "divides 3, or a smaller --pp",
        "False",
    ]
