"""Every way of handing a megatron-core model's parameters to the optimizer (the module, its
named_parameters(), a list of param-group dicts of (name, parameter) pairs or of bare parameters) discovers
the same parallel layout: after a few steps at TP=2 (and TP=2 x PP=2) the weights equal the single-process
run on the full model."""

import pytest
import torch

import megatron_models as mm
import teonspeed
from teonspeed.parallel.shard_spec import assemble, megatron_shard_specs
from support import tolerance as tol
from support.harness import run_ranks
from support.synthetic import global_name, local_tensor

ENTRIES = ("module", "named_parameters", "param_groups", "plain_param_groups")
STEPS = 3


def entry_params(model, entry):
    if entry == "module":
        return model
    named = list(model.named_parameters())
    if entry == "named_parameters":
        return model.named_parameters()
    # the usual decay / no-decay split, with (name, parameter) pairs or with bare parameters (as torch users
    # write it); adamw_weight_decay=0 is the default, so the split changes nothing
    pair = (lambda n, p: (n, p)) if entry == "param_groups" else (lambda n, p: p)
    return [
        {"params": [pair(n, p) for n, p in named if p.ndim >= 2]},
        {"params": [pair(n, p) for n, p in named if p.ndim < 2], "adamw_weight_decay": 0.0},
    ]


def train_each_entry(rank, world_size, tp=1, pp=1):
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    out = {}
    for entry in ENTRIES:
        config = mm.tiny_config(tp=tp, pp=pp)
        model = mm.tiny_gpt(
            config, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage()
        )
        specs = megatron_shard_specs(model)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(local_tensor(name, p, specs[name], tp_rank, tp_size, 0))
        opt = teonspeed.TEON(entry_params(model, entry), lr=0.02, adamw_lr=1e-3, weight_decay=0.01)
        budget = tol.RoundingBudget(opt)
        for step in range(1, STEPS + 1):
            for name, p in model.named_parameters():
                p.grad = local_tensor(name, p, specs[name], tp_rank, tp_size, step)
            opt.step()
        out[entry] = {
            global_name(n, specs[n]): (
                p.detach().clone(),
                specs[n].tp_partition_dim,
                specs[n].tp_partition_stride,
                tp_rank,
            )
            for n, p in model.named_parameters()
        }
        # the ranks that share the step's skip decision and plan check: the pipeline stages included
        out["step group", entry] = opt.runner.step_group.size if hasattr(opt.runner, "step_group") else 1
        out["budget", entry] = budget.weights(0.02)
        del opt, model
    return out, ps.get_data_parallel_rank()


def full_model(results, entry):
    by_name = {}
    for params, dp_rank in results:
        if dp_rank == 0:
            for name, value in params[entry].items():
                by_name.setdefault(name, []).append(value)
    out = {}
    for name, shards in by_name.items():
        shards.sort(key=lambda s: s[3])
        dim, stride = shards[0][1], shards[0][2]
        out[name] = assemble([s[0] for s in shards], dim, stride) if dim is not None else shards[0][0]
    return out


@pytest.fixture(scope="module")
def reference():
    """The single process's model, and the rounding budget of its steps (tol.RoundingBudget)."""
    results = run_ranks(train_each_entry, 1, timeout=120)
    return full_model(results, "module"), results[0][0]["budget", "module"]


@pytest.mark.parametrize(
    "layout,world_size", [(dict(tp=2), 2), (dict(tp=2, pp=2), 4)], ids=["TP2", "TP2xPP2"]
)
def test_every_entry_gets_the_layout_of_the_module(reference, layout, world_size):
    results = run_ranks(train_each_entry, world_size, timeout=180, **layout)
    for params, _ in results:
        assert [params["step group", entry] for entry in ENTRIES] == [world_size] * len(ENTRIES)
    full, budget = reference
    for entry in ENTRIES:
        got = full_model(results, entry)
        assert set(got) == set(full)
        # the same synthetic gradients: only the iterations' rounding (another batch composition on an
        # owner) may differ, within the single process's rounding budget
        total = sum(float((got[name] - ref).double().norm()) ** 2 for name, ref in full.items()) ** 0.5
        assert total <= budget, f"{entry}: ‖Δ‖_F = {total:.2e} > {budget:.2e}"


def test_named_parameters_of_a_model_that_no_longer_exists_are_refused():
    """Parameters carrying Megatron's TP attributes whose module cannot be found: a clear error, not a
    guess."""
    p = torch.nn.Parameter(torch.randn(8, 4))
    p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, 0, 1
    with pytest.raises(
        ValueError, match="'decoder.layers.0.mlp.linear_fc2.weight' carries Megatron's tensor-par"
    ):
        teonspeed.TEON([("decoder.layers.0.mlp.linear_fc2.weight", p)])
