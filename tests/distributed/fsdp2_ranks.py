"""The spawned ranks of test_fsdp2.py (a module of its own: spawned children import it by name).

Each rank builds the model the user builds (TinyLlama, `fully_shard` at the root; HSDP on a
replicate x shard mesh; FSDP2 x TP with `parallelize_module` on mesh["tp"] first), runs a real forward and
backward, then sets every gradient to the one-process gradient of the same weights (the unsharded model's
backward on the same batch, cut by DTensor's own `distribute_tensor`): the updates are then compared with
one process on equal inputs, whatever TP's forward rounds differently. Rank 0 writes the full weights.
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

import teonspeed
from tiny_models import TinyLlama

LR, ADAMW_LR, WD = 0.02, 1e-3, 0.01
STEPS = 2
TP_PLAN = {
    "self_attn.q_proj": "col",
    "self_attn.k_proj": "col",
    "self_attn.v_proj": "col",
    "self_attn.o_proj": "row",
    "mlp.gate_proj": "col",
    "mlp.down_proj": "row",
}


# gate_proj's rows: FSDP2 and HSDP cut 25 into chunks of 13 and 12; TP cuts 22 into 11s, FSDP those into 6
# and 5 (uneven chunks through the whole step, not only in the layout's unit test)
FFN = {"fsdp2": 25, "hsdp": 25, "fsdp2_tp": 22, "fsdp2_tp_mp": 22}  # _mp: FSDP2 x TP, MixedPrecisionPolicy


def tiny(layout):
    return TinyLlama(layers=2, ffn=FFN[layout])


def batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(32, (2, 8), generator=g)
    return tokens, torch.roll(tokens, -1, dims=1)


def entry_params(model, entry):
    """The three ways users hand parameters to an optimizer."""
    if entry == "model":
        return model
    if entry == "named_parameters":
        return model.named_parameters()
    named = list(model.named_parameters())
    return [
        {"params": [(n, p) for n, p in named if p.ndim >= 2 and "mlp" not in n]},
        {"params": [(n, p) for n, p in named if p.ndim >= 2 and "mlp" in n], "lr": LR / 2},
        {"params": [(n, p) for n, p in named if p.ndim < 2], "adamw_weight_decay": 0.0},
    ]


def make_optimizer(kind, params):
    return getattr(teonspeed, kind)(params, lr=LR, adamw_lr=ADAMW_LR, weight_decay=WD)


def sharded_model(layout, mesh):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = tiny(layout)
    if layout.startswith("fsdp2_tp"):
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            RowwiseParallel,
            parallelize_module,
        )

        styles = {"col": ColwiseParallel, "row": RowwiseParallel}
        plan = {f"layers.{i}.{k}": styles[v]() for i in range(2) for k, v in TP_PLAN.items()}
        parallelize_module(model, mesh["tp"], plan)
        mesh = mesh["dp"]
    # TinyLlama's forward calls its blocks' parts, not the blocks: one FSDP unit at the root
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    fully_shard(model, mesh=mesh, **({"mp_policy": policy} if layout.endswith("_mp") else {}))
    return model


def set_reference_grads(model, step, layout):
    """Every gradient := the one-process gradient of the same weights on the same batch."""
    from torch.distributed.tensor import distribute_tensor

    ref = tiny(layout)
    with torch.no_grad():
        for (name, p), (_, r) in zip(model.named_parameters(), ref.named_parameters()):
            r.copy_(p.full_tensor())
    ref(*batch(step)).backward()
    for (name, p), (_, r) in zip(model.named_parameters(), ref.named_parameters()):
        local = distribute_tensor(r.grad, p.device_mesh, p.placements, src_data_rank=None).to_local()
        p.grad.to_local().copy_(local)


def train(model, opt, steps, layout, first=1):
    from support import tolerance as tol

    budget = tol.RoundingBudget(opt)
    stats = []
    for step in range(first, first + steps):
        model(*batch(step)).backward()  # FSDP2's own backward: the gradients' DTensors and hooks
        set_reference_grads(model, step, layout)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sent, received = opt.comm_stats.sent, opt.comm_stats.received
        stats.append([sent, received, *opt.zero_expected_bytes(), opt.comm_stats.adamw_bytes])
    return budget.weights(LR), stats


def full_weights(model):
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


def chunk_bytes(opt):
    """This rank's bytes per step predicted from the layout alone (FSDP2, one TP rank): each matrix's
    owner receives every other rank's chunk and returns its update slice; a non-owner sends and receives
    its chunk. Owners from the plan."""
    from teonspeed.parallel.dtensor_layout import describe_parameter

    me = dist.get_rank()
    total = 0
    for job in opt.zero_plans[0].jobs:
        for u in job.units:
            layout = describe_parameter(u.name, opt.parameters_by_name[u.name])
            lo, hi = layout.local_range(me)
            whole = layout.local_range(0)[0], layout.local_range(dist.get_world_size() - 1)[1]
            total += (whole[1] - whole[0] - (hi - lo) if job.owner == me else hi - lo) * 4
    return total


def run(rank, world_size, port, out_dir, scenario):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    report = {}
    try:
        from torch.distributed.device_mesh import init_device_mesh

        if scenario == "fsdp2":
            mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
            cases = [("fsdp2", "TEON", "model"), ("fsdp2", "Muon", "named_parameters")]
            cases.append(("fsdp2", "HTMuon", "param_groups"))
        else:
            cases = [("hsdp", "TEON", "model"), ("fsdp2_tp", "TEON", "model")]
            cases.append(("fsdp2_tp", "Muon", "named_parameters"))
            cases.append(("fsdp2_tp_mp", "TEON", "model"))
        for layout, kind, entry in cases:
            if layout != "fsdp2":
                names = ("replicate", "shard") if layout == "hsdp" else ("dp", "tp")
                mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=names)
            model = sharded_model(layout, mesh)
            opt = make_optimizer(kind, entry_params(model, entry))
            if layout == "hsdp":  # a DCP save after step 1: the parent loads it in one process
                bound, stats = train(model, opt, 1, layout)
                dcp_save(model, opt, os.path.join(out_dir, "dcp-hsdp"))
                more = train(model, opt, STEPS - 1, layout, first=2)
                bound, stats = bound + more[0], stats + more[1]
            else:
                bound, stats = train(model, opt, STEPS, layout)
            key = f"{layout}-{kind}-{entry}"
            report[key] = {"bound": bound, "stats": stats, "runner": type(opt.runner).__name__}
            report[key]["plan"] = str(opt.plan)
            report[key]["flops"] = [
                opt.comm_stats.flops,
                sum(j.flops for p in opt.zero_plans for j in p.jobs),
            ]
            if layout == "fsdp2" and kind == "TEON":
                report[key]["layout_bytes"] = chunk_bytes(opt)
                report[key]["layout"] = opt.layout()  # what a plain state_dict() records
            weights = full_weights(model)
            if rank == 0:
                torch.save(weights, os.path.join(out_dir, f"{key}.pt"))
            if layout in ("hsdp", "fsdp2_tp") and kind == "TEON":
                report[f"nan-{layout}"] = nan_on_one_rank(layout, mesh, rank, 3)
            if scenario == "fsdp2" and kind == "TEON":
                report["checkpoints"] = checkpoints(mesh, out_dir, rank)
                report["refusals"] = refusals(mesh)
                report["user"] = user_cases(mesh, out_dir, rank)
            del opt, model
    finally:
        with open(os.path.join(out_dir, f"{scenario}-{rank}.json"), "w") as f:
            json.dump(report, f)
        # Every rank leaves gloo together: a rank exiting during another's teardown aborts it (SIGABRT).
        dist.barrier()
        dist.destroy_process_group()
    # Leave without the interpreter's teardown (FSDP2's sharded parameters outlive the group; tearing them
    # down after it aborted about 1 run in 5). The results are on disk already.
    os._exit(0)


def dcp_save(model, opt, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    dcp.save(
        {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
        checkpoint_id=path,
    )


def checkpoints(mesh, out_dir, rank):
    """torch.distributed.checkpoint, as users save and load: (a) step 1, save, step 2, against a fresh
    model and optimizer loading that save and taking step 2 (the same 2 ranks: exact); (b) a save made by
    one process after step 1 (test_fsdp2 writes it), loaded here on 2 ranks and stepped; its weights go
    to the parent (one process's step 2 is the oracle). The parent loads (a)'s save in one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    def load(path):
        model = sharded_model("fsdp2", mesh)
        opt = make_optimizer("TEON", model)
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])
        return model, opt

    model = sharded_model("fsdp2", mesh)
    opt = make_optimizer("TEON", model)
    budget = train(model, opt, 1, "fsdp2")[0]
    dcp_save(model, opt, os.path.join(out_dir, "dcp-2ranks"))
    budget += train(model, opt, 1, "fsdp2", first=2)[0]
    straight = full_weights(model)
    resumed_model, resumed_opt = load(os.path.join(out_dir, "dcp-2ranks"))
    train(resumed_model, resumed_opt, 1, "fsdp2", first=2)
    resumed = full_weights(resumed_model)
    exact = all(torch.equal(straight[n], resumed[n]) for n in straight)
    one_model, one_opt = load(os.path.join(out_dir, "dcp-1rank"))
    train(one_model, one_opt, 1, "fsdp2", first=2)
    if rank == 0:
        torch.save(straight, os.path.join(out_dir, "dcp-straight.pt"))
        torch.save(full_weights(one_model), os.path.join(out_dir, "dcp-from-1rank.pt"))
    else:
        full_weights(one_model)
    return {"resumed_exactly": exact, "bound": budget}


