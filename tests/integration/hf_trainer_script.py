"""Run by the `deepspeed` launcher in test_hf_trainer.py: the Hugging Face Trainer with a DeepSpeed config
in the form Hugging Face documents ("auto" values, AdamW's option names) and "type": "TEON", trained for
a few steps at ZeRO stages 0, 1, 2 and 3 one after the other in this process."""

import json
import sys

import torch

from teonspeed.patches import cpu_shims

cpu_shims.apply()

import teonspeed  # noqa: E402,F401  (registers "TEON" with DeepSpeed)
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,  # noqa: E402
    TrainingArguments,
)

VOCAB, SEQ, STEPS = 64, 8, 3


def ds_config(stage):
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "optimizer": {
            "type": "TEON",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto", "adam_lr": 3e-3},
        },
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": "auto"},
    }


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def model():
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=SEQ,
        )
    )


def train(stage, out_dir):
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    args = TrainingArguments(
        output_dir=f"{out_dir}/stage{stage}",
        per_device_train_batch_size=2,
        max_steps=STEPS,
        learning_rate=0.02,
        weight_decay=0.01,
        adam_beta1=0.85,
        adam_beta2=0.98,
        adam_epsilon=1e-7,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        deepspeed=ds_config(stage),
        accelerator_config={"use_configured_state": True},
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model(), args=args, train_dataset=Tokens(64))
    rounding = RoundingBudgetCallback(trainer)
    trainer.add_callback(rounding)
    trainer.train()
    optimizer = trainer.model_wrapped.optimizer
    basic = type(getattr(trainer.model_wrapped, "basic_optimizer", optimizer)).__name__
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    import deepspeed

    params = list(trainer.model.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):  # ZeRO-3: each rank holds a slice
        weights = torch.cat([p.detach().float().reshape(-1) for p in params])
    adamw = {
        k: v
        for k, v in trainer.model_wrapped.basic_optimizer.param_groups[-1].items()
        if k in ("betas", "eps")
    }
    del trainer
    unset_hf_deepspeed_config()
    AcceleratorState._reset_state()
    return {
        "losses": losses,
        "weights": weights.tolist(),
        "optimizer": type(optimizer).__name__,
        "basic": basic,
        "adamw": adamw,
        "grad_norms": rounding.grad_norms,
        "budget": rounding.budget.weights(0.02),
    }


class RoundingBudgetCallback(TrainerCallback):
    """tol.RoundingBudget on the optimizer the Trainer built: the stages feed it the same gradients (two
    ranks' sums are exact in either order, halving is exact), so only its iterations' rounding differs."""

    def __init__(self, trainer):
        self.trainer, self.grad_norms = trainer, []

    def on_train_begin(self, args, state, control, **kwargs):
        from support import tolerance as tol

        engine = self.trainer.model_wrapped
        self.budget = tol.RoundingBudget(engine.basic_optimizer)
        clip = engine.clip_fp32_gradients  # ZeRO stage 0, fp32: the reduced, whole gradients, before the clip

        def clip_recording_the_norm():
            grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
            self.grad_norms.append(float(torch.nn.utils.get_total_norm(grads)))  # the losses' sensitivity
            return clip()

        engine.clip_fp32_gradients = clip_recording_the_norm


def main(out_path):
    import os

    import torch.distributed as dist
    from accelerate.state import PartialState

    torch.set_num_threads(1)
    # On a machine without accelerators, accelerate picks no backend for a DeepSpeed run and counts one
    # process; set up its (shared) state with gloo first, and let the Trainers use it.
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    results = {stage: train(stage, out_path + ".runs") for stage in (0, 1, 2, 3)}
    if dist.get_rank() == 0:
        json.dump({"results": results, "world_size": dist.get_world_size()}, open(out_path, "w"))
    # Every rank tears the group down together: a rank exiting while another is in gloo's teardown can
    # abort the job at exit ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
