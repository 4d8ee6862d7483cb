"""DeepSpeed ZeRO-3 (`"zero_optimization": {"stage": 3}`, DeepSpeed's default reduce_scatter) with the JSON
types: every parameter split evenly over the ranks, each matrix or TEON stack orthogonalized whole by one
owner and each rank's slice sent back. The training equals ZeRO-0's (fp32 Newton–Schulz, the derived fp32
bound of test_deepspeed.assert_same_training) for TEON, Muon and HTMuon, with accumulation, clipping,
several sub-groups, bf16; checkpoints resume exactly; another DP size and offload are refused in one line;
the bytes each rank moves equal the plan's prediction."""

import copy
import functools
import re

import pytest
import torch

import ds_helpers as h
from support import tolerance as tol
from support.harness import RankError, run_ranks
from test_deepspeed import TYPES, _refusals, assert_same_training, oracle, run

# Every parameter partitioned (the tiny model's would all be "persistent", i.e. kept whole, by default).
PARTITIONED = {"stage3_param_persistence_threshold": 0}


def zero3(optimizer, **kw):
    config = h.ds_config(optimizer, stage=3, **{k: v for k, v in kw.items() if k != "zero"})
    config["zero_optimization"].update(PARTITIONED, **kw.get("zero", {}))
    return config


@pytest.mark.parametrize("optimizer", sorted(TYPES))
def test_zero3_equals_zero0_in_fp32(optimizer):
    result = run(zero3(optimizer))
    assert (result[2], result[3]) == ("DeepSpeedZeroOptimizer_Stage3", TYPES[optimizer].__name__)
    reference = run(h.ds_config(optimizer, stage=0))
    assert_same_training(result, reference, *oracle(optimizer))


def test_zero3_htmuon_counts_each_step_once_across_sub_groups():
    """DeepSpeed calls step() once per sub-group (here the matrices' and the AdamW part's) with the other
    param groups emptied; HTMuon's heavy-tail every 2nd step must still fall on steps 2, 4 (a step counted
    per call would make every step heavy-tailed)."""
    params = {"lr": 0.02, "adamw_lr": 3e-3, "ht_interval": 2}
    result = run(zero3("TeonspeedHTMuon", params=params))
    reference = run(h.ds_config("TeonspeedHTMuon", stage=0, params=params))
    assert_same_training(result, reference, *oracle("TeonspeedHTMuon", params_cfg=params))


def test_zero3_with_accumulation_clipping_and_several_sub_groups_equals_zero0():
    """Muon (no stacks) with sub-groups of 200 elements per rank: DeepSpeed calls step() once per
    sub-group, several per param group; gradients accumulated over 2 micro-batches and clipped at 0.05
    (below the tiny model's gradient norm, so the clip acts)."""
    extra = dict(gradient_accumulation_steps=2, gradient_clipping=0.05)
    split = run(zero3("TeonspeedMuon", zero={"sub_group_size": 200}, **extra))
    reference = run(h.ds_config("TeonspeedMuon", stage=0, **extra))
    ref32, ref64 = oracle("TeonspeedMuon", clip=0.05, accumulation=2)
    assert min(ref64.grad_norms) > 0.05
    assert_same_training(split, reference, ref32, ref64)


def test_zero3_in_bf16_is_as_close_to_the_fp64_oracle_as_zero0_in_bf16():
    """bf16 training at stage 0 measured against the fp64 oracle (e₁₆); stage 3 is within 2λ·e₁₆ of it
    (two runs neither of which is exact), as test_deepspeed's bf16 wrappers are: with every parameter
    partitioned, and with stage3_param_persistence_threshold=300 (q/k/v/o and the norms kept whole in
    bf16 beside partitioned FFN matrices and embeddings, the mix of a real model at DeepSpeed's default)."""
    rounding = tol.sums(torch.bfloat16, h.HIDDEN)
    zero0 = run(h.ds_config("TEON", stage=0, bf16=True), rounding=rounding)
    _, exact = oracle("TEON")
    e16 = tol.distance(zero0[1], exact.weights)
    assert e16 > 0
    for persistence in (0, 300):
        config = zero3("TEON", bf16=True, zero={"stage3_param_persistence_threshold": persistence})
        three = run(config, rounding=rounding)
        assert three[2:4] == ("DeepSpeedZeroOptimizer_Stage3", "TEON")
        assert tol.distance(three[1], zero0[1]) <= 2 * tol.LAMBDA * e16, persistence


