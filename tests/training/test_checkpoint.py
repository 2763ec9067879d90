"""muse_lm.training.checkpoint: save/load round trip, atomicity, corruption, latest, pruning."""

import random

import numpy as np
import pytest
import torch

from muse_lm.errors import CheckpointError
from muse_lm.io import list_checkpoints
from muse_lm.training.checkpoint import load_checkpoint, save_checkpoint


def _model_state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    embed = torch.randn(10, 4, generator=gen)
    buffer = torch.arange(12, dtype=torch.float32)
    return {
        "embed.weight": embed,
        "head.weight": embed,  # tied: the same tensor under two names
        "proj.weight": torch.randn(4, 6, generator=gen).t(),  # non-contiguous
        "part_a": buffer[:6],  # two views of one storage
        "part_b": buffer[6:],
        "norm.weight": torch.ones(4, dtype=torch.bfloat16),
        "step": torch.tensor(7),
    }


def _train_state() -> dict:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return {
        "optimizer": opt.state_dict(),
        "torch_rng": torch.Generator().manual_seed(11).get_state(),
        "numpy_rng": np.random.Generator(np.random.PCG64(3)).bit_generator.state,
        "python_rng": random.Random(5).getstate(),
        "step": 7,
    }


def _save(run_dir, step, keep=3, **overrides):
    kwargs = dict(model_state=_model_state(), config={"model": {"d": 4}, "lr": 1e-3},
                  tokenizer_json='{"model": {}}', train_state=_train_state(), keep=keep)
    kwargs.update(overrides)
    return save_checkpoint(run_dir, step, **kwargs)


def test_round_trip(tmp_path):
    path = _save(tmp_path, 7)
    assert path == tmp_path / "step-0000007"
    assert sorted(p.name for p in path.iterdir()) == [
        "checksums.json", "config.json", "model.safetensors", "tokenizer.json", "train_state.pt"]
    for source in (tmp_path, path):  # a run directory or the checkpoint itself
        ckpt = load_checkpoint(source)
        assert ckpt.path == path and ckpt.step == 7
        expected = _model_state()
        assert ckpt.model_state.keys() == expected.keys()
        for name, tensor in expected.items():
            assert ckpt.model_state[name].dtype == tensor.dtype
            assert torch.equal(ckpt.model_state[name], tensor), name
        assert ckpt.config == {"model": {"d": 4}, "lr": 1e-3}
        assert ckpt.tokenizer_json == '{"model": {}}'
        state = ckpt.train_state
        assert state["step"] == 7 and state["python_rng"] == random.Random(5).getstate()
        assert torch.equal(state["torch_rng"], _train_state()["torch_rng"])
        assert state["optimizer"]["state"][0]["step"] == 1
    assert load_checkpoint(path, load_train_state=False).train_state is None


def test_model_state_must_be_tensors(tmp_path):
    with pytest.raises(TypeError, match="str -> Tensor"):
        _save(tmp_path, 1, model_state={"w": [1.0]})
    assert not tmp_path.exists() or not list(tmp_path.iterdir())


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle on purpose")


def test_failed_save_keeps_previous_checkpoint(tmp_path):
    _save(tmp_path, 1)
    with pytest.raises(RuntimeError, match="on purpose"):  # fails after model.safetensors is written
        _save(tmp_path, 2, train_state={"x": _Unpicklable()})
    with pytest.raises(RuntimeError, match="on purpose"):  # re-saving an existing step fails midway
        _save(tmp_path, 1, train_state={"x": _Unpicklable()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-0000001"]
    assert (tmp_path / "latest").read_text().strip() == "step-0000001"
    assert load_checkpoint(tmp_path).train_state["step"] == 7


def test_corrupt_file_is_named(tmp_path):
    path = _save(tmp_path, 3)
    weights = path / "model.safetensors"
    original = weights.read_bytes()
    flipped = bytearray(original)
    flipped[-1] ^= 0xFF  # same size, different bytes
    weights.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt"):
        load_checkpoint(tmp_path)
    weights.write_bytes(original)
    (path / "train_state.pt").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match=r"train_state\.pt is corrupt"):
        load_checkpoint(path)


def test_latest_and_keep_pruning(tmp_path):
    for step in (10, 20, 30, 40):
        _save(tmp_path, step, keep=2)
        assert (tmp_path / "latest").read_text().strip() == f"step-{step:07d}"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000030", "step-0000040"]
    assert load_checkpoint(tmp_path).step == 40


def test_load_rejects_random_directory(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a muse_lm checkpoint or run directory"):
        load_checkpoint(tmp_path)


def test_a_completed_save_removes_debris_of_crashed_saves(tmp_path):
    _save(tmp_path, 1)
    names = (".step-0000002.tmp-ab12cd", ".step-0000001.old-99aa", ".step-0000001.del-x1")
    debris = [tmp_path / n for n in names]
    for d in debris:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    keep = tmp_path / ".not-ours"
    keep.mkdir()
    _save(tmp_path, 2)
    assert not any(d.exists() for d in debris)
    assert keep.exists() and [p.name for p in list_checkpoints(tmp_path)] == ["step-0000001", "step-0000002"]
