"""A fingerprint of the optimizer step in every layout the tests cover: a fixed set of steps from fixed
seeds, and a hash of the bytes of every resulting weight and optimizer-state tensor, per rank.

    .venv/bin/python bench/step_fingerprint.py --out /tmp/before.json        # record
    .venv/bin/python bench/step_fingerprint.py --compare /tmp/before.json    # record again and compare
    .venv/bin/python bench/step_fingerprint.py --only zero --compare ...     # the cases whose name has "zero"

A refactor that leaves the arithmetic alone must leave every hash unchanged (bit-identical weights, state
and step counters); the comm_stats numbers (bytes sent/received, FLOPs) are compared too. The cases:
the plain API on a tiny megatron-core GPT (local; DP2/TP2/TP2xDP2 in owner-compute, replicated and auto
mode; PP2; EP2 experts; comm_dtype bf16; a non-finite gradient skipped), DeepSpeed (ZeRO-0; ZeRO-1/2
flat partitions, fp32 and bf16; TP2 Megatron model under ZeRO-2; DeepSpeed MoE under ZeRO-2; ZeRO-3) and
Megatron's builder (DDP; distributed optimizer fp32 with clip_grad, bf16, small DDP buckets planned
together, MoE expert buckets).
Ranks are forked (tests/support/harness.py, gloo); a run takes a few minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "integration"))
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("TEONSPEED_CPU_BF16", "0")

STEPS = 3
# TinyMoELM has no TEON stack (layers of one type): TEON runs per layer, as test_deepspeed_moe.py does
MOE_PARAMS = {"teon_per_layer_fallback": True}


# -- hashing -------------------------------------------------------------------------------------------


def _tensor_bytes(t) -> bytes:
    t = t.detach().cpu().contiguous()
    return (
        f"{t.dtype}{tuple(t.shape)}".encode() + t.view(-1).view(__import__("torch").uint8).numpy().tobytes()
    )


def _digest(items) -> str:
    h = hashlib.blake2b(digest_size=12)
    for key, value in items:
        h.update(str(key).encode())
        h.update(_tensor_bytes(value) if hasattr(value, "dtype") else repr(value).encode())
    return h.hexdigest()


def fingerprint(inner, named_weights, extra=()) -> Dict[str, Any]:
    """weights: every (name, tensor) given; state: each state entry of the optimizer (its tensors and
    numbers, keys sorted) hashed alone and the hashes combined in sorted order, so it does not depend on
    the order the state was created in; groups: every param group's numbers (step, lr, ...) and the
    values of the tensors it holds (ZeRO's fp32 partitions); stats: comm_stats."""
    weights = _digest(sorted(named_weights))
    entries = sorted(_digest(sorted(s.items())) for s in inner.state.values())
    groups = []
    for g in inner.param_groups:
        numbers = sorted((k, v) for k, v in g.items() if k not in ("params",))
        groups.append(_digest(numbers + [(i, p) for i, p in enumerate(g["params"])]))
    stats = inner.comm_stats
    return {
        "weights": weights,
        "state": _digest(enumerate(entries + groups + [_digest(extra)])),
        "stats": None
        if stats is None
        else [
            stats.sent,
            stats.received,
            stats.total_sent,
            stats.total_received,
            stats.flops,
            stats.adamw_bytes,
        ],
    }


# -- the plain API on a megatron-core GPT -----------------------------------------------------------------


def plain(
    rank,
    world_size,
    tp=1,
    pp=1,
    ep=1,
    optimizer="teon",
    moe=False,
    mode="distributed",
    options=None,
    nan_at=None,
):
    import torch
    import megatron_models as mm
    import teonspeed
    from megatron.core import parallel_state as ps
    from teonspeed.parallel.shard_spec import megatron_shard_specs
    from support.synthetic import local_tensor

    kinds = {"muon": teonspeed.Muon, "teon": teonspeed.TEON, "htmuon": teonspeed.HTMuon}
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep
    )
    extra = dict(num_moe_experts=4, moe_router_topk=2, moe_token_dispatcher_type="allgather") if moe else {}
    config = mm.tiny_config(num_layers=4, tp=tp, pp=pp, expert_model_parallel_size=ep, **extra)
    model = mm.tiny_gpt(
        config, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage()
    )
    specs = megatron_shard_specs(model)
    ranks = {
        False: (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()),
        True: (ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()),
    }

    def local_of(name, p, salt):
        return local_tensor(name, p, specs[name], *ranks[specs[name].is_expert], salt)

    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(local_of(name, p, 0))
    opt = kinds[optimizer](
        model, lr=0.02, adamw_lr=1e-3, weight_decay=0.01, parallel_mode=mode, **(options or {})
    )
    for step in range(1, STEPS + 1):
        for i, (name, p) in enumerate(model.named_parameters()):
            p.grad = local_of(name, p, step)
            if nan_at == step and i == 0 and rank == 0:
                p.grad[0].fill_(float("nan"))
        opt.step()
    return fingerprint(opt, list(model.named_parameters()))