def refusals(mesh):
    """What teonspeed cannot describe is refused at construction, one line, on every rank."""
    from torch.distributed.tensor import DTensor, Partial

    dtensor = torch.nn.Parameter(DTensor.from_local(torch.ones(4, 4), mesh, [Partial()], run_check=False))
    plain = torch.nn.Parameter(torch.ones(4, 4))
    out = {}
    for case, params in {"partial": [("w", dtensor)], "plain": [("a", dtensor), ("b", plain)]}.items():
        try:
            teonspeed.Muon(params)
            out[case] = None
        except ValueError as err:
            out[case] = str(err)
    # matrices of two dtypes (a bf16 block beside fp32 ones, each its own FSDP unit): the exchange moves one
    from torch.distributed.fsdp import fully_shard

    model = tiny("fsdp2")
    model.layers[0].to(torch.bfloat16)
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    try:
        make_optimizer("TEON", model)
        out["mixed_dtype"] = None
    except ValueError as err:
        out["mixed_dtype"] = str(err)
    # the optimizer built before fully_shard (which re-creates the parameters): its step would change nothing
    model = tiny("fsdp2")
    opt = make_optimizer("TEON", model)
    fully_shard(model, mesh=mesh)
    model(*batch(1)).backward()
    try:
        opt.step()
        out["built_before_sharding"] = None
    except ValueError as err:
        out["built_before_sharding"] = str(err)
    # a step where one sharded matrix has no gradient (the exchange plans all of them): refused before
    # anything changes
    model = sharded_model("fsdp2", mesh)
    opt = make_optimizer("TEON", model)
    model(*batch(1)).backward()
    model.layers[0].mlp.down_proj.weight.grad = None
    before = {n: p.to_local().clone() for n, p in model.named_parameters()}
    try:
        opt.step()
        out["no_grad"] = None
    except ValueError as err:
        out["no_grad"] = str(err)
    same = all(torch.equal(before[n], p.to_local()) for n, p in model.named_parameters())
    out["unchanged"] = "yes" if same and not opt.state else "no"
    return out


