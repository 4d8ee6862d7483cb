"""The ZeRO-1/2 flat step over TP=2 x DP gloo ranks equals the transform of the whole matrices: a
TP-sharded matrix spanning all three partitions, a TEON stack whose members sit in different partitions,
a local TP-sharded matrix and a TP-replicated one, each rank keeping exactly its slice; and a plan whose
balancing moved local jobs (TP-sharded and TP-replicated) to ranks of another partition."""

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

from teonspeed.grouping import LayerRef, MatrixRef, OrthoGroup
from teonspeed.ortho.unfold import fold, unfold
from teonspeed.parallel.cost import ClusterProfile
from teonspeed.parallel.flat import FlatEntry, FlatPartition, FlatStep
from teonspeed.parallel.owners import ns_flops
from teonspeed.parallel.pieces import TPSplit
from teonspeed.parallel.runner import StepIO
from teonspeed.parallel.stats import CommStats
from teonspeed.parallel.shard_spec import shard_of
from teonspeed.parallel.zero_planner import plan_zero_partition
from support import tolerance as tol
from support.harness import run_ranks

TP = 2


@dataclass(frozen=True)
class Layout:
    matrices: Dict[str, Tuple[Tuple[int, int], Optional[int]]]  # name: (full shape, TP split dim); flat order
    dp: int
    partition: int
    cluster: ClusterProfile = ClusterProfile()

    def groups(self):
        def ref(n):
            shape = self.matrices[n][0]
            return MatrixRef(
                n, LayerRef("q", int(n[1:])) if n.startswith("q") else LayerRef("other", None), shape
            )

        stacked = [n for n in self.matrices if n.startswith("q")]
        return ([OrthoGroup(tuple(ref(n) for n in stacked))] if stacked else []) + [
            OrthoGroup((ref(n),)) for n in self.matrices if not n.startswith("q")
        ]

    def local_flat(self, values, tp_rank):
        """The rank's TP-local flat buffer of `values` (full matrices), padded to DP partitions."""
        pieces = [shard_of(values[n], dim, tp_rank, TP).reshape(-1) for n, (_, dim) in self.matrices.items()]
        flat = torch.cat(pieces)
        return torch.cat([flat, flat.new_zeros(self.dp * self.partition - flat.numel())])


# local flat = 111 elements, padded to 3 x 38: big [36, 84) covers all three partitions
CUT = Layout(
    {"q0": ((4, 6), 0), "a": ((8, 6), 0), "big": ((6, 16), 1), "r": ((3, 5), None), "q1": ((4, 6), 0)},
    dp=3,
    partition=38,
)
# Partition 0 holds three heavy TP-sharded matrices and a TP-replicated one, partition 1 four light ones
# (448 local elements each); with NS FLOPs this slow, balancing moves h0 and r to partition 1's ranks.
MOVED = Layout(
    {
        "h0": ((16, 16), 0),
        "h1": ((16, 16), 1),
        "h2": ((16, 16), 0),
        "r": ((8, 8), None),
        "l0": ((2, 112), 1),
        "l1": ((2, 112), 1),
        "l2": ((2, 112), 1),
        "l3": ((2, 112), 1),
    },
    dp=2,
    partition=448,
    cluster=ClusterProfile(peak_flops=1e3, ns_efficiency=1.0, nvlink_bw=1e12, ib_bw=1e12),
)


def full(name, layout):
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    return torch.randn(layout.matrices[name][0], generator=g)


def transform(x):
    return x @ x.mT @ x  # couples every entry of the stacked matrix: any mis-assembly shows


