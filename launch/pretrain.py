"""Pretrain a megatron-core GPT (LLaMA, GPT-2, MoE, MLA) with TEON (or Muon / HTMuon / AdamW).

Launched by scripts/pretrain.sh as

    .venv/bin/torchrun --standalone --nproc_per_node=2 launch/pretrain.py [--tp 2] [--optimizer muon] ...

Two backends (launch/engines.py):
- `--backend deepspeed` (the default at --pp 1): DeepSpeed's engine around the megatron-core model, with
  the optimizer from the DeepSpeed config ("TEON" / "TeonspeedMuon" / "TeonspeedHTMuon" / "AdamW"), ZeRO
  stage --zero-stage, gradient clipping, accumulation and DeepSpeed's WarmupCosineLR; `--ds-config PATH`
  starts from a JSON (configs/deepspeed/*.json), the CLI setting batch sizes and steps.
- `--backend megatron` (required at --pp > 1): Megatron DDP + teonspeed.megatron.get_megatron_optimizer +
  OptimizerParamScheduler, steps by megatron's get_forward_backward_func (1F1B over --pp stages,
  --grad-accum micro-batches). DeepSpeed's engine cannot drive megatron-core's pipeline schedules.

The story of main(): check the arguments (before any process group or file exists), join the process
group, build the data, the model and the backend, resume from the latest complete checkpoint if asked,
train while logging a table (a progress bar and TensorBoard too on rank 0), save checkpoints atomically
(launch/checkpoint.py), then write metrics.csv and loss.png under runs/<name>/. By default the corpus
is the source of a fixed list of standard-library modules, so the job needs no download.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import importlib
import inspect
import json
import os
import random
import re
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from teonspeed.testing import cpu_shims

# Megatron asks CUDA for devices and RNG trackers at import/build time: the shims answer "cpu".
cpu_shims.apply()

from megatron.core import parallel_state  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec  # noqa: E402
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig  # noqa: E402

import teonspeed  # noqa: E402,F401  (registers the DeepSpeed optimizer types)

LAUNCH = Path(__file__).resolve().parent
if str(LAUNCH) not in sys.path:
    sys.path.insert(0, str(LAUNCH))

import checkpoint  # noqa: E402
from engines import DeepSpeedBackend, MegatronBackend, deepspeed_config, forward_loss  # noqa: E402,F401
from progress import HEADER, Progress, read_csv, table_row, write_csv  # noqa: E402

REPO = LAUNCH.parent
EOT = "<|endoftext|>"

# A fixed, sorted list of standard-library modules: their source is the corpus (~2 MB). Sorting and
# fixing the list keeps the corpus (and thus the tokenizer and the split) deterministic.
CORPUS_MODULES = sorted([
    "argparse", "ast", "base64", "bisect", "calendar", "collections", "configparser", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "enum", "fractions", "functools",
    "gettext", "heapq", "inspect", "ipaddress", "json.decoder", "json.encoder", "logging", "pprint",
    "queue", "random", "shlex", "shutil", "statistics", "string", "tarfile", "textwrap", "threading",
    "tokenize", "typing", "uuid",
])
VAL_EVERY = 20  # every 20th document goes to validation: a fixed 5% split drawn from all modules


class UsageError(SystemExit):
    """A bad option, found before any process group is created or any file is written."""

    def __init__(self, message: str):
        super().__init__(f"launch/pretrain.py: error: {message}")


# ---------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default=None, help="run directory under runs/ (default: <optimizer>_tp<tp>)")
    p.add_argument("--runs-dir", default=str(REPO / "runs"), help="where run directories go (default: runs/)")
    p.add_argument("--optimizer", default="teon", choices=["teon", "muon", "htmuon", "adamw"])
    p.add_argument("--backend", default=None, choices=["deepspeed", "megatron"],
                   help="deepspeed (default at --pp 1) or megatron (required at --pp > 1)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (--backend megatron)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (MoE models, --backend megatron)")
    p.add_argument("--zero-stage", type=int, default=1, choices=[0, 1, 2], help="DeepSpeed ZeRO stage")
    p.add_argument("--ds-config", default=None,
                   help="DeepSpeed JSON config to start from (e.g. configs/deepspeed/teon_zero2_bf16.json); the "
                        "CLI sets batch sizes and steps, and optimizer/lr/ZeRO/clipping where given")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per data-parallel rank per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per step (DeepSpeed gradient accumulation; Megatron micro-batches)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 64, or the model config's)")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--groups", type=int, default=2, help="query groups (GQA)")
    p.add_argument("--ffn", type=int, default=172)
    p.add_argument("--lr", type=float, default=0.02, help="lr of the orthogonalized matrices")
    p.add_argument("--adamw-lr", type=float, default=3e-3, help="lr of the AdamW part (and of --optimizer adamw)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--teon-k", type=int, default=None,
                   help="TEON/HTMuon group size (default: teonspeed's, 2 for TEON); must divide the layers per "
                        "pipeline stage")
    p.add_argument("--clip-grad", type=float, default=1.0, help="gradient clipping by global norm (0: off)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor, as a fraction of the peak")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--save-every", type=int, default=0, help="save a checkpoint every N steps (0: never)")
    p.add_argument("--keep-last", type=int, default=0, help="keep only the K newest checkpoints (0: all)")
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop after this step (saving a checkpoint there if --save-every is on), keeping the "
                        "schedule of --steps: for time-limited allocations; continue with --resume")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest complete checkpoint in runs/<name>/checkpoints (if any)")
    p.add_argument("--resume-strict", action="store_true",
                   help="with --resume: stop if the latest checkpoint does not verify, instead of falling back to "
                        "the newest one that does")
    p.add_argument("--progress", default="auto", choices=["auto", "on", "off"],
                   help="tqdm progress bar on rank 0 (auto: when stderr is a terminal)")
    p.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard event files")
    p.add_argument("--no-plot", action="store_true", help="do not write loss.png")
    p.add_argument("--model-config", default=None,
                   help="configs/models/<name>.yaml (a name, a path or a layout): the architecture; replaces "
                        "--vocab/--hidden/--layers/--heads/--groups/--ffn")
    p.add_argument("--data-dir", default=None,
                   help="Megatron indexed datasets from launch/prepare_data.py (train/valid .bin/.idx and "
                        "tokenizer.json); default: tokenize the embedded corpus in memory")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    # The options given on the command line (not defaulted): --ds-config keeps its JSON's values otherwise.
    quiet = build_parser()
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    args.explicit = set(vars(quiet.parse_args(argv)))
    args.resume = args.resume or args.resume_strict
    args.backend = args.backend or ("megatron" if args.pp > 1 else "deepspeed")
    args.name = args.name or f"{args.optimizer}_tp{args.tp}" + (f"_pp{args.pp}" if args.pp > 1 else "")
    args.transformer, args.gpt = model_fields(args)
    t = args.transformer
    args.layers, args.hidden, args.heads, args.ffn = (t["num_layers"], t["hidden_size"], t["num_attention_heads"],
                                                      t["ffn_hidden_size"])
    args.groups = t.get("num_query_groups") or args.heads
    args.vocab = args.gpt["vocab_size"]
    args.seq = args.seq or args.gpt["seq_length"]
    args.ds_config_dict = None
    return args


# Fields of TransformerConfig that launch/pretrain.py sets itself (from flags, or because the CPU needs them).
SET_BY_LAUNCHER = {
    "tensor_model_parallel_size": "--tp", "pipeline_model_parallel_size": "--pp",
    "expert_model_parallel_size": "--ep", "activation_func": "model.activation", "params_dtype": None,
    "pipeline_dtype": None, "use_cpu_initialization": None, "gradient_accumulation_fusion": None,
    "masked_softmax_fusion": None, "bias_activation_fusion": None, "bias_dropout_fusion": None,
    "apply_rope_fusion": None, "batch_p2p_comm": None,
}
MODEL_KEYS = {"vocab_size", "seq_length", "position_embedding_type", "share_embeddings_and_output_weights",
              "activation", "rotary_base"}
TOP_KEYS = {"name", "description", "model", "transformer"}
LAYOUT_KEYS = {"name", "description", "model", "model_overrides", "cluster", "parallel", "training",
               "memory_estimate"}


def _unknown(kind: str, keys, known, where: str, fix: str) -> None:
    bad = sorted(set(keys) - set(known))
    if not bad:
        return
    hints = []
    for k in bad:
        close = difflib.get_close_matches(k, sorted(known), n=1)
        hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise UsageError(f"--model-config {where}: unknown {kind} key(s) {', '.join(hints)}; {fix}")


def model_fields(args) -> tuple[dict, dict]:
    """(TransformerConfig fields, GPTModel fields): the --model-config YAML's `transformer` and `model`
    sections (read by launch/memory.py, which also estimates their memory), else the flags. Unknown keys
    are refused here, before anything runs."""
    if args.model_config:
        from memory import _read_yaml, load_model_config, resolve_config_path
        path = resolve_config_path(args.model_config)
        raw = _read_yaml(path) or {}
        layout = isinstance(raw.get("model"), str)
        _unknown("top-level", raw, LAYOUT_KEYS if layout else TOP_KEYS, str(path),
                 f"the valid ones are {sorted(LAYOUT_KEYS if layout else TOP_KEYS)}")
        cfg = load_model_config(args.model_config)
        transformer, model = dict(cfg.get("transformer") or {}), dict(cfg.get("model") or {})
        _unknown("model", model, MODEL_KEYS, f"{path} section 'model'", f"the valid ones are {sorted(MODEL_KEYS)}")
        cls = MLATransformerConfig if transformer.get("multi_latent_attention") else TransformerConfig
        fields = {f.name for f in dataclasses.fields(cls) if f.init}
        _unknown("transformer", transformer, fields - set(SET_BY_LAUNCHER), f"{path} section 'transformer'",
                 f"it takes the fields of megatron.core {cls.__name__}"
                 + (" (set multi_latent_attention: true for the MLA fields)" if cls is TransformerConfig else ""))
        for key in set(transformer) & set(SET_BY_LAUNCHER):
            raise UsageError(f"--model-config {path}: transformer.{key} is set by launch/pretrain.py"
                             + (f" (use {SET_BY_LAUNCHER[key]})" if SET_BY_LAUNCHER[key] else "") + "; remove it")
        for key in ("vocab_size", "seq_length", "position_embedding_type", "share_embeddings_and_output_weights",
                    "activation"):
            if key not in model:
                raise UsageError(f"--model-config {path}: section 'model' needs {key!r}")
        return transformer, model
    return (dict(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                 num_query_groups=args.groups, ffn_hidden_size=args.ffn, gated_linear_unit=True,
                 add_bias_linear=False, normalization="RMSNorm", hidden_dropout=0.0, attention_dropout=0.0),
            dict(vocab_size=args.vocab, seq_length=args.seq or 64, position_embedding_type="rope",
                 share_embeddings_and_output_weights=False, activation="silu"))


def launch_world_size() -> int:
    """The world size the job will run with, known before the process group exists (torchrun's env)."""
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def validate(args, world: int) -> None:
    """Every check that needs no process group: raises UsageError naming the option and the fix."""
    for flag in ("steps", "micro_batch", "grad_accum", "tp", "pp", "ep"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.stop_at is not None and args.stop_at < 1:
        raise UsageError(f"--stop-at must be at least 1, got {args.stop_at}")
    for flag in ("save_every", "keep_last", "warmup"):
        if getattr(args, flag) < 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if args.backend == "deepspeed" and args.pp > 1:
        raise UsageError(f"--pp {args.pp} needs --backend megatron: DeepSpeed's engine cannot drive megatron-core's "
                         "pipeline schedules (use --backend megatron, or --pp 1)")
    if args.backend == "deepspeed" and args.ep > 1:
        raise UsageError(f"--ep {args.ep} needs --backend megatron: DeepSpeed's engine would average the expert "
                         "gradients over all data-parallel ranks (use --backend megatron, or --ep 1)")
    if args.ds_config and args.backend != "deepspeed":
        raise UsageError("--ds-config is for --backend deepspeed; drop it or use --backend deepspeed")
    t = args.transformer
    layout = args.tp * args.pp * args.ep
    if world % layout:
        raise UsageError(f"the parallel layout --tp {args.tp} x --pp {args.pp} x --ep {args.ep} = {layout} does not "
                         f"divide the world size {world} (processes); choose sizes whose product divides {world}")
    if t["num_layers"] % args.pp:
        raise UsageError(f"--pp {args.pp} does not divide num_layers={t['num_layers']}; use a --pp that divides it")
    if args.heads % args.tp or args.groups % args.tp:
        raise UsageError(f"--tp {args.tp} must divide the attention heads ({args.heads}) and query groups "
                         f"({args.groups}); use a --tp that divides both")
    experts = t.get("num_moe_experts")
    if args.ep > 1 and not experts:
        raise UsageError(f"--ep {args.ep} needs a MoE model (num_moe_experts in --model-config); use --ep 1")
    if experts and experts % args.ep:
        raise UsageError(f"--ep {args.ep} does not divide num_moe_experts={experts}; use an --ep that divides it")
    if experts and args.tp > 1 and not torch.cuda.is_available():
        raise UsageError(f"MoE with --tp {args.tp} needs sequence parallelism, which needs Transformer Engine or "
                         "apex (not available on CPU); use --tp 1 (and --ep for expert parallelism)")
    if args.optimizer in ("teon", "htmuon") and args.pp > 1:
        k = args.teon_k if args.teon_k is not None else (2 if args.optimizer == "teon" else 1)
        per_stage = t["num_layers"] // args.pp
        if per_stage % k:
            raise UsageError(f"--teon-k {k} does not divide the {per_stage} layers per pipeline stage "
                             f"(num_layers={t['num_layers']}, --pp {args.pp}): a TEON group would span two stages; "
                             f"use a --teon-k that divides {per_stage}, or a smaller --pp")
    if args.data_dir:
        data = Path(args.data_dir)
        if not data.is_dir():
            raise UsageError(f"--data-dir {data} does not exist; write it with "
                             f"`launch/prepare_data.py --embedded --output-dir {data}` (or --input ... --output-prefix)")
        missing = [f for f in ("tokenizer.json", "train.bin", "train.idx", "valid.bin", "valid.idx")
                   if not (data / f).is_file()]
        if missing:
            raise UsageError(f"--data-dir {data} lacks {', '.join(missing)}; write it with "
                             f"`launch/prepare_data.py --embedded --output-dir {data}`")
    if args.ds_config:
        path = Path(args.ds_config)
        if not path.is_file():
            raise UsageError(f"--ds-config {path} does not exist (ready ones: configs/deepspeed/*.json)")
        try:
            args.ds_config_dict = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UsageError(f"--ds-config {path} is not valid JSON: {err}") from None
        stage = (args.ds_config_dict.get("zero_optimization") or {}).get("stage", 0)
        if "zero_stage" not in args.explicit and stage not in (0, 1, 2):
            raise UsageError(f"--ds-config {path}: zero_optimization.stage={stage}; teonspeed supports ZeRO stages "
                             "0, 1 and 2 (set it there, or pass --zero-stage)")
    if args.keep_last and not args.save_every:
        raise UsageError("--keep-last needs --save-every N")


# ---------------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------------
def init_parallel(args) -> tuple[int, int, int]:
    """gloo world (torchrun's environment, or the one the caller made), then megatron's TP x PP x DP (x EP)
    groups. Returns (rank, dp_rank, dp)."""
    torch.set_num_threads(1)  # 2 processes on 2 cores: one thread each, no oversubscription
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # plain `python launch/pretrain.py`: a world of one
            from teonspeed.testing.harness import free_port
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                              LOCAL_RANK="0")
        dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tp,
                                             pipeline_model_parallel_size=args.pp,
                                             expert_model_parallel_size=args.ep)
    return dist.get_rank(), parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()


