"""The estimate: per GPU, for the pipeline stage that needs the most, weights, gradients, master weights
and optimizer states (sharded by the ZeRO stage), activations, the optimizer step's workspace and a fixed
allowance; the step runs after backward has freed the activations, so the peak takes the larger one."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict

from launch import rules
from launch.estimator.activations import Training, activation_bytes
from launch.estimator.params import (
    ModelSpec,
    Parallel,
    check_layout,
    count,
    parameter_tensors,
    params_per_rank,
)
from launch.estimator.workspace import ortho_workspace_bytes
from launch.estimator.zero3 import zero3_param_bytes

GIB = 1024**3


@dataclass
class Estimate:
    model: str
    parallel: Dict[str, Any]
    training: Dict[str, Any]
    params_total: int
    params_active_per_token: int
    stage: int  # the pipeline stage the numbers below are for (the largest)
    params_per_gpu: int
    bytes: Dict[str, float] = field(default_factory=dict)

    @property
    def total_bytes(self) -> float:
        return self.bytes["total"]

    def gib(self) -> Dict[str, float]:
        return {k: round(v / GIB, 3) for k, v in self.bytes.items()}

    def table(self) -> str:
        par, tr = self.parallel, self.training
        head = (
            f"{self.model}: {self.params_total / 1e6:.1f} M parameters "
            f"({self.params_active_per_token / 1e6:.1f} M active per token); "
            f"TP={par['tp']} PP={par['pp']} DP={par['dp']} EP={par['ep']} "
            f"(world {par['world']}), micro-batch {tr['micro_batch']} x seq {tr['seq_length']}, "
            f"{tr['optimizer']}, ZeRO-{tr['zero_stage']}, recompute {tr['recompute']}"
            f"{', flash attention' if tr['flash_attention'] else ''}\n"
            f"per GPU (pipeline stage {self.stage}, {self.params_per_gpu / 1e6:.1f} M parameters):"
        )
        rows = [f"  {k:<22} {v / GIB:9.3f} GiB" for k, v in self.bytes.items() if k != "total"]
        return "\n".join([head, *rows, f"  {'total':<22} {self.total_bytes / GIB:9.3f} GiB"])


def estimate(spec: ModelSpec, par: Parallel = Parallel(), train: Training = Training()) -> Estimate:
    check_layout(spec, par)
    if train.optimizer not in rules.OPTIMIZERS:
        raise ValueError(f"optimizer {train.optimizer!r}; choose one of {rules.OPTIMIZERS}")
    if train.recompute not in ("none", "selective", "full"):
        raise ValueError(f"recompute {train.recompute!r}")
    tensors = parameter_tensors(spec, Parallel(tp=1))
    total = sum(t.numel for t in tensors)
    expert = count(tensors, expert=True)
    active = (
        total
        - expert
        + (expert * spec.moe_router_topk // spec.num_moe_experts if spec.num_moe_experts else 0)
    )
    best = None
    for stage in range(par.pp):
        p = params_per_rank(spec, par, stage)
        dense, experts = p["dense_ortho"] + p["dense_adamw"], p["expert_ortho"] + p["expert_adamw"]
        z = train.zero_stage
        dp, edp = par.dp, par.expert_dp

        def shard(n_dense: float, n_expert: float, on: bool) -> float:
            return n_dense / dp + n_expert / edp if on else n_dense + n_expert

        moments = 2 if train.optimizer == "adamw" else 1
        states_dense = (p["dense_ortho"] * moments + p["dense_adamw"] * 2) * train.state_bytes
        states_expert = (p["expert_ortho"] * moments + p["expert_adamw"] * 2) * train.state_bytes
        b: Dict[str, float] = {
            "weights": shard(dense, experts, z >= 3) * train.weight_bytes,
            "gradients": shard(dense, experts, z >= 2) * train.grad_bytes,
            "master_weights": shard(dense, experts, z >= 1) * train.master_bytes,
            "optimizer_states": shard(states_dense, states_expert, z >= 1),
        }
        act = activation_bytes(spec, par, train, stage)
        b["activations"] = act["activations"]
        b["logits"] = act["logits"]
        workspace = ortho_workspace_bytes(spec, par, train, stage)
        b["ortho_step_workspace"] = workspace
        if z >= 3:  # the rows ZeRO-3 adds (absent below it, so the other stages' tables are unchanged)
            b.update(zero3_param_bytes(spec, par, train, stage))
        b["overhead"] = train.overhead_gib * GIB
        static = b["weights"] + b["gradients"] + b["master_weights"] + b["optimizer_states"] + b["overhead"]
        static += b.get("persistent_params", 0.0)
        # The optimizer step runs after backward has freed the activations (and ZeRO-3 has released the
        # parameters it gathered for them): the peak is the larger one.
        forward_backward = b["activations"] + b["logits"] + b.get("gathered_params", 0.0)
        b["total"] = static + max(forward_backward, workspace)
        if best is None or b["total"] > best.bytes["total"]:
            best = Estimate(
                model=spec.name,
                parallel={**asdict(par), "world": par.world, "sp": par.sp},
                training={**asdict(train), "seq_length": train.seq_length or spec.seq_length},
                params_total=total,
                params_active_per_token=active,
                stage=stage,
                params_per_gpu=dense + experts,
                bytes=b,
            )
    return best
