"""The training run of launch/pretrain.py, top to bottom: processes, data, model, backend, resume,
the loop, the outputs. Imported only after launch/options.py has checked the setup (it loads
megatron-core, DeepSpeed and torch)."""

from __future__ import annotations

import json
import os
import random
import socket
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from launch import checkpoint
from launch.data import training_data
from launch.engines import DeepSpeedBackend, MegatronBackend, deepspeed_config, qk_clip_options
from launch.model import build_model
from launch.options import summary
from launch.progress import HEADER, Progress, read_csv, table_row, write_csv
from launch.rules import padded_vocab
from launch.schedule import deepspeed_scheduler


def init_parallel(args) -> tuple[int, int, int]:
    """The world (torchrun's environment, or the one the caller made): gloo on CPU, NCCL with one GPU per
    process on CUDA; then megatron's TP x PP x DP (x EP) groups. Returns (rank, dp_rank, dp)."""
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        torch.set_num_threads(1)  # 2 processes on 2 cores: one thread each, no oversubscription
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # plain `python -m launch.pretrain`: a world of one
            os.environ.update(
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(_free_port()),
                RANK="0",
                WORLD_SIZE="1",
                LOCAL_RANK="0",
            )
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tp,
        pipeline_model_parallel_size=args.pp,
        expert_model_parallel_size=args.ep,
    )
    return (
        dist.get_rank(),
        parallel_state.get_data_parallel_rank(),
        parallel_state.get_data_parallel_world_size(),
    )


def shutdown(owned: bool) -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if owned and dist.is_initialized():
        dist.destroy_process_group()


def log(*args) -> None:
    if dist.get_rank() == 0:
        print(*args, flush=True)


def agree_on_run_dir(args, rank: int) -> Path:
    """Rank 0's run name for everyone (a default name depends on which directories exist when each rank
    looked); --overwrite clears it before anything is written."""
    names = [args.name]
    dist.broadcast_object_list(names, src=0)
    args.name = names[0]
    run_dir = Path(args.runs_dir) / args.name
    if args.overwrite and rank == 0 and run_dir.exists():
        shutil.rmtree(run_dir)
    dist.barrier()
    return run_dir


def build_backend(args, model, dp: int):
    if args.backend == "deepspeed":
        return DeepSpeedBackend(
            model, deepspeed_config(args, dp), deepspeed_scheduler(args), qk_clip_options(args)
        )
    return MegatronBackend(model, args)


def describe_backend(args, backend) -> str:
    if args.backend == "deepspeed":
        c = backend.config
        source = f" (from {args.ds_config})" if args.ds_config else ""
        return (
            f"backend: DeepSpeed engine, ZeRO stage {c['zero_optimization'].get('stage', 0)}, optimizer "
            f"{c['optimizer']['type']} {json.dumps(c['optimizer'].get('params', {}))}, lr schedule "
            f"launch/schedule.py, clipping {c.get('gradient_clipping', 0)}, accumulation "
            f"{c['gradient_accumulation_steps']}{source}"
        )
    clip = f"; {backend.clip_note}" if backend.clip_note else ""
    wrapper, inner = type(backend.optimizer).__name__, type(backend.basic_optimizer).__name__
    return (
        f"backend: Megatron DDP ({backend.ddp_note()}) + {wrapper}({inner}), OptimizerParamScheduler "
        f"(launch/schedule.py's sequence), {args.grad_accum} micro-batch(es) per step through "
        f"{backend.forward_backward.__name__}{clip}"
    )


def describe_optimizer(backend) -> str:
    opt = backend.basic_optimizer
    if hasattr(opt, "plan"):
        return str(opt.plan)
    groups = opt.param_groups
    return f"optimizer: {type(opt).__name__}, {len(groups)} param groups, lr {groups[0]['lr']}"


# ---------------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------------
def _loss_sum(value, device) -> torch.Tensor:
    """[sum, count] of `value` over the ranks that have one (the last pipeline stage's, TP ranks alike)."""
    t = torch.tensor(
        [0.0 if value is None else float(value), 0.0 if value is None else 1.0],
        dtype=torch.float64,
        device=device,
    )
    dist.all_reduce(t)
    return t


