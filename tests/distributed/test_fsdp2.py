"""PyTorch FSDP2 (`fully_shard`), HSDP and FSDP2 x TP as layouts of the one step: TEON, Muon and HTMuon
on such a model (through the model, named_parameters() and param groups) equal one process on the
unsharded model; the exchange's bytes equal the plan's prediction; torch.distributed.checkpoint resumes
exactly and reshards 2 -> 1 and 1 -> 2 ranks.

Ranks are spawned, not forked (FSDP2 ranks forked from a parent that imported torch hang here), one
spawn per world size with every check of that size in it (fsdp2_ranks.py).

Tolerance: both sides step the same numbers (the sharded ranks' gradients are set to the one-process
gradient, cut by DTensor itself), the momentum is element-wise (the same operations on a chunk as on the
whole), and the owner orthogonalizes the same assembled fp32 matrices; the only difference is which
stacks are batched together in one Newton-Schulz call. `tol.RoundingBudget` bounds what that can change
from the stacks the sharded optimizers transformed (each stack's output rounding, summed over the steps,
for two sides; each rank's budget covers the stacks it owned, and their sum bounds the whole model, as
√(Σ sq) ≤ Σ √sq); measured differences are expected at or near 0 (TEON and Muon: equal to the last bit here).

AdamW's element-wise step on a chunk is the same operations per element as on the whole, except that a
vectorized kernel may fuse a multiply-add (lerp_, addcmul_, addcdiv_) where the shorter chunk's scalar
tail does not: per step, one rounding of the new weight (u·|W|) and, in the step term lr·m̂/(√v̂+ε),
at most 10 roundings of its own plus 4 per earlier step carried in the moments. With R the bound on
|m̂/(√v̂+ε)| for β1 < √β2, (1−β1)/√(1−β2)/(1−β1/√β2), per element after S steps:
    |ΔW| ≤ S·u·(max|W| + (10 + 4S)·lr·R).
"""

import json
import math

import pytest
import torch

from support.harness import free_port
from support import tolerance as tol

import fsdp2_ranks as fr


def reference(kind, entry, steps, layout="fsdp2", first=1, model=None, opt=None):
    """One process, the unsharded model: the oracle."""
    if model is None:
        model = fr.tiny(layout)
        opt = fr.make_optimizer(kind, fr.entry_params(model, entry))
    for step in range(first, first + steps):
        model(*fr.batch(step)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def oracle(kind, entry, layout="fsdp2", steps=fr.STEPS):
    """One process's weights after `steps`, and its orthogonalized matrices."""
    model, opt = reference(kind, entry, steps, layout)
    return weights(model), opt.grouping.ortho_names()


def adamw_bound(w, steps, betas=(0.9, 0.95)):
    """The per-element bound of the module docstring (betas: teonspeed's adamw_betas default)."""
    b1, b2 = betas
    ratio = (1 - b1) / math.sqrt(1 - b2) / (1 - b1 / math.sqrt(b2))
    return steps * tol.u() * (float(w.abs().max()) + (10 + 4 * steps) * fr.ADAMW_LR * ratio)


def check_equal(got, want, bound, ortho, steps=fr.STEPS):
    """`ortho`: the orthogonalized matrices (the budget's); every other parameter is AdamW's."""
    assert tol.distance(got, want, ortho) <= bound, (tol.distance(got, want, ortho), bound)
    for n in want:
        if n not in ortho:
            diff = float((got[n] - want[n]).abs().max())
            assert diff <= adamw_bound(want[n], steps), (n, diff)


def model_bound(reports, key):
    """The rounding budget of the whole model: the ranks' budgets summed (see the module docstring)."""
    return sum(r[key]["bound"] for r in reports)


def spawn(scenario, world_size, tmp_path):
    import torch.multiprocessing as mp

    args = (world_size, free_port(), str(tmp_path), scenario)
    mp.start_processes(fr.run, args=args, nprocs=world_size, start_method="spawn")
    return [json.loads((tmp_path / f"{scenario}-{r}.json").read_text()) for r in range(world_size)]


def dcp_state(model, opt):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory):
    """The one spawn of 2 ranks (fsdp2_ranks.run's "fsdp2" scenario): its folder and the ranks' reports."""
    import torch.distributed.checkpoint as dcp

    tmp_path = tmp_path_factory.mktemp("fsdp2")
    torch.set_num_threads(1)
    model, opt = reference("TEON", "model", 1)
    dcp.save(dcp_state(model, opt), checkpoint_id=str(tmp_path / "dcp-1rank"))  # loaded by 2 ranks
    return tmp_path, spawn("fsdp2", 2, tmp_path)


