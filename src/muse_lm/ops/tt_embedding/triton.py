"""Fused TT lookup: Triton kernels (K = 2 and 3 cores) and their launchers.

Forward: each program takes BLOCK_N tokens, splits their ids into digits, gathers the core slices
(the cores are tiny and stay in L1/L2) and contracts them in fp32 (K = 2: one batched tl.dot;
K = 3: rank-1 updates in registers), writing only the `[N, D]` rows.

Backward, K = 2 ("sorted", the default): the tokens are stably sorted by each core's digit on the
device (a counting sort, `digit_sort.py`), then one launch has a program per (core, digit value,
piece) sum the tokens' slice gradients with tl.dot into fp32 registers, and another adds each
digit's pieces in a fixed order, so the result is deterministic and uses no atomics: four launches
in all. Backward, K = 3 ("atomic"): each program reads
`grad_out` once per token and adds the core-slice gradients into fp32 buffers with atomics;
float atomics add in whatever order the programs arrive, so those gradients can differ between
runs in the last bits. Nothing of size V x D is formed and nothing waits on the host.

Notation as in `reference.py`: cores[k] `(v_k, r_{k-1}, d_k, r_k)`, contiguous; id digits in mixed
radix over (v_1..v_K), output columns over (d_1..d_K), most significant first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from muse_lm.ops._config import check_at_least_one, check_tiles, check_warps
from muse_lm.ops._dispatch import interpreter_enabled
from muse_lm.ops.tt_embedding.digit_sort import MAX_DIGITS, sort_by_digits


@dataclass(frozen=True)
class TTLookupConfig:
    """Launch shape: tokens per program and warps per program."""

    block_n: int
    num_warps: int

    def __post_init__(self):
        check_tiles(self, "block_n")
        check_warps(self)


# Every declared config is checked against the reference (interpreter tests and GPU tests).
CONFIGS = (TTLookupConfig(1, 4), TTLookupConfig(2, 4), TTLookupConfig(4, 4), TTLookupConfig(8, 8))


def default_config(row_tile: int) -> TTLookupConfig:
    """~4K fp32 accumulators per program: enough loads in flight without spilling."""
    block_n = max(1, min(8, 4096 // row_tile))
    return TTLookupConfig(block_n, 8 if block_n * row_tile >= 4096 else 4)


@triton.jit
def _tt2_fwd_kernel(
    ids_ptr,
    g1_ptr,
    g2_ptr,
    out_ptr,
    N,
    V2,
    D1,
    D2,
    R,
    BLOCK_N: tl.constexpr,
    BD1: tl.constexpr,
    BD2: tl.constexpr,
    BR: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Each token's whole slices, loaded contiguously, contracted by one batched tl.dot:
    [BLOCK_N, d1, r] @ [BLOCK_N, r, d2] (sizes padded to >= 16 with zeros)."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    ids = tl.load(ids_ptr + n, mask=n_ok, other=0).to(tl.int64)
    a = tl.arange(0, BD1)
    c = tl.arange(0, BD2)
    r = tl.arange(0, BR)
    base1 = ((ids // V2) * D1 * R)[:, None, None]
    base2 = ((ids % V2) * R * D2)[:, None, None]
    x = tl.load(
        g1_ptr + base1 + (a * R)[None, :, None] + r[None, None, :],
        mask=n_ok[:, None, None] & (a < D1)[None, :, None] & (r < R)[None, None, :],
        other=0.0,
    )
    y = tl.load(
        g2_ptr + base2 + (r * D2)[None, :, None] + c[None, None, :],
        mask=n_ok[:, None, None] & (r < R)[None, :, None] & (c < D2)[None, None, :],
        other=0.0,
    )
    if IEEE:
        acc = tl.dot(x, y, input_precision="ieee")
    else:
        acc = tl.dot(x, y)
    offs = (n.to(tl.int64) * D1 * D2)[:, None, None] + (a * D2)[None, :, None] + c[None, None, :]
    mask = n_ok[:, None, None] & (a < D1)[None, :, None] & (c < D2)[None, None, :]
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tt2_bwd_kernel(
    ids_ptr,
    g1_ptr,
    g2_ptr,
    dout_ptr,
    dg1_ptr,
    dg2_ptr,
    N,
    V2,
    D1,
    D2,
    R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BD1: tl.constexpr,
    BD2: tl.constexpr,
):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    ids = tl.load(ids_ptr + n, mask=n_ok, other=0).to(tl.int64)
    a = tl.arange(0, BD1)
    c = tl.arange(0, BD2)
    m1 = n_ok[:, None] & (a < D1)[None, :]
    m2 = n_ok[:, None] & (c < D2)[None, :]
    off1 = ((ids // V2) * D1 * R)[:, None] + (a * R)[None, :]
    off2 = ((ids % V2) * R * D2)[:, None] + c[None, :]
    offs = (n.to(tl.int64) * D1 * D2)[:, None, None] + (a * D2)[None, :, None] + c[None, None, :]
    g = tl.load(dout_ptr + offs, mask=m1[:, :, None] & m2[:, None, :], other=0.0).to(tl.float32)
    for r in tl.static_range(R):
        x = tl.load(g1_ptr + off1 + r, mask=m1, other=0.0).to(tl.float32)
        y = tl.load(g2_ptr + off2 + r * D2, mask=m2, other=0.0).to(tl.float32)
        tl.atomic_add(dg1_ptr + off1 + r, tl.sum(g * y[:, None, :], axis=2), mask=m1, sem="relaxed")
        tl.atomic_add(dg2_ptr + off2 + r * D2, tl.sum(g * x[:, :, None], axis=1), mask=m2, sem="relaxed")


@triton.jit
def _tt3_prefix(
    p1,
    p2,
    m1,
    m2,
    r2,
    D2,
    R1: tl.constexpr,
    R2: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BD1: tl.constexpr,
    BD2: tl.constexpr,
):
    """sum_r1 G1[i1, 0, a, r1] G2[i2, r1, b, r2] for one r2: `[BLOCK_N, BD1, BD2]` fp32."""
    pm = tl.zeros([BLOCK_N, BD1, BD2], dtype=tl.float32)
    for r1 in tl.static_range(R1):
        x = tl.load(p1 + r1, mask=m1, other=0.0).to(tl.float32)
        y = tl.load(p2 + r1 * D2 * R2 + r2, mask=m2, other=0.0).to(tl.float32)
        pm += x[:, :, None] * y[:, None, :]
    return pm


@triton.jit
def _tt3_fwd_kernel(
    ids_ptr,
    g1_ptr,
    g2_ptr,
    g3_ptr,
    out_ptr,
    N,
    V2,
    V3,
    D1,
    D2,
    D3,
    R1: tl.constexpr,
    R2: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BD1: tl.constexpr,
    BD2: tl.constexpr,
    BD3: tl.constexpr,
):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    ids = tl.load(ids_ptr + n, mask=n_ok, other=0).to(tl.int64)
    a = tl.arange(0, BD1)
    b = tl.arange(0, BD2)
    c = tl.arange(0, BD3)
    p = tl.arange(0, BD1 * BD2)  # prefix column (a, b) flattened, a major (BD2 a power of two)
    m1 = n_ok[:, None] & (a < D1)[None, :]
    m2 = n_ok[:, None] & (b < D2)[None, :]
    m3 = n_ok[:, None] & (c < D3)[None, :]
    mp = n_ok[:, None] & ((p // BD2) < D1)[None, :] & ((p % BD2) < D2)[None, :]
    p1 = g1_ptr + ((ids // (V2 * V3)) * D1 * R1)[:, None] + (a * R1)[None, :]
    p2 = g2_ptr + (((ids // V3) % V2) * R1 * D2 * R2)[:, None] + (b * R2)[None, :]
    p3 = g3_ptr + ((ids % V3) * R2 * D3)[:, None] + c[None, :]
    acc = tl.zeros([BLOCK_N, BD1 * BD2, BD3], dtype=tl.float32)
    for r2 in tl.range(R2):  # not unrolled: R1 * R2 bodies would slow compilation
        pm = _tt3_prefix(p1, p2, m1, m2, r2, D2, R1, R2, BLOCK_N, BD1, BD2)
        z = tl.load(p3 + r2 * D3, mask=m3, other=0.0).to(tl.float32)
        acc += tl.reshape(pm, [BLOCK_N, BD1 * BD2])[:, :, None] * z[:, None, :]
    col = ((p // BD2) * D2 + p % BD2) * D3
    offs = (n.to(tl.int64) * D1 * D2 * D3)[:, None, None] + col[None, :, None] + c[None, None, :]
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mp[:, :, None] & m3[:, None, :])


@triton.jit
def _tt3_bwd_kernel(
    ids_ptr,
    g1_ptr,
    g2_ptr,
    g3_ptr,
    dout_ptr,
    dg1_ptr,
    dg2_ptr,
    dg3_ptr,
    N,
    V2,
    V3,
    D1,
    D2,
    D3,
    R1: tl.constexpr,
    R2: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BD1: tl.constexpr,
    BD2: tl.constexpr,
    BD3: tl.constexpr,
    BR1: tl.constexpr,
):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    ids = tl.load(ids_ptr + n, mask=n_ok, other=0).to(tl.int64)
    a = tl.arange(0, BD1)
    b = tl.arange(0, BD2)
    c = tl.arange(0, BD3)
    p = tl.arange(0, BD1 * BD2)
    q = tl.arange(0, BR1)
    m1 = n_ok[:, None] & (a < D1)[None, :]
    m2 = n_ok[:, None] & (b < D2)[None, :]
    m3 = n_ok[:, None] & (c < D3)[None, :]
    mp = n_ok[:, None] & ((p // BD2) < D1)[None, :] & ((p % BD2) < D2)[None, :]
    off1 = ((ids // (V2 * V3)) * D1 * R1)[:, None] + (a * R1)[None, :]
    off2 = (((ids // V3) % V2) * R1 * D2 * R2)[:, None] + (b * R2)[None, :]
    off3 = ((ids % V3) * R2 * D3)[:, None] + c[None, :]
    col = ((p // BD2) * D2 + p % BD2) * D3
    offs = (n.to(tl.int64) * D1 * D2 * D3)[:, None, None] + col[None, :, None] + c[None, None, :]
    g = tl.load(dout_ptr + offs, mask=mp[:, :, None] & m3[:, None, :], other=0.0).to(tl.float32)
    # dG1 for every r1 stays in registers across the r2 loop (one atomic per entry at the end).
    acc1 = tl.zeros([BLOCK_N, BD1, BR1], dtype=tl.float32)
    for r2 in tl.range(R2):  # not unrolled: R1 * R2 bodies would slow compilation
        pm = _tt3_prefix(g1_ptr + off1, g2_ptr + off2, m1, m2, r2, D2, R1, R2, BLOCK_N, BD1, BD2)
        z = tl.load(g3_ptr + off3 + r2 * D3, mask=m3, other=0.0).to(tl.float32)
        pm_flat = tl.reshape(pm, [BLOCK_N, BD1 * BD2])
        tl.atomic_add(dg3_ptr + off3 + r2 * D3, tl.sum(g * pm_flat[:, :, None], axis=1), mask=m3, sem="relaxed")
        dpm = tl.reshape(tl.sum(g * z[:, None, :], axis=2), [BLOCK_N, BD1, BD2])
        for r1 in tl.static_range(R1):
            x = tl.load(g1_ptr + off1 + r1, mask=m1, other=0.0).to(tl.float32)
            y = tl.load(g2_ptr + off2 + r1 * D2 * R2 + r2, mask=m2, other=0.0).to(tl.float32)
            dy = tl.sum(dpm * x[:, :, None], axis=1)
            tl.atomic_add(dg2_ptr + off2 + r1 * D2 * R2 + r2, dy, mask=m2, sem="relaxed")
            dx = tl.sum(dpm * y[:, None, :], axis=2)
            acc1 += dx[:, :, None] * (q == r1).to(tl.float32)[None, None, :]
    m1q = m1[:, :, None] & (q < R1)[None, None, :]
    tl.atomic_add(dg1_ptr + off1[:, :, None] + q[None, None, :], acc1, mask=m1q, sem="relaxed")


@triton.jit
def _segment_dot_block(
    acc,
    pos,
    hi,
    order_ptr,
    ids_ptr,
    x_ptr,
    y_ptr,
    m,
    k,
    p,
    V2,
    ROW,
    SLICE,
    M,
    K,
    P,
    xs_m: tl.constexpr,
    xs_k: tl.constexpr,
    ys_k: tl.constexpr,
    ys_p: tl.constexpr,
    CORE: tl.constexpr,
    BT: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
    BP: tl.constexpr,
    IEEE: tl.constexpr,
):
    """acc + sum_t X_t @ Y_t over the BT tokens at sorted positions [pos, min(pos + BT, hi)).

    The per-token products are one matmul: X viewed [M, (t, k)] @ Y viewed [(t, k), P], so the
    sum over tokens runs on tensor cores with contraction BT * BK instead of BT small dots.
    """
    t = pos + tl.arange(0, BT)
    valid = t < hi
    tok = tl.load(order_ptr + t, mask=valid, other=0).to(tl.int64)
    tid = tl.load(ids_ptr + tok, mask=valid, other=0).to(tl.int64)
    if CORE == 0:  # dG1: X = grad_out row [a, c], Y = G2[i2] viewed [c, r]
        xb = tok * ROW
        yb = (tid % V2) * SLICE
    else:  # dG2: X = G1[i1] viewed [r, a], Y = grad_out row [a, c]
        xb = (tid // V2) * SLICE
        yb = tok * ROW
    # Padding tokens load zeros on both sides, so they add nothing.
    x_mask = (m < M)[:, None, None] & valid[None, :, None] & (k < K)[None, None, :]
    x = tl.load(x_ptr + xb[None, :, None] + m[:, None, None] * xs_m + k[None, None, :] * xs_k, mask=x_mask, other=0.0)
    y_mask = valid[:, None, None] & (k < K)[None, :, None] & (p < P)[None, None, :]
    y = tl.load(y_ptr + yb[:, None, None] + k[None, :, None] * ys_k + p[None, None, :] * ys_p, mask=y_mask, other=0.0)
    x2 = tl.reshape(x, (BM, BT * BK))
    y2 = tl.reshape(y, (BT * BK, BP))
    if IEEE:
        return acc + tl.dot(x2, y2, input_precision="ieee")
    return acc + tl.dot(x2, y2)


@triton.jit
def _segment_chunk(seg_ptr, seg, SPLIT, BT: tl.constexpr, MIN_CHUNK: tl.constexpr):
    """(start, end, chunk) of segment `seg`: its sorted positions [start, end) are cut into pieces of
    `chunk` tokens, at least MIN_CHUNK and whole blocks of BT, so a frequent digit gets all SPLIT
    programs and a rare one a few. `_segment_dot_kernel` and `_segment_reduce_kernel` share it."""
    start = tl.load(seg_ptr + seg)
    end = tl.load(seg_ptr + seg + 1)
    chunk = tl.maximum((end - start + SPLIT - 1) // SPLIT, MIN_CHUNK)
    return start, end, (chunk + BT - 1) // BT * BT


@triton.jit
def _segment_piece(
    order_ptr,
    ids_ptr,
    seg_ptr,
    x_ptr,
    y_ptr,
    out_ptr,
    seg,
    part,
    SPLIT,
    V2,
    ROW,
    SLICE,
    M,
    K,
    P,
    xs_m: tl.constexpr,
    xs_k: tl.constexpr,
    ys_k: tl.constexpr,
    ys_p: tl.constexpr,
    CORE: tl.constexpr,
    BT: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
    BP: tl.constexpr,
    IEEE: tl.constexpr,
    INTERPRET: tl.constexpr,
    MIN_CHUNK: tl.constexpr,
    STAGES: tl.constexpr,
):
    """Slot `lo // MIN_CHUNK + seg` of out = sum over the tokens of piece `part` of segment `seg`
    (sorted positions [lo, hi)) of X_t @ Y_t (`[M, P]` fp32); a piece with no tokens writes nothing.

    Tokens come in digit order (`order_ptr`, segment starts `seg_ptr`); CORE picks which core's
    gradient this is (see `_segment_dot_block`). The slot is unique: pieces of one segment start at
    least MIN_CHUNK apart, and a later segment's pieces start no earlier, so `n // MIN_CHUNK + v + 1`
    slots hold every piece (instead of SPLIT per segment, mostly zeros).
    """
    start, end, chunk = _segment_chunk(seg_ptr, seg, SPLIT, BT, MIN_CHUNK)
    lo = start + part * chunk
    hi = tl.minimum(lo + chunk, end)
    if lo < hi:
        m = tl.arange(0, BM)
        k = tl.arange(0, BK)
        p = tl.arange(0, BP)
        acc = tl.zeros([BM, BP], dtype=tl.float32)
        args = (order_ptr, ids_ptr, x_ptr, y_ptr, m, k, p, V2, ROW, SLICE, M, K, P)
        if INTERPRET:  # Triton 3.6's interpreter cannot take loaded bounds in range()
            pos = lo
            while pos < hi:
                acc = _segment_dot_block(acc, pos, hi, *args, xs_m, xs_k, ys_k, ys_p, CORE, BT, BM, BK, BP, IEEE)
                pos += BT
        else:
            for pos in tl.range(lo, hi, BT, num_stages=STAGES):
                acc = _segment_dot_block(acc, pos, hi, *args, xs_m, xs_k, ys_k, ys_p, CORE, BT, BM, BK, BP, IEEE)
        slot = lo // MIN_CHUNK + seg
        offs = (slot * M).to(tl.int64) * P + m[:, None] * P + p[None, :]
        tl.store(out_ptr + offs, acc, mask=(m < M)[:, None] & (p < P)[None, :])


@triton.jit
def _segment_dot_kernel(
    order_ptr,
    ids_ptr,
    seg_ptr,
    dout_ptr,
    g1_ptr,
    g2_ptr,
    part_ptr,
    N,
    V1,
    V2,
    STARTS,
    SLOTS,
    SPLIT1,
    SPLIT2,
    D1: tl.constexpr,
    D2: tl.constexpr,
    R: tl.constexpr,
    BD1: tl.constexpr,
    BD2: tl.constexpr,
    BR: tl.constexpr,
    BT: tl.constexpr,
    IEEE: tl.constexpr,
    INTERPRET: tl.constexpr,
    MIN_CHUNK: tl.constexpr,
    STAGES: tl.constexpr,
):
    """Both cores' piece sums in one launch: programs [0, V1) are the first core's digits, the rest
    the second's (`sort_by_digits` rows 0 and 1; each core's slots are a region of `part_ptr`)."""
    pid = tl.program_id(0)
    part = tl.program_id(1)
    if pid < V1:  # dG1[i1] viewed [a, r] = sum_t g_t viewed [a, c] @ G2[i2_t] viewed [c, r]
        _segment_piece(order_ptr, ids_ptr, seg_ptr, dout_ptr, g2_ptr, part_ptr, pid, part, SPLIT1, V2, D1 * D2,
                       R * D2, D1, D2, R, D2, 1, 1, D2, 0, BT, BD1, BD2, BR, IEEE, INTERPRET, MIN_CHUNK, STAGES)
    else:  # dG2[i2] viewed [r, c] = sum_t G1[i1_t] viewed [r, a] @ g_t viewed [a, c]
        _segment_piece(order_ptr + N, ids_ptr, seg_ptr + STARTS, g1_ptr, dout_ptr, part_ptr + SLOTS * D1 * R,
                       pid - V1, part, SPLIT2, V2, D1 * D2, D1 * R, R, D1, D2, 1, R, D2, 1, 1, BT, BR, BD1, BD2,
                       IEEE, INTERPRET, MIN_CHUNK, STAGES)


@triton.jit
def _segment_sum(seg_ptr, part_ptr, out_ptr, seg, cols, MP, SPLIT, BT: tl.constexpr, MIN_CHUNK: tl.constexpr,
                 BLOCK: tl.constexpr):
    """out[seg, cols] = the sum of segment seg's pieces (`_segment_piece`'s slots) in piece order, so
    the result does not depend on which program finished first; zeros for a digit no token has."""
    col = cols * BLOCK + tl.arange(0, BLOCK)
    ok = col < MP
    start, end, chunk = _segment_chunk(seg_ptr, seg, SPLIT, BT, MIN_CHUNK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    lo = start
    while lo < end:
        slot = lo // MIN_CHUNK + seg
        acc += tl.load(part_ptr + slot.to(tl.int64) * MP + col, mask=ok, other=0.0)
        lo += chunk
    tl.store(out_ptr + seg.to(tl.int64) * MP + col, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _segment_reduce_kernel(seg_ptr, part_ptr, dg1_ptr, dg2_ptr, V1, STARTS, SLOTS, MP1, MP2, SPLIT1, SPLIT2,
                           BT: tl.constexpr, MIN_CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Both cores' gradients, written in their dtype: programs [0, V1) the first core's digits."""
    pid = tl.program_id(0)
    if pid < V1:
        _segment_sum(seg_ptr, part_ptr, dg1_ptr, pid, tl.program_id(1), MP1, SPLIT1, BT, MIN_CHUNK, BLOCK)
    else:
        _segment_sum(seg_ptr + STARTS, part_ptr + SLOTS * MP1, dg2_ptr, pid - V1, tl.program_id(1), MP2, SPLIT2,
                     BT, MIN_CHUNK, BLOCK)


