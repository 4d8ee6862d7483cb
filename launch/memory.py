"""Per-GPU memory of a megatron-core GPT (LLaMA / GPT-2 / MoE / MLA) under TP x PP x DP (x EP).

    .venv/bin/python -m launch.memory configs/models/llama_1b.yaml --tp 2 --pp 2 --dp 4 --micro-batch 4 \\
        --optimizer teon
    .venv/bin/python -m launch.memory configs/models/layouts/llama_1b_tp2_pp2.yaml    # a layout config
    .venv/bin/python -m launch.memory --update-layouts    # rewrite memory_estimate in configs/models/layouts/

What is counted, per GPU, for the pipeline stage that needs the most (the answer is `total`):
- parameters, counted layer by layer the way megatron-core builds them (checked against real models in
  tests/integration/test_memory.py) and split the way it splits them: column/row-parallel weights and
  the vocabulary over TP (vocabulary padded to a multiple of 128 x TP), norms, position embeddings,
  routers and MLA down-projections replicated (Transformer Engine layout: `duplicated`), experts over EP
  and expert-TP, layers over PP (embedding on the first stage, final norm and head on the last, a copy
  of tied embeddings on the last stage when PP > 1);
- bf16 weights (2 B/param), fp32 gradients (4 B, Megatron's main_grad), fp32 master weights (4 B);
- optimizer states in fp32: AdamW two moments for every parameter; Muon / TEON / HTMuon one momentum
  buffer for the orthogonalized matrices and two AdamW moments for the rest (embeddings, head, norms,
  biases, router: teonspeed's routing);
- ZeRO over data parallelism: stage 1 (= Megatron's distributed optimizer) shards master weights and
  optimizer states, stage 2 also gradients, stage 3 also weights; expert parameters over the expert-DP
  group (TP x DP / (ETP x EP));
- activations (16-bit) per layer and micro-batch, Korthikanti et al. 2022 ("Reducing Activation
  Recomputation"): s*b*h*(34 + 5*a*s/h) for a GPT-2 layer with dropout, divided by TP with sequence
  parallelism (sbh*(10 + 24/t + 5as/(ht)) without it); the terms are derived for the actual widths
  (GQA, SwiGLU, MoE top-k, MLA) and drop the dropout masks when dropout is 0 and the attention scores
  with flash attention or selective recompute. 1F1B pipeline: stage i keeps min(PP - i, micro-batches)
  micro-batches in flight. Full recompute keeps only each layer's input plus one layer's activations.
  The last stage adds the logits (bf16 + fp32 copy for the cross-entropy);
- Muon/TEON step workspace: each rank orthogonalizes the full (stacked) matrices it owns in fp32
  (gathered input, result, and the Newton-Schulz buffers of the largest shape, batched per shape);
  the step runs after backward has freed the activations, so the peak takes the larger of the two;
- a fixed allowance for the CUDA context and allocator (--overhead-gib, default 1.0).
Not counted: allocator fragmentation, communication buffers, interleaved-schedule extras, KV caches.
"""
from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from launch import cli
from launch.configs import (LAYOUTS_DIR, MODELS_DIR, REPO, ConfigError, is_layout,  # noqa: F401  (the tests')
                            load_model_config, read_yaml, resolve_config_path, unknown_keys)
from launch.options import check

_read_yaml = read_yaml
GIB = 1024 ** 3
ORTHO_OPTIMIZERS = ("muon", "teon", "htmuon")
TEON_TYPES = ("q", "k", "v", "q_up", "k_up", "v_up")  # teonspeed's default teon_types


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
    make_vocab_size_divisible_by: int = 128
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
        if not self.num_moe_experts:
            return False
        freq = self.moe_layer_freq
        if isinstance(freq, int):
            return layer % freq == 0
        if len(freq) != self.num_layers:
            raise ValueError(f"moe_layer_freq has {len(freq)} entries for {self.num_layers} layers")
        return bool(freq[layer])

    def padded_vocab(self, tp: int) -> int:
        m = self.make_vocab_size_divisible_by * tp
        return (self.vocab_size + m - 1) // m * m


