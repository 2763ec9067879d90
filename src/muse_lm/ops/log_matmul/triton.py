"""log_matmul in Triton: C_ij = log sum_k exp(A_ik + B_kj) as one scaled matmul, with a range guard.

Forward (`_fwd_kernel`, one program per [BM, BN] output tile, K walked BK at a time). With the row
maxima pa_i = max_k A_ik and column maxima pb_j = max_k B_kj (one torch `amax` over A and B; their
sum bounds every term of C_ij) and a shift H = 30:
    acc_ij = sum_k exp(A_ik - pa_i + H) exp(B_kj - pb_j + H)         (tl.dot of values in [0, e^30])
    C_ij   = pa_i + pb_j - 2H + log acc_ij
Each product is at most e^60, so acc cannot overflow (K < 10^12), and the shift moves the window
in which scaled terms survive down by 60 nats. Products are fp32: "tf32x3" (three tf32 tensor-core
products, ~2^-21 relative) by default, or "ieee" (FMA units); plain tf32 (2^-11) would cost ~5e-4
in log space.

Why one bound for all of K and not per-K-tile maxima with an online log-sum-exp per output: the
per-output running max and scaled sum, beside the tile's dot result, are three fp32 [BM, BN]
tensors, and they spilled ~1 KB of registers per thread on sm_90 at 128 x 128 (8 warps) and
128 x 64 (4 warps) tiles (offline ptxas, tf32x3 and ieee alike); a separable bound keeps the loop a
plain matmul with an exp prologue. Its bound is looser, which the 60-nat shift buys back: in a
torch emulation (256 x 1024 x 256) it flags fewer outputs for the guard than per-tile maxima with
an unshifted 2^-90 threshold on N(0, 30^2) (2.6% vs 5.6%), U(-1000, 1000) (30% vs 45%) and peaked
log-softmax data (1.0% vs 3.6%), as many on N(0, 40^2) (24%) and more on N(0, 60^2) (71% vs 56%);
none on N(0, 10^2). Flagged outputs are exact either way; they only cost guard time.

Range guard. The bound pa + pb can sit far above every real term (a row's and a column's maxima at
different k): with inputs spanning +-1000 the scaled sum underflows to 0 where the answer is
finite. A factor underflows only below 2^-126 ~ e^-87.3, i.e. for terms below e^-117.3 of the
bound, so K lost terms weigh at most K e^-117.3 of it. An output whose acc is below 2^-48 (below
e^-93.3 of the bound, 0 included) while pa and pb are finite is flagged and recomputed by
`_fwd_guard_kernel`: an exact online log-sum-exp term by term, [GM, GK, GN] terms at a time, over
the tiles that hold a flag (the others return at once; no host sync). Unflagged outputs lose at
most K e^-24 ~ K 4e-11 of their value (< 1e-5 for K < 2.6e5).

Backward. w_ijk = exp(A_ik + B_kj - C_ij), dA_ik = sum_j g_ij w_ijk, dB_kj = sum_i g_ij w_ijk. Both
are one kernel, `_bwd_kernel`, computing dX [M, N] = sum over a reduction index k of G[m, k] times
exp(X[m, n] + Y[n, k] - C[m, k]): dA is (X, Y, C, G) = (A, B, C, g) and dB^T is (B^T, A^T, C^T, g^T),
passed as strides (nothing is transposed in memory). Per output tile, with rx_m = max_n X (over the
tile's n) and, per reduction index, ry_k = max_n Y (over the same n), and E = rx + ry - C:
    dX = exp(X - rx + 30) * sum_k [G exp(E - 60)] exp(Y - ry + 30)        (tl.dot per BK of k)
Every factor stays below e^30 (times |g| for the middle one) while E <= 90, and a weight lost to
underflow is below e^-27 |g| (an outer factor below e^-87.3: w < e^(E - 117.3); the middle one:
w < e^(60 - 87.3)). Where some E of a row of the tile exceeds 90, E is clamped for the tl.dot and
that row of the output tile is flagged; `_bwd_guard_kernel` recomputes flagged entries term by
term. Nothing M x K x N is ever materialized.

-inf entries (log 0) are allowed anywhere; an output with no finite term gives C = -inf and zero
gradients (never NaN). NaN propagates; +inf inputs are not supported. Math is fp32 for fp32, bf16
and fp16 inputs; fp64 stays on the torch reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from muse_lm.ops._config import check_at_least_one, check_tiles, check_warps
from muse_lm.ops._dispatch import compile_boundary, interpreter_enabled

__all__ = [
    "CONFIGS",
    "GUARD_TILE",
    "PRECISIONS",
    "LogMatmulConfig",
    "LogMatmulTriton",
    "default_config",
    "log_matmul_backward",
    "log_matmul_forward",
    "log_matmul_forward_with_flags",
    "log_matmul_grad",
    "log_matmul_triton",
    "prune_configs_for",
]

PRECISIONS = ("tf32x3", "ieee")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_FLOOR = tl.constexpr(-3.0e38)  # start of a running max: finite, so no (-inf) - (-inf) = NaN
_HALF = tl.constexpr(30.0)  # H: every exp factor of a tl.dot operand is at most e^30 (module doc)
_UNDERFLOW = tl.constexpr(2.0**-48)  # forward: acc below this (e^-93.3 of the bound) is recomputed
_E_MAX = tl.constexpr(90.0)  # backward: tiles with E = rx + ry - C above this are recomputed
_GROUP_M = 8  # output tiles walked in groups of 8 tile-rows, so A and B tiles are reused from L2


@dataclass(frozen=True)
class LogMatmulConfig:
    """Launch shape of the forward and backward kernels: a [block_m, block_n] output tile per
    program, the reduction walked block_k at a time, and the pipeline depth of its loads."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    def __post_init__(self):
        check_tiles(self, "block_m", "block_n", "block_k", minimum=16, why="tl.dot tiles")
        check_warps(self)
        check_at_least_one(self, "num_stages")

    def smem_bytes(self, kernel: str = "bwd") -> int:
        """Upper estimate of `kernel`'s ("fwd" or "bwd") shared memory in bytes, as Triton 3.6 lays it
        out on sm_90: num_stages buffers of the fp32 tiles each step loads (fwd: A and B; bwd: C, G and
        Y) plus one exponentiated operand staged for the tensor cores (fwd: A's, bwd: Y's). Exact for
        the backward of every config below (80-160 KB) and within 16 KB above the forward's (12-96 KB)
        by ptxas's figures."""
        if kernel not in ("fwd", "bwd"):
            raise ValueError(f"LogMatmulConfig.smem_bytes: kernel={kernel!r} must be 'fwd' or 'bwd'")
        if kernel == "fwd":
            return 4 * self.block_k * (self.num_stages * (self.block_m + self.block_n) + self.block_m)
        return 4 * self.block_k * (self.num_stages * (2 * self.block_m + self.block_n) + self.block_n)


