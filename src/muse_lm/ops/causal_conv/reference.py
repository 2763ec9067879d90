"""Pure-torch reference of the causal depthwise convolution (CPU-safe, any dtype).

y[b, t, d] = act(bias[d] + sum_{j<K} w[d, j] * xp[b, t + j, d]),  xp = cat(past, x) along time,

with past [B, K-1, D] the inputs before the first token (zeros when absent): token t sees
x[t-K+1..t] only, so the layer stays causal. This is F.conv1d's cross-correlation with K-1 zeros
(or `past`) on the left, written as K shifted multiply-adds in the [B, T, D] layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """fp64 when any input is fp64, else fp32: 16-bit inputs are widened, as the kernel does."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def causal_conv1d_reference(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, past: Tensor | None = None, silu: bool = True
) -> Tensor:
    """x [B, T, D], weight [D, K], bias [D], past [B, K-1, D] -> y [B, T, D] in x's dtype.

    Products and sums in fp32 (fp64 when an input is fp64), rounded once at the end.
    """
    dtype = compute_dtype(x, weight, bias, past)
    B, T, D = x.shape
    K = weight.shape[1]
    xw = x.to(dtype)
    head = past.to(dtype) if past is not None else xw.new_zeros(B, K - 1, D)
    xp = torch.cat([head, xw], dim=1)
    w = weight.to(dtype)
    y = xp[:, :T] * w[:, 0]
    for j in range(1, K):
        y = y + xp[:, j : j + T] * w[:, j]
    if bias is not None:
        y = y + bias.to(dtype)
    return (F.silu(y) if silu else y).to(x.dtype)
