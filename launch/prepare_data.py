"""Tokenize text into a Megatron indexed dataset (<prefix>.bin + <prefix>.idx).

    # your own text: .txt files (one document per file, or per line / per paragraph) and JSONL files
    # (one document per line, field "text"); a byte-level BPE is trained on them unless --tokenizer is given
    .venv/bin/python -m launch.prepare_data --input corpus/ more.jsonl --output-prefix data/mycorpus \\
        --vocab-size 32000 --workers 8

    # with an existing tokenizer.json (Hugging Face `tokenizers` format)
    .venv/bin/python -m launch.prepare_data --input train.jsonl.gz --tokenizer tokenizer.json \\
        --output-prefix data/train

    # the embedded default corpus (launch/corpus.py) (stdlib sources), with its fixed 95/5 split:
    # writes data/embedded/{tokenizer.json,train.bin,train.idx,valid.bin,valid.idx,manifest.json}
    .venv/bin/python -m launch.prepare_data --embedded --output-dir data/embedded --vocab-size 1024

The files are written by megatron-core's own `IndexedDatasetBuilder`, one sequence per document, each
document's tokens followed by the end-of-document token, so `megatron.core.datasets.IndexedDataset`
and `GPTDataset` read them as they read the output of Megatron-LM's tools/preprocess_data.py. Token ids
are stored as uint16 when the vocabulary has fewer than 65,500 entries, else int32 (Megatron's rule).
The tokenizer is a Hugging Face `tokenizers` byte-level BPE (trained with the same settings as the one
launch/pretrain.py trains on the fly); `MegatronTokenizerAdapter` wraps it for Megatron's dataset code.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional, Sequence

from launch import cli
from launch.configs import ConfigError
from launch.corpus import CORPUS_MODULES, EOT, VAL_EVERY, corpus_digest, load_documents, split_documents

LAUNCH = Path(__file__).resolve().parent
REPO = LAUNCH.parent
EOD = EOT  # the end-of-document token, the same as the on-the-fly tokenizer's
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")


# ---------------------------------------------------------------------------------------------------
# Reading documents
# ---------------------------------------------------------------------------------------------------
def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, "r", encoding="utf-8", errors="replace")


def is_jsonl(path: Path) -> bool:
    return path.name.endswith(JSONL_SUFFIXES)


def expand_inputs(inputs: Sequence[str]) -> List[Path]:
    """Files as given, plus the text/JSONL files found (recursively, sorted) under given directories."""
    files: List[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES)
            )
            if not found:
                raise SystemExit(f"no {'/'.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} files under {path}")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise SystemExit(f"input not found: {path}")
    return files


def iter_documents(files: Sequence[Path], json_key: str = "text", txt_mode: str = "file") -> Iterator[str]:
    """Documents, in file order. JSONL: one JSON object per line, the document is obj[json_key]. Text:
    txt_mode "file" (the whole file is one document), "line" (each non-blank line) or "paragraph"
    (blocks separated by blank lines)."""
    for path in files:
        with _open_text(path) as f:
            if is_jsonl(path):
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise SystemExit(f"{path}:{lineno}: not JSON ({e.msg})") from None
                    if not isinstance(obj, dict) or json_key not in obj:
                        raise SystemExit(f"{path}:{lineno}: no field {json_key!r} (use --json-key)")
                    yield str(obj[json_key])
            elif txt_mode == "file":
                yield f.read()
            elif txt_mode == "line":
                yield from (line.rstrip("\n") for line in f if line.strip())
            elif txt_mode == "paragraph":
                block: List[str] = []
                for line in f:
                    if line.strip():
                        block.append(line)
                    elif block:
                        yield "".join(block)
                        block = []
                if block:
                    yield "".join(block)
            else:
                raise ValueError(f"txt_mode {txt_mode!r}")


# ---------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------
def train_bpe(docs: Iterable[str], vocab_size: int, min_frequency: int = 0, show_progress: bool = False):
    """Byte-level BPE with EOD as its one special token: the settings of launch/pretrain.py's
    build_tokenizer, so the same documents and vocabulary size give the same tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOD],
        show_progress=show_progress,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def load_tokenizer(path: str | Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def eod_id(tok, eod_token: Optional[str] = None) -> int:
    """Id of the end-of-document token: the one named, else the first of the usual names present."""
    names = [eod_token] if eod_token else [EOD, "</s>", "<eos>", "<|end_of_text|>", "[SEP]"]
    for name in names:
        idx = tok.token_to_id(name)
        if idx is not None:
            return idx
    raise SystemExit(
        f"the tokenizer has none of {names} as a token: name its end-of-document token with --eod-token"
    )


class MegatronTokenizerAdapter:
    """A tokenizer.json seen the way megatron-core's dataset code needs it: `vocab_size`, `eod` (used by
    GPTDataset for masks and by GPTDatasetConfig for the token dtype), `unique_identifiers` (hashed
    into the dataset cache key). No `pad`: GPTDataset then pads with -1 and masks those labels."""

    def __init__(self, path: str | Path, eod_token: Optional[str] = None):
        self.path = str(Path(path).resolve())
        self.tokenizer = load_tokenizer(path)
        self._eod = eod_id(self.tokenizer, eod_token)
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
        self.unique_identifiers = {
            "class": type(self).__name__,
            "sha256": digest,
            "vocab_size": self.vocab_size,
            "eod": self._eod,
        }

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def eos(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> List[int]:
        return self.tokenizer.encode(text).ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))


