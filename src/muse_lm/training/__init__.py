"""Training: `train(RunOptions)` runs `muse train`; `Trainer` is the loop itself.

The names below are imported lazily, so that `import muse_lm.training.data` (or checkpoint,
tokenizer, config) does not pull in the trainer, and the trainer's imports of those modules
never meet a half-initialized package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from muse_lm.training.config import TrainConfig
    from muse_lm.training.evaluate import EvalResult, evaluate_loss
    from muse_lm.training.options import RunOptions, RunResult
    from muse_lm.training.run import train
    from muse_lm.training.trainer import Trainer

_EXPORTS = {
    "TrainConfig": "muse_lm.training.config",
    "EvalResult": "muse_lm.training.evaluate",
    "evaluate_loss": "muse_lm.training.evaluate",
    "RunOptions": "muse_lm.training.options",
    "RunResult": "muse_lm.training.options",
    "train": "muse_lm.training.run",
    "Trainer": "muse_lm.training.trainer",
}

__all__ = ["EvalResult", "RunOptions", "RunResult", "TrainConfig", "Trainer", "evaluate_loss", "train"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'muse_lm.training' has no attribute {name!r}")
