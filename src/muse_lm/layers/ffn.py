"""SwiGLU feed-forward block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from muse_lm.layers.recompute import recompute_in_backward


def _gated_down(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """W2 (silu(gate) * up), the weight cast to the activations' dtype as autocast would."""
    return F.linear(F.silu(gate) * up, weight.to(gate.dtype))


class _GatedDown(torch.autograd.Function):
    """W2 (silu(gate) * up) that keeps gate and up for the backward but not their product: the backward
    recomputes it (one pointwise pass) for W2's gradient. A plain `w2(F.silu(gate) * up)` keeps the
    product too, [N, hidden] more per token (4 KB per token per layer at the 8gb shape, bf16). Eager
    mode only: a compiled graph's partitioner decides what to keep on its own (and kept the product,
    whose only backward use is a matmul); `recompute_in_backward` tells it instead.

    gate, up [..., hidden] (one dtype: the autocast dtype in training), weight [D, hidden] (fp32
    parameters are cast to the activations' dtype, as autocast would) -> [..., D]."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up, weight)
        return _gated_down(gate, up, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # The same ops autograd runs for the plain chain (the product recomputed as the forward made it),
        # so the gradients are bit-identical to it in eager mode. A double backward stops at aten's
        # silu_backward, which has no derivative (an error, not a silently partial result).
        gate, up, weight = ctx.saved_tensors
        silu = F.silu(gate)
        d_gate = d_up = d_weight = None
        if ctx.needs_input_grad[2]:
            prod = silu * up
            d_weight = (grad.reshape(-1, grad.shape[-1]).T @ prod.reshape(-1, prod.shape[-1])).to(weight.dtype)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            d_prod = grad @ weight.to(grad.dtype)
            d_gate = torch.ops.aten.silu_backward(d_prod * up, gate)
            d_up = d_prod * silu
        return d_gate, d_up, d_weight


class SwiGLU(nn.Module):
    """y = W2 (silu(W1 x) * W3 x). x: [..., D] -> [..., D]; W1 and W3 share one matmul. With a plain
    `nn.Linear` W2 the product is recomputed in the backward instead of kept (eager: `_GatedDown`;
    compiled: a selective checkpoint; either way `w2`'s own forward and its hooks are not called, and
    there is no double backward); any other W2 (an `LNSLinear` after `convert_to_lns`) runs through
    its own forward."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.w13 = nn.Linear(d_model, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).split(self.hidden, dim=-1)
        if type(self.w2) is not nn.Linear or self.w2.bias is not None:
            return self.w2(F.silu(gate) * up)
        if torch.compiler.is_compiling():
            # The product is rebuilt from gate and up (kept as the region's inputs); the matmul's output
            # is not needed by the backward, so nothing of the region is kept.
            return recompute_in_backward(_gated_down, gate, up, self.w2.weight)
        return _GatedDown.apply(gate, up, self.w2.weight)