@dataclass(frozen=True)
class SegmentDotConfig:
    """The sorted backward's launch shape.

    block_t: tokens per tl.dot (contraction block_t * K); min_chunk: fewest tokens a program takes;
    chunks_per_segment: programs per digit value relative to an even share of `min_chunk` tokens;
    num_stages: token blocks in flight in a program's loop.
    """

    block_t: int
    min_chunk: int
    chunks_per_segment: int
    num_warps: int
    num_stages: int = 2

    def __post_init__(self):
        check_tiles(self, "block_t", "min_chunk")
        check_warps(self)
        check_at_least_one(self, "chunks_per_segment", "num_stages")


# The default: on an H100 (32768 ids, V 50257, D 1024, rank 16, bf16; bench_htt.py --sweep
# --segment-grid, graphed backward) it took 0.103 ms on uniform ids (the grid's best: 0.100) and
# 0.258 ms on Zipf-distributed ids as text has (the grid's best, 0.246, is 0.116 on uniform ids;
# the other declared shapes: 0.55 and 0.50): many short pieces per frequent digit keep it balanced.
SEGMENT_CONFIG = SegmentDotConfig(4, 16, 4, 4)
# Every declared shape is checked against the reference (interpreter and GPU tests).
SEGMENT_CONFIGS = (SEGMENT_CONFIG, SegmentDotConfig(8, 32, 2, 4), SegmentDotConfig(16, 32, 2, 4))