def test_zero3_checkpoint_resumes_exactly(tmp_path):
    config = zero3("TeonspeedHTMuon", params={"lr": 0.02, "adamw_lr": 3e-3, "ht_interval": 2})
    full = run(config, steps=6)
    run(config, steps=3, checkpoint={"dir": str(tmp_path), "save_at": 3})
    resumed = run(config, steps=6, checkpoint={"dir": str(tmp_path), "load": True, "start": 3})
    assert resumed[0] == full[0][3:]
    for n, p in resumed[1].items():
        assert torch.equal(p, full[1][n]), n


def test_zero3_checkpoint_at_another_dp_size_is_refused_naming_both(tmp_path):
    """DeepSpeed's own check (engine._load_zero_checkpoint) refuses it before the optimizer state loads."""
    config = zero3("TEON")
    run(config, steps=1, checkpoint={"dir": str(tmp_path), "save_at": 1})
    with pytest.raises(RankError, match="used a DP world size of 2 but the current world size is 1"):
        run_ranks(
            h.train,
            1,
            config,
            steps=2,
            checkpoint={"dir": str(tmp_path), "load": True, "start": 1},
            timeout=120,
        )


@pytest.mark.parametrize("option", ["offload_optimizer", "offload_param"])
def test_zero3_offload_is_refused_naming_the_option_and_the_fix(option):
    config = zero3("TEON", zero={option: {"device": "cpu"}})
    for text in _refusals(config):
        assert f"does not support ZeRO-3 offload (zero_optimization.{option}.device='cpu')" in text
        assert f"Remove zero_optimization.{option}" in text


def test_a_teon_stack_split_over_sub_groups_is_refused_naming_the_sub_group_size_to_use():
    """The line names the value that keeps the stack's param group in one sub-group, and that value
    trains as ZeRO-0 does."""
    with pytest.raises(RankError) as err:
        run_ranks(h.train, 2, zero3("TEON", zero={"sub_group_size": 200}), steps=1, timeout=120)
    text = str(err.value)
    assert "under ZeRO-3 the members of a TEON group must be in the same sub-group" in text
    found = re.search(r"Set zero_optimization.sub_group_size to at least (\d+) \(now 200;", text)
    assert found, text[-2000:]
    result = run(zero3("TEON", zero={"sub_group_size": int(found.group(1))}))
    assert_same_training(result, run(h.ds_config("TEON", stage=0)), *oracle("TEON"))


def zero_init_model():
    """TinyLM built inside deepspeed.zero.Init, as Hugging Face's from_pretrained does under a ZeRO-3
    config: the optimizer is handed parameters that are already partitioned (empty placeholders)."""
    import deepspeed

    with deepspeed.zero.Init(config_dict_or_path=zero3("TEON")):
        return h.TinyLM()


def test_zero3_on_a_model_built_under_zero_init_equals_zero0():
    result = run(zero3("TEON"), model_fn=zero_init_model)
    reference = run(h.ds_config("TEON", stage=0))
    assert_same_training(result, reference, *oracle("TEON"))


def _comm(rank, world_size, config):
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    model = h.TinyLM()
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=copy.deepcopy(config)
    )
    opt = engine.basic_optimizer
    for step in range(2):
        tokens, labels = h.batch(step, dist.get_rank())
        engine.backward(engine(tokens, labels))
        engine.step()
    stats = opt.comm_stats
    cut = sum(j.cut for plan in opt.zero_plans for j in plan.jobs)
    return (stats.sent, stats.received), opt.zero_expected_bytes(), cut, str(opt.plan), stats.adamw_bytes


def test_zero3_bytes_per_rank_equal_the_plans_prediction():
    """Every matrix is cut over both ranks under ZeRO-3: each owner receives the other rank's slice and
    sends its slice of the update back; measured == predicted, not 0 == 0."""
    results = run_ranks(_comm, 2, zero3("TEON"), timeout=120)
    for measured, predicted, cut, plan, adamw in results:
        assert measured == predicted and measured[0] > 0 and cut > 0
        # the printed plan reports the same bytes per rank, and AdamW's for the same matrices next to it
        assert f"sends {measured[0]:,} bytes, receives {measured[1]:,} bytes" in plan
        assert f"AdamW in the same layout: {adamw:,} bytes" in plan and adamw > 0
    # each matrix's non-owner slice travels twice (there and back): the ranks' sent bytes add up to
    # 2 x 4 bytes x the elements of the matrices outside their owner's slice
    assert sum(r[0][0] for r in results) == sum(r[0][1] for r in results)


def test_zero3_with_some_parameters_persisted_equals_zero0():
    """stage3_param_persistence_threshold=300: the tiny model's q/k/v/o (128-256 elements) and norms are
    persisted (kept whole between forwards, numel < threshold), the FFN matrices and embeddings
    partitioned: a mix of both in one step, as with DeepSpeed's default threshold on a real model."""
    result = run(zero3("TEON", zero={"stage3_param_persistence_threshold": 300}))
    assert_same_training(result, run(h.ds_config("TEON", stage=0)), *oracle("TEON"))


