"""QK-clip on megatron-core models in forked gloo ranks: the rescale equals Megatron's own clip_qk (fused
GQA QKV, MLA with and without a q LoRA), the capture equals the attention's logits, and training with the
clip gives the same weights at TP=2, at DP=2 (the maxima reduced over the ranks that saw the batch), with
Megatron's distributed optimizer and under DeepSpeed ZeRO-1/2 as in one process; context parallelism with
Transformer Engine's maxima (a stand-in, TE cannot run here) reduces over data x context ranks."""

import copy
from types import SimpleNamespace

import pytest
import torch

import megatron_models as mm
import teonspeed
from support import tolerance as tol
from support.harness import run_ranks
from teonspeed.qk_clip import find_layers, group_eta, row_scale, scale_rows

TAU = 0.035  # the tiny GPT's logits start at 0.02-0.05 (hidden 32, 4 heads of 8): some heads clip, some not


def tiny_mla(q_lora_rank):
    """A 1-layer MLA GPT built by the launcher's own path (launch/model.py: SDPA core attention on CPU)."""
    from launch.model import build_model

    transformer = dict(
        multi_latent_attention=True,
        num_layers=1,
        hidden_size=32,
        ffn_hidden_size=48,
        num_attention_heads=4,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=8,
        qk_head_dim=8,
        qk_pos_emb_head_dim=4,
        v_head_dim=8,
        rope_type="rope",
        gated_linear_unit=True,
        add_bias_linear=False,
        normalization="RMSNorm",
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    gpt = dict(activation="silu", position_embedding_type="rope", share_embeddings_and_output_weights=False)
    args = SimpleNamespace(
        transformer=transformer, gpt=gpt, ep=1, tp=1, pp=1, device="cpu", seed=3, seq=mm.SEQ
    )
    return build_model(args, mm.VOCAB)


# -- Megatron's own formula ------------------------------------------------------------------------------
def megatron_clip(rank, world_size, kind):
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel()
    model = {
        "gqa": lambda: mm.tiny_gpt(mm.tiny_config(num_layers=1)),
        "mla": lambda: tiny_mla(None),
        "mla_lora": lambda: tiny_mla(16),
    }[kind]()
    layer = find_layers(model)[0]
    attn = model.decoder.layers[0].self_attention
    head_max = torch.tensor([0.5, 3.0, 1.5, 2.5])  # per head; GQA groups (0.5, 3.0) and (1.5, 2.5)
    tau, alpha = 2.0, 0.3
    before = [p.detach().clone() for p, _ in layer.targets]
    ours = [p.clone() for p in before]
    eta = group_eta(head_max, layer.heads_per_group, tau)
    for w, (_, parts) in zip(ours, layer.targets):
        scale_rows(w, row_scale(eta, parts, alpha))
    attn.config.qk_clip, attn.config.qk_clip_threshold, attn.config.qk_clip_alpha = True, tau, alpha
    attn.core_attention.current_max_attn_logits = head_max.clone()
    attn.clip_qk()  # megatron-core 0.16.1's own (it reads the maxima Transformer Engine would leave there)
    return before, ours, [p.detach().clone() for p, _ in layer.targets], layer.heads_per_group


@pytest.mark.parametrize("kind", ["gqa", "mla", "mla_lora"])
def test_the_rescale_equals_megatrons_clip_qk_on_the_same_logits(kind):
    before, ours, theirs, heads_per_group = run_ranks(megatron_clip, 1, kind, timeout=120)[0]
    assert heads_per_group == (2 if kind == "gqa" else 1)
    for b, o, t in zip(before, ours, theirs):
        # The same fp32 powers of the same η times the same rows; torch's vectorised and scalar pow kernels
        # may round η^α one ulp apart (Megatron raises a per-row copy of η, we one η per group): 2 ulps.
        assert torch.allclose(o, t, rtol=2**-22, atol=0)
        changed = (o != b).any(dim=1)
        assert changed.any() and not changed.all()  # clipped heads' rows moved; value rows, heads under τ not


# -- the capture is the attention's logits -------------------------------------------------------------------
def capture_vs_inputs(rank, world_size, kind):
    """Our per-head maxima (from the local softmax's input for DotProductAttention, recomputed from query and
    key for the launcher's SDPA core attention) against a float64 oracle from the core attention's inputs."""
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel()
    model = mm.tiny_gpt(mm.tiny_config(num_layers=2)) if kind == "gqa" else tiny_mla(16)
    opt = teonspeed.Muon(model, lr=0.0, adamw_lr=0.0, qk_clip_log=True)
    seen = []
    for m in model.modules():
        if hasattr(m, "core_attention"):
            m.core_attention.register_forward_pre_hook(
                lambda mod, args: seen.append((args[0].detach(), args[1].detach(), mod))
            )
    tokens, position_ids, labels = mm.batch()
    model(tokens, position_ids, None, labels=labels).mean().backward()
    opt.step()
    oracle = []
    for query, key, mod in seen:
        q, k = query.permute(1, 2, 0, 3).double(), key.permute(1, 2, 0, 3).double()
        k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
        scale = mod.softmax_scale if mod.softmax_scale is not None else q.size(-1) ** -0.5
        s = torch.matmul(q, k.transpose(-1, -2)) * scale
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
        # fp32 dot products of length d: d·2⁻²⁴·Σ|q_i k_i|, doubled (scaling, accumulation order)
        magnitude = float(torch.matmul(q.abs(), k.abs().transpose(-1, -2)).max())
        bound = 2 * q.size(-1) * 2**-24 * magnitude * scale
        oracle.append((s.amax(dim=(0, 2, 3)), bound))
    return [h.double() for h in opt.qk_clip.head_max], oracle


@pytest.mark.parametrize("kind", ["gqa", "mla_lora"])
def test_the_captured_maxima_are_the_attentions_logits(kind):
    got, oracle = run_ranks(capture_vs_inputs, 1, kind, timeout=120)[0]
    assert len(got) == len(oracle) > 0
    for g, (want, bound) in zip(got, oracle):
        assert torch.allclose(g, want, rtol=0, atol=bound)


# -- training with the clip: every layout equals one process -------------------------------------------
def train(rank, world_size, tp=1, steps=3, distributed=False, optimizer="muon", bf16=False, float64=False):
    """A tiny GPT in Megatron DDP with teonspeed's Megatron optimizer and qk_clip=TAU; every step's global
    batch is the same 4 sequences, split over the DP ranks. Returns the per-step maxima, the parameters.
    float64: the same model, initial weights and training in fp64 (tol.oracle_bound's oracle)."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from teonspeed.megatron import TeonOptimizerConfig, get_megatron_optimizer

    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    config = mm.tiny_config(num_layers=2, tp=tp)
    model = mm.tiny_gpt(config).double() if float64 else mm.tiny_gpt(config)
    ddp = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(grad_reduce_in_fp32=not float64, use_distributed_optimizer=distributed),
        model.bfloat16() if bf16 else model,
    )
    opt = get_megatron_optimizer(
        TeonOptimizerConfig(
            optimizer=optimizer,
            lr=0.05,
            adamw_lr=3e-3,
            clip_grad=0.0,
            bf16=bf16,
            use_distributed_optimizer=distributed,
            qk_clip=TAU,
        ),
        [ddp],
    )
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    maxima = []
    for step in range(steps):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        tokens, position_ids, labels = (
            t[dp_rank * 4 // dp : (dp_rank + 1) * 4 // dp] for t in mm.batch(seed=step, batch_size=4)
        )
        ddp(tokens, position_ids, None, labels=labels).float().mean().backward()
        ddp.finish_grad_sync()
        opt.step()
        maxima.append([h.clone() for h in opt.optimizer.qk_clip.head_max])
    params = {
        n: (
            p.detach().clone(),
            getattr(p, "partition_dim", -1) if getattr(p, "tensor_model_parallel", False) else None,
            getattr(p, "partition_stride", 1),
            ps.get_tensor_model_parallel_rank(),
        )
        for n, p in ddp.module.named_parameters()
    }
    return maxima, params, dp_rank


@pytest.fixture(scope="module")
def one_process():
    return run_ranks(train, 1, timeout=180)[0]


@pytest.fixture(scope="module")
def one_process_fp64():
    return run_ranks(train, 1, float64=True, timeout=180)[0]


def test_the_reference_run_clips_some_heads_and_not_others(one_process):
    maxima = one_process[0]
    first = torch.cat(maxima[0])
    assert (first > TAU).any() and (first < TAU).any()
    assert all(float(torch.cat(m).max()) > TAU for m in maxima)  # the clip acts at every step


def maxima_bound(ref_maxima, oracle_maxima):
    """Per step: how far another layout's per-head maxima may be from the reference's, all heads of all
    layers together. The maxima are the forward's logits at that step's weights: the fp64 oracle's measure
    of the reference's rounding at that step, (1 + λ) of it (tol.oracle_bound), plus the logit's own
    rounding (a sum of 8 products, a head's width)."""
    return [
        tol.oracle_bound(dict(enumerate(ref)), dict(enumerate(exact)))
        + tol.sums(torch.float32, 8) * float(torch.cat(ref).norm())
        for ref, exact in zip(ref_maxima, oracle_maxima)
    ]


# The layouts split the matmuls' reductions differently: fp32 rounding grown through three Muon steps, which
# the fp64 oracle measures for the reference (tol.oracle_bound); a wrong head, group or rank in the clip
# moves whole rows by (τ/S)^α, a 1e-2-level difference.
@pytest.mark.parametrize(
    "layout",
    [dict(world=2, tp=2), dict(world=2), dict(world=2, distributed=True)],
    ids=["TP2", "DP2", "DP2-distributed-optimizer"],
)
def test_training_with_the_clip_equals_one_process(layout, one_process, one_process_fp64):
    world = layout.pop("world")
    results = run_ranks(train, world, timeout=180, **layout)
    ref_maxima, ref_params, _ = one_process
    bounds = maxima_bound(ref_maxima, one_process_fp64[0])
    for step, (want, bound) in enumerate(zip(ref_maxima, bounds)):
        if layout.get("tp") == 2:  # TP rank r holds query groups r (heads 2r, 2r+1) of each layer
            got = [torch.cat([r[0][step][layer] for r in results]) for layer in range(len(want))]
            assert tol.distance(dict(enumerate(got)), dict(enumerate(want))) <= bound, step
        else:  # every replica gets the maximum over the whole batch, not over its half
            for r in results:
                assert tol.distance(dict(enumerate(r[0][step])), dict(enumerate(want))) <= bound, step
    weights = {name: value[0] for name, value in ref_params.items()}
    exact = {name: value[0] for name, value in one_process_fp64[1].items()}
    assert tol.distance(mm.full_params_of_replica0(results), weights) <= tol.oracle_bound(weights, exact)
    if not layout.get("tp"):  # the replicas stayed identical
        for name in ref_params:
            assert torch.equal(results[0][1][name][0], results[1][1][name][0]), name


def test_bf16_distributed_optimizer_clips_its_fp32_masters_and_the_bf16_partition_it_gathers():
    """bf16 weights with fp32 masters: Megatron's Float16 wrapper (masters rebound, copied into the bf16
    parameters after the step) and the distributed optimizer (master partitions, copied into the bf16
    partitions DDP all-gathers) must both clip the masters and leave the bf16 weights their rounding."""
    plain = run_ranks(train, 2, bf16=True, timeout=180)
    distributed = run_ranks(train, 2, bf16=True, distributed=True, timeout=180)
    for name, (want, *_rest) in plain[0][1].items():
        assert want.dtype == torch.bfloat16
        # the same fp32 arithmetic but for the order of the gradient reduction (all-reduce vs reduce-scatter
        # of fp32 sums, ~1e-7) through three steps, then bf16 rounding of the weights: one bf16 ulp at most
        assert torch.allclose(distributed[0][1][name][0].float(), want.float(), rtol=2**-7, atol=0), name
        assert torch.equal(distributed[0][1][name][0], distributed[1][1][name][0]), name
    for step in range(3):
        for a, b in zip(plain[0][0][step], distributed[0][0][step]):
            assert torch.allclose(a, b, rtol=2**-7, atol=0)


# -- pipeline stages: each clips its own layers ------------------------------------------------------------
PP_TAU = 0.009  # these synthetic weights give logits of 0.005-0.014: some heads clip, some not


def train_pipeline(rank, world_size, pp=1, steps=3, float64=False):
    """Megatron DDP + 1F1B over `pp` stages (2 micro-batches a step); weights a function of each parameter's
    global name (support/synthetic.py), so every layout starts from the same model. float64: in fp64 (one
    stage), tol.oracle_bound's oracle."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from support.synthetic import global_name, local_tensor
    from teonspeed.megatron import TeonOptimizerConfig, get_megatron_optimizer
    from teonspeed.parallel.shard_spec import megatron_shard_specs

    ps.initialize_model_parallel(pipeline_model_parallel_size=pp)
    config = mm.tiny_config(num_layers=2, pp=pp)
    model = mm.tiny_gpt(
        config, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage()
    )
    model = model.double() if float64 else model
    specs = megatron_shard_specs(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(local_tensor(name, p, specs[name], 0, 1, 0))
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(grad_reduce_in_fp32=not float64), model
    )
    config.finalize_model_grads_func = finalize_model_grads
    opt = get_megatron_optimizer(
        TeonOptimizerConfig(optimizer="muon", lr=0.05, adamw_lr=3e-3, clip_grad=0.0, qk_clip=PP_TAU), [ddp]
    )

    def forward_step(data, chunk):
        tokens, position_ids, labels = next(data)
        return chunk(tokens, position_ids, None, labels=labels), lambda out: (out.float().mean(), {})

    maxima = []
    for step in range(steps):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        micro = [mm.batch(seed=10 * step + i) for i in range(2)]
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro),
            model=[ddp],
            num_microbatches=2,
            seq_length=mm.SEQ,
            micro_batch_size=2,
            forward_only=False,
        )
        opt.step()
        maxima.append([h.clone() for h in opt.optimizer.qk_clip.head_max])
    params = {global_name(n, specs[n]): p.detach().clone() for n, p in model.named_parameters()}
    return maxima, params, ps.get_pipeline_model_parallel_rank()


def test_pipeline_stages_clip_their_own_layers_like_one_process():
    ((ref_maxima, ref_params, _),) = run_ranks(train_pipeline, 1, timeout=180)
    ((exact_maxima, exact_params, _),) = run_ranks(train_pipeline, 1, float64=True, timeout=180)
    stages = sorted(run_ranks(train_pipeline, 2, pp=2, timeout=180), key=lambda r: r[2])
    first = torch.cat(ref_maxima[0])
    assert (first > PP_TAU).any() and (first < PP_TAU).any()  # the clip acts on some heads, not all
    for step, (want, bound) in enumerate(zip(ref_maxima, maxima_bound(ref_maxima, exact_maxima))):
        got = [layer for stage in stages for layer in stage[0][step]]  # stage s holds layer s: its maxima
        assert len(got) == len(want) == 2
        assert tol.distance(dict(enumerate(got)), dict(enumerate(want))) <= bound, step
    params = {n: p for stage in stages for n, p in stage[1].items()}
    # the same arithmetic per stage: within the fp64 oracle's measure of the one-stage run's rounding
    assert tol.distance(params, ref_params) <= tol.oracle_bound(ref_params, exact_params)


# -- DeepSpeed ZeRO-1/2: each rank clips its part of the flat fp32 partitions --------------------------
def train_deepspeed(rank, world_size, stage, steps=3):
    import deepspeed
    from megatron.core import parallel_state as ps

    from teonspeed.deepspeed import MegatronMPU

    deepspeed.init_distributed(dist_backend="gloo")
    ps.initialize_model_parallel()
    # 3 layers with ffn 16: the two ZeRO partitions of the matrices' flat group meet inside layer 1's
    # linear_qkv
    model = mm.tiny_gpt(mm.tiny_config(num_layers=3, ffn=16))
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    config = {
        "train_micro_batch_size_per_gpu": 4 // dp,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "TeonspeedMuon", "params": {"lr": 0.05, "adamw_lr": 3e-3, "qk_clip": TAU}},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**6,
        "wall_clock_breakdown": False,
    }
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=copy.deepcopy(config), mpu=MegatronMPU()
    )
    opt = engine.basic_optimizer
    maxima = []
    for step in range(steps):
        tokens, position_ids, labels = (
            t[dp_rank * 4 // dp : (dp_rank + 1) * 4 // dp] for t in mm.batch(seed=step, batch_size=4)
        )
        engine.backward(engine(tokens, position_ids, None, labels=labels).mean())
        engine.step()
        maxima.append(torch.cat(opt.qk_clip.head_max))
    # which query/key weights the ZeRO partitions cut (their rows are clipped in two pieces)
    qk = {opt._names[id(p)] for layer in opt.qk_clip.layers for p, _ in layer.targets}
    cut = sorted(
        e.name
        for fp in opt.partitions.values()
        for e in fp.entries
        if e.name in qk and e.offset < fp.start + fp.partition_size < e.offset + e.numel
    )
    params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    return maxima, params, type(engine.optimizer).__name__, cut


def plain_deepspeed_training(rank, world_size, float64=False, steps=3):
    """train_deepspeed's training without DeepSpeed, in one process: the 4 sequences' mean loss, clipped at
    DeepSpeed's default norm (1.0), Muon with qk_clip=TAU. float64: tol's fp64 oracle of it."""
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel()
    model = mm.tiny_gpt(mm.tiny_config(num_layers=3, ffn=16))
    model = model.double() if float64 else model
    opt = teonspeed.Muon(model, lr=0.05, adamw_lr=3e-3, qk_clip=TAU)
    maxima = []
    for step in range(steps):
        opt.zero_grad()
        tokens, position_ids, labels = mm.batch(seed=step, batch_size=4)
        model(tokens, position_ids, None, labels=labels).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        maxima.append(torch.cat(opt.qk_clip.head_max))
    return maxima, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_deepspeed_zero_1_and_2_clip_like_zero_0():
    results = {s: run_ranks(train_deepspeed, 2, s, timeout=180) for s in (0, 1, 2)}
    assert [results[s][0][2] for s in (0, 1, 2)] == ["Muon"] + ["DeepSpeedZeroOptimizer"] * 2
    ref_maxima, ref_params = results[0][0][0], results[0][0][1]
    assert all(float(m.max()) > TAU for m in ref_maxima)
    # ZeRO reduces the gradients in another order than stage 0: the same training's rounding, measured in
    # one process (fp32 against fp64), 2λ of it between two runs neither of which was measured; a misplaced
    # row factor is 1e-2-level
    (max32, plain32), (max64, plain64) = (
        run_ranks(plain_deepspeed_training, 1, float64=f, timeout=180)[0] for f in (False, True)
    )
    bound = tol.oracle_bound(plain32, plain64, measured=False)
    maxima_bounds = [
        2 * tol.LAMBDA * float((a.double() - b.double()).norm())
        + tol.sums(torch.float32, 8) * float(a.norm())
        for a, b in zip(max32, max64)
    ]
    for stage in (1, 2):
        for maxima, params, _, _ in results[stage]:
            for got, want, slack in zip(maxima, ref_maxima, maxima_bounds):
                assert float((got.double() - want.double()).norm()) <= slack
            assert tol.distance(params, ref_params) <= bound, stage
    assert results[1][0][3] == results[2][0][3] == ["decoder.layers.1.self_attention.linear_qkv.weight"]


# -- context parallelism with Transformer Engine's maxima (a stand-in; TE cannot run here) -------------
class TEDotProductAttention(torch.nn.Module):
    """Named as megatron's TE attention: after a forward it holds the running per-head max in
    current_max_attn_logits (TE's return_max_logit), which the clip reads and resets."""

    def __init__(self, with_max=True):
        super().__init__()
        if with_max:
            self.current_max_attn_logits = None


class FakeSelfAttention(torch.nn.Module):
    """Megatron's SelfAttention as QK-clip sees it: 4 heads in 2 query groups of head size 3, fused QKV."""

    def __init__(self, with_max=True):
        super().__init__()
        torch.manual_seed(0)
        self.core_attention = TEDotProductAttention(with_max)
        self.linear_qkv = torch.nn.Linear(6, 2 * (2 * 3 + 3 + 3), bias=False)
        self.num_attention_heads_per_partition, self.num_query_groups_per_partition = 4, 2
        self.hidden_size_per_attention_head = 3


def context_parallel(rank, world_size):
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(context_parallel_size=2)  # both ranks: one sequence, half each
    attn = FakeSelfAttention()
    clip = teonspeed.qk_clip.attach(attn, threshold=2.0)  # no optimizer: clip.step() after one's own step
    halves = [torch.tensor([1.0, 3.0, 4.0, 0.5]), torch.tensor([2.5, 1.0, 1.0, 5.0])]
    attn.core_attention.current_max_attn_logits = halves[rank]
    before = attn.linear_qkv.weight.detach().clone()
    clip.step()
    assert attn.core_attention.current_max_attn_logits is None  # reset for the next step, as Megatron does
    return before, attn.linear_qkv.weight.detach().clone(), clip.head_max[0]


def test_context_parallel_ranks_clip_by_the_max_over_the_whole_sequence():
    results = run_ranks(context_parallel, 2, timeout=60)
    (before, after0, seen0), (_, after1, seen1) = results
    assert torch.equal(seen0, torch.tensor([2.5, 3.0, 4.0, 5.0])) and torch.equal(seen1, seen0)
    assert torch.equal(after0, after1)
    want = before.clone()
    parts = find_layers(FakeSelfAttention())[0].targets[0][1]
    scale_rows(want, row_scale(group_eta(seen0, 2, 2.0), parts, 0.5))
    assert torch.equal(after0, want)


def test_transformer_engine_attention_without_its_max_logit_is_refused_with_the_fix():
    with pytest.raises(
        ValueError, match=r"set log_max_attention_logit=True \(and leave Megatron's own qk_clip off"
    ):
        teonspeed.qk_clip.attach(FakeSelfAttention(with_max=False), threshold=2.0)
