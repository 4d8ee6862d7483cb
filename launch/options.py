"""The command line of `python -m launch.pretrain` and the one check of a run's setup.

`check(argv, world)` parses and validates everything a run depends on (the flags, the model config's
keys, the parallel layout against the model's shapes, the data directory and its tokenizer, the
DeepSpeed JSON, the batch and the lr schedule, the run directory) and is called, before any process
is spawned or any library heavier than PyYAML is imported, by launch/pretrain.py, by
`launch/slurm/launch.py --dry-run` (and before it execs torchrun), by launch/memory.py and by
scripts/pretrain.sh (`python -m launch.options --world N ARGS`). A bad setup is one line naming the
option and the fix (ConfigError, a SystemExit).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

from launch import cli, rules
from launch.configs import REPO, ConfigError, model_sections
from launch.rules import DEEPSPEED_TYPES, OPTIMIZERS, ORTHO_TYPES

DESCRIPTION = "Pretrain a megatron-core GPT (LLaMA, GPT-2, MoE, MLA) with TEON, Muon, HTMuon or AdamW."
EPILOG = """examples:
  bash scripts/pretrain.sh                              # 2 CPU processes, TEON, the embedded corpus
  bash scripts/pretrain.sh --tp 2 --optimizer adamw     # same global batch, tensor parallel 2
  torchrun --nproc_per_node=8 -m launch.pretrain --device cuda --model-config llama_60m
  python -m launch.options --world 16 --model-config llama_1b --tp 2 --pp 2   # check a setup only
