"""What the step updates for DTensor parameters (PyTorch FSDP2's `fully_shard`, HSDP, FSDP2 x TP), and
where their matrices' pieces live.

The step reads and writes each parameter's local tensor (its FSDP chunk of its TP shard) and keeps the
state on local tensors too: no DTensor dispatch in the hot path. The state is stored as DTensors of the
parameter's mesh and placements (`LocalState` wraps and unwraps), so `torch.distributed.checkpoint` sees
global tensors and reshards them at load.

The pieces of every orthogonalized matrix are described to the sharded-pieces core (`parallel/sharded.py`,
one planner and one exchange for ZeRO-1/2/3, Megatron's buckets and this): each TP shard's dim-0 chunks as
FSDP2's `torch.chunk` cuts them (`parallel/dtensor_layout.py`), each held by its FSDP rank (under HSDP, by
that rank of every replica). Each matrix or TEON stack goes to one owner (balanced by Newton-Schulz FLOPs,
over the replicas too), is orthogonalized whole, and each holder gets its slice back.
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from ..parallel.cost import sharded_adamw_bytes
from ..parallel.dtensor_layout import is_dtensor
from ..parallel.partitioned import PartitionRunner
from ..parallel.sharded import PieceLayout, dim0_chunk_holds
from .stepped import ParamTensors, Stepped


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local tensor (a view of its storage), a plain tensor itself."""
    return t.to_local() if is_dtensor(t) else t


class LocalState(MutableMapping):
    """The state of DTensor parameter `p` as the step sees it: local tensors. Tensors stored into it are
    kept as DTensors with p's mesh and placements (what checkpoints read); numbers as they are."""

    def __init__(self, state: Dict[str, Any], p: torch.Tensor) -> None:
        self.state, self.p = state, p

    def __getitem__(self, key: str) -> Any:
        return local(self.state[key])

    def __setitem__(self, key: str, value: Any) -> None:
        if isinstance(value, torch.Tensor) and not is_dtensor(value):
            from torch.distributed.tensor import DTensor

            p = self.p
            value = DTensor.from_local(
                value, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
            )
        self.state[key] = value

    def __delitem__(self, key: str) -> None:
        del self.state[key]

    def __iter__(self):
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)


class DTensorTensors(ParamTensors):
    """Each DTensor parameter with a gradient, as its local tensor, keyed by its name."""

    # The state is per FSDP shard: a plain state_dict() records the FSDP size and is refused at another
    # (torch.distributed.checkpoint, which sees the DTensors, reshards instead)
    per_partition_state = True

    def stepped(self, opt) -> List[Stepped]:
        return [
            Stepped(name, local(p), local(p.grad), LocalState(opt.state[p], p), [(None, group)], [name])
            for group in opt.param_groups
            for p in group["params"]
            if p.grad is not None
            for name in [opt._names[id(p)]]
        ]

    def grads(self, opt) -> List[torch.Tensor]:
        """The local gradients. Every orthogonalized parameter has one when any has (the planned exchange
        carries all of them): refused here, before the step changes anything."""
        ortho = [p for g in opt.param_groups if g["route"] == "ortho" for p in g["params"]]
        missing = [opt._names[id(p)] for p in ortho if p.grad is None]
        if missing and len(missing) < len(ortho) and isinstance(opt.runner, PartitionRunner):
            raise ValueError(
                f"teonspeed: parameter {missing[0]!r} has no gradient this step while other FSDP-sharded "
                f"matrices have; the FSDP2 exchange plans every matrix each step: give it "
                f"requires_grad=False before building the optimizer, or leave it out of the params"
            )
        return super().grads(opt)

    def local_grad(self, p: torch.Tensor) -> torch.Tensor:
        return local(p.grad)