def _nan_on_one_rank(rank, world_size, config, steps=3):
    """Step 2's gradient gets a NaN on rank 1 only (a hook on one matrix's gradient, before DeepSpeed's
    reduce-scatter puts it in one rank's partition): which parameters each step changed, on this rank."""
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    model = h.TinyLM()
    poisoned = {"step": None}

    def poison(grad):
        if poisoned["step"] == 1 and dist.get_rank() == 1:
            grad = grad.clone()
            grad[0, 0] = float("nan")
        return grad

    model.layers[0].mlp.gate_proj.weight.register_hook(poison)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=copy.deepcopy(config)
    )
    changed = []
    for step in range(steps):
        poisoned["step"] = step
        before = h.gathered_params(engine)
        engine.backward(engine(*h.batch(step, dist.get_rank())))
        engine.step()
        after = h.gathered_params(engine)
        changed.append(sum(not torch.equal(after[n], before[n]) for n in after))
    return changed, len(before)


def test_zero3_nonfinite_gradient_on_one_rank_skips_the_step_on_every_rank():
    """Muon with several sub-groups (DeepSpeed steps them one at a time) and no clipping: DeepSpeed's
    global gradient norm is non-finite, so it skips the whole step on every rank before the optimizer
    (no sub-group stepped alone, no rank left waiting); the next step runs."""
    config = zero3("TeonspeedMuon", zero={"sub_group_size": 200}, gradient_clipping=0.0)
    for changed, total in run_ranks(_nan_on_one_rank, 2, config, timeout=120):
        assert changed == [total, 0, total]


def frozen_tied_lm():
    """TinyLM with a frozen matrix (requires_grad=False) and tied input/output embeddings."""
    model = h.TinyLM()
    model.layers[0].mlp.gate_proj.weight.requires_grad_(False)
    model.lm_head.weight = model.embed_tokens.weight
    return model


def _plain_frozen_tied(dtype, steps=5, world_size=2, optimizer="TEON", groups=None):
    """The one-process oracle of ds_helpers.train on frozen_tied_lm, or of _train_groups on TinyLM with
    `groups` (test_deepspeed.plain_run's loop, whose norm reads every parameter's gradient):
    rank-averaged gradients, clipped at 1.0."""
    model = (h.TinyLM() if groups else frozen_tied_lm()).to(dtype)
    params = groups(model, named=True) if groups else model.named_parameters()
    opt = TYPES[optimizer](params, lr=0.02, adamw_lr=3e-3)
    trained = [p for p in model.parameters() if p.requires_grad]
    for step in range(steps):
        opt.zero_grad()
        for rank in range(world_size):
            (model(*h.batch(step, rank)) / world_size).backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_zero3_with_a_frozen_matrix_and_tied_embeddings_equals_zero0():
    """Both within 2λ·e of each other (e: the fp32 oracle's distance from its fp64 twin, the bound of
    assert_same_training); the frozen matrix is unchanged and the tied embedding is one parameter."""
    three = run(zero3("TEON"), model_fn=frozen_tied_lm)
    zero = run(h.ds_config("TEON", stage=0), model_fn=frozen_tied_lm)
    bound = tol.oracle_bound(_plain_frozen_tied(torch.float32), _plain_frozen_tied(torch.float64), False)
    assert tol.distance(three[1], zero[1]) <= bound, (tol.distance(three[1], zero[1]), bound)
    frozen = frozen_tied_lm().layers[0].mlp.gate_proj.weight
    assert torch.equal(three[1]["layers.0.mlp.gate_proj.weight"], frozen.detach())
    assert "lm_head.weight" not in three[1]


def test_zero3_checkpoint_with_gradient_accumulation_resumes_exactly(tmp_path):
    """HTMuon (heavy-tail every 2nd step: the step counter must survive) with 2 micro-batches a step and
    several sub-groups, saved after step 3 (an odd step: the next one is heavy-tailed), resumed: the same
    losses and weights to the last bit as the run that never stopped."""
    config = zero3(
        "TeonspeedHTMuon",
        params={"lr": 0.02, "adamw_lr": 3e-3, "ht_interval": 2},
        zero={"sub_group_size": 200},
        gradient_accumulation_steps=2,
    )
    full = run(config, steps=5)
    run(config, steps=3, checkpoint={"dir": str(tmp_path), "save_at": 3})
    resumed = run(config, steps=5, checkpoint={"dir": str(tmp_path), "load": True, "start": 3})
    assert resumed[0] == full[0][3:]
    for n, p in resumed[1].items():
        assert torch.equal(p, full[1][n]), n


