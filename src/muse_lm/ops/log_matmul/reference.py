"""log_matmul in pure torch: C_ij = log sum_k exp(A_ik + B_kj), chunked so memory stays bounded.

The definition, literally: `torch.logsumexp(A[:, :, None] + B[None], dim=1)`, which materializes an
M x K x N tensor. Here the output is walked in chunks of (batch, rows, columns) whose M x K x N slab
fits `max_chunk_elements` (default: ~64 MB live counting logsumexp's two temporaries of the slab's
size), so an HMM-sized product never allocates more than that.

Gradients (also chunked, a custom autograd.Function so the slabs are not saved for backward):
    w_ijk = exp(A_ik + B_kj - C_ij)        (softmax over k for each output; sum_k w_ijk = 1)
    dA_ik = sum_j g_ij w_ijk,   dB_kj = sum_i g_ij w_ijk.
An output whose every term is -inf (C_ij = -inf) has all weights 0: its gradient is 0, not NaN.

Math in fp32 for fp16/bf16/fp32 inputs (results cast back to the input dtype), fp64 for fp64.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["chunk_sizes", "log_matmul_reference", "log_matmul_reference_backward", "log_matmul_reference_forward"]

# torch.logsumexp keeps its input and two temporaries of the same size (x - max, exp) alive, so a
# slab of a third of the budget keeps ~64 MB live at the peak.
_LIVE_BYTES = 64 * 2**20
_LIVE_COPIES = 3


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; everything else is computed in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_chunk_elements(dtype: torch.dtype) -> int:
    """Elements of one B x K x N slab so that ~64 MB is live in `dtype`'s compute precision."""
    return _LIVE_BYTES // (_LIVE_COPIES * torch.empty((), dtype=compute_dtype(dtype)).element_size())


def chunk_sizes(batch: int, m: int, k: int, n: int, max_elements: int) -> tuple[int, int, int]:
    """(batch, rows, columns) per chunk with batch * rows * k * columns <= max_elements.

    Columns are filled first (B's rows are contiguous in them), then rows, then batch entries. One
    (1, 1, K, 1) slice is the smallest chunk: a K above `max_elements` is not split (the budget is
    then exceeded by that one slice).
    """
    if max_elements < 1:
        raise ValueError(f"chunk_sizes: max_elements={max_elements} must be >= 1")
    k = max(k, 1)
    cn = max(1, min(n, max_elements // k))
    cm = max(1, min(m, max_elements // (k * cn)))
    cb = max(1, min(batch, max_elements // (k * cn * cm)))
    return cb, cm, cn


def _check_3d(a: Tensor, b: Tensor) -> None:
    if a.ndim != 3 or b.ndim != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise ValueError(
            f"log_matmul_reference: need A [Bt,M,K] and B [Bt,K,N], got {tuple(a.shape)} and {tuple(b.shape)} "
            "(the public muse_lm.ops.log_matmul flattens batch dims for you)"
        )


def log_matmul_reference_forward(a: Tensor, b: Tensor, *, max_chunk_elements: int | None = None) -> Tensor:
    """C [Bt,M,N] = log sum_k exp(A + B) for A [Bt,M,K], B [Bt,K,N] (no autograd), in the compute dtype.

    K = 0 gives -inf everywhere (the log of an empty sum).
    """
    _check_3d(a, b)
    dt = compute_dtype(a.dtype)
    a, b = a.to(dt), b.to(dt)
    bt, m, k = a.shape
    n = b.shape[2]
    out = torch.full((bt, m, n), float("-inf"), device=a.device, dtype=dt)
    if out.numel() == 0 or k == 0:
        return out
    cb, cm, cn = chunk_sizes(bt, m, k, n, max_chunk_elements or default_chunk_elements(dt))
    for b0 in range(0, bt, cb):
        for i0 in range(0, m, cm):
            rows = a[b0 : b0 + cb, i0 : i0 + cm, :, None]
            for j0 in range(0, n, cn):
                slab = rows + b[b0 : b0 + cb, None, :, j0 : j0 + cn]  # [cb, cm, K, cn]
                out[b0 : b0 + cb, i0 : i0 + cm, j0 : j0 + cn] = torch.logsumexp(slab, dim=2)
    return out


def log_matmul_reference_backward(
    a: Tensor, b: Tensor, c: Tensor, grad: Tensor, *, max_chunk_elements: int | None = None
) -> tuple[Tensor, Tensor]:
    """(dA [Bt,M,K], dB [Bt,K,N]) in the compute dtype, for C = log_matmul(A, B) and dL/dC = grad.

    w = exp(A + B - C) per slab, formed in place (one slab live); C = -inf outputs get weight 0.
    """
    _check_3d(a, b)
    dt = compute_dtype(a.dtype)
    a, b, c, grad = a.to(dt), b.to(dt), c.to(dt), grad.to(dt)
    bt, m, k = a.shape
    n = b.shape[2]
    da = torch.zeros(a.shape, device=a.device, dtype=dt)
    db = torch.zeros(b.shape, device=a.device, dtype=dt)
    if a.numel() == 0 or b.numel() == 0:
        return da, db
    # C = -inf only where every term is -inf: A + B - (+inf) = -inf there, so exp gives 0, not NaN.
    c = c.masked_fill(c == float("-inf"), float("inf"))
    cb, cm, cn = chunk_sizes(bt, m, k, n, max_chunk_elements or default_chunk_elements(dt))
    for b0 in range(0, bt, cb):
        bs = slice(b0, b0 + cb)
        for i0 in range(0, m, cm):
            rs = slice(i0, i0 + cm)
            for j0 in range(0, n, cn):
                cs = slice(j0, j0 + cn)
                w = a[bs, rs, :, None] + b[bs, None, :, cs]  # [cb, cm, K, cn]
                w.sub_(c[bs, rs, None, cs]).exp_().mul_(grad[bs, rs, None, cs])
                da[bs, rs] += w.sum(3)
                db[bs, :, cs] += w.sum(1)
    return da, db


class _LogMatmulReference(torch.autograd.Function):
    """Chunked forward; chunked backward from (A, B, C) so no M x K x N slab is saved."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, max_chunk_elements: int | None) -> Tensor:
        c = log_matmul_reference_forward(a, b, max_chunk_elements=max_chunk_elements)
        ctx.save_for_backward(a, b, c)
        ctx.max_chunk_elements = max_chunk_elements
        return c.to(a.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        a, b, c = ctx.saved_tensors
        if not any(ctx.needs_input_grad[:2]):
            return None, None, None
        da, db = log_matmul_reference_backward(a, b, c, grad, max_chunk_elements=ctx.max_chunk_elements)
        da = da.to(a.dtype) if ctx.needs_input_grad[0] else None
        db = db.to(b.dtype) if ctx.needs_input_grad[1] else None
        return da, db, None


def log_matmul_reference(a: Tensor, b: Tensor, *, max_chunk_elements: int | None = None) -> Tensor:
    """Differentiable C [Bt,M,N] = log sum_k exp(A_ik + B_kj) for A [Bt,M,K], B [Bt,K,N], in A's dtype.

    `max_chunk_elements` bounds the B x K x N slab of one chunk (None: ~64 MB live, see module doc).
    """
    return _LogMatmulReference.apply(a, b, max_chunk_elements)
