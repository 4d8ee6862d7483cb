"""Our fused-weight layouts against Megatron-core's own forward: the rows we call Q/K/V (and gate/up)
are the rows Megatron uses as Q/K/V (and gate/up)."""

import pytest
import torch

import teonspeed
from teonspeed.fused import LAYOUT_ATTR, split

import megatron_models as mm
from support import tolerance as tol


def assert_same_product(got, x, w):
    """got = x @ wᵀ computed by Megatron (its own blocking of the same sums): entrywise within
    tol.product_abs. A wrong row order would be off by the size of the entries themselves."""
    assert ((got - x @ w.T).abs() <= tol.product_abs(x, w.T)).all()


@pytest.fixture(scope="module")
def parallel_state():
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from support.harness import destroy_parallel_state, free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    ps.initialize_model_parallel(1, 1)
    yield ps
    # every group and its gloo threads: forked test ranks later in this process would hang on them
    destroy_parallel_state()


def test_qkv_split_matches_megatrons_query_key_value(parallel_state):
    model = mm.tiny_gpt(hidden=32, heads=4, groups=2)
    assert teonspeed.annotate_model(model) == 8  # 4 layers x (linear_qkv, gated linear_fc1)
    attention = model.decoder.layers[0].self_attention
    weight = attention.linear_qkv.weight
    hidden = torch.randn(5, 1, 32)
    query, key, value = attention.get_query_key_value_tensors(hidden)[:3]
    parts = split(weight.detach(), getattr(weight, LAYOUT_ATTR))
    assert_same_product(query.reshape(5, -1), hidden[:, 0], parts["q"])
    assert_same_product(key.reshape(5, -1), hidden[:, 0], parts["k"])
    assert_same_product(value.reshape(5, -1), hidden[:, 0], parts["v"])


def test_gated_fc1_split_matches_megatrons_swiglu(parallel_state):
    model = mm.tiny_gpt()
    teonspeed.annotate_model(model)
    mlp = model.decoder.layers[0].mlp
    x = torch.randn(3, 1, 32)
    parts = split(mlp.linear_fc1.weight.detach(), getattr(mlp.linear_fc1.weight, LAYOUT_ATTR))
    out, _ = mlp.linear_fc1(x)
    # Megatron's GLU: gate, up = chunk(fc1(x), 2); silu(gate) * up
    gate, up = out[:, 0].chunk(2, dim=-1)
    assert_same_product(gate, x[:, 0], parts["gate"])
    assert_same_product(up, x[:, 0], parts["up"])


def test_teon_plan_on_a_megatron_gpt(parallel_state):
    model = mm.tiny_gpt(num_layers=4)
    opt = teonspeed.TEON(model)
    stacks = {(g.members[0].part, tuple(m.layer.block for m in g.members)) for g in opt.plan.teon_groups}
    assert stacks == {(p, b) for p in "qkv" for b in ((0, 1), (2, 3))}
    adamw = {r.name for r in opt.plan.grouping.routing if r.route == "adamw"}
    assert {
        "embedding.word_embeddings.weight",
        "output_layer.weight",
        "decoder.final_layernorm.weight",
    } <= adamw
