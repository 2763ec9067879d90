"""muse_lm.io: atomic directories, checksums, `latest`, checkpoint discovery and pruning."""

import json
from pathlib import Path

import pytest

from muse_lm.errors import CheckpointError
from muse_lm.io import (
    atomic_directory,
    checkpoint_name,
    list_checkpoints,
    prune_checkpoints,
    resolve_checkpoint_dir,
    update_latest,
    verify_checksums,
    write_text_atomic,
)


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _fake_checkpoint(run_dir: Path, step: int) -> Path:
    with atomic_directory(run_dir / checkpoint_name(step)) as tmp:
        (tmp / "config.json").write_text(json.dumps({"step": step}))
        (tmp / "model.safetensors").write_bytes(b"weights %d" % step)
    return run_dir / checkpoint_name(step)


def test_checkpoint_name_pads_and_validates():
    assert checkpoint_name(42) == "step-0000042"
    assert checkpoint_name(12345678) == "step-12345678"
    with pytest.raises(ValueError, match="step"):
        checkpoint_name(-1)


def test_atomic_directory_writes_checksums_and_leaves_no_temp(tmp_path):
    final = tmp_path / "out"
    with atomic_directory(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-")
        (tmp / "a.txt").write_text("alpha")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(b"\x00\x01")
        assert not final.exists()  # nothing is visible before the block ends
    assert _entries(tmp_path) == ["out"]
    listing = json.loads((final / "checksums.json").read_text())["files"]
    assert sorted(listing) == ["a.txt", "sub/b.bin"]
    assert listing["a.txt"]["bytes"] == 5
    verify_checksums(final)


def test_atomic_directory_exception_leaves_nothing_and_keeps_old(tmp_path):
    with atomic_directory(tmp_path / "new") as tmp:
        (tmp / "x").write_text("x")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(tmp_path / "fresh") as tmp:
            (tmp / "x").write_text("partial")
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(tmp_path / "new") as tmp:
            (tmp / "x").write_text("replacement")
            raise RuntimeError("boom")
    assert _entries(tmp_path) == ["new"]
    assert (tmp_path / "new" / "x").read_text() == "x"


def test_atomic_directory_replaces_existing(tmp_path):
    for text in ("one", "two"):
        with atomic_directory(tmp_path / "d") as tmp:
            (tmp / "f").write_text(text)
    assert (tmp_path / "d" / "f").read_text() == "two"
    assert _entries(tmp_path) == ["d"]  # the old copy moved aside was removed


def test_write_text_atomic(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    write_text_atomic(path, "héllo\n")
    write_text_atomic(path, "second\n")
    assert path.read_text(encoding="utf-8") == "second\n"
    assert _entries(path.parent) == ["f.txt"]


def test_verify_checksums_names_corrupt_and_missing_files(tmp_path):
    ckpt = _fake_checkpoint(tmp_path, 1)
    (ckpt / "model.safetensors").write_bytes(b"weights 2")  # same size, different bytes
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt"):
        verify_checksums(ckpt)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors is missing"):
        verify_checksums(ckpt)
    (ckpt / "checksums.json").unlink()
    with pytest.raises(CheckpointError, match=r"checksums\.json is missing"):
        verify_checksums(ckpt)


def test_list_checkpoints_sorted_by_step_ignoring_other_entries(tmp_path):
    for step in (20, 3, 12345678):
        _fake_checkpoint(tmp_path, step)
    (tmp_path / ".step-0000099.tmp-abc").mkdir()
    (tmp_path / "step-12").mkdir()  # not a checkpoint name (7+ digits)
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000003", "step-0000020", "step-12345678"]
    assert list_checkpoints(tmp_path / "missing") == []


def test_update_latest_and_resolve(tmp_path):
    run = tmp_path / "run"
    first, second = _fake_checkpoint(run, 10), _fake_checkpoint(run, 20)
    assert resolve_checkpoint_dir(run) == second  # no `latest`: newest complete checkpoint
    update_latest(run, first.name)
    assert (run / "latest").read_text() == "step-0000010\n"
    assert resolve_checkpoint_dir(run) == first
    assert resolve_checkpoint_dir(second) == second
    assert resolve_checkpoint_dir(str(second)) == second


def test_resolve_skips_incomplete_newest_without_latest(tmp_path):
    good = _fake_checkpoint(tmp_path, 1)
    (tmp_path / checkpoint_name(2)).mkdir()  # e.g. a half-deleted folder copied by hand
    assert resolve_checkpoint_dir(tmp_path) == good


def test_resolve_rejects_non_checkpoints(tmp_path):
    (tmp_path / "random").mkdir()
    (tmp_path / "random" / "data.txt").write_text("x")
    with pytest.raises(CheckpointError, match="is not a muse_lm checkpoint or run directory.*muse train"):
        resolve_checkpoint_dir(tmp_path / "random")
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint_dir(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="is a file"):
        resolve_checkpoint_dir(tmp_path / "random" / "data.txt")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "latest").write_text("step-0000005\n")
    with pytest.raises(CheckpointError, match="names 'step-0000005'"):
        resolve_checkpoint_dir(tmp_path / "run")


def test_prune_keeps_newest_and_latest(tmp_path):
    for step in range(1, 6):
        _fake_checkpoint(tmp_path, step)
    update_latest(tmp_path, checkpoint_name(1))  # e.g. after a rollback
    prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000001", "step-0000004", "step-0000005"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(ValueError, match="keep"):
        prune_checkpoints(tmp_path, keep=0)