# -- DeepSpeed ------------------------------------------------------------------------------------------


def deepspeed_flat(
    rank, world_size, stage=1, bf16=False, optimizer="TEON", megatron_tp=None, moe=False, params=None
):
    import copy

    import torch.distributed as dist
    import ds_helpers as h
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    config = copy.deepcopy(h.ds_config(optimizer, stage=stage, bf16=bf16, params=params))
    if megatron_tp is not None:
        import megatron_models as mm
        from megatron.core import parallel_state as ps
        from teonspeed.deepspeed import MegatronMPU

        ps.initialize_model_parallel(tensor_model_parallel_size=megatron_tp)
        model = mm.tiny_gpt(mm.tiny_config(tp=megatron_tp))
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=config, mpu=MegatronMPU()
        )
        for step in range(STEPS):
            tokens, position_ids, labels = mm.batch(seed=100 * step + ps.get_data_parallel_rank())
            engine.backward(engine(tokens, position_ids, None, labels=labels).mean())
            engine.step()
    else:
        if moe:
            from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
            from test_deepspeed_moe import EP, TinyMoELM
            import torch

            model = TinyMoELM()
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if not getattr(p, "allreduce", True):
                        local = int(name.split("deepspeed_experts.")[1].split(".")[0])
                        expert = dist.get_rank() % EP * 2 + local
                        p.copy_(
                            torch.randn(
                                p.shape, generator=torch.Generator().manual_seed(100 * expert + len(name))
                            )
                            * 0.2
                        )
            groups = split_params_into_different_moe_groups_for_optimizer(
                {"params": list(model.parameters()), "name": "dense"}
            )
        else:
            model = h.TinyLM()
            groups = model.parameters()
        engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=config)
        for step in range(STEPS):
            tokens, labels = h.batch(step, dist.get_rank())
            engine.backward(engine(tokens, labels))
            engine.step()
    return fingerprint(engine.basic_optimizer, list(engine.module.named_parameters()))


# -- Megatron's builder ---------------------------------------------------------------------------------


def megatron(rank, world_size, tp=1, optimizer="teon", layers=None, **config_kw):
    from megatron.core import parallel_state as ps
    from test_megatron_builder import build, run_steps

    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    ddp, opt = build(tp, optimizer, layers, **config_kw)
    _, _, results, *_ = run_steps(ddp, opt, range(STEPS))
    masters = [(i, s.master) for i, s in enumerate(getattr(opt, "shards", [])) if s.master is not None]
    return dict(
        fingerprint(opt.optimizer, list(ddp.module.named_parameters()), masters),
        results=[[bool(a), b] for a, b, _ in results],
    )


def megatron_moe(rank, world_size, tp=1, ep=2, distributed_optimizer=True):
    from test_megatron_moe_distributed_optimizer import train  # noqa: F401  (imports the helpers it needs)
    import torch
    import megatron_models as mm
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from teonspeed.megatron import TeonOptimizerConfig, get_megatron_optimizer
    from teonspeed.parallel.shard_spec import megatron_shard_specs
    from support.synthetic import local_tensor

    ps.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep)
    config = mm.tiny_config(
        num_layers=2,
        tp=tp,
        expert_model_parallel_size=ep,
        num_moe_experts=4,
        moe_router_topk=2,
        moe_token_dispatcher_type="allgather",
    )
    ddp = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer
        ),
        mm.tiny_gpt(config),
    )
    specs = megatron_shard_specs(ddp.module)
    ranks = {
        False: (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()),
        True: (ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()),
    }
    scale = ps.get_data_parallel_world_size() / ps.get_expert_data_parallel_world_size()
    with torch.no_grad():
        for name, p in ddp.module.named_parameters():
            p.copy_(local_tensor(name, p, specs[name], *ranks[specs[name].is_expert], 0))
    opt = get_megatron_optimizer(
        TeonOptimizerConfig(
            optimizer="muon",
            lr=0.02,
            adamw_lr=1e-3,
            weight_decay=0.01,
            clip_grad=0.0,
            use_distributed_optimizer=distributed_optimizer,
        ),
        [ddp],
    )
    for step in range(1, STEPS + 1):
        ddp.zero_grad_buffer()
        for name, p in ddp.module.named_parameters():
            spec = specs[name]
            p.main_grad.copy_(
                local_tensor(name, p, spec, *ranks[spec.is_expert], step) * (scale if spec.is_expert else 1.0)
            )
        ddp.finish_grad_sync()
        opt.step()
    return fingerprint(opt.optimizer, list(ddp.module.named_parameters()))


