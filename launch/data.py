"""Training and validation batches for launch/pretrain.py: the embedded corpus tokenized in memory by
a BPE trained on the fly, or Megatron indexed datasets written by launch/prepare_data.py."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from launch.corpus import EOT
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


def indexed_data(args, dp: int, dp_rank: int, log=print):
    """(tokenizer, train batches, validation batches) from --data-dir. Every rank builds the datasets
    (global rank 0 writes the sample-index cache first, the others then read it)."""
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