# ---------------------------------------------------------------------------------------------------
# Parameters, as megatron-core builds them
# ---------------------------------------------------------------------------------------------------
@dataclass
class Tensor:
    """One parameter tensor (or several identical ones: `copies`) of the full model."""
    name: str
    shape: Tuple[int, ...]
    split: int = 1            # how many ranks share it (TP, ETP, or 1 = replicated)
    where: str = "layer"      # embedding | layer | final | output
    layer: Optional[int] = None
    expert: bool = False
    route: str = "ortho"      # teonspeed: ortho (Muon/TEON) or adamw
    copies: int = 1           # identical tensors (local experts of a layer): count = copies * numel
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
    etp: Optional[int] = None     # expert tensor parallel (Megatron's default: = tp)
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


def validate(spec: ModelSpec, par: Parallel) -> None:
    """Megatron's divisibility rules for this layout (it refuses to build otherwise)."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(f"{spec.name}: {what}")
    need(spec.num_attention_heads % par.tp == 0, f"{spec.num_attention_heads} heads not divisible by TP={par.tp}")
    need(spec.groups % par.tp == 0, f"{spec.groups} query groups not divisible by TP={par.tp}")
    need(spec.num_layers % par.pp == 0, f"{spec.num_layers} layers not divisible by PP={par.pp}")
    dense_layers = [i for i in range(spec.num_layers) if not spec.is_moe_layer(i)]
    if dense_layers:
        need(spec.ffn_hidden_size % par.tp == 0, f"ffn_hidden_size {spec.ffn_hidden_size} not divisible by TP={par.tp}")
    if spec.num_moe_experts:
        need(spec.num_moe_experts % par.ep == 0, f"{spec.num_moe_experts} experts not divisible by EP={par.ep}")
        need(spec.moe_ffn % par.expert_tp == 0, f"moe_ffn_hidden_size {spec.moe_ffn} not divisible by ETP={par.expert_tp}")
        need((par.tp * par.dp) % (par.expert_tp * par.ep) == 0,
             f"ETP x EP = {par.expert_tp * par.ep} must divide TP x DP = {par.tp * par.dp}")
    else:
        need(par.ep == 1, "EP > 1 needs an MoE model")


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
            out.append(Tensor(p + "linear_q_up_proj.weight", (a * (qk + pos), spec.q_lora_rank), tp, layer=i,
                              parts=(("q_up", (a * (qk + pos), spec.q_lora_rank)),)))
        else:
            out.append(Tensor(p + "linear_q_proj.weight", (a * (qk + pos), h), tp, layer=i,
                              parts=(("q", (a * (qk + pos), h)),)))
        out.append(Tensor(p + "linear_kv_down_proj.weight", (spec.kv_lora_rank + pos, h), layer=i))
        if spec.qk_layernorm:
            out.append(Tensor(p + "kv_layernorm.weight", (spec.kv_lora_rank,), layer=i, route="adamw"))
        out.append(Tensor(p + "linear_kv_up_proj.weight", (a * (qk + v), spec.kv_lora_rank), tp, layer=i,
                          parts=(("k_up", (a * qk, spec.kv_lora_rank)), ("v_up", (a * v, spec.kv_lora_rank)))))
        out.append(Tensor(p + "linear_proj.weight", (h, a * v), tp, layer=i))
    else:
        d, q, kv = spec.head_dim, spec.num_attention_heads * spec.head_dim, spec.groups * spec.head_dim
        out.append(Tensor(p + "linear_qkv.weight", (q + 2 * kv, h), tp, layer=i,
                          parts=(("q", (q, h)), ("k", (kv, h)), ("v", (kv, h)))))
        if bias or spec.add_qkv_bias:
            out.append(Tensor(p + "linear_qkv.bias", (q + 2 * kv,), tp, layer=i, route="adamw"))
        if spec.qk_layernorm:
            out += [Tensor(p + f"{n}_layernorm.weight", (d,), layer=i, route="adamw") for n in ("q", "k")]
        out.append(Tensor(p + "linear_proj.weight", (h, q), tp, layer=i))
    if bias:
        out.append(Tensor(p + "linear_proj.bias", (h,), layer=i, route="adamw"))
    return out


def _mlp(spec: ModelSpec, prefix: str, ffn: int, split: int, layer: int, expert: bool = False,
         copies: int = 1) -> List[Tensor]:
    h, up = spec.hidden_size, (2 if spec.gated_linear_unit else 1) * ffn
    parts = (("gate", (ffn, h)), ("up", (ffn, h))) if spec.gated_linear_unit else (("fc1", (ffn, h)),)
    out = [Tensor(prefix + "linear_fc1.weight", (up, h), split, layer=layer, expert=expert, copies=copies,
                  parts=parts)]
    if spec.add_bias_linear:
        out.append(Tensor(prefix + "linear_fc1.bias", (up,), split, layer=layer, expert=expert, copies=copies,
                          route="adamw"))
    out.append(Tensor(prefix + "linear_fc2.weight", (h, ffn), split, layer=layer, expert=expert, copies=copies))
    if spec.add_bias_linear:
        out.append(Tensor(prefix + "linear_fc2.bias", (h,), 1, layer=layer, expert=expert, copies=copies,
                          route="adamw"))
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
        out.append(Tensor("embedding.position_embeddings.weight", (spec.seq_length, h), where="embedding",
                          route="adamw"))
    for i in range(spec.num_layers):
        out += _norm(spec, f"decoder.layers.{i}.input_layernorm", layer=i)
        out += _attention(spec, i, tp)
        out += _norm(spec, f"decoder.layers.{i}.pre_mlp_layernorm", layer=i)
        mlp = f"decoder.layers.{i}.mlp."
        if spec.is_moe_layer(i):
            e = spec.num_moe_experts
            out.append(Tensor(mlp + "router.weight", (e, h), layer=i, route="adamw"))
            out += _mlp(spec, mlp + "experts.local_experts.*.", spec.moe_ffn, par.expert_tp, i, expert=True,
                        copies=e)
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


# ---------------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------------
@dataclass
class Training:
    micro_batch: int = 1
    seq_length: Optional[int] = None        # default: the model's
    num_microbatches: Optional[int] = None  # default: enough to fill the pipeline
    optimizer: str = "adamw"                # adamw | muon | teon | htmuon
    zero_stage: int = 1                     # 0 | 1 (Megatron distributed optimizer) | 2 | 3
    recompute: str = "none"                 # none | selective | full
    flash_attention: bool = False
    teon_k: int = 2
    weight_bytes: int = 2                   # bf16
    grad_bytes: int = 4                     # fp32 main grads
    master_bytes: int = 4                   # fp32 master weights (0 for pure fp32 training: use weight_bytes 4)
    state_bytes: int = 4                    # fp32 optimizer states
    activation_bytes: int = 2               # bf16 activations (4: an fp32 run)
    overhead_gib: float = 1.0               # CUDA context, allocator, libraries


def layer_activation_bytes(spec: ModelSpec, layer: int, s: int, b: int, par: Parallel,
                           flash: bool = False) -> float:
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
        scores = (2 + adrop) * a * s * s * b / t          # softmax output (2 bytes)
    # MLP block: norm input, fc1 input, fc1 output (the activation's input), fc2 input.
    up = 2 if spec.gated_linear_unit else 1
    mlp = (2 * h + 2 * h) * rep + hdrop * h * rep
    if spec.is_moe_layer(layer):
        k, f, et = spec.moe_router_topk, spec.moe_ffn, par.expert_tp
        mlp += 4 * spec.num_moe_experts * rep                  # fp32 router logits
        mlp += k * (2 * h * rep + (2 * up * f + 2 * f) / et + 2 * h * rep)  # dispatched in, fc1 out, act out, fc2 out
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


# ---------------------------------------------------------------------------------------------------
# Muon / TEON step workspace
# ---------------------------------------------------------------------------------------------------
def ortho_workspace_bytes(spec: ModelSpec, par: Parallel, train: Training, stage: int) -> float:
    """Transient fp32 memory of a Muon/TEON step on one rank: the full matrices it owns (gathered input
    and result) plus Newton-Schulz buffers (X, X Xᵀ, its square, the next X) for one shape batch.
    Owners spread the groups of a shape over the TP x DP work group (expert-TP x expert-DP for experts)."""
    if train.optimizer not in ORTHO_OPTIMIZERS:
        return 0.0
    k = train.teon_k if train.optimizer == "teon" else 1
    shapes: Dict[Tuple[int, int, bool], float] = {}  # (rows, stacked cols, expert) -> number of groups
    for t in parameter_tensors(spec, par):
        if t.route != "ortho" or stage not in stage_of(t, spec, par.pp):
            continue
        for part, (m, n) in t.parts or (("other", t.shape),):
            kk = k if part in TEON_TYPES else 1  # TEON stacks K blocks of the same type: [M1 | M2]
            key = (m, n * kk, t.expert)
            shapes[key] = shapes.get(key, 0) + t.copies / kk
    total, peak_ns = 0.0, 0.0
    for (m, n, expert), groups in shapes.items():
        workers = par.expert_tp * par.expert_dp * par.ep if expert else par.tp * par.dp
        owned = math.ceil(groups / workers)
        total += owned * 2 * m * n * 4
        small = min(m, n)
        peak_ns = max(peak_ns, owned * (2 * m * n + 2 * small * small) * 4)
    return total + peak_ns


# ---------------------------------------------------------------------------------------------------
# The estimate
# ---------------------------------------------------------------------------------------------------
@dataclass
class Estimate:
    model: str
    parallel: Dict[str, Any]
    training: Dict[str, Any]
    params_total: int
    params_active_per_token: int
    stage: int                          # the pipeline stage the numbers below are for (the largest)
    params_per_gpu: int
    bytes: Dict[str, float] = field(default_factory=dict)

    @property
    def total_bytes(self) -> float:
        return self.bytes["total"]

    def gib(self) -> Dict[str, float]:
        return {k: round(v / GIB, 3) for k, v in self.bytes.items()}

    def table(self) -> str:
        par, tr = self.parallel, self.training
        head = (f"{self.model}: {self.params_total / 1e6:.1f} M parameters ({self.params_active_per_token / 1e6:.1f} M "
                f"active per token); TP={par['tp']} PP={par['pp']} DP={par['dp']} EP={par['ep']} "
                f"(world {par['world']}), micro-batch {tr['micro_batch']} x seq {tr['seq_length']}, "
                f"{tr['optimizer']}, ZeRO-{tr['zero_stage']}, recompute {tr['recompute']}"
                f"{', flash attention' if tr['flash_attention'] else ''}\n"
                f"per GPU (pipeline stage {self.stage}, {self.params_per_gpu / 1e6:.1f} M parameters):")
        rows = [f"  {k:<22} {v / GIB:9.3f} GiB" for k, v in self.bytes.items() if k != "total"]
        return "\n".join([head, *rows, f"  {'total':<22} {self.total_bytes / GIB:9.3f} GiB"])


def estimate(spec: ModelSpec, par: Parallel = Parallel(), train: Training = Training()) -> Estimate:
    validate(spec, par)
    if train.optimizer not in ("adamw",) + ORTHO_OPTIMIZERS:
        raise ValueError(f"optimizer {train.optimizer!r}")
    if train.recompute not in ("none", "selective", "full"):
        raise ValueError(f"recompute {train.recompute!r}")
    tensors = parameter_tensors(spec, Parallel(tp=1))
    total = sum(t.numel for t in tensors)
    expert = count(tensors, expert=True)
    active = total - expert + (expert * spec.moe_router_topk // spec.num_moe_experts if spec.num_moe_experts else 0)
    best = None
    for stage in range(par.pp):
        p = params_per_rank(spec, par, stage)
        dense, experts = p["dense_ortho"] + p["dense_adamw"], p["expert_ortho"] + p["expert_adamw"]
        z = train.zero_stage
        dp, edp = par.dp, par.expert_dp

        def shard(n_dense: float, n_expert: float, on: bool) -> float:
            return n_dense / dp + n_expert / edp if on else n_dense + n_expert

        moments = 2 if train.optimizer == "adamw" else 1
        states_dense = (p["dense_ortho"] * moments + p["dense_adamw"] * 2) * train.state_bytes
        states_expert = (p["expert_ortho"] * moments + p["expert_adamw"] * 2) * train.state_bytes
        b: Dict[str, float] = {
            "weights": shard(dense, experts, z >= 3) * train.weight_bytes,
            "gradients": shard(dense, experts, z >= 2) * train.grad_bytes,
            "master_weights": shard(dense, experts, z >= 1) * train.master_bytes,
            "optimizer_states": shard(states_dense, states_expert, z >= 1),
        }
        act = activation_bytes(spec, par, train, stage)
        b["activations"] = act["activations"]
        b["logits"] = act["logits"]
        workspace = ortho_workspace_bytes(spec, par, train, stage)
        b["ortho_step_workspace"] = workspace
        b["overhead"] = train.overhead_gib * GIB
        static = b["weights"] + b["gradients"] + b["master_weights"] + b["optimizer_states"] + b["overhead"]
        # The optimizer step runs after backward has freed the activations: the peak is the larger one.
        b["total"] = static + max(b["activations"] + b["logits"], workspace)
        if best is None or b["total"] > best.bytes["total"]:
            best = Estimate(model=spec.name, parallel={**asdict(par), "world": par.world, "sp": par.sp},
                            training={**asdict(train), "seq_length": train.seq_length or spec.seq_length},
                            params_total=total, params_active_per_token=active, stage=stage,
                            params_per_gpu=dense + experts, bytes=b)
    return best


# ---------------------------------------------------------------------------------------------------
# Layout configs (configs/models/layouts/*.yaml)
# ---------------------------------------------------------------------------------------------------
LAYOUT_HEADER = """\
# Multi-node layout of {model}. The memory_estimate block is generated by
#   .venv/bin/python -m launch.memory --update-layouts
# from launch/memory.py's model (do not edit it by hand; tests check it is current).
"""


def launch_argv(config: str, tp: int = 1, pp: int = 1, dp: int = 1, ep: int = 1, optimizer: str = "teon",
                micro_batch: Optional[int] = None, global_batch: Optional[int] = None, grad_accum: int = 1,
                seq: Optional[int] = None, zero_stage: Optional[int] = None, ds_config: Optional[str] = None) -> List[str]:
    """The launcher's command line for this setup (the setup the estimate is of)."""
    argv = ["--model-config", str(config), "--device", "cuda", "--tp", str(tp), "--pp", str(pp), "--ep", str(ep),
            "--optimizer", optimizer, "--grad-accum", str(grad_accum)]
    for flag, value in (("--micro-batch", micro_batch), ("--global-batch", global_batch), ("--seq", seq),
                        ("--zero-stage", zero_stage), ("--ds-config", ds_config)):
        if value is not None:
            argv += [flag, str(value)]
    return argv


