"""parallel/dtensor_layout.py: which mesh rank holds which elements of which TP shard, checked against
DTensor's own local tensors for every rank of FSDP2 (uneven and empty chunks), HSDP and FSDP2 x TP
(Colwise: _StridedShard; Rowwise: Shard(0), Shard(1)); and the placements it cannot describe refused in
one line naming the parameter and the placement.

One process plays every rank with PyTorch's "fake" process group (collectives do nothing): the model is
built with the same seed on every rank and DTensor cuts it locally (`src_data_rank=None`), so each
rank's local tensors are exactly what that rank would hold. Each rank's meshes get names of their own:
DeviceMesh caches sub-meshes by their names and ranks, not by the rank that made them.
"""

import pytest
import torch
import torch.distributed as dist

from teonspeed.parallel.dtensor_layout import describe_parameter, describe_placements


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = torch.nn.Linear(8, 6)  # 6 rows: TP 2 -> 3 rows, FSDP 2 -> chunks of 2 and 1
        self.down = torch.nn.Linear(6, 8, bias=False)
        self.tiny = torch.nn.Linear(8, 2, bias=False)  # 2 rows over 3 FSDP ranks: one chunk empty
        self.norm = torch.nn.LayerNorm(8)


def wrap(model, layout, rank, world):
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    if layout == "fsdp2":
        fully_shard(model, mesh=DeviceMesh("cpu", torch.arange(world), mesh_dim_names=(f"dp{rank}",)))
        return
    names = (f"a{rank}", f"b{rank}")
    mesh = DeviceMesh("cpu", torch.arange(world).view(2, 2), mesh_dim_names=names)
    if layout == "hsdp":
        fully_shard(model, mesh=mesh)
        return
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {"up": ColwiseParallel(), "down": RowwiseParallel()}
    parallelize_module(model, mesh[names[1]], plan, src_data_rank=None)
    fully_shard(model, mesh=mesh[names[0]])


@pytest.mark.parametrize("layout, world", [("fsdp2", 3), ("hsdp", 4), ("fsdp2_tp", 4)])
def test_each_ranks_local_tensor_is_the_elements_the_layout_names(layout, world):
    from torch.testing._internal.distributed.fake_pg import FakeStore

    seen = set()
    for rank in range(world):
        dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
        try:
            model = Model()
            whole = {n: p.detach().clone() for n, p in model.named_parameters()}
            wrap(model, layout, rank, world)
            for name, p in model.named_parameters():
                described = describe_parameter(name, p)
                want = whole[name].reshape(-1)[described.global_indices(p.device_mesh.get_coordinate())]
                assert torch.equal(p.to_local().reshape(-1), want), (layout, rank, name)
                seen.add((name, p.placements, described.tp_dim, described.fsdp_size))
        finally:
            dist.destroy_process_group()
    if layout == "fsdp2_tp":  # what torch 2.13 makes: the layouts this test stands for
        from torch.distributed.tensor import Shard
        from torch.distributed.tensor.placement_types import _StridedShard

        assert ("up.weight", (_StridedShard(0, split_factor=2), Shard(0)), 0, 2) in seen
        assert ("down.weight", (Shard(0), Shard(1)), 1, 2) in seen
        assert ("tiny.weight", (Shard(0),), None, 2) in seen
    if layout == "fsdp2":  # 2 rows over 3 ranks: the last chunk empty
        assert describe_placements("t", (2, 8), (3,), _shard0()).local_range(2) == (16, 16)


def _shard0():
    from torch.distributed.tensor import Shard

    return (Shard(0),)


