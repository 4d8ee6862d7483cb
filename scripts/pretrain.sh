#!/usr/bin/env bash
# The main job: set up .venv, then pretrain a tiny LLaMA-style megatron-core GPT with TEON on 2 CPU
# processes (data parallel 2 by default) through DeepSpeed's engine (ZeRO stage 1). Extra arguments go to
# `python -m launch.pretrain` (see --help), e.g.
#   bash scripts/pretrain.sh --tp 2            # tensor parallel 2 instead of data parallel 2 (same global batch)
#   bash scripts/pretrain.sh --optimizer adamw # the baseline
#   bash scripts/pretrain.sh --pp 2            # pipeline parallel 2 (Megatron backend: DDP + 1F1B schedule)
#   bash scripts/pretrain.sh --save-every 50 --stop-at 100; bash scripts/pretrain.sh --resume
# Writes runs/<name>/{metrics.csv,loss.png,tokenizer.json} (+ checkpoints/, tensorboard/ if installed); a
# second run gets a new directory (teon_tp1-2, ...) unless --name/--resume/--overwrite say otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
# What the main job needs only (DeepSpeed, megatron-core, the launcher's tokenizers/tqdm/matplotlib/PyYAML/
# TensorBoard); the test extras (Triton, transformers, ...) are scripts/test.sh's.
bash scripts/setup_env.sh deepspeed,megatron,launch
VENV="${TEONSPEED_VENV:-.venv}"
NPROC="${NPROC:-2}"
# One thread per process: the two ranks share two cores. The BPE trainer runs on rank 0 only.
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
# Megatron warns at import that Apex / Transformer Engine are missing (expected on CPU): hide UserWarnings.
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::UserWarning,ignore::FutureWarning}"
case " $* " in
  *" -h "*|*" --help "*) exec "$VENV/bin/python" -m launch.pretrain --help ;;
esac
# Check the setup once, in a second, before torchrun starts any process (one clear line on a mistake).
"$VENV/bin/python" -m launch.options --world "$NPROC" "$@" >/dev/null
# torchrun (launch/torchrun.py: without torchrun's 35-line report when the ranks refuse the setup, which
# rank 0 has then said in one line).
exec "$VENV/bin/python" -m launch.torchrun --standalone --nproc_per_node="$NPROC" -m launch.pretrain "$@"
