"""DeepSpeed checkpoints of a teonspeed optimizer in another layout: a ZeRO-0 checkpoint (state per whole
parameter) resumes at another data-parallel size exactly like a plain loop would; ZeRO-1/2 (state per DP
partition) at another DP size and universal checkpoints are refused with the cause and the fix."""

import pytest

import torch

import ds_helpers as h
import teonspeed
from support import tolerance as tol
from support.harness import RankError, run_ranks

STEPS, SAVE_AT = 5, 3


def oracle(dtype=torch.float32):
    """One process: the DP=4 rank-averaged gradients until SAVE_AT, then DP=2's (clipped at DeepSpeed's
    default norm, 1.0). dtype=fp64: tol's float64 oracle of the same training."""
    model = h.TinyLM().to(dtype)
    opt = teonspeed.TEON(model.named_parameters(), lr=0.02, adamw_lr=3e-3)
    for step in range(STEPS):
        world = 4 if step < SAVE_AT else 2
        opt.zero_grad()
        for rank in range(world):
            (model(*h.batch(step, rank)) / world).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_a_zero0_checkpoint_resumes_at_another_dp_size(tmp_path):
    config = h.ds_config("TEON", stage=0)
    run_ranks(
        h.train, 4, config, steps=SAVE_AT, checkpoint={"dir": str(tmp_path), "save_at": SAVE_AT}, timeout=120
    )
    _, params, *_ = run_ranks(
        h.train,
        2,
        config,
        steps=STEPS,
        checkpoint={"dir": str(tmp_path), "load": True, "start": SAVE_AT},
        timeout=120,
    )[0]
    expected = oracle()
    assert tol.distance(params, expected) <= tol.oracle_bound(expected, oracle(torch.float64))


def test_a_zero2_checkpoint_at_another_dp_size_is_refused(tmp_path):
    config = h.ds_config("TEON", stage=2)
    run_ranks(h.train, 2, config, steps=1, checkpoint={"dir": str(tmp_path), "save_at": 1}, timeout=120)
    with pytest.raises(RankError, match="DP world size of 2 but the current world size is 1"):
        run_ranks(
            h.train,
            1,
            config,
            steps=2,
            checkpoint={"dir": str(tmp_path), "load": True, "start": 1},
            timeout=120,
        )


def test_universal_checkpoints_are_refused_with_the_fix():
    config = h.ds_config("TEON", stage=1, checkpoint={"load_universal": True})
    with pytest.raises(
        RankError, match="cannot load DeepSpeed universal checkpoints.*at the DP size it was saved"
    ):
        run_ranks(h.train, 2, config, steps=1, timeout=120)


def test_a_plain_state_dict_at_another_tp_size_is_refused_before_any_state_changes():
    """The same check as Megatron's (test_megatron_checkpoint.py), on the plain API: layouts compared
    first."""
    model = h.TinyLM()
    opt = teonspeed.TEON(model, lr=0.02)
    saved = opt.state_dict()
    saved["teonspeed_layout"] = dict(saved["teonspeed_layout"], sizes={"tp": 2, "expert_tp": 2})
    before = opt.state_dict()
    with pytest.raises(ValueError, match=r"saved with \{'tp': 2, 'expert_tp': 2\}, loading into \{'tp': 1"):
        opt.load_state_dict(saved)
    assert opt.state_dict()["param_groups"] == before["param_groups"] and not opt.state