def test_fsdp2_on_2_ranks_equals_one_process_and_its_checkpoints_reshard(fsdp2_run):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    tmp_path, reports = fsdp2_run

    for key in ("fsdp2-TEON-model", "fsdp2-Muon-named_parameters", "fsdp2-HTMuon-param_groups"):
        layout, kind, entry = key.split("-")
        want, ortho = oracle(kind, entry, layout)
        check_equal(torch.load(tmp_path / f"{key}.pt"), want, model_bound(reports, key), ortho)
        for report in reports:
            assert report[key]["runner"] == "PartitionRunner"
            for sent, received, want_sent, want_received, adamw in report[key]["stats"]:
                assert (sent, received) == (want_sent, want_received) and sent > 0 and adamw > 0
            assert f"sends {report[key]['stats'][0][2]:,} bytes" in report[key]["plan"]  # opt.plan's report
        if kind == "TEON":  # the plan's bytes, from the layout alone: every step moves the same
            for report in reports:
                assert {s[0] for s in report[key]["stats"]} == {report[key]["layout_bytes"]}

    for report in reports:
        assert report["checkpoints"]["resumed_exactly"]
        refusals = report["refusals"]  # one line each, on every rank (no rank left in a collective)
        assert "placements (Partial(sum),)" in refusals["partial"] and "'w'" in refusals["partial"]
        assert "'b' is a plain tensor beside DTensor parameters" in refusals["plain"]
        assert "'layers.0.mlp.down_proj.weight' has no gradient this step" in refusals["no_grad"]
        assert refusals["unchanged"] == "yes"
        # on the old code construction passed and the first step aborted gloo (a mixed-dtype buffer)
        assert "'layers.0.self_attn.q_proj.weight' (torch.bfloat16) and 'layers.1" in refusals["mixed_dtype"]
        assert "(torch.float32) have different dtypes" in refusals["mixed_dtype"]
        # on the old code that step silently changed nothing
        assert "parameters were replaced after the optimizer was built" in refusals["built_before_sharding"]
        assert all("\n" not in text for text in refusals.values())
    # 1 -> 2 ranks: one process's save after step 1, loaded and stepped on 2 ranks == one process's step 2
    bound = sum(r["checkpoints"]["bound"] for r in reports)
    want, ortho = oracle("TEON", "model", steps=2)
    check_equal(torch.load(tmp_path / "dcp-from-1rank.pt"), want, bound, ortho)
    # 2 -> 1: the 2 ranks' save after step 1, loaded and stepped in one process == the 2 ranks' step 2
    model = fr.tiny("fsdp2")
    opt = fr.make_optimizer("TEON", model)
    state = dcp_state(model, opt)
    dcp.load(state, checkpoint_id=str(tmp_path / "dcp-2ranks"))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    reference("TEON", "model", 1, first=2, model=model, opt=opt)
    check_equal(weights(model), torch.load(tmp_path / "dcp-straight.pt"), bound, ortho)
    # a plain state_dict() holds each rank's shards: loaded at another shard count, refused naming both
    saved = dict(opt.state_dict(), teonspeed_layout=reports[0]["fsdp2-TEON-model"]["layout"])
    with pytest.raises(ValueError) as err:
        opt.load_state_dict(saved)
    assert "'dp': 2" in str(err.value) and "torch.distributed.checkpoint" in str(err.value)


def user_oracle(name):
    """One process stepping `fsdp2_ranks.variant(name)` with the same gradients: weights, matrices."""
    model = fr.variant(name)
    opt = fr.make_optimizer(fr.kind_of(name), fr.variant_params(name, model))
    for step in range(1, fr.STEPS + 1):
        fr.user_step(model, opt, step, name, sharded=False)
    return weights(model), opt.grouping.ortho_names()


@pytest.mark.parametrize("name", ["mp", "clip", "frozen_tied", "accum"])
def test_fsdp2_user_cases_equal_one_process(fsdp2_run, name):
    """MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) (fp32 shards, the step sees fp32
    gradients); torch.nn.utils.clip_grad_norm_ on the DTensor gradients before step(); a frozen matrix,
    tied embeddings and three param groups (weight_decay, lr, adamw_lr of their own); gradient accumulation
    with model.set_requires_gradient_sync(False) on the first micro-batch (real gradients, exactly one
    process's: fsdp2_ranks.accumulated_step; checked here to the bit): each equals one
    process stepping the same gradients, within the module docstring's bound (the same arithmetic). As
    everywhere here the gradients are set to one process's fp32 gradients: under the policy this checks
    the step on fp32 shards beside bf16 compute copies, not the bf16 forward (FSDP2's own business)."""
    tmp_path, reports = fsdp2_run
    want, ortho = user_oracle(name)
    got = torch.load(tmp_path / f"user-{name}.pt")
    assert sorted(got) == sorted(want)
    assert all(r["user"][name]["grad_diff"] == 0.0 for r in reports)
    check_equal(got, want, sum(r["user"][name]["bound"] for r in reports), ortho)
    for report in reports:
        for sent, received, want_sent, want_received in report["user"][name]["stats"]:
            assert (sent, received) == (want_sent, want_received) and sent > 0


