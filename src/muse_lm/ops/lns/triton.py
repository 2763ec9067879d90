"""Triton kernels for `lns_matmul` on LNS pairs (the math is in `reference.py`). The `exact`
mode's GPU path is not a kernel of ours: it is a power-of-two-scaled fp32 GEMM (`gemm.py`).

- `max_log`: BK-deep slabs of the [BM, BK, BN] log sums, two running maxima (positive and
  negative terms) per output.
- `datapath`: int32 fixed-point logs, k in order, one LNS addition per k through the sb / db
  tables (`gauss_table`, built in float64 as xlns rounds them) gathered from global memory.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from muse_lm.ops._config import check_tiles, check_warps
from muse_lm.ops._dispatch import interpreter_enabled
from muse_lm.ops.lns.format import LOG_ZERO
from muse_lm.ops.lns.reference import gauss_table

__all__ = [
    "DATAPATH_CONFIGS",
    "DATAPATH_FRAC_BITS",
    "MAX_LOG_CONFIGS",
    "TileConfig",
    "datapath_triton",
    "max_log_triton",
]

DATAPATH_FRAC_BITS = tuple(range(1, 13))  # int32 logs and a table of at most 16 * 2^12 entries


@dataclass(frozen=True)
class TileConfig:
    """Launch shape: BM x BN outputs per program, BK of K per step (1: one k at a time)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int = 2

    def __post_init__(self):
        check_tiles(self, "block_m", "block_n", "block_k")
        check_warps(self)

    def smem_bytes(self) -> int:
        """Shared memory of the max_log / datapath kernel at this tile: the layout conversion of the
        fp32 [BM, BK, BN] term tile (BK = 1 for datapath). Equal to what Triton 3.6 allocates for
        sm_86 and sm_90 (checked by compiling every declared config in tests/ops/test_lns_triton.py)."""
        return 4 * self.block_m * self.block_n * self.block_k


# Declared once: the autotuner's search space on CUDA (pruned by the device's shared memory) and,
# each one, a test case under the interpreter and on the GPU.
MAX_LOG_CONFIGS = (TileConfig(32, 32, 8, 4), TileConfig(64, 64, 4, 8), TileConfig(16, 64, 8, 4))
DATAPATH_CONFIGS = (TileConfig(32, 32, 1, 4), TileConfig(64, 64, 1, 8), TileConfig(16, 32, 1, 2))


@functools.cache
def _max_shared_mem(device_index: int) -> int:
    props = triton.runtime.driver.active.utils.get_device_properties(device_index)
    return int(props["max_shared_mem"])