def shutdown(owned: bool) -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if owned and dist.is_initialized():
        dist.destroy_process_group()


def checkpoint_config(args) -> dict:
    """What a resume must not change: the model's shape and the optimizer's options (checked on --resume)."""
    return {"model": {"transformer": args.transformer, "gpt": args.gpt},
            "optimizer": {k: getattr(args, k) for k in ("optimizer", "lr", "adamw_lr", "weight_decay", "teon_k",
                                                         "clip_grad", "ds_config")}}


def log(*args) -> None:
    if dist.get_rank() == 0:
        print(*args, flush=True)


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------
def load_documents() -> list[str]:
    """Standard-library sources cut into documents at top-level `def` / `class` lines."""
    docs = []
    for name in CORPUS_MODULES:
        source = inspect.getsource(importlib.import_module(name))
        docs += [d for d in re.split(r"\n(?=(?:def|class|async def) )", source) if d.strip()]
    return docs


def split_documents(docs: list[str]) -> tuple[list[str], list[str]]:
    train = [d for i, d in enumerate(docs) if i % VAL_EVERY != VAL_EVERY - 1]
    val = [d for i, d in enumerate(docs) if i % VAL_EVERY == VAL_EVERY - 1]
    return train, val


def build_tokenizer(train_docs: list[str], vocab: int, path: Path):
    """Byte-level BPE trained on the training split by rank 0; the other ranks load its file."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    if dist.get_rank() == 0:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOT], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(train_docs, trainer=trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(path))
    dist.barrier()  # the file exists for everyone past this point
    return Tokenizer.from_file(str(path))


def encode(tok, docs: list[str]) -> torch.Tensor:
    """One token stream: the documents joined by the end-of-text token."""
    eot = tok.token_to_id(EOT)
    ids = []
    for enc in tok.encode_batch(docs):
        ids += enc.ids
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, starts: torch.Tensor, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token labels from windows of seq+1 tokens starting at `starts`."""
    chunk = torch.stack([stream[s:s + seq + 1] for s in starts.tolist()])
    return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