def token_dtype(vocab_size: int):
    """Megatron's choice (DType.optimal_dtype): uint16 below 65,500 entries, else int32."""
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


# ---------------------------------------------------------------------------------------------------
# Encoding (optionally in a process pool) and writing
# ---------------------------------------------------------------------------------------------------
_WORKER_TOKENIZER = None


def _init_worker(tokenizer_json: str) -> None:
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # N processes already; no Rayon threads on top
    from tokenizers import Tokenizer

    _WORKER_TOKENIZER = Tokenizer.from_str(tokenizer_json)


def _encode_chunk(texts: List[str]):
    import numpy as np

    return [np.asarray(e.ids, dtype=np.int32) for e in _WORKER_TOKENIZER.encode_batch(texts)]


def _chunks(docs: Iterable[str], size: int) -> Iterator[List[str]]:
    chunk: List[str] = []
    for doc in docs:
        chunk.append(doc)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class _SimpleProgress:
    """A tqdm stand-in: a one-line counter on stderr, redrawn at most twice a second."""

    def __init__(self, total: Optional[int] = None, desc: str = "", unit: str = "it", disable: bool = False):
        self.n, self.total, self.desc, self.unit, self.disable = 0, total, desc, unit, disable
        self.t0 = self.t_draw = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if not self.disable and now - self.t_draw >= 0.5:
            self.t_draw = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        rate = self.n / max(now - self.t0, 1e-9)
        of = f"/{self.total}" if self.total else ""
        sys.stderr.write(f"\r{self.desc}: {self.n}{of} {self.unit} ({rate:.0f} {self.unit}/s)")
        sys.stderr.flush()

    def close(self) -> None:
        if not self.disable:
            self._draw(time.perf_counter())
            sys.stderr.write("\n")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(total: Optional[int], desc: str, unit: str = "doc", disable: bool = False):
    try:
        from tqdm import tqdm
    except ImportError:
        return _SimpleProgress(total=total, desc=desc, unit=unit, disable=disable)
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True)


@dataclass
class Stats:
    prefix: str
    documents: int = 0
    tokens: int = 0  # including one EOD per document
    skipped_empty: int = 0
    characters: int = 0
    seconds: float = 0.0
    dtype: str = ""

    def line(self) -> str:
        return (
            f"{self.prefix}: {self.documents} documents, {self.tokens} tokens ({self.dtype}), "
            f"{self.characters / 1e6:.2f} M characters, {self.skipped_empty} empty documents skipped, "
            f"{self.seconds:.1f} s ({self.tokens / max(self.seconds, 1e-9):.0f} tokens/s)"
        )