def _slot_count(n: int, v: int, min_chunk: int) -> int:
    """Slots of one core's piece sums: every piece that can have tokens (see `_segment_piece`)."""
    return n // min_chunk + v + 1


def _slots_fit(n: int, cores: list[Tensor], cfg: SegmentDotConfig | None = None) -> bool:
    """Whether the sorted backward's slot buffer (launch shape `cfg`, None: the default) is addressed in
    int32 (the kernels offset into it with int32 products): false only past ~2**31 / (d1 r + r d2) *
    min_chunk ids (33M at D 1024, rank 16, min_chunk 16)."""
    (v1, _, d1, r), (v2, _, d2, _) = cores[0].shape, cores[1].shape
    return _slot_count(n, max(v1, v2), (cfg or SEGMENT_CONFIG).min_chunk) * (d1 * r + r * d2) < 2**31


def _split(n: int, v: int, cfg: SegmentDotConfig) -> int:
    """Pieces per digit: a few times what even segments need, so skewed ids (text is Zipfian: a few
    digits own most tokens) spread over more programs; see bench_htt.py's Zipf case."""
    return max(1, min(64, cfg.chunks_per_segment * triton.cdiv(n, v * cfg.min_chunk)))


def _tt2_backward_sorted(
    ids: Tensor, cores: list[Tensor], grad_out: Tensor, cfg: SegmentDotConfig | None = None
) -> list[Tensor]:
    """K = 2 core gradients without atomics, in the cores' dtype, deterministic:
    dG1[i] = sum_t g_t G2[i2_t]^T, dG2[j] = sum_t G1[i1_t]^T g_t (fp32 accumulation).

    Four launches: the counting sort of the ids by both digits (`digit_sort.py`), one kernel for both
    cores' piece sums (each digit's tokens cut into at most SPLIT pieces, each into its own slot),
    one that adds each digit's pieces in a fixed order into the gradient.
    """
    cfg = cfg or SEGMENT_CONFIG
    (v1, _, d1, r), (v2, _, d2, _) = cores[0].shape, cores[1].shape
    n = ids.shape[0]
    order, starts = sort_by_digits(ids, v1, v2)
    split1, split2 = _split(n, v1, cfg), _split(n, v2, cfg)
    # Slots for every piece that has tokens (see `_segment_piece`); the reduce reads only those, so
    # the buffer is never cleared.
    slots = _slot_count(n, max(v1, v2), cfg.min_chunk)
    partial = torch.empty(slots * (d1 * r + r * d2), device=ids.device, dtype=torch.float32)
    bd1, bd2, br = (max(16, _pow2(x)) for x in (d1, d2, r))
    _segment_dot_kernel[(v1 + v2, max(split1, split2))](
        order, ids, starts, grad_out, cores[0], cores[1], partial, n, v1, v2, starts.shape[1], slots, split1, split2,
        D1=d1, D2=d2, R=r, BD1=bd1, BD2=bd2, BR=br, BT=cfg.block_t, IEEE=cores[0].dtype == torch.float32,
        INTERPRET=interpreter_enabled(), MIN_CHUNK=cfg.min_chunk, STAGES=cfg.num_stages, num_warps=cfg.num_warps,
    )
    dg1, dg2 = torch.empty_like(cores[0]), torch.empty_like(cores[1])
    block = min(1024, _pow2(max(d1, d2) * r))
    _segment_reduce_kernel[(v1 + v2, triton.cdiv(max(d1, d2) * r, block))](
        starts, partial, dg1, dg2, v1, starts.shape[1], slots, d1 * r, r * d2, split1, split2,
        BT=cfg.block_t, MIN_CHUNK=cfg.min_chunk, BLOCK=block,
    )
    return [dg1, dg2]


