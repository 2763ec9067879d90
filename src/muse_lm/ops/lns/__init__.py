"""LNS (logarithmic number system) values and matmul: validate -> dispatch -> reference / Triton.

A value is (sign int8 in {-1, 0, +1}, log2|x|) with float32 logs or int32 fixed-point logs with
F fractional bits (`format.py`). `lns_matmul` sums signed products in one of three ways
(`reference.py` has the math): `exact` (range), `max_log` (the cheap approximation, for
comparison) and `datapath` (bit-accurate LNS hardware, as the xlns package adds).
"""

from __future__ import annotations

import torch
from torch import Tensor

from muse_lm.ops._dispatch import resolve_impl
from muse_lm.ops.lns.format import LOG_INF, LOG_ZERO, check_frac_bits, check_pair, from_lns, to_lns
from muse_lm.ops.lns.gemm import exact_scaled_gemm
from muse_lm.ops.lns.reference import datapath_reference, exact_finish, exact_reference, max_log_reference

__all__ = ["LOG_INF", "LOG_ZERO", "MODES", "from_lns", "lns_matmul", "to_lns"]

MODES = ("exact", "max_log", "datapath")
_TRITON_DATAPATH_F = range(1, 13)
Pair = tuple[Tensor, Tensor]


def _check_infinite(op: str, name: str, sign: Tensor, log: Tensor) -> None:
    bad = (sign != 0) & ((log == LOG_INF) if log.dtype == torch.int32 else torch.isinf(log) & (log > 0))
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0].tolist())
        raise ValueError(
            f"{op}: {name} has an infinite value at index {where}; lns_matmul needs finite operands "
            "(inf - inf has no value): clamp or mask them first"
        )


def _as_pair(op: str, name: str, x: object, frac_bits: int | None) -> Pair:
    """A float tensor encoded with to_lns, or a validated (sign, log) pair."""
    if isinstance(x, Tensor):
        pair = to_lns(x, frac_bits)
    elif isinstance(x, (tuple, list)) and len(x) == 2:
        pair = (x[0], x[1])
        check_pair(op, name, *pair, frac_bits)
    else:
        raise ValueError(f"{op}: {name} must be a float tensor or a (sign, log2abs) pair, got {type(x).__name__}")
    if pair[0].ndim != 2:
        raise ValueError(f"{op}: {name} must be 2-D, got shape {tuple(pair[0].shape)}")
    _check_infinite(op, name, *pair)
    return pair


def _float_logs(pair: Pair, frac_bits: int | None) -> Pair:
    """Fixed-point logs to float64 (zeros keep their sign 0; the log is then ignored)."""
    sign, log = pair
    if frac_bits is None:
        return sign, log
    return sign, torch.where(sign != 0, log.double() * 2.0**-frac_bits, float("-inf"))


def _encode_out(op: str, sign: Tensor, log: Tensor, frac_bits: int | None) -> Pair:
    """Float64 (or int64) result logs to the output format: float32, or int32 with F bits."""
    if frac_bits is None:
        return sign, log.float()
    fixed = log if not log.is_floating_point() else torch.round(torch.where(sign != 0, log, 0.0) * 2.0**frac_bits)
    fixed = torch.where(sign != 0, fixed, 0)
    if bool((fixed.abs() >= LOG_INF).any()):
        raise ValueError(f"{op}: a result's log does not fit int32 with frac_bits={frac_bits}; use fewer bits")
    return sign, torch.where(sign != 0, fixed.long(), LOG_ZERO).to(torch.int32)


def _exact(a: Pair, b: Pair, impl: str) -> Pair:
    if impl == "torch":
        return exact_reference(a, b)
    # The fast path is a scaled cuBLAS GEMM, not a Triton kernel (see gemm.py for why). Fixed-point
    # logs arrive as float64 (`_float_logs`) and keep float64 through the finish: F up to 23 bits.
    acc, row, col = exact_scaled_gemm(a, b)
    return exact_finish(acc.to(a[1].dtype), row, col, a, b)


def _max_log(a: Pair, b: Pair, impl: str) -> Pair:
    if impl == "torch":
        return max_log_reference(a, b)
    from muse_lm.ops.lns.triton import max_log_triton

    return max_log_triton(a, b)


def _datapath(a: Pair, b: Pair, frac_bits: int, impl: str) -> Pair:
    if impl == "torch":
        return datapath_reference(a, b, frac_bits)
    from muse_lm.ops.lns.triton import datapath_triton

    return datapath_triton(a, b, frac_bits)