def world_mean(value, device) -> float | None:
    """Mean over the ranks that have `value` (one host read)."""
    total, count = _loss_sum(value, device).tolist()
    return total / count if count > 0 else None


def world_mean_and_max(value, max_logit, device) -> tuple:
    """world_mean of the loss, and the largest attention logit over every rank (each holds its pipeline
    stage's and TP shard's heads) in the same host read: (mean or None, max or None)."""
    t = _loss_sum(value, device)
    m = (
        max_logit.detach().to(device=device, dtype=torch.float64).reshape(1)
        if max_logit is not None
        else torch.full((1,), float("-inf"), dtype=torch.float64, device=device)
    )
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    total, count, top = torch.cat([t, m]).tolist()
    return (total / count if count > 0 else None), (top if top != float("-inf") else None)


def evaluate(backend, batches: list, dp_rank: int, dp: int, device) -> float:
    """Mean loss over the fixed validation batches, each DP replica taking every dp-th batch."""
    losses = backend.evaluate_losses(batches[dp_rank::dp])
    t = torch.tensor([sum(losses), len(losses)], dtype=torch.float64, device=device)
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
def run(args) -> dict:
    """Train a checked setup (launch.options.check); returns a summary (rank 0's view): the per-step
    losses and lrs of this invocation, the validation losses, where it started."""
    t_start = time.perf_counter()
    owned = not dist.is_initialized()
    rank, dp_rank, dp = init_parallel(args)
    device = (
        torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    )
    progress = None
    try:
        run_dir = agree_on_run_dir(args, rank)
        for note in args.notes:
            log(note)
        log(f"run: {summary(args)}; run directory {run_dir}")
        ckpt_root = run_dir / "checkpoints"
        layout = dict(
            backend=args.backend,
            world=dist.get_world_size(),
            tp=args.tp,
            pp=args.pp,
            ep=args.ep,
            zero_stage=args.zero_stage if args.backend == "deepspeed" else None,
        )
        resume_from = checkpoint.resume_point(ckpt_root, args.resume_strict, log) if args.resume else None
        if args.resume and resume_from is None:
            log(f"--resume: no complete checkpoint in {ckpt_root}; starting from step 0")
        random.seed(args.seed)
        torch.manual_seed(args.seed)

        # Data: --data-dir's indexed datasets, or the embedded corpus (launch/data.py).
        batches, val_set, vocab_size = training_data(args, dp, dp_rank, run_dir, resume_from is not None, log)

        # Model and backend (optimizer, scheduler, data parallelism).
        model = build_model(args, padded_vocab(vocab_size, args.tp))
        n_params = sum(p.numel() for p in model.parameters())
        log(
            f"model: {args.layers} layers, hidden {args.hidden}, {args.heads} heads / {args.groups} groups, "
            f"ffn {args.ffn}, seq {args.seq}; {n_params / 1e6:.3f} M parameters on this rank; "
            f"layout TP={args.tp} x PP={args.pp} x DP={dp}" + (f" (EP={args.ep})" if args.ep > 1 else "")
        )
        backend = build_backend(args, model, dp)
        log(describe_backend(args, backend))
        log(describe_optimizer(backend))

        # Resume.
        start, rows = 0, []
        if resume_from is not None:
            state = checkpoint.load(resume_from, backend, layout, log)
            start = state["step"]
            batches.skip(state["micro_batches"])
            if (resume_from / "metrics.csv").exists():
                rows = [r for r in read_csv(resume_from / "metrics.csv") if r["step"] <= start]
            log(f"resumed from {resume_from} at step {start}")
        if start >= args.steps:
            log(f"nothing to do: step {start} >= --steps {args.steps}")

        # Train.
        tokens_per_step = dp * args.micro_batch * args.grad_accum * args.seq
        progress = Progress(
            rank == 0,
            args.steps,
            start,
            run_dir,
            bar=args.progress,
            tensorboard=not args.no_tensorboard,
            log=log,
        )
        out = progress.log
        losses, lrs, vals, max_logits = [], [], [], []
        out(
            f"\n{args.steps} steps of {tokens_per_step} tokens, optimizer {args.optimizer}, "
            f"backend {args.backend}"
            + (f", from step {start}" if start else "")
            + f"\n{HEADER}\n{'-' * len(HEADER)}"
        )
        if start == 0:
            val0 = evaluate(backend, val_set, dp_rank, dp, device)
            rows.append({"step": 0, "train_loss": "", "val_loss": val0, "lr": "", "tokens_per_s": ""})
            vals.append((0, val0))
            progress.scalars({"val/loss": val0}, 0)
        val0 = next((r["val_loss"] for r in rows if r["step"] == 0 and r["val_loss"] != ""), None)
        window, t_log, t_train = [], time.perf_counter(), time.perf_counter()
        stop = min(args.steps, args.stop_at) if args.stop_at is not None else args.steps
        for step in range(start, stop):
            lr = backend.lr()
            lrs.append(lr)
            micro = [batches.next() for _ in range(args.grad_accum)]
            t0 = time.perf_counter()
            clip = backend.qk_clip
            if clip is None:
                loss, max_logit = world_mean(backend.train_step(micro), device), None
            else:
                loss, max_logit = world_mean_and_max(backend.train_step(micro), clip.max_logit, device)
                max_logits.append(max_logit)
                if max_logit is not None:
                    progress.scalars({"train/max_attn_logit": max_logit}, step + 1)
            losses.append(loss)
            window.append(loss)
            done = step + 1
            val = None
            if done % args.eval_every == 0 or done == args.steps:
                val = evaluate(backend, val_set, dp_rank, dp, device)
                vals.append((done, val))
                progress.scalars({"val/loss": val}, done)
            row = {
                "step": done,
                "train_loss": loss,
                "val_loss": "" if val is None else val,
                "lr": lr,
                "tokens_per_s": "",
            }
            if clip is not None:
                row["max_attn_logit"] = "" if max_logit is None else max_logit
            step_tps = tokens_per_step / max(time.perf_counter() - t0, 1e-9)
            if (
                done % args.log_every == 0 or val is not None or done == start + 1
            ):  # every eval gets a row too
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
                path = checkpoint.save(
                    ckpt_root,
                    done,
                    backend,
                    {"step": done, "micro_batches": done * args.grad_accum},
                    run_dir / "metrics.csv",
                    layout,
                    keep_last=args.keep_last,
                )
                out(f"saved {path}")
        t_train = time.perf_counter() - t_train
        progress.close()

        # Results.
        final_val = next((r["val_loss"] for r in reversed(rows) if r["val_loss"] != ""), None)
        ran = max(stop - start, 0)
        if final_val is not None and val0 is not None:
            log(
                f"\ninitial val loss {val0:.4f} -> final val loss {final_val:.4f} "
                f"(train {t_train:.1f} s, {ran * tokens_per_step / max(t_train, 1e-9):.0f} tokens/s; "
                f"total {time.perf_counter() - t_start:.1f} s)"
            )
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)  # (--data-dir: no tokenizer was written there)
            write_csv(rows, run_dir / "metrics.csv")
            written = [run_dir / "metrics.csv"]
            if not args.no_plot:
                plot(
                    rows,
                    run_dir / "loss.png",
                    f"{args.optimizer} ({args.backend}), TP={args.tp} x PP={args.pp} x "
                    f"DP={dp}, {args.steps} steps",
                )
                written.append(run_dir / "loss.png")
            log(f"wrote {' and '.join(map(str, written))}")
        if stop < args.steps:
            log(
                f"stopped at step {stop} of {args.steps} (--stop-at)"
                + (
                    f"; continue with the same command plus --resume (and --name {args.name})"
                    if args.save_every
                    else "; nothing was saved (no --save-every), so a later --resume starts over"
                )
            )
        return {
            "losses": losses,
            "lrs": lrs,
            "vals": vals,
            "max_attn_logits": max_logits,
            "start": start,
            "run_dir": str(run_dir),
            "backend": args.backend,
            "optimizer": type(backend.basic_optimizer).__name__,
            "wrapper": type(backend.optimizer).__name__,
            "dp": dp,
            "rank": rank,
        }
    finally:
        if progress is not None:
            progress.close()
        shutdown(owned)


def _free_port() -> int:
    """A TCP port free on the loopback now, for a world of one (its store listens there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