def write_indexed_dataset(
    docs: Iterable[str],
    tok,
    prefix: str | Path,
    workers: int = 1,
    chunk_docs: int = 256,
    eod_token: Optional[str] = None,
    total: Optional[int] = None,
    progress: bool = True,
    desc: Optional[str] = None,
) -> Stats:
    """Encode `docs` with `tok` (a tokenizers.Tokenizer) and write <prefix>.bin/.idx with megatron's
    IndexedDatasetBuilder: one sequence per document = its ids + [EOD]. Documents that are empty (or
    whitespace only) are skipped. workers > 1 encodes in a process pool (order preserved)."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

    prefix = str(prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    eod = eod_id(tok, eod_token)
    dtype = token_dtype(tok.get_vocab_size())
    stats = Stats(prefix=prefix, dtype=np.dtype(dtype).name)
    t0 = time.perf_counter()

    def kept(stream: Iterable[str]) -> Iterator[str]:
        for doc in stream:
            if doc.strip():
                stats.characters += len(doc)
                yield doc
            else:
                stats.skipped_empty += 1

    builder = IndexedDatasetBuilder(get_bin_path(prefix), dtype=dtype)
    pool = None
    try:
        chunks = _chunks(kept(docs), chunk_docs)
        if workers > 1:
            import multiprocessing as mp

            # spawn: a forked copy of a process that has run the Rust tokenizer's thread pool (or torch's)
            # can deadlock; spawned workers import only this module, numpy and tokenizers.
            pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(tok.to_str(),))
            encoded = pool.imap(_encode_chunk, chunks)
        else:
            encoded = ([np.asarray(e.ids, dtype=np.int32) for e in tok.encode_batch(c)] for c in chunks)
        with progress_bar(total, desc or Path(prefix).name, disable=not progress) as bar:
            for ids_list in encoded:
                for ids in ids_list:
                    doc = np.append(ids, eod)
                    builder.add_document(doc, [doc.size])
                    stats.documents += 1
                    stats.tokens += int(doc.size)
                bar.update(len(ids_list))
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    builder.finalize(get_idx_path(prefix))
    stats.seconds = time.perf_counter() - t0
    return stats


# ---------------------------------------------------------------------------------------------------
# The embedded corpus of launch/pretrain.py
# ---------------------------------------------------------------------------------------------------
def embedded_corpus():
    """(train_docs, val_docs, info) of the embedded corpus (launch/corpus.py), with its fixed split."""
    docs = load_documents()
    train, val = split_documents(docs)
    info = {
        "modules": list(CORPUS_MODULES),
        "val_every": VAL_EVERY,
        "sha256": corpus_digest(docs),
        "python": sys.version.split()[0],
    }
    return train, val, info


def build_embedded(
    out_dir: str | Path,
    vocab_size: int = 1024,
    tokenizer: Optional[str] = None,
    workers: int = 1,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Write <out_dir>/{tokenizer.json, train.bin/.idx, valid.bin/.idx, manifest.json} for the embedded
    corpus. The BPE is trained on the training split only (as pretrain.py does), unless given."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, val, info = embedded_corpus()
    log(
        f"embedded corpus: {len(info['modules'])} stdlib modules (Python {info['python']}), "
        f"sha256 {info['sha256']}; "
        f"{len(train)}/{len(val)} train/valid documents (every {info['val_every']}th to validation)"
    )
    if tokenizer:
        tok = load_tokenizer(tokenizer)
    else:
        tok = train_bpe(train, vocab_size)
    tok.save(str(out / "tokenizer.json"))
    manifest = {
        "corpus": info,
        "tokenizer": "tokenizer.json",
        "vocab_size": tok.get_vocab_size(),
        "eod": eod_id(tok),
        "splits": {},
    }
    for name, docs in (("train", train), ("valid", val)):
        stats = write_indexed_dataset(
            docs, tok, out / name, workers=workers, total=len(docs), progress=progress, desc=name
        )
        log(stats.line())
        manifest["splits"][name] = {
            "prefix": name,
            "documents": stats.documents,
            "tokens": stats.tokens,
            "dtype": stats.dtype,
        }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"wrote {out}/{{tokenizer.json,train.bin,train.idx,valid.bin,valid.idx,manifest.json}}")
    return manifest


# ---------------------------------------------------------------------------------------------------
# Megatron's GPTDataset on top of the files (for launch/pretrain.py and the tests)
# ---------------------------------------------------------------------------------------------------
def gpt_dataset(
    prefix: str | Path,
    tokenizer: MegatronTokenizerAdapter,
    seq_length: int,
    num_samples: Optional[int] = None,
    seed: int = 1234,
    split: str = "train",
    cache_dir: Optional[str | Path] = None,
):
    """megatron-core's GPTDataset over a whole <prefix>.bin/.idx, built through
    BlendedMegatronDatasetBuilder as Megatron-LM does. Samples are dicts of `tokens`, `labels` (both
    seq_length long: windows of seq_length + 1 tokens), `loss_mask` and `position_ids`. num_samples None
    = one epoch; more than an epoch repeats the data with a fresh shuffle. Under torch.distributed,
    global rank 0 builds the index cache first and the others then read it (all ranks must call)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.utils import Split

    prefix = str(prefix)
    index = {"train": Split.train, "valid": Split.valid, "test": Split.test}[split].value
    blend_per_split = [None, None, None]
    blend_per_split[index] = ([prefix], None)
    sizes = [None, None, None]
    sizes[index] = num_samples
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend_per_split=blend_per_split,
        path_to_cache=str(cache_dir or Path(prefix).parent / "cache"),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )  # causal masks are built inside the attention kernels
    datasets = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    return datasets[index]


