"""What the step updates for DTensor parameters (PyTorch FSDP2's `fully_shard`, HSDP, FSDP2 x TP), and
where their matrices' pieces live.

The step reads and writes each parameter's local tensor (its FSDP chunk of its TP shard) and keeps the
state on local tensors too: no DTensor dispatch in the hot path. The state is stored as DTensors of the
parameter's mesh and placements (`LocalState` wraps and unwraps), so `torch.distributed.checkpoint` sees
global tensors and reshards them at load.

The pieces of every orthogonalized matrix are described to the flat-partition planner (`partitioned.py`)
as one flat buffer per parameter (a TP shard, flattened), cut over the FSDP group into ceil-sized
partitions, as FSDP2's dim-0 `torch.chunk` cuts it (`parallel/dtensor_layout.py`); all of them planned
together like Megatron's buckets: each matrix or TEON stack goes to one owner (balanced by Newton-Schulz
FLOPs), is orthogonalized whole, and each holder gets its slice back. The last ranks' chunks are shorter
than a partition: they are padded to it for the exchange (a copy of those chunks only).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import MutableMapping
from typing import Any, Dict, List

import torch
import torch.distributed as dist

from ..parallel.cost import adamw_bytes
from ..parallel.distributed import DistributedRunner
from ..parallel.dtensor_layout import is_dtensor
from ..parallel.flat import FlatEntry, FlatPartition
from ..parallel.partitioned import PartitionRunner
from ..parallel.runner import StepIO
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
        return [local(p.grad) for g in opt.param_groups for p in g["params"] if p.grad is not None]

    def nonfinite(self, opt) -> List[str]:
        return [
            opt._names[id(p)]
            for g in opt.param_groups
            for p in g["params"]
            if p.grad is not None and not bool(torch.isfinite(local(p.grad)).all())
        ]


class DTensorPartitionRunner(PartitionRunner):
    """The flat-partition runner over FSDP chunks: each key's local chunk padded to its partition where
    it is shorter (the last FSDP ranks), the planned exchange run, and the padding dropped again."""

    def run(self, groups, io: StepIO) -> None:
        directions, updates, back = {}, {}, []
        for key, fp in self.partitions.items():
            flat = io.directions[key].reshape(-1)
            if flat.numel() == fp.partition_size:
                directions[key], updates[key] = flat, io.updates[key].view(-1)
                continue
            padded = flat.new_zeros(fp.partition_size)
            padded[: flat.numel()] = flat
            directions[key], updates[key] = padded, torch.zeros_like(padded)
            back.append((io.updates[key], updates[key]))
        super().run(groups, dataclasses.replace(io, directions=directions, updates=updates))
        for target, padded in back:
            target.view(-1).copy_(padded[: target.numel()])


def attach_dtensor_layout(opt) -> None:
    """Describe DTensor parameters to the step (`opt.parallel` is a DTensorContext). FSDP-chunked matrices
    are planned over the tp x FSDP work group (a collective there: every rank constructs together); TP
    shards that FSDP does not chunk are whole on each rank and run on the distributed runner as they are."""
    opt._tensors = DTensorTensors()
    ctx = opt.parallel
    if not isinstance(opt._runner, DistributedRunner) or not ctx.sharded:
        return
    dp_rank, dp_size = dist.get_rank(ctx.dp_group), dist.get_world_size(ctx.dp_group)
    partitions, moved, device = {}, 0, None
    for name in opt.grouping.ortho_names():
        p, layout = opt._params_by_name[name], ctx.layouts[name]
        entry = FlatEntry(name, 0, layout.tp_shard_shape)
        partitions[name] = FlatPartition([entry], layout.partition_size, ctx.dp_group, dp_rank, dp_size)
        # AdamW under FSDP2 moves, for the same matrices: the gradients' reduce-scatter and the
        # parameters' all-gather, and under HSDP the all-reduce of the gradient shards over the replicas
        # (comm_stats.adamw_bytes, the yardstick)
        size = p.element_size()
        replicas = math.prod(layout.mesh_shape[d] for d in layout.replicate_mesh_dims)
        moved += adamw_bytes(entry.numel, dp_size, size, size, gradient_allreduce=False)
        moved += adamw_bytes(layout.partition_size, replicas, size)
        device = local(p).device
    opt._runner = DTensorPartitionRunner(
        opt._runner,
        partitions,
        opt.grouping.groups,
        opt.config,
        lambda key: device or torch.device("cpu"),
        moved,
        together=True,
    )