def _pow2(x: int) -> int:
    return triton.next_power_of_2(x)


def _dims(cores: list[Tensor]) -> tuple[list[int], list[int], list[int]]:
    return [c.shape[0] for c in cores], [c.shape[2] for c in cores], [c.shape[3] for c in cores[:-1]]


def _row_tile(cores: list[Tensor]) -> int:
    return _pow2(cores[0].shape[2]) * _pow2(cores[1].shape[2]) * (_pow2(cores[2].shape[2]) if len(cores) == 3 else 1)


def tt_lookup_forward(
    ids: Tensor, cores: list[Tensor], config: TTLookupConfig | None = None, *, out: Tensor | None = None
) -> Tensor:
    """Rows `ids` (`[N]` int) of the TT table: `[N, D]` in the cores' dtype (fp32 accumulation).

    `out` (contiguous `[N, D]`, the cores' dtype) is written in place when given (tests poison it).
    """
    cores = [c.contiguous() for c in cores]
    ids = ids.contiguous()  # the kernels index ids densely
    v, d, r = _dims(cores)
    n = ids.shape[0]
    shape = (n, _prod(d))
    if out is None:
        out = torch.empty(shape, device=cores[0].device, dtype=cores[0].dtype)
    elif out.shape != shape or out.dtype != cores[0].dtype or not out.is_contiguous():
        raise ValueError(
            f"tt_lookup_forward: out must be contiguous {shape} {cores[0].dtype}, got {tuple(out.shape)} {out.dtype}"
        )
    if n == 0:
        return out
    cfg = config or default_config(_row_tile(cores))
    grid = (triton.cdiv(n, cfg.block_n),)
    if len(cores) == 2:
        _tt2_fwd_kernel[grid](
            ids,
            cores[0],
            cores[1],
            out,
            n,
            v[1],
            d[0],
            d[1],
            r[0],
            BLOCK_N=cfg.block_n,
            BD1=max(16, _pow2(d[0])),
            BD2=max(16, _pow2(d[1])),
            BR=max(16, _pow2(r[0])),
            IEEE=out.dtype == torch.float32,
            num_warps=cfg.num_warps,
        )
    else:
        _tt3_fwd_kernel[grid](
            ids,
            *cores,
            out,
            n,
            v[1],
            v[2],
            d[0],
            d[1],
            d[2],
            R1=r[0],
            R2=r[1],
            BLOCK_N=cfg.block_n,
            BD1=_pow2(d[0]),
            BD2=_pow2(d[1]),
            BD3=_pow2(d[2]),
            num_warps=cfg.num_warps,
        )
    return out


