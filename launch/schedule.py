"""The lr schedule of a run, the same in both backends: linear warmup over --warmup steps, then cosine
decay to --min-lr-ratio x the peak at --steps. Step i (0-based) runs at peak x lr_factor(i); the first
step is never at lr 0 (warmup reaches the peak at step warmup - 1)."""

from __future__ import annotations

import math


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    n = step + 1  # the number of the step about to run: 1, 2, ...
    if warmup > 0 and n <= warmup:
        return n / warmup
    if n >= total:
        return min_ratio
    ratio = (n - warmup) / (total - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * ratio))


def deepspeed_scheduler(args):
    """A callable DeepSpeed's initialize(lr_scheduler=) calls with the optimizer: a LambdaLR of lr_factor
    (every param group keeps its own peak: the ortho lr, or adamw_lr for the AdamW part)."""
    from torch.optim.lr_scheduler import LambdaLR

    def make(optimizer):
        return LambdaLR(optimizer, lambda step: lr_factor(step, args.warmup, args.steps, args.min_lr_ratio))

    return make


def megatron_scheduler(optimizer, args, peak: float):
    """Megatron's OptimizerParamScheduler with the same sequence: its step count starts at 0 with init_lr
    (0 here), so it is advanced once before the first step, which then runs at lr_factor(0)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    class AdvancedOnce(OptimizerParamScheduler):
        def load_state_dict(self, state_dict):
            self.num_steps = 0  # megatron's load adds the saved count to the current one
            super().load_state_dict(state_dict)

    scheduler = AdvancedOnce(
        optimizer,
        init_lr=0.0,
        max_lr=peak,
        min_lr=peak * args.min_lr_ratio,
        lr_warmup_steps=args.warmup,
        # (megatron asserts warmup < decay steps; a warmup as long as the run never reaches the decay anyway)
        lr_decay_steps=max(args.steps, args.warmup + 1),
        lr_decay_style="cosine",
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.steps,
        wd_incr_style="constant",
    )
    scheduler.step(increment=1)
    return scheduler