"""
DEFAULT_GLOBAL_BATCH = 32  # sequences per optimizer step, whatever the layout
# --adamw-lr's default, by what it sets (bench/results/convergence.md, docs: "Convergence study"): AdamW's own
# lr, its sweep's best on the tiny models; and the AdamW part of Muon/TEON/HTMuon (embeddings, head, norms,
# router), the best of the joint (lr, adamw_lr) sweeps: with the matrices orthogonalized, that part trains
# best at about 4x the lr AdamW alone tolerates.
ADAMW_LR_DEFAULT = {"adamw": 3e-3, "adamw_part": 1.2e-2}


def default_adamw_lr(optimizer: str) -> float:
    return ADAMW_LR_DEFAULT["adamw" if optimizer == "adamw" else "adamw_part"]


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(prog="python -m launch.pretrain", description=DESCRIPTION, epilog=EPILOG)
    p.add_argument(
        "--name",
        default=None,
        help="run directory under --runs-dir (default: <optimizer>_tp<tp>[_pp<pp>], with -2, -3, ... "
        "appended when taken; --resume picks the newest)",
    )
    p.add_argument("--runs-dir", default=str(REPO / "runs"), help="where run directories go (default: runs/)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing run directory given by --name"
    )
    p.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="cpu (gloo) or cuda (NCCL, one GPU per process)",
    )
    p.add_argument(
        "--optimizer",
        default="teon",
        choices=OPTIMIZERS,
        help="teonspeed's TEON, Muon or HTMuon (AdamW for the rest), or AdamW alone",
    )
    p.add_argument(
        "--backend",
        default=None,
        choices=["deepspeed", "megatron"],
        help="deepspeed (default at --pp 1) or megatron (required at --pp > 1 and --ep > 1)",
    )
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (--backend megatron)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (MoE models, --backend megatron)")
    p.add_argument(
        "--zero-stage",
        type=int,
        default=1,
        choices=[0, 1, 2, 3],
        help="DeepSpeed ZeRO stage (--backend deepspeed; the Megatron backend has no ZeRO); 3 also "
        "partitions the parameters (TP 1, no QK-clip)",
    )
    p.add_argument(
        "--distributed-optimizer",
        action="store_true",
        help="--backend megatron: Megatron's use_distributed_optimizer=True (each DP rank steps its "
        "partition of every gradient bucket; teonspeed optimizers, or adamw on --device cuda)",
    )
    p.add_argument(
        "--overlap-grad-reduce",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="--backend megatron: Megatron DDP's overlap_grad_reduce (each gradient bucket "
        "reduced as its backward completes; default: on with --distributed-optimizer, as "
        "Megatron-LM runs it, off otherwise)",
    )
    p.add_argument(
        "--ddp-bucket-size",
        type=int,
        default=None,
        help="--backend megatron with --overlap-grad-reduce: elements per DDP gradient bucket "
        "(default: Megatron's, max(40M, 1M x DP)); TEON stacks whose members fall in "
        "different buckets are planned across them",
    )
    p.add_argument(
        "--ds-config",
        default=None,
        help="DeepSpeed JSON to start from (configs/deepspeed/*.json); the CLI sets batch sizes and "
        "steps, and optimizer/lr/ZeRO/clipping where given (default: none, the config is "
        "built from the flags)",
    )
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--warmup", type=int, default=None, help="linear warmup steps (default: --steps / 10)")
    p.add_argument(
        "--global-batch",
        type=int,
        default=None,
        help=f"sequences per optimizer step over all ranks (default {DEFAULT_GLOBAL_BATCH}, or "
        "--micro-batch x DP x --grad-accum when --micro-batch is given): the same at any layout",
    )
    p.add_argument(
        "--micro-batch",
        type=int,
        default=None,
        help="sequences per data-parallel rank per micro-batch (default: --global-batch / (DP x "
        "--grad-accum))",
    )
    p.add_argument(
        "--grad-accum",
        type=int,
        default=1,
        help="micro-batches per step (DeepSpeed gradient accumulation; Megatron micro-batches)",
    )
    p.add_argument(
        "--seq", type=int, default=None, help="sequence length (default 64, or the model config's)"
    )
    p.add_argument("--vocab", type=int, default=1024, help="vocabulary size (BPE trained to it)")
    p.add_argument("--hidden", type=int, default=64, help="hidden size")
    p.add_argument("--layers", type=int, default=4, help="transformer layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--groups", type=int, default=2, help="query groups (GQA)")
    p.add_argument("--ffn", type=int, default=172, help="SwiGLU hidden size")
    p.add_argument("--lr", type=float, default=0.02, help="peak lr of the orthogonalized matrices")
    p.add_argument(
        "--adamw-lr",
        type=float,
        default=None,
        help=f"peak lr of the AdamW part (default {ADAMW_LR_DEFAULT['adamw_part']:g}), and of --optimizer "
        f"adamw (default {ADAMW_LR_DEFAULT['adamw']:g})",
    )
    p.add_argument(
        "--weight-decay",
        type=float,
        default=0.01,
        help="decoupled weight decay of the orthogonalized matrices (of every parameter with "
        "--optimizer adamw)",
    )
    p.add_argument(
        "--teon-k",
        type=int,
        default=None,
        help=f"TEON/HTMuon group size (default {rules.teon_k('teon')} for TEON, "
        f"{rules.teon_k('htmuon')} for HTMuon: teonspeed's); must divide the layers per pipeline "
        f"stage",
    )
    p.add_argument("--clip-grad", type=float, default=1.0, help="gradient clipping by global norm (0: off)")
    p.add_argument(
        "--qk-clip",
        type=float,
        default=None,
        metavar="TAU",
        help="QK-clip (MuonClip, teonspeed optimizers): after each step rescale the query/key "
        "rows of every attention head whose largest logit exceeded TAU; logs max_attn_logit "
        "(docs/qk-clip.md; default: off)",
    )
    p.add_argument(
        "--qk-clip-alpha",
        type=float,
        default=0.5,
        help="QK-clip: the share of the rescale on the queries; the keys get 1 - alpha (default 0.5)",
    )
    p.add_argument(
        "--qk-clip-log",
        action="store_true",
        help="log the largest attention logit (metrics.csv max_attn_logit, TensorBoard) without clipping",
    )
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor, as a fraction of the peak")
    p.add_argument("--log-every", type=int, default=20, help="steps between rows of the loss table")
    p.add_argument("--eval-every", type=int, default=50, help="steps between validation losses")
    p.add_argument("--eval-batches", type=int, default=8, help="micro-batches per validation loss")
    p.add_argument("--seed", type=int, default=1234, help="initialization and data order")
    p.add_argument("--save-every", type=int, default=0, help="save a checkpoint every N steps (0: never)")
    p.add_argument("--keep-last", type=int, default=0, help="keep only the K newest checkpoints (0: all)")
    p.add_argument(
        "--stop-at",
        type=int,
        default=None,
        help="stop after this step (saving a checkpoint there with --save-every), keeping the schedule "
        "of --steps; continue with the same command plus --resume (default: run to --steps)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest complete checkpoint in runs/<name>/checkpoints (if any)",
    )
    p.add_argument(
        "--resume-strict",
        action="store_true",
        help="like --resume, but stop if the latest checkpoint does not verify instead of falling back "
        "to the newest one that does",
    )
    p.add_argument(
        "--progress",
        default="auto",
        choices=["auto", "on", "off"],
        help="tqdm progress bar on rank 0 (auto: when stderr is a terminal)",
    )
    p.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard event files")
    p.add_argument("--no-plot", action="store_true", help="do not write loss.png")
    p.add_argument(
        "--model-config",
        default=None,
        help="configs/models/<name>.yaml (a name, a path or a layout): the architecture; replaces "
        "--vocab/--hidden/--layers/--heads/--groups/--ffn (default: none, the tiny LLaMA "
        "those flags describe)",
    )
    # The deepspeed launcher appends --local_rank=N (unless run with --no_local_rank); the rank is read from
    # the environment (LOCAL_RANK), so the flag is accepted and not shown.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--data-dir",
        default=None,
        help="Megatron indexed datasets from launch/prepare_data.py (train/valid .bin/.idx and "
        "tokenizer.json); default: tokenize the embedded corpus in memory",
    )
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The flags plus the model's fields (`args.transformer`, `args.gpt`); nothing checked against the
    world yet (see validate)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    # The options typed on the command line (not defaulted): a config's values win over the defaults only.
    quiet = build_parser()
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    args.explicit = set(vars(quiet.parse_args(argv)))
    args.argv = argv
    args.resume = args.resume or args.resume_strict
    if args.adamw_lr is None:
        args.adamw_lr = default_adamw_lr(args.optimizer)
    args.backend = args.backend or ("megatron" if args.pp > 1 or args.ep > 1 else "deepspeed")
    if args.model_config:
        args.transformer, args.gpt, _ = model_sections(args.model_config)
    else:
        args.transformer = dict(
            num_layers=args.layers,
            hidden_size=args.hidden,
            num_attention_heads=args.heads,
            num_query_groups=args.groups,
            ffn_hidden_size=args.ffn,
            gated_linear_unit=True,
            add_bias_linear=False,
            normalization="RMSNorm",
            hidden_dropout=0.0,
            attention_dropout=0.0,
        )
        args.gpt = dict(
            vocab_size=args.vocab,
            seq_length=args.seq or 64,
            position_embedding_type="rope",
            share_embeddings_and_output_weights=False,
            activation="silu",
        )
    t = args.transformer
    args.layers, args.hidden, args.heads, args.ffn = (
        t["num_layers"],
        t["hidden_size"],
        t["num_attention_heads"],
        t["ffn_hidden_size"],
    )
    args.groups = t.get("num_query_groups") or args.heads
    args.vocab = args.gpt["vocab_size"]
    args.seq = args.seq or args.gpt["seq_length"]
    args.ds_config_dict = None
    args.notes = []  # what changed from what the user asked, printed by rank 0 at the start
    return args


def check_shapes(args, world: int) -> int:
    """The layout against the world and the model's shapes (launch/rules.py: Megatron's divisibility,
    TEON's stages; and what this launcher cannot build); returns DP."""
    t = args.transformer
    layout = args.tp * args.pp * args.ep
    try:
        if min(args.tp, args.pp, args.ep) >= 1 and world % layout:
            raise ConfigError(
                f"the parallel layout --tp {args.tp} x --pp {args.pp} x --ep {args.ep} = {layout} "
                f"does not divide the world size {world} (processes); choose sizes whose product "
                f"divides {world}"
            )
        rules.check_layout(t, args.tp, args.pp, args.ep)
        rules.check_teon_stages(args.optimizer, args.teon_k, t["num_layers"], args.pp)
    except rules.LayoutError as err:
        raise ConfigError(str(err)) from None
    if t.get("num_moe_experts"):
        if t.get("moe_grouped_gemm") and importlib.util.find_spec("grouped_gemm") is None:
            raise ConfigError(
                "transformer.moe_grouped_gemm: true needs the grouped_gemm package (megatron-core's local "
                "GroupedMLP; the launcher builds without Transformer Engine); install it, or set "
                "moe_grouped_gemm: false in the model config"
            )
        if args.tp > 1 and args.device == "cpu":
            raise ConfigError(
                f"MoE with --tp {args.tp} needs sequence parallelism, which needs Transformer Engine or "
                "apex (not available on CPU); use --tp 1 (and --ep for expert parallelism)"
            )
        if args.tp > 1 and not t.get("sequence_parallel"):
            raise ConfigError(
                f"MoE with --tp {args.tp} needs sequence parallelism (Megatron's rule); set "
                "transformer.sequence_parallel: true in the model config, or use --tp 1"
            )
    return world // (args.tp * args.pp)


