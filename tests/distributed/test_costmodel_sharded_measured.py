"""The sharded cost rows against the implementation: teonspeed's Muon and TEON on a `fully_shard`-ed model
(gloo, 2 and 4 ranks, and HSDP on 2 x 2) must move, on the busiest rank, exactly the bytes
bench/costmodel_sharded.py predicts and compute exactly its Newton–Schulz FLOPs (so the model's rows follow
what the step does). Skipped where this tree still refuses FSDP2 at construction."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from support.harness import run_ranks  # noqa: E402
from tiny_models import TinyLlama  # noqa: E402

SHAPE = dict(layers=2, d=32, kv=16, ffn=85, vocab=256)


def _fsdp2_step(rank, world_size, optimizer, replicas, relay=None):
    import functools

    import teonspeed
    import teonspeed.parallel.flat as flat

    if relay is not None:  # the plan's choice forced (by default one node picks the flat plan)
        flat.plan_pieces = functools.partial(flat.plan_pieces, relay=relay)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = TinyLlama(**SHAPE)
    if replicas > 1:  # HSDP: replicate x shard
        mesh = init_device_mesh("cpu", (replicas, world_size // replicas), mesh_dim_names=("rep", "shard"))
        fully_shard(model, mesh=mesh)
    else:
        fully_shard(model)
    try:
        opt = getattr(teonspeed, optimizer)(model)
    except ValueError as refusal:  # FSDP2 not supported in this tree: one line naming it
        return ("refused", str(refusal))
    out = []
    for step in range(2):
        g = torch.Generator().manual_seed(100 * step + rank)
        tokens = torch.randint(0, SHAPE["vocab"], (4, 16), generator=g)
        model(tokens, torch.roll(tokens, -1, 1)).backward()
        opt.step()
        opt.zero_grad()
        s = opt.comm_stats
        out.append((s.sent, s.received, s.flops))
    return ("ok", out)


@pytest.mark.parametrize(
    "world_size,replicas,relay", [(2, 1, None), (4, 1, None), (4, 2, None), (4, 2, True)]
)
@pytest.mark.parametrize("optimizer,key", [("Muon", "muon"), ("TEON", "teon")])
def test_fsdp2_bytes_and_flops_equal_the_cost_model(world_size, replicas, relay, optimizer, key):
    """(4, 2): HSDP, 2 replicas x 2 shards: each piece read from the nearest holder, each slice sent to
    every replica's holder (the plan chosen on one node); relayed: the slices sent to the holders read,
    then a ring round to the other replica (the cost model's `hierarchical`)."""
    import costmodel_sharded as cs

    torch.set_num_threads(1)
    results = run_ranks(_fsdp2_step, world_size, optimizer, replicas, relay, timeout=600)
    if results[0][0] == "refused":
        pytest.skip(f"FSDP2 refused here: {results[0][1]}")
    model = TinyLlama(**SHAPE)
    matrices = [
        (n, tuple(p.shape))
        for n, p in model.named_parameters()
        if p.dim() >= 2 and "embed" not in n and "lm_head" not in n
    ]
    a = cs.Assumptions()
    layout, shard = ("hsdp", world_size // replicas) if replicas > 1 else ("fsdp2", world_size)
    jobs = cs.jobs_of(matrices, key, a)
    cost = cs.teonspeed_cost(jobs, layout, world_size, a, shard=shard, hierarchical=bool(relay))
    steps = [s for _, rank_steps in results for s in rank_steps]
    assert max(max(sent, received) for sent, received, _ in steps) == cost.bytes_max
    assert max(flops for _, _, flops in steps) == cost.flops_max