# -- the cases a real FSDP2 user hits (test_fsdp2.test_fsdp2_user_cases_...) -----------------------------
CLIP = 0.05  # below the tiny model's gradient norm (~0.5): the clip acts


def variant(name):
    """The unsharded model of a user case (the one-process oracle builds the same)."""
    model = tiny("fsdp2")
    if name == "frozen_tied":  # a frozen matrix and tied embeddings, as HF's tie_word_embeddings
        model.layers[0].mlp.gate_proj.weight.requires_grad_(False)
        model.lm_head.weight = model.embed_tokens.weight
    if name.startswith("bf16"):
        model = model.to(torch.bfloat16)
    return model


def kind_of(name):
    """The optimizer of a user case: "bf16_Muon" and its fp32 twin "fp32_Muon" step Muon; others TEON."""
    return name.split("_")[1] if name.startswith(("bf16_", "fp32_")) else "TEON"


def variant_params(name, model):
    if name != "frozen_tied":
        return model
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [  # a matrix group per weight decay and lr, an AdamW group with its own lr
        {"params": [(n, p) for n, p in named if p.ndim >= 2 and "mlp" in n], "weight_decay": 0.1},
        {"params": [(n, p) for n, p in named if p.ndim >= 2 and "mlp" not in n], "lr": LR / 2},
        {"params": [(n, p) for n, p in named if p.ndim < 2], "adamw_lr": 3 * ADAMW_LR},
    ]


