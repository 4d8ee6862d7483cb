"""launch/prepare_data.py: documents -> Megatron indexed dataset (.bin/.idx) -> megatron-core readers.

The files are read back with megatron-core's IndexedDataset (exact tokens: the tokenizer's encoding plus
EOD, per document) and served by its GPTDataset (windows of seq_length + 1 tokens), on CPU."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]

from launch import prepare_data as pdata  # noqa: E402

DOCS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Ünïcödé text — with “quotes”, emoji 🚀 and CJK 漢字.",
    "   ",  # blank: skipped
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n        "
    "self.items.append(x)\n",
    "A short one.",
    "\n".join(f"line {i}: value = {i * i}" for i in range(20)),
    "Tensor-parallel, pipeline-parallel and data-parallel training of a GPT.",
    "x",
    "for i in range(10):\n    print(i ** 2)\n" * 2,
]
NONEMPTY = [d for d in DOCS if d.strip()]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    tok = pdata.train_bpe(DOCS * 4, vocab_size=320)
    tok.save(str(out / "tokenizer.json"))
    stats = pdata.write_indexed_dataset(DOCS, tok, out / "corpus", workers=1, progress=False)
    return out, tok, stats


def expected(tok, docs):
    eod = tok.token_to_id(pdata.EOD)
    return [tok.encode(d).ids + [eod] for d in docs if d.strip()]


def test_indexed_dataset_roundtrip(built):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    out, tok, stats = built
    want = expected(tok, DOCS)
    ds = IndexedDataset(str(out / "corpus"))
    assert len(ds) == len(want) == stats.documents == len(NONEMPTY)
    assert stats.skipped_empty == 1 and stats.tokens == sum(map(len, want))
    assert ds.index.dtype == np.uint16  # vocab 320 < 65,500: Megatron's optimal dtype
    for i, ids in enumerate(want):
        assert ds[i].tolist() == ids
        assert tok.decode(ids[:-1]) == NONEMPTY[i]  # byte-level BPE is lossless
    assert ds.document_indices.tolist() == list(range(len(want) + 1))  # one sequence per document


def test_cli_files_jsonl_and_worker_pool(built, tmp_path):
    """--input with a directory of .txt / .jsonl / .jsonl.gz, a trained BPE and 2 encoding processes;
    then --tokenizer with the result and --txt-mode line."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text(DOCS[0])
    (src / "b.jsonl").write_text(
        "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS[1:6]))
    )
    with gzip.open(src / "c.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in DOCS[6:])
    result = pdata.main(
        [
            "--input",
            str(src),
            "--output-prefix",
            str(tmp_path / "out" / "ds"),
            "--vocab-size",
            "300",
            "--workers",
            "2",
            "--chunk-docs",
            "2",
            "--no-progress",
        ]
    )
    tok = pdata.load_tokenizer(result["tokenizer"])
    assert tok.get_vocab_size() == 300
    ds = IndexedDataset(str(tmp_path / "out" / "ds"))
    assert [ds[i].tolist() for i in range(len(ds))] == expected(tok, DOCS)  # file order, then line order

    (src / "lines.txt").write_text("first line\n\nsecond line\nthird\n")
    given = built[1]
    result = pdata.main(
        [
            "--input",
            str(src / "lines.txt"),
            "--output-prefix",
            str(tmp_path / "lines"),
            "--tokenizer",
            str(built[0] / "tokenizer.json"),
            "--txt-mode",
            "line",
            "--workers",
            "1",
            "--no-progress",
        ]
    )
    ds = IndexedDataset(str(tmp_path / "lines"))
    assert result["documents"] == 3
    assert [ds[i].tolist() for i in range(3)] == expected(given, ["first line", "second line", "third"])


def _check_window(window, docs, eod):
    """A GPTDataset sample is a window over documents laid end to end: cut after each EOD, the inner
    pieces are whole documents, the first is the tail of one and the last the head of one."""
    pieces, cur = [], []
    for t in window:
        cur.append(t)
        if t == eod:
            pieces.append(cur)
            cur = []
    pieces.append(cur)
    text = [",".join(map(str, d)) for d in docs]
    joined = lambda p: ",".join(map(str, p))  # noqa: E731
    if len(pieces) == 1:
        assert any(joined(pieces[0]) in t for t in text)
        return
    assert any(t.endswith(joined(pieces[0])) for t in text)
    assert not pieces[-1] or any(t.startswith(joined(pieces[-1])) for t in text)
    for p in pieces[1:-1]:
        assert joined(p) in text


@pytest.mark.parametrize("epochs", [1, 3])
def test_gpt_dataset_serves_windows(built, epochs):
    out, tok, stats = built
    seq = 16
    adapter = pdata.MegatronTokenizerAdapter(out / "tokenizer.json")
    assert adapter.eod == tok.token_to_id(pdata.EOD) and adapter.vocab_size == 320
    per_epoch = (stats.tokens - 1) // seq  # megatron: drop the last partial window, one extra token each
    ds = pdata.gpt_dataset(
        out / "corpus",
        adapter,
        seq,
        num_samples=None if epochs == 1 else epochs * per_epoch,
        seed=7,
        cache_dir=out / f"cache{epochs}",
    )
    assert len(ds) >= epochs * per_epoch
    if epochs == 1:
        assert len(ds) == per_epoch
    docs = expected(tok, DOCS)
    for i in range(len(ds)):
        s = ds[i]
        assert s["tokens"].shape == s["labels"].shape == (seq,)
        assert s["tokens"][1:].tolist() == s["labels"][:-1].tolist()
        assert s["loss_mask"].tolist() == [1.0] * seq and s["position_ids"].tolist() == list(range(seq))
        _check_window(s["tokens"].tolist() + s["labels"][-1:].tolist(), docs, adapter.eod)
    if epochs == 1:  # one epoch: windows laid end to end from the start of the first (shuffled) document
        assert ds.sample_index[0].tolist() == [0, 0] and sorted(ds.document_index.tolist()) == list(
            range(len(docs))
        )
    assert list((out / f"cache{epochs}").glob("*-GPTDataset-train-shuffle_index.npy"))  # index cache written


def test_embedded_mode_uses_pretrain_split(tmp_path, monkeypatch):
    """--embedded takes the corpus and the split from launch/corpus.py, as launch/pretrain.py does (here
    with a stand-in corpus, to keep the test fast) and writes train/valid datasets with the split's
    documents."""
    from launch import corpus

    docs = [f"def f{i}(x):\n    return x * {i}\n" for i in range(45)]
    monkeypatch.setattr(pdata, "load_documents", lambda: docs)
    manifest = pdata.main(
        [
            "--embedded",
            "--output-dir",
            str(tmp_path / "emb"),
            "--vocab-size",
            "300",
            "--workers",
            "1",
            "--no-progress",
        ]
    )
    train, val = corpus.split_documents(docs)
    assert (len(train), len(val)) == (43, 2)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tok = pdata.load_tokenizer(tmp_path / "emb" / "tokenizer.json")
    for name, split in (("train", train), ("valid", val)):
        ds = IndexedDataset(str(tmp_path / "emb" / name))
        assert [ds[i].tolist() for i in range(len(ds))] == expected(tok, split)
        assert manifest["splits"][name]["documents"] == len(split)
    assert json.loads((tmp_path / "emb" / "manifest.json").read_text())["eod"] == tok.token_to_id(pdata.EOD)


# launch/plot.py, the other end of a run's data: metrics.csv -> one PNG of several runs.
def test_plot_reads_columns_from_header(tmp_path, capsys):
    from launch import plot

    a, b = tmp_path / "run_a", tmp_path / "run_b"
    a.mkdir(), b.mkdir()
    (a / "metrics.csv").write_text(
        "step,train_loss,val_loss,lr,tokens_per_s\n0,,7.0,,\n1,6.9,,0.1,100\n2,6.5,,0.1,\n3,6.1,6.2,0.1,100\n"
    )
    # another column order, an extra column, no tokens_per_s: read by name from the header
    (b / "metrics.csv").write_text(
        "lr,val_loss,step,grad_norm,train_loss\n0.1,,1,1.0,6.8\n0.1,6.0,2,0.9,6.4\n"
    )
    cols = plot.read_metrics(a / "metrics.csv")
    assert cols["val_loss"] == [7.0, None, None, 6.2] and cols["train_loss"][0] is None
    out = tmp_path / "curves.png"
    assert plot.main([str(a), str(b / "metrics.csv"), "--out", str(out), "--smooth", "2"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "run_a: train_loss 6.1000 @ step 3, val_loss 6.2000 @ step 3" in printed
    assert "run_b: val_loss 6.0000 @ step 2, train_loss 6.4000 @ step 2" in printed
    assert plot.smooth([1.0, 3.0, 5.0], 2) == [1.0, 2.0, 4.0]
