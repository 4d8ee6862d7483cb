"""teonspeed.plan(params, kind) is the plan the optimizer runs, in every layout the step tests cover and
for every way of handing over the parameters: both call the one grouping builder
(teonspeed.param_groups.build_grouping), so shapes are the full matrices' and blocks are global under
TP, PP and EP alike, and a layout the optimizer refuses is refused by the plan too."""

import pytest

import megatron_models as mm
import teonspeed
from support.harness import RankError, run_ranks
from test_entry_paths import ENTRIES, entry_params

OPTIMIZERS = {"muon": teonspeed.Muon, "teon": teonspeed.TEON, "htmuon": teonspeed.HTMuon}


def compare_plans(rank, world_size, tp=1, pp=1, ep=1, moe=False, num_layers=4, plan_only=False):
    """Per optimizer and entry: (plan() == opt.plan, each planned group's layer type, stacked shape, global
    blocks and fused parts)."""
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep
    )
    extra = dict(num_moe_experts=4, moe_router_topk=2, moe_token_dispatcher_type="allgather") if moe else {}
    config = mm.tiny_config(num_layers=num_layers, tp=tp, pp=pp, expert_model_parallel_size=ep, **extra)
    model = mm.tiny_gpt(
        config, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage()
    )
    if plan_only:
        return str(teonspeed.plan(model, "teon"))
    out = {}
    for kind, cls in OPTIMIZERS.items():
        for entry in ENTRIES:
            planned = teonspeed.plan(entry_params(model, entry), kind)
            opt = cls(entry_params(model, entry))
            ran = opt.plan
            out[kind, entry] = (
                planned.grouping == ran.grouping and planned.config == ran.config,
                [
                    (
                        g.members[0].layer.layer_type,
                        g.stacked_shape,
                        [m.layer.block for m in g.members],
                        [m.part for m in g.members],
                    )
                    for g in planned.groups
                ],
            )
            del opt
    return out


LAYOUTS = [
    pytest.param(dict(), 1, id="single"),
    pytest.param(dict(tp=2), 2, id="TP2"),
    pytest.param(dict(pp=2), 2, id="PP2"),
    pytest.param(dict(tp=2, pp=2), 4, id="TP2xPP2"),
    pytest.param(dict(tp=2), 4, id="TP2xDP2"),
    pytest.param(dict(ep=2, moe=True), 2, id="EP2"),
]


@pytest.mark.parametrize("layout,world_size", LAYOUTS)
def test_plan_equals_the_optimizers_plan(layout, world_size):
    single = run_ranks(compare_plans, 1, moe=layout.get("moe", False), timeout=180)[0]
    for result in run_ranks(compare_plans, world_size, timeout=180, **layout):
        for key, (same, groups) in result.items():
            assert same, key
            # what each rank plans is its part of the single-process plan: full shapes, global blocks
            assert set(map(repr, groups)) <= set(map(repr, single[key][1])), key


def test_the_plan_refuses_the_layout_the_optimizer_refuses():
    with pytest.raises(RankError, match="another pipeline stage(.|\n)*teon_k"):
        run_ranks(compare_plans, 2, pp=2, num_layers=6, plan_only=True, timeout=120)
