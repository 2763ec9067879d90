"""`TrainConfig`: everything about a run that is not the model's shape."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from muse_lm.config_utils import config_from_dict, require

DTYPES = ("bf16", "fp32")


def _require(cond: bool, name: str, value: Any, fix: str) -> None:
    require("TrainConfig", cond, name, value, fix)


@dataclass
class TrainConfig:
    seq_len: int = 256
    micro_batch: int = 8
    grad_accum: int = 1
    steps: int = 600
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # "bf16": autocast on CUDA with fp32 master weights; CPU runs always compute in fp32.
    dtype: str = "bf16"
    activation_checkpointing: bool = False
    # torch.compile each block on its own (regional compilation, `training/compiling.py`): fused
    # elementwise work and far fewer kernel launches; the first steps pay the compile. Not with
    # activation checkpointing yet (a compiled block recomputed by torch.utils.checkpoint saves
    # different tensors than its first pass).
    compile: bool = False
    # FSDP2 with grad_accum > 1: reduce-scatter once per step instead of after every micro-batch.
    # Less gradient traffic, but every rank then holds the whole model's unsharded fp32 gradients
    # between micro-batches (DDP-sized), so it is off by default: FSDP is chosen for memory.
    fsdp_defer_reduce: bool = False
    lns: bool = False
    eval_every: int = 100
    eval_batches: int = 8
    # None: max(10, steps // 20), as DESIGN.md says.
    checkpoint_every: int | None = None
    keep_checkpoints: int = 3
    log_every: int = 10

    def __post_init__(self) -> None:
        for name in ("seq_len", "micro_batch", "grad_accum", "steps", "eval_every", "eval_batches",
                     "keep_checkpoints", "log_every"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0, name, value, "must be a positive integer")
        _require(self.lr > 0, "lr", self.lr, "must be > 0")
        _require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        _require(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0, "warmup_steps",
                 self.warmup_steps, "must be an integer >= 0")
        _require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        _require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1/beta2", (self.beta1, self.beta2),
                 "must be in [0, 1)")
        _require(self.grad_clip > 0, "grad_clip", self.grad_clip, "must be > 0")
        _require(self.dtype in DTYPES, "dtype", self.dtype, f"use one of {DTYPES}")
        _require(not (self.compile and self.activation_checkpointing), "compile", self.compile,
                 "cannot be combined with activation_checkpointing yet: set activation_checkpointing=false "
                 "(more memory) or compile=false")
        _require(self.checkpoint_every is None or (isinstance(self.checkpoint_every, int)
                                                   and self.checkpoint_every > 0),
                 "checkpoint_every", self.checkpoint_every, "must be a positive integer or None")

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.micro_batch * self.grad_accum

    def checkpoint_interval(self) -> int:
        return self.checkpoint_every or max(10, self.steps // 20)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        return config_from_dict(cls, data)
