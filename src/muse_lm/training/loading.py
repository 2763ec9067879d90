"""Load a trained model with its tokenizer and run config (for `muse generate` / `muse eval`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tokenizers
import torch

from muse_lm.errors import CheckpointError
from muse_lm.layers import convert_to_lns
from muse_lm.models import MuseConfig, MuseLM
from muse_lm.training.checkpoint import load_checkpoint


@dataclass
class Trained:
    model: MuseLM  # in eval mode, on the requested device
    tokenizer: tokenizers.Tokenizer
    config: dict  # the checkpoint's config.json
    path: Path  # the checkpoint directory
    step: int | None


def load_trained(path: str | Path, device: torch.device | str = "cpu") -> Trained:
    """Reads a run directory (its `latest` checkpoint) or a checkpoint directory.

    Checksums are verified; no pickle is read (the train state is skipped).

    Raises:
        CheckpointError: not a checkpoint, damaged, or without a tokenizer.json.
    """
    ckpt = load_checkpoint(path, map_location="cpu", load_train_state=False)
    config = ckpt.config
    if config.get("model_type", "muse") != MuseLM.model_type or not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{ckpt.path}/config.json does not describe a muse model (model_type "
                              f"{config.get('model_type')!r}); pass a checkpoint written by `muse train`")
    if ckpt.tokenizer_json is None:
        raise CheckpointError(f"{ckpt.path} has no tokenizer.json, so its ids cannot be turned into text; "
                              "pass a checkpoint written by `muse train`")
    model = MuseLM(MuseConfig.from_dict(config["model"]))
    try:
        model.load_state_dict(ckpt.model_state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(f"{ckpt.path}: the weights do not match its config.json ({first}); the "
                              "checkpoint is damaged or from another version") from None
    if config.get("train", {}).get("lns"):
        # Trained straight-through: the latent weights quantize to the exact codes every training
        # forward used, so freezing them gives the model that was trained, at 8 bits per weight.
        convert_to_lns(model, "ffn", trainable=False)
    tokenizer = tokenizers.Tokenizer.from_str(ckpt.tokenizer_json)
    return Trained(model.to(device).eval(), tokenizer, config, ckpt.path, ckpt.step)
