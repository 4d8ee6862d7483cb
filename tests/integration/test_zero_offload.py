"""ZeRO-Offload (`zero_optimization.offload_optimizer`) keeps the optimizer partitions on the host, which
the parallel step's NCCL exchange cannot take: refused at deepspeed.initialize with the fix named."""

import pytest

import ds_helpers as h
from support.harness import RankError, run_ranks


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_offload_is_refused_naming_the_option_and_the_fix(stage):
    config = h.ds_config("TEON", stage=stage)
    config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    with pytest.raises(
        RankError,
        match="does not support ZeRO-Offload(.|\n)*offload_optimizer.device='cpu'"
        "(.|\n)*Remove zero_optimization.offload_optimizer",
    ):
        run_ranks(h.train, 2, config, steps=1, timeout=120)
