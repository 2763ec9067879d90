"""RMSNorm computed in fp32 (bf16 squares lose too much precision at d_model >= 1024)."""

from __future__ import annotations

import torch
from torch import nn


def output_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a norm hands on: under autocast, the autocast dtype, else x's. Every consumer of a
    norm's output casts it to the autocast dtype anyway (matmuls) or takes it as given (the AR-SSM conv,
    BK's potential), so an fp32 output under autocast only adds an fp32 copy that autograd saves: on the
    8gb block, 3 KB per token per layer (`benchmarks/saved_activations.py`)."""
    device = x.device.type
    # fp64 stays fp64 (autocast leaves it alone too); "meta" and other devices without autocast pass.
    if x.dtype != torch.float64 and torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight over the last dim, in fp32. x: [..., D] -> [..., D] in `output_dtype(x)`
    (the autocast dtype under autocast, else x's)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(output_dtype(x))
