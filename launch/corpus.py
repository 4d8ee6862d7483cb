"""The embedded default corpus: the source of a fixed list of standard-library modules (~2 MB), cut
into documents at top-level definitions, with a fixed 95/5 train/validation split. Standard library
only, so launch/prepare_data.py and launch/data.py share it without importing each other."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re

EOT = "<|endoftext|>"

# A fixed, sorted list of standard-library modules: their source is the corpus (~2 MB). Sorting and
# fixing the list keeps the corpus (and thus the tokenizer and the split) deterministic.
CORPUS_MODULES = sorted(
    [
        "argparse",
        "ast",
        "base64",
        "bisect",
        "calendar",
        "collections",
        "configparser",
        "contextlib",
        "copy",
        "csv",
        "dataclasses",
        "datetime",
        "decimal",
        "difflib",
        "enum",
        "fractions",
        "functools",
        "gettext",
        "heapq",
        "inspect",
        "ipaddress",
        "json.decoder",
        "json.encoder",
        "logging",
        "pprint",
        "queue",
        "random",
        "shlex",
        "shutil",
        "statistics",
        "string",
        "tarfile",
        "textwrap",
        "threading",
        "tokenize",
        "typing",
        "uuid",
    ]
)
VAL_EVERY = 20  # every 20th document goes to validation: a fixed 5% split drawn from all modules


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


def corpus_digest(docs: list[str]) -> str:
    """A short fingerprint of the documents (recorded with the run and the prepared dataset)."""
    return hashlib.sha256("\0".join(docs).encode()).hexdigest()[:12]
