"""The Triton causal conv as PyTorch custom ops with autograd (`muse_lm::causal_conv1d_fwd`,
`muse_lm::causal_conv1d_bwd`): inside a compiled AR-SSM block they are opaque calls, with no graph
break (see `ops/semiseparable/custom_ops.py` for what breaks cost). Absent bias / past travel as
None; absent gradients come back as empty tensors, since a custom op returns tensors only."""

from __future__ import annotations

import torch
from torch import Tensor

from muse_lm.ops.causal_conv.triton import causal_conv1d_backward, causal_conv1d_forward


@torch.library.custom_op("muse_lm::causal_conv1d_fwd", mutates_args=())
def conv_forward(x: Tensor, weight: Tensor, bias: Tensor | None, past: Tensor | None, silu: bool) -> Tensor:
    """y [B, T, D] in x's dtype."""
    return causal_conv1d_forward(x, weight, bias, past, silu)


@conv_forward.register_fake
def _(x, weight, bias, past, silu):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("muse_lm::causal_conv1d_bwd", mutates_args=())
def conv_backward(
    x: Tensor, weight: Tensor, bias: Tensor | None, past: Tensor | None, grad_y: Tensor, silu: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_bias or an empty tensor, grad_past or an empty tensor)."""
    dx, dw, db, dpast = causal_conv1d_backward(x, weight, bias, past, grad_y, silu)
    empty = x.new_empty(0)
    return dx, dw, empty if db is None else db, empty if dpast is None else dpast


@conv_backward.register_fake
def _(x, weight, bias, past, grad_y, silu):
    empty = x.new_empty(0)
    return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight),
            empty if bias is None else torch.empty_like(bias), empty if past is None else torch.empty_like(past))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, past, silu = inputs
    ctx.save_for_backward(x, weight, bias, past)
    ctx.silu = silu


def _backward(ctx, grad_y):
    x, weight, bias, past = ctx.saved_tensors
    dx, dw, db, dpast = conv_backward(x, weight, bias, past, grad_y, ctx.silu)
    return dx, dw, db if bias is not None else None, dpast if past is not None else None, None


conv_forward.register_autograd(_backward, setup_context=_setup_context)
