"""The sharded-pieces core (parallel/sharded.py holds, zero_planner.plan_pieces, piece_exchange.FlatStep)
over gloo ranks equals the transform of the whole matrices, each rank keeping exactly its piece:

- FSDP2's dim-0 chunks, uneven (torch.chunk: 7 rows over 3 ranks = 3 + 3 + 1, 2 rows = 1 + 1 + none),
  a TEON stack whose members are chunked, the expert slices of a 3-D weight;
- HSDP: 2 replicas x 2 shards, replicas holding the same chunk, both getting the update;
- FSDP2 x TP: dim-0 chunks of TP shards (split on dim 0 or 1, or TP-replicated);
- DeepSpeed ZeRO-3: every parameter split evenly (ceil(numel / dp), the last padded), a rank's pieces of
  all parameters end to end in one tensor.
Measured bytes equal the plan's prediction, and every group is computed exactly once.
"""

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import pytest
import torch
import torch.distributed as dist

from teonspeed.grouping import LayerRef, MatrixRef, OrthoGroup
from teonspeed.ortho.unfold import fold, unfold
from teonspeed.parallel.flat import FlatStep
from teonspeed.parallel.owners import ns_flops
from teonspeed.parallel.pieces import TPSplit
from teonspeed.parallel.runner import StepIO
from teonspeed.parallel.shard_spec import shard_of
from teonspeed.parallel.sharded import dim0_chunk_holds, even_split_holds
from teonspeed.parallel.stats import CommStats
from teonspeed.parallel.zero_planner import plan_pieces
from support import tolerance as tol
from support.harness import run_ranks

Shape = Tuple[int, ...]


@dataclass(frozen=True)
class Case:
    matrices: Dict[str, Tuple[Shape, Optional[int]]]  # name: (full shape, TP split dim); 3-D: experts
    tp: int
    shards: int
    replicas: int = 1
    kind: str = "fsdp2"  # or "zero3"
    relay: Optional[bool] = None  # replicated pieces: slices back via the holders the owner read (HSDP)

    @property
    def dp(self) -> int:
        return self.shards * self.replicas

    @property
    def world(self) -> int:
        return self.tp * self.dp

    def refs(self, n):
        shape, _ = self.matrices[n]
        if len(shape) == 3:
            return [
                MatrixRef(n, LayerRef("expert", 0, i), shape[1:], expert_index=i) for i in range(shape[0])
            ]
        layer = LayerRef("q", int(n[1:])) if n.startswith("q") else LayerRef("other", None)
        return [MatrixRef(n, layer, shape)]

    def groups(self):
        stacked = [r for n in self.matrices if n.startswith("q") for r in self.refs(n)]
        singles = [OrthoGroup((r,)) for n in self.matrices if not n.startswith("q") for r in self.refs(n)]
        return ([OrthoGroup(tuple(stacked))] if stacked else []) + singles

    def local(self, values, t):
        """Name -> this TP rank's tensor of `values` (full tensors)."""
        return {n: shard_of(values[n], dim, t, self.tp) for n, (_, dim) in self.matrices.items()}

    def shapes(self):
        return {n: tuple(v.shape) for n, v in self.local(fulls(self), 0).items()}

    def holds(self):
        if self.kind == "zero3":
            return even_split_holds(list(self.shapes().items()), self.dp, key="partition")
        holders = [[r * self.shards + s for r in range(self.replicas)] for s in range(self.shards)]
        out = {}
        for n, shape in self.shapes().items():
            out.update(dim0_chunk_holds(n, shape, holders))
        return out

    def mine(self, local, d):
        """This DP index's stepped tensors of `local` (name -> TP-local tensor)."""
        if self.kind == "zero3":
            parts = []
            for n, v in local.items():
                size = -(-v.numel() // self.dp)
                flat = torch.cat([v.reshape(-1), v.new_zeros(size * self.dp - v.numel())])
                parts.append(flat[d * size : (d + 1) * size])
            return {"partition": torch.cat(parts)}
        s = d % self.shards
        out = {}
        for n, v in local.items():
            chunks = torch.chunk(v, self.shards)
            if s < len(chunks):
                out[n] = chunks[s].clone()
        return out


def fulls(case):
    out = {}
    for n, (shape, _) in case.matrices.items():
        g = torch.Generator().manual_seed(sum(map(ord, n)))
        out[n] = torch.randn(shape, generator=g)
    return out


def transform(x):
    return x @ x.mT @ x  # couples every entry of the stacked matrix: any mis-assembly shows


def step(rank, world_size, case):
    t, d = rank % case.tp, rank // case.tp
    work_rank = {(tt, dd): dd * case.tp + tt for tt in range(case.tp) for dd in range(case.dp)}
    plan = plan_pieces(
        case.groups(),
        case.holds(),
        case.shapes(),
        case.dp,
        case.tp,
        work_rank,
        cost=lambda g: ns_flops(g.stacked_shape, 5),
        tp_sharded=lambda m: case.matrices[m.name][1] is not None and case.tp > 1,
        relay=case.relay,
    )
    assert plan.relay == bool(case.relay)  # unforced: one node, where a relay round only adds latency
    runner = FlatStep(plan, d, rank, dist.group.WORLD)
    direction = case.mine(case.local(fulls(case), t), d)
    update, stats = {k: torch.zeros_like(v) for k, v in direction.items()}, CommStats()
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
        lambda m: TPSplit(case.matrices[m.name][1], 1),
        stats,
        like=torch.zeros(0),
    )
    owners = sorted(plan.position(j.owner) for j in plan.jobs)
    return update, (stats.sent, stats.received), runner.expected_bytes(4), stats.flops, owners


