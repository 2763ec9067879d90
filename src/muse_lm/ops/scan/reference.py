"""Pure-torch reference for the first-order linear recurrence h_t = a_t * h_{t-1} + b_t.

Forward: a Hillis-Steele doubling scan over (a, b) pairs, ceil(log2 T) vectorized steps, with
the combine (a2, b2) o (a1, b1) = (a2 a1, a2 b1 + b2) (apply pair 1, then pair 2). No log-space
tricks, so a may be negative or zero.
Backward (custom autograd Function): the reverse scan with a shifted by one,
g_t = a_{t+1} g_{t+1} + dL/dh_t, then dL/db = g, dL/da_t = g_t h_{t-1}, dL/dh_0 = a_1 g_1.
The reverse direction is the forward one on flipped inputs, so its backward is symmetric.
"""

from __future__ import annotations

import torch
from torch import Tensor


def prefix_scan(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Inclusive scan along dim 1 of [B,T,...] pairs, starting from h_0 = 0.

    Returns (A, H): A_t = a_t ... a_1 (the cumulative product) and H_t = h_t with h_0 = 0, so that
    with an initial state h_0 the answer is H_t + A_t h_0.
    """
    length, offset = a.shape[1], 1
    while offset < length:
        # Positions t >= offset combine with the partial result ending at t - offset; earlier ones
        # already hold their full prefix.
        b = torch.cat([b[:, :offset], a[:, offset:] * b[:, :-offset] + b[:, offset:]], 1)
        a = torch.cat([a[:, :offset], a[:, offset:] * a[:, :-offset]], 1)
        offset *= 2
    return a, b


def _reverse_scan(a: Tensor, b: Tensor) -> Tensor:
    """h_t = a_t h_{t+1} + b_t with h_{T+1} = 0."""
    return prefix_scan(a.flip(1), b.flip(1))[1].flip(1)


class LinearRecurrenceFn(torch.autograd.Function):
    """h = linear recurrence of (a, b) from h_0 = initial along dim 1 (forward direction only)."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, initial: Tensor) -> Tensor:
        cum_a, h = prefix_scan(a, b)
        h = h + cum_a * initial.unsqueeze(1)
        ctx.save_for_backward(a, h, initial)
        return h

    @staticmethod
    def backward(ctx, grad_h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a, h, initial = ctx.saved_tensors
        # g_t = a_{t+1} g_{t+1} + grad_h_t: the reverse scan of a shifted left by one (a_{T+1} := 0).
        a_next = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], 1)
        g = _reverse_scan(a_next, grad_h)
        h_prev = torch.cat([initial.unsqueeze(1), h[:, :-1]], 1)
        return g * h_prev, g, a[:, 0] * g[:, 0]


def linear_recurrence_reference(
    a: Tensor, b: Tensor, *, reverse: bool = False, initial: Tensor | None = None
) -> Tensor:
    """h_t = a_t h_{t-1} + b_t along dim 1 (h_t = a_t h_{t+1} + b_t with reverse=True).

    Args:
        a, b: [B,T,...] same shape; fp32/fp64 (bf16/fp16 are computed in fp32).
        initial: [B,...] h_0 (h_{T+1} for reverse), None for zeros.
    Returns:
        h [B,T,...] in the dtype of a (inputs assumed validated).
    """
    cdt = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    if initial is None:
        initial = a.new_zeros(a.shape[:1] + a.shape[2:], dtype=cdt)
    if reverse:
        a, b = a.flip(1), b.flip(1)
    h = LinearRecurrenceFn.apply(a.to(cdt), b.to(cdt), initial.to(cdt))
    return (h.flip(1) if reverse else h).to(a.dtype)