# Declared once: the autotuner's search space on CUDA for both kernels (each tuned on its own, keyed
# on M, N, K and the precision), every one checked against float64 by tests/gpu/test_log_matmul_gpu.py.
# Each compiles without register spills on sm_90 in all three kernels (forward, dA, dB^T) with
# tf32x3 dots (offline ptxas; 128 x 128 x 64 and 128 x 64 at 4 warps spilled 100-200 B, so they are
# out). 128 x 128 is the H100 shape for large products; 64-wide tiles give small problems more
# programs and fit consumer cards' 99 KB (the backward's 64 x 64 takes 80 KB).
CONFIGS = (
    LogMatmulConfig(128, 128, 32, 8, 3),
    LogMatmulConfig(128, 64, 32, 8, 3),
    LogMatmulConfig(64, 128, 32, 8, 3),
    LogMatmulConfig(64, 128, 32, 4, 3),
    LogMatmulConfig(64, 64, 32, 4, 3),
    LogMatmulConfig(32, 32, 32, 4, 2),
)
# The guard kernels hold a [16, 16, 16] block of terms (4096 values) per step; they run only where a
# flag was raised, so they are not tuned.
GUARD_TILE = 16


def default_config(m: int, n: int) -> LogMatmulConfig:
    """The config used without autotuning (interpreter, or a direct call off CUDA): the largest
    tile not wider than the output needs."""
    need = max(16, triton.next_power_of_2(max(m, n)))
    fit = [c for c in CONFIGS if max(c.block_m, c.block_n) <= need]
    return fit[0] if fit else CONFIGS[-1]


def prune_configs_for(configs, m: int, n: int, smem_limit: int, kernel: str = "bwd") -> list:
    """The triton.Configs whose `kernel` ("fwd" / "bwd") shared memory fits `smem_limit` bytes (99 KB
    on consumer cards, 227 KB on an H100) and whose tile is at most twice what an [m, n] output needs;
    the smallest always survives."""

    def smem(c):
        kw = c.kwargs
        return LogMatmulConfig(kw["BM"], kw["BN"], kw["BK"], c.num_warps, c.num_stages).smem_bytes(kernel)

    need_m, need_n = max(16, triton.next_power_of_2(m)), max(16, triton.next_power_of_2(n))
    fit = [
        c
        for c in configs
        if smem(c) <= smem_limit and c.kwargs["BM"] <= 2 * need_m and c.kwargs["BN"] <= 2 * need_n
    ]
    return fit or [min(configs, key=smem)]