def check_batch(args, dp: int) -> None:
    """The global batch (sequences per step) is fixed across layouts; the micro-batch follows from it."""
    given_global, given_micro = args.global_batch is not None, args.micro_batch is not None
    per_micro = dp * args.grad_accum
    if given_micro and args.micro_batch < 1:
        raise ConfigError(f"--micro-batch must be at least 1, got {args.micro_batch}")
    if given_global and args.global_batch < 1:
        raise ConfigError(f"--global-batch must be at least 1, got {args.global_batch}")
    if given_micro and given_global and args.micro_batch * per_micro != args.global_batch:
        raise ConfigError(
            f"--global-batch {args.global_batch} != --micro-batch {args.micro_batch} x DP {dp} x "
            f"--grad-accum {args.grad_accum}; give only one of --global-batch and --micro-batch"
        )
    if given_micro:
        args.global_batch = args.micro_batch * per_micro
        return
    args.global_batch = args.global_batch if given_global else DEFAULT_GLOBAL_BATCH
    if args.global_batch % per_micro:
        raise ConfigError(
            f"--global-batch {args.global_batch} is not a multiple of DP {dp} x --grad-accum "
            f"{args.grad_accum} = {per_micro}; choose a global batch that is, or set --micro-batch"
        )
    args.micro_batch = args.global_batch // per_micro