class TrainBatches:
    """Random contiguous windows. Seeded per data-parallel rank, so DP ranks read different slices and
    the TP ranks of one replica read the same batch (as tensor parallelism requires)."""

    def __init__(self, stream: torch.Tensor, seq: int, batch: int, seed: int, dp_rank: int):
        self.stream, self.seq, self.batch = stream, seq, batch
        self.gen = torch.Generator().manual_seed(seed * 1000 + dp_rank)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        return windows(self.stream, self._starts(), self.seq)

    def _starts(self) -> torch.Tensor:
        return torch.randint(0, len(self.stream) - self.seq - 1, (self.batch,), generator=self.gen)

    def skip(self, n: int) -> None:
        """Resume: draw (and drop) the start positions of the first n micro-batches."""
        for _ in range(n):
            self._starts()


class IndexedBatches:
    """Megatron GPTDataset samples (shuffled windows of seq + 1 tokens over the documents): step i of DP
    rank r takes samples (i * dp + r) * batch ... + batch - 1, so the replicas read disjoint samples
    and the TP ranks of one replica the same ones."""

    def __init__(self, dataset, batch: int, dp_rank: int, dp: int):
        self.dataset, self.batch, self.dp_rank, self.dp, self.step = dataset, batch, dp_rank, dp, 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        first = (self.step * self.dp + self.dp_rank) * self.batch
        self.step += 1
        return stack_samples([self.dataset[first + i] for i in range(self.batch)])

    def skip(self, n: int) -> None:
        self.step += n


