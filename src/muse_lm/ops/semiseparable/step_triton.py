"""One decode token of the semiseparable scan in Triton (`semiseparable_step` for generation).

Per (b, h): S' = exp(log_a) S + u x^T (R x P, fp32), y = v^T S'. One program per (b*h, block of P)
reads its [R, BP] tile of S, writes the same tile of S' and y's BP columns: no program reads what
another writes, so S' may be written over S (`out_state=state`). Memory-bound (the state is read and
written once); R is kept whole (padded to a power of two >= 16) and P split so a tile stays at most
8192 elements. The backward (a one-token product) runs in torch: `SemiseparableStepTriton`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from muse_lm.ops._dispatch import compile_boundary

__all__ = ["SemiseparableStepTriton", "semiseparable_step_forward", "semiseparable_step_triton"]

_MAX_TILE = 8192  # fp32 elements of the [RB, BP] state tile per program (64 registers a thread at 4 warps)


@triton.jit
def _step_kernel(
    x_ptr, u_ptr, v_ptr, la_ptr, s_ptr, y_ptr, ns_ptr, R, P,
    RB: tl.constexpr, BP: tl.constexpr, HAS_STATE: tl.constexpr,
):
    """x [B*H, P], u, v [B*H, R] (any float dtype), la [B*H] fp32, s / ns [B*H, R, P] fp32 (s unread
    without HAS_STATE: zeros), y [B*H, P] in x's dtype."""
    i_bh, i_p = tl.program_id(0), tl.program_id(1)
    o_r = tl.arange(0, RB)
    o_p = i_p * BP + tl.arange(0, BP)
    m_r, m_p = o_r < R, o_p < P
    row = i_bh.to(tl.int64)
    u = tl.load(u_ptr + row * R + o_r, mask=m_r, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + row * R + o_r, mask=m_r, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + row * P + o_p, mask=m_p, other=0.0).to(tl.float32)
    offs = row * R * P + o_r[:, None] * P + o_p[None, :]
    m = m_r[:, None] & m_p[None, :]
    new = u[:, None] * x[None, :]
    if HAS_STATE:
        decay = tl.exp(tl.load(la_ptr + row))
        new += decay * tl.load(s_ptr + offs, mask=m, other=0.0)
    tl.store(ns_ptr + offs, new, mask=m)
    y = tl.sum(v[:, None] * new, 0)
    tl.store(y_ptr + row * P + o_p, y.to(y_ptr.dtype.element_ty), mask=m_p)


def _check_inputs(x_t: Tensor, log_a_t: Tensor, state: Tensor | None) -> None:
    if x_t.dtype not in (torch.float32, torch.bfloat16, torch.float16) or log_a_t.dtype != torch.float32 or (
        state is not None and state.dtype != torch.float32
    ):
        raise NotImplementedError(
            "semiseparable_step_triton: the kernel computes in fp32 (x_t, u_t, v_t fp32/bf16/fp16; log_a_t "
            f"and state fp32), got x_t {x_t.dtype}, log_a_t {log_a_t.dtype}, state "
            f"{None if state is None else state.dtype}; fp64 runs on the torch reference (impl='torch' or "
            "impl=None)"
        )


def semiseparable_step_forward(
    x_t: Tensor,
    u_t: Tensor,
    v_t: Tensor,
    log_a_t: Tensor,
    state: Tensor | None,
    *,
    out_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(y_t [B,H,P] in x_t's dtype, new state [B,H,R,P] fp32), no autograd. x_t [B,H,P], u_t, v_t
    [B,H,R], log_a_t [B,H] fp32, state [B,H,R,P] fp32 or None (zeros). out_state (contiguous fp32
    [B,H,R,P]) receives the new state when given; it may be `state` itself (updated in place)."""
    _check_inputs(x_t, log_a_t, state)
    b, h, p = x_t.shape
    r = u_t.shape[-1]
    x_t, u_t, v_t, log_a_t = (t.contiguous() for t in (x_t, u_t, v_t, log_a_t))
    if state is not None and not state.is_contiguous():
        if out_state is state:
            raise ValueError("semiseparable_step_forward: an in-place update needs a contiguous state")
        state = state.contiguous()
    if out_state is None:
        out_state = torch.empty(b, h, r, p, device=x_t.device, dtype=torch.float32)
    elif out_state.shape != (b, h, r, p) or out_state.dtype != torch.float32 or not out_state.is_contiguous():
        raise ValueError(f"semiseparable_step_forward: out_state must be contiguous fp32 {(b, h, r, p)}")
    y = torch.empty_like(x_t)
    if x_t.numel() == 0 or out_state.numel() == 0:  # nothing to launch: y = 0, the state is empty
        return y.zero_(), out_state
    block_r = max(16, triton.next_power_of_2(r))
    block_p = max(16, min(triton.next_power_of_2(p), _MAX_TILE // block_r))
    grid = (b * h, triton.cdiv(p, block_p))
    _step_kernel[grid](
        x_t, u_t, v_t, log_a_t, state if state is not None else out_state, y, out_state, r, p,
        RB=block_r, BP=block_p, HAS_STATE=state is not None,
    )
    return y, out_state


class SemiseparableStepTriton(torch.autograd.Function):
    """(y_t, new state) by the kernel; the backward in torch. With S' = e^a S + u x^T, y = v^T S' and
    G = dS' + v dy^T (the new state's total gradient): dS = e^a G, du = G x, dx = G^T u, dv = S' dy,
    d log_a = e^a <S, G>."""

    @staticmethod
    def forward(ctx, x_t, u_t, v_t, log_a_t, state):
        ctx.set_materialize_grads(False)
        y, new_state = semiseparable_step_forward(x_t, u_t, v_t, log_a_t, state)
        ctx.save_for_backward(x_t, u_t, v_t, log_a_t, state, new_state)
        return y, new_state

    @staticmethod
    def backward(ctx, grad_y, grad_state):
        x_t, u_t, v_t, log_a_t, state, new_state = ctx.saved_tensors
        total = torch.zeros_like(new_state) if grad_state is None else grad_state.float().clone()
        if grad_y is not None:
            total += v_t.float().unsqueeze(-1) * grad_y.float().unsqueeze(-2)
        decay = log_a_t.exp()[..., None, None]
        dx = torch.einsum("bhrp,bhr->bhp", total, u_t.float()).to(x_t.dtype)
        du = torch.einsum("bhrp,bhp->bhr", total, x_t.float()).to(u_t.dtype)
        dv = torch.zeros_like(v_t) if grad_y is None else (
            torch.einsum("bhrp,bhp->bhr", new_state, grad_y.float()).to(v_t.dtype)
        )
        if state is None:
            return dx, du, dv, torch.zeros_like(log_a_t), None
        dla = (decay * state * total).sum((-2, -1))
        return dx, du, dv, dla, decay * total


@compile_boundary
def semiseparable_step_triton(
    x_t: Tensor, u_t: Tensor, v_t: Tensor, log_a_t: Tensor, state: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Differentiable Triton step; same contract as `muse_lm.ops.semiseparable_step` (which validates
    and dispatches here) for fp32/bf16/fp16 x_t, u_t, v_t and fp32 log_a_t, state. The new state is a
    new tensor: `state` is left as it was (decoding caches may share it)."""
    _check_inputs(x_t, log_a_t, state)
    return SemiseparableStepTriton.apply(x_t, u_t, v_t, log_a_t, state)
