"""The optimizer's state as checkpoints see it: created up front for loaders that ask which state to
read, saved with the layout its shapes depend on, and loaded only into the same layout."""

from __future__ import annotations

from typing import Any, Dict

import torch
import torch.distributed as dist

from ..parallel.flat import BucketShard
from .checks import check_same_layout
from .stepped import BUCKET_STATE_KEYS, bucket_state

LAYOUT_KEY = "teonspeed_layout"  # in state_dict(): the layout the state was saved in


class CheckpointState:
    """Mixed into OrthoOptimizer: init_state, layout, state_dict, load_state_dict."""

    BUCKET_STATE_KEYS = BUCKET_STATE_KEYS

    def init_state(self) -> None:
        """Create every state buffer now, as the first step would (zeros; AdamW step 0). Checkpoint
        loaders that ask the optimizer which state to read (Megatron's torch_dist `sharded_state_dict(...,
        is_loading=True)`) see every buffer; creating them early changes no result."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if group["route"] == "ortho":
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                elif "exp_avg" not in state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))

    def bucket_state(self, shard: BucketShard) -> Dict[str, torch.Tensor]:
        """The state of one distributed-optimizer bucket partition, created (zeros) as the first step does."""
        return bucket_state(self.state, shard)

    def layout(self) -> Dict[str, Any]:
        """What the state's shapes depend on: the parallel sizes and, per param group, the parameter
        names and the local shapes of the tensors the state is kept for (flat ZeRO partitions included)."""
        ctx = self.parallel
        sizes = {"tp": ctx.tp_size(False), "expert_tp": ctx.tp_size(True)}
        if self._tensors.per_partition_state:  # ZeRO-1/2: kept per DP partition; otherwise replicated over DP
            sizes.update(dp=_group_size(ctx.dp_group), expert_dp=_group_size(ctx.expert_dp_group))
        tensors = [[list(p.shape) for p in g["params"]] for g in self.param_groups]
        return {"sizes": sizes, "names": [list(g["names"]) for g in self.param_groups], "shapes": tensors}

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state[LAYOUT_KEY] = self.layout()
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a state saved in the same layout (checked before anything changes). Megatron's torch_dist
        checkpoints reshard by themselves and carry no layout; a plain state dict cannot be resharded
        here (each rank holds only its shards), so another layout is refused naming both."""
        saved = state_dict.get(LAYOUT_KEY)
        if saved is not None:
            check_same_layout(saved, self.layout())
        state_dict = {k: v for k, v in state_dict.items() if k != LAYOUT_KEY}
        super().load_state_dict(state_dict)


def _group_size(group) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1
