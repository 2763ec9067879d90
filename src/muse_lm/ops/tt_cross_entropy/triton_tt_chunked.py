"""Tied TT head + cross-entropy on the dense fused kernels, the table rebuilt one vocab chunk at a time.

loss_i = lse_i - logit_i[t_i] + z_loss * lse_i**2, logits = h @ E[:V].T, E = TT(cores) (any K).

Why this and not `triton_tt.py`'s fully fused kernels: those contract the cores inside the logits
GEMM (0.57x a dense head's FLOPs at d_model 1024, rank 16), but their weight-gradient kernels must
recompute the logits once per rank group, and on an H100 the whole forward+backward took 1.6x
cut-cross-entropy on the dense head. Here a chunk of rows E[a:b] is rebuilt from the cores
(2 (b - a) D R FLOPs, a GEMM over the rank) and the dense kernels of `triton_dense.py` stream over it:
the dense head's FLOPs, all on tensor cores at the dense kernels' speed (the dense head alone runs
at 0.8x cut-cross-entropy at N 16384, V 50257, D 1024; this one at 0.85-0.98x, see the chunk
sizes). The backward takes each chunk's weight gradient dE[a:b] (fp32, from the same kernel launch
that adds into dh) back onto the cores: two GEMMs for the last core's contraction, autograd for
the (small) prefix of the other cores.

Forward: per chunk, `lce_forward` gives (lse, target logit) over the chunk's columns; the chunks'
log-sum-exps combine with logaddexp (an online log-sum-exp over chunks); targets are shifted by the
chunk's first row, so one that lies elsewhere never matches a column.

Memory: one chunk at a time: E[a:b] in the compute dtype, and in the backward fp32 dE[a:b] and one
regrouped copy of it (rows x D x 4 bytes each, rows <= `*_CHUNK_ELEMENTS` / D and never more than
half the vocab once it exceeds one tile or last-core block): no N x V or V x D tensor at any N.
Beyond that only dh's fp32 accumulators (N x D x 4), as in the dense head, and a few N-vectors.
No host sync. Float atomics make dh and the core gradients vary between runs in the last bits
(`triton_tt.py` has the deterministic variant).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from muse_lm.ops._dispatch import compile_boundary
from muse_lm.ops.tt_cross_entropy.reference import _reduce, _token_weights, combine_lse_partials
from muse_lm.ops.tt_cross_entropy.triton_dense import (
    LCEConfig,
    _dh_accumulators,
    _dot_f32,
    _finish_dh,
    _resolve_config,
    launch_backward,
    lce_forward_partials,
)
from muse_lm.ops.tt_embedding.reference import partial_rows, tt_reconstruct_ref

# Table elements per rebuilt chunk. The forward holds one chunk in the compute dtype; the backward
# holds a chunk's fp32 dE and one regrouped copy of it (`_chunk_core_grads`), so it takes smaller
# chunks. On an H100 (N 16384, V 50257, D 1024, bf16, bench_htt.py --parts head): with the old
# autograd-through-the-rebuild backward, 2**23-element chunks in both passes took 26.2 ms fwd+bwd
# with 217 MiB peak and 2**21-element backward chunks 27.6-34.1 ms (host-bound: 25 chunks) with
# 107 MiB (cut-cross-entropy: 30.6 ms, 131 MiB). 6 * 2**20 keeps the modelled peak near 115 MiB:
# the dh accumulators (64 MiB, the 16-bit dh among them) + 2 x 4 bytes x 6.1M.
FORWARD_CHUNK_ELEMENTS = 1 << 23
BACKWARD_CHUNK_ELEMENTS = 6 << 20


def chunk_bounds(vocab_size: int, width: int, unit: int,
                 chunk_elements: int = FORWARD_CHUNK_ELEMENTS) -> list[tuple[int, int]]:
    """[start, stop) vocab row ranges rebuilt one at a time: multiples of `unit` rows, at most
    `chunk_elements` / width rows unless one unit is more, and at most half the vocab (rounded up to a
    unit) when the vocab spans more than one unit, so the whole table never exists at once.

    The forward's unit is the kernel's block_v (whole tiles); the backward's the last core's v rows
    (whole blocks, so each chunk's core gradients are two GEMMs, `_chunk_core_grads`; the kernel masks
    a chunk's partial last tile)."""
    rows = max(unit, chunk_elements // max(width, 1) // unit * unit)
    if vocab_size > unit:
        rows = min(rows, math.ceil(vocab_size / 2 / unit) * unit)
    return [(start, min(start + rows, vocab_size)) for start in range(0, vocab_size, rows)]


def _chunk_core_grads(masters: Sequence[Tensor], start: int, stop: int, d_rows: Tensor) -> list[Tensor]:
    """fp32 gradients of the cores (`masters`, fp32 leaves) from dL/dE[start:stop] `[rows, D]` fp32, for
    whole blocks of the last core (start and stop multiples of its v rows).

    E[(m, v), (p, c)] = sum_r prefix[m, p, r] last[v, r, c] (prefix: rows of cores 1..K-1), so both
    gradients of the last contraction are one GEMM each on one regrouped copy of dE; the prefix's
    gradient goes back through autograd (its tensors are v_last times smaller than the chunk).
    """
    last = masters[-1]
    v, r, d_last, _ = last.shape
    m = (stop - start) // v
    with torch.enable_grad(), torch.autocast(d_rows.device.type, enabled=False):  # fp32 GEMMs under autocast too
        prefix = partial_rows(masters[:-1], start // v, stop // v)  # [m, P, r]
        p = prefix.shape[1]
        regrouped = d_rows.view(m, v, p, d_last).transpose(1, 2).reshape(m * p, v * d_last)
        last_flat = last.detach()[..., 0].transpose(0, 1).reshape(r, v * d_last)  # [r, (v, c)]
        d_prefix = (regrouped @ last_flat.T).view(m, p, r)
        d_last = (prefix.detach().reshape(m * p, r).T @ regrouped).view(r, v, d_last, 1).transpose(0, 1)
        return [*torch.autograd.grad(prefix, masters[:-1], d_prefix), d_last]


def _rebuild(cores: Sequence[Tensor], start: int, stop: int, dtype: torch.dtype) -> Tensor:
    """E[start:stop] `[rows, D]` in `dtype`, contiguous (autocast off: the dtype is chosen here)."""
    with torch.autocast(cores[0].device.type, enabled=False):
        return tt_reconstruct_ref([c.to(dtype) for c in cores], start, stop).contiguous()


def tt_chunked_forward(
    h: Tensor, cores: Sequence[Tensor], targets: Tensor, vocab_size: int, config: LCEConfig | None = None,
    chunk_elements: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(lse `[N]`, target logit `[N]`), fp32, of h `[N, D]` against E[:vocab_size] (never whole).
    `chunk_elements` overrides FORWARD_CHUNK_ELEMENTS (tests force several chunks with it)."""
    n, d = h.shape
    if n == 0:
        empty = torch.zeros(0, device=h.device, dtype=torch.float32)
        return empty, empty.clone()
    cfg = _resolve_config(config, h, _dot_f32(h, h))
    cores = [c.to(h.dtype) for c in cores]
    # Partials of every chunk, finished once at the end: per chunk only the rebuild and one launch,
    # so the loop stays GPU-bound (with a combine per chunk, 2**21-element chunks were host-bound).
    parts = []
    for start, stop in chunk_bounds(vocab_size, d, cfg.block_v, chunk_elements or FORWARD_CHUNK_ELEMENTS):
        parts.append(lce_forward_partials(h, _rebuild(cores, start, stop, h.dtype), targets - start, cfg))
    m, s, tgt = (torch.cat(p) for p in zip(*parts))
    return combine_lse_partials(m, s), tgt.sum(dim=0)


def tt_chunked_backward(
    h: Tensor, cores: Sequence[Tensor], targets: Tensor, lse: Tensor, token_grad: Tensor, z_loss: float,
    vocab_size: int, config: LCEConfig | None = None, chunk_elements: int | None = None, *,
    need_h: bool = True, need_cores: bool = True,
) -> tuple[Tensor | None, list[Tensor] | None]:
    """(dL/dh in h's dtype, [dL/dcore_k in core k's dtype]); None where not needed.

    token_grad `[N]` fp32 is dL/dloss_i (0 for ignored tokens). Per chunk (`chunk_bounds` in last-core blocks):
    the rows rebuilt in the compute dtype as the forward did, one kernel launch that adds into the
    shared fp32 dh accumulators and fills the chunk's fp32 dE, then two GEMMs that map dE onto fp32
    core gradients (`_chunk_core_grads`; summed over chunks, cast at the end). A chunk's buffers:
    its 16-bit rows and fp32 dE, then dE and one regrouped copy (2 x 4 bytes a table element).
    """
    n, d = h.shape
    cfg = _resolve_config(config, h, _dot_f32(h, h))
    token_grad = token_grad.to(torch.float32).contiguous()
    lse = lse.to(torch.float32).contiguous()
    coef = token_grad * (1 + 2 * z_loss * lse)  # softmax scale; 0 for ignored rows
    dh = _dh_accumulators(n, d, h) if need_h else (coef, coef, n)
    if n == 0:  # no tokens: zero gradients, no launch
        return (torch.zeros_like(h) if need_h else None), ([torch.zeros_like(c) for c in cores] if need_cores else None)
    masters = [c.detach().float().requires_grad_() for c in cores] if need_cores else None
    grads = [torch.zeros_like(m) for m in masters] if need_cores else None
    low = [c.to(h.dtype) for c in cores]  # cast once, not per chunk
    v_last, table_rows = cores[-1].shape[0], math.prod(c.shape[0] for c in cores)
    for start, stop in chunk_bounds(vocab_size, d, v_last, chunk_elements or BACKWARD_CHUNK_ELEMENTS):
        # Whole last-core blocks: the last chunk runs on into the table's padding rows (dE 0 there).
        end = min(math.ceil(stop / v_last) * v_last, table_rows) if need_cores else stop
        rows = _rebuild(low, start, end, h.dtype)
        d_rows = torch.zeros(end - start, d, device=h.device, dtype=torch.float32) if need_cores else coef
        launch_backward(h, rows, targets - start, lse, coef, token_grad, dh, d_rows, (0, stop - start), cfg,
                        need_h=need_h, need_w=need_cores)
        del rows  # before the gradient GEMMs' buffers
        if need_cores:
            for total, part in zip(grads, _chunk_core_grads(masters, start, end, d_rows)):
                total += part
        del d_rows  # before the next chunk's buffers
    dh_out = _finish_dh(*dh[:2], n, d, h.dtype) if need_h else None
    return dh_out, ([g.to(c.dtype) for g, c in zip(grads, cores)] if need_cores else None)


class TTChunkedCrossEntropy(torch.autograd.Function):
    """Loss of `h @ TT(cores)[:V].T`; saves h, targets, lse `[N]` and the cores."""

    @staticmethod
    def forward(ctx, h, targets, vocab_size, ignore_index, reduction, z_loss, config, chunk_elements, *cores):
        lse, target_logit = tt_chunked_forward(h, cores, targets, vocab_size, config, chunk_elements)
        valid = targets != ignore_index
        per_token = torch.where(valid, lse - target_logit + z_loss * lse.square(), torch.zeros_like(lse))
        ctx.save_for_backward(h, targets, lse, *cores)
        ctx.args = (vocab_size, ignore_index, reduction, z_loss, config, chunk_elements)
        return _reduce(per_token, valid, reduction)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        h, targets, lse, *cores = ctx.saved_tensors
        vocab_size, ignore_index, reduction, z_loss, config, chunk_elements = ctx.args
        token_grad = _token_weights(grad_out.to(torch.float32), targets != ignore_index, reduction)
        need_h, need_cores = ctx.needs_input_grad[0], any(ctx.needs_input_grad[8:])
        dh, dcores = tt_chunked_backward(h, cores, targets, lse, token_grad, z_loss, vocab_size, config,
                                         chunk_elements, need_h=need_h, need_cores=need_cores)
        dcores = dcores or [None] * len(cores)
        dcores = [g if want else None for g, want in zip(dcores, ctx.needs_input_grad[8:])]
        return (dh, None, None, None, None, None, None, None, *dcores)


@compile_boundary
def tt_linear_cross_entropy_chunked(
    h: Tensor,
    cores: Sequence[Tensor],
    targets: Tensor,
    *,
    vocab_size: int,
    ignore_index: int,
    reduction: str,
    z_loss: float,
    config: LCEConfig | None = None,
    chunk_elements: int | None = None,
) -> Tensor:
    """Tied TT head loss through the dense kernels over rebuilt vocab chunks (module docstring).

    Arguments are validated by the public `tt_linear_cross_entropy`; h `[N, D]`, targets `[N]`, and
    h and the cores in one floating dtype (the caller autocasts). Returns the fp32 loss (a scalar,
    or `[N]` for reduction "none"); gradients come back in the inputs' dtypes.
    """
    if h.ndim != 2 or targets.shape != h.shape[:1]:
        raise ValueError(f"tt_linear_cross_entropy_chunked: need h [N, D] and targets [N]; got "
                         f"{tuple(h.shape)} and {tuple(targets.shape)} (flatten leading dims first)")
    return TTChunkedCrossEntropy.apply(h.contiguous(), targets.contiguous(), vocab_size, ignore_index, reduction,
                                       float(z_loss), config, chunk_elements, *cores)