def check_schedule(args) -> None:
    """Warmup and decay follow --steps and --warmup; a --ds-config schedule that does not fit the run is
    replaced, with a note. Sets args.warmup and args.min_lr_ratio."""
    default_warmup = args.steps // 10
    sched = (args.ds_config_dict or {}).get("scheduler")
    if sched is not None:
        kind, params = sched.get("type"), sched.get("params") or {}
        if kind != "WarmupCosineLR":
            raise ConfigError(
                f"--ds-config {args.ds_config}: scheduler {kind!r}: the launcher schedules the lr itself "
                "(linear warmup, cosine decay: --warmup, --steps, --min-lr-ratio), the same in both "
                "backends; use WarmupCosineLR or drop the 'scheduler' block"
            )
        total = params.get("total_num_steps")
        if total is not None and total != args.steps:
            args.notes.append(
                f"warning: --ds-config scheduler.total_num_steps={total} differs from --steps "
                f"{args.steps}: the lr decays over --steps"
            )
        json_warmup = params.get("warmup_num_steps")
        if args.warmup is None and json_warmup is not None:
            if json_warmup < args.steps:
                args.warmup = json_warmup
            else:
                args.notes.append(
                    f"warning: --ds-config scheduler.warmup_num_steps={json_warmup} does not fit --steps "
                    f"{args.steps} (warmup would never end): warming up over {default_warmup} steps "
                    "instead (set --warmup to choose)"
                )
        if "min_lr_ratio" not in args.explicit and "cos_min_ratio" in params:
            args.min_lr_ratio = params["cos_min_ratio"]
    if args.warmup is None:
        args.warmup = default_warmup
    if args.warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {args.warmup}")
    if args.warmup >= args.steps:
        args.notes.append(
            f"warning: --warmup {args.warmup} >= --steps {args.steps}: the lr never reaches its peak"
        )


def check_ds_config(args) -> None:
    path = Path(args.ds_config)
    if not path.is_file():
        raise ConfigError(f"--ds-config {path} does not exist (ready ones: configs/deepspeed/*.json)")
    try:
        args.ds_config_dict = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"--ds-config {path} is not valid JSON: {err}") from None
    stage = (args.ds_config_dict.get("zero_optimization") or {}).get("stage", 0)
    if "zero_stage" not in args.explicit and stage not in (0, 1, 2, 3):
        raise ConfigError(
            f"--ds-config {path}: zero_optimization.stage={stage}; teonspeed supports ZeRO stages "
            "0, 1, 2 and 3 (set it there, or pass --zero-stage)"
        )
    kind = (args.ds_config_dict.get("optimizer") or {}).get("type")
    known = {t.lower() for t in (*ORTHO_TYPES.values(), *DEEPSPEED_TYPES)}
    if kind is not None and str(kind).lower() not in known:
        raise ConfigError(
            f"--ds-config {path}: unknown optimizer type {kind!r}; teonspeed's are "
            f"{', '.join(ORTHO_TYPES.values())} (DeepSpeed's own: {', '.join(DEEPSPEED_TYPES)})"
        )


