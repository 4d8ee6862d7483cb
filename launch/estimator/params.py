"""The parameters of a megatron-core GPT, tensor by tensor, as megatron-core builds and splits them:
column/row-parallel weights and the (padded) vocabulary over TP, norms, position embeddings, routers and
MLA down-projections replicated, experts over EP and expert-TP, layers over PP; and each tensor's side
in teonspeed's routing (orthogonalized or AdamW)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from launch import rules
from launch.rules import VOCAB_MULTIPLE, moe_layers, padded_vocab


@dataclass
class ModelSpec:
    """The shape facts the estimate needs, read from a model config (megatron field names)."""

    name: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    vocab_size: int
    seq_length: int
    num_query_groups: Optional[int] = None
    kv_channels: Optional[int] = None
    gated_linear_unit: bool = False
    add_bias_linear: bool = True
    add_qkv_bias: bool = False
    normalization: str = "LayerNorm"
    qk_layernorm: bool = False
    position_embedding_type: str = "learned_absolute"
    share_embeddings_and_output_weights: bool = True
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    make_vocab_size_divisible_by: int = VOCAB_MULTIPLE
    # MoE
    num_moe_experts: Optional[int] = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: Optional[int] = None
    moe_shared_expert_intermediate_size: Optional[int] = None
    moe_layer_freq: Any = 1
    # MLA
    multi_latent_attention: bool = False
    q_lora_rank: Optional[int] = None
    kv_lora_rank: int = 512
    qk_head_dim: int = 128
    qk_pos_emb_head_dim: int = 64
    v_head_dim: int = 128

    @classmethod
    def from_config(cls, cfg: dict, **overrides) -> "ModelSpec":
        names = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in {**cfg["model"], **cfg["transformer"]}.items() if k in names}
        values.update(overrides)
        values.setdefault("name", cfg.get("name", "model"))
        return cls(**values)

    @property
    def groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def moe_ffn(self) -> int:
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    def is_moe_layer(self, layer: int) -> bool:
        return moe_layers(self.num_layers, self.num_moe_experts, self.moe_layer_freq)[layer]

    def padded_vocab(self, tp: int) -> int:
        return padded_vocab(self.vocab_size, tp, self.make_vocab_size_divisible_by)


@dataclass
class Tensor:
    """One parameter tensor (or several identical ones: `copies`) of the full model."""

    name: str
    shape: Tuple[int, ...]
    split: int = 1  # how many ranks share it (TP, ETP, or 1 = replicated)
    where: str = "layer"  # embedding | layer | final | output
    layer: Optional[int] = None
    expert: bool = False
    route: str = "ortho"  # teonspeed: ortho (Muon/TEON) or adamw
    copies: int = 1  # identical tensors (local experts of a layer): count = copies * numel
    parts: Tuple[Tuple[str, Tuple[int, int]], ...] = ()  # orthogonalized parts of a fused matrix

    @property
    def numel(self) -> int:
        return math.prod(self.shape) * self.copies

    def per_rank(self) -> int:
        return math.prod(self.shape) * self.copies // self.split


@dataclass
class Parallel:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    etp: Optional[int] = None  # expert tensor parallel (Megatron's default: = tp)
    sequence_parallel: Optional[bool] = None  # default: on when tp > 1

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def expert_tp(self) -> int:
        return self.etp or self.tp

    @property
    def expert_dp(self) -> int:
        return self.tp * self.dp // (self.expert_tp * self.ep)

    @property
    def sp(self) -> bool:
        return self.tp > 1 if self.sequence_parallel is None else self.sequence_parallel


def check_layout(spec: ModelSpec, par: Parallel) -> None:
    """Megatron's divisibility rules for this layout (it refuses to build otherwise): launch/rules.py's,
    the launcher's own check. Raises rules.LayoutError (a ValueError)."""
    fields = {**dataclasses.asdict(spec), "expert_tensor_parallel_size": par.etp}
    rules.check_layout(fields, tp=par.tp, pp=par.pp, ep=par.ep, dp=par.dp)