def attach_dtensor_layout(opt) -> None:
    """Describe DTensor parameters to the step (`opt.parallel` is a DTensorContext) and make its runner.
    The matrices are FSDP-chunked (dtensor_context refuses other DTensor layouts): a `PieceLayout` of the
    sharded-pieces core (each TP shard's dim-0 chunks, each held by its FSDP rank, under HSDP by that rank
    of every replica), planned over the tp x dp work group (collectives there: every rank constructs
    together). A world of one rank holds whole matrices: the local runner."""
    opt._tensors = DTensorTensors()
    ctx, ortho = opt.parallel, opt.grouping.ortho_names()
    if not (ctx.distributed and ortho):
        opt._runner = opt._make_runner()
        return
    _check_one_dtype(opt, ortho)
    ctx.dp_group = _replicas_and_shards_group(opt, ortho) or ctx.dp_group
    dp_ranks = dist.get_process_group_ranks(ctx.dp_group)
    holds, shapes, moved, device = {}, {}, 0, None
    for name in ortho:
        p, layout = opt._params_by_name[name], ctx.layouts[name]
        shapes[name] = layout.tp_shard_shape
        holds.update(dim0_chunk_holds(name, shapes[name], _holders(p, layout, dp_ranks)))
        # AdamW under FSDP2 moves, for the same matrices: the gradients' reduce-scatter, under HSDP the
        # all-reduce of the gradient shards over the replicas, and the parameters' all-gather twice per
        # step (forward, and backward again: fully_shard's default reshard_after_forward=True; measured
        # so on 2 gloo ranks, docs/performance.md's cost-model notes) (comm_stats.adamw_bytes, the yardstick)
        size, numel = p.element_size(), math.prod(shapes[name])
        replicas = math.prod(layout.mesh_shape[d] for d in layout.replicate_mesh_dims)
        moved += sharded_adamw_bytes(numel, layout.fsdp_size, size, size, replicas)
        device = local(p).device
    pieces = PieceLayout(holds, shapes, ctx.dp_group, dist.get_rank(ctx.dp_group), len(dp_ranks))
    # The exchange moves the stepped directions (the momentum, kept in the parameters' dtype: 2 bytes for
    # pure-bf16 sharded parameters, 4 under MixedPrecisionPolicy's fp32 shards) in the first one's dtype
    itemsize = opt._params_by_name[ortho[0]].element_size()
    opt.attach_layouts({"fsdp2": pieces}, opt._tensors, device=device, adamw_bytes=moved, itemsize=itemsize)


def _check_one_dtype(opt, ortho: List[str]) -> None:
    """The exchange sends every piece in one dtype (the stepped momenta's; a mixed buffer aborted gloo at
    the first step): refused here, on every rank before any collective."""
    first = opt._params_by_name[ortho[0]]
    for name in ortho:
        p = opt._params_by_name[name]
        if p.dtype != first.dtype:
            raise ValueError(
                f"teonspeed: FSDP-sharded matrices {ortho[0]!r} ({first.dtype}) and {name!r} ({p.dtype}) "
                f"have different dtypes; the exchange moves one: shard the model in one dtype (bf16 "
                f"compute with fp32 shards is MixedPrecisionPolicy(param_dtype=torch.bfloat16))"
            )


def _holders(p: torch.Tensor, layout, dp_ranks: List[int]) -> List[List[int]]:
    """holders[s]: the data-parallel indices (positions in `dp_ranks`) of the ranks holding FSDP chunk s
    of this rank's TP shard: one per replica."""
    mesh = p.device_mesh.mesh
    if layout.tp_mesh_dim is not None:  # the ranks of my TP shard
        mine = p.device_mesh.get_coordinate()[layout.tp_mesh_dim]
        mesh = mesh.select(layout.tp_mesh_dim, mine).unsqueeze(layout.tp_mesh_dim)
    mesh = mesh.movedim(layout.fsdp_mesh_dim, 0).reshape(layout.fsdp_size, -1)
    return [[dp_ranks.index(int(g)) for g in row] for row in mesh]


def _replicas_and_shards_group(opt, ortho: List[str]) -> Optional[dist.ProcessGroup]:
    """Under HSDP, the group of every replica's shard group (the whole mesh: dtensor_context refuses HSDP
    x TP), so that the owners are spread over the replicas too; created by every rank. None without
    replicas."""
    p = opt._params_by_name[ortho[0]]
    if not opt.parallel.layouts[ortho[0]].replicate_mesh_dims:
        return None
    return dist.new_group(sorted(p.device_mesh.mesh.reshape(-1).tolist()))
