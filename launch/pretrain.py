"""Pretrain a tiny LLaMA-style megatron-core GPT on CPU with TEON (or Muon / HTMuon / AdamW).

Launched by scripts/pretrain.sh as

    .venv/bin/torchrun --standalone --nproc_per_node=2 launch/pretrain.py [--tp 2] [--optimizer muon] ...

The story of main(): join the process group, build the corpus and tokenizer, build the model and the
optimizer, train with a cosine schedule while logging a table, then write metrics.csv and loss.png
under runs/<name>/. The corpus is the source of a fixed list of standard-library modules, so the job
needs no download and reads the same text on every machine with the same Python version.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import importlib
import inspect
import math
import random
import re
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

import teonspeed  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
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


# ---------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default=None, help="run directory under runs/ (default: <optimizer>_tp<tp>)")
    p.add_argument("--optimizer", default="teon", choices=["teon", "muon", "htmuon", "adamw"])
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size; data parallel = world / tp")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per data-parallel rank per step")
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
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor, as a fraction of the peak")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--model-config", default=None,
                   help="configs/models/<name>.yaml (a name, a path or a layout): the architecture; replaces "
                        "--vocab/--hidden/--layers/--heads/--groups/--ffn")
    p.add_argument("--data-dir", default=None,
                   help="Megatron indexed datasets from launch/prepare_data.py (train/valid .bin/.idx and "
                        "tokenizer.json); default: tokenize the embedded corpus in memory")
    args = p.parse_args()
    args.name = args.name or f"{args.optimizer}_tp{args.tp}"
    args.transformer, args.gpt = model_fields(args)
    t = args.transformer
    args.layers, args.hidden, args.heads, args.ffn = (t["num_layers"], t["hidden_size"], t["num_attention_heads"],
                                                      t["ffn_hidden_size"])
    args.groups = t.get("num_query_groups") or args.heads
    args.vocab = args.gpt["vocab_size"]
    args.seq = args.seq or args.gpt["seq_length"]
    return args


def model_fields(args) -> tuple[dict, dict]:
    """(TransformerConfig fields, GPTModel fields): the --model-config YAML's `transformer` and `model`
    sections (read by launch/memory.py, which also estimates their memory), else the flags."""
    if args.model_config:
        from memory import load_model_config
        cfg = load_model_config(args.model_config)
        return dict(cfg["transformer"]), dict(cfg["model"])
    return (dict(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                 num_query_groups=args.groups, ffn_hidden_size=args.ffn, gated_linear_unit=True,
                 add_bias_linear=False, normalization="RMSNorm", hidden_dropout=0.0, attention_dropout=0.0),
            dict(vocab_size=args.vocab, seq_length=args.seq or 64, position_embedding_type="rope",
                 share_embeddings_and_output_weights=False, activation="silu"))


# ---------------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------------
def init_parallel(tp: int) -> tuple[int, int, int]:
    """gloo world from torchrun's environment, then megatron's TP x DP groups. Returns (rank, dp_rank, dp)."""
    torch.set_num_threads(1)  # 2 processes on 2 cores: one thread each, no oversubscription
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    if world % tp:
        raise SystemExit(f"--tp {tp} does not divide the world size {world}")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=1)
    return dist.get_rank(), parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()


def shutdown() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


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
        starts = torch.randint(0, len(self.stream) - self.seq - 1, (self.batch,), generator=self.gen)
        return windows(self.stream, starts, self.seq)


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


def stack_samples(samples: list) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([s["tokens"] for s in samples]), torch.stack([s["labels"] for s in samples])


def indexed_data(args, dp: int, dp_rank: int):
    """(tokenizer, train batches, validation batches) from --data-dir. Every rank builds the datasets
    (global rank 0 writes the sample-index cache first, the others then read it)."""
    from prepare_data import MegatronTokenizerAdapter, gpt_dataset
    data = Path(args.data_dir)
    tok = MegatronTokenizerAdapter(data / "tokenizer.json")
    train = gpt_dataset(data / "train", tok, args.seq, num_samples=args.steps * args.micro_batch * dp, seed=args.seed)
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
# Model and optimizer
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
    layer; with --model-config whatever configs/models/<name>.yaml describes (GPT-2, MoE, ...)."""
    fields = dict(args.transformer)
    config_class = MLATransformerConfig if fields.pop("multi_latent_attention", False) else TransformerConfig
    config = config_class(
        **fields, activation_func=ACTIVATIONS[args.gpt["activation"]], tensor_model_parallel_size=args.tp,
        pipeline_model_parallel_size=1, params_dtype=torch.float32, pipeline_dtype=torch.float32,
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
                    max_sequence_length=args.seq, pre_process=True, post_process=True,
                    position_embedding_type=args.gpt["position_embedding_type"],
                    share_embeddings_and_output_weights=args.gpt["share_embeddings_and_output_weights"],
                    rotary_base=args.gpt.get("rotary_base", 10000))