# ---------------------------------------------------------------------------------------------------
EMBEDDED_DIR = REPO / "data" / "embedded"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = cli.parser(prog="python -m launch.prepare_data", description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--input",
        nargs="+",
        help="text / JSONL files (optionally .gz) or directories of them (no default: give --input "
        "or --embedded)",
    )
    src.add_argument(
        "--embedded", action="store_true", help="the embedded stdlib corpus of launch/pretrain.py"
    )
    p.add_argument(
        "--output-prefix",
        help="write <prefix>.bin and <prefix>.idx (with --input, required there; no default)",
    )
    p.add_argument(
        "--output-dir",
        help="with --embedded: write its tokenizer.json, train and valid splits there (default: "
        f"{EMBEDDED_DIR.relative_to(REPO)}/ of this checkout)",
    )
    p.add_argument("--tokenizer", help="an existing tokenizer.json; default: train a byte-level BPE")
    p.add_argument(
        "--tokenizer-out",
        help="with --input: where to save the trained BPE (default <prefix>.tokenizer.json)",
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="BPE vocabulary size (default 32000 with --input, 1024 with --embedded)",
    )
    p.add_argument("--min-frequency", type=int, default=0, help="BPE: minimum pair frequency to merge")
    p.add_argument(
        "--eod-token", default=None, help=f"end-of-document token (default {EOD!r} or the usual names)"
    )
    p.add_argument("--json-key", default="text", help="JSONL field that holds the document")
    p.add_argument(
        "--txt-mode",
        default="file",
        choices=["file", "line", "paragraph"],
        help="what one document is in a text file",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=max(1, (os.cpu_count() or 2) - 1),
        help="encoding processes (default: the CPU cores but one, here %(default)s)",
    )
    p.add_argument("--chunk-docs", type=int, default=256, help="documents per task sent to a worker")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    # Each output flag belongs to one source; a flag the source would ignore is refused, not ignored.
    if args.input and args.output_dir:
        raise ConfigError(
            f"--output-dir is for --embedded; with --input give --output-prefix "
            f"{args.output_dir.rstrip('/')}/train (and the same for valid)"
        )
    if args.input and not args.output_prefix:
        raise ConfigError("--input needs --output-prefix PREFIX (writes PREFIX.bin and PREFIX.idx)")
    if args.embedded:
        for flag, value in (("--output-prefix", args.output_prefix), ("--tokenizer-out", args.tokenizer_out)):
            if value:
                # "--output-prefix data/x/train" means the directory data/x; "--output-prefix X" means X
                target = Path(value).parent if Path(value).name in ("train", "valid") else Path(value)
                raise ConfigError(
                    f"{flag} is for --input: --embedded writes a directory (tokenizer.json, "
                    f"train and valid .bin/.idx); use --output-dir {target} instead"
                )
        args.output_dir = args.output_dir or str(EMBEDDED_DIR)
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    if args.embedded:
        return build_embedded(
            args.output_dir,
            vocab_size=args.vocab_size or 1024,
            tokenizer=args.tokenizer,
            workers=args.workers,
            progress=not args.no_progress,
        )
    files = expand_inputs(args.input)
    print(f"{len(files)} input files, {sum(f.stat().st_size for f in files) / 1e6:.2f} MB", flush=True)
    documents = lambda: iter_documents(files, args.json_key, args.txt_mode)  # noqa: E731
    if args.tokenizer:
        tok = load_tokenizer(args.tokenizer)
        tok_path = args.tokenizer
    else:
        t0 = time.perf_counter()
        tok = train_bpe(
            documents(), args.vocab_size or 32000, args.min_frequency, show_progress=not args.no_progress
        )
        tok_path = args.tokenizer_out or f"{args.output_prefix}.tokenizer.json"
        Path(tok_path).parent.mkdir(parents=True, exist_ok=True)
        tok.save(tok_path)
        print(
            f"trained a byte-level BPE of {tok.get_vocab_size()} tokens in {time.perf_counter() - t0:.1f} s: "
            f"{tok_path}",
            flush=True,
        )
    stats = write_indexed_dataset(
        documents(),
        tok,
        args.output_prefix,
        workers=args.workers,
        chunk_docs=args.chunk_docs,
        eod_token=args.eod_token,
        progress=not args.no_progress,
    )
    print(stats.line(), flush=True)
    return {"tokenizer": str(tok_path), **asdict(stats)}


if __name__ == "__main__":
    main()