# (name, function, world size, keyword arguments)
CASES: List = [
    ("local muon", plain, 1, dict(optimizer="muon")),
    ("local teon", plain, 1, dict(optimizer="teon")),
    ("local htmuon", plain, 1, dict(optimizer="htmuon")),
    ("local teon skip_nonfinite", plain, 1, dict(options=dict(skip_nonfinite=True), nan_at=2)),
    ("moe local muon", plain, 1, dict(optimizer="muon", moe=True)),
]
for _layout, _world, _kw in (("DP2", 2, {}), ("TP2", 2, dict(tp=2)), ("TP2xDP2", 4, dict(tp=2))):
    for _mode in ("distributed", "replicated", "auto"):
        CASES.append((f"{_layout} teon {_mode}", plain, _world, dict(_kw, mode=_mode)))
CASES += [
    ("TP2xDP2 muon distributed", plain, 4, dict(tp=2, optimizer="muon")),
    ("TP2xDP2 htmuon distributed", plain, 4, dict(tp=2, optimizer="htmuon")),
    (
        "TP2xDP2 teon comm_dtype bf16 waves 3",
        plain,
        4,
        dict(tp=2, options=dict(comm_dtype="bf16", overlap_waves=3)),
    ),
    ("TP2xDP2 teon skip_nonfinite", plain, 4, dict(tp=2, options=dict(skip_nonfinite=True), nan_at=2)),
    ("PP2 teon distributed", plain, 2, dict(pp=2)),
    ("EP2 muon expert distributed", plain, 2, dict(ep=2, moe=True, optimizer="muon")),
    ("EP2 teon expert auto", plain, 2, dict(ep=2, moe=True, mode="auto")),
    ("deepspeed zero0 DP2", deepspeed_flat, 2, dict(stage=0)),
    ("deepspeed zero1 DP2", deepspeed_flat, 2, dict(stage=1)),
    ("deepspeed zero2 DP2", deepspeed_flat, 2, dict(stage=2)),
    ("deepspeed zero2 DP4 muon", deepspeed_flat, 4, dict(stage=2, optimizer="TeonspeedMuon")),
    ("deepspeed zero1 bf16 DP2", deepspeed_flat, 2, dict(stage=1, bf16=True)),
    ("deepspeed zero0 bf16 DP2", deepspeed_flat, 2, dict(stage=0, bf16=True)),
    ("deepspeed zero2 megatron TP2xDP2", deepspeed_flat, 4, dict(stage=2, megatron_tp=2)),
    ("deepspeed zero3 DP2", deepspeed_flat, 2, dict(stage=3)),
    ("deepspeed zero3 DP2 htmuon", deepspeed_flat, 2, dict(stage=3, optimizer="TeonspeedHTMuon")),
    ("deepspeed zero2 moe EP2 DP4", deepspeed_flat, 4, dict(stage=2, moe=True, params=MOE_PARAMS)),
    ("megatron ddp TP2xDP2", megatron, 4, dict(tp=2)),
    (
        "megatron distributed optimizer DP2 clip",
        megatron,
        2,
        dict(use_distributed_optimizer=True, clip_grad=0.05),
    ),
    (
        "megatron distributed optimizer TP2xDP2 clip",
        megatron,
        4,
        dict(tp=2, use_distributed_optimizer=True, clip_grad=0.05, layers=3),
    ),
    (
        "megatron distributed optimizer TP2xDP2 bf16 muon",
        megatron,
        4,
        dict(tp=2, optimizer="muon", use_distributed_optimizer=True, bf16=True),
    ),
    (
        "megatron distributed optimizer TP2xDP2 small buckets clip",
        megatron,
        4,
        dict(
            tp=2,
            use_distributed_optimizer=True,
            clip_grad=0.05,
            ddp_options=dict(overlap_grad_reduce=True, bucket_size=2000),
        ),
    ),
    ("megatron moe distributed optimizer EP2xDP2", megatron_moe, 4, dict(ep=2)),
    ("megatron moe ddp EP2xDP2", megatron_moe, 4, dict(ep=2, distributed_optimizer=False)),
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", help="write the fingerprints here (JSON)")
    parser.add_argument("--compare", help="a recorded fingerprint file to compare with")
    parser.add_argument("--only", default="", help="run only the cases whose name contains this")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    from support.harness import run_ranks

    got: Dict[str, Any] = {}
    for name, fn, world, kw in CASES:
        if args.only not in name:
            continue
        start = time.time()
        got[name] = run_ranks(fn, world, timeout=300, **kw)
        print(f"{name:<50} {time.time() - start:5.1f} s  {got[name][0]['weights']}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    if args.compare:
        before = json.loads(Path(args.compare).read_text())
        same = differ = 0
        for name, ranks in got.items():
            if name not in before:
                print(f"NEW      {name}")
                continue
            diffs = [
                f"rank {r} {k}"
                for r, (a, b) in enumerate(zip(before[name], ranks))
                for k in sorted(b)
                if a.get(k) != b.get(k)
            ]
            if diffs:
                differ += 1
                print(f"DIFFERS  {name}: {', '.join(diffs)}")
            else:
                same += 1
        print(f"{same} cases bit-identical, {differ} differ")
        sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