def check(case, results):
    expected, bounds = {n: torch.zeros(s) for n, (s, _) in case.matrices.items()}, {}
    bounds = {n: torch.zeros(s, dtype=torch.float64) for n, (s, _) in case.matrices.items()}
    values = fulls(case)
    for g in case.groups():
        whole = [
            values[m.name] if m.expert_index is None else values[m.name][m.expert_index] for m in g.members
        ]
        stack = unfold(whole, g.mode)
        out = transform(stack[None])[0]
        # (x xᵀ) x on the assembled stack, whichever rank computes it: each product's sums in another
        # order, entrywise sums(n)·(|x||x|ᵀ)|x| per product (two), times the scale 2 (exact)
        a = stack.double().abs()
        bound = 2.0 * 2 * tol.sums(torch.float32, max(stack.shape)) * (a @ a.mT @ a)
        k = len(g.members)
        for m, piece, slack in zip(g.members, fold(out, g.mode, k), fold(bound, g.mode, k)):
            where = (m.expert_index,) if m.expert_index is not None else ()
            expected[m.name][where] = 2.0 * piece
            bounds[m.name][where] = slack
    checked = 0
    for rank, (update, measured, predicted, *_) in enumerate(results):
        t, d = rank % case.tp, rank // case.tp
        want = case.mine(case.local(expected, t), d)
        slack = case.mine(case.local(bounds, t), d)
        assert sorted(update) == sorted(want)
        for key in want:
            assert ((update[key].double() - want[key].double()).abs() <= slack[key]).all(), (rank, key)
            checked += want[key].numel()
        assert measured == predicted
    assert checked >= case.tp * case.replicas * sum(v.numel() for v in values.values()) // case.tp
    assert sum(r[3] for r in results) == sum(ns_flops(g.stacked_shape, 5) for g in case.groups())  # no repeat
    return results[0][4]


MATRICES = {"q0": ((7, 4), None), "q1": ((7, 4), None), "a": ((5, 6), None), "tiny": ((2, 8), None)}
MATRICES_3D = dict(MATRICES, e=((3, 4, 5), None))
TP_MATRICES = {
    "q0": ((8, 6), 0),
    "q1": ((8, 6), 0),
    "a": ((6, 10), 1),
    "r": ((5, 3), None),
    "big": ((6, 16), 1),
}
CASES = {
    "fsdp2_uneven_dp3": Case(MATRICES_3D, tp=1, shards=3),
    "hsdp_2x2": Case(MATRICES_3D, tp=1, shards=2, replicas=2),
    "hsdp_2x2_relay": Case(MATRICES_3D, tp=1, shards=2, replicas=2, relay=True),
    "hsdp_3x1_relay": Case(MATRICES_3D, tp=1, shards=1, replicas=3, relay=True),  # two hops around the ring
    "fsdp2_tp2_dp2": Case(TP_MATRICES, tp=2, shards=2),
    "zero3_dp3": Case(MATRICES_3D, tp=1, shards=3, kind="zero3"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_sharded_pieces_equal_the_whole_matrix_transform(name):
    case = CASES[name]
    check(case, run_ranks(step, case.world, case, timeout=90))


def test_uneven_chunks_are_torch_chunk_and_padding_is_not_held():
    holds = dim0_chunk_holds("w", (7, 4), [[0], [1], [2]])["w"]
    assert [(h.holder, h.lo, h.hi) for h in holds] == [(0, 0, 12), (1, 12, 24), (2, 24, 28)]
    assert [h.holder for h in dim0_chunk_holds("w", (2, 8), [[0], [1], [2]])["w"]] == [0, 1]  # rank 2: none
    z = even_split_holds([("a", (5, 6)), ("b", (2, 2))], 4, key="p")  # a: 8 per rank (the last 6), b: 1
    assert [(h.holder, h.lo, h.hi, h.at) for h in z["a"]] == [
        (0, 0, 8, 0),
        (1, 8, 16, 0),
        (2, 16, 24, 0),
        (3, 24, 30, 0),
    ]
    assert [(h.holder, h.lo, h.hi, h.at) for h in z["b"]] == [
        (0, 0, 1, 8),
        (1, 1, 2, 8),
        (2, 2, 3, 8),
        (3, 3, 4, 8),
    ]


def test_a_layout_that_does_not_tile_a_matrix_is_refused_naming_it():
    from teonspeed.parallel.zero_partition import Hold

    groups = [OrthoGroup((MatrixRef("w", LayerRef("other", None), (4, 4)),))]
    with pytest.raises(ValueError, match="pieces of 'w' .* do not tile its 16 local elements"):
        plan_pieces(
            groups,
            {"w": (Hold(0, 0, 8), Hold(1, 6, 16))},
            {"w": (4, 4)},
            2,
            1,
            {(0, 0): 0, (0, 1): 1},
            cost=lambda g: 1.0,
            tp_sharded=lambda m: False,
        )
