"""The Hugging Face Trainer with a DeepSpeed config as Hugging Face documents it ("auto" values and the
option names of DeepSpeed's AdamW/Muon) and "type": "TEON", under the real `deepspeed` launcher on 2 CPU
ranks: ZeRO stages 0, 1, 2 and 3 give the same losses and weights, and the "auto" values reach the
optimizer."""

import json
from pathlib import Path

import pytest
import torch

import teonspeed
from support import tolerance as tol


def test_hf_trainer_with_auto_params_agrees_across_zero_stages(tmp_path):
    import transformers  # noqa: F401  (a dev requirement: missing, this test fails rather than skips)
    from support.launcher import run_deepspeed

    out = tmp_path / "results.json"
    run_deepspeed(Path(__file__).parent / "hf_trainer_script.py", str(out), timeout=300)
    result = json.loads(out.read_text())
    assert result["world_size"] == 2
    runs = [result["results"][str(stage)] for stage in (0, 1, 2, 3)]
    assert [r["optimizer"] for r in runs] == [
        "TEON",
        "DeepSpeedZeroOptimizer",
        "DeepSpeedZeroOptimizer",
        "DeepSpeedZeroOptimizer_Stage3",
    ]
    assert all(r["basic"] == "TEON" for r in runs)
    # "betas": "auto", "eps": "auto" came from TrainingArguments(adam_beta1/2, adam_epsilon)
    assert all(r["adamw"] == {"betas": [0.85, 0.98], "eps": 1e-7} for r in runs)
    reference = torch.tensor(runs[0]["weights"])
    budget = runs[0]["budget"]  # stage 0's rounding budget (hf_trainer_script.RoundingBudgetCallback)
    for r in runs[1:]:
        assert float((torch.tensor(r["weights"]) - reference).norm()) <= budget
        assert len(r["losses"]) == 3
        for a, b, g in zip(r["losses"], runs[0]["losses"], runs[0]["grad_norms"]):
            # ‖∇L‖ times the weights' bound, plus the loss's own reductions (a log-softmax over 64 tokens)
            assert abs(a - b) <= g * budget + tol.sums(torch.float32, 64) * abs(b)


def test_deepspeed_option_names_mean_the_same_as_ours():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    blockless = dict(teon_per_layer_fallback=True)  # no transformer blocks here: no TEON stack can form
    theirs = teonspeed.TEON(
        model, betas=(0.8, 0.9), eps=1e-6, adam_lr=1e-3, adam_w_mode=True, **blockless
    ).config
    ours = teonspeed.TEON(model, adamw_betas=(0.8, 0.9), adamw_eps=1e-6, adamw_lr=1e-3, **blockless).config
    assert theirs == ours
    # DeepSpeed's Muon: muon_lr for the matrices, the shared lr then for the Adam half
    split = teonspeed.TEON(model, lr=3e-4, muon_lr=0.02, **blockless).config
    assert (split.lr, split.adamw_lr) == (0.02, 3e-4)


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(betas=(0.9, 0.95), adamw_betas=(0.9, 0.95)), "'betas' and 'adamw_betas' both set"),
        (dict(adam_w_mode=False), "'adam_w_mode' must be true"),
    ],
)
def test_conflicting_or_unsupported_deepspeed_names_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        teonspeed.TEON(torch.nn.Linear(4, 4), **options)
