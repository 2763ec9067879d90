"""Torch references for `lns_matmul` on LNS pairs (blocked, bounded memory, CPU-safe).

All three take a = (sa [M,K] int8, la [M,K] logs) and b = (sb [K,N], lb [K,N]) and return
(sign [M,N] int8, log [M,N]). A zero entry (sign 0) contributes nothing whatever its log.

- `exact`: C = sum_k sa sb 2^(la + lb) exactly up to rounding. Per K-tile, every term is bounded
  by 2^(R_m + C_n) with R_m = ceil(max_k la) and C_n = ceil(max_k lb) (running maxima, carried
  in log space; integer so that rescaling by 2^(old - new) is exact), so the tile is an ordinary
  matmul of values in [-1, 1]. An output whose scaled |sum| ends below 2^GUARD_LOG2 of its bound
  may have lost its terms to underflow ([[1e30, 1e-30]] @ [[1e-30], [1e30]]): it is recomputed
  term by term against its own largest term (`exact_per_term`).
- `max_log`: log-add ~ max. Rule: the output is the largest-magnitude term, i.e. log = max_k
  (la + lb) over nonzero terms, and its sign is + if the largest positive term is at least as
  large as the largest negative one, else - (an exact tie of opposite signs counts as +).
- `datapath`: see `gauss_log` and `datapath_reference`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from muse_lm.ops.lns.format import LOG_ZERO

__all__ = [
    "GUARD_LOG2",
    "datapath_reference",
    "exact_finish",
    "exact_per_term",
    "exact_reference",
    "gauss_log",
    "gauss_table",
    "max_log_reference",
]

GUARD_LOG2 = -90.0  # outputs below 2^-90 of their bound are recomputed term by term
_CHUNK = 2**22  # elements per temporary in the chunked paths (32 MB in float64)
_NEG_INF = float("-inf")


def _masked_logs(sign: Tensor, log: Tensor) -> Tensor:
    """float64 logs with zeros (sign 0) at -inf."""
    return torch.where(sign != 0, log.double(), _NEG_INF)


def _finite_or_zero(x: Tensor) -> Tensor:
    return torch.where(torch.isfinite(x), x, 0.0)


def exact_per_term(
    sa: Tensor, la: Tensor, sb: Tensor, lb: Tensor, rows: Tensor, cols: Tensor
) -> tuple[Tensor, Tensor]:
    """The exact path for the outputs (rows[i], cols[i]): each output's K terms are scaled by its
    own largest term and summed in float64. Returns (sign [P] int8, log [P] float64)."""
    k_dim = la.shape[1]
    signs, logs = [], []
    step = max(1, _CHUNK // max(k_dim, 1))
    for i in range(0, rows.numel(), step):
        r, c = rows[i : i + step], cols[i : i + step]
        s = sa[r].to(torch.int32) * sb[:, c].T.to(torch.int32)  # [P,K]
        lt = torch.where(s != 0, la[r].double() + lb[:, c].T.double(), _NEG_INF)
        top = _finite_or_zero(lt.amax(1))
        total = (s.double() * torch.exp2(lt - top[:, None])).sum(1)
        signs.append(torch.sign(total).to(torch.int8))
        logs.append(torch.where(total == 0, _NEG_INF, top + torch.log2(total.abs())))
    if not signs:
        return sa.new_zeros(0), la.new_zeros(0, dtype=torch.float64)
    return torch.cat(signs), torch.cat(logs)


def exact_finish(
    acc: Tensor, row_scale: Tensor, col_scale: Tensor, a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor]:
    """From the scaled sums acc [M,N] (value = acc * 2^(row_scale[m] + col_scale[n])) to
    (sign [M,N] int8, log [M,N] in acc's dtype), with the range guard: outputs with |acc| <
    2^GUARD_LOG2 (and a finite bound) are recomputed by `exact_per_term`.

    Works in acc's dtype: float64 on the reference; float32 on the GPU path, whose float32 logs
    hold no more than that (the integer bound adds exactly, log2|acc| rounds once).
    """
    work = acc.dtype
    bound = row_scale.to(work)[:, None] + col_scale.to(work)[None, :]
    sign = torch.sign(acc).to(torch.int8)
    log = torch.where(acc == 0, _NEG_INF, _finite_or_zero(bound) + torch.log2(acc.abs()))
    # A row of A (or column of B) with no nonzero entry has bound -inf: its outputs are exactly 0.
    flag = (acc.abs() < 2.0**GUARD_LOG2) & torch.isfinite(bound)
    idx = flag.nonzero()
    if idx.numel():
        s, lg = exact_per_term(*a, *b, idx[:, 0], idx[:, 1])
        sign[idx[:, 0], idx[:, 1]] = s
        log[idx[:, 0], idx[:, 1]] = lg.to(work)
    return sign, log


def exact_reference(
    a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor], *, block_k: int = 256
) -> tuple[Tensor, Tensor]:
    """Exact sum of signed LNS products by scaled K-tiles (float64 tile matmuls), then the guard.

    Args: a = (sa [M,K] int8, la [M,K] float logs), b = (sb [K,N], lb [K,N]).
    Returns: (sign [M,N] int8, log2|C| [M,N] float64; -inf where C = 0).
    """
    sa, la = a
    sb, lb = b
    m_dim, k_dim = la.shape
    n_dim = lb.shape[1]
    la, lb = _masked_logs(sa, la), _masked_logs(sb, lb)
    acc = torch.zeros(m_dim, n_dim, dtype=torch.float64, device=la.device)
    row = torch.full((m_dim,), _NEG_INF, dtype=torch.float64, device=la.device)
    col = torch.full((n_dim,), _NEG_INF, dtype=torch.float64, device=la.device)
    for k0 in range(0, k_dim, block_k):
        ta, tb = la[:, k0 : k0 + block_k], lb[k0 : k0 + block_k]
        new_row = torch.maximum(row, torch.ceil(ta.amax(1)))
        new_col = torch.maximum(col, torch.ceil(tb.amax(0)))
        safe_row, safe_col = _finite_or_zero(new_row), _finite_or_zero(new_col)
        # Rescaling by an integer power of two is exact; exp2(-inf) = 0 for rows still empty.
        acc *= torch.exp2(row - safe_row)[:, None] * torch.exp2(col - safe_col)[None, :]
        scaled_a = sa[:, k0 : k0 + block_k].double() * torch.exp2(ta - safe_row[:, None])
        scaled_b = sb[k0 : k0 + block_k].double() * torch.exp2(tb - safe_col[None, :])
        acc += scaled_a @ scaled_b
        row, col = new_row, new_col
    return exact_finish(acc, row, col, (sa, la), (sb, lb))


def max_log_reference(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """log-add ~ max (see the module docstring for the sign rule), in row chunks.
    Returns (sign [M,N] int8, log [M,N] in la's float dtype or float64)."""
    sa, la = a
    sb, lb = b
    m_dim, k_dim = la.shape
    n_dim = lb.shape[1]
    la, lb = _masked_logs(sa, la), _masked_logs(sb, lb)
    sign = torch.zeros(m_dim, n_dim, dtype=torch.int8, device=la.device)
    log = torch.full((m_dim, n_dim), _NEG_INF, dtype=torch.float64, device=la.device)
    step = max(1, _CHUNK // max(k_dim * n_dim, 1))
    for m0 in range(0, m_dim, step):
        lt = la[m0 : m0 + step, :, None] + lb[None]  # [m,K,N]
        st = sa[m0 : m0 + step, :, None] * sb[None]
        pos = torch.where(st > 0, lt, _NEG_INF).amax(1)
        neg = torch.where(st < 0, lt, _NEG_INF).amax(1)
        top = torch.maximum(pos, neg)
        s = torch.where(pos >= neg, 1, -1)
        sign[m0 : m0 + step] = torch.where(top == _NEG_INF, 0, s).to(torch.int8)
        log[m0 : m0 + step] = top
    return sign, log


# ---- datapath: a bit-accurate LNS accumulator, as the xlns package adds --------------------------
#
# xlns (base B = 2^(2^-F)) adds x = (s_x, X) to y = (s_y, Y) (integer logs) as, with z = X - Y:
#   same signs:     Y + sb(z),  sb(z) = round(log_B(1 + B^z)) for z <= 0, sb(-z) + z for z > 0
#   opposite signs: Y + db(z),  db(z) = round(log_B|1 - B^z|) for z < 0, db(-z) + z for z > 0,
#                   zero for z = 0; the sign is that of the larger magnitude.
# with every log_B computed in float64 as ln(.) / ln(B) and rounded half to even (numpy's round).
# A sum x_1 + ... + x_K is folded left to right from x_1; zeros are skipped.


def _base(frac_bits: int) -> float:
    # Exactly xlns's global base: the float64 2.0 ** 2^-F (itself rounded), not 2^(2^-F) exactly.
    return 2.0 ** (2 ** (-frac_bits))


def gauss_log(d: np.ndarray, same_sign: bool, frac_bits: int) -> np.ndarray:
    """round(log_B(1 +- B^-d)) for integer d >= 0 (d >= 1 when not same_sign), as int64,
    evaluated in float64 the way xlns evaluates it (its sb/db for z = -d <= 0)."""
    base = _base(frac_bits)
    s = 0.0 if same_sign else 1.0
    z = -np.asarray(d, dtype=np.int64)
    with np.errstate(divide="ignore"):
        q = np.log(np.abs(1.0 - 2.0 * s + base ** np.minimum(-int(s), z))) / math.log(base)
    return np.round(q).astype(np.int64)


def gauss_table(same_sign: bool, frac_bits: int) -> np.ndarray:
    """gauss_log on d = 0 .. D-1 (int64), D the first d from which every entry is 0 (both sb and
    db decrease in magnitude with d, so the table's last entry, 0, holds for every larger d). The
    db table's entry 0 (a cancellation to exactly zero) is a placeholder the users mask."""
    size = (frac_bits + 4) << frac_bits  # sb, |db| < 1/2 once d > (F + log2(2/ln 2)) 2^F
    table = gauss_log(np.arange(size), same_sign, frac_bits) if same_sign else None
    if not same_sign:
        table = np.concatenate([[0], gauss_log(np.arange(1, size), False, frac_bits)])
    nonzero = np.flatnonzero(table[1:]) + 1
    end = int(nonzero[-1]) + 2 if nonzero.size else 2
    if end > size:
        raise AssertionError(f"gauss_table: F={frac_bits} needs more than {size} entries")
    return table[:end]


def datapath_reference(
    a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor], frac_bits: int
) -> tuple[Tensor, Tensor]:
    """Sequential LNS sums in k order with xlns's rounding, any frac_bits F (F = 23 is xlns's
    default); integer logs in int64, sb/db evaluated in float64 per step (numpy, on the CPU).

    Args: a = (sa [M,K] int8, la [M,K] int32 fixed-point logs), b = (sb [K,N], lb [K,N]).
    Returns: (sign [M,N] int8, log [M,N] int64; LOG_ZERO where the sum is 0).
    """
    sa, la = (t.cpu() for t in a)
    sb, lb = (t.cpu() for t in b)
    m_dim, k_dim = la.shape
    n_dim = lb.shape[1]
    acc_s = np.zeros((m_dim, n_dim), dtype=np.int64)
    acc_l = np.zeros((m_dim, n_dim), dtype=np.int64)
    sa_np, la_np = sa.numpy().astype(np.int64), la.numpy().astype(np.int64)
    sb_np, lb_np = sb.numpy().astype(np.int64), lb.numpy().astype(np.int64)
    for k in range(k_dim):
        t_s = sa_np[:, k, None] * sb_np[None, k, :]
        t_l = la_np[:, k, None] + lb_np[None, k, :]
        acc_s, acc_l = _lns_add(acc_s, acc_l, t_s, t_l, frac_bits)
    log = np.where(acc_s == 0, LOG_ZERO, acc_l)
    return torch.from_numpy(acc_s.astype(np.int8)).to(a[0].device), torch.from_numpy(log).to(a[0].device)


def _lns_add(acc_s, acc_l, t_s, t_l, frac_bits):
    """acc + t elementwise in xlns's arithmetic (numpy int64 arrays; sign 0 = zero)."""
    both = (acc_s != 0) & (t_s != 0)
    z = np.where(both, acc_l - t_l, 0)
    same = acc_s == t_s
    d = np.abs(z)
    corr = np.zeros_like(d)
    m_sb, m_db = both & same, both & ~same & (d > 0)
    corr[m_sb] = gauss_log(d[m_sb], True, frac_bits)
    corr[m_db] = gauss_log(d[m_db], False, frac_bits)
    new_l = np.where(z > 0, acc_l, t_l) + corr
    new_s = np.where(same | (z < 0), t_s, acc_s)
    new_s = np.where(both & ~same & (d == 0), 0, new_s)
    out_s = np.where(t_s == 0, acc_s, np.where(acc_s == 0, t_s, new_s))
    out_l = np.where(t_s == 0, acc_l, np.where(acc_s == 0, t_l, new_l))
    return out_s, np.where(out_s == 0, 0, out_l)