def check_qk_clip(args) -> None:
    """--qk-clip TAU / --qk-clip-alpha / --qk-clip-log (teonspeed.qk_clip)."""
    tau, alpha = args.qk_clip, args.qk_clip_alpha
    if tau is not None and not (math.isfinite(tau) and tau > 0):
        raise ConfigError(
            f"--qk-clip must be a finite number > 0 (the largest attention logit allowed), got {tau}"
        )
    if not (math.isfinite(alpha) and 0 <= alpha <= 1):
        raise ConfigError(
            f"--qk-clip-alpha must be in [0, 1] (the queries' share of the rescale), got {alpha}"
        )
    if tau is not None and args.qk_clip_log:
        raise ConfigError(
            "--qk-clip-log logs the max logit without clipping and --qk-clip TAU clips at TAU "
            "(and logs it too); give one of them"
        )
    if "qk_clip_alpha" in args.explicit and tau is None:
        raise ConfigError("--qk-clip-alpha needs --qk-clip TAU")
    if tau is not None and args.optimizer == "adamw":
        raise ConfigError(
            "--qk-clip rescales the weights through teonspeed's optimizer (it knows where the "
            "fp32 masters and ZeRO partitions live); use --optimizer muon/teon/htmuon, or "
            "--qk-clip-log to log the max logit of an AdamW run"
        )


def zero_stage(args) -> int:
    """The ZeRO stage the DeepSpeed engine will run (launch/engines.py's rule): --zero-stage where given or
    where --ds-config has no zero_optimization block, else the block's stage."""
    block = (getattr(args, "ds_config_dict", None) or {}).get("zero_optimization")
    if "zero_stage" in args.explicit or block is None:
        return args.zero_stage
    return block.get("stage", 0)


def check_zero3(args) -> None:
    """What teonspeed's optimizers refuse under ZeRO-3 (integrations/deepspeed_zero3.py), before any rank
    starts: tensor parallelism and QK-clip."""
    if args.backend != "deepspeed" or args.optimizer == "adamw" or zero_stage(args) != 3:
        return
    if args.tp > 1:
        raise ConfigError(
            f"--zero-stage 3 with --tp {args.tp}: teonspeed's ZeRO-3 is not verified with tensor "
            "parallelism; use --zero-stage 1 or 2 with --tp, or --tp 1 with ZeRO-3"
        )
    if args.qk_clip is not None or args.qk_clip_log:
        raise ConfigError(
            "--qk-clip/--qk-clip-log are not supported with --zero-stage 3 (the query/key rows are split "
            "over ranks); use --zero-stage 1 or 2 for QK-clip"
        )


# The flags that replace a --ds-config's optimizer block (launch/engines.py then builds it from the flags).
OPTIMIZER_FLAGS = frozenset({"optimizer", "lr", "adamw_lr", "weight_decay", "teon_k"})
KIND_OF_TYPE = {**{t.lower(): kind for kind, t in ORTHO_TYPES.items()}, "adamw": "adamw"}


def json_optimizer(args) -> Optional[dict]:
    """--ds-config's optimizer block when the engine gets it as written (no optimizer flag typed), else
    None."""
    block = (args.ds_config_dict or {}).get("optimizer")
    return None if block is None or args.explicit & OPTIMIZER_FLAGS else block


def json_learning_rates(params: dict) -> tuple:
    """(the matrices' lr, the AdamW part's lr) a teonspeed optimizer reads from DeepSpeed params, None where
    absent; DeepSpeed's names read as teonspeed reads them (rules.resolve_aliases: with `muon_lr`, `lr` is
    the AdamW part's; `adam_lr` is `adamw_lr`)."""
    try:
        ours = rules.resolve_aliases(params)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return ours.get("lr"), ours.get("adamw_lr")