def stack_samples(samples: list) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([s["tokens"] for s in samples]), torch.stack([s["labels"] for s in samples])


def indexed_data(args, dp: int, dp_rank: int):
    """(tokenizer, train batches, validation batches) from --data-dir. Every rank builds the datasets
    (global rank 0 writes the sample-index cache first, the others then read it)."""
    from prepare_data import MegatronTokenizerAdapter, gpt_dataset
    data = Path(args.data_dir)
    tok = MegatronTokenizerAdapter(data / "tokenizer.json")
    train = gpt_dataset(data / "train", tok, args.seq, num_samples=args.steps * args.grad_accum * args.micro_batch * dp, seed=args.seed)
    valid = gpt_dataset(data / "valid", tok, args.seq, seed=args.seed, split="valid")
    n = min(args.eval_batches, len(valid) // args.micro_batch)
    val_set = [stack_samples([valid[i * args.micro_batch + j] for j in range(args.micro_batch)]) for i in range(n)]
    log(f"data: {data} (Megatron indexed datasets), {len(train)} train / {len(valid)} validation samples of "
        f"{args.seq} + 1 tokens, vocab {tok.vocab_size}")
    return tok, IndexedBatches(train, args.micro_batch, dp_rank, dp), val_set


def val_batches(stream: torch.Tensor, seq: int, batch: int, count: int) -> list:
    """A fixed set of evenly spaced validation windows, the same at every evaluation."""
    n = count * batch
    starts = torch.linspace(0, len(stream) - seq - 2, n).long()
    return [windows(stream, starts[i * batch:(i + 1) * batch], seq) for i in range(count)]


# ---------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------
ACTIVATIONS = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu}


