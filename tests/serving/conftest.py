"""Shared fixtures for the serving tests: a tiny random-init checkpoint with its tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import tokenizers
import torch

from muse_lm.models import MuseConfig, MuseLM
from muse_lm.training.checkpoint import save_checkpoint
from muse_lm.training.loading import load_trained
from muse_lm.training.tokenizer import eos_id, train_tokenizer

DOCS = [f"def f{i}(x):\n    return x * {i}  # doc {i}, café\n" for i in range(60)]
TINY = dict(d_model=32, n_layers=2, n_heads=2, max_rank=8, min_rank=2, bk_heads=2, tt_rank=4, chunk_size=16)


@dataclass
class TinyCheckpoint:
    path: Path
    model: MuseLM  # loaded back from `path`, eval mode, CPU
    tokenizer: tokenizers.Tokenizer
    eos: int


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoint:
    """A MuseLM trained for a few seconds on DOCS (so greedy text varies instead of repeating one
    token), saved the way `muse train` saves one: weights, config, tokenizer.json."""
    tokenizer = train_tokenizer(DOCS, 300)
    torch.manual_seed(0)
    model = MuseLM(MuseConfig(vocab_size=tokenizer.get_vocab_size(), **TINY))
    _train(model, tokenizer)
    run = tmp_path_factory.mktemp("serve-run")
    ckpt = save_checkpoint(run, 0, model_state=model.state_dict(), config=model.config_json(),
                           tokenizer_json=tokenizer.to_str(), train_state={})
    trained = load_trained(ckpt)
    return TinyCheckpoint(ckpt, trained.model, trained.tokenizer, eos_id(trained.tokenizer))


def _train(model: MuseLM, tokenizer: tokenizers.Tokenizer, steps: int = 60, seq_len: int = 32) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see one_torch_thread (this runs first: it is session-scoped)
    try:
        _train_steps(model, tokenizer, steps, seq_len)
    finally:
        torch.set_num_threads(threads)


def _train_steps(model: MuseLM, tokenizer: tokenizers.Tokenizer, steps: int, seq_len: int) -> None:
    ids = torch.tensor([i for doc in DOCS for i in [0, *tokenizer.encode(doc).ids]])
    windows = ids[: len(ids) // (seq_len + 1) * (seq_len + 1)].view(-1, seq_len + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        batch = windows[torch.randint(len(windows), (8,), generator=gen)]
        loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model's matmuls are microseconds: with two intra-op threads on a busy two-core
    machine, spinning OpenMP workers made a decode step ~40x slower (62 ms vs 1.4 ms, measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
