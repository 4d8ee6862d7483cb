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
FFN = {"fsdp2": 25, "hsdp": 25, "fsdp2_tp": 22}


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
    from torch.distributed.fsdp import fully_shard

    model = tiny(layout)
    if layout == "fsdp2_tp":
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
    fully_shard(model, mesh=mesh)
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
        for layout, kind, entry in cases:
            if layout != "fsdp2":
                names = ("replicate", "shard") if layout == "hsdp" else ("dp", "tp")
                mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=names)
            model = sharded_model(layout, mesh)
            opt = make_optimizer(kind, entry_params(model, entry))
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
            if scenario == "fsdp2" and kind == "TEON":
                report["checkpoints"] = checkpoints(mesh, out_dir, rank)
                report["refusals"] = refusals(mesh)
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

    def save(model, opt, path):
        dcp.save(
            {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
            checkpoint_id=path,
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
    save(model, opt, os.path.join(out_dir, "dcp-2ranks"))
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
