"""The two training backends of launch/pretrain.py, behind one small interface:

    backend.train_step(micro_batches) -> this rank's mean loss (None on a rank without the loss: not the
                                          last pipeline stage)
    backend.lr() -> the lr of the step about to run (the orthogonalized matrices'; AdamW's for adamw)
    backend.evaluate_losses(batches) -> this rank's validation losses (empty where there are none)
    backend.save(root, tag, state) / backend.load(root, tag)
    backend.model -> the bare megatron-core GPTModel (this rank's part)

- DeepSpeedBackend: deepspeed.initialize over the megatron-core model (ZeRO 0/1/2, gradient clipping,
  accumulation, launch/schedule.py's lr), the optimizer from the DeepSpeed config ("TEON" /
  "TeonspeedMuon" / "TeonspeedHTMuon" / "AdamW"), teonspeed.deepspeed.MegatronMPU for tensor parallelism.
- MegatronBackend: Megatron DDP + teonspeed.megatron.get_megatron_optimizer + OptimizerParamScheduler
  (launch/schedule.py's sequence), steps driven by megatron.core.pipeline_parallel.get_forward_backward_func()
  (1F1B across pipeline stages, gradient accumulation as micro-batches). DeepSpeed's engine cannot drive
  megatron-core's pipeline schedules (its own pipeline engine needs a deepspeed.pipe.PipelineModule), so
  pipeline parallelism runs here.
"""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from launch.checkpoint import safe_load
from launch.options import json_optimizer
from launch.rules import ORTHO_TYPES
from launch.schedule import megatron_scheduler

Batch = Tuple[torch.Tensor, torch.Tensor]
# --optimizer adamw, in both backends: the moments of teonspeed's AdamW part, so the baseline and the
# non-matrix parameters of a teonspeed run are stepped alike.
ADAMW_BETAS, ADAMW_EPS = (0.9, 0.95), 1e-8


def teonspeed_params(args) -> Dict[str, Any]:
    """What the launcher sets of a teonspeed optimizer's options, in either backend (teonspeed's own
    defaults for the rest): the two lrs, the weight decay, and --teon-k where the optimizer stacks."""
    options = {"lr": args.lr, "adamw_lr": args.adamw_lr, "weight_decay": args.weight_decay}
    if args.optimizer != "muon" and args.teon_k is not None:
        options["teon_k"] = args.teon_k
    return options


