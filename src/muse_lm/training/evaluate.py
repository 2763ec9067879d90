"""Held-out loss and perplexity (shared by the trainer and `muse eval`)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from muse_lm.errors import DataError
from muse_lm.training.distributed import DistInfo, all_reduce_sum


@dataclass
class EvalResult:
    loss: float  # mean next-token cross-entropy, nats per token
    tokens: int  # tokens scored

    @property
    def perplexity(self) -> float:
        # exp overflows past ~709 nats; a loss that high means "untrained", inf says so.
        return math.exp(self.loss) if self.loss < 700 else math.inf


def as_tensor(a: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch array (numpy or torch) as an int64 tensor on `device`."""
    t = torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a
    return t.to(device=device, dtype=torch.long, non_blocking=True)


def autocast_context(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when the run asks for bf16; fp32 everywhere else (CPU autocast
    would change numerics for no speed gain on the reference ops)."""
    if device.type == "cuda" and dtype == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def validate_token_ids(model: nn.Module, arrays: list[np.ndarray]) -> None:
    """Checks every id of the token streams against the model's vocabulary once, at the data
    boundary, and turns off the per-forward check (a host sync on CUDA).

    Raises:
        DataError: an id outside [0, vocab_size).
    """
    bounds = [int(f(a)) for a in arrays if a.size for f in (np.min, np.max)]
    try:
        model.validate_ids(torch.tensor([bounds], dtype=torch.long))
    except ValueError as err:
        raise DataError(f"the tokenized data does not fit the model: {err}") from None
    model.check_ids = False


@torch.no_grad()
def evaluate_loss(model: nn.Module, batches: Iterable[tuple], device: torch.device, *, dtype: str = "fp32",
                  dist_info: DistInfo | None = None) -> EvalResult:
    """Mean cross-entropy of `model` over `batches` of (x [B, T], y [B, T]).

    With several ranks each scores every world_size-th batch and the sums are all-reduced, so
    the result is the same set of tokens as one process would score. The model's mode and the
    RNG are restored afterwards, so evaluating never changes what training does next.
    """
    info = dist_info or DistInfo()
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of nll, tokens]
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices, device_type=device.type):
        for i, (x, y) in enumerate(batches):
            if i % info.world_size != info.rank:
                continue
            x, y = as_tensor(x, device), as_tensor(y, device)
            with autocast_context(device, dtype):
                _, ce, _ = model(x, y, return_parts=True)
            total[0] += ce.double() * y.numel()
            total[1] += y.numel()
    model.train(was_training)
    all_reduce_sum(total, info)
    tokens = int(total[1].item())
    if tokens == 0:
        raise DataError("evaluate_loss: no held-out batches to score (the held-out split is shorter "
                         "than one sequence); use a larger corpus or a smaller seq_len")
    return EvalResult(loss=float(total[0].item()) / tokens, tokens=tokens)