def _attention(spec: ModelSpec, i: int, tp: int) -> List[Tensor]:
    h, bias = spec.hidden_size, spec.add_bias_linear
    p = f"decoder.layers.{i}.self_attention."
    out: List[Tensor] = []
    if spec.multi_latent_attention:
        a, qk, pos, v = spec.num_attention_heads, spec.qk_head_dim, spec.qk_pos_emb_head_dim, spec.v_head_dim
        if spec.q_lora_rank:
            out.append(Tensor(p + "linear_q_down_proj.weight", (spec.q_lora_rank, h), layer=i))
            if spec.qk_layernorm:
                out.append(Tensor(p + "q_layernorm.weight", (spec.q_lora_rank,), layer=i, route="adamw"))
            out.append(
                Tensor(
                    p + "linear_q_up_proj.weight",
                    (a * (qk + pos), spec.q_lora_rank),
                    tp,
                    layer=i,
                    parts=(("q_up", (a * (qk + pos), spec.q_lora_rank)),),
                )
            )
        else:
            out.append(
                Tensor(
                    p + "linear_q_proj.weight",
                    (a * (qk + pos), h),
                    tp,
                    layer=i,
                    parts=(("q", (a * (qk + pos), h)),),
                )
            )
        out.append(Tensor(p + "linear_kv_down_proj.weight", (spec.kv_lora_rank + pos, h), layer=i))
        if spec.qk_layernorm:
            out.append(Tensor(p + "kv_layernorm.weight", (spec.kv_lora_rank,), layer=i, route="adamw"))
        out.append(
            Tensor(
                p + "linear_kv_up_proj.weight",
                (a * (qk + v), spec.kv_lora_rank),
                tp,
                layer=i,
                parts=(("k_up", (a * qk, spec.kv_lora_rank)), ("v_up", (a * v, spec.kv_lora_rank))),
            )
        )
        out.append(Tensor(p + "linear_proj.weight", (h, a * v), tp, layer=i))
    else:
        d, q, kv = spec.head_dim, spec.num_attention_heads * spec.head_dim, spec.groups * spec.head_dim
        out.append(
            Tensor(
                p + "linear_qkv.weight",
                (q + 2 * kv, h),
                tp,
                layer=i,
                parts=(("q", (q, h)), ("k", (kv, h)), ("v", (kv, h))),
            )
        )
        if bias or spec.add_qkv_bias:
            out.append(Tensor(p + "linear_qkv.bias", (q + 2 * kv,), tp, layer=i, route="adamw"))
        if spec.qk_layernorm:
            out += [Tensor(p + f"{n}_layernorm.weight", (d,), layer=i, route="adamw") for n in ("q", "k")]
        out.append(Tensor(p + "linear_proj.weight", (h, q), tp, layer=i))
    if bias:
        out.append(Tensor(p + "linear_proj.bias", (h,), layer=i, route="adamw"))
    return out


def _mlp(
    spec: ModelSpec, prefix: str, ffn: int, split: int, layer: int, expert: bool = False, copies: int = 1
) -> List[Tensor]:
    h, up = spec.hidden_size, (2 if spec.gated_linear_unit else 1) * ffn
    parts = (("gate", (ffn, h)), ("up", (ffn, h))) if spec.gated_linear_unit else (("fc1", (ffn, h)),)
    out = [
        Tensor(
            prefix + "linear_fc1.weight",
            (up, h),
            split,
            layer=layer,
            expert=expert,
            copies=copies,
            parts=parts,
        )
    ]
    if spec.add_bias_linear:
        out.append(
            Tensor(
                prefix + "linear_fc1.bias",
                (up,),
                split,
                layer=layer,
                expert=expert,
                copies=copies,
                route="adamw",
            )
        )
    out.append(
        Tensor(prefix + "linear_fc2.weight", (h, ffn), split, layer=layer, expert=expert, copies=copies)
    )
    if spec.add_bias_linear:
        out.append(
            Tensor(
                prefix + "linear_fc2.bias", (h,), 1, layer=layer, expert=expert, copies=copies, route="adamw"
            )
        )
    return out