def test_placements_it_cannot_describe_are_refused_in_one_line_naming_them():
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    cases = {
        "is not Shard or Replicate": ((4, 4), (2,), (Partial(),)),
        "more than two mesh dims shard it": ((8, 8), (2, 2, 2), (Shard(0), Shard(0), Shard(1))),
        "does not divide into 2 equal TP shards": ((5, 4), (2, 2), (Shard(0), Shard(0))),
        "neither of them dim 0": ((2, 4, 4), (2, 2), (Shard(1), Shard(2))),
        "is not FSDP2's chunking of dim 0": ((8, 8), (2, 2), (_StridedShard(0, split_factor=3), Shard(0))),
    }
    for why, (shape, mesh, placements) in cases.items():
        with pytest.raises(ValueError) as err:
            describe_placements("layers.0.w", shape, mesh, placements)
        text = str(err.value)
        assert why in text and "'layers.0.w'" in text and str(tuple(placements)) in text and "\n" not in text
    # what it steps: replicated and HSDP-like layouts, described
    assert describe_placements("w", (4, 4), (2, 2), (Replicate(), Shard(0))).fsdp_mesh_dim == 1
    assert describe_placements("w", (4, 4), (2,), (Replicate(),)).tp_dim is None


def test_an_fsdp2_model_with_qk_clip_is_refused_at_construction():
    import teonspeed
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=0, world_size=2, store=FakeStore())
    try:
        model = Model()
        fully_shard(model, mesh=DeviceMesh("cpu", torch.arange(2), mesh_dim_names=("qk",)))
        with pytest.raises(ValueError) as err:
            teonspeed.Muon(model, qk_clip=100.0)
        assert "'qk_clip'" in str(err.value) and "DTensor" in str(err.value) and "\n" not in str(err.value)
    finally:
        dist.destroy_process_group()


def test_dtensor_layouts_without_fsdp_chunks_or_hsdp_with_tp_are_refused_naming_them():
    """Untested layouts are refused at construction, not guessed: TP alone, HSDP x TP."""
    import teonspeed
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=0, world_size=8, store=FakeStore())
    try:
        # (a ColwiseParallel weight alone, (Shard(0),), is a dim-0 chunking like FSDP's: it is stepped as one)
        model = Model()
        tp = DeviceMesh("cpu", torch.arange(2), mesh_dim_names=("tp1",))
        parallelize_module(model, tp, {"down": RowwiseParallel()})
        with pytest.raises(ValueError) as err:
            teonspeed.Muon([("down.weight", model.down.weight)])
        assert "'down.weight'" in str(err.value) and "not chunked by FSDP" in str(err.value)
        with pytest.raises(ValueError) as err:
            teonspeed.Muon(model)  # its other parameters are plain tensors
        assert "is a plain tensor beside DTensor parameters" in str(err.value)

        names = ("rep3", "shard3", "tp3")
        mesh = DeviceMesh("cpu", torch.arange(8).view(2, 2, 2), mesh_dim_names=names)
        model = Model()
        parallelize_module(model, mesh["tp3"], {"up": ColwiseParallel()})
        fully_shard(model, mesh=mesh["rep3", "shard3"])
        with pytest.raises(ValueError) as err:
            teonspeed.Muon(model)
        assert "'up.weight' is replicated (HSDP) and TP-cut" in str(err.value) and "\n" not in str(err.value)
    finally:
        dist.destroy_process_group()


def test_fsdp2_on_one_rank_steps_the_local_tensors_like_the_plain_model():
    """A world of one rank: whole local tensors, the local runner; equal to the plain model (the same
    element-wise and Newton-Schulz operations on the same tensors: equal to the last bit)."""
    import teonspeed
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    plain = Model()
    grads = {
        n: torch.randn_like(p, generator=torch.Generator().manual_seed(i))
        for i, (n, p) in enumerate(plain.named_parameters())
    }
    dist.init_process_group("fake", rank=0, world_size=1, store=FakeStore())
    try:
        model = Model()
        fully_shard(model, mesh=DeviceMesh("cpu", torch.arange(1), mesh_dim_names=("one",)))
        opt, ref = teonspeed.Muon(model, lr=0.02), teonspeed.Muon(plain, lr=0.02)
        for _ in range(2):
            for n, p in model.named_parameters():
                p.grad = DTensor.from_local(grads[n].clone(), p.device_mesh, p.placements)
            for n, p in plain.named_parameters():
                p.grad = grads[n].clone()
            opt.step()
            ref.step()
        for (n, p), (_, q) in zip(model.named_parameters(), plain.named_parameters()):
            assert torch.equal(p.to_local(), q.detach()), n
        assert isinstance(opt.state[model.up.weight]["momentum_buffer"], DTensor)  # what DCP reads
    finally:
        dist.destroy_process_group()
