"""A mistake in a parallel job is one line on every rank, never a hang in a collective or a bare assert.

- construction errors are agreed before the runner's first collective: every rank raises the same line
  (teon_k against the blocks under TP x PP; a refusal on one rank only);
- a bad gradient on one rank only: every rank refuses the step (through the step check's collective,
  naming it), nothing changes anywhere.

(DTensor placements teonspeed cannot describe are refused the same way: test_fsdp2.py.)
"""

import pytest
import torch
import torch.distributed as dist

import megatron_models as mm
import teonspeed
from teonspeed.parallel.context import ParallelContext
from support.harness import RankError, run_ranks
from tiny_models import TinyLlama


def _errors(err):
    return [line for line in str(err.value).splitlines() if line.startswith("ValueError: teonspeed:")]


def megatron_teon(rank, world_size, tp, pp, teon_k, options=None):
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model = mm.tiny_gpt(
        mm.tiny_config(num_layers=4, tp=tp, pp=pp),
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
    )
    return len(teonspeed.TEON(model, teon_k=teon_k, **(options or {})).plan.teon_groups)


@pytest.mark.parametrize("tp,pp,teon_k", [(2, 1, 8), (2, 2, 4)], ids=["TP2-k8", "TP2xPP2-k4"])
def test_teon_k_beyond_the_layers_per_stage_is_the_same_line_on_every_rank(tp, pp, teon_k):
    # 4 layers (2 per stage at PP=2); cutting TEON windows at the stage boundary is allowed, so no stage
    # check stops it first: with more than the layers a stage holds, no stack forms
    options = {"cut_groups_at_stage_boundary": True}
    with pytest.raises(RankError) as err:
        run_ranks(megatron_teon, tp * pp, tp=tp, pp=pp, teon_k=teon_k, options=options, timeout=120)
    lines = _errors(err)
    assert len(lines) == tp * pp and len(set(lines)) == 1, str(err.value)[-3000:]
    assert f"teon_k={teon_k} forms no TEON stack" in lines[0] and "teon_per_layer_fallback=True" in lines[0]
    stacks = run_ranks(
        megatron_teon,
        tp * pp,
        tp=tp,
        pp=pp,
        teon_k=teon_k,
        timeout=120,
        options=dict(options, teon_per_layer_fallback=True),
    )
    assert stacks == [0] * (tp * pp)  # the explicit opt-in: per-layer Muon everywhere


def refused_on_one_rank(rank, world_size, options):
    model = TinyLlama(layers=4)
    teonspeed.TEON(model.named_parameters(), **(options if rank == 1 else {}))


@pytest.mark.parametrize(
    "options,message",
    [({"teon_k": 8}, "teon_k=8 forms no TEON stack"), ({"teon_kk": 2}, "unknown option(s) 'teon_kk'")],
    ids=["stage-dependent", "unknown-option"],
)
def test_a_refusal_on_one_rank_is_raised_by_every_rank_without_a_hang(options, message):
    with pytest.raises(RankError) as err:
        run_ranks(refused_on_one_rank, 2, options, timeout=60)
    lines = _errors(err)
    assert "timed out" not in str(err.value), str(err.value)[-3000:]
    assert len(lines) == 2 and len(set(lines)) == 1, str(err.value)[-3000:]
    assert message in lines[0]


def bad_gradient_on_one_rank(rank, world_size, bad_ranks):
    model = TinyLlama(layers=2, seed=1)
    opt = teonspeed.TEON(model.named_parameters(), parallel=ParallelContext(dp_group=dist.group.WORLD))
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    if rank in bad_ranks:
        model.layers[1].mlp.down_proj.weight.grad.data = torch.zeros(3, 3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        opt.step()
    finally:
        assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
        assert not any(opt.state[p] for p in model.parameters())


@pytest.mark.parametrize("bad_ranks", [(1,), (0, 1)], ids=["one-rank", "every-rank"])
def test_a_bad_gradient_is_refused_on_every_rank_without_a_hang(bad_ranks):
    with pytest.raises(RankError) as err:
        run_ranks(bad_gradient_on_one_rank, 2, bad_ranks, timeout=60)
    text = str(err.value)
    assert "timed out" not in text and "rank 0 raised" in text and "rank 1 raised" in text
    assert "'layers.1.mlp.down_proj.weight' has shape (3, 3)" in text  # named in each refusal