def user_grads(model, step, name, sharded=True):
    """The one-process gradient of `variant(name)` at the model's weights (fp32 backward, cast to the
    parameters' dtype), set as the gradient: the same numbers on both sides."""
    from torch.distributed.tensor import distribute_tensor

    ref = variant("frozen_tied" if name == "frozen_tied" else "fp32").float()
    with torch.no_grad():
        for (_, p), (_, r) in zip(model.named_parameters(), ref.named_parameters()):
            r.copy_(p.full_tensor() if sharded else p)
    ref(*batch(step)).backward()
    for (_, p), (_, r) in zip(model.named_parameters(), ref.named_parameters()):
        if r.grad is None:
            continue
        g = r.grad.to(p.dtype)
        if sharded:
            g = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None).to_local()
            p.grad.to_local().copy_(g)
        else:
            p.grad = g


def accumulated_step(model, opt, step, sharded):
    """Gradient accumulation as FSDP2 users write it: a micro-batch without gradient sync, then the last
    one with it. Every rank runs the same micro-batches (replicated data), so FSDP2's average over the
    ranks of identical sums is exact: the gradients are one process's, bit for bit (returned: the largest
    difference from one process's two backwards, computed here)."""
    micro = [batch(step + 10), batch(step)]
    if sharded:
        model.set_requires_gradient_sync(False)
        model(*micro[0]).backward()
        model.set_requires_gradient_sync(True)
        model(*micro[1]).backward()
        ref = tiny("fsdp2")
        with torch.no_grad():
            for (_, p), (_, r) in zip(model.named_parameters(), ref.named_parameters()):
                r.copy_(p.full_tensor())
    for tokens, labels in micro:
        (ref if sharded else model)(tokens, labels).backward()
    diff = 0.0
    if sharded:
        for (_, p), (_, r) in zip(model.named_parameters(), ref.named_parameters()):
            diff = max(diff, float((p.grad.full_tensor() - r.grad).abs().max()))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return diff


def user_step(model, opt, step, name, sharded=True):
    if name == "accum":
        return accumulated_step(model, opt, step, sharded)
    if sharded:
        model(*batch(step)).float().backward()
    else:
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
    user_grads(model, step, name, sharded)
    if name == "clip":
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)  # DTensor grads under FSDP2
    opt.step()
    opt.zero_grad(set_to_none=True)