def _norm(spec: ModelSpec, name: str, where: str = "layer", layer: Optional[int] = None) -> List[Tensor]:
    out = [Tensor(name + ".weight", (spec.hidden_size,), where=where, layer=layer, route="adamw")]
    if spec.normalization == "LayerNorm":
        out.append(Tensor(name + ".bias", (spec.hidden_size,), where=where, layer=layer, route="adamw"))
    return out


def parameter_tensors(spec: ModelSpec, par: Parallel = Parallel()) -> List[Tensor]:
    """Every parameter tensor of the full model, in megatron-core's naming, with its split. Experts of
    one layer are one entry with copies = experts held by one EP rank x EP."""
    tp, h = par.tp, spec.hidden_size
    vocab = spec.padded_vocab(tp)
    out = [Tensor("embedding.word_embeddings.weight", (vocab, h), tp, where="embedding", route="adamw")]
    if spec.position_embedding_type == "learned_absolute":
        out.append(
            Tensor(
                "embedding.position_embeddings.weight", (spec.seq_length, h), where="embedding", route="adamw"
            )
        )
    for i in range(spec.num_layers):
        out += _norm(spec, f"decoder.layers.{i}.input_layernorm", layer=i)
        out += _attention(spec, i, tp)
        out += _norm(spec, f"decoder.layers.{i}.pre_mlp_layernorm", layer=i)
        mlp = f"decoder.layers.{i}.mlp."
        if spec.is_moe_layer(i):
            e = spec.num_moe_experts
            out.append(Tensor(mlp + "router.weight", (e, h), layer=i, route="adamw"))
            out += _mlp(
                spec, mlp + "experts.local_experts.*.", spec.moe_ffn, par.expert_tp, i, expert=True, copies=e
            )
            if spec.moe_shared_expert_intermediate_size:
                out += _mlp(spec, mlp + "shared_experts.", spec.moe_shared_expert_intermediate_size, tp, i)
        else:
            out += _mlp(spec, mlp, spec.ffn_hidden_size, tp, i)
    out += _norm(spec, "decoder.final_layernorm", where="final")
    if not spec.share_embeddings_and_output_weights:
        out.append(Tensor("output_layer.weight", (vocab, h), tp, where="output", route="adamw"))
    return out


def stage_of(t: Tensor, spec: ModelSpec, pp: int) -> List[int]:
    """Pipeline stages holding a tensor (tied embeddings: a copy on the last stage too)."""
    per = spec.num_layers // pp
    if t.where == "embedding":
        tied = spec.share_embeddings_and_output_weights and t.name == "embedding.word_embeddings.weight"
        return sorted({0, pp - 1}) if tied else [0]
    if t.where in ("final", "output"):
        return [pp - 1]
    return [t.layer // per]


def count(tensors: Sequence[Tensor], **where) -> int:
    return sum(t.numel for t in tensors if all(getattr(t, k) == v for k, v in where.items()))


def params_per_rank(spec: ModelSpec, par: Parallel, stage: int) -> Dict[str, int]:
    """Parameters held by one rank of `stage`: dense/expert x ortho/adamw (experts: 1/EP of them)."""
    out = {"dense_ortho": 0, "dense_adamw": 0, "expert_ortho": 0, "expert_adamw": 0}
    for t in parameter_tensors(spec, par):
        if stage in stage_of(t, spec, par.pp):
            n = t.per_rank() // (par.ep if t.expert else 1)
            out[f"{'expert' if t.expert else 'dense'}_{t.route}"] += n
    return out