def adopt_json_optimizer(args) -> None:
    """When the engine gets --ds-config's optimizer block, the run's optimizer and learning rates are the
    JSON's: copy them into args (which the `run:` line, the run name and the memory estimate read), and
    give the block the launcher's --lr / --adamw-lr where the JSON has none, so that the engine and the
    `run:` line agree. DeepSpeed's other optimizer types keep their own defaults (noted)."""
    block = json_optimizer(args)
    if block is None:
        return
    kind = KIND_OF_TYPE.get(str(block.get("type")).lower())
    if kind is None:
        args.notes.append(
            f"--ds-config {args.ds_config}: optimizer {block.get('type')} (DeepSpeed's own) with "
            f"its params {json.dumps(block.get('params') or {})}; the lr below is the launcher's"
        )
        return
    params = block.setdefault("params", {})
    args.adamw_lr = default_adamw_lr(kind)  # (no optimizer flag was typed: the block's kind decides)
    if kind == "adamw":
        args.adamw_lr = params.setdefault("lr", args.adamw_lr)
    else:
        lr, part = json_learning_rates(params)
        if lr is None:
            params["lr"] = lr = args.lr
        if part is None:
            params["adamw_lr"] = part = args.adamw_lr
        args.lr, args.adamw_lr = lr, part
        args.teon_k = params.get("teon_k", args.teon_k)
    args.optimizer = kind


def tokenizer_vocab(path: Path) -> int:
    """The vocabulary size of a tokenizers JSON file (its vocab plus added tokens), read without loading
    it."""
    tok = json.loads(path.read_text())
    ids = set((tok.get("model") or {}).get("vocab", {}).values())
    ids |= {a["id"] for a in tok.get("added_tokens") or []}
    return len(ids)


def check_data(args) -> None:
    data = Path(args.data_dir)
    if not data.is_dir():
        raise ConfigError(
            f"--data-dir {data} does not exist; write it with "
            f"`python -m launch.prepare_data --embedded --output-dir {data}` (or --input ... "
            "--output-prefix)"
        )
    missing = [
        f
        for f in ("tokenizer.json", "train.bin", "train.idx", "valid.bin", "valid.idx")
        if not (data / f).is_file()
    ]
    if missing:
        raise ConfigError(
            f"--data-dir {data} lacks {', '.join(missing)}; write it with "
            f"`python -m launch.prepare_data --embedded --output-dir {data}`"
        )
    try:
        vocab = tokenizer_vocab(data / "tokenizer.json")
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"--data-dir {data}: tokenizer.json is not a tokenizers file ({err})") from None
    if args.model_config and vocab != args.vocab:
        args.notes.append(
            f"vocab: the model uses the tokenizer's {vocab} tokens (--data-dir {data}); the model "
            f"config says {args.vocab}"
        )


def run_name(args) -> str:
    """--name, or the first free <optimizer>_tp<tp>[_pp<pp>][-N] (the newest taken one with --resume); an
    existing --name is refused unless --resume or --overwrite."""
    runs = Path(args.runs_dir)
    if args.name is not None:
        run = runs / args.name
        if run.exists() and any(run.iterdir()) and not (args.resume or args.overwrite):
            raise ConfigError(
                f"run directory {run} exists; pass --resume to continue it, --overwrite to replace it, "
                "or another --name"
            )
        return args.name
    base = f"{args.optimizer}_tp{args.tp}" + (f"_pp{args.pp}" if args.pp > 1 else "")
    names = [base] + [f"{base}-{i}" for i in range(2, 10_000)]
    taken = [n for n in names if (runs / n).exists()]
    if args.resume and taken:
        return max(taken, key=lambda n: (runs / n).stat().st_mtime)
    return next(n for n in names if not (runs / n).exists())


