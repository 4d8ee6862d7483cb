"""Pretrain a megatron-core GPT (LLaMA, GPT-2, MoE, MLA) with TEON (or Muon / HTMuon / AdamW).

    torchrun --standalone --nproc_per_node=2 -m launch.pretrain [--tp 2] [--optimizer muon] ...

(scripts/pretrain.sh checks the setup once with `python -m launch.options`, then runs exactly that.)
main() checks the setup (launch/options.py: before any process group, file or heavy import), applies
the CPU shims under --device cpu, then trains (launch/train.py): the data (launch/data.py), the model
(launch/model.py), the backend (launch/engines.py: DeepSpeed's engine at --pp 1, Megatron DDP + 1F1B at
--pp > 1), checkpoints (launch/checkpoint.py), the lr schedule (launch/schedule.py), and the outputs
under runs/<name>/ (metrics.csv, loss.png, TensorBoard).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # `python launch/pretrain.py` / `torchrun launch/pretrain.py`: run as the module `launch.pretrain`.
    import runpy

    sys.path[0] = str(Path(__file__).resolve().parents[1])
    runpy.run_module("launch.pretrain", run_name="__main__", alter_sys=True)
    raise SystemExit(0)

from launch.options import check  # noqa: E402  (light: no torch, no megatron)


def launch_world_size() -> int:
    """The world size the job will run with, known before the process group exists: torchrun's
    environment, or the process group a caller (the tests' fork harness) has already made."""
    if "torch" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def main(argv=None) -> dict:
    """Check the setup, then train; returns launch.train.run's summary. A bad setup raises ConfigError
    (a SystemExit with one line naming the option and the fix) before anything is built."""
    args = check(argv, launch_world_size())
    if args.device == "cpu":
        # Megatron asks CUDA for devices and RNG trackers at import and build time: the shims answer "cpu".
        from teonspeed.patches import cpu_shims

        cpu_shims.apply()
    from launch.train import run

    return run(args)


if __name__ == "__main__":
    from launch import refusal

    sys.exit(refusal.run(main))  # a refused setup: one line, from rank 0, exit status 2