def _tile(c: triton.Config) -> TileConfig:
    return TileConfig(c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"], c.num_warps, c.num_stages)


def _fits_shared_memory(configs, named_args, **kwargs):
    """The configs whose tile fits the device's shared memory (99 KB on consumer cards); the
    smallest one if none does."""
    device = named_args["s_ptr"].device
    limit = _max_shared_mem(device.index if device.index is not None else torch.cuda.current_device())
    fit = [c for c in configs if _tile(c).smem_bytes() <= limit]
    return fit or [min(configs, key=lambda c: _tile(c).smem_bytes())]


def _triton_configs(configs) -> list[triton.Config]:
    return [
        triton.Config(
            {"BM": c.block_m, "BN": c.block_n, "BK": c.block_k}, num_warps=c.num_warps, num_stages=c.num_stages
        )
        for c in configs
    ]


# ---- max_log ---------------------------------------------------------------------------------------


@triton.jit
def _max_log_step(sa_ptr, la_ptr, sb_ptr, lb_ptr, k0, K, N, o_m, o_n, m_m, m_n, pos, neg, BK: tl.constexpr):
    o_k = k0 + tl.arange(0, BK)
    m_k = o_k < K
    p_a = o_m.to(tl.int64)[:, None] * K + o_k[None, :]
    p_b = o_k.to(tl.int64)[:, None] * N + o_n[None, :]
    m_a, m_b = m_m[:, None] & m_k[None, :], m_k[:, None] & m_n[None, :]
    s_a = tl.load(sa_ptr + p_a, mask=m_a, other=0).to(tl.int32)
    l_a = tl.load(la_ptr + p_a, mask=m_a, other=0.0).to(tl.float32)
    s_b = tl.load(sb_ptr + p_b, mask=m_b, other=0).to(tl.int32)
    l_b = tl.load(lb_ptr + p_b, mask=m_b, other=0.0).to(tl.float32)
    s_t = s_a[:, :, None] * s_b[None, :, :]  # [BM, BK, BN]
    l_t = l_a[:, :, None] + l_b[None, :, :]
    pos = tl.maximum(pos, tl.max(tl.where(s_t > 0, l_t, float("-inf")), axis=1))
    neg = tl.maximum(neg, tl.max(tl.where(s_t < 0, l_t, float("-inf")), axis=1))
    return pos, neg


@triton.jit
def _max_log_kernel(sa_ptr, la_ptr, sb_ptr, lb_ptr, s_ptr, l_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr,
                    BK: tl.constexpr, INTERPRET: tl.constexpr):
    """a, b LNS pairs (fp32 logs) -> the largest term per output: sign [M,N] int8, log [M,N] fp32."""
    i_m, i_n = tl.program_id(0), tl.program_id(1)
    o_m = i_m * BM + tl.arange(0, BM)
    o_n = i_n * BN + tl.arange(0, BN)
    m_m, m_n = o_m < M, o_n < N
    pos = tl.full([BM, BN], float("-inf"), tl.float32)
    neg = tl.full([BM, BN], float("-inf"), tl.float32)
    if INTERPRET:
        k0 = 0
        while k0 < K:
            pos, neg = _max_log_step(sa_ptr, la_ptr, sb_ptr, lb_ptr, k0, K, N, o_m, o_n, m_m, m_n, pos, neg, BK)
            k0 += BK
    else:
        for k0 in range(0, K, BK):
            pos, neg = _max_log_step(sa_ptr, la_ptr, sb_ptr, lb_ptr, k0, K, N, o_m, o_n, m_m, m_n, pos, neg, BK)
    top = tl.maximum(pos, neg)
    sign = tl.where(top == float("-inf"), 0, tl.where(pos >= neg, 1, -1))
    p_c = o_m.to(tl.int64)[:, None] * N + o_n[None, :]
    m_c = m_m[:, None] & m_n[None, :]
    tl.store(s_ptr + p_c, sign.to(tl.int8), mask=m_c)
    tl.store(l_ptr + p_c, top, mask=m_c)


_max_log_tuned = triton.autotune(configs=_triton_configs(MAX_LOG_CONFIGS), key=["M", "N", "K"],
                                 prune_configs_by={"early_config_prune": _fits_shared_memory})(_max_log_kernel)


# ---- datapath --------------------------------------------------------------------------------------

LOG_ZERO_I32: tl.constexpr = tl.constexpr(LOG_ZERO)


@triton.jit
def _lns_add(acc_s, acc_l, t_s, t_l, sb_ptr, db_ptr, SB_LEN, DB_LEN):
    """acc + t in xlns's arithmetic (int32 logs, sign 0 = zero; see reference.datapath)."""
    both = (acc_s != 0) & (t_s != 0)
    z = tl.where(both, acc_l - t_l, 0)
    d = tl.abs(z)
    same = acc_s == t_s
    corr_sb = tl.load(sb_ptr + tl.minimum(d, SB_LEN - 1), mask=both & same, other=0)
    corr_db = tl.load(db_ptr + tl.minimum(d, DB_LEN - 1), mask=both & (~same), other=0)
    new_l = tl.where(z > 0, acc_l, t_l) + tl.where(same, corr_sb, corr_db)
    new_s = tl.where(same | (z < 0), t_s, acc_s)
    new_s = tl.where(both & (~same) & (d == 0), 0, new_s)
    out_s = tl.where(t_s == 0, acc_s, tl.where(acc_s == 0, t_s, new_s))
    out_l = tl.where(t_s == 0, acc_l, tl.where(acc_s == 0, t_l, new_l))
    return out_s, tl.where(out_s == 0, 0, out_l)


@triton.jit
def _datapath_kernel(sa_ptr, la_ptr, sb_ptr, lb_ptr, tsb_ptr, tdb_ptr, s_ptr, l_ptr, M, N, K, SB_LEN, DB_LEN,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, INTERPRET: tl.constexpr):
    """a, b LNS pairs (int32 fixed-point logs) -> k-ordered LNS sums: sign [M,N] int8, log [M,N] int32.
    BK is unused (one k per step, in order)."""
    i_m, i_n = tl.program_id(0), tl.program_id(1)
    o_m = i_m * BM + tl.arange(0, BM)
    o_n = i_n * BN + tl.arange(0, BN)
    m_m, m_n = o_m < M, o_n < N
    acc_s = tl.zeros([BM, BN], dtype=tl.int32)
    acc_l = tl.zeros([BM, BN], dtype=tl.int32)
    p_a = o_m.to(tl.int64) * K
    k = 0
    while k < K:  # a while loop in both modes: K is a runtime bound and order matters
        s_a = tl.load(sa_ptr + p_a + k, mask=m_m, other=0).to(tl.int32)
        l_a = tl.load(la_ptr + p_a + k, mask=m_m, other=0)
        s_b = tl.load(sb_ptr + k * N + o_n, mask=m_n, other=0).to(tl.int32)
        l_b = tl.load(lb_ptr + k * N + o_n, mask=m_n, other=0)
        t_s = s_a[:, None] * s_b[None, :]
        t_l = tl.where(t_s != 0, l_a[:, None] + l_b[None, :], 0)
        acc_s, acc_l = _lns_add(acc_s, acc_l, t_s, t_l, tsb_ptr, tdb_ptr, SB_LEN, DB_LEN)
        k += 1
    p_c = o_m.to(tl.int64)[:, None] * N + o_n[None, :]
    m_c = m_m[:, None] & m_n[None, :]
    tl.store(s_ptr + p_c, acc_s.to(tl.int8), mask=m_c)
    tl.store(l_ptr + p_c, tl.where(acc_s == 0, LOG_ZERO_I32, acc_l), mask=m_c)


_datapath_tuned = triton.autotune(configs=_triton_configs(DATAPATH_CONFIGS), key=["M", "N", "K"],
                                  prune_configs_by={"early_config_prune": _fits_shared_memory})(_datapath_kernel)


@functools.cache
def _tables(frac_bits: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The sb and db tables (int32) on `device`, built once per (F, device)."""
    sb = torch.from_numpy(gauss_table(True, frac_bits)).to(torch.int32)
    db = torch.from_numpy(gauss_table(False, frac_bits)).to(torch.int32)
    return sb.to(device), db.to(device)


# ---- launchers -------------------------------------------------------------------------------------


def _launch(kernel, tuned, m_dim: int, n_dim: int, config: TileConfig | None, default: TileConfig, args, **meta):
    """Runs `kernel` with `config`, or the autotuned wrapper when config is None on CUDA (the
    interpreter takes `default`)."""
    interpret = interpreter_enabled()
    if config is None and not interpret:
        grid = lambda m: (triton.cdiv(m_dim, m["BM"]), triton.cdiv(n_dim, m["BN"]))  # noqa: E731
        tuned[grid](*args, INTERPRET=False, **meta)
        return
    cfg = config or default
    grid = (triton.cdiv(m_dim, cfg.block_m), triton.cdiv(n_dim, cfg.block_n))
    kernel[grid](*args, BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, INTERPRET=interpret,
                 num_warps=cfg.num_warps, num_stages=cfg.num_stages, **meta)


def _pairs(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor], log_dtype: torch.dtype):
    """Contiguous (sa, la, sb, lb) with the logs in `log_dtype`, and (M, K, N)."""
    sa, la = a
    sb, lb = b
    if la.ndim != 2 or lb.ndim != 2 or la.shape[1] != lb.shape[0]:
        raise ValueError(f"lns_matmul (triton): need a [M,K] and b [K,N], got {tuple(la.shape)} and {tuple(lb.shape)}")
    tensors = (sa.contiguous(), la.to(log_dtype).contiguous(), sb.contiguous(), lb.to(log_dtype).contiguous())
    return tensors, (la.shape[0], la.shape[1], lb.shape[1])


def _outputs(out, shapes_dtypes, device):
    if out is None:
        return tuple(torch.empty(s, dtype=d, device=device) for s, d in shapes_dtypes)
    for t, (s, d) in zip(out, shapes_dtypes, strict=True):
        if tuple(t.shape) != s or t.dtype != d or not t.is_contiguous():
            raise ValueError(
                f"lns_matmul (triton): out tensor must be contiguous {s} {d}, got {tuple(t.shape)} {t.dtype}"
            )
    return out


def max_log_triton(
    a: tuple[Tensor, Tensor],
    b: tuple[Tensor, Tensor],
    config: TileConfig | None = None,
    *,
    out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """max_log on LNS pairs with float logs: (sign [M,N] int8, log [M,N] fp32)."""
    (sa, la, sb, lb), (m_dim, k_dim, n_dim) = _pairs(a, b, torch.float32)
    sign, log = _outputs(out, [((m_dim, n_dim), torch.int8), ((m_dim, n_dim), torch.float32)], la.device)
    if sign.numel():
        args = (sa, la, sb, lb, sign, log, m_dim, n_dim, k_dim)
        _launch(_max_log_kernel, _max_log_tuned, m_dim, n_dim, config, MAX_LOG_CONFIGS[0], args)
    return sign, log


def datapath_triton(
    a: tuple[Tensor, Tensor],
    b: tuple[Tensor, Tensor],
    frac_bits: int,
    config: TileConfig | None = None,
    *,
    out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """datapath on LNS pairs with int32 logs at F = frac_bits in 1..12: (sign [M,N] int8,
    log [M,N] int32, LOG_ZERO where 0), bit for bit `reference.datapath_reference`.

    Raises NotImplementedError for F > 12 (int32 logs, table size; use the torch reference) and
    ValueError when |log a| + |log b| could leave int32 (|log2| >= 2^29 / 2^F in total)."""
    if frac_bits not in DATAPATH_FRAC_BITS:
        raise NotImplementedError(
            f"lns_matmul: the Triton datapath kernel supports frac_bits 1..12, got {frac_bits}; "
            "pass impl='torch' for the float64 reference (any F, e.g. 23)"
        )
    (sa, la, sb, lb), (m_dim, k_dim, n_dim) = _pairs(a, b, torch.int32)
    sign, log = _outputs(out, [((m_dim, n_dim), torch.int8), ((m_dim, n_dim), torch.int32)], la.device)
    top_a = torch.where(sa != 0, la.long().abs(), 0).max() if sa.numel() else 0
    top_b = torch.where(sb != 0, lb.long().abs(), 0).max() if sb.numel() else 0
    if int(top_a) + int(top_b) >= 2**29:
        raise ValueError(
            f"lns_matmul: datapath logs too large for int32 sums (max |log a| + |log b| = {int(top_a) + int(top_b)} "
            f">= 2^29 at frac_bits={frac_bits}); lower frac_bits or use impl='torch'"
        )
    if sign.numel():
        tsb, tdb = _tables(frac_bits, la.device)
        args = (sa, la, sb, lb, tsb, tdb, sign, log, m_dim, n_dim, k_dim, tsb.numel(), tdb.numel())
        _launch(_datapath_kernel, _datapath_tuned, m_dim, n_dim, config, DATAPATH_CONFIGS[0], args)
    return sign, log
