"""Training and validation batches for launch/pretrain.py: the embedded corpus tokenized in memory by
a BPE trained on the fly, or Megatron indexed datasets written by launch/prepare_data.py."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from launch.corpus import CORPUS_MODULES, EOT, corpus_digest, load_documents, split_documents
from launch.prepare_data import MegatronTokenizerAdapter, gpt_dataset, train_bpe


def build_tokenizer(train_docs: list[str], vocab: int, path: Path):
    """Byte-level BPE trained on the training split by rank 0; the other ranks load its file."""
    from tokenizers import Tokenizer

    if dist.get_rank() == 0:
        tok = train_bpe(train_docs, vocab)
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
    chunk = torch.stack([stream[s : s + seq + 1] for s in starts.tolist()])
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


def indexed_data(args, dp: int, dp_rank: int, log=print):
    """(tokenizer, train batches, validation batches) from --data-dir. Every rank builds the datasets
    (global rank 0 writes the sample-index cache first, the others then read it)."""
    data = Path(args.data_dir)
    tok = MegatronTokenizerAdapter(data / "tokenizer.json")
    train = gpt_dataset(
        data / "train",
        tok,
        args.seq,
        num_samples=args.steps * args.grad_accum * args.micro_batch * dp,
        seed=args.seed,
    )
    valid = gpt_dataset(data / "valid", tok, args.seq, seed=args.seed, split="valid")
    n = min(args.eval_batches, len(valid) // args.micro_batch)
    val_set = [
        stack_samples([valid[i * args.micro_batch + j] for j in range(args.micro_batch)]) for i in range(n)
    ]
    log(
        f"data: {data} (Megatron indexed datasets), {len(train)} train / {len(valid)} validation samples of "
        f"{args.seq} + 1 tokens, vocab {tok.vocab_size}"
    )
    return tok, IndexedBatches(train, args.micro_batch, dp_rank, dp), val_set


def val_batches(stream: torch.Tensor, seq: int, batch: int, count: int) -> list:
    """A fixed set of evenly spaced validation windows, the same at every evaluation."""
    n = count * batch
    starts = torch.linspace(0, len(stream) - seq - 2, n).long()
    return [windows(stream, starts[i * batch : (i + 1) * batch], seq) for i in range(count)]


def training_data(args, dp: int, dp_rank: int, run_dir: Path, resuming: bool, log=print):
    """(train batches, validation batches, vocabulary size) of a run: --data-dir's indexed datasets, or
    the embedded corpus tokenized in memory."""
    if args.data_dir:
        tok, batches, val_set = indexed_data(args, dp, dp_rank, log)
        return batches, val_set, tok.vocab_size
    return embedded_data(args, dp_rank, run_dir, resuming, log)


def embedded_data(args, dp_rank: int, run_dir: Path, resuming: bool, log=print):
    """The stdlib corpus, a fixed 95/5 split, a BPE tokenizer trained on the training part (reused from the
    run directory when resuming, so the token ids cannot change): (train batches, validation batches,
    vocabulary size)."""
    docs = load_documents()
    train_docs, val_docs = split_documents(docs)
    digest = corpus_digest(docs)
    tok_path = run_dir / "tokenizer.json"
    if resuming and tok_path.exists():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tok_path))
    else:
        tok = build_tokenizer(train_docs, args.vocab, tok_path)
    train_stream, val_stream = encode(tok, train_docs), encode(tok, val_docs)
    vocab_size = tok.get_vocab_size()
    if vocab_size < args.vocab:
        log(
            f"vocab: the BPE reached {vocab_size} tokens on the embedded corpus, fewer than the {args.vocab} "
            f"asked for: the model uses {vocab_size}"
        )
    log(
        f"corpus: {len(CORPUS_MODULES)} stdlib modules, {sum(map(len, docs)) / 1e6:.2f} MB, sha256 "
        f"{digest}; {len(train_docs)}/{len(val_docs)} train/val documents, {len(train_stream)}/"
        f"{len(val_stream)} tokens, vocab {vocab_size}"
    )
    batches = TrainBatches(train_stream, args.seq, args.micro_batch, args.seed, dp_rank)
    return batches, val_batches(val_stream, args.seq, args.micro_batch, args.eval_batches), vocab_size