def setup_from_launch(argv: Sequence[str], world: int, overhead_gib: float = 1.0) -> Tuple[ModelSpec, Parallel, Training]:
    """(model, parallel layout, training) of what `launch/pretrain.py ARGV` runs on `world` GPUs, checked
    by the launcher's own validator (launch/options.py): the estimate is of a setup the launcher runs.
    Sequence parallelism and activation recompute come from the model config's transformer fields (the
    launcher sets neither); attention is megatron-core's local one (no flash attention); the Megatron
    backend shards the optimizer state over DP only with --distributed-optimizer (ZeRO 1, else 0); weights are bf16 with fp32 master weights
    where the DeepSpeed config enables bf16, else fp32."""
    args = check(list(argv), world)
    t = args.transformer
    spec = ModelSpec.from_config({"name": Path(args.model_config).stem, "model": args.gpt, "transformer": t},
                                 seq_length=args.seq)
    par = Parallel(tp=args.tp, pp=args.pp, dp=args.dp, ep=args.ep, etp=t.get("expert_tensor_parallel_size"),
                   sequence_parallel=bool(t.get("sequence_parallel", False)))
    deepspeed = args.backend == "deepspeed"
    bf16 = deepspeed and bool(((args.ds_config_dict or {}).get("bf16") or {}).get("enabled"))
    granularity = t.get("recompute_granularity")
    train = Training(micro_batch=args.micro_batch, seq_length=args.seq, num_microbatches=args.grad_accum,
                     optimizer=args.optimizer,
                     zero_stage=args.zero_stage if deepspeed else int(args.distributed_optimizer),
                     recompute=granularity or "none", flash_attention=False,
                     teon_k=args.teon_k or (2 if args.optimizer == "teon" else 1),
                     weight_bytes=2 if bf16 else 4, master_bytes=4 if bf16 else 0, activation_bytes=2 if bf16 else 4,
                     overhead_gib=overhead_gib)
    return spec, par, train


