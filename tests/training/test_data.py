"""muse_lm.training.data: corpus loading, content-only split, token cache, packed batches."""

import hashlib
import inspect
import json

import numpy as np
import pytest
import tokenizers
import torch

from muse_lm.errors import DataError
from muse_lm.training import data
from muse_lm.training.data import (
    Corpus,
    PackedBatches,
    heldout_batches,
    load_corpus,
    split_documents,
    tokenize_corpus,
)
from muse_lm.training.tokenizer import train_tokenizer

DOCS = [f"def f{i}(x):\n    return x * {i}  # doc {i}\n" for i in range(60)]


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("MUSE_CACHE_DIR", str(tmp_path / "cache"))


def _write_docs(folder, docs, names):
    folder.mkdir(parents=True)
    for name, doc in zip(names, docs):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(doc, encoding="utf-8")


def _all_docs(corpus: Corpus) -> list[str]:
    return sorted(corpus.train_docs + corpus.heldout_docs)


def test_directory_file_glob_and_jsonl(tmp_path):
    _write_docs(tmp_path / "d", DOCS[:4], ["a.py", "e.py", "sub/b.txt", "c.md"])
    (tmp_path / "d" / "skip.xyz").write_text("unknown extension")
    (tmp_path / "d" / ".hidden").mkdir()
    (tmp_path / "d" / ".hidden" / "h.py").write_text("hidden")
    assert _all_docs(load_corpus(str(tmp_path / "d"))) == sorted(DOCS[:4])
    assert _all_docs(load_corpus(str(tmp_path / "d" / "*.py"))) == sorted(DOCS[:2])
    # One document: the corpus is cut inside it (train + held-out == the text).
    single = load_corpus(str(tmp_path / "d" / "**" / "*.txt"))
    assert single.train_docs[0] + single.heldout_docs[0] == DOCS[2]
    single = load_corpus(str(tmp_path / "d" / "skip.xyz"))  # a named file is read whatever its suffix
    assert single.train_docs[0] + single.heldout_docs[0] == "unknown extension"
    lines = [json.dumps({"text": doc, "id": i}, ensure_ascii=False) for i, doc in enumerate(DOCS[:4])]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    corpus = load_corpus(str(tmp_path / "c.jsonl"))
    assert _all_docs(corpus) == sorted(DOCS[:4])
    assert corpus.num_docs == 4 and corpus.num_chars == sum(map(len, DOCS[:4]))


def test_dedup_and_blank_documents(tmp_path):
    docs = [DOCS[0], DOCS[0], DOCS[1], "  \n\t", ""]
    _write_docs(tmp_path / "d", docs, ["a.py", "b.py", "c.py", "d.py", "e.py"])
    assert _all_docs(load_corpus(str(tmp_path / "d"))) == sorted(DOCS[:2])


def test_split_depends_only_on_content(tmp_path):
    rng = np.random.default_rng(0)
    order = rng.permutation(len(DOCS))
    _write_docs(tmp_path / "one", DOCS, [f"{i}.py" for i in range(len(DOCS))])
    _write_docs(tmp_path / "two", [DOCS[i] for i in order], [f"x/{i:03d}.txt" for i in range(len(DOCS))])
    a, b = load_corpus(str(tmp_path / "one")), load_corpus(str(tmp_path / "two"))
    assert (a.train_docs, a.heldout_docs, a.fingerprint) == (b.train_docs, b.heldout_docs, b.fingerprint)
    c = load_corpus(str(tmp_path / "one"), heldout_fraction=0.3)
    assert c.fingerprint != a.fingerprint
    for doc in c.heldout_docs:  # the documented rule, applied to each document's hash
        assert int(hashlib.sha256(doc.encode()).hexdigest()[:8], 16) / 2**32 < 0.3
    assert 5 < len(c.heldout_docs) < 35