def padded_vocab(vocab: int, tp: int, multiple: int = 128) -> int:
    """The output layer is split over TP ranks: pad the embedding rows to a multiple of 128 * tp."""
    m = multiple * tp
    return (vocab + m - 1) // m * m


def build_optimizer(args, model: torch.nn.Module) -> torch.optim.Optimizer:
    if args.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=args.adamw_lr, betas=(0.9, 0.95),
                                 weight_decay=args.weight_decay)
    cls = {"teon": teonspeed.TEON, "muon": teonspeed.Muon, "htmuon": teonspeed.HTMuon}[args.optimizer]
    # Passing the module (not its parameters) lets teonspeed read megatron's TP/DP layout and split
    # the fused QKV / gated-MLP weights into their parts.
    return cls(model, lr=args.lr, adamw_lr=args.adamw_lr, weight_decay=args.weight_decay)


def lr_factor(step: int, args) -> float:
    """Linear warmup to the peak, then cosine down to min_lr_ratio of it."""
    if step < args.warmup:
        return (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(opt: torch.optim.Optimizer, factor: float) -> None:
    for group in opt.param_groups:
        group.setdefault("peak_lr", group["lr"])
        group["lr"] = group["peak_lr"] * factor


# ---------------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------------
def forward_loss(model, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    position_ids = torch.arange(tokens.size(1)).unsqueeze(0).expand_as(tokens)
    # With labels megatron returns the per-token cross-entropy [b, s] (vocab-parallel under TP).
    return model(tokens, position_ids, attention_mask=None, labels=labels).mean()


def average_gradients(model: torch.nn.Module, dp: int) -> None:
    """Data parallelism by hand (megatron's DDP wrapper needs CUDA): one flat all-reduce of all grads."""
    if dp == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=parallel_state.get_data_parallel_group())  # gloo has no AVG: sum, divide
    flat.div_(dp)
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def dp_mean(value: float, dp: int) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, group=parallel_state.get_data_parallel_group())
    return t.item() / dp


def train_step(model, opt, tokens, labels, dp: int) -> float:
    opt.zero_grad(set_to_none=True)
    loss = forward_loss(model, tokens, labels)
    loss.backward()
    average_gradients(model, dp)
    opt.step()
    return loss.item()