def layout_argv(raw: dict, path: Path) -> Tuple[List[str], int]:
    """A layout's launcher command line and world size (nodes x GPUs per node)."""
    par, tr, cluster = raw["parallel"], dict(raw.get("training") or {}), raw.get("cluster") or {}
    dp = par.get("dp", 1)
    world = par.get("tp", 1) * par.get("pp", 1) * dp
    if cluster and cluster["nodes"] * cluster["gpus_per_node"] != world:
        raise ConfigError(f"{path}: {cluster['nodes']} nodes x {cluster['gpus_per_node']} GPUs = "
                          f"{cluster['nodes'] * cluster['gpus_per_node']} but TP x PP x DP = {world}")
    unknown_keys("training", tr, ("micro_batch", "global_batch", "optimizer", "zero_stage", "ds_config"), str(path),
                 "the valid ones are micro_batch, global_batch, optimizer, zero_stage, ds_config (launch/pretrain.py's "
                 "flags)")
    accum = tr["global_batch"] // (tr["micro_batch"] * dp) if "global_batch" in tr and "micro_batch" in tr else 1
    return launch_argv(str(path), tp=par.get("tp", 1), pp=par.get("pp", 1), dp=dp, ep=par.get("ep", 1),
                       optimizer=tr.get("optimizer", "teon"), micro_batch=tr.get("micro_batch"),
                       global_batch=tr.get("global_batch"), grad_accum=accum, zero_stage=tr.get("zero_stage"),
                       ds_config=str(REPO / tr["ds_config"]) if tr.get("ds_config") else None), world


