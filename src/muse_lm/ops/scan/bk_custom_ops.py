"""The Triton BK resolvent as PyTorch custom ops (`muse_lm::bk_forward`, `muse_lm::bk_backward`) with
autograd, so `torch.compile` keeps it inside the graph: behind `compile_boundary` it cut every
compiled block in pieces (see `ops/semiseparable/custom_ops.py` for what that cost). Covers the
autotuned case; an explicit `config` keeps the autograd Function behind the boundary.

Which kernel pair runs is decided by shape (`bk_seq_triton.prefers_seq`): the sequential pair when
B * K channels are many (memory-bound, ~0.5-0.7 of copy bandwidth at B 16, K 512 on an H100), the
parallel-scan pair when they are few (the model's B 16, K 4, where the scan is ~4x faster). Forward
and backward decide on the same shape, so a pass never mixes the two.
"""

from __future__ import annotations

import torch
from torch import Tensor

from muse_lm.ops.scan.bk_seq_triton import bk_resolvent_backward_seq, bk_resolvent_forward_seq, prefers_seq
from muse_lm.ops.scan.bk_triton import bk_resolvent_backward, bk_resolvent_forward


@torch.library.custom_op("muse_lm::bk_forward", mutates_args=())
def bk_forward(v: Tensor, z: Tensor) -> Tensor:
    """G [B,T,K] complex64 for v [B,T,K] real and z [K] complex64."""
    if prefers_seq(v.shape):
        return bk_resolvent_forward_seq(v, z)
    return bk_resolvent_forward(v, z)


@bk_forward.register_fake
def _(v, z):
    return torch.empty(v.shape, dtype=torch.complex64, device=v.device)


@torch.library.custom_op("muse_lm::bk_backward", mutates_args=())
def bk_backward(g: Tensor, grad_g: Tensor, v_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(grad v [B,T,K] in v_dtype, grad z [K] complex64)."""
    if prefers_seq(g.shape):
        return bk_resolvent_backward_seq(g, grad_g, v_dtype)
    return bk_resolvent_backward(g, grad_g, v_dtype)


@bk_backward.register_fake
def _(g, grad_g, v_dtype):
    return torch.empty(g.shape, dtype=v_dtype, device=g.device), \
        torch.empty(g.shape[-1:], dtype=torch.complex64, device=g.device)


def _setup_context(ctx, inputs, output) -> None:
    v, _ = inputs
    ctx.save_for_backward(output)
    ctx.v_dtype = v.dtype


def _backward(ctx, grad_g):
    (g,) = ctx.saved_tensors
    return bk_backward(g, grad_g, ctx.v_dtype)


bk_forward.register_autograd(_backward, setup_context=_setup_context)