def test_tiny_corpora_keep_both_splits_non_empty():
    train, held, _ = split_documents(DOCS[:2], 0.02)
    assert len(train) == 1 and len(held) == 1
    train, held, _ = split_documents(DOCS[:3], 0.999)
    assert len(train) == 1 and len(held) == 2
    text = "".join(f"line {i}\n" for i in range(100))
    train, held, _ = split_documents([text], 0.02)
    assert train[0] + held[0] == text and held[0] == "line 98\nline 99\n"
    train, held, _ = split_documents(["abcdefghij"], 0.2)  # one line: cut mid-line
    assert (train, held) == (["abcdefgh"], ["ij"])
    with pytest.raises(DataError, match="too little text"):
        split_documents(["x"], 0.02)
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_documents(DOCS, 0.0)


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no such file or directory; pass a text file"):
        load_corpus(str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="matched no files"):
        load_corpus(str(tmp_path / "*.nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="found no non-empty UTF-8 text"):
        load_corpus(str(tmp_path / "empty"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: line has no string field \"text\""):
        load_corpus(str(tmp_path / "bad.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"broken\.jsonl:2: not valid JSON"):
        load_corpus(str(tmp_path / "broken.jsonl"))
    (tmp_path / "blob.bin").write_bytes(b"\x89PNG\x00\x01\xff")
    with pytest.raises(DataError, match="not a UTF-8 text file"):
        load_corpus(str(tmp_path / "blob.bin"))


def test_binary_files_in_a_directory_are_skipped_and_counted(tmp_path):
    _write_docs(tmp_path / "d", DOCS[:2], ["a.py", "b.py"])
    (tmp_path / "d" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "d" / "nul.py").write_bytes(b"abc\x00def")
    corpus = load_corpus(str(tmp_path / "d"))
    assert corpus.skipped == 2 and corpus.num_docs == 2
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(DataError, match="1 file.s. skipped as binary"):
        load_corpus(str(tmp_path / "b"))


def test_stdlib_corpus_is_deterministic_and_deduplicated():
    first, second = load_corpus(), load_corpus("python-stdlib")
    assert first.name == "python-stdlib" and first.fingerprint == second.fingerprint
    assert first.train_docs == second.train_docs and first.heldout_docs == second.heldout_docs
    hashes = [hashlib.sha256(d.encode()).hexdigest() for d in first.train_docs + first.heldout_docs]
    assert len(set(hashes)) == first.num_docs > 1000
    assert hashes[:len(first.train_docs)] == sorted(hashes[:len(first.train_docs)])
    assert 0.005 < len(first.heldout_docs) / first.num_docs < 0.05
    # site-packages is left out of the stdlib corpus and added by "python-sources".
    installed = inspect.getsource(tokenizers)
    assert installed not in first.train_docs + first.heldout_docs
    sources = load_corpus("python-sources")
    assert installed in sources.train_docs + sources.heldout_docs
    assert sources.num_docs > first.num_docs


@pytest.fixture(scope="module")
def small_tokenizer():
    return train_tokenizer(DOCS * 2, 300)


def test_tokenize_corpus_streams_and_cache(tmp_path, small_tokenizer, monkeypatch):
    corpus = Corpus(name="t", train_docs=DOCS[:5], heldout_docs=["x <|endoftext|> y"], fingerprint="f" * 64)
    first = tokenize_corpus(corpus, small_tokenizer)
    assert first.train.dtype == np.uint16 and first.train.ndim == 1
    assert int((first.train == 0).sum()) == 5 and first.train[-1] == 0  # one EOS after each doc
    assert int((first.heldout == 0).sum()) == 1  # the literal text is not an EOS
    assert small_tokenizer.decode(first.heldout[:-1].tolist()) == "x <|endoftext|> y"
    assert small_tokenizer.encode_special_tokens is False  # restored
    cached = sorted((tmp_path / "cache" / "tokens").iterdir())
    assert len(cached) == 2 and all(p.suffix == ".npy" for p in cached)

    def fail(*args):
        raise AssertionError("cache miss: _encode was called")

    monkeypatch.setattr(data, "_encode", fail)
    second = tokenize_corpus(corpus, small_tokenizer)
    np.testing.assert_array_equal(first.train, second.train)
    np.testing.assert_array_equal(first.heldout, second.heldout)
    assert second.train.dtype == np.uint16


def _stream(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.uint16)


def test_packed_batches_shapes_and_determinism():
    tokens = _stream(1001)
    a = PackedBatches(tokens, seq_len=10, batch_size=4, seed=3)
    b = PackedBatches(tokens, seq_len=10, batch_size=4, seed=3)
    assert a.num_windows == 100
    for index in (0, 1, 24, 25, 99, 1000):
        x, y = a.batch(index)
        assert x.shape == y.shape == (4, 10) and x.dtype == torch.int64
        assert torch.equal(y[:, :-1], x[:, 1:]) and torch.all(x[:, 0] % 10 == 0)
        assert torch.equal(x, b.batch(index)[0])
    assert not torch.equal(a.batch(0)[0], PackedBatches(tokens, seq_len=10, batch_size=4, seed=4).batch(0)[0])


def test_packed_batches_epochs_cover_every_window_once():
    batches = PackedBatches(_stream(101), seq_len=10, batch_size=5, seed=0)
    assert batches.num_windows == 10 and [batches.epoch_of(i) for i in range(5)] == [0, 0, 1, 1, 2]
    epochs = [torch.cat([batches.batch(2 * e)[0], batches.batch(2 * e + 1)[0]])[:, 0] // 10 for e in range(3)]
    for starts in epochs:
        assert sorted(starts.tolist()) == list(range(10))
    assert epochs[0].tolist() != epochs[1].tolist()  # a fresh permutation per epoch
    wrap = PackedBatches(_stream(71), seq_len=10, batch_size=4, seed=0)  # 7 windows: batch 1 spans epochs
    rows = torch.cat([wrap.batch(0)[0], wrap.batch(1)[0]])[:, 0] // 10
    assert sorted(rows[:7].tolist()) == list(range(7))


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_shards_union_is_the_single_process_batch(world_size):
    tokens = _stream(501)
    full = PackedBatches(tokens, seq_len=8, batch_size=8, seed=1)
    shards = [PackedBatches(tokens, seq_len=8, batch_size=8, seed=1, rank=r, world_size=world_size)
              for r in range(world_size)]
    for index in (0, 7, 8, 31):
        parts = [s.batch(index) for s in shards]
        assert all(p[0].shape == (8 // world_size, 8) for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), full.batch(index)[0])
        assert torch.equal(torch.cat([p[1] for p in parts]), full.batch(index)[1])


def test_packed_batches_errors():
    with pytest.raises(DataError, match="has 10 tokens.*smaller --seq-len"):
        PackedBatches(_stream(10), seq_len=16, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="not divisible by world_size=4"):
        PackedBatches(_stream(100), seq_len=4, batch_size=6, seed=0, world_size=4)
    with pytest.raises(ValueError, match="index"):
        PackedBatches(_stream(100), seq_len=4, batch_size=2, seed=0).batch(-1)


def test_heldout_batches():
    tokens = _stream(1001)
    first = heldout_batches(tokens, seq_len=10, batch_size=4, max_batches=3)
    second = heldout_batches(tokens, seq_len=10, batch_size=4, max_batches=3)
    assert len(first) == 3 and all(x.shape == (4, 10) for x, _ in first)
    starts = torch.cat([x[:, 0] for x, _ in first]).tolist()
    assert starts == [i * 100 // 12 * 10 for i in range(12)]  # evenly spread over 100 windows
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    few = heldout_batches(_stream(31), seq_len=10, batch_size=4, max_batches=8)
    assert [x.shape for x, _ in few] == [(3, 10)]
    short = heldout_batches(_stream(5), seq_len=10, batch_size=4, max_batches=2)
    assert len(short) == 1
    assert short[0][0].tolist() == [[0, 1, 2, 3]] and short[0][1].tolist() == [[1, 2, 3, 4]]
    with pytest.raises(DataError, match="1 token"):
        heldout_batches(_stream(1), seq_len=10, batch_size=4, max_batches=2)