@torch.no_grad()
def evaluate(model, batches: list, dp_rank: int, dp: int) -> float:
    """Mean loss over the fixed validation batches, each DP rank taking every dp-th batch."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for i in range(dp_rank, len(batches), dp):
        total += torch.tensor([forward_loss(model, *batches[i]).item(), 1.0], dtype=torch.float64)
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    model.train()
    return (total[0] / total[1]).item()


# ---------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------
HEADER = f"{'step':>6} | {'train loss':>10} | {'val loss':>8} | {'lr':>9} | {'tokens/s':>9}"


def table_row(step, train, val, lr, tps) -> str:
    val_s = f"{val:8.4f}" if val is not None else f"{'':8}"
    return f"{step:6d} | {train:10.4f} | {val_s} | {lr:9.2e} | {tps:9.0f}"


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "train_loss", "val_loss", "lr", "tokens_per_s"])
        w.writeheader()
        w.writerows(rows)


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
def main() -> None:
    args = parse_args()
    t_start = time.perf_counter()
    rank, dp_rank, dp = init_parallel(args.tp)
    try:
        run_dir = REPO / "runs" / args.name
        random.seed(args.seed)
        torch.manual_seed(args.seed)

        if args.data_dir:
            # Data: Megatron indexed datasets written by launch/prepare_data.py.
            tok, batches, val_set = indexed_data(args, dp, dp_rank)
            vocab_size = tok.vocab_size
        else:
            # Data: the stdlib corpus, a fixed 95/5 split, a BPE tokenizer trained on the training part.
            docs = load_documents()
            train_docs, val_docs = split_documents(docs)
            digest = hashlib.sha256("\0".join(docs).encode()).hexdigest()[:12]
            tok = build_tokenizer(train_docs, args.vocab, run_dir / "tokenizer.json")
            train_stream, val_stream = encode(tok, train_docs), encode(tok, val_docs)
            vocab_size = tok.get_vocab_size()
            log(f"corpus: {len(CORPUS_MODULES)} stdlib modules, {sum(map(len, docs)) / 1e6:.2f} MB, sha256 {digest}; "
                f"{len(train_docs)}/{len(val_docs)} train/val documents, {len(train_stream)}/{len(val_stream)} tokens, "
                f"vocab {vocab_size}")
            batches = TrainBatches(train_stream, args.seq, args.micro_batch, args.seed, dp_rank)
            val_set = val_batches(val_stream, args.seq, args.micro_batch, args.eval_batches)

        # Model and optimizer.
        model = build_model(args, padded_vocab(vocab_size, args.tp))
        n_params = sum(p.numel() for p in model.parameters())
        log(f"model: {args.layers} layers, hidden {args.hidden}, {args.heads} heads / {args.groups} groups, "
            f"ffn {args.ffn}, seq {args.seq}; {n_params / 1e6:.3f} M parameters on this rank; "
            f"layout TP={args.tp} x DP={dp}")
        opt = build_optimizer(args, model)
        log(opt.plan if hasattr(opt, "plan") else f"optimizer: torch.optim.AdamW lr={args.adamw_lr}")

        # Train.
        tokens_per_step = dp * args.micro_batch * args.seq
        rows, window = [], []  # rows: one per step for metrics.csv; window: train losses since the last table row
        log(f"\n{args.steps} steps of {tokens_per_step} tokens, optimizer {args.optimizer}\n{HEADER}\n{'-' * len(HEADER)}")
        val0 = evaluate(model, val_set, dp_rank, dp)
        rows.append({"step": 0, "train_loss": "", "val_loss": val0, "lr": "", "tokens_per_s": ""})
        t_log, t_train = time.perf_counter(), time.perf_counter()
        for step in range(args.steps):
            factor = lr_factor(step, args)
            set_lr(opt, factor)
            loss = dp_mean(train_step(model, opt, *batches.next(), dp), dp)
            window.append(loss)
            done = step + 1
            val = None
            if done % args.eval_every == 0 or done == args.steps:
                val = evaluate(model, val_set, dp_rank, dp)
            peak = args.adamw_lr if args.optimizer == "adamw" else args.lr
            row = {"step": done, "train_loss": loss, "val_loss": "" if val is None else val,
                   "lr": peak * factor, "tokens_per_s": ""}
            if done % args.log_every == 0 or val is not None or done == 1:  # every eval gets a row too
                now = time.perf_counter()
                tps = tokens_per_step * len(window) / (now - t_log)
                row["tokens_per_s"] = tps
                # The table shows the mean train loss since the previous row (less noisy than one step).
                log(table_row(done, sum(window) / len(window), val, peak * factor, tps))
                window, t_log = [], now
            rows.append(row)
        t_train = time.perf_counter() - t_train

        # Results.
        final_val = rows[-1]["val_loss"]
        log(f"\ninitial val loss {val0:.4f} -> final val loss {final_val:.4f} "
            f"(train {t_train:.1f} s, {args.steps * tokens_per_step / t_train:.0f} tokens/s; "
            f"total {time.perf_counter() - t_start:.1f} s)")
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)  # (--data-dir: no tokenizer was written there)
            write_csv(rows, run_dir / "metrics.csv")
            plot(rows, run_dir / "loss.png", f"{args.optimizer}, TP={args.tp} x DP={dp}, {args.steps} steps")
            log(f"wrote {run_dir / 'metrics.csv'} and {run_dir / 'loss.png'}")
    finally:
        shutdown()


if __name__ == "__main__":
    main()