@pytest.mark.parametrize("name", ["bf16", "bf16_Muon", "bf16_HTMuon"])
def test_fsdp2_pure_bf16_parameters_equal_one_process_in_bf16(fsdp2_run, name):
    """bf16 sharded parameters (momentum and exchange in bf16), TEON, Muon and HTMuon: as close to one
    bf16 process as two bf16 runs of the same training are, 2λ·e₁₆ with e₁₆ the one bf16 process's
    distance from its fp32 twin of the same optimizer (test_deepspeed_zero3's bf16 bound); the bytes moved
    equal the plan's, and for TEON 2 bytes an element (the plan predicted 4 before the exchange's element
    size was passed to it)."""
    tmp_path, reports = fsdp2_run
    bf16, ortho = user_oracle(name)
    fp32, _ = user_oracle(name.replace("bf16", "fp32"))
    e16 = tol.distance(bf16, fp32, ortho)
    assert e16 > 0  # the bound is not vacuous: bf16 rounds away from the fp32 twin
    got = torch.load(tmp_path / f"user-{name}.pt")
    assert all(w.dtype == torch.bfloat16 for w in got.values())
    assert tol.distance(got, bf16, ortho) <= 2 * tol.LAMBDA * e16
    for report in reports:
        stats = report["user"][name]["stats"]
        fp32_stats = report["user"]["mp"]["stats"]  # TEON's model and plan with fp32 shards
        for (sent, received, want_sent, want_received), fp32_step in zip(stats, fp32_stats):
            assert (sent, received) == (want_sent, want_received) and sent > 0
            assert name != "bf16" or 2 * sent == fp32_step[0]


def test_fsdp2_nonfinite_gradient_on_one_rank_skips_the_step_on_every_rank(fsdp2_run):
    """A NaN in one rank's gradient chunk only: both ranks skip (warned), weights and state unchanged,
    and the next step runs on both (no rank left in the exchange)."""
    _, reports = fsdp2_run
    for rank, report in enumerate(reports):
        nan = report["user"]["nan"]
        assert nan["unchanged"] and nan["next_step"] == "ran"
        where = "layers.0.mlp.gate_proj.weight" if rank == 1 else "another rank's parameters"
        assert any(f"non-finite gradient in {where}; step skipped" in w for w in nan["warned"])


def test_fsdp2_htmuon_state_round_trips_resume_exactly(fsdp2_run):
    """HTMuon's state (heavy-tail every 2nd step): opt.load_state_dict(opt.state_dict()), a fresh optimizer
    loading a plain state_dict on the same ranks, and a torch.distributed.checkpoint save, each continued
    2 steps, equal the run that never stopped to the last bit."""
    _, reports = fsdp2_run
    for report in reports:
        assert report["user"]["htmuon"] == {"same_optimizer": True, "fresh_optimizer": True, "dcp": True}


def test_hsdp_and_fsdp2_x_tp_on_4_ranks_equal_one_process(tmp_path):
    torch.set_num_threads(1)
    reports = spawn("mesh2d", 4, tmp_path)
    keys = ("hsdp-TEON-model", "fsdp2_tp-TEON-model", "fsdp2_tp-Muon-named_parameters")
    # fsdp2_tp_mp: FSDP2 x TP under MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): fp32 shards,
    # the step on one process's fp32 gradients (as the 2-rank "mp" case), so the same fp32 bound
    for key in (*keys, "fsdp2_tp_mp-TEON-model"):
        layout, kind, entry = key.split("-")
        want, ortho = oracle(kind, entry, layout)
        check_equal(torch.load(tmp_path / f"{key}.pt"), want, model_bound(reports, key), ortho)
        for report in reports:
            assert report[key]["runner"] == "PartitionRunner"
            for sent, received, want_sent, want_received, _ in report[key]["stats"]:
                assert (sent, received) == (want_sent, want_received) and sent > 0
        # every job is computed once in the whole group: HSDP's replicas share the Newton-Schulz work
        assert sum(r[key]["flops"][0] for r in reports) == reports[0][key]["flops"][1] > 0
        if layout == "hsdp":
            assert all(r[key]["flops"][0] > 0 for r in reports)  # owners on both replicas
    # HSDP 2x2 -> one process: the HSDP ranks' DCP save after step 1 (each shard's 2 replicas saved once),
    # loaded and stepped in one process == the HSDP ranks' step 2, within their 2 steps' rounding budget
    # (the same argument as the 2 -> 1 reshard of the 2-rank run)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    model = fr.tiny("hsdp")
    opt = fr.make_optimizer("TEON", model)
    state = dcp_state(model, opt)
    dcp.load(state, checkpoint_id=str(tmp_path / "dcp-hsdp"))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    reference("TEON", "model", 1, first=2, model=model, opt=opt)
    check_equal(
        weights(model),
        torch.load(tmp_path / "hsdp-TEON-model.pt"),
        model_bound(reports, "hsdp-TEON-model"),
        ortho,
    )
    # a NaN in rank 3's chunk only: every rank skips (weights and state unchanged), the next step runs
    for layout in ("hsdp", "fsdp2_tp"):
        for rank, report in enumerate(reports):
            nan = report[f"nan-{layout}"]
            assert nan["unchanged"] and nan["next_step"] == "ran", (layout, rank)
            where = "layers.0.mlp.gate_proj.weight" if rank == 3 else "another rank's parameters"
            assert any(f"non-finite gradient in {where}; step skipped" in w for w in nan["warned"])
