"""What the ranks sharing a step must agree on, and who they are.

- a TEON group mixing bf16 and fp32 matrices is exchanged and computed in the promoted dtype and written
  back in each parameter's own dtype: the parallel step equals the single-process step;
- ranks whose plans differ (a gradient present on one rank, absent on another) fail loudly, every one of
  them, naming the parameter, instead of corrupting the weights;
- the non-finite skip is decided by exactly the ranks that share the step: another model's ranks in the
  same job neither skip with it nor are waited for;
- parallel_mode="distributed" in a world of one rank runs the distributed runner (one GPU with an NCCL
  group exercises the exchange) and equals the local step.
"""

import pytest
import torch
import torch.distributed as dist

import teonspeed
from teonspeed.parallel.context import ParallelContext
from support.harness import RankError, run_ranks
from tiny_models import TinyLlama

STEPS = 3


def mixed_model():
    """TinyLlama with layer 0's attention and MLP in bf16 next to fp32 layers (one TEON group mixes them)."""
    model = TinyLlama(layers=2, seed=3)
    for name, p in model.named_parameters():
        if ".0." in name and p.ndim == 2:
            p.data = p.data.to(torch.bfloat16)
    return model


def grads(model, step, rank=0):
    g = torch.Generator().manual_seed(100 * step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def train(model, parallel=None, steps=STEPS, **options):
    opt = teonspeed.TEON(model.named_parameters(), parallel=parallel, lr=0.02, adamw_lr=1e-3, **options)
    for step in range(steps):
        grads(model, step)
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, type(opt.runner).__name__


def mixed_dp(rank, world_size, mode):
    return train(mixed_model(), ParallelContext(dp_group=dist.group.WORLD), parallel_mode=mode)[0]


@pytest.mark.parametrize("mode", ["distributed", "replicated"])
def test_a_teon_group_mixing_bf16_and_fp32_equals_the_single_process_step(mode):
    ref, _ = train(mixed_model())
    assert {p.dtype for p in ref.values()} == {torch.bfloat16, torch.float32}
    for got in run_ranks(mixed_dp, 2, mode, timeout=60):
        for name in ref:
            assert got[name].dtype == ref[name].dtype, name
            torch.testing.assert_close(got[name], ref[name], rtol=0, atol=0, msg=name)


def missing_grad_on_one_rank(rank, world_size):
    model = TinyLlama(layers=2, seed=1)
    opt = teonspeed.TEON(model.named_parameters(), parallel=ParallelContext(dp_group=dist.group.WORLD))
    grads(model, 0)
    if rank == 1:
        model.layers[1].mlp.down_proj.weight.grad = None
    before = model.layers[0].self_attn.q_proj.weight.detach().clone()
    try:
        opt.step()
    finally:
        assert torch.equal(before, model.layers[0].self_attn.q_proj.weight)  # nothing changed


def test_ranks_that_disagree_on_the_plan_all_fail_naming_the_parameter():
    with pytest.raises(RankError) as err:
        run_ranks(missing_grad_on_one_rank, 2, timeout=60)
    text = str(err.value)
    for rank in (0, 1):
        assert f"rank {rank} raised" in text
    assert text.count("disagree on its plan") == 2
    assert "layers.1.mlp.down_proj.weight" in text and "gradient on some ranks" in text


def two_models(rank, world_size):
    """Ranks {0, 1} train model A, ranks {2, 3} model B, in one job. B's rank 2 gets a NaN gradient:
    B skips its step; A steps, twice, while B steps once (A must not wait for B's ranks)."""
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    mine = groups[rank // 2]
    model = TinyLlama(layers=2, seed=rank // 2)
    opt = teonspeed.Muon(model.named_parameters(), parallel=ParallelContext(dp_group=mine))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(2 if rank < 2 else 1):
        grads(model, step)
        if rank == 2:
            model.layers[0].mlp.gate_proj.weight.grad[0, 0] = float("nan")
        with pytest.warns(RuntimeWarning, match="step skipped") if rank >= 2 else _nothing():
            opt.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    dist.barrier(group=mine)
    return len(changed)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_the_skip_is_decided_by_the_ranks_that_share_the_step_only():
    changed = run_ranks(two_models, 4, timeout=60)
    assert changed[0] > 0 and changed[1] > 0  # model A stepped
    assert changed[2] == changed[3] == 0  # model B skipped on both of its ranks


def world_of_one(rank, world_size):
    forced = train(TinyLlama(layers=2, seed=5), parallel_mode="distributed")
    plain = train(TinyLlama(layers=2, seed=5))
    return forced, plain


def test_distributed_mode_forced_in_a_world_of_one_runs_the_exchange_and_equals_local():
    (forced, runner), (plain, plain_runner) = run_ranks(world_of_one, 1, timeout=60)[0]
    assert runner == "DistributedRunner" and plain_runner == "LocalRunner"
    for name in plain:
        torch.testing.assert_close(forced[name], plain[name], rtol=0, atol=0, msg=name)


def independent_ranks(rank, world_size):
    """No parallel context in a 2-rank job (each rank its own optimizer, e.g. under DDP): each rank is its
    own step group, with no collective and no communicator created for it."""
    model = TinyLlama(layers=2, seed=rank)
    opt = teonspeed.Muon(model.named_parameters())
    grads(model, 0)
    if rank == 1:
        model.layers[0].mlp.gate_proj.weight.grad[0, 0] = float("inf")
    before = model.layers[1].mlp.down_proj.weight.detach().clone()
    with pytest.warns(RuntimeWarning, match="step skipped") if rank == 1 else _nothing():
        opt.step()
    sg = opt.runner.step_group
    return sg.group is None, sg.size, not torch.equal(before, model.layers[1].mlp.down_proj.weight)


def test_ranks_without_a_shared_step_decide_alone():
    assert run_ranks(independent_ranks, 2, timeout=60) == [(True, 1, True), (True, 1, False)]
