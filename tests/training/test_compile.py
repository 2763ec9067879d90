"""`TrainConfig.compile`: every block compiled on its own. The plumbing is checked here with the
cheap `aot_eager` backend (Dynamo + AOTAutograd, no code generation): a compiled run trains like the
eager one, and the combination with activation checkpointing is refused with the fix. Inductor on a
GPU is what `benchmarks/profile_step.py --compile on` measures."""

from __future__ import annotations

import pytest

from muse_lm.errors import ConfigError
from muse_lm.training import RunOptions, TrainConfig, compiling, train
from muse_lm.training.metrics import read_metrics


def _losses(corpus, out, overrides) -> list[float]:
    result = train(RunOptions(preset="tiny", data=str(corpus), out=str(out), overrides=overrides, progress=False,
                              steps=6, seed=1))
    return [r["loss"] for r in read_metrics(result.metrics_path) if "loss" in r]


def test_compiled_blocks_train_like_eager(small_corpus, tiny_overrides, tmp_path, monkeypatch):
    monkeypatch.setattr(compiling, "BACKEND", "aot_eager")
    tiny_overrides["activation_checkpointing"] = False
    eager = _losses(small_corpus, tmp_path / "eager", dict(tiny_overrides))
    compiled = _losses(small_corpus, tmp_path / "compiled", {**tiny_overrides, "compile": True})
    assert len(eager) == len(compiled) == 6
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)


def test_compile_blocks_marks_every_block(monkeypatch):
    from muse_lm.models import MuseConfig, MuseLM

    monkeypatch.setattr(compiling, "BACKEND", "aot_eager")
    model = MuseLM(MuseConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=2, max_rank=8, min_rank=2,
                              bk_heads=2, tt_rank=4))
    assert compiling.compile_blocks(model) == 3
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in model.blocks)
    with pytest.raises(ConfigError, match="compile=false"):
        compiling.compile_blocks(model.embed)


def test_compile_with_activation_checkpointing_is_refused():
    with pytest.raises(ConfigError, match="activation_checkpointing=false"):
        TrainConfig(compile=True, activation_checkpointing=True)
