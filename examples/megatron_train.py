"""A Megatron-core training script with teonspeed: `teonspeed.megatron.get_megatron_optimizer` in place
of Megatron's own, from a `TeonOptimizerConfig` (Megatron's OptimizerConfig plus teonspeed's options).

    torchrun --nproc_per_node=8 examples/megatron_train.py --tp 2      # GPUs: TP 2 x DP 4
    torchrun --nproc_per_node=2 examples/megatron_train.py --tp 2      # a CPU-only machine: TP 2, gloo

The model is a tiny LLaMA-style megatron-core GPTModel (RMSNorm, SwiGLU, RoPE, grouped-query attention),
wrapped in Megatron's DistributedDataParallel; the loop is Megatron's: zero the gradient buffers, forward
and backward, `finish_grad_sync()` (the data-parallel reduction), `optimizer.step()`. Under tensor
parallelism every weight is sharded over the TP ranks and teonspeed orthogonalizes the whole matrix (and
TEON's whole stack of Q, K or V of two layers), so the update equals the unsharded model's.
On a CPU-only machine: gloo instead of NCCL, teonspeed's CPU shims (Megatron asks CUDA for its device and
RNG tracker), and no gradient clipping (Megatron's clip_grad checks for CUDA tensors).
The data: sequences in which each token is the previous one plus a fixed step (mod the vocabulary).
"""

import argparse
import os

import torch
import torch.distributed as dist

CUDA = torch.cuda.is_available()
if not CUDA:
    from teonspeed.patches import cpu_shims

    cpu_shims.apply()

from megatron.core import parallel_state  # noqa: E402
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from teonspeed.megatron import TeonOptimizerConfig, get_megatron_optimizer  # noqa: E402

VOCAB, SEQ, MICRO_BATCH = 128, 16, 8


def build_model(tp: int, seed: int = 0) -> GPTModel:
    config = TransformerConfig(
        num_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=128,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        normalization="RMSNorm",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        params_dtype=torch.float32,
        use_cpu_initialization=True,  # the same weights at any TP size
        # no fused kernels: they need Transformer Engine or apex
        gradient_accumulation_fusion=False,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
    )
    if CUDA:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
    else:
        cpu_shims.megatron_seed(seed)
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
    )
    return model.cuda() if CUDA else model


def batch(step: int, dp_rank: int, device):
    """The same micro-batch on every TP rank of a data-parallel replica, another one per replica."""
    g = torch.Generator().manual_seed(1000 * step + dp_rank)
    start = torch.randint(0, VOCAB, (MICRO_BATCH, 1), generator=g)
    stride = torch.randint(1, 4, (MICRO_BATCH, 1), generator=g)
    tokens = ((start + stride * torch.arange(SEQ + 1)) % VOCAB).to(device)
    positions = torch.arange(SEQ, device=device).expand(MICRO_BATCH, SEQ)
    return tokens[:, :-1], positions, tokens[:, 1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default: 1)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps (default: 30)")
    p.add_argument("--optimizer", default="teon", choices=["teon", "muon", "htmuon"], help="(default: teon)")
    args = p.parse_args()
    if CUDA:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if CUDA else "gloo")  # torchrun's environment gives rank and world
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tp)
    try:
        model = build_model(args.tp)
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True)
        ddp = DistributedDataParallel(model.config, ddp_config, model)
        config = TeonOptimizerConfig(
            optimizer=args.optimizer,
            lr=0.02,
            adamw_lr=3e-3,
            weight_decay=0.01,
            muon_use_nesterov=True,
            clip_grad=1.0 if CUDA else 0.0,
        )
        optimizer = get_megatron_optimizer(config, [ddp])
        dp_rank = parallel_state.get_data_parallel_rank()
        device = next(model.parameters()).device
        losses = []
        for step in range(args.steps):
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            tokens, positions, labels = batch(step, dp_rank, device)
            loss = ddp(tokens, positions, None, labels=labels).mean()  # per-token cross-entropy, averaged
            loss.backward()
            ddp.finish_grad_sync()  # all-reduce the gradients over data parallelism
            success, grad_norm, _ = optimizer.step()
            losses.append(loss.item())
        if dist.get_rank() == 0:
            print(
                f"{args.optimizer} through get_megatron_optimizer on TP={args.tp} x "
                f"DP={parallel_state.get_data_parallel_world_size()}: "
                f"loss {losses[0]:.3f} -> {losses[-1]:.3f} "
                f"after {args.steps} steps"
            )
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
