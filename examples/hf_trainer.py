"""The Hugging Face Trainer with teonspeed: a DeepSpeed config in the form Hugging Face documents ("auto"
values filled in from TrainingArguments) whose optimizer is `"type": "TEON"`.

    deepspeed --num_gpus=8 examples/hf_trainer.py                 # 8 GPUs
    deepspeed --num_gpus=2 examples/hf_trainer.py --steps 30      # a CPU-only machine: 2 processes

- `"lr": "auto"` becomes the matrices' lr (TrainingArguments.learning_rate), `"betas"`/`"eps": "auto"` the
  AdamW part's (adam_beta1/2, adam_epsilon); `adam_lr` (or `adamw_lr`) sets the AdamW part's lr.
- transformers and accelerate are not teonspeed dependencies: `pip install transformers accelerate`
  (setup.py's `dev` extra has both, so the environment of `bash scripts/test.sh` does).
- On GPUs nothing else is needed. On a machine without GPUs accelerate picks no process-group backend for
  a DeepSpeed run (and counts one process), so the script creates accelerate's state with gloo first and
  the Trainer uses it; that is the only CPU-specific line besides the shim below.
"""

import argparse
import os

import torch

if not torch.cuda.is_available():
    # CPU only: skip DeepSpeed's JIT build of a shared-memory communication op (about 35 s at every start).
    from teonspeed.patches import cpu_shims

    cpu_shims.apply()

import teonspeed  # noqa: E402,F401  (registers "TEON" with DeepSpeed)
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

VOCAB, SEQ = 64, 16
DS_CONFIG = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "optimizer": {
        "type": "TEON",
        "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto", "adam_lr": 3e-3},
    },
    "zero_optimization": {"stage": 1},
    "bf16": {"enabled": "auto"},
}


class Arithmetic(torch.utils.data.Dataset):
    """Sequences in which each token is the previous one plus a fixed step (mod the vocabulary)."""

    def __init__(self, n: int):
        g = torch.Generator().manual_seed(0)
        start, stride = torch.randint(0, VOCAB, (n, 1), generator=g), torch.randint(1, 4, (n, 1), generator=g)
        self.ids = (start + stride * torch.arange(SEQ)) % VOCAB

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="optimizer steps (default: 30)")
    p.add_argument(
        "--output-dir",
        default="runs/hf_trainer_example",
        help="the Trainer's output directory (default: runs/hf_trainer_example)",
    )
    args, _ = p.parse_known_args()  # the deepspeed launcher may add --local_rank
    if not torch.cuda.is_available():
        from accelerate.state import PartialState

        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=SEQ,
        )
    )
    training = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=8,
        max_steps=args.steps,
        learning_rate=0.02,
        weight_decay=0.01,
        warmup_steps=0,
        lr_scheduler_type="cosine",
        logging_steps=max(1, args.steps // 5),
        save_strategy="no",
        report_to=[],
        deepspeed=DS_CONFIG,
        bf16=torch.cuda.is_available(),
        disable_tqdm=True,
        dataloader_pin_memory=torch.cuda.is_available(),
        accelerator_config={"use_configured_state": not torch.cuda.is_available()},
    )
    trainer = Trainer(model=model, args=training, train_dataset=Arithmetic(4096))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if trainer.is_world_process_zero():
        print(
            f"{type(trainer.model_wrapped.basic_optimizer).__name__} under the Trainer on "
            f"{trainer.args.world_size} ranks: loss {losses[0]:.3f} -> {losses[-1]:.3f} "
            f"after {args.steps} steps"
        )
    if torch.distributed.is_initialized():  # every rank together (see examples/deepspeed_train.py)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