def param_groups(model, named=False):
    """Three param groups as users pass them to deepspeed.initialize(model_parameters=...): FFN matrices
    with weight decay, attention matrices at half the lr, everything else (embeddings, norms: AdamW) at
    its own adamw_lr. `named`: (name, parameter) pairs, for the one-process oracle (DeepSpeed's entry
    names the tensors from the module: the embeddings are AdamW's by name)."""
    items = list(model.named_parameters())

    def pick(keep):
        return [(n, p) if named else p for n, p in items if keep(n, p)]

    return [
        {"params": pick(lambda n, p: p.ndim >= 2 and "mlp" in n), "weight_decay": 0.1},
        {"params": pick(lambda n, p: p.ndim >= 2 and "self_attn" in n), "lr": 0.01},
        {"params": pick(lambda n, p: "mlp" not in n and "self_attn" not in n), "adamw_lr": 1e-2},
    ]


def _train_groups(rank, world_size, config, steps=5):
    """ds_helpers.train with param_groups(model) as DeepSpeed's model_parameters."""
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    model = h.TinyLM()
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model), config=copy.deepcopy(config)
    )
    for step in range(steps):
        engine.backward(engine(*h.batch(step, dist.get_rank())))
        engine.step()
    return h.gathered_params(engine), [g.get("weight_decay") for g in engine.basic_optimizer.param_groups]


def test_zero3_with_param_groups_of_their_own_lr_and_weight_decay_equals_zero0():
    """Muon through the JSON type with three user param groups (own weight_decay, lr, adamw_lr): ZeRO-3
    and ZeRO-0 within 2λ·e of the one-process fp32/fp64 oracle of the same groups, and the groups' own
    values reach the optimizer."""
    three, wd = run_ranks(_train_groups, 2, zero3("TeonspeedMuon"), timeout=120)[0]
    zero, _ = run_ranks(_train_groups, 2, h.ds_config("TeonspeedMuon", stage=0), timeout=120)[0]
    oracle32, oracle64 = (
        _plain_frozen_tied(dtype, optimizer="TeonspeedMuon", groups=param_groups)
        for dtype in (torch.float32, torch.float64)
    )
    bound = tol.oracle_bound(oracle32, oracle64, False)
    assert tol.distance(three, zero) <= bound, (tol.distance(three, zero), bound)
    assert tol.distance(zero, oracle32) <= tol.oracle_bound(oracle32, oracle64, False)
    assert 0.1 in wd


class BranchNotTaken(torch.nn.Module):
    """TinyLM whose forward number `skip_call` (counted from 1) leaves layers.1's MLP out (a branch not
    taken: its two matrices get no gradient in that micro-step)."""

    def __init__(self, skip_call=2):
        super().__init__()
        self.inner, self.calls, self.skip_call = h.TinyLM(), 0, skip_call

    def forward(self, tokens, labels):
        self.calls += 1
        down = self.inner.layers[1].mlp.down_proj
        if self.calls != self.skip_call:
            return self.inner(tokens, labels)
        down.forward = lambda x: x.new_zeros(x.shape[:-1] + (down.out_features,))
        try:
            return self.inner(tokens, labels)
        finally:
            del down.forward


@pytest.mark.parametrize(
    "accumulation, skip_call",
    [(1, 2), (2, 3)],
    ids=["whole-step-without-gradient", "first-micro-step-of-a-window-without-gradient"],
)
def test_zero3_with_a_branch_not_taken_equals_zero0(accumulation, skip_call):
    """Two matrices get no gradient in one micro-step (a whole step; or the first micro-step of the 2nd
    accumulation window, whose 2nd micro-step then adds to the partition): ZeRO-0 counts the missing
    gradient as zero (equal to one process that fills zeros). DeepSpeed's ZeRO-3 alone hands the optimizer
    those matrices' stale gradient partitions of the previous step (it zeroes them only at init: 7.4e-3
    on those matrices after 3 steps); the patch (patches/deepspeed_0_19.py, change 5) zeroes them after
    each step. Bound: the derived fp32 bound of the same training without the branch (the rounding of a
    3-step Muon training of this model, tol.oracle_bound), as test_zero3_equals_zero0 uses."""
    model_fn = functools.partial(BranchNotTaken, skip_call=skip_call)
    extra = dict(gradient_accumulation_steps=accumulation)
    three = run(zero3("TeonspeedMuon", **extra), model_fn=model_fn, steps=3)
    zero = run(h.ds_config("TeonspeedMuon", stage=0, **extra), model_fn=model_fn, steps=3)
    ref32, ref64 = oracle("TeonspeedMuon", steps=3, accumulation=accumulation)
    bound = tol.oracle_bound(ref32.weights, ref64.weights, False)
    assert tol.distance(three[1], zero[1]) <= bound, (tol.distance(three[1], zero[1]), bound)
