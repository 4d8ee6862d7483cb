"""Per-GPU memory of a megatron-core GPT (LLaMA / GPT-2 / MoE / MLA) under TP x PP x DP (x EP).

    .venv/bin/python -m launch.memory configs/models/llama_1b.yaml --tp 2 --pp 2 --dp 4 --micro-batch 4 \\
        --optimizer teon
    .venv/bin/python -m launch.memory configs/models/layouts/llama_1b_tp2_pp2.yaml    # a layout config
    .venv/bin/python -m launch.memory --update-layouts    # rewrite memory_estimate in configs/models/layouts/

The command line of launch/estimator/ (which describes what is counted, and how). The setup is checked
by the launcher's own validator (launch/options.py), so an estimate is always of a setup the launcher runs.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Optional, Sequence

from launch import cli
from launch.configs import REPO, ConfigError, is_layout, read_yaml, resolve_config_path
from launch.estimator import estimate, launch_argv, setup_from_launch, update_layouts
from launch.rules import OPTIMIZERS


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = cli.parser(
        prog="python -m launch.memory",
        description=__doc__.split("\n\n")[0],
        epilog="A layout config gives the defaults; every flag typed overrides it. The setup is "
        "checked by launch/pretrain.py's own validator.",
    )
    p.add_argument(
        "config",
        nargs="?",
        help="a model config (name or path) or a layout config (default: none; needed unless "
        "--update-layouts or --check-layouts)",
    )
    layout_or = "default: the layout config's, else"
    p.add_argument("--tp", type=int, default=None, help=f"tensor-parallel size ({layout_or} 1)")
    p.add_argument("--pp", type=int, default=None, help=f"pipeline-parallel size ({layout_or} 1)")
    p.add_argument("--dp", type=int, default=None, help=f"data-parallel size ({layout_or} 1)")
    p.add_argument("--ep", type=int, default=None, help=f"expert-parallel size ({layout_or} 1)")
    p.add_argument(
        "--micro-batch",
        type=int,
        default=None,
        help=f"sequences per data-parallel rank per micro-batch ({layout_or} as launch.pretrain derives it)",
    )
    p.add_argument(
        "--global-batch",
        type=int,
        default=None,
        help=f"sequences per optimizer step ({layout_or} launch.pretrain's)",
    )
    p.add_argument(
        "--grad-accum",
        type=int,
        default=None,
        help="micro-batches per step, in flight under PP (default: --global-batch / "
        "(--micro-batch x --dp) when both are known, else 1)",
    )
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: the model config's)")
    p.add_argument(
        "--optimizer",
        default=None,
        choices=OPTIMIZERS,
        help=f"the optimizer whose state is counted ({layout_or} adamw)",
    )
    p.add_argument(
        "--zero-stage",
        type=int,
        default=None,
        choices=[0, 1, 2, 3],
        help=f"DeepSpeed ZeRO stage, the DeepSpeed backend only: --pp 1 and --ep 1 ({layout_or} "
        "launch.pretrain's)",
    )
    cli.refuse_old_spelling(p, "--zero", "--zero-stage")
    p.add_argument(
        "--ds-config",
        default=None,
        help="the DeepSpeed JSON; bf16 there means bf16 weights (default: none, fp32)",
    )
    p.add_argument("--overhead-gib", type=float, default=1.0, help="CUDA context and allocator allowance")
    p.add_argument(
        "--update-layouts", action="store_true", help="rewrite memory_estimate in every layout config"
    )
    p.add_argument(
        "--check-layouts", action="store_true", help="exit 1 if a layout's memory_estimate is stale"
    )
    args = p.parse_args(argv)
    if args.update_layouts or args.check_layouts:
        stale = update_layouts(check=args.check_layouts)
        verb = "stale" if args.check_layouts else "updated"
        print("\n".join(f"{verb}: {s.relative_to(REPO)}" for s in stale) or "all layouts current")
        return 1 if (args.check_layouts and stale) else 0
    if not args.config:
        p.error("give a config, or --update-layouts")
    path = resolve_config_path(args.config)
    raw = read_yaml(path)
    layout = dict(tp=1, pp=1, dp=1, ep=1)
    tr: Dict[str, Any] = {}
    if is_layout(raw):
        layout.update(raw["parallel"])
        tr = dict(raw.get("training") or {})
    given = {k: v for k, v in dict(tp=args.tp, pp=args.pp, dp=args.dp, ep=args.ep).items() if v is not None}
    layout.update(given)
    micro = (
        args.micro_batch
        if args.micro_batch is not None
        else (None if args.global_batch else tr.get("micro_batch"))
    )
    glob = (
        args.global_batch
        if args.global_batch is not None
        else (None if args.micro_batch else tr.get("global_batch"))
    )
    accum = args.grad_accum
    if accum is None:
        accum = glob // (micro * layout["dp"]) if glob and micro else 1
    zero = args.zero_stage if args.zero_stage is not None else tr.get("zero_stage")
    if zero is not None and (layout["pp"] > 1 or layout["ep"] > 1) and args.zero_stage is None:
        zero = None  # the layout's ZeRO stage cannot apply to the Megatron backend
    argv = launch_argv(
        str(path),
        tp=layout["tp"],
        pp=layout["pp"],
        dp=layout["dp"],
        ep=layout["ep"],
        optimizer=args.optimizer or tr.get("optimizer", "adamw"),
        micro_batch=micro,
        global_batch=glob,
        grad_accum=accum,
        seq=args.seq,
        zero_stage=zero,
        ds_config=args.ds_config or (str(REPO / tr["ds_config"]) if tr.get("ds_config") else None),
    )
    spec, par, train = setup_from_launch(argv, layout["tp"] * layout["pp"] * layout["dp"], args.overhead_gib)
    try:
        print(estimate(spec, par, train).table())
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