def _device_smem(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])


def _pruner(kernel: str):
    def prune(configs, named_args, **kwargs):
        device = next(arg.device for arg in named_args.values() if isinstance(arg, Tensor))
        return prune_configs_for(configs, named_args["M"], named_args["N"], _device_smem(device), kernel)

    return prune


def _triton_configs() -> list[triton.Config]:
    tiles = [({"BM": c.block_m, "BN": c.block_n, "BK": c.block_k}, c) for c in CONFIGS]
    return [triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages) for kw, c in tiles]


@triton.jit
def _finite_or_zero(x):
    """x where finite, else 0: a shift that never turns -inf - (-inf) into NaN."""
    return tl.where(tl.abs(x) < float("inf"), x, 0.0)


@triton.jit
def _tile_ids(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped order of output tiles: GROUP_M tile-rows share their B tiles while they are in L2."""
    n_m = tl.cdiv(M, BM)
    n_n = tl.cdiv(N, BN)
    per_group = GROUP_M * n_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % size_m, (pid % per_group) // size_m


@triton.jit
def _fwd_step(a_rows, b_cols, k0, s_ak, s_bk, m_m, m_n, K, sa, sb, acc, BK: tl.constexpr, PREC: tl.constexpr):
    """acc + sum over k0 .. k0+BK-1 of exp(A - pa + H) exp(B - pb + H), with sa = pa - H [BM, 1] and
    sb = pb - H [1, BN] (0 where pa, pb are -inf). a_rows [BM, 1] and b_cols [1, BN] point at the
    tile's rows and columns: the [BM, BK] pointer tensors are formed per step, not carried (64-bit
    pointers per element spilled registers on sm_90)."""
    o_k = k0 + tl.arange(0, BK)
    m_k = o_k < K
    a = tl.load(a_rows + o_k[None, :] * s_ak, mask=m_m[:, None] & m_k[None, :], other=float("-inf"))
    b = tl.load(b_cols + o_k[:, None] * s_bk, mask=m_k[:, None] & m_n[None, :], other=float("-inf"))
    ea = tl.exp(a.to(tl.float32) - sa)  # [BM, BK] in [0, e^30]; -inf entries give 0
    eb = tl.exp(b.to(tl.float32) - sb)  # [BK, BN]
    return tl.dot(ea, eb, acc, input_precision=PREC)  # [BM, BK] @ [BK, BN]


@triton.jit
def _fwd_kernel(
    a_ptr, b_ptr, pa_ptr, pb_ptr, c_ptr, f_ptr, M, N, K,
    s_ab, s_am, s_ak, s_bb, s_bk, s_bn, s_cb, s_cm, s_cn,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, PREC: tl.constexpr,
    INTERPRET: tl.constexpr,
):  # fmt: skip
    """A [Bt,M,K], B [Bt,K,N] (any strides, fp32/bf16/fp16), pa [Bt,M] and pb [Bt,N] fp32 (their row /
    column maxima, contiguous) -> C [Bt,M,N] fp32 and flags [Bt,M,N] int8 (C's strides): 1 where
    the scaled sum underflowed and the guard must recompute."""
    i_m, i_n = _tile_ids(tl.program_id(0), M, N, BM, BN, GROUP_M)
    i_b = tl.program_id(1).to(tl.int64)
    o_m = i_m * BM + tl.arange(0, BM)
    o_n = i_n * BN + tl.arange(0, BN)
    m_m = o_m < M
    m_n = o_n < N
    pa = tl.load(pa_ptr + i_b * M + o_m, mask=m_m, other=float("-inf"))
    pb = tl.load(pb_ptr + i_b * N + o_n, mask=m_n, other=float("-inf"))
    sa = (_finite_or_zero(pa) - _HALF)[:, None]
    sb = (_finite_or_zero(pb) - _HALF)[None, :]
    a_rows = a_ptr + i_b * s_ab + o_m[:, None].to(tl.int64) * s_am
    b_cols = b_ptr + i_b * s_bb + o_n[None, :].to(tl.int64) * s_bn
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    if INTERPRET:  # Triton 3.6's interpreter cannot take a runtime bound in range() under NumPy 2
        k0 = 0
        while k0 < K:
            acc = _fwd_step(a_rows, b_cols, k0, s_ak, s_bk, m_m, m_n, K, sa, sb, acc, BK, PREC)
            k0 += BK
    else:
        for k0 in range(0, K, BK):
            acc = _fwd_step(a_rows, b_cols, k0, s_ak, s_bk, m_m, m_n, K, sa, sb, acc, BK, PREC)
    # Some finite A in the row and B in the column (else no term is finite: -inf). Compared with
    # != -inf, not abs() < inf: a NaN maximum must reach C as NaN, not turn into -inf.
    seen = (pa != float("-inf"))[:, None] & (pb != float("-inf"))[None, :]
    c = tl.where(seen, (sa + sb) + tl.log(acc), float("-inf"))
    flag = seen & (acc < _UNDERFLOW)  # NaN sums compare False: NaN passes through unflagged
    m_mn = m_m[:, None] & m_n[None, :]
    p_c = i_b * s_cb + o_m[:, None].to(tl.int64) * s_cm + o_n[None, :] * s_cn
    tl.store(c_ptr + p_c, c, mask=m_mn)
    tl.store(f_ptr + p_c, flag.to(tl.int8), mask=m_mn)


@triton.jit
def _guard_fwd_step(a_ptrs, b_ptrs, k0, m_m, m_n, K, run_max, run_sum, GK: tl.constexpr):
    """Exact online log-sum-exp over the terms A_ik + B_kj of k0 .. k0+GK-1, [GM, GK, GN] at once."""
    o_k = k0 + tl.arange(0, GK)
    m_k = o_k < K
    a = tl.load(a_ptrs, mask=m_m[:, None] & m_k[None, :], other=float("-inf")).to(tl.float32)  # [GM, GK]
    b = tl.load(b_ptrs, mask=m_k[:, None] & m_n[None, :], other=float("-inf")).to(tl.float32)  # [GK, GN]
    t = a[:, :, None] + b[None, :, :]  # [GM, GK, GN]
    new_max = tl.maximum(run_max, tl.max(t, axis=1))
    run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(t - new_max[:, None, :]), axis=1)
    return new_max, run_sum


@triton.jit
def _fwd_guard_kernel(
    a_ptr, b_ptr, c_ptr, f_ptr, M, N, K,
    s_ab, s_am, s_ak, s_bb, s_bk, s_bn, s_cb, s_cm, s_cn,
    GM: tl.constexpr, GN: tl.constexpr, GK: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """Rewrites C where flags [Bt,M,N] (C's strides) is set with the exact log-sum-exp."""
    n_n = tl.cdiv(N, GN)
    i_m = tl.program_id(0) // n_n
    i_n = tl.program_id(0) % n_n
    i_b = tl.program_id(1).to(tl.int64)
    o_m = i_m * GM + tl.arange(0, GM)
    o_n = i_n * GN + tl.arange(0, GN)
    m_m = o_m < M
    m_n = o_n < N
    m_mn = m_m[:, None] & m_n[None, :]
    p_c = i_b * s_cb + o_m[:, None].to(tl.int64) * s_cm + o_n[None, :] * s_cn
    flag = tl.load(f_ptr + p_c, mask=m_mn, other=0) != 0
    if tl.max(flag.to(tl.int32)) > 0:
        o_k = tl.arange(0, GK)
        a_ptrs = a_ptr + i_b * s_ab + o_m[:, None].to(tl.int64) * s_am + o_k[None, :] * s_ak
        b_ptrs = b_ptr + i_b * s_bb + o_k[:, None] * s_bk + o_n[None, :].to(tl.int64) * s_bn
        run_max = tl.full([GM, GN], _FLOOR, tl.float32)
        run_sum = tl.zeros([GM, GN], dtype=tl.float32)
        if INTERPRET:
            k0 = 0
            while k0 < K:
                run_max, run_sum = _guard_fwd_step(a_ptrs, b_ptrs, k0, m_m, m_n, K, run_max, run_sum, GK)
                a_ptrs += GK * s_ak
                b_ptrs += GK * s_bk
                k0 += GK
        else:
            for k0 in range(0, K, GK):
                run_max, run_sum = _guard_fwd_step(a_ptrs, b_ptrs, k0, m_m, m_n, K, run_max, run_sum, GK)
                a_ptrs += GK * s_ak
                b_ptrs += GK * s_bk
        c = tl.where(run_max > _FLOOR, run_max + tl.log(run_sum), float("-inf"))
        tl.store(c_ptr + p_c, c, mask=m_mn & flag)


@triton.jit
def _bwd_step(y_cols, c_rows, g_rows, k0, s_yk, s_ck, s_gk, m_m, m_n, K, rx, acc, e_max,
              BK: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """acc + sum over k0 .. k0+BK-1 of G exp(E - 60) exp(Y - ry + 30) [BM, BN], and the running row max
    of E = rx + ry - C. y_cols [1, BN], c_rows and g_rows [BM, 1] point at the tile's n / m."""
    o_k = k0 + tl.arange(0, BK)
    m_k = o_k < K
    m_mk = m_m[:, None] & m_k[None, :]
    y = tl.load(y_cols + o_k[:, None] * s_yk, mask=m_k[:, None] & m_n[None, :], other=float("-inf"))
    c = tl.load(c_rows + o_k[None, :] * s_ck, mask=m_mk, other=float("-inf"))  # [BM, BK] fp32
    g = tl.load(g_rows + o_k[None, :] * s_gk, mask=m_mk, other=0.0).to(tl.float32)
    y = y.to(tl.float32)  # [BK, BN]
    ry = tl.max(y, axis=1)
    ey = tl.exp(y - (_finite_or_zero(ry) - _HALF)[:, None])
    # C = -inf: every term of that output is -inf, its weights are 0 (E = -inf, not NaN).
    e = tl.where(c == float("-inf"), float("-inf"), rx[:, None] + ry[None, :] - c)  # NaN C stays NaN
    e_max = tl.maximum(e_max, tl.max(e, axis=1))
    z = g * tl.exp(tl.minimum(e, _E_MAX) - 2 * _HALF)
    return tl.dot(z, ey, acc, input_precision=PREC), e_max  # [BM, BK] @ [BK, BN]


@triton.jit
def _bwd_kernel(
    x_ptr, y_ptr, c_ptr, g_ptr, dx_ptr, f_ptr, M, N, K,
    s_xb, s_xm, s_xn, s_yb, s_yn, s_yk, s_cb, s_cm, s_ck, s_gb, s_gm, s_gk, s_db, s_dm, s_dn,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, PREC: tl.constexpr,
    INTERPRET: tl.constexpr,
):  # fmt: skip
    """dX [Bt,M,N] = sum_k G[m,k] exp(X[m,n] + Y[n,k] - C[m,k]) for X [Bt,M,N], Y [Bt,N,K], C fp32 and
    G [Bt,M,K] (all by strides); flags [Bt,M,N] int8 (dX's strides) = 1 on the tile rows the guard redoes."""
    i_m, i_n = _tile_ids(tl.program_id(0), M, N, BM, BN, GROUP_M)
    i_b = tl.program_id(1).to(tl.int64)
    o_m = i_m * BM + tl.arange(0, BM)
    o_n = i_n * BN + tl.arange(0, BN)
    m_m = o_m < M
    m_n = o_n < N
    m_mn = m_m[:, None] & m_n[None, :]
    x_rows = x_ptr + i_b * s_xb + o_m[:, None].to(tl.int64) * s_xm
    # rx [BM] from 16-column slices: a whole [BM, BN] tile loaded here stayed live through the loop
    # and spilled registers on sm_90.
    rx = tl.full([BM], float("-inf"), tl.float32)
    for n0 in tl.static_range(0, BN, 16):
        o_s = i_n * BN + n0 + tl.arange(0, 16)
        m_s = m_m[:, None] & (o_s < N)[None, :]
        rx = tl.maximum(rx, tl.max(tl.load(x_rows + o_s[None, :] * s_xn, mask=m_s, other=float("-inf")), axis=1))
    y_cols = y_ptr + i_b * s_yb + o_n[None, :].to(tl.int64) * s_yn
    c_rows = c_ptr + i_b * s_cb + o_m[:, None].to(tl.int64) * s_cm
    g_rows = g_ptr + i_b * s_gb + o_m[:, None].to(tl.int64) * s_gm
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    e_max = tl.full([BM], _FLOOR, tl.float32)
    if INTERPRET:
        k0 = 0
        while k0 < K:
            acc, e_max = _bwd_step(y_cols, c_rows, g_rows, k0, s_yk, s_ck, s_gk, m_m, m_n, K, rx, acc, e_max, BK, PREC)
            k0 += BK
    else:
        for k0 in range(0, K, BK):
            acc, e_max = _bwd_step(y_cols, c_rows, g_rows, k0, s_yk, s_ck, s_gk, m_m, m_n, K, rx, acc, e_max, BK, PREC)
    x = tl.load(x_rows + o_n[None, :] * s_xn, mask=m_mn, other=float("-inf")).to(tl.float32)
    dx = tl.exp(x - (_finite_or_zero(rx) - _HALF)[:, None]) * acc
    p_d = i_b * s_db + o_m[:, None].to(tl.int64) * s_dm + o_n[None, :] * s_dn
    tl.store(dx_ptr + p_d, dx.to(dx_ptr.dtype.element_ty), mask=m_mn)
    flag = tl.zeros([BM, BN], dtype=tl.int8) + (e_max > _E_MAX).to(tl.int8)[:, None]
    tl.store(f_ptr + p_d, flag, mask=m_mn)


@triton.jit
def _guard_bwd_step(x, y_ptrs, c_ptrs, g_ptrs, k0, m_m, m_n, K, acc, GK: tl.constexpr):
    """Adds sum_k G exp(X + Y - C) over k0 .. k0+GK-1 to acc [GM, GN], term by term."""
    o_k = k0 + tl.arange(0, GK)
    m_k = o_k < K
    y = tl.load(y_ptrs, mask=m_n[:, None] & m_k[None, :], other=float("-inf")).to(tl.float32)  # [GN, GK]
    m_mk = m_m[:, None] & m_k[None, :]
    c = tl.load(c_ptrs, mask=m_mk, other=float("inf"))  # [GM, GK]
    c = tl.where(c == float("-inf"), float("inf"), c)  # C = -inf: weight exp(-inf - inf) = 0; NaN stays
    g = tl.load(g_ptrs, mask=m_mk, other=0.0).to(tl.float32)
    t = x[:, :, None] + y[None, :, :] - c[:, None, :]  # [GM, GN, GK]
    return acc + tl.sum(tl.exp(t) * g[:, None, :], axis=2)


@triton.jit
def _bwd_guard_kernel(
    x_ptr, y_ptr, c_ptr, g_ptr, dx_ptr, f_ptr, M, N, K,
    s_xb, s_xm, s_xn, s_yb, s_yn, s_yk, s_cb, s_cm, s_ck, s_gb, s_gm, s_gk, s_db, s_dm, s_dn,
    GM: tl.constexpr, GN: tl.constexpr, GK: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """Rewrites dX where flags (dX's strides) is set with the exact term-by-term sum."""
    n_n = tl.cdiv(N, GN)
    i_m = tl.program_id(0) // n_n
    i_n = tl.program_id(0) % n_n
    i_b = tl.program_id(1).to(tl.int64)
    o_m = i_m * GM + tl.arange(0, GM)
    o_n = i_n * GN + tl.arange(0, GN)
    m_m = o_m < M
    m_n = o_n < N
    m_mn = m_m[:, None] & m_n[None, :]
    p_d = i_b * s_db + o_m[:, None].to(tl.int64) * s_dm + o_n[None, :] * s_dn
    flag = tl.load(f_ptr + p_d, mask=m_mn, other=0) != 0
    if tl.max(flag.to(tl.int32)) > 0:
        p_x = x_ptr + i_b * s_xb + o_m[:, None].to(tl.int64) * s_xm + o_n[None, :] * s_xn
        x = tl.load(p_x, mask=m_mn, other=float("-inf")).to(tl.float32)
        o_k = tl.arange(0, GK)
        y_ptrs = y_ptr + i_b * s_yb + o_n[:, None].to(tl.int64) * s_yn + o_k[None, :] * s_yk
        c_ptrs = c_ptr + i_b * s_cb + o_m[:, None].to(tl.int64) * s_cm + o_k[None, :] * s_ck
        g_ptrs = g_ptr + i_b * s_gb + o_m[:, None].to(tl.int64) * s_gm + o_k[None, :] * s_gk
        acc = tl.zeros([GM, GN], dtype=tl.float32)
        if INTERPRET:
            k0 = 0
            while k0 < K:
                acc = _guard_bwd_step(x, y_ptrs, c_ptrs, g_ptrs, k0, m_m, m_n, K, acc, GK)
                y_ptrs += GK * s_yk
                c_ptrs += GK * s_ck
                g_ptrs += GK * s_gk
                k0 += GK
        else:
            for k0 in range(0, K, GK):
                acc = _guard_bwd_step(x, y_ptrs, c_ptrs, g_ptrs, k0, m_m, m_n, K, acc, GK)
                y_ptrs += GK * s_yk
                c_ptrs += GK * s_ck
                g_ptrs += GK * s_gk
        tl.store(dx_ptr + p_d, acc.to(dx_ptr.dtype.element_ty), mask=m_mn & flag)


# Tuned once per (M, N, K, precision) and input dtypes. The two gradients get their own tuners: the
# same sizes come with transposed strides (dB^T reads B and A across their contiguous dims).
def _tuner(kernel, which: str):
    prune = {"early_config_prune": _pruner(which)}
    return triton.autotune(configs=_triton_configs(), key=["M", "N", "K", "PREC"], prune_configs_by=prune)(kernel)


_fwd_tuned = _tuner(_fwd_kernel, "fwd")
_bwd_tuned = {"a": _tuner(_bwd_kernel, "bwd"), "b": _tuner(_bwd_kernel, "bwd")}


def _launch(kernel, tuned, args: tuple, mn: tuple[int, int], batch: int, config, precision: str) -> None:
    """Runs a tiled kernel over an [M, N] output per batch entry: `config`, the autotuner (config None
    on CUDA) or `default_config` (config None under the interpreter)."""
    m, n = mn
    interpret = interpreter_enabled()
    common = dict(GROUP_M=_GROUP_M, PREC=precision, INTERPRET=interpret)
    if config is None and not interpret:
        grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]), batch)  # noqa: E731
        tuned[grid](*args, **common)
        return
    cfg = config or default_config(m, n)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), batch)
    kernel[grid](
        *args, BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **common,
    )  # fmt: skip


