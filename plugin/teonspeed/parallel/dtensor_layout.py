"""Where a DTensor parameter's elements live: from its global shape, its DeviceMesh's shape and its
placements (as PyTorch FSDP2's `fully_shard`, HSDP and `parallelize_module` make them), which mesh rank
holds which element range of which tensor-parallel shard. Pure: no process group, no tensor data.

The layouts teonspeed steps, in DTensor's own terms (torch 2.13):

- FSDP2 `fully_shard(mesh=dp)`: `(Shard(0),)`: dim 0 cut with `torch.chunk` (ceil-sized chunks, the last
  ones shorter or empty), so each rank holds one contiguous element range of the flattened parameter;
- HSDP (a 2-D replicate × shard mesh): `(Replicate(), Shard(0))`: the same ranges, on every replica;
- FSDP2 × TP (`parallelize_module` on mesh["tp"], then `fully_shard` on mesh["dp"]): ColwiseParallel
  weights `(_StridedShard(0, sf=tp), Shard(0))` (TP cuts dim 0 first, "right-to-left", then FSDP chunks
  dim 0 of each TP shard), RowwiseParallel weights `(Shard(0), Shard(1))` (the two dims commute: TP cuts
  dim 1, FSDP chunks dim 0 of the TP shard), parameters left out of TP `(Shard(0),)` on mesh["dp"].

Every one of them is one description: an optional TP split (tensor dim `tp_dim` cut into `tp_size` equal
slices over mesh dim `tp_mesh_dim`, Megatron's stride 1, as `shard_spec.shard_of` cuts) and an optional
FSDP chunking of dim 0 of that TP shard over mesh dim `fsdp_mesh_dim`; the other mesh dims replicate.
Anything else (Partial, a third shard, a strided split this cannot name, an uneven TP split) is refused
with one line naming the parameter and the placement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch


@dataclass(frozen=True)
class DTensorLayout:
    """One parameter's layout on its mesh (see the module docstring)."""

    global_shape: Tuple[int, ...]
    mesh_shape: Tuple[int, ...]
    tp_mesh_dim: Optional[int] = None
    tp_dim: Optional[int] = None
    fsdp_mesh_dim: Optional[int] = None

    @property
    def tp_size(self) -> int:
        return 1 if self.tp_mesh_dim is None else self.mesh_shape[self.tp_mesh_dim]

    @property
    def fsdp_size(self) -> int:
        return 1 if self.fsdp_mesh_dim is None else self.mesh_shape[self.fsdp_mesh_dim]

    @property
    def replicate_mesh_dims(self) -> Tuple[int, ...]:
        return tuple(
            i for i in range(len(self.mesh_shape)) if i not in (self.tp_mesh_dim, self.fsdp_mesh_dim)
        )

    @property
    def tp_shard_shape(self) -> Tuple[int, ...]:
        """The shape of one TP shard (the whole parameter without TP)."""
        shape = list(self.global_shape)
        if self.tp_dim is not None:
            shape[self.tp_dim] //= self.tp_size
        return tuple(shape)

    @property
    def row_numel(self) -> int:
        """Elements per dim-0 index of a TP shard (1 for a vector)."""
        n = 1
        for s in self.tp_shard_shape[1:]:
            n *= s
        return n

    @property
    def chunk_rows(self) -> int:
        """Dim-0 indices per FSDP chunk (torch.chunk's ceil; the last chunks may be shorter or empty)."""
        rows = self.tp_shard_shape[0] if self.tp_shard_shape else 1
        return -(-rows // self.fsdp_size)

    @property
    def partition_size(self) -> int:
        """Elements of one FSDP chunk before the end is cut: the flat partition each FSDP rank holds."""
        return self.chunk_rows * self.row_numel

    def local_range(self, fsdp_rank: int) -> Tuple[int, int]:
        """[lo, hi) of the flattened TP shard that FSDP rank `fsdp_rank` holds (lo == hi: nothing)."""
        numel = (self.tp_shard_shape[0] if self.tp_shard_shape else 1) * self.row_numel
        lo = min(fsdp_rank * self.partition_size, numel)
        return lo, min(lo + self.partition_size, numel)

    def coordinates(self, coord: Sequence[int]) -> Tuple[int, int]:
        """(TP rank, FSDP rank) of the mesh coordinate `coord`."""
        tp = 0 if self.tp_mesh_dim is None else coord[self.tp_mesh_dim]
        fsdp = 0 if self.fsdp_mesh_dim is None else coord[self.fsdp_mesh_dim]
        return tp, fsdp

    def global_indices(self, coord: Sequence[int]) -> torch.Tensor:
        """The flat indices, in the global parameter, of the elements mesh coordinate `coord` holds, in
        its local tensor's order (what tests compare with DTensor's own local tensors)."""
        tp, fsdp = self.coordinates(coord)
        index = torch.arange(max(1, _numel(self.global_shape))).view(self.global_shape)
        if self.tp_dim is not None:
            index = index.chunk(self.tp_size, dim=self.tp_dim)[tp]
        lo, hi = self.local_range(fsdp)
        return index.reshape(-1)[lo:hi]


def describe_placements(
    name: str, global_shape: Sequence[int], mesh_shape: Sequence[int], placements: Sequence[object]
) -> DTensorLayout:
    """The layout of a DTensor parameter `name`, or a one-line ValueError naming what is not supported."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    shape, mesh = tuple(int(s) for s in global_shape), tuple(int(s) for s in mesh_shape)

    def refuse(why: str) -> ValueError:
        return ValueError(
            f"teonspeed: DTensor parameter {name!r} has placements {tuple(placements)} on a mesh of shape "
            f"{mesh}: {why}; teonspeed steps FSDP2/HSDP (Shard(0), Replicate) and FSDP2 x TP "
            f"(parallelize_module with ColwiseParallel/RowwiseParallel, then fully_shard) layouts"
        )

    shards = []  # (mesh dim, tensor dim, split factor or None)
    for i, pl in enumerate(placements):
        if isinstance(pl, _StridedShard):
            shards.append((i, _dim(pl.dim, shape), int(pl.split_factor)))
        elif isinstance(pl, Shard):
            shards.append((i, _dim(pl.dim, shape), None))
        elif not isinstance(pl, Replicate):
            raise refuse(f"placement {pl} on mesh dim {i} is not Shard or Replicate")
    if len(shards) > 2:
        raise refuse("more than two mesh dims shard it")
    if not shards:
        return DTensorLayout(shape, mesh)
    if len(shards) == 1:
        (i, d, sf) = shards[0]
        if sf is not None:
            raise refuse(f"a strided shard on mesh dim {i} with no shard to its right")
        if d == 0:
            return DTensorLayout(shape, mesh, fsdp_mesh_dim=i)
        return _checked(DTensorLayout(shape, mesh, tp_mesh_dim=i, tp_dim=d), refuse)
    (i, d1, sf1), (j, d2, sf2) = shards
    if sf2 is not None:
        raise refuse(f"a strided shard on mesh dim {j}, the last sharded one")
    if sf1 is not None:  # right-to-left: mesh dim j cuts dim d2 first, mesh dim i chunks dim d1 of that
        if d1 != d2 or sf1 != mesh[j] or d1 != 0:
            raise refuse(
                f"_StridedShard(dim={d1}, split_factor={sf1}) is not FSDP2's chunking of dim 0 of "
                f"a TP shard over mesh dim {j} (size {mesh[j]})"
            )
        return _checked(DTensorLayout(shape, mesh, tp_mesh_dim=j, tp_dim=d2, fsdp_mesh_dim=i), refuse)
    if d1 == d2 == 0:  # left-to-right on dim 0: mesh dim i cuts it, mesh dim j chunks each slice
        return _checked(DTensorLayout(shape, mesh, tp_mesh_dim=i, tp_dim=0, fsdp_mesh_dim=j), refuse)
    if 0 not in (d1, d2):
        raise refuse(f"it is cut along dims {d1} and {d2}, neither of them dim 0")
    fsdp, tp = ((i, j), (d2,)) if d1 == 0 else ((j, i), (d1,))  # different dims commute
    return _checked(
        DTensorLayout(shape, mesh, tp_mesh_dim=fsdp[1], tp_dim=tp[0], fsdp_mesh_dim=fsdp[0]), refuse
    )


def describe_parameter(name: str, p: torch.Tensor) -> DTensorLayout:
    """describe_placements of a DTensor parameter."""
    return describe_placements(name, tuple(p.shape), tuple(p.device_mesh.mesh.shape), p.placements)


def is_dtensor(p: torch.Tensor) -> bool:
    return hasattr(p, "placements") and hasattr(p, "device_mesh")


def _dim(dim: int, shape: Tuple[int, ...]) -> int:
    return dim + len(shape) if dim < 0 else dim


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _checked(layout: DTensorLayout, refuse) -> DTensorLayout:
    """A TP split must leave equal shards (the plan reads every TP peer's shard at the same offsets)."""
    if layout.tp_dim is not None and layout.global_shape[layout.tp_dim] % layout.tp_size:
        raise refuse(
            f"its dim {layout.tp_dim} ({layout.global_shape[layout.tp_dim]}) does not divide into "
            f"{layout.tp_size} equal TP shards"
        )
    return layout