def layout_from_config(raw: dict, path: Optional[Path] = None) -> Tuple[ModelSpec, Parallel, Training]:
    path = path or resolve_config_path(raw["name"])
    argv, world = layout_argv(raw, path)
    return setup_from_launch(argv, world)


def layout_estimate_block(raw: dict, path: Optional[Path] = None) -> dict:
    spec, par, train = layout_from_config(raw, path)
    est = estimate(spec, par, train)
    by_opt = {opt: round(estimate(spec, par, replace(train, optimizer=opt)).total_bytes / GIB, 2)
              for opt in ("adamw", "teon")}
    return {
        "params_total": est.params_total,
        "params_active_per_token": est.params_active_per_token,
        "params_per_gpu": est.params_per_gpu,
        "largest_stage": est.stage,
        "num_microbatches": train.num_microbatches,
        "gib_per_gpu": {k: round(v / GIB, 2) for k, v in est.bytes.items()},
        "total_gib_per_gpu_by_optimizer": by_opt,
    }


def update_layouts(paths: Optional[Sequence[Path]] = None, check: bool = False) -> List[Path]:
    """Recompute memory_estimate in each layout file; with check=True only report the stale ones."""
    import yaml
    stale = []
    for path in paths or sorted(LAYOUTS_DIR.glob("*.yaml")):
        raw = _read_yaml(path)
        block = layout_estimate_block(raw, path)
        if raw.get("memory_estimate") == block:
            continue
        stale.append(path)
        if check:
            continue
        raw["memory_estimate"] = block
        text = LAYOUT_HEADER.format(model=raw["model"]) + yaml.safe_dump(raw, sort_keys=False, width=110)
        path.write_text(text)
    return stale


