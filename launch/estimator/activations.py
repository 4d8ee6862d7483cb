"""Activation memory per layer and micro-batch (Korthikanti et al. 2022, "Reducing Activation
Recomputation"), for the actual widths (GQA, SwiGLU, MoE top-k, MLA), and what a 1F1B pipeline stage
keeps in flight; the training setup (`Training`) the whole estimate is made for."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from launch.estimator.params import ModelSpec, Parallel


@dataclass
class Training:
    micro_batch: int = 1
    seq_length: Optional[int] = None  # default: the model's
    num_microbatches: Optional[int] = None  # default: enough to fill the pipeline
    optimizer: str = "adamw"  # launch.rules.OPTIMIZERS
    zero_stage: int = 1  # 0 | 1 (Megatron distributed optimizer) | 2 | 3
    recompute: str = "none"  # none | selective | full
    flash_attention: bool = False
    teon_k: Optional[int] = None  # default: the optimizer's (launch.rules.teon_k)
    weight_bytes: int = 2  # bf16
    grad_bytes: int = 4  # fp32 main grads
    master_bytes: int = 4  # fp32 master weights (0 for pure fp32 training: use weight_bytes 4)
    state_bytes: int = 4  # fp32 optimizer states
    activation_bytes: int = 2  # bf16 activations (4: an fp32 run)
    overhead_gib: float = 1.0  # CUDA context, allocator, libraries


def layer_activation_bytes(
    spec: ModelSpec, layer: int, s: int, b: int, par: Parallel, flash: bool = False
) -> float:
    """Bytes one layer keeps for backward, per micro-batch (16-bit activations, 1-byte dropout masks).
    For a GPT-2 layer (MHA, 4h GELU MLP, dropout on) it is exactly sbh(34 + 5as/h)/t with sequence
    parallelism and sbh(10 + 24/t + 5as/(ht)) without."""
    h, a, t = spec.hidden_size, spec.num_attention_heads, par.tp
    sb = s * b
    sp = par.sp
    rep = 1 / t if sp else 1.0  # tensors TP does not split unless the sequence is split (SP)
    hdrop = 1 if spec.hidden_dropout > 0 else 0
    # Attention block: norm input, projection input, Q and K (scores), V (context), out-proj input.
    if spec.multi_latent_attention:
        q_w = k_w = a * (spec.qk_head_dim + spec.qk_pos_emb_head_dim)
        v_w = o_w = a * spec.v_head_dim
        latent = (spec.q_lora_rank or 0) + spec.kv_lora_rank + spec.qk_pos_emb_head_dim
        # the up-projections' inputs (the latents; replicated like the down-projections in TE layouts)
        attn = (2 * h + 2 * h) * rep + 2 * latent + (2 * q_w + 2 * k_w + 2 * v_w + 2 * o_w) / t
    else:
        q_w = a * spec.head_dim
        kv_w = spec.groups * spec.head_dim
        attn = (2 * h + 2 * h) * rep + (2 * q_w + 2 * kv_w + 2 * kv_w + 2 * q_w) / t
    attn += hdrop * h * rep
    scores = 0.0
    if not flash:
        adrop = 3 if spec.attention_dropout > 0 else 0  # mask (1) + dropped-out probabilities (2)
        scores = (2 + adrop) * a * s * s * b / t  # softmax output (2 bytes)
    # MLP block: norm input, fc1 input, fc1 output (the activation's input), fc2 input.
    up = 2 if spec.gated_linear_unit else 1
    mlp = (2 * h + 2 * h) * rep + hdrop * h * rep
    if spec.is_moe_layer(layer):
        k, f, et = spec.moe_router_topk, spec.moe_ffn, par.expert_tp
        mlp += 4 * spec.num_moe_experts * rep  # fp32 router logits
        mlp += k * (
            2 * h * rep + (2 * up * f + 2 * f) / et + 2 * h * rep
        )  # dispatched in, fc1 out, act out, fc2 out
        if spec.moe_shared_expert_intermediate_size:
            fs = spec.moe_shared_expert_intermediate_size
            mlp += (2 * up * fs + 2 * fs) / t
    else:
        f = spec.ffn_hidden_size
        mlp += (2 * up * f + 2 * f) / t
    return sb * (attn + mlp) + scores


def activation_bytes(spec: ModelSpec, par: Parallel, train: Training, stage: int) -> Dict[str, float]:
    s, b = train.seq_length or spec.seq_length, train.micro_batch
    per = spec.num_layers // par.pp
    layers = range(stage * per, (stage + 1) * per)
    flash = train.flash_attention or train.recompute == "selective"
    in_flight = par.pp - stage
    if train.num_microbatches:
        in_flight = min(in_flight, train.num_microbatches)
    full = [layer_activation_bytes(spec, i, s, b, par, flash) for i in layers]
    if train.recompute == "full":
        kept = 2 * s * b * spec.hidden_size / (par.tp if par.sp else 1)  # each layer's input
        acts = kept * len(full) * in_flight + max(full)  # + one layer recomputed at a time
    else:
        acts = sum(full) * in_flight
    logits = 0.0
    if stage == par.pp - 1:
        logits = 6 * s * b * spec.padded_vocab(par.tp) / par.tp  # bf16 logits + fp32 copy for the loss
        logits += 4 * s * b * spec.hidden_size / (par.tp if par.sp else 1)  # final norm and head inputs
    scale = train.activation_bytes / 2  # the per-layer terms count 16-bit activations
    return {"activations": acts * scale, "logits": logits, "in_flight": in_flight}
