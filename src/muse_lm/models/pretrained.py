"""save_pretrained / from_pretrained for muse_lm models (model.safetensors + config.json)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from muse_lm.errors import CheckpointError
from muse_lm.io import atomic_directory, resolve_checkpoint_dir, verify_checksums


def state_dict_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies; safetensors refuses tensors that share storage."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def save_model_dir(path: str | Path, model: torch.nn.Module, config_json: dict) -> Path:
    """Writes path/{model.safetensors, config.json, checksums.json} atomically."""
    path = Path(path)
    with atomic_directory(path) as tmp:
        save_file(state_dict_for_saving(model), str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True))
    return path


def read_model_dir(path: str | Path, map_location: str | torch.device = "cpu"):
    """Resolves a run dir or checkpoint dir -> (checkpoint dir, config dict, state dict)."""
    ckpt = resolve_checkpoint_dir(path)
    verify_checksums(ckpt)
    try:
        config = json.loads((ckpt / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{ckpt / 'config.json'} is not valid JSON ({err}); the checkpoint is damaged") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{ckpt / 'config.json'} has no \"model\" section; it was not written by muse_lm")
    state = load_file(str(ckpt / "model.safetensors"), device=str(map_location))
    return ckpt, config, state