def step(rank, world_size, layout):
    t, d = rank % TP, rank // TP
    entries, offset = [], 0
    for n, (shape, dim) in layout.matrices.items():
        local = list(shape)
        if dim is not None:
            local[dim] //= TP
        entries.append(FlatEntry(n, offset, tuple(local)))
        offset += local[0] * local[1]
    partition = FlatPartition(entries, layout.partition, None, d, layout.dp)
    work_rank = {(tt, dd): dd * TP + tt for tt in range(TP) for dd in range(layout.dp)}
    plan = plan_zero_partition(
        layout.groups(),
        {e.name: e.offset for e in entries},
        {e.name: e.shape for e in entries},
        layout.partition,
        layout.dp,
        TP,
        work_rank,
        cost=lambda g: ns_flops(g.stacked_shape, 5),
        tp_sharded=lambda m: layout.matrices[m.name][1] is not None,
        cluster=layout.cluster,
    )
    runner = FlatStep(plan, partition.dp_rank, rank, dist.group.WORLD)
    lo, hi = d * layout.partition, (d + 1) * layout.partition
    direction = layout.local_flat({n: full(n, layout) for n in layout.matrices}, t)[lo:hi]
    update, stats = torch.zeros_like(direction), CommStats()
    runner.run(
        direction,
        update,
        StepIO(
            {},
            {},
            transform,
            view=lambda m, unit: unit,
            store=lambda m, unit, value: unit.copy_(value),
            scale=lambda m: 2.0,
        ),
        lambda m: TPSplit(layout.matrices[m.name][1], 1),
        stats,
    )
    sent, received, flops = stats.sent, stats.received, stats.flops
    moved = [(m.name, plan.position(j.owner)[1]) for j in plan.moved for g in j.groups for m in g.members]
    return (
        update,
        (sent, received),
        runner.expected_bytes(4),
        flops,
        [(j.cut, j.partitions) for j in plan.jobs],
        moved,
    )


def check_equals_the_whole_matrix_transform(layout, results):
    expected, bounds = {}, {}
    for g in layout.groups():
        stack = unfold([full(m.name, layout) for m in g.members], g.mode)
        out = transform(stack[None])[0]
        # (x xᵀ) x on the assembled stack, whichever rank and batch computes it: each product's sums in
        # another order, entrywise sums(n)·(|x||x|ᵀ)|x| per product (two), times the scale 2 (exact)
        a = stack.double().abs()
        bound = 2.0 * 2 * tol.sums(torch.float32, max(stack.shape)) * (a @ a.mT @ a)
        k = len(g.members)
        for m, piece, slack in zip(g.members, fold(out, g.mode, k), fold(bound, g.mode, k)):
            expected[m.name], bounds[m.name] = 2.0 * piece, slack
    for rank, (update, measured, predicted, *_) in enumerate(results):
        t, d = rank % TP, rank // TP
        cut = slice(d * layout.partition, (d + 1) * layout.partition)
        want, slack = layout.local_flat(expected, t)[cut], layout.local_flat(bounds, t)[cut]
        assert ((update.double() - want.double()).abs() <= slack).all()
        assert measured == predicted
    assert sum(r[3] for r in results) == sum(
        ns_flops(g.stacked_shape, 5) for g in layout.groups()
    )  # no repeat


def test_flat_step_over_tp2_dp3_equals_the_whole_matrix_transform():
    results = run_ranks(step, TP * CUT.dp, CUT, timeout=60)
    jobs = results[0][4]
    assert (True, (0, 1)) in jobs or (True, (0, 2)) in jobs  # the TEON stack is cut
    assert (True, (0, 1, 2)) in jobs  # big spans three partitions
    assert any(not cut for cut, _ in jobs)
    check_equals_the_whole_matrix_transform(CUT, results)


def test_jobs_moved_to_another_partition_give_the_same_update():
    results = run_ranks(step, TP * MOVED.dp, MOVED, timeout=60)
    moved = dict(results[0][5])
    assert moved.get("h0") == 1 and moved.get("r") == 1  # TP-sharded and TP-replicated, off partition 0
    assert all(not cut for cut, _ in results[0][4])
    check_equals_the_whole_matrix_transform(MOVED, results)