class SDPACoreAttention(torch.nn.Module):
    """Causal attention by torch's scaled_dot_product_attention, for MLA on CPU: megatron-core 0.16.1's
    local DotProductAttention takes no k_channels/v_channels (MLA's query/key and value head sizes differ)."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, k_channels=None, v_channels=None, cp_comm_type=None, pg_collection=None):
        super().__init__()
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [s, b, n, d] -> [b, n, s, d]
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(out.size(2), out.size(0), -1)  # [s, b, n * d_v]


def build_model(args, vocab_size: int) -> GPTModel:
    """By default LLaMA-style: RMSNorm, SwiGLU, RoPE, no biases, grouped-query attention, untied output
    layer; with --model-config whatever configs/models/<name>.yaml describes (GPT-2, MoE, MLA, ...).
    Under pipeline parallelism this rank builds its stage's layers (embedding on the first stage, final
    norm and output layer on the last)."""
    fields = dict(args.transformer)
    config_class = MLATransformerConfig if fields.pop("multi_latent_attention", False) else TransformerConfig
    extra = {"expert_model_parallel_size": args.ep} if fields.get("num_moe_experts") else {}
    config = config_class(
        **fields, **extra, activation_func=ACTIVATIONS[args.gpt["activation"]], tensor_model_parallel_size=args.tp,
        pipeline_model_parallel_size=args.pp, params_dtype=torch.float32, pipeline_dtype=torch.float32,
        # CPU: build full weights on the CPU and slice them (same init at any TP), no fused CUDA kernels.
        use_cpu_initialization=True, gradient_accumulation_fusion=False, masked_softmax_fusion=False,
        bias_activation_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        batch_p2p_comm=False)
    cpu_shims.megatron_seed(args.seed)  # model_parallel_cuda_manual_seed without CUDA
    # One spec per layer: dense, MoE (moe_layer_freq) or MLA, all with megatron-core's local modules.
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization=config.normalization)
    if config.multi_latent_attention:
        import megatron.core.transformer.multi_latent_attention as mla
        mla.HAVE_TE = False  # TE is absent; its stand-in would make MLA's isinstance(.., TELinear) fail
        for layer in spec.layer_specs:
            layer.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=vocab_size,
                    max_sequence_length=args.seq, pre_process=parallel_state.is_pipeline_first_stage(),
                    post_process=parallel_state.is_pipeline_last_stage(),
                    position_embedding_type=args.gpt["position_embedding_type"],
                    share_embeddings_and_output_weights=args.gpt["share_embeddings_and_output_weights"],
                    rotary_base=args.gpt.get("rotary_base", 10000))


def padded_vocab(vocab: int, tp: int, multiple: int = 128) -> int:
    """The output layer is split over TP ranks: pad the embedding rows to a multiple of 128 * tp."""
    m = multiple * tp
    return (vocab + m - 1) // m * m


def build_backend(args, model, dp: int):
    if args.backend == "deepspeed":
        return DeepSpeedBackend(model, deepspeed_config(args, dp))
    return MegatronBackend(model, args)


def describe_optimizer(backend) -> str:
    opt = backend.basic_optimizer
    if hasattr(opt, "plan"):
        return str(opt.plan)
    groups = opt.param_groups
    return f"optimizer: {type(opt).__name__}, {len(groups)} param groups, lr {groups[0]['lr']}"


# ---------------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------------
def world_mean(value) -> float | None:
    """Mean over the ranks that have `value` (the last pipeline stage's ranks; TP ranks hold the same)."""
    t = torch.tensor([0.0 if value is None else float(value), 0.0 if value is None else 1.0], dtype=torch.float64)
    dist.all_reduce(t)
    return (t[0] / t[1]).item() if t[1] > 0 else None


def evaluate(backend, batches: list, dp_rank: int, dp: int) -> float:
    """Mean loss over the fixed validation batches, each DP replica taking every dp-th batch."""
    losses = backend.evaluate_losses(batches[dp_rank::dp])
    t = torch.tensor([sum(losses), len(losses)], dtype=torch.float64)
    dist.all_reduce(t)
    return (t[0] / t[1]).item()


# ---------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------
def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    train = [r for r in rows if r["train_loss"] != ""]
    ax.plot([r["step"] for r in train], [r["train_loss"] for r in train], label="train", alpha=0.8)
    val = [r for r in rows if r["val_loss"] != ""]
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    """Train; returns a summary (rank 0's view): the per-step losses of this invocation, the validation
    losses, where it started. Raises UsageError (a SystemExit) for bad options before doing anything."""
    args = parse_args(argv)
    validate(args, launch_world_size())  # before any process group or file
    t_start = time.perf_counter()
    owned = not dist.is_initialized()
    rank, dp_rank, dp = init_parallel(args)
    progress = None
    try:
        run_dir = Path(args.runs_dir) / args.name
        ckpt_root = run_dir / "checkpoints"
        layout = dict(backend=args.backend, world=dist.get_world_size(), tp=args.tp, pp=args.pp, ep=args.ep,
                      zero_stage=args.zero_stage if args.backend == "deepspeed" else None)
        run_config = checkpoint_config(args)
        resume_from = checkpoint.select_for_resume(ckpt_root, args.resume_strict, log) if args.resume else None
        if args.resume and resume_from is None:
            log(f"--resume: no complete checkpoint in {ckpt_root}; starting from step 0")
        random.seed(args.seed)
        torch.manual_seed(args.seed)

        if args.data_dir:
            # Data: Megatron indexed datasets written by launch/prepare_data.py.
            tok, batches, val_set = indexed_data(args, dp, dp_rank)
            vocab_size = tok.vocab_size
        else:
            # Data: the stdlib corpus, a fixed 95/5 split, a BPE tokenizer trained on the training part
            # (reused from the run directory when resuming, so the token ids cannot change).
            docs = load_documents()
            train_docs, val_docs = split_documents(docs)
            digest = hashlib.sha256("\0".join(docs).encode()).hexdigest()[:12]
            tok_path = run_dir / "tokenizer.json"
            if resume_from is not None and tok_path.exists():
                from tokenizers import Tokenizer
                tok = Tokenizer.from_file(str(tok_path))
            else:
                tok = build_tokenizer(train_docs, args.vocab, tok_path)
            train_stream, val_stream = encode(tok, train_docs), encode(tok, val_docs)
            vocab_size = tok.get_vocab_size()
            log(f"corpus: {len(CORPUS_MODULES)} stdlib modules, {sum(map(len, docs)) / 1e6:.2f} MB, sha256 {digest}; "
                f"{len(train_docs)}/{len(val_docs)} train/val documents, {len(train_stream)}/{len(val_stream)} tokens, "
                f"vocab {vocab_size}")
            batches = TrainBatches(train_stream, args.seq, args.micro_batch, args.seed, dp_rank)
            val_set = val_batches(val_stream, args.seq, args.micro_batch, args.eval_batches)

        # Model and backend (optimizer, scheduler, data parallelism).
        model = build_model(args, padded_vocab(vocab_size, args.tp))
        n_params = sum(p.numel() for p in model.parameters())
        log(f"model: {args.layers} layers, hidden {args.hidden}, {args.heads} heads / {args.groups} groups, "
            f"ffn {args.ffn}, seq {args.seq}; {n_params / 1e6:.3f} M parameters on this rank; "
            f"layout TP={args.tp} x PP={args.pp} x DP={dp}" + (f" (EP={args.ep})" if args.ep > 1 else ""))
        backend = build_backend(args, model, dp)
        if args.backend == "deepspeed":
            c = backend.config
            log(f"backend: DeepSpeed engine, ZeRO stage {c['zero_optimization'].get('stage', 0)}, optimizer "
                f"{c['optimizer']['type']} {json.dumps(c['optimizer'].get('params', {}))}, scheduler "
                f"{c.get('scheduler', {}).get('type')}, clipping {c.get('gradient_clipping', 0)}, accumulation "
                f"{c['gradient_accumulation_steps']}" + (f" (from {args.ds_config})" if args.ds_config else ""))
        else:
            log(f"backend: Megatron DDP + {type(backend.optimizer).__name__}({type(backend.basic_optimizer).__name__})"
                f", OptimizerParamScheduler (cosine), {args.grad_accum} micro-batch(es) per step through "
                f"{backend.forward_backward.__name__}" + (f"; {backend.clip_note}" if backend.clip_note else ""))
        log(describe_optimizer(backend))

        # Resume.
        start, rows = 0, []
        if resume_from is not None:
            state = checkpoint.load(resume_from, backend, layout, run_config)
            start = state["step"]
            batches.skip(state["micro_batches"])
            if (resume_from / "metrics.csv").exists():
                rows = [r for r in read_csv(resume_from / "metrics.csv") if r["step"] <= start]
            log(f"resumed from {resume_from} at step {start}")
        if start >= args.steps:
            log(f"nothing to do: step {start} >= --steps {args.steps}")

        # Train.
        tokens_per_step = dp * args.micro_batch * args.grad_accum * args.seq
        progress = Progress(rank == 0, args.steps, start, run_dir, bar=args.progress,
                            tensorboard=not args.no_tensorboard, log=log)
        out = progress.log
        losses, vals = [], []
        out(f"\n{args.steps} steps of {tokens_per_step} tokens, optimizer {args.optimizer}, backend {args.backend}"
            + (f", from step {start}" if start else "") + f"\n{HEADER}\n{'-' * len(HEADER)}")
        if start == 0:
            val0 = evaluate(backend, val_set, dp_rank, dp)
            rows.append({"step": 0, "train_loss": "", "val_loss": val0, "lr": "", "tokens_per_s": ""})
            vals.append((0, val0))
            progress.scalars({"val/loss": val0}, 0)
        val0 = next((r["val_loss"] for r in rows if r["step"] == 0 and r["val_loss"] != ""), None)
        window, t_log, t_train = [], time.perf_counter(), time.perf_counter()
        stop = min(args.steps, args.stop_at) if args.stop_at is not None else args.steps
        for step in range(start, stop):
            lr = backend.lr()
            micro = [batches.next() for _ in range(args.grad_accum)]
            t0 = time.perf_counter()
            loss = world_mean(backend.train_step(micro))
            losses.append(loss)
            window.append(loss)
            done = step + 1
            val = None
            if done % args.eval_every == 0 or done == args.steps:
                val = evaluate(backend, val_set, dp_rank, dp)
                vals.append((done, val))
                progress.scalars({"val/loss": val}, done)
            row = {"step": done, "train_loss": loss, "val_loss": "" if val is None else val, "lr": lr,
                   "tokens_per_s": ""}
            step_tps = tokens_per_step / max(time.perf_counter() - t0, 1e-9)
            if done % args.log_every == 0 or val is not None or done == start + 1:  # every eval gets a row too
                now = time.perf_counter()
                tps = tokens_per_step * len(window) / (now - t_log)
                row["tokens_per_s"] = tps
                # The table shows the mean train loss since the previous row (less noisy than one step).
                out(table_row(done, sum(window) / len(window), val, lr, tps))
                window, t_log = [], now
            rows.append(row)
            progress.step(done, loss, lr, step_tps)
            if args.save_every and (done % args.save_every == 0 or done == stop):
                if rank == 0:
                    run_dir.mkdir(parents=True, exist_ok=True)
                    write_csv(rows, run_dir / "metrics.csv")
                path = checkpoint.save(ckpt_root, done, backend,
                                       {"step": done, "micro_batches": done * args.grad_accum},
                                       run_dir / "metrics.csv", layout, keep_last=args.keep_last,
                                       config=run_config)
                out(f"saved {path}")
        t_train = time.perf_counter() - t_train
        progress.close()

        # Results.
        final_val = next((r["val_loss"] for r in reversed(rows) if r["val_loss"] != ""), None)
        ran = max(stop - start, 0)
        if final_val is not None and val0 is not None:
            log(f"\ninitial val loss {val0:.4f} -> final val loss {final_val:.4f} "
                f"(train {t_train:.1f} s, {ran * tokens_per_step / max(t_train, 1e-9):.0f} tokens/s; "
                f"total {time.perf_counter() - t_start:.1f} s)")
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)  # (--data-dir: no tokenizer was written there)
            write_csv(rows, run_dir / "metrics.csv")
            written = [run_dir / "metrics.csv"]
            if not args.no_plot:
                plot(rows, run_dir / "loss.png", f"{args.optimizer} ({args.backend}), TP={args.tp} x PP={args.pp} x "
                                                 f"DP={dp}, {args.steps} steps")
                written.append(run_dir / "loss.png")
            log(f"wrote {' and '.join(map(str, written))}")
        return {"losses": losses, "vals": vals, "start": start, "run_dir": str(run_dir), "backend": args.backend,
                "optimizer": type(backend.basic_optimizer).__name__, "wrapper": type(backend.optimizer).__name__,
                "dp": dp, "rank": rank}
    finally:
        if progress is not None:
            progress.close()
        shutdown(owned)


if __name__ == "__main__":
    main()
