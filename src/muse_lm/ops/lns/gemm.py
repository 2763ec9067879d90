"""The `exact` mode's fast path: power-of-two scaling, then one ordinary fp32 GEMM.

Every term a_ik b_kj is bounded by 2^(row_i + col_j), row_i = ceil(max_k log2|a_ik|) and
col_j = ceil(max_k log2|b_kj|). Scaling A's rows by 2^-row and B's columns by 2^-col (exact: powers
of two) turns the operands into plain floats in [-1, 1], so the whole sum is one matmul, which
cuBLAS does faster than a fused kernel of ours could (the H100 measurement is in
benchmarks/results/lns.json). The scales go back on in log space (`reference.exact_finish`), with the
range guard for the outputs whose scaled sum underflowed. Entries more than 2^-149 below their
row's (column's) maximum flush to zero here; they can only matter for outputs whose large terms
cancel, and exactly those fall under the guard and are recomputed term by term.

The GEMM runs in IEEE fp32 whatever the global TF32 setting says: TF32's 2^-11 rounding would cost
~1e-3 relative, far above this mode's 1e-5 promise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["exact_scaled_gemm", "ieee_fp32_matmul"]


@contextlib.contextmanager
def ieee_fp32_matmul() -> Iterator[None]:
    """fp32 matmuls in full IEEE precision (no TF32) inside the block; the setting is restored after."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _scaled(sign: Tensor, log: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """(sign * 2^(log - scale) fp32, scale) with scale = ceil(max over `dim` of the nonzero logs)
    (-inf for an all-zero row / column, whose scaled values are then all 0)."""
    log = torch.where(sign != 0, log, float("-inf"))
    scale = torch.ceil(log.amax(dim, keepdim=True))
    safe = torch.where(torch.isfinite(scale), scale, 0.0)
    # The integer scale comes off in the logs' own dtype (float64 for fixed-point logs, whose
    # magnitudes can need more than fp32's 24 bits), then the exponent in [-inf, 0] goes to fp32.
    return log.sub_(safe).float().exp2_().mul_(sign), scale.squeeze(dim)


def exact_scaled_gemm(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Scaled sums of the exact mode: (acc [M,N], row [M], col [N]) fp32, sum_k a b = acc * 2^(row + col).

    Args: a = (sign [M,K] int8, log [M,K] float), b = (sign [K,N] int8, log [K,N] float), K >= 1.
    Extra memory: fp32 copies of both operands.
    """
    sa, la = a
    sb, lb = b
    if la.ndim != 2 or lb.ndim != 2 or la.shape[1] != lb.shape[0] or la.shape[1] == 0:
        raise ValueError(
            f"lns_matmul: need a [M,K] and b [K,N] with K >= 1, got {tuple(la.shape)} and {tuple(lb.shape)}"
        )
    scaled_a, row = _scaled(sa, la, 1)
    scaled_b, col = _scaled(sb, lb, 0)
    with ieee_fp32_matmul():
        acc = scaled_a @ scaled_b
    return acc, row, col
