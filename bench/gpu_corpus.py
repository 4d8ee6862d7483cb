"""A pretraining corpus built offline from text already on the machine: the source and documentation
files of the running Python's installation (standard library and site-packages: PyTorch, JAX,
transformers, SciPy, ... on the GPU image; about 1 GB of text there, 150+ MB in this project's venv).

    python bench/gpu_corpus.py --out data/gpu_corpus --min-tokens 100000000

Files (*.py, *.pyi, *.md, *.rst, *.txt, *.c, *.h, *.cc, *.cpp, *.cu, *.cuh, each ≤ 1 MB, UTF-8) are read
in sorted path order, exact duplicates dropped, every 20th document goes to validation. A byte-level BPE
(`tokenizers`, vocabulary 32000 as LLaMA's) is trained on the first `--bpe-sample-mb` of the training
text; both splits are encoded to uint16 token files. No network: nothing is downloaded. `meta.json`
records the roots, file and token counts and a digest of the document list, so two machines can tell
whether they built the same corpus.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import sysconfig
import time
from pathlib import Path
from typing import Dict, Iterator, List, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: launch/
from launch.corpus import EOT, VAL_EVERY, split_documents  # noqa: E402

EXTENSIONS = {".py", ".pyi", ".md", ".rst", ".txt", ".c", ".h", ".cc", ".cpp", ".cu", ".cuh"}
MAX_FILE_BYTES = 1 << 20


def default_roots() -> List[Path]:
    paths = sysconfig.get_paths()
    roots = {Path(paths["stdlib"]), Path(paths["purelib"]), Path(paths["platlib"])}
    roots |= {Path(p) for p in sys.path if p.endswith("site-packages")}
    return sorted(r for r in roots if r.is_dir())


def documents(roots: Sequence[Path], max_bytes: int) -> Iterator[str]:
    """Text files under `roots` in sorted order, exact duplicates dropped, until `max_bytes` are read."""
    seen, total = set(), 0
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.suffix not in EXTENSIONS or not path.is_file():
                continue
            try:
                if path.stat().st_size > MAX_FILE_BYTES:
                    continue
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            digest = hashlib.sha1(text.encode()).digest()
            if not text.strip() or digest in seen:
                continue
            seen.add(digest)
            total += len(text)
            yield text
            if total >= max_bytes:
                return


def train_tokenizer(texts: Sequence[str], vocab: int):
    """The launcher's byte-level BPE (launch/prepare_data.py), so a GPU corpus tokenizes like the others."""
    from launch.prepare_data import train_bpe

    return train_bpe(texts, vocab)


def encode(tok, texts: Sequence[str], batch: int = 2048) -> np.ndarray:
    eot = tok.token_to_id(EOT)
    parts = []
    for i in range(0, len(texts), batch):
        for enc in tok.encode_batch(list(texts[i : i + batch])):
            parts.append(np.asarray(enc.ids + [eot], dtype=np.uint16))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def build_corpus(
    out: Path,
    min_tokens: int,
    roots: Sequence[Path] = (),
    vocab: int = 32000,
    bytes_per_token: float = 4.0,
    bpe_sample_mb: float = 64.0,
    log=print,
) -> Dict:
    """Write out/{train.bin, valid.bin, tokenizer.json, meta.json}; returns meta. Reuses a finished
    corpus of at least `min_tokens` tokens with the same vocabulary."""
    meta_path = out / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta["train_tokens"] >= min_tokens and meta["vocab_asked"] == vocab:
            return meta
    if vocab > 65536:
        raise ValueError(f"vocab {vocab}: token files are uint16, so the vocabulary must be <= 65536")
    start = time.perf_counter()
    roots = list(roots) or default_roots()
    # Read a little more than the token budget asks for (the validation split and the BPE's rate).
    docs = list(documents(roots, int(min_tokens * bytes_per_token * 1.15)))
    if len(docs) < VAL_EVERY:
        raise ValueError(
            f"{len(docs)} documents under {[str(r) for r in roots]}: a corpus needs at least {VAL_EVERY} "
            "(one goes to validation); pass --roots with more text"
        )
    train_docs, val_docs = split_documents(docs)
    sample, size = [], 0
    for d in train_docs:
        if size >= bpe_sample_mb * 1e6:
            break
        sample.append(d)
        size += len(d)
    tok = train_tokenizer(sample, vocab)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    train, valid = encode(tok, train_docs), encode(tok, val_docs)
    train.tofile(out / "train.bin")
    valid.tofile(out / "valid.bin")
    meta = {
        "roots": [str(r) for r in roots],
        "documents": len(docs),
        "train_documents": len(train_docs),
        "bytes": sum(map(len, docs)),
        "train_tokens": int(train.size),
        "valid_tokens": int(valid.size),
        "vocab": tok.get_vocab_size(),
        "vocab_asked": vocab,
        "dtype": "uint16",
        "digest": hashlib.sha256("\0".join(docs).encode()).hexdigest()[:16],
        "seconds": round(time.perf_counter() - start, 1),
    }
    meta_path.write_text(json.dumps(meta, indent=1))
    log(
        f"corpus: {meta['documents']} documents, {meta['bytes'] / 1e6:.0f} MB from {len(roots)} roots, "
        f"{meta['train_tokens'] / 1e6:.1f}M train / {meta['valid_tokens'] / 1e6:.2f}M validation "
        f"tokens, vocab {meta['vocab']} ({meta['seconds']:.0f} s)"
    )
    if meta["train_tokens"] < min_tokens:
        log(
            f"corpus: only {meta['train_tokens']} tokens of the {min_tokens} asked for: this machine "
            "has no more text under the roots; pass more --roots"
        )
    return meta


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "data" / "gpu_corpus"))
    p.add_argument("--min-tokens", type=int, default=100_000_000)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument(
        "--roots", nargs="*", default=[], help="folders to read (default: the Python installation)"
    )
    args = p.parse_args()
    build_corpus(Path(args.out), args.min_tokens, [Path(r) for r in args.roots], args.vocab)


if __name__ == "__main__":
    main()