def tt_lookup_backward(
    ids: Tensor,
    cores: list[Tensor],
    grad_out: Tensor,
    config: TTLookupConfig | None = None,
    *,
    method: str | None = None,
    segment_config: SegmentDotConfig | None = None,
) -> list[Tensor]:
    """Core gradients of `sum(grad_out * tt_lookup_forward(ids, cores))`, in the cores' dtype.

    method: "sorted" (the K = 2 default while each digit has at most `MAX_DIGITS` values, i.e. any
    table below 16.7M rows, and the piece slots fit int32 offsets, i.e. below ~33M ids at D 1024,
    rank 16; `_slots_fit`): tokens sorted by each digit, per-segment tl.dot sums with fp32
    accumulation, deterministic and atomic-free; "atomic" (K = 3, and K = 2 past those limits): fp32
    atomics per token, order-dependent in the last bits (see the module docstring).
    """
    cores = [c.contiguous() for c in cores]
    ids = ids.contiguous()  # the kernels index ids densely
    grad_out = grad_out.contiguous()
    v, d, r = _dims(cores)
    n = ids.shape[0]
    method = method or ("sorted" if len(cores) == 2 and max(v) <= MAX_DIGITS and _slots_fit(n, cores, segment_config)
                        else "atomic")
    if method not in ("sorted", "atomic") or (method == "sorted" and len(cores) != 2):
        raise ValueError(f"tt_lookup_backward: method={method!r}; use 'atomic', or 'sorted' (K = 2 only)")
    if method == "sorted" and not _slots_fit(n, cores, segment_config):
        raise ValueError(f"tt_lookup_backward: {n} ids overflow the sorted backward's int32 slot offsets for "
                         f"cores {[tuple(c.shape) for c in cores]}; split the ids or use method='atomic'")
    if method == "sorted" and n > 0:  # `config` shapes only the forward and the atomic backward
        if len({c.dtype for c in cores}) != 1:
            raise ValueError("tt_lookup_backward: the sorted backward needs both cores in one dtype, got "
                             f"{cores[0].dtype} and {cores[1].dtype}; cast them first")
        return _tt2_backward_sorted(ids, cores, grad_out.to(cores[0].dtype), segment_config)
    grads = [torch.zeros(c.shape, device=c.device, dtype=torch.float32) for c in cores]
    if n > 0:
        cfg = config or default_config(_row_tile(cores))
        grid = (triton.cdiv(n, cfg.block_n),)
        if len(cores) == 2:
            _tt2_bwd_kernel[grid](
                ids,
                cores[0],
                cores[1],
                grad_out,
                *grads,
                n,
                v[1],
                d[0],
                d[1],
                R=r[0],
                BLOCK_N=cfg.block_n,
                BD1=_pow2(d[0]),
                BD2=_pow2(d[1]),
                num_warps=cfg.num_warps,
            )
        else:
            _tt3_bwd_kernel[grid](
                ids,
                *cores,
                grad_out,
                *grads,
                n,
                v[1],
                v[2],
                d[0],
                d[1],
                d[2],
                R1=r[0],
                R2=r[1],
                BLOCK_N=cfg.block_n,
                BD1=_pow2(d[0]),
                BD2=_pow2(d[1]),
                BD3=_pow2(d[2]),
                BR1=_pow2(r[0]),
                num_warps=cfg.num_warps,
            )
    return [gr.to(c.dtype) for gr, c in zip(grads, cores)]


def _prod(xs: list[int]) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


class TTEmbeddingTriton(torch.autograd.Function):
    """`out = tt_lookup_forward(ids, cores)`; its backward is `tt_lookup_backward` (sorted for K = 2, atomic
    for K = 3). ids get no gradient."""

    @staticmethod
    def forward(ctx, ids: Tensor, config: TTLookupConfig | None, *cores: Tensor) -> Tensor:
        ctx.save_for_backward(ids, *cores)
        ctx.config = config
        return tt_lookup_forward(ids, list(cores), config)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        ids, *cores = ctx.saved_tensors
        if not any(ctx.needs_input_grad[2:]):
            return (None, None, *([None] * len(cores)))
        return (None, None, *tt_lookup_backward(ids, cores, grad_out, ctx.config))
