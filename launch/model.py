"""The megatron-core GPTModel of a run (this rank's part of it), from args.transformer / args.gpt."""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

from teonspeed.patches import cpu_shims

ACTIVATIONS = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu}


class SDPACoreAttention(torch.nn.Module):
    """Causal attention by torch's scaled_dot_product_attention, for MLA on CPU: megatron-core 0.16.1's
    local DotProductAttention takes no k_channels/v_channels (MLA's query/key and value head sizes differ)."""

    def __init__(
        self,
        config,
        layer_number,
        attn_mask_type,
        attention_type,
        attention_dropout=None,
        softmax_scale=None,
        k_channels=None,
        v_channels=None,
        cp_comm_type=None,
        pg_collection=None,
    ):
        super().__init__()
        self.softmax_scale = softmax_scale
        self.attn_mask_type = attn_mask_type  # causal for GPT (read by teonspeed.qk_clip's capture)

    def forward(
        self,
        query,
        key,
        value,
        attention_mask=None,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [s, b, n, d] -> [b, n, s, d]
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.softmax_scale
        )
        return out.permute(2, 0, 1, 3).reshape(out.size(2), out.size(0), -1)  # [s, b, n * d_v]


def build_model(args, vocab_size: int) -> GPTModel:
    """By default LLaMA-style: RMSNorm, SwiGLU, RoPE, no biases, grouped-query attention, untied output
    layer; with --model-config whatever configs/models/<name>.yaml describes (GPT-2, MoE, MLA, ...).
    Under pipeline parallelism this rank builds its stage's layers (embedding on the first stage, final
    norm and output layer on the last)."""
    fields = dict(args.transformer)
    config_class = MLATransformerConfig if fields.pop("multi_latent_attention", False) else TransformerConfig
    extra = {"expert_model_parallel_size": args.ep} if fields.get("num_moe_experts") else {}
    config = config_class(
        **fields,
        **extra,
        activation_func=ACTIVATIONS[args.gpt["activation"]],
        tensor_model_parallel_size=args.tp,
        pipeline_model_parallel_size=args.pp,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        # Full weights built on the CPU and sliced (the same init at any TP); no fused kernels (no TE/apex).
        **cpu_shims.local_transformer_options(),
    )
    if args.device == "cuda":
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(args.seed)
    else:
        cpu_shims.megatron_seed(args.seed)  # model_parallel_cuda_manual_seed without CUDA
    # One spec per layer: dense, MoE (moe_layer_freq) or MLA, all with megatron-core's local modules.
    spec = get_gpt_decoder_block_spec(
        config, use_transformer_engine=False, normalization=config.normalization
    )
    if config.multi_latent_attention:
        import megatron.core.transformer.multi_latent_attention as mla

        mla.HAVE_TE = False  # TE is absent; its stand-in would make MLA's isinstance(.., TELinear) fail
        for layer in spec.layer_specs:
            layer.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=args.seq,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        position_embedding_type=args.gpt["position_embedding_type"],
        share_embeddings_and_output_weights=args.gpt["share_embeddings_and_output_weights"],
        rotary_base=args.gpt.get("rotary_base", 10000),
    )
    return model.cuda() if args.device == "cuda" else model
