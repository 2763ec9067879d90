"""The LNS value format: a value is (sign, log2|x|), sign int8 in {-1, 0, +1}.

log2|x| is float32 (`frac_bits=None`) or int32 fixed point with F fractional bits (what LNS
hardware stores: the integer l stands for log2|x| = l / 2^F). The sign is authoritative: sign 0
means zero whatever the log says. Special values:

    value    sign    float log    fixed-point log
    0        0       -inf         LOG_ZERO (int32 min)
    +-inf    +-1     +inf         LOG_INF  (int32 max)
    NaN      -- raises ValueError (NaN has no LNS encoding) --

Fixed point is exact base 2: l = round(log2|x| * 2^F). (The xlns package encodes in its float64
base 2.0 ** 2^-F, whose log is slightly off: at F <= 12 the two agree but for
rare near-ties, at F = 23 they can differ by one unit. Its *additions* are matched bit for bit by the datapath.)

Denormals are encoded exactly: log2|x| = e + log2(m) from frexp (m in [0.5, 1)), in float64,
so nothing is flushed to zero on the way in.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["LOG_INF", "LOG_ZERO", "MAX_FRAC_BITS", "check_frac_bits", "check_pair", "from_lns", "to_lns"]

LOG_ZERO = -(2**31)  # int32 log of 0 (the sentinel; the sign is 0 too)
LOG_INF = 2**31 - 1  # int32 log of +-inf
MAX_FRAC_BITS = 30  # 2^30 * log2 still leaves |log2| < 2 representable in int32
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_frac_bits(op: str, frac_bits: object) -> None:
    """frac_bits must be None or an int in [0, MAX_FRAC_BITS]."""
    if frac_bits is None:
        return
    if isinstance(frac_bits, bool) or not isinstance(frac_bits, int) or not 0 <= frac_bits <= MAX_FRAC_BITS:
        raise ValueError(
            f"{op}: frac_bits={frac_bits!r} must be None (float32 logs) or an int in [0, {MAX_FRAC_BITS}] "
            "(fractional bits of the int32 fixed-point log)"
        )


def _first_index(mask: Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero()[0].tolist())


def _raise_nan(op: str, name: str, mask: Tensor, why: str) -> None:
    if bool(mask.any()):
        raise ValueError(
            f"{op}: {name} has NaN at index {_first_index(mask)} ({int(mask.sum())} NaNs in all); {why}"
        )


def to_lns(x: Tensor, frac_bits: int | None = None) -> tuple[Tensor, Tensor]:
    """Encodes x as (sign, log2|x|).

    Args:
        x: any shape, float16/bfloat16/float32/float64. NaN raises ValueError (with its index).
        frac_bits: None for float32 logs, else F: int32 logs round(log2|x| * 2^F) (round half to
            even, from the float64 log2).
    Returns:
        sign: int8, x's shape, in {-1, 0, +1}.
        log2abs: float32 (-inf for 0, +inf for +-inf) or int32 (LOG_ZERO for 0, LOG_INF for +-inf).
    Raises:
        ValueError: NaN in x, or a log that does not fit int32 at this F (lower frac_bits).
    Example:
        >>> to_lns(torch.tensor([-8.0, 0.0, 0.5]))
        (tensor([-1,  0,  1], dtype=torch.int8), tensor([ 3., -inf, -1.]))
    """
    op = "to_lns"
    if not isinstance(x, Tensor) or x.dtype not in _FLOAT_DTYPES:
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{op}: x must be a float tensor (float16/bfloat16/float32/float64), got {got}")
    check_frac_bits(op, frac_bits)
    _raise_nan(op, "x", torch.isnan(x), "NaN has no LNS encoding: replace or mask it first")
    sign = torch.sign(x).to(torch.int8)
    mag = x.abs().double()
    # frexp keeps denormals exact: mag = m * 2^e with m in [0.5, 1) even below float32's normal range.
    m, e = torch.frexp(mag)
    log = e.double() + torch.log2(m)
    zero, inf = mag == 0, torch.isinf(mag)
    if frac_bits is None:
        log = torch.where(zero, float("-inf"), torch.where(inf, float("inf"), log))
        return sign, log.float()
    fixed = torch.round(torch.where(zero | inf, 0.0, log) * 2.0**frac_bits)
    too_big = fixed.abs() >= LOG_INF
    if bool(too_big.any()):
        raise ValueError(
            f"{op}: |log2 x| = {float(log[too_big].abs().max()):.1f} at index {_first_index(too_big)} does not fit "
            f"int32 with frac_bits={frac_bits}; use fewer fractional bits"
        )
    fixed = torch.where(zero, LOG_ZERO, torch.where(inf, LOG_INF, fixed.long()))
    return sign, fixed.to(torch.int32)


def check_pair(op: str, name: str, sign: object, log: object, frac_bits: int | None) -> None:
    """Validates an LNS pair: int8 sign in {-1,0,1}, log of the same shape, float32/float64 logs
    without NaN (frac_bits None) or int32 logs (fixed point)."""
    if not isinstance(sign, Tensor) or not isinstance(log, Tensor):
        raise ValueError(f"{op}: {name} must be a pair (sign, log2abs) of tensors")
    if sign.dtype != torch.int8:
        raise ValueError(f"{op}: {name} sign has dtype {sign.dtype}; expected int8 in {{-1, 0, 1}} (from to_lns)")
    if sign.shape != log.shape or sign.device != log.device:
        raise ValueError(
            f"{op}: {name} sign {tuple(sign.shape)} on {sign.device} and log {tuple(log.shape)} on {log.device} "
            "must have the same shape and device"
        )
    want = (torch.float32, torch.float64) if frac_bits is None else (torch.int32,)
    if log.dtype not in want:
        kind = "float32 (frac_bits=None)" if frac_bits is None else f"int32 (frac_bits={frac_bits})"
        raise ValueError(f"{op}: {name} log has dtype {log.dtype}; expected {kind}; encode with to_lns")
    if sign.numel() and bool((sign.abs() > 1).any()):
        raise ValueError(f"{op}: {name} sign has values outside {{-1, 0, 1}}")
    if frac_bits is None:
        _raise_nan(op, f"{name} log", torch.isnan(log) & (sign != 0), "NaN logs have no value")


def from_lns(
    sign: Tensor, log2abs: Tensor, frac_bits: int | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Decodes (sign, log2|x|) to floats: sign * 2^log2abs, computed in float64, then cast.

    Args:
        sign: int8 in {-1, 0, +1}; 0 decodes to 0 whatever the log.
        log2abs: same shape; float32/float64 (frac_bits None) or int32 fixed point with F bits
            (LOG_ZERO decodes to 0, LOG_INF to +-inf).
        dtype: output float dtype. Values beyond its range become +-inf (and tiny ones 0): the
            float range is the only limit; the LNS pair itself holds them exactly.
    Returns:
        [same shape] tensor of `dtype`.
    """
    op = "from_lns"
    check_frac_bits(op, frac_bits)
    check_pair(op, "(sign, log2abs)", sign, log2abs, frac_bits)
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{op}: dtype={dtype} must be a float dtype")
    if frac_bits is None:
        log = log2abs.double()
    else:
        log = log2abs.double() * 2.0**-frac_bits
        log = torch.where(log2abs == LOG_ZERO, float("-inf"), torch.where(log2abs == LOG_INF, float("inf"), log))
    value = sign.double() * torch.exp2(log)
    return torch.where(sign == 0, 0.0, value).to(dtype)
