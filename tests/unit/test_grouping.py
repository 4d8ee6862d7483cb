"""Name rules, routing, TEON group formation, and the fused-weight layouts."""

import pytest
import torch

import teonspeed
from teonspeed.fused import LAYOUT_ATTR, fuse, gated_mlp_layout, mla_kv_up_layout, qkv_layout, split
from teonspeed.grouping import LayerRef, build_groups, layer_ref


@pytest.mark.parametrize(
    "name,expected",
    [
        ("decoder.layers.3.self_attention.linear_qkv.weight", LayerRef("qkv", 3)),
        ("decoder.layers.3.self_attention.linear_proj.weight", LayerRef("attn_out", 3)),
        ("decoder.layers.0.mlp.linear_fc1.weight", LayerRef("fc1", 0)),
        ("decoder.layers.0.mlp.linear_fc2.weight", LayerRef("fc2", 0)),
        ("decoder.layers.5.mlp.experts.local_experts.7.linear_fc1.weight", LayerRef("fc1", 5, 7)),
        ("decoder.layers.5.mlp.experts.linear_fc2.weight3", LayerRef("fc2", 5, 3)),
        ("decoder.layers.5.mlp.shared_experts.linear_fc1.weight", LayerRef("fc1", 5)),
        ("decoder.layers.2.self_attention.linear_q_down_proj.weight", LayerRef("q_down", 2)),
        ("decoder.layers.2.self_attention.linear_q_up_proj.weight", LayerRef("q_up", 2)),
        ("decoder.layers.2.self_attention.linear_q_proj.weight", LayerRef("q", 2)),
        ("decoder.layers.2.self_attention.linear_kv_down_proj.weight", LayerRef("kv_down", 2)),
        ("decoder.layers.2.self_attention.linear_kv_up_proj.weight", LayerRef("kv_up", 2)),
        ("model.layers.11.self_attn.q_proj.weight", LayerRef("q", 11)),
        ("model.layers.11.self_attn.k_proj.weight", LayerRef("k", 11)),
        ("model.layers.11.self_attn.v_proj.weight", LayerRef("v", 11)),
        ("model.layers.11.self_attn.o_proj.weight", LayerRef("attn_out", 11)),
        ("model.layers.11.mlp.gate_proj.weight", LayerRef("gate", 11)),
        ("model.layers.11.mlp.up_proj.weight", LayerRef("up", 11)),
        ("model.layers.11.mlp.down_proj.weight", LayerRef("fc2", 11)),
        ("transformer.h.4.attn.c_attn.weight", LayerRef("other", 4)),
    ],
)
def test_layer_names(name, expected):
    assert layer_ref(name) == expected


@pytest.mark.parametrize(
    "name,shape",
    [
        ("embedding.word_embeddings.weight", (100, 8)),
        ("model.embed_tokens.weight", (100, 8)),
        ("output_layer.weight", (100, 8)),
        ("lm_head.weight", (100, 8)),
        ("decoder.layers.0.mlp.router.weight", (4, 8)),
        ("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", (8,)),
        ("decoder.layers.0.self_attention.linear_qkv.bias", (24,)),
    ],
)
def test_non_matrix_parameters_go_to_adamw(name, shape):
    result = build_groups([(name, torch.zeros(shape))])
    assert result.routing[0].route == "adamw"
    assert result.groups == []


def hf_names(num_layers, d=16, kv=8):
    named = []
    for i in range(num_layers):
        for proj, rows in (("q", d), ("k", kv), ("v", kv), ("o", d)):
            named.append((f"model.layers.{i}.self_attn.{proj}_proj.weight", torch.zeros(rows, d)))
    return named


def test_teon_pairs_same_type_of_consecutive_blocks():
    result = build_groups(hf_names(4), teon_k=2, teon_types=("q", "k", "v"))
    stacks = {tuple(m.name for m in g.members) for g in result.groups if g.is_teon}
    for t in ("q", "k", "v"):
        assert (
            f"model.layers.0.self_attn.{t}_proj.weight",
            f"model.layers.1.self_attn.{t}_proj.weight",
        ) in stacks
        assert (
            f"model.layers.2.self_attn.{t}_proj.weight",
            f"model.layers.3.self_attn.{t}_proj.weight",
        ) in stacks
    assert len(stacks) == 6
    singles = [g.members[0].layer.layer_type for g in result.groups if not g.is_teon]
    assert singles == ["attn_out"] * 4  # O projections keep per-layer Muon
    k_group = next(g for g in result.groups if g.is_teon and g.members[0].layer.layer_type == "k")
    assert k_group.stacked_shape == (8, 32)  # mode 1: concatenated along the input dim
    assert build_groups(hf_names(2), teon_k=2, teon_mode=2, teon_types=("k",)).groups[0].stacked_shape == (
        16,
        16,
    )


def test_leftover_block_falls_back_to_muon_and_is_reported():
    result = build_groups(hf_names(3), teon_k=2, teon_types=("q",))
    q_groups = [g for g in result.groups if g.members[0].layer.layer_type == "q"]
    assert [len(g.members) for g in q_groups] == [2, 1]
    assert any("layers.2.self_attn.q_proj" in n and "falls back to Muon" in n for n in result.notes)


