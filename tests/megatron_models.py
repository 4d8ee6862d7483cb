"""Tiny megatron-core models for tests, built the same way at any TP/PP size (CPU initialisation builds
the full weight and slices it, so every layout starts from the same numbers)."""

from __future__ import annotations

import torch

from teonspeed.patches import cpu_shims

cpu_shims.apply()

from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

VOCAB, SEQ = 64, 8


def tiny_config(num_layers=4, hidden=32, heads=4, groups=2, ffn=48, gated=True, tp=1, pp=1, **extra):
    return TransformerConfig(
        num_layers=num_layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=groups,
        ffn_hidden_size=ffn,
        gated_linear_unit=gated,
        activation_func=torch.nn.functional.silu if gated else torch.nn.functional.gelu,
        add_bias_linear=False,
        normalization="RMSNorm",
        params_dtype=torch.float32,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        pipeline_dtype=torch.float32,
        **cpu_shims.local_transformer_options(),
        **extra,
    )


def tiny_gpt(config=None, seed=1234, pre_process=True, post_process=True, **kwargs):
    cpu_shims.megatron_seed(seed)
    config = config or tiny_config(**kwargs)
    spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts, moe_grouped_gemm=False)
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=pre_process,
        post_process=post_process,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
    )


def batch(seed=0, batch_size=2):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch_size, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (batch_size, SEQ), generator=g)
    position_ids = torch.arange(SEQ).unsqueeze(0).expand(batch_size, SEQ)
    return tokens, position_ids, labels


def full_params_of_replica0(results, name_index=1, dp_index=2):
    """Global parameters from the ranks of data-parallel replica 0; each rank's result holds, at
    `name_index`, name -> (tensor, partition_dim or None, partition_stride, tp_rank)."""
    from teonspeed.parallel.shard_spec import assemble

    replica0 = [r[name_index] for r in results if r[dp_index] == 0]
    out = {}
    for name in replica0[0]:
        shards = sorted((p[name] for p in replica0), key=lambda s: s[3])
        dim, stride = shards[0][1], shards[0][2]
        out[name] = assemble([s[0] for s in shards], dim, stride) if dim is not None else shards[0][0]
    return out