def _launch_guard(kernel, args: tuple, mn: tuple[int, int], batch: int) -> None:
    m, n = mn
    grid = (triton.cdiv(m, GUARD_TILE) * triton.cdiv(n, GUARD_TILE), batch)
    kernel[grid](*args, GM=GUARD_TILE, GN=GUARD_TILE, GK=GUARD_TILE, INTERPRET=interpreter_enabled(), num_warps=4)


def _check_inputs(a: Tensor, b: Tensor, precision: str) -> None:
    if a.dtype not in _DTYPES or b.dtype != a.dtype:
        raise NotImplementedError(
            f"log_matmul_triton: the kernels take fp32/bf16/fp16 A and B of one dtype, got {a.dtype} and "
            f"{b.dtype}; fp64 runs on the torch reference (impl='torch' or impl=None)"
        )
    if a.ndim != 3 or b.ndim != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise ValueError(
            f"log_matmul_triton: need A [Bt,M,K] and B [Bt,K,N], got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.device != b.device:
        raise ValueError(f"log_matmul_triton: A is on {a.device} but B is on {b.device}; use one device")
    if precision not in PRECISIONS:
        raise ValueError(f"log_matmul_triton: precision={precision!r} must be one of {PRECISIONS}")


def _strides(t: Tensor, order: tuple[int, int, int] = (0, 1, 2)) -> tuple[int, int, int]:
    return tuple(t.stride(d) for d in order)


def log_matmul_forward_with_flags(
    a: Tensor, b: Tensor, config: LogMatmulConfig | None = None, *, precision: str = "tf32x3", out: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(C [Bt,M,N] fp32, flags [Bt,M,N] int8) for A [Bt,M,K], B [Bt,K,N]; flags marks the outputs the
    range guard recomputed term by term (no autograd). `out` (contiguous fp32) is written in place."""
    _check_inputs(a, b, precision)
    bt, m, k = a.shape
    n = b.shape[2]
    if out is None:
        out = torch.empty((bt, m, n), device=a.device, dtype=torch.float32)
    elif out.shape != (bt, m, n) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"log_matmul_forward: out must be a contiguous ({bt}, {m}, {n}) float32 tensor")
    flags = torch.empty((bt, m, n), device=a.device, dtype=torch.int8)  # every entry is written
    if out.numel() == 0 or k == 0:
        return out.fill_(float("-inf")), flags.zero_()
    # Row maxima of A and column maxima of B: the bound of every term (NaN propagates through amax).
    pa = a.amax(dim=2).float().contiguous()
    pb = b.amax(dim=1).float().contiguous()
    args = (a, b, out, flags, m, n, k, *_strides(a), *_strides(b), *_strides(out))
    _launch(_fwd_kernel, _fwd_tuned, args[:2] + (pa, pb) + args[2:], (m, n), bt, config, precision)
    _launch_guard(_fwd_guard_kernel, args, (m, n), bt)
    return out, flags


def log_matmul_forward(
    a: Tensor, b: Tensor, config: LogMatmulConfig | None = None, *, precision: str = "tf32x3", out: Tensor | None = None
) -> Tensor:
    """C [Bt,M,N] fp32 = log sum_k exp(A + B) for A [Bt,M,K], B [Bt,K,N] (fp32/bf16/fp16; no autograd)."""
    return log_matmul_forward_with_flags(a, b, config, precision=precision, out=out)[0]


def log_matmul_grad(
    which: str, a: Tensor, b: Tensor, c: Tensor, grad: Tensor, out: Tensor,
    config: LogMatmulConfig | None = None, *, precision: str = "tf32x3",
) -> Tensor:  # fmt: skip
    """Writes dA (which="a", out [Bt,M,K]) or dB (which="b", out [Bt,K,N]) into `out` and returns
    the int8 flags (out's shape) of the entries the backward guard recomputed term by term."""
    bt, m, k = a.shape
    n = b.shape[2]
    # Indexed through out's strides (like out itself), so it is laid out like out.
    flags = torch.empty(out.shape, device=out.device, dtype=torch.int8)
    if which == "a":
        # dA [M, K]: X = A [M, K], Y[n=k, k=j] = B[k, j], C and G [M, N] as [m, k=j].
        x, y, dims, order = a, b, (m, k, n), (0, 1, 2)
    else:
        # dB^T [N, K]: X[j, k] = B[k, j], Y[k, i] = A[i, k], C^T and G^T as [j, i], dX[j, k] = dB[k, j].
        x, y, dims, order = b, a, (n, k, m), (0, 2, 1)
    args = (
        x, y, c, grad, out, flags, *dims,
        *_strides(x, order), *_strides(y, order), *_strides(c, order), *_strides(grad, order), *_strides(out, order),
    )  # fmt: skip
    _launch(_bwd_kernel, _bwd_tuned[which], args, dims[:2], bt, config, precision)
    _launch_guard(_bwd_guard_kernel, args, dims[:2], bt)
    return flags


def _empty_like(t: Tensor) -> Tensor:
    return torch.empty(t.shape, device=t.device, dtype=t.dtype)


def log_matmul_backward(
    a: Tensor,
    b: Tensor,
    c: Tensor,
    grad: Tensor,
    config: LogMatmulConfig | None = None,
    *,
    precision: str = "tf32x3",
    needs: tuple[bool, bool] = (True, True),
    out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """(dA [Bt,M,K], dB [Bt,K,N]) in A's dtype for C = log_matmul(A, B) (fp32, as the forward wrote it)
    and dL/dC = grad (any strides, broadcast views included); None where `needs` says so. `out`
    (contiguous tensors of those shapes and dtype) is written in place when given (tests poison it)."""
    _check_inputs(a, b, precision)
    bt, m, k = a.shape
    n = b.shape[2]
    if c.dtype != torch.float32 or c.shape != (bt, m, n) or grad.shape != (bt, m, n):
        raise ValueError(f"log_matmul_backward: need C ({bt}, {m}, {n}) float32 and grad of that shape")
    if out is None:
        out = tuple(_empty_like(t) if need else None for t, need in zip((a, b), needs))
    for t, ref, need in zip(out, (a, b), needs):
        if need and (t is None or t.shape != ref.shape or t.dtype != ref.dtype or not t.is_contiguous()):
            raise ValueError(f"log_matmul_backward: out must be contiguous {tuple(ref.shape)} {ref.dtype} tensors")
    grads = []
    for which, need, dx in zip("ab", needs, out):
        if need and dx.numel():
            log_matmul_grad(which, a, b, c, grad, dx, config, precision=precision)
        grads.append(dx if need else None)
    return grads[0], grads[1]


class LogMatmulTriton(torch.autograd.Function):
    """C = log_matmul_forward(A, B); the backward recomputes the softmax weights tile by tile from
    (A, B, C) with C kept in fp32."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, config: LogMatmulConfig | None, precision: str) -> Tensor:
        c = log_matmul_forward(a, b, config, precision=precision)
        ctx.save_for_backward(a, b, c)
        ctx.config, ctx.precision = config, precision
        return c if a.dtype == torch.float32 else c.to(a.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        a, b, c = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:2])
        if not any(needs):
            return None, None, None, None
        da, db = log_matmul_backward(a, b, c, grad, ctx.config, precision=ctx.precision, needs=needs)
        return da, db, None, None


@compile_boundary
def log_matmul_triton(
    a: Tensor, b: Tensor, *, config: LogMatmulConfig | None = None, precision: str = "tf32x3"
) -> Tensor:
    """Differentiable C [Bt,M,N] = log sum_k exp(A_ik + B_kj) for A [Bt,M,K], B [Bt,K,N] (fp32/bf16/fp16,
    one dtype), returned in A's dtype. Same contract as `muse_lm.ops.log_matmul` (which validates,
    flattens batch dims and dispatches here on CUDA); config None autotunes over `CONFIGS` on CUDA (the
    default config under the interpreter)."""
    _check_inputs(a, b, precision)
    return LogMatmulTriton.apply(a, b, config, precision)