def lns_matmul(
    a: Tensor | Pair, b: Tensor | Pair, *, mode: str = "exact", frac_bits: int | None = None, impl: str | None = None
) -> Tensor | Pair:
    """C = A @ B summed in LNS arithmetic.

    Args:
        a, b: float tensors [M,K] and [K,N] (encoded with `to_lns(x, frac_bits)`), or LNS pairs
            (sign int8, log) of those shapes: float32 logs when frac_bits is None, else int32
            fixed-point logs with frac_bits fractional bits. Infinite or NaN entries raise.
        mode:
            "exact": sum_k a_ik b_kj with every term and the result far outside the float range
                (log2 magnitudes of +-250 and beyond) held exactly up to the precision of the logs
                (float32 logs: relative 2^-24 |log2| ln 2 of the largest term) and of the
                summation (one IEEE fp32 GEMM of the power-of-two-scaled operands: ~1e-6 of the sum
                of |terms|; float64 K-tiles on the reference).
                Outputs whose scaled sum underflows are recomputed term by term (range guard).
            "max_log": log-add ~ max: each output is its largest-magnitude term (sign: + when the
                largest positive term is at least the largest negative one). Errors of 5-30 %
                on dense data: a comparison, not a tool.
            "datapath": a bit-accurate LNS accumulator: int32 fixed-point logs with F = frac_bits
                (required) fractional bits, summed in k order through sb/db tables rounded as
                the xlns package rounds them; equal bit for bit to xlns's left-to-right sums
                (`sum(xlns products)` at xlnssetF(F)). Triton for F in 1..12; any F on the torch
                reference (e.g. F = 23, xlns's default).
        frac_bits: None or F (see above); datapath needs it.
        impl: None | "torch" | "triton" (`_dispatch.resolve_impl`). "triton" is the GPU path: Triton
            kernels for max_log and datapath; for exact, the scaled cuBLAS GEMM of `gemm.py`.
    Returns:
        Float inputs: [M,N] in their promoted dtype; results beyond that dtype's range become +-inf
        (or 0): only the float conversion overflows, the LNS pair out does not.
        Pair inputs: (sign [M,N] int8, log [M,N]) in the input log format (0: sign 0 and -inf or
        LOG_ZERO).
    Example:
        >>> a = torch.tensor([[1e30, 1e-30]]); b = torch.tensor([[1e-30], [1e30]])
        >>> lns_matmul(a, b)  # the naive scaled sum would underflow to 0
        tensor([[2.]])
    """
    op = "lns_matmul"
    if mode not in MODES:
        raise ValueError(f"{op}: mode={mode!r} must be one of {MODES}")
    check_frac_bits(op, frac_bits)
    if mode == "datapath" and frac_bits is None:
        raise ValueError(f"{op}: mode='datapath' needs frac_bits (the F of the fixed-point logs, e.g. 8 or 23)")
    floats = isinstance(a, Tensor)
    if floats != isinstance(b, Tensor):
        raise ValueError(f"{op}: a and b must both be float tensors or both be (sign, log) pairs")
    pa, pb = _as_pair(op, "a", a, frac_bits), _as_pair(op, "b", b, frac_bits)
    if pa[0].shape[1] != pb[0].shape[0] or pa[0].device != pb[0].device:
        raise ValueError(
            f"{op}: a {tuple(pa[0].shape)} on {pa[0].device} and b {tuple(pb[0].shape)} on {pb[0].device} do not "
            "multiply: need [M,K] @ [K,N] on one device"
        )
    # max_log's kernel adds logs in fp32; fixed-point logs need their exact integer sums, so they
    # run on the float64 reference (like fp64 inputs of the other ops).
    has_kernel = {"exact": True, "max_log": frac_bits is None, "datapath": frac_bits in _TRITON_DATAPATH_F}[mode]
    if impl == "triton" and not has_kernel:
        why = ("the Triton datapath kernel supports frac_bits 1..12" if mode == "datapath" else
               "the Triton max_log kernel adds float32 logs, not fixed-point ones")
        raise NotImplementedError(f"{op}: {why}, got frac_bits={frac_bits}; pass impl='torch' (or impl=None)")
    chosen = resolve_impl(op, impl, pa[0], pb[0], has_triton_kernel=has_kernel)
    m_dim, n_dim = pa[0].shape[0], pb[0].shape[1]
    if pa[0].shape[1] == 0:  # an empty sum is 0
        sign = torch.zeros(m_dim, n_dim, dtype=torch.int8, device=pa[0].device)
        log = torch.full((m_dim, n_dim), float("-inf"), dtype=torch.float64, device=pa[0].device)
    elif mode == "datapath":
        sign, log = _datapath(pa, pb, frac_bits, chosen)
    else:
        run = _exact if mode == "exact" else _max_log
        sign, log = run(_float_logs(pa, frac_bits), _float_logs(pb, frac_bits), chosen)
    if not floats:
        return _encode_out(op, sign, log, frac_bits)
    out_dtype = torch.promote_types(a.dtype, b.dtype)
    if mode == "datapath":
        log = torch.where(sign != 0, log.double() * 2.0**-frac_bits, float("-inf"))
    return from_lns(sign, log.double(), None, out_dtype)