def validate(args, world: int) -> argparse.Namespace:
    """Every check that needs no process group and no heavy import; fills in the derived settings
    (dp, micro_batch/global_batch, warmup, name). Raises ConfigError naming the option and the fix."""
    for flag in ("steps", "grad_accum"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.stop_at is not None and args.stop_at < 1:
        raise ConfigError(f"--stop-at must be at least 1, got {args.stop_at}")
    for flag in ("save_every", "keep_last"):
        if getattr(args, flag) < 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if args.backend == "deepspeed" and args.pp > 1:
        raise ConfigError(
            f"--pp {args.pp} needs --backend megatron: DeepSpeed's engine cannot drive megatron-core's "
            "pipeline schedules (use --backend megatron, or --pp 1)"
        )
    if args.backend == "deepspeed" and args.ep > 1:
        raise ConfigError(
            f"--ep {args.ep} needs --backend megatron: DeepSpeed's engine would average the expert "
            "gradients over all data-parallel ranks (use --backend megatron, or --ep 1)"
        )
    if args.backend == "megatron" and args.ds_config:
        raise ConfigError("--ds-config is for --backend deepspeed; drop it or use --backend deepspeed")
    if args.backend == "megatron" and "zero_stage" in args.explicit:
        raise ConfigError(
            f"--zero-stage {args.zero_stage} is DeepSpeed's: the Megatron backend (--pp > 1 or --ep > 1) "
            "runs Megatron DDP; drop --zero-stage (--distributed-optimizer shards the optimizer state)"
        )
    if args.distributed_optimizer and args.backend != "megatron":
        raise ConfigError(
            "--distributed-optimizer is Megatron's (use_distributed_optimizer=True): add --backend "
            "megatron, or use --zero-stage 1/2 with the DeepSpeed backend"
        )
    if args.backend != "megatron":
        for flag in ("overlap_grad_reduce", "ddp_bucket_size"):
            if flag in args.explicit:
                raise ConfigError(
                    f"--{flag.replace('_', '-')} configures Megatron DDP: add --backend "
                    f"megatron, or drop it (DeepSpeed buckets its reductions itself)"
                )
    if args.overlap_grad_reduce is None:
        args.overlap_grad_reduce = bool(args.distributed_optimizer)
    if args.ddp_bucket_size is not None and (args.ddp_bucket_size < 1 or not args.overlap_grad_reduce):
        why = (
            "must be at least 1"
            if args.ddp_bucket_size < 1
            else "Megatron DDP buckets only with overlap_grad_reduce (without it each buffer is one bucket); "
            "add --overlap-grad-reduce or drop --ddp-bucket-size"
        )
        raise ConfigError(f"--ddp-bucket-size {args.ddp_bucket_size}: {why}")
    if args.distributed_optimizer and args.optimizer == "adamw" and args.device != "cuda":
        raise ConfigError(
            "--distributed-optimizer with --optimizer adamw runs Megatron's own DistributedOptimizer, "
            "which needs CUDA tensors; use --device cuda, or a teonspeed optimizer on the CPU"
        )
    if args.resume and args.overwrite:
        raise ConfigError("--resume continues a run directory and --overwrite replaces it; give one of them")
    if args.keep_last and not args.save_every:
        raise ConfigError("--keep-last needs --save-every N")
    args.dp = check_shapes(args, world)
    if args.ds_config:
        check_ds_config(args)
        adopt_json_optimizer(args)
    check_qk_clip(args)  # (after the --ds-config block has named the optimizer)
    check_zero3(args)
    if args.data_dir:
        check_data(args)
    check_batch(args, args.dp)
    check_schedule(args)
    args.name = run_name(args)
    return args


def check(argv: Optional[Sequence[str]], world: int) -> argparse.Namespace:
    """parse_args + validate: what every entry point calls before it spawns or builds anything."""
    return validate(parse_args(argv), world)


def summary(args) -> str:
    """One line: the layout, the batch in tokens and the schedule (printed at the start of a run)."""
    peak = (
        f"lr {args.adamw_lr:g}"
        if args.optimizer == "adamw"
        else f"lr {args.lr:g} (AdamW part {args.adamw_lr:g})"
    )
    return (
        f"{args.optimizer} on TP={args.tp} x PP={args.pp} x DP={args.dp}"
        + (f" (EP={args.ep})" if args.ep > 1 else "")
        + f", backend {args.backend}; batch {args.global_batch} sequences x {args.seq} tokens = "
        f"{args.global_batch * args.seq} tokens/step (micro-batch {args.micro_batch} x DP {args.dp} x "
        "accumulation "
        f"{args.grad_accum}); {peak}, warmup {args.warmup} steps, cosine to {args.min_lr_ratio:g}x over "
        f"{args.steps} steps" + _qk_clip_summary(args)
    )


def _qk_clip_summary(args) -> str:
    if args.qk_clip is not None:
        return f"; qk-clip at {args.qk_clip:g} (alpha {args.qk_clip_alpha:g})"
    return "; qk-clip log only" if args.qk_clip_log else ""


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m launch.options --world N ARGS`: check a setup for N processes and print its summary."""
    argv = list(sys.argv[1:] if argv is None else argv)
    world = 1
    if argv[:1] == ["--world"] and len(argv) > 1:
        world, argv = int(argv[1]), argv[2:]
    args = check(argv, world)
    for note in args.notes:
        print(note)
    print(f"ok: {summary(args)}; run directory {Path(args.runs_dir) / args.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
