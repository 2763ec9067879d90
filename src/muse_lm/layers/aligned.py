"""GEMMs with 16-byte aligned rows: cuBLAS picks slow align-2 kernels for rows of odd widths."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def aligned_linear(x: torch.Tensor, weight: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    """F.linear(x, weight) with its N output columns padded up to a multiple of 8: `[..., N + pad]`,
    the pad columns zero. An output row of 1580 bf16 values is not 16-byte aligned, and cuBLAS then
    runs slow align-2 kernels for all three of the projection's GEMMs (6.4 of a 60 ms H100 step). The
    caller splits the pad off with the rest (a slice would add a zero-filled copy of the whole
    gradient in backward; a split's gradient is one concatenation). Padding copies the weight:
    [N + pad, D], a fixed cost, not one per token."""
    pad = (-weight.shape[0]) % multiple
    return F.linear(x, F.pad(weight, (0, 0, 0, pad)) if pad else weight)