def test_teon_group_with_mismatched_shapes_is_rejected():
    named = hf_names(2)
    named[4] = ("model.layers.1.self_attn.q_proj.weight", torch.zeros(12, 16))
    with pytest.raises(ValueError, match="different shapes.*teon_types"):
        build_groups(named, teon_k=2, teon_types=("q",))


def test_experts_stack_with_the_same_expert_of_the_next_block():
    named = [
        (f"decoder.layers.{b}.mlp.experts.local_experts.{e}.linear_fc2.weight", torch.zeros(8, 16))
        for b in range(2)
        for e in range(2)
    ]
    result = build_groups(named, teon_k=2, teon_types=("fc2",))
    assert sorted((g.members[0].layer.expert, [m.layer.block for m in g.members]) for g in result.groups) == [
        (0, [0, 1]),
        (1, [0, 1]),
    ]


def test_a_3d_grouped_gemm_weight_is_one_matrix_per_expert():
    result = build_groups([("decoder.layers.0.mlp.experts.weight", torch.zeros(4, 8, 16))])
    assert [m.expert_index for g in result.groups for m in g.members] == [0, 1, 2, 3]
    assert all(g.stacked_shape == (8, 16) for g in result.groups)


def test_user_grouping_rule_overrides_the_names():
    named = [("a.weight", torch.zeros(4, 4)), ("b.weight", torch.zeros(4, 4))]
    rule = {"a.weight": LayerRef("q", 0), "b.weight": LayerRef("q", 1)}.get
    result = build_groups(named, teon_k=2, teon_types=("q",), grouping_rule=rule)
    assert len(result.groups) == 1 and result.groups[0].is_teon


# -- fused layouts ---------------------------------------------------------------------------------


def megatron_qkv(q, k, v, num_groups):
    """Interleave as Megatron's linear_qkv: per query group its q heads, then its k and v head."""
    qs, ks, vs = q.chunk(num_groups), k.chunk(num_groups), v.chunk(num_groups)
    return torch.cat([torch.cat([qs[g], ks[g], vs[g]]) for g in range(num_groups)])


def test_qkv_split_recovers_q_k_v_with_gqa_and_fuse_is_its_inverse():
    heads, groups, head_dim, hidden = 8, 2, 3, 10
    q = torch.randn(heads * head_dim, hidden)
    k, v = torch.randn(groups * head_dim, hidden), torch.randn(groups * head_dim, hidden)
    fused = megatron_qkv(q, k, v, groups)
    layout = qkv_layout(heads, groups, head_dim)
    parts = split(fused, layout)
    assert torch.equal(parts["q"], q) and torch.equal(parts["k"], k) and torch.equal(parts["v"], v)
    assert torch.equal(fuse(parts, layout), fused)
    # A tensor-parallel shard holds whole query groups: splitting it gives that rank's rows of q, k and v.
    shard = fused.chunk(2)[1]
    assert torch.equal(split(shard, layout)["q"], q.chunk(2)[1])


def test_gated_mlp_and_mla_split():
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    parts = split(torch.cat([gate, up]), gated_mlp_layout())
    assert torch.equal(parts["gate"], gate) and torch.equal(parts["up"], up)
    k, v = torch.randn(2, 3, 5), torch.randn(2, 2, 5)  # 2 heads, qk_head_dim 3, v_head_dim 2
    fused = torch.cat([k, v], dim=1).reshape(10, 5)
    parts = split(fused, mla_kv_up_layout(3, 2))
    assert torch.equal(parts["k_up"], k.reshape(6, 5)) and torch.equal(parts["v_up"], v.reshape(4, 5))


def test_fused_qkv_parts_are_grouped_by_type():
    named = []
    for b in range(2):
        w = torch.zeros(8 * 2 + 2 * 2 * 2, 16)  # 8 heads of 2, 2 query groups
        setattr(w, LAYOUT_ATTR, qkv_layout(8, 2, 2))
        named.append((f"decoder.layers.{b}.self_attention.linear_qkv.weight", w))
    result = build_groups(named, teon_k=2, teon_types=("q", "k", "v"))
    shapes = {g.members[0].part: g.stacked_shape for g in result.groups}
    assert shapes == {"q": (16, 32), "k": (4, 32), "v": (4, 32)}
    assert not build_groups(named, split_fused=False, teon_k=2, teon_types=("q",)).groups[0].is_teon


def test_plan_prints_routing_and_groups():
    model = torch.nn.ModuleDict({"embed_tokens": torch.nn.Embedding(10, 16)})
    named = list(model.named_parameters()) + hf_names(2)
    for _, p in named:
        p.requires_grad_(True)
    text = str(teonspeed.plan(named, "teon"))
    assert "embed_tokens.weight" in text and "AdamW" in text
    assert (
        "TEON x2" in text
        and "model.layers.0.self_attn.q_proj.weight + model.layers.1.self_attn.q_proj.weight" in text
    )
