"""Your own DeepSpeed training script with teonspeed: `import teonspeed` and `"type": "TEON"` in the
config are the only changes from a script that trains with DeepSpeed's AdamW.

    deepspeed --num_gpus=8 examples/deepspeed_train.py                 # 8 GPUs
    deepspeed --num_gpus=2 examples/deepspeed_train.py --steps 30      # a CPU-only machine: 2 processes

- No process group to set up, on GPUs or on the CPU: `deepspeed.initialize` creates it from the
  launcher's environment (NCCL on GPUs; gloo on a CPU-only machine, no `init_process_group("gloo")` here).
- The model is a tiny LLaMA from Hugging Face `transformers` (`LlamaForCausalLM`). transformers is not a
  teonspeed dependency: `pip install transformers` (setup.py's `dev` extra has it, so the environment of
  `bash scripts/test.sh` does; `bash scripts/pretrain.sh`'s does not). Any `nn.Module` works: teonspeed
  reads the parameter names (`q_proj`, `k_proj`, `v_proj`, ... here) to decide what goes to AdamW and
  which matrices TEON stacks (Q with Q of the next layer, K with K, V with V); `opt.plan` prints it.
- The data: sequences in which each token is the previous one plus a fixed step (mod the vocabulary),
  a pattern the model learns in a few dozen steps, so the loss visibly falls.
"""

import argparse

import torch

if not torch.cuda.is_available():
    # CPU only: skip DeepSpeed's JIT build of a shared-memory communication op (about 35 s at every start).
    from teonspeed.patches import cpu_shims

    cpu_shims.apply()

import deepspeed  # noqa: E402
import teonspeed  # noqa: E402,F401  (registers "TEON", "TeonspeedMuon" and "TeonspeedHTMuon" with DeepSpeed)
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

VOCAB, SEQ = 64, 16
CONFIG = {
    "train_micro_batch_size_per_gpu": 8,
    "gradient_clipping": 1.0,
    "optimizer": {
        "type": "TEON",
        "params": {"lr": 0.02, "adamw_lr": 3e-3, "weight_decay": 0.01, "teon_k": 2},
    },
    "zero_optimization": {"stage": 1},  # 0, 1 and 2 work; under 1/2 each rank orthogonalizes its partition
    "bf16": {"enabled": torch.cuda.is_available()},
    "steps_per_print": 1_000_000,
}


def batch(step: int, rank: int, size: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    start = torch.randint(0, VOCAB, (size, 1), generator=g)
    stride = torch.randint(1, 4, (size, 1), generator=g)
    return ((start + stride * torch.arange(SEQ)) % VOCAB).to(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="optimizer steps (default: 30)")
    args, _ = p.parse_known_args()  # the deepspeed launcher may add --local_rank
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
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=CONFIG)
    rank = torch.distributed.get_rank()
    if rank == 0:
        print(engine.basic_optimizer.plan)  # the TEON that DeepSpeed built: what goes where, who computes
    losses = []
    for step in range(args.steps):
        tokens = batch(step, rank, engine.train_micro_batch_size_per_gpu(), engine.device)
        loss = engine(input_ids=tokens, labels=tokens).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    if rank == 0:
        print(
            f"{type(engine.basic_optimizer).__name__} on {torch.distributed.get_world_size()} ranks, "
            f"ZeRO stage {engine.zero_optimization_stage()}: loss {losses[0]:.3f} -> {losses[-1]:.3f} "
            f"after {args.steps} steps"
        )
    # Tear the process group down on every rank together: a rank that exits while another is still in
    # gloo's teardown can abort the job at exit.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
