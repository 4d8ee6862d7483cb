"""The memory estimator behind `python -m launch.memory`: per-GPU memory of a megatron-core GPT (LLaMA /
GPT-2 / MoE / MLA) under TP x PP x DP (x EP).

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
  group (TP x DP / (ETP x EP)); ZeRO-3 adds the tensors DeepSpeed keeps whole and the working set it
  gathers for forward/backward, at DeepSpeed 0.19.8's stage3_* defaults (zero3);
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

Modules: params (the tensors and their splits), activations (and the `Training` setup), workspace (the
orthogonalizing step), zero3 (ZeRO-3's unsharded parameters), peak (the estimate), layouts (launcher
command lines and the layout configs).
"""

from launch.estimator.activations import Training, activation_bytes, layer_activation_bytes
from launch.estimator.layouts import (
    launch_argv,
    layout_argv,
    layout_estimate_block,
    layout_from_config,
    setup_from_launch,
    update_layouts,
)
from launch.estimator.params import (
    ModelSpec,
    Parallel,
    Tensor,
    check_layout,
    count,
    parameter_tensors,
    params_per_rank,
    stage_of,
)
from launch.estimator.peak import GIB, Estimate, estimate
from launch.estimator.workspace import ortho_workspace_bytes

__all__ = [
    "GIB",
    "Estimate",
    "ModelSpec",
    "Parallel",
    "Tensor",
    "Training",
    "activation_bytes",
    "check_layout",
    "count",
    "estimate",
    "launch_argv",
    "layer_activation_bytes",
    "layout_argv",
    "layout_estimate_block",
    "layout_from_config",
    "ortho_workspace_bytes",
    "parameter_tensors",
    "params_per_rank",
    "setup_from_launch",
    "stage_of",
    "update_layouts",
]