# ---------------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    p = cli.parser(prog="python -m launch.memory", description=__doc__.split("\n\n")[0],
                   epilog="A layout config gives the defaults; every flag typed overrides it. The setup is "
                          "checked by launch/pretrain.py's own validator.")
    p.add_argument("config", nargs="?",
                   help="a model config (name or path) or a layout config (default: none; needed unless "
                        "--update-layouts or --check-layouts)")
    layout_or = "default: the layout config's, else"
    p.add_argument("--tp", type=int, default=None, help=f"tensor-parallel size ({layout_or} 1)")
    p.add_argument("--pp", type=int, default=None, help=f"pipeline-parallel size ({layout_or} 1)")
    p.add_argument("--dp", type=int, default=None, help=f"data-parallel size ({layout_or} 1)")
    p.add_argument("--ep", type=int, default=None, help=f"expert-parallel size ({layout_or} 1)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help=f"sequences per data-parallel rank per micro-batch ({layout_or} as launch.pretrain "
                        "derives it)")
    p.add_argument("--global-batch", type=int, default=None,
                   help=f"sequences per optimizer step ({layout_or} launch.pretrain's)")
    p.add_argument("--grad-accum", type=int, default=None,
                   help="micro-batches per step, in flight under PP (default: --global-batch / "
                        "(--micro-batch x --dp) when both are known, else 1)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: the model config's)")
    p.add_argument("--optimizer", default=None, choices=["adamw", *ORTHO_OPTIMIZERS],
                   help=f"the optimizer whose state is counted ({layout_or} adamw)")
    p.add_argument("--zero-stage", type=int, default=None, choices=[0, 1, 2],
                   help=f"DeepSpeed ZeRO stage, --pp 1 and --ep 1 only ({layout_or} launch.pretrain's)")
    cli.refuse_old_spelling(p, "--zero", "--zero-stage")
    p.add_argument("--ds-config", default=None,
                   help="the DeepSpeed JSON; bf16 there means bf16 weights (default: none, fp32)")
    p.add_argument("--overhead-gib", type=float, default=1.0, help="CUDA context and allocator allowance")
    p.add_argument("--update-layouts", action="store_true", help="rewrite memory_estimate in every layout config")
    p.add_argument("--check-layouts", action="store_true", help="exit 1 if a layout's memory_estimate is stale")
    args = p.parse_args(argv)
    if args.update_layouts or args.check_layouts:
        stale = update_layouts(check=args.check_layouts)
        verb = "stale" if args.check_layouts else "updated"
        print("\n".join(f"{verb}: {s.relative_to(REPO)}" for s in stale) or "all layouts current")
        return 1 if (args.check_layouts and stale) else 0
    if not args.config:
        p.error("give a config, or --update-layouts")
    path = resolve_config_path(args.config)
    raw = read_yaml(path)
    layout = dict(tp=1, pp=1, dp=1, ep=1)
    tr: Dict[str, Any] = {}
    if is_layout(raw):
        layout.update(raw["parallel"])
        tr = dict(raw.get("training") or {})
    given = {k: v for k, v in dict(tp=args.tp, pp=args.pp, dp=args.dp, ep=args.ep).items() if v is not None}
    layout.update(given)
    micro = args.micro_batch if args.micro_batch is not None else (None if args.global_batch else tr.get("micro_batch"))
    glob = args.global_batch if args.global_batch is not None else (None if args.micro_batch else tr.get("global_batch"))
    accum = args.grad_accum
    if accum is None:
        accum = glob // (micro * layout["dp"]) if glob and micro else 1
    zero = args.zero_stage if args.zero_stage is not None else tr.get("zero_stage")
    if zero is not None and (layout["pp"] > 1 or layout["ep"] > 1) and args.zero_stage is None:
        zero = None  # the layout's ZeRO stage cannot apply to the Megatron backend
    argv = launch_argv(str(path), tp=layout["tp"], pp=layout["pp"], dp=layout["dp"], ep=layout["ep"],
                       optimizer=args.optimizer or tr.get("optimizer", "adamw"), micro_batch=micro,
                       global_batch=glob, grad_accum=accum, seq=args.seq, zero_stage=zero,
                       ds_config=args.ds_config or (str(REPO / tr["ds_config"]) if tr.get("ds_config") else None))
    spec, par, train = setup_from_launch(argv, layout["tp"] * layout["pp"] * layout["dp"], args.overhead_gib)
    try:
        print(estimate(spec, par, train).table())
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