def forward_loss(model, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    tokens, labels = tokens.to(device), labels.to(device)
    position_ids = torch.arange(tokens.size(1), device=device).unsqueeze(0).expand_as(tokens)
    # With labels megatron returns the per-token cross-entropy [b, s] (vocab-parallel under TP).
    return model(tokens, position_ids, None, labels=labels).float().mean()


# ---------------------------------------------------------------------------------------------------
# DeepSpeed
# ---------------------------------------------------------------------------------------------------
def deepspeed_config(args, dp: int) -> Dict[str, Any]:
    """The DeepSpeed config of this run: --ds-config's JSON (if given) with the CLI's batch sizes and
    steps, and the CLI's optimizer / lr / ZeRO / clipping where given explicitly; else built from the CLI."""
    if args.optimizer == "adamw":
        optimizer = {
            "type": "AdamW",
            "params": {
                "lr": args.adamw_lr,
                "betas": list(ADAMW_BETAS),
                "eps": ADAMW_EPS,
                "weight_decay": args.weight_decay,
                "torch_adam": True,
            },
        }
    else:
        optimizer = {"type": ORTHO_TYPES[args.optimizer], "params": teonspeed_params(args)}
    if args.ds_config_dict is not None:
        config = copy.deepcopy(args.ds_config_dict)
        given = args.explicit
        if json_optimizer(args) is None:  # (else its lrs are in args: launch.options.adopt_json_optimizer)
            config["optimizer"] = optimizer
        if "zero_stage" in given or "zero_optimization" not in config:
            config.setdefault("zero_optimization", {})["stage"] = args.zero_stage
        if "clip_grad" in given or "gradient_clipping" not in config:
            config["gradient_clipping"] = args.clip_grad
    else:
        config = {
            "optimizer": optimizer,
            "zero_optimization": {"stage": args.zero_stage},
            "gradient_clipping": args.clip_grad,
        }
    if str(config["optimizer"].get("type")).lower() in {t.lower() for t in ORTHO_TYPES.values()}:
        config["optimizer"].setdefault("params", {}).update(qk_clip_options(args))
    # The lr schedule is launch/schedule.py's (validated in launch/options.py), passed to initialize().
    config.pop("scheduler", None)
    config.pop("train_batch_size", None)  # DeepSpeed derives it: micro x accumulation x DP
    config.update(
        train_micro_batch_size_per_gpu=args.micro_batch,
        gradient_accumulation_steps=args.grad_accum,
        steps_per_print=10**9,
        wall_clock_breakdown=False,
    )
    return config


def qk_clip_options(args) -> Dict[str, Any]:
    """teonspeed's QK-clip options from --qk-clip / --qk-clip-alpha / --qk-clip-log."""
    if args.qk_clip is not None:
        return {"qk_clip": args.qk_clip, "qk_clip_alpha": args.qk_clip_alpha}
    return {"qk_clip_log": True} if args.qk_clip_log else {}


def qk_clip_for(options: Dict[str, Any], model, optimizer):
    """The run's QKClip and whether the backend drives it itself: teonspeed's optimizer runs its own inside
    step(); --qk-clip-log with another optimizer (AdamW) gets a log-only one the backend steps after the
    optimizer. (None, False) without --qk-clip / --qk-clip-log."""
    clip = getattr(optimizer, "qk_clip", None)
    if clip is not None or not options:
        return clip, False
    if "qk_clip" in options:
        raise SystemExit(
            f"--qk-clip: the run's optimizer ({type(optimizer).__name__}) is not teonspeed's, "
            f"which rescales the weights where its wrappers keep them; use --optimizer "
            f"muon/teon/htmuon (and a --ds-config optimizer of those types), or --qk-clip-log"
        )
    from teonspeed import qk_clip

    return qk_clip.attach(model, log_only=True), True


def _deepspeed_checkpoint_classes():
    """The non-tensor types in DeepSpeed 0.19's checkpoint files (ZeRO optimizer states)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [fragment_address, ZeroStageEnum, LossScaler, DynamicLossScaler]


class DeepSpeedBackend:
    name = "deepspeed"

    def __init__(
        self, model, config: Dict[str, Any], lr_scheduler, qk_options: Optional[Dict[str, Any]] = None
    ):
        import deepspeed

        import teonspeed  # noqa: F401  (registers the optimizer types)
        from teonspeed.deepspeed import MegatronMPU

        self.config = config
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=model.parameters(),
            config=copy.deepcopy(config),
            mpu=MegatronMPU(),
            lr_scheduler=lr_scheduler,
        )
        self.model = self.engine.module
        self.qk_clip, self._steps_qk_clip = qk_clip_for(qk_options or {}, self.model, self.basic_optimizer)

    @property
    def basic_optimizer(self):
        return self.engine.basic_optimizer

    def lr(self) -> float:
        # (engine.get_lr() warns before the scheduler's first step; the groups hold the same value)
        return float(self.engine.optimizer.param_groups[0]["lr"])

    def train_step(self, micro_batches: List[Batch]) -> Optional[float]:
        total = 0.0
        for tokens, labels in micro_batches:
            loss = forward_loss(self.engine, tokens, labels)
            self.engine.backward(loss)
            self.engine.step()  # steps the optimizer and the scheduler at the accumulation boundary
            total += loss.item()
        if self._steps_qk_clip:
            self.qk_clip.step()
        return total / len(micro_batches)

    @torch.no_grad()
    def evaluate_losses(self, batches: List[Batch]) -> List[float]:
        self.model.eval()
        losses = [forward_loss(self.model, *b).item() for b in batches]
        self.model.train()
        return losses

    def save(self, root: Path, tag: str, state: Dict[str, Any]) -> None:
        self.engine.save_checkpoint(str(root), tag=tag, client_state=dict(state), save_latest=False)

    def load(self, root: Path, tag: str) -> None:
        # DeepSpeed's TorchCheckpointEngine.load is torch.load(path, weights_only=False): every file it reads
        # (model states, ZeRO partitions) would be fully unpickled. Route its loads through weights_only=True,
        # allowing the DeepSpeed classes its ZeRO files hold.
        ckpt_engine = self.engine.checkpoint_engine
        ckpt_engine.load = partial(safe_load, allow=_deepspeed_checkpoint_classes())
        try:
            path, _ = self.engine.load_checkpoint(str(root), tag=tag)
        finally:
            del ckpt_engine.load  # back to the class's method
        if path is None:
            raise SystemExit(f"--resume: DeepSpeed could not load the checkpoint {root / tag}")


# ---------------------------------------------------------------------------------------------------
# Megatron
# ---------------------------------------------------------------------------------------------------
def _loss_func(output_tensor: torch.Tensor):
    loss = output_tensor.float().mean()
    return loss, {"lm loss": loss.detach().clone()}  # (the schedule divides `loss` in place)


def _forward_step(data_iterator, model):
    tokens, labels = next(data_iterator)
    device = next(model.parameters()).device
    tokens, labels = tokens.to(device), labels.to(device)
    position_ids = torch.arange(tokens.size(1), device=device).unsqueeze(0).expand_as(tokens)
    return model(tokens, position_ids, None, labels=labels), _loss_func


class MegatronBackend:
    name = "megatron"

    def __init__(self, model, args):
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.model, self.args = model, args
        self.config = model.config
        distributed = bool(getattr(args, "distributed_optimizer", False))
        overlap = bool(getattr(args, "overlap_grad_reduce", False))
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            use_distributed_optimizer=distributed,
            overlap_grad_reduce=overlap,
            bucket_size=getattr(args, "ddp_bucket_size", None),
        )
        self.ddp = DistributedDataParallel(self.config, ddp_config, model)
        if overlap:  # as Megatron-LM's training loop: reduce once, in the last micro-batch's backward
            self.config.no_sync_func = self.ddp.no_sync
        # The schedule calls this after the last backward: DP all-reduce (finish_grad_sync), tied-embedding
        # grads between the first and last pipeline stages.
        self.config.finalize_model_grads_func = finalize_model_grads
        clip = args.clip_grad
        # teonspeed's distributed optimizer clips with its own norm (no CUDA needed)
        teon_distributed = distributed and args.optimizer != "adamw"
        if clip > 0 and not torch.cuda.is_available() and not teon_distributed:
            clip = 0.0  # megatron's clip_grad_norm_fp32 asserts torch.cuda.FloatTensor grads
            self.clip_note = "gradient clipping off: megatron's clip_grad needs CUDA"
        else:
            self.clip_note = None
        if args.optimizer == "adamw":
            from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

            cfg = OptimizerConfig(
                optimizer="adam",
                lr=args.adamw_lr,
                min_lr=args.adamw_lr * args.min_lr_ratio,
                weight_decay=args.weight_decay,
                adam_beta1=ADAMW_BETAS[0],
                adam_beta2=ADAMW_BETAS[1],
                adam_eps=ADAMW_EPS,
                clip_grad=clip,
                use_distributed_optimizer=distributed,
            )
            self.optimizer = get_megatron_optimizer(cfg, [self.ddp])
            peak = args.adamw_lr
        else:
            from teonspeed.megatron import TeonOptimizerConfig, get_megatron_optimizer

            cfg = TeonOptimizerConfig(
                optimizer=args.optimizer,
                min_lr=args.lr * args.min_lr_ratio,
                clip_grad=clip,
                muon_use_nesterov=True,
                use_distributed_optimizer=distributed,
                **teonspeed_params(args),
                **qk_clip_options(args),
            )
            self.optimizer = get_megatron_optimizer(cfg, [self.ddp])
            peak = args.lr
        self.qk_clip, self._steps_qk_clip = qk_clip_for(qk_clip_options(args), self.ddp, self.basic_optimizer)
        self.scheduler = megatron_scheduler(self.optimizer, args, peak)
        self.forward_backward = get_forward_backward_func()
        self.last_stage = ps.is_pipeline_last_stage()
        self.ps = ps

    @property
    def basic_optimizer(self):
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def ddp_note(self) -> str:
        """How DDP reduces the gradients: overlapped or not, in how many buckets."""
        c = self.ddp.ddp_config
        buckets = sum(len(b.buckets) for b in list(self.ddp.buffers) + list(self.ddp.expert_parallel_buffers))
        overlap = "on" if c.overlap_grad_reduce else "off"
        return f"overlap_grad_reduce {overlap}, {buckets} gradient bucket(s)" + (
            f" of {c.bucket_size} elements" if c.overlap_grad_reduce and c.bucket_size else ""
        )

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _run(self, batches: List[Batch], forward_only: bool):
        return self.forward_backward(
            forward_step_func=_forward_step,
            data_iterator=iter(batches),
            model=[self.ddp],
            num_microbatches=len(batches),
            seq_length=batches[0][0].size(1),
            micro_batch_size=batches[0][0].size(0),
            forward_only=forward_only,
        )

    def train_step(self, micro_batches: List[Batch]) -> Optional[float]:
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = self._run(micro_batches, forward_only=False)
        self.optimizer.step()
        if self._steps_qk_clip:
            self.qk_clip.step()
        self.scheduler.step(increment=1)
        if not self.last_stage:
            return None
        return float(sum(float(o["lm loss"]) for o in outputs) / len(outputs))

    @torch.no_grad()
    def evaluate_losses(self, batches: List[Batch]) -> List[float]:
        if not batches:
            return []
        self.ddp.eval()
        outputs = self._run(batches, forward_only=True)
        self.ddp.train()
        return [float(o["lm loss"]) for o in outputs] if self.last_stage else []

    def _file(self, root: Path, tag: str) -> Path:
        return Path(root) / tag / f"megatron_rank{dist.get_rank():05d}.pt"

    def save(self, root: Path, tag: str, state: Dict[str, Any]) -> None:
        torch.save(
            {
                "model": self.ddp.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "state": dict(state),
            },
            self._file(root, tag),
        )

    def load(self, root: Path, tag: str) -> None:
        # Only tensors and plain containers: a planted pickle cannot run code.
        ckpt = safe_load(self._file(root, tag), map_location=None)  # (to where it was saved from, as before)
        self.ddp.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
