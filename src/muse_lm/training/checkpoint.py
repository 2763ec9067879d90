"""Save and load checkpoint directories (`run/step-NNNNNNN/`).

A checkpoint holds:

- `model.safetensors`: the model's state dict (safe to load from anywhere: no pickle);
- `config.json`: the config dict (sorted keys, so equal configs give equal files);
- `tokenizer.json`: the tokenizer, so a checkpoint is usable on its own;
- `train_state.pt`: optimizer, scheduler, RNG, data position, monitor state (torch.save);
- `checksums.json`: sha256 of the files above, verified on every load.

Writes go through `muse_lm.io.atomic_directory`; `latest` is updated only after the directory
is in place, and older checkpoints are pruned after that.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from muse_lm.errors import CheckpointError
from muse_lm.io import (
    atomic_directory,
    checkpoint_name,
    prune_checkpoints,
    resolve_checkpoint_dir,
    update_latest,
    verify_checksums,
)

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
TRAIN_STATE_FILE = "train_state.pt"


@dataclass
class Checkpoint:
    """What `load_checkpoint` read. `tokenizer_json` / `train_state` are None when the directory
    has no such file (or `load_train_state=False`)."""

    path: Path
    model_state: dict
    config: dict
    tokenizer_json: str | None
    train_state: dict | None

    @property
    def step(self) -> int | None:
        """The step in the directory name (`step-0000100` -> 100); None for other names."""
        match = re.fullmatch(r"step-(\d+)", self.path.name)
        return int(match.group(1)) if match else None


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def _safetensors_ready(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors that `safetensors.torch.save_file` accepts: detached, contiguous, each owning its
    storage. safetensors refuses tensors that share memory (tied embedding/head weights, views
    of one buffer); those are cloned, so a tied pair is saved as two equal tensors and
    `load_state_dict` writes the same values into the tied parameter twice."""
    counts: dict[tuple[str, int], int] = {}
    for name, t in model_state.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise TypeError(f"save_checkpoint: model_state must map str -> Tensor; got {name!r}: "
                            f"{type(t).__name__}")
        counts[_storage_key(t)] = counts.get(_storage_key(t), 0) + 1
    ready = {}
    for name, t in model_state.items():
        t = t.detach()
        owns_storage = t.untyped_storage().nbytes() == t.numel() * t.element_size()
        if counts[_storage_key(t)] > 1 or not owns_storage or not t.is_contiguous():
            t = t.contiguous().clone()
        ready[name] = t
    return ready


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    config: dict,
    tokenizer_json: str,
    train_state: dict,
    keep: int = 3,
) -> Path:
    """Write `run_dir/step-NNNNNNN/` atomically, point `latest` at it, keep the newest `keep`.

    Args:
        run_dir: the run directory (created if missing).
        step: optimizer steps done; names the directory. Saving a step that exists replaces it.
        model_state: `model.state_dict()`; tensors may live on any device.
        config: JSON-serializable dict (e.g. `{"model": ..., "train": ...}`).
        tokenizer_json: `tokenizer.to_str()`.
        train_state: anything `torch.save` can pickle (optimizer/scheduler state, RNG, step).
        keep: checkpoints to keep (>= 1); the one `latest` names is never removed.

    Returns:
        The final checkpoint directory.
    """
    run_dir = Path(run_dir)
    name = checkpoint_name(step)
    tensors = _safetensors_ready(model_state)
    try:
        config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    except TypeError as err:
        raise TypeError(f"save_checkpoint: config must be JSON-serializable ({err})") from None
    with atomic_directory(run_dir / name) as tmp:
        safetensors.torch.save_file(tensors, tmp / MODEL_FILE)
        (tmp / CONFIG_FILE).write_text(config_text, encoding="utf-8")
        (tmp / TOKENIZER_FILE).write_text(tokenizer_json, encoding="utf-8")
        torch.save(train_state, tmp / TRAIN_STATE_FILE)
    update_latest(run_dir, name)
    prune_checkpoints(run_dir, keep)
    return run_dir / name


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint file {path} is unreadable ({err}); use another checkpoint "
                              "of the run") from None


def _load_model_state(path: Path, map_location: str | torch.device) -> dict:
    try:
        return safetensors.torch.load_file(path, device=str(map_location))
    except (safetensors.SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint file {path} is not a readable safetensors file ({err}); "
                              "use another checkpoint of the run") from None


def _load_train_state(path: Path, map_location: str | torch.device) -> dict:
    # weights_only=False: train_state.pt holds our own optimizer/scheduler/RNG/numpy state,
    # which the weights-only unpickler rejects (numpy arrays, tuples of Python RNG state). The
    # file's checksum is verified first, but unpickling still runs code from the file: load
    # train state only from runs you trust. Inference needs only `load_train_state=False`,
    # which reads nothing but safetensors and JSON.
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"checkpoint file {path} is unreadable ({err}); use another checkpoint "
                              "of the run") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint file {path} holds a {type(state).__name__}, expected a dict "
                              "written by save_checkpoint")
    return state


def load_checkpoint(
    path: str | os.PathLike,
    *,
    map_location: str | torch.device = "cpu",
    load_train_state: bool = True,
) -> Checkpoint:
    """Load a checkpoint directory, or the checkpoint a run directory's `latest` names.

    Checksums are verified before anything is parsed, so a truncated or bit-flipped file is
    reported by name instead of surfacing as a confusing parse error.

    Args:
        path: a run directory or one of its `step-NNNNNNN` directories.
        map_location: device for the tensors (model state and train state).
        load_train_state: read `train_state.pt` (uses pickle; see `_load_train_state`).

    Raises:
        CheckpointError: with one line saying which path or file is wrong and what to do.
    """
    ckpt_dir = resolve_checkpoint_dir(path)
    verify_checksums(ckpt_dir)
    model_state = _load_model_state(ckpt_dir / MODEL_FILE, map_location)
    config_path = ckpt_dir / CONFIG_FILE
    try:
        config = json.loads(_read_text(config_path))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"checkpoint file {config_path} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint file {config_path} holds a {type(config).__name__}, "
                              "expected a JSON object")
    tokenizer_path = ckpt_dir / TOKENIZER_FILE
    tokenizer_json = _read_text(tokenizer_path) if tokenizer_path.is_file() else None
    train_state = None
    state_path = ckpt_dir / TRAIN_STATE_FILE
    if load_train_state and state_path.is_file():
        train_state = _load_train_state(state_path, map_location)
    return Checkpoint(path=ckpt_dir, model_state=model_state, config=config,
                      tokenizer_json=tokenizer_json, train_state=train_state)
