"""The ZeRO-1/2 flat step over TP=2 x DP=3 gloo ranks equals the transform of the whole matrices: a
TP-sharded matrix spanning all three partitions, a TEON stack whose members sit in different partitions,
a local TP-sharded matrix and a TP-replicated one, each rank keeping exactly its slice."""
import torch
import torch.distributed as dist

from teonspeed.grouping import LayerRef, MatrixRef, OrthoGroup
from teonspeed.ortho.unfold import fold, unfold
from teonspeed.parallel.flat import FlatEntry, FlatPartition, FlatStep
from teonspeed.parallel.owners import ns_flops
from teonspeed.parallel.shard_spec import shard_of
from teonspeed.parallel.zero_partition import plan_zero_partition
from teonspeed.testing.harness import run_ranks

TP, DP = 2, 3
# name: (full shape, TP split dim or None); flat order as listed
MATRICES = {"q0": ((4, 6), 0), "a": ((8, 6), 0), "big": ((6, 16), 1), "r": ((3, 5), None), "q1": ((4, 6), 0)}
PARTITION = 38  # local flat = 111 elements, padded to 3 x 38: big [36, 84) covers all three partitions


def groups():
    ref = {n: MatrixRef(n, LayerRef("q" if n.startswith("q") else "other", int(n[1:]) if n.startswith("q") else None),
                        shape) for n, (shape, _) in MATRICES.items()}
    return [OrthoGroup((ref["q0"], ref["q1"])), OrthoGroup((ref["a"],)), OrthoGroup((ref["big"],)),
            OrthoGroup((ref["r"],))]


def full(name):
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    return torch.randn(MATRICES[name][0], generator=g)


def transform(x):
    return x @ x.mT @ x  # couples every entry of the stacked matrix: any mis-assembly shows


def local_flat(values, tp_rank):
    """The rank's TP-local flat buffer of `values` (full matrices), padded to DP partitions."""
    pieces = [shard_of(values[n], dim, tp_rank, TP).reshape(-1) for n, (_, dim) in MATRICES.items()]
    flat = torch.cat(pieces)
    return torch.cat([flat, flat.new_zeros(DP * PARTITION - flat.numel())])


def step(rank, world_size):
    t, d = rank % TP, rank // TP
    entries, offset = [], 0
    for n, (shape, dim) in MATRICES.items():
        local = list(shape)
        if dim is not None:
            local[dim] //= TP
        entries.append(FlatEntry(n, offset, tuple(local)))
        offset += local[0] * local[1]
    partition = FlatPartition(entries, PARTITION, None, d, DP)
    work_rank = {(tt, dd): dd * TP + tt for tt in range(TP) for dd in range(DP)}
    plan = plan_zero_partition(groups(), {e.name: e.offset for e in entries}, {e.name: e.shape for e in entries},
                               PARTITION, DP, TP, work_rank, cost=lambda g: ns_flops(g.stacked_shape, 5),
                               tp_sharded=lambda m: MATRICES[m.name][1] is not None)
    runner = FlatStep(plan, partition, rank, dist.group.WORLD)
    direction = local_flat({n: full(n) for n in MATRICES}, t)[d * PARTITION:(d + 1) * PARTITION]
    update, sent, received, flops = runner.run(direction, transform, read=lambda m, unit: unit,
                                               write=lambda m, unit, value: unit.copy_(value),
                                               placement=lambda m: (MATRICES[m.name][1], 1), scale=lambda m: 2.0)
    return update, (sent, received), runner.expected_bytes(4), flops, [(j.cut, j.partitions) for j in plan.jobs]


def test_flat_step_over_tp2_dp3_equals_the_whole_matrix_transform():
    results = run_ranks(step, TP * DP, timeout=60)
    expected = {}
    for g in groups():
        out = transform(unfold([full(m.name) for m in g.members], g.mode)[None])[0]
        for m, piece in zip(g.members, fold(out, g.mode, len(g.members))):
            expected[m.name] = 2.0 * piece
    jobs = results[0][4]
    assert (True, (0, 1)) in jobs or (True, (0, 2)) in jobs  # the TEON stack is cut
    assert (True, (0, 1, 2)) in jobs  # big spans three partitions
    assert any(not cut for cut, _ in jobs)
    for rank, (update, measured, predicted, _, _) in enumerate(results):
        t, d = rank % TP, rank // TP
        want = local_flat(expected, t)[d * PARTITION:(d + 1) * PARTITION]
        torch.testing.assert_close(update, want, rtol=1e-5, atol=1e-5)
        assert measured == predicted
    assert sum(r[3] for r in results) == sum(ns_flops(g.stacked_shape, 5) for g in groups())  # no repeated work