def user_cases(mesh, out_dir, rank):
    """Each case's weights after STEPS (rank 0 writes them; the parent compares with one process) and
    what else the case checks; on 2 ranks."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from support import tolerance as tol

    out = {}
    for name in ("mp", "clip", "frozen_tied", "bf16", "bf16_Muon", "bf16_HTMuon", "accum"):
        model = variant(name)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        fully_shard(model, mesh=mesh, **({"mp_policy": policy} if name == "mp" else {}))
        opt = make_optimizer(kind_of(name), variant_params(name, model))
        budget = tol.RoundingBudget(opt)
        stats, grad_diff = [], 0.0
        for step in range(1, STEPS + 1):
            grad_diff = max(grad_diff, user_step(model, opt, step, name) or 0.0)
            stats.append([opt.comm_stats.sent, opt.comm_stats.received, *opt.zero_expected_bytes()])
        out[name] = {"bound": budget.weights(LR), "stats": stats, "grad_diff": grad_diff}
        weights = full_weights(model)
        if rank == 0:
            torch.save(weights, os.path.join(out_dir, f"user-{name}.pt"))
    out["nan"] = nan_on_one_rank("fsdp2", mesh, rank, 1)
    out["htmuon"] = htmuon_round_trips(mesh, out_dir)
    return out


def nan_on_one_rank(layout, mesh, rank, bad):
    """A non-finite gradient in rank `bad`'s local chunk only (gate_proj: sharded by FSDP, and by TP in
    fsdp2_tp): every rank skips, weights and state unchanged; the next step runs on every rank."""
    import warnings

    model = sharded_model(layout, mesh)
    opt = make_optimizer("TEON", model)
    model(*batch(1)).backward()
    set_reference_grads(model, 1, layout)
    opt.step()
    opt.zero_grad(set_to_none=True)
    model(*batch(2)).backward()
    set_reference_grads(model, 2, layout)
    if rank == bad:
        model.layers[0].mlp.gate_proj.weight.grad.to_local()[0, 0] = float("nan")
    before = {n: p.to_local().clone() for n, p in model.named_parameters()}
    state = {
        n: {k: local(v).clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
        for n, p in model.named_parameters()
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    same = all(torch.equal(before[n], p.to_local()) for n, p in model.named_parameters())
    same_state = all(
        torch.equal(local(v), state[n][k]) if isinstance(v, torch.Tensor) else v == state[n][k]
        for n, p in model.named_parameters()
        for k, v in opt.state[p].items()
    )
    opt.zero_grad(set_to_none=True)
    model(*batch(3)).backward()
    opt.step()  # the next step runs on every rank (no rank left in the exchange)
    moved = not all(torch.equal(before[n], p.to_local()) for n, p in model.named_parameters())
    warned = [str(w.message) for w in caught]
    return {"warned": warned, "unchanged": same and same_state, "next_step": "ran" if moved else "no"}


def local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def htmuon_round_trips(mesh, out_dir):
    """HTMuon (heavy-tail every 2nd step, its own state) under FSDP2: step 1, then (a) the same optimizer's
    opt.load_state_dict(opt.state_dict()), (b) a fresh optimizer loading that plain state_dict, (c) a fresh
    model and optimizer loading a torch.distributed.checkpoint save; each continued for 2 steps equals
    the run that never stopped, to the last bit."""
    import copy

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    def build():
        model = sharded_model("fsdp2", mesh)
        return model, teonspeed.HTMuon(model, lr=LR, adamw_lr=ADAMW_LR, weight_decay=WD, ht_interval=2)

    def run(model, opt, first, steps):
        for step in range(first, first + steps):
            user_step(model, opt, step, "fp32")
        return full_weights(model)

    model, opt = build()
    run(model, opt, 1, 1)
    saved = copy.deepcopy(opt.state_dict())
    path = os.path.join(out_dir, "dcp-htmuon")
    dcp.save(
        {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
        checkpoint_id=path,
    )
    model_b, opt_b = build()  # (b): the same weights, a fresh optimizer
    with torch.no_grad():
        for p, q in zip(model_b.parameters(), model.parameters()):
            p.to_local().copy_(q.to_local())
    opt.load_state_dict(opt.state_dict())  # (a)
    straight = run(model, opt, 2, 2)
    opt_b.load_state_dict(saved)
    plain = run(model_b, opt_b, 2, 2)
    model_c, opt_c = build()
    state = {"model": get_model_state_dict(model_c), "optim": get_optimizer_state_dict(model_c, opt_c)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model_c, state["model"])
    set_optimizer_state_dict(model_c, opt_c, state["optim"])
    resumed = run(model_c, opt_c, 2, 2)
    model_d, opt_d = build()  # the run that never stopped
    never = run(model_d, opt_d, 1, 3)
    return {
        case: all(torch.equal(w[n], never[n]) for n in never)
        for case, w in {"same_optimizer": straight, "fresh_optimizer": plain, "dcp": resumed}.items()
    }
