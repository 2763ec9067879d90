"""AdamW with decoupled weight decay on matrices only, and the warm-up + cosine LR schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from muse_lm.training.config import TrainConfig

# Parameters whose names contain one of these never get weight decay, whatever their shape:
# decaying a norm gain or a bias pulls it toward 0, which is not a regularizer but a bug.
_NO_DECAY_NAME_PARTS = ("norm", "bias")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Splits trainable parameters into a decayed group (>= 2-D weights: matrices, TT cores,
    conv kernels) and a non-decayed group (1-D/0-D: norms, biases, gate biases, decay rates)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lowered = name.lower()
        if p.ndim >= 2 and not any(part in lowered for part in _NO_DECAY_NAME_PARTS):
            decay.append(p)
        else:
            no_decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device,
                    fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over `param_groups`; the fused kernel on GPU (one launch for all params; it can
    skip a step on a device flag, `found_inf`), the foreach path on CPU unless `fused=True`."""
    fused = device.type == "cuda" if fused is None else fused
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=1e-8,
        fused=fused,
        foreach=None if fused else True,
    )


class WarmupCosine:
    """LR multiplier for `LambdaLR`: linear warm-up over `warmup_steps`, then cosine from 1 to
    `min_lr_ratio` at `total_steps`, flat after that.

    A callable object rather than a lambda so that `LambdaLR.state_dict()` stores its fields
    (plain numbers), which keeps train_state.pt loadable with `weights_only=True`.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            # (step + 1): the first update already uses a non-zero LR.
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule over `cfg.steps` optimizer steps (see `WarmupCosine`)."""
    warmup = min(cfg.warmup_steps, cfg.steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup, cfg.steps, cfg.min_lr_ratio))
