"""muse_lm.training.tokenizer: deterministic byte-level BPE, round trips, cache, loading errors."""

import inspect
import json
import random
import re
import textwrap

import pytest
import tokenizers

from muse_lm.errors import DataError
from muse_lm.training.data import Corpus
from muse_lm.training.tokenizer import EOS_TOKEN, eos_id, get_tokenizer, load_tokenizer, train_tokenizer

# A few real stdlib modules: enough distinct byte pairs to fill a 1024-entry vocabulary.
DOCS = [inspect.getsource(m) for m in (json, random, textwrap, inspect)]
SOURCE = 'class Café:\n\tdef f(self):\n\t\treturn "naïve — 漢字 🐍"  # tab-indented\r\n\n        x = 1\n'


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("MUSE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(DOCS, 1024)


def test_training_is_deterministic_and_order_free(tokenizer):
    assert train_tokenizer(DOCS, 1024).to_str() == tokenizer.to_str()
    assert train_tokenizer(list(reversed(DOCS)), 1024).to_str() == tokenizer.to_str()


def test_vocab_size_and_eos(tokenizer):
    assert tokenizer.get_vocab_size() == 1024
    assert eos_id(tokenizer) == 0 and tokenizer.id_to_token(0) == EOS_TOKEN
    spec = json.loads(tokenizer.to_str())
    assert spec["model"]["type"] == "BPE" and spec["model"]["continuing_subword_prefix"] is None
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(DOCS, 200)


@pytest.mark.parametrize("text", [SOURCE, DOCS[2][:500], "  \t \n", "x"])
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text
    assert 0 not in ids


def test_get_tokenizer_caches_by_fingerprint(tmp_path):
    corpus = Corpus(name="t", train_docs=DOCS[:2], heldout_docs=DOCS[2:3], fingerprint="ab" * 32)
    first = get_tokenizer(corpus, 400)
    path = tmp_path / "cache" / "tokenizers" / f"{'ab' * 32}-400.json"
    assert path.is_file() and path.read_text() == first.to_str()
    path.write_text(train_tokenizer(DOCS[3:], 400).to_str())  # a hit must read the file, not retrain
    assert get_tokenizer(corpus, 400).to_str() == path.read_text() != first.to_str()
    assert get_tokenizer(corpus, 400, use_cache=False).to_str() == first.to_str()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_load_tokenizer(tmp_path, tokenizer):
    good = tmp_path / "tok.json"
    good.write_text(tokenizer.to_str())
    assert load_tokenizer(good).to_str() == tokenizer.to_str()
    with pytest.raises(DataError, match="no such file; --tokenizer FILE must be a tokenizer.json"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "text.json").write_text("not json")
    with pytest.raises(DataError, match="not JSON"):
        load_tokenizer(tmp_path / "text.json")
    (tmp_path / "other.json").write_text('{"vocab": []}')
    with pytest.raises(DataError, match="without a \"model\" object"):
        load_tokenizer(tmp_path / "other.json")
    (tmp_path / "bad.json").write_text('{"model": {"type": "Nope"}}')
    with pytest.raises(DataError, match="rejected it"):
        load_tokenizer(tmp_path / "bad.json")


def test_eos_id_requires_the_token():
    plain = tokenizers.Tokenizer(tokenizers.models.BPE())
    with pytest.raises(DataError, match=re.escape("no '<|endoftext|>' token")):
        eos_id(plain)
