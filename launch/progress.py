"""What launch/pretrain.py shows and writes on rank 0: the loss table, a tqdm progress bar (step, loss,
tokens/s, lr, ETA), TensorBoard event files (when the `tensorboard` package is installed) and metrics.csv.
Every other rank gets a Progress whose methods do nothing."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Dict, List, Optional

FIELDS = ["step", "train_loss", "val_loss", "lr", "tokens_per_s"]
OPTIONAL_FIELDS = ["max_attn_logit"]  # --qk-clip / --qk-clip-log: the largest attention logit of the step
HEADER = f"{'step':>6} | {'train loss':>10} | {'val loss':>8} | {'lr':>9} | {'tokens/s':>9}"


def table_row(step, train, val, lr, tps) -> str:
    val_s = f"{val:8.4f}" if val is not None else f"{'':8}"
    return f"{step:6d} | {train:10.4f} | {val_s} | {lr:9.2e} | {tps:9.0f}"


def tensorboard_writer(log_dir: Path):
    """A SummaryWriter, or (None, reason) when torch.utils.tensorboard cannot be imported."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as err:  # noqa: BLE001 - ModuleNotFoundError: tensorboard is an optional dependency
        return None, f"{type(err).__name__}: {err}"
    return SummaryWriter(log_dir=str(log_dir)), None


def write_csv(rows: List[dict], path: Path) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS + [k for k in OPTIONAL_FIELDS if any(k in r for r in rows)])
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def read_csv(path: Path) -> List[dict]:
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            rows.append({k: (int(v) if k == "step" else (float(v) if v != "" else "")) for k, v in r.items()})
    return rows


class Progress:
    """Rank 0's outputs. `bar`: 'on', 'off' or 'auto' (on when stderr is a terminal)."""

    def __init__(
        self,
        enabled: bool,
        total_steps: int,
        start_step: int,
        run_dir: Path,
        bar: str = "auto",
        tensorboard: bool = True,
        log=print,
    ):
        self.enabled, self.log_fn = enabled, log
        self.bar = self.writer = None
        if not enabled:
            return
        if bar == "on" or (bar == "auto" and sys.stderr.isatty()):
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps,
                initial=start_step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                leave=True,
                file=sys.stderr,
            )
        if tensorboard:
            self.writer, reason = tensorboard_writer(run_dir / "tensorboard")
            if self.writer is None:
                self.log(f"tensorboard: not written ({reason}); pip install tensorboard to get event files")
            else:
                self.log(f"tensorboard: {run_dir / 'tensorboard'}")

    def log(self, *args) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            from tqdm import tqdm

            tqdm.write(" ".join(str(a) for a in args), file=sys.stdout)
            sys.stdout.flush()
        else:
            self.log_fn(*args)

    def step(self, step: int, loss: float, lr: float, tokens_per_s: Optional[float]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            post = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}"}
            if tokens_per_s:
                post["tok/s"] = f"{tokens_per_s:.0f}"
            self.bar.set_postfix(post, refresh=False)
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", lr, step)
            if tokens_per_s:
                self.writer.add_scalar("train/tokens_per_s", tokens_per_s, step)

    def scalars(self, values: Dict[str, float], step: int) -> None:
        if self.enabled and self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
