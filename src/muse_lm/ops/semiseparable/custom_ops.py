"""The Triton scan as two PyTorch custom ops (`muse_lm::ssd_forward`, `muse_lm::ssd_backward`) with
autograd, so `torch.compile` keeps it inside the graph instead of breaking the graph around it.

Why: behind `compile_boundary` every AR-SSM layer cut the compiled model in pieces (two graph
breaks per layer, forward and backward). Each piece costs host time (its own guards and
AOTAutograd wrappers) and GPU time (tensors crossing a break are materialized, and the residual
gradient sums between pieces run as separate eager kernels); on an H100 a compiled 8gb MuseLM step
was host-bound at ~150 ms for ~52 ms of GPU work. As custom ops the kernels are opaque calls inside
one graph per block: Dynamo does not trace the launchers or the autotuners (the reason for the
boundary), and the fake implementations give Inductor the output shapes.

Covers the model's path (no cu_seqlens, autotuned config, automatic two-level choice); the other
arguments keep the `torch.autograd.Function` behind the boundary.
"""

from __future__ import annotations

import torch
from torch import Tensor

from muse_lm.ops.semiseparable.triton import (
    kernel_chunk,
    saved_state_dtype,
    semiseparable_backward,
    semiseparable_forward,
)


@torch.library.custom_op("muse_lm::ssd_forward", mutates_args=())
def ssd_forward(
    x: Tensor, u: Tensor, v: Tensor, log_a: Tensor, initial_state: Tensor | None, chunk_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(y [B,T,H,P] x.dtype, final state [B,H,R,P] fp32, entering states [B,H,NC,R,P] in
    `saved_state_dtype` (fp32 unless the fused walk saves compact bf16 states))."""
    return semiseparable_forward(x, u, v, log_a, initial_state, chunk_size)


@ssd_forward.register_fake
def _(x, u, v, log_a, initial_state, chunk_size):
    b, t, h, p = x.shape
    r = u.shape[-1]
    c = kernel_chunk(chunk_size)
    nc = (t + c - 1) // c
    f32 = torch.float32
    states = saved_state_dtype(x.dtype)  # the same policy the kernels follow; no guard on the shape
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty((b, h, r, p), dtype=f32), \
        x.new_empty((b, h, nc, r, p), dtype=states)


@torch.library.custom_op("muse_lm::ssd_backward", mutates_args=())
def ssd_backward(
    x: Tensor, u: Tensor, v: Tensor, log_a: Tensor, states: Tensor, grad_y: Tensor | None,
    grad_final: Tensor | None, chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, du, dv in x's dtype, d log_a fp32, d initial_state [B,H,R,P] fp32)."""
    return semiseparable_backward(x, u, v, log_a, states, grad_y, grad_final, chunk_size)


@ssd_backward.register_fake
def _(x, u, v, log_a, states, grad_y, grad_final, chunk_size):
    b, t, h, p = x.shape
    like = lambda a, dtype=None: torch.empty(a.shape, dtype=dtype or a.dtype, device=a.device)
    return like(x), like(u), like(v), like(log_a, torch.float32), \
        x.new_empty((b, h, u.shape[-1], p), dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    x, u, v, log_a, initial_state, chunk_size = inputs
    _, _, states = output
    ctx.mark_non_differentiable(states)
    # An unused output's gradient arrives as None (not a zero-filled [B,H,NC,R,P] fp32 tensor per layer).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, u, v, log_a, states)
    ctx.chunk_size, ctx.has_init = chunk_size, initial_state is not None


def _backward(ctx, grad_y, grad_final, _grad_states):
    x, u, v, log_a, states = ctx.saved_tensors
    dx, du, dv, dla, d_init = ssd_backward(x, u, v, log_a, states, grad_y, grad_final, ctx.chunk_size)
    return dx, du, dv, dla, (d_init if ctx.has_init else None), None


ssd_forward.register_autograd(_backward, setup_context=_setup_context)


def semiseparable_custom(x: Tensor, u: Tensor, v: Tensor, log_a: Tensor, initial_state: Tensor | None,
                         chunk_size: int) -> tuple[Tensor, Tensor]:
    """(y, final state) through the custom ops; differentiable in every tensor input. The inputs are
    made contiguous here, outside the op, so the tensors it saves for backward are the copies (the
    kernels need them contiguous) and the backward does not copy them again."""
    x, u, v, log_a = (t.contiguous() for t in (x, u, v, log_a))
    y, final, _ = ssd_forward(x, u, v, log_a, initial_state, chunk_size)
    return y, final
