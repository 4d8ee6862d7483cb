"""The parallel step as a GPU runs it, checked on the CPU: parameters and gradients on a non-CPU device
(PyTorch's `meta` stands in for CUDA), collectives replaced by recorders that refuse CPU tensors, every
torch call watched for a CPU tensor made or mixed in, and the step's host reads counted (at most one).
Process groups are real (gloo, forked ranks): topology discovery runs as in a real job."""

import pytest
import torch

import megatron_models as mm
import teonspeed
from teonspeed.parallel.flat import FlatEntry, FlatPartition
from support.device_standin import DeviceError, DeviceRecorder, set_standin_grads, to_standin
from support.harness import run_ranks

OPTIMIZERS = {"muon": teonspeed.Muon, "teon": teonspeed.TEON, "htmuon": teonspeed.HTMuon}


def megatron_step(rank, world_size, tp=1, optimizer="teon", mode="distributed", options=None, steps=2):
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    model = to_standin(mm.tiny_gpt(mm.tiny_config(num_layers=4, tp=tp)))
    opt = OPTIMIZERS[optimizer](
        model, lr=0.02, adamw_lr=1e-3, weight_decay=0.01, parallel_mode=mode, **(options or {})
    )
    reads, collectives = [], []
    for _ in range(steps):
        set_standin_grads(model.parameters())
        with DeviceRecorder() as rec:
            opt.step()
        reads.append(len(rec.host_reads))
        collectives.append(list(rec.collectives))
    assert all(p.device.type == "meta" for p in model.parameters())
    assert all(t.device.type == "meta" for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return reads, collectives


CASES = [
    pytest.param(dict(tp=2, optimizer="teon"), 2, id="TP2-teon"),
    pytest.param(dict(tp=2, optimizer="htmuon", options={"ht_method": "svd"}), 2, id="TP2-htmuon-svd"),
    pytest.param(dict(tp=1, optimizer="muon"), 2, id="DP2-muon"),
    pytest.param(dict(tp=2, optimizer="teon", mode="replicated"), 2, id="TP2-replicated"),
    pytest.param(dict(tp=2, optimizer="htmuon", options={"ht_method": "ns"}), 4, id="TP2xDP2-htmuon-ns"),
    # auto with constants that replicate the k/v stacks and give the rest to owners (test_auto_placement.py)
    pytest.param(
        dict(
            tp=2,
            optimizer="teon",
            mode="auto",
            options={
                "cluster": dict(
                    peak_flops=4.2e12,
                    ns_efficiency=1.0,
                    nvlink_bw=1e10,
                    latency_intra=1e-9,
                    latency_per_peer=1e-12,
                )
            },
        ),
        4,
        id="TP2xDP2-auto-mixed",
    ),
]


@pytest.mark.parametrize("layout,world_size", CASES)
def test_parallel_step_keeps_every_tensor_on_the_device(layout, world_size):
    results = run_ranks(megatron_step, world_size, timeout=30, **layout)
    for reads, collectives in results:
        assert reads == [1] * len(reads), f"host reads per step: {reads}"  # the one flag + digest read
        assert all(c and c[0] == "all_reduce" for c in collectives), collectives  # then the exchanges
        assert all(c.count("all_reduce") == 1 for c in collectives), collectives
        if (
            layout.get("mode") == "auto"
        ):  # both halves of the mixed plan ran: the TP gather and the owners' exchange
            assert all("all_gather" in c and "all_to_all_single" in c for c in collectives), collectives


def world_one_step(rank, world_size):
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel()
    model = to_standin(mm.tiny_gpt(mm.tiny_config(num_layers=2)))
    opt = teonspeed.TEON(model.named_parameters(), parallel_mode="distributed")
    set_standin_grads(model.parameters())
    with DeviceRecorder() as rec:
        opt.step()
    return type(opt.runner).__name__, rec.collectives, len(rec.host_reads)


def test_world_of_one_runs_the_exchange_on_the_device():
    runner, collectives, reads = run_ranks(world_one_step, 1, timeout=60)[0]
    assert runner == "DistributedRunner"
    assert "all_to_all_single" in collectives and reads == 1


def flat_step(rank, world_size, optimizer="muon"):
    """ZeRO-1/2 as DeepSpeed hands it over: one flat fp32 partition per param group (the flat path)."""
    import torch.distributed as dist

    shapes = {
        "layers.0.mlp.fc1.weight": (8, 6),
        "layers.0.mlp.fc2.weight": (6, 8),
        "layers.1.mlp.fc1.weight": (8, 6),
    }
    params = [(n, torch.nn.Parameter(torch.empty(s, device="meta"))) for n, s in shapes.items()]
    from teonspeed.parallel.context import ParallelContext

    opt = OPTIMIZERS[optimizer](
        params,
        lr=0.02,
        teon_k=1 if optimizer == "muon" else 2,
        parallel=ParallelContext(dp_group=dist.group.WORLD),
    )
    total = sum(p.numel() for _, p in params)
    part = -(-total // world_size)
    flat = torch.nn.Parameter(torch.empty(part, device="meta"))
    entries, offset = [], 0
    for n, p in params:
        entries.append(FlatEntry(n, offset, tuple(p.shape)))
        offset += p.numel()
    opt.param_groups[0]["params"] = [flat]
    opt._names[id(flat)] = "flat"
    # Attaching learns each rank's partition index once (a set-up collective, on the CPU here because
    # the stand-in device holds no values to exchange); the step below is what runs every iteration.
    opt.attach_flat_partitions(
        {id(flat): FlatPartition(entries, part, dist.group.WORLD, rank, world_size)},
        device=torch.device("cpu"),
    )
    flat.grad = torch.empty_like(flat)
    with DeviceRecorder() as rec:
        opt.step()
    return rec.collectives, len(rec.host_reads)


def test_zero_flat_partition_step_keeps_every_tensor_on_the_device():
    # fc2 straddles the two partitions: its pieces travel to one owner and its slices come back.
    for collectives, reads in run_ranks(flat_step, 2, timeout=60):
        assert collectives.count("batch_isend_irecv") == 2 and reads == 1, (collectives, reads)


def test_the_recorder_catches_a_cpu_buffer_and_a_cpu_tensor_in_a_collective():
    """The check itself can fail: the old step's two mistakes, in miniature."""
    import torch.distributed as dist

    device_tensor, cpu_tensor = torch.empty(4, device="meta"), torch.empty(4)
    with pytest.raises(DeviceError, match="created a tensor on the CPU"):
        with DeviceRecorder():
            torch.zeros(4)
    with pytest.raises(DeviceError, match="mixes a CPU tensor"):
        with DeviceRecorder():
            torch.cat([device_tensor, cpu_tensor])
    with pytest.raises(DeviceError, match="dist.all_reduce got a tensor on cpu"):
        with DeviceRecorder():
            dist.all_reduce(cpu_tensor)
    assert dist.all_reduce is not None and "record" not in dist.all_reduce.__name__  # restored


def megatron_builder_step(rank, world_size):
    """Megatron's own wrapper (FP32Optimizer from teonspeed.megatron.get_megatron_optimizer) around our
    step. clip_grad=0: Megatron's grad-norm code asks for 'cuda' by name, which the stand-in cannot be;
    Megatron's bf16 wrapper checks for torch.cuda tensor types, so only the fp32 wrapper runs here."""
    from megatron.core import parallel_state as ps
    from teonspeed.megatron import TeonOptimizerConfig, get_megatron_optimizer

    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    model = to_standin(mm.tiny_gpt(mm.tiny_config(num_layers=4, tp=2)))
    opt = get_megatron_optimizer(
        TeonOptimizerConfig(optimizer="teon", lr=0.02, clip_grad=0.0, parallel_mode="distributed"), [model]
    )
    set_standin_grads(model.parameters())
    with DeviceRecorder() as rec:
        opt.step()
    return rec.collectives, len(rec.host_reads)


def test_megatron_builder_step_keeps_every_tensor_on_the_device():
    for collectives, reads in run_ranks(megatron_builder_step, 2, timeout=60):
        assert collectives[0] == "all_reduce" and "all_to_all_single" in collectives and reads == 1


def bucket_step(rank, world_size, buckets=1):
    """Megatron's distributed optimizer as teonspeed.megatron_distributed attaches it: DDP buckets' bf16
    parameter partitions with their fp32 masters, fp32 reduced gradients, and clip_grad > 0. buckets=2:
    TEON stacks the fc1 of layers 0 and 1, which lie in different buckets."""
    import torch.distributed as dist

    from teonspeed.parallel.context import ParallelContext
    from teonspeed.parallel.flat import BucketShard

    shapes = {
        "layers.0.mlp.fc1.weight": (8, 6),
        "layers.0.mlp.fc2.weight": (6, 8),
        "layers.1.mlp.fc1.weight": (8, 6),
    }
    params = [
        (n, torch.nn.Parameter(torch.empty(s, device="meta", dtype=torch.bfloat16)))
        for n, s in shapes.items()
    ]
    parallel = ParallelContext(dp_group=dist.group.WORLD)
    opt = (
        teonspeed.Muon(params, lr=0.02, parallel=parallel)
        if buckets == 1
        else teonspeed.TEON(params, lr=0.02, teon_types=("fc1",), parallel=parallel)
    )
    shards = []
    for bucket in (params,) if buckets == 1 else (params[:2], params[2:]):
        entries, offset = [], 0
        for n, p in bucket:
            entries.append(FlatEntry(n, offset, tuple(p.shape)))
            offset += p.numel()
        part = -(-offset // world_size)
        param = torch.empty(part, device="meta", dtype=torch.bfloat16)
        shards.append(
            BucketShard(
                FlatPartition(entries, part, dist.group.WORLD, rank, world_size),
                torch.empty(part, device="meta"),
                param,
                master=param.float(),
                counted=((0, part // 2),),
            )
        )
    assert any(g.is_teon for g in opt.grouping.groups) == (buckets == 2)
    # set-up collective: see flat_step
    opt.attach_bucket_shards(shards, device=torch.device("cpu"), clip_grad=1.0)
    with DeviceRecorder() as rec:
        opt.step()
    states = [opt.state[s.param] for s in shards]
    assert all(s.master.device.type == "meta" for s in shards)
    assert all(t.device.type == "meta" for state in states for t in state.values())
    return rec.collectives, len(rec.host_reads), opt.grad_norm


@pytest.mark.parametrize("buckets", [1, 2])
def test_distributed_optimizer_step_clips_with_no_extra_collective_or_host_read(buckets):
    # The gradient norm rides in the step check's one all_reduce; fc2 straddles the partitions (its pieces
    # travel in the flat step's two point-to-point rounds). Two buckets are planned as one: still two rounds.
    for collectives, reads, norm in run_ranks(bucket_step, 2, buckets, timeout=60):
        assert collectives.count("all_reduce") == 1 and collectives[0] == "all_reduce", collectives
        assert collectives.count("batch_isend_irecv") == 2 and reads == 1 and norm is not None, collectives
