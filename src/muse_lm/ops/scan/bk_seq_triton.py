"""BK resolvent diagonal in Triton, memory-bound: the sequential recurrence in registers, split over T.

Same math and contracts as `bk_triton.py` (the default; this pair is the candidate replacement):
    c_t = 2 + v_t - z,   G_t = 1 / (c_t - G_{t-1}),   G_0 = 0,   |G_t| <= 1 / Im z.
Each step maps the upper half plane into itself (a contraction), so the sequential form needs no
normalization at any T. Backward (PyTorch's conj convention, derived in `bk_triton.py`):
    lam_t = gG_t + conj(G_{t+1}^2) lam_{t+1},  grad v_t = Re(-conj(G_t^2) lam_t),  grad z = sum conj(G_t^2) lam_t.

Why memory-bound: `bk_triton.py` scans 8-real 2x2 matrices with `tl.associative_scan` (log-depth
combines of ~40 flops each per token): compute-bound, 12% of copy bandwidth on an H100. Here each
token costs one complex subtraction and one reciprocal (forward) or three complex products
(backward) on a dependent chain per channel, and the bytes are the minimum:
    forward  4 B read (v fp32) + 8 B written (G complex64)             = 12 B/token,
    backward 8 B (G) + 8 B (grad G) read + 4 B (grad v) written       = 20 B/token,
plus pass 1 when T is split (below): one more read of v forward (4 B), of G and grad G backward (16 B).

Tiles. A program owns (b, a block of BK channels, a segment of T) and walks the segment in tiles of
CT steps: one coalesced [BK, CT] load (K is the contiguous dim), then `_halves` cuts the tile in two
along time with reshape [BK, 2, CT/2] -> permute -> `tl.split`, recursively (statically unrolled,
log2(CT) levels, CT - 1 splits in all, each O(size): O(CT log CT) register moves per tile, no masked
sums), down to CT [BK] vectors in time order. The recurrence runs over them in order and `tl.join`
reassembles the [BK, CT] outputs the same way for one coalesced store. No tile crosses a segment.

Segments (NSEG). B * ceil(K / BK) programs cannot fill an H100 at the model's shapes (B 16, K 4), and
one program per channel block walks all T on one dependent chain. So T is cut into NSEG segments of
SEG steps (a multiple of every CT, so pass 1 never sees a partial tile):
  * forward pass 1 (`_fwd_maps_kernel`, segments 0 .. NSEG-2) composes each segment's Moebius map
    G_{end-1} = (m00 G + m01) / (m10 G + m11) of G_{start-1}: the product of [[0, 1], [-1, c_t]],
    divided by its largest |entry| every 4 steps (projective: the map is unchanged; det = 1 per step,
    so no product is ever zero). Pass 2 (`_fwd_kernel`) first applies maps 0 .. s-1 to G_0 = 0 in
    order (the carry: at most NSEG - 1 steps per program, no extra launch), then runs the recurrence.
  * backward pass 1 (`_bwd_maps_kernel`, segments 1 .. NSEG-1) composes the affine maps
    lam_start = A lam_end + Bc (A = the product of conj(G_t^2) over the segment = conj(theta_start /
    theta_end)^2 by telescoping: it decays with the growth of theta, so it stays finite where the
    gradient itself is finite; an underflow to 0 is exact in fp32). Pass 2 (`_bwd_kernel`) folds the
    maps of the segments after its own from the end, then walks its segment back to front.
NSEG = 1 skips pass 1 and the carry. The rule, on the host, deterministic (`plan_segments`):
    NSEG = max(1, min(ceil(LANES_PER_SM * sm_count / (B * K)), T // MIN_SEG, MAX_NSEG)),
    SEG = ceil(ceil(T / NSEG) / CT_ALIGN) * CT_ALIGN, then NSEG = ceil(T / SEG),
i.e. enough channel-segments in flight (LANES_PER_SM = 1024 per SM) to hide the ~40-cycle step of
each chain and the load latency, segments of at least MIN_SEG = 64 steps so pass 1 and the carry stay
small, and at most MAX_NSEG = 128 so the carry (O(NSEG) per program) stays below the segment's work.
(B 16, K 512, T 8192 on 132 SMs: NSEG 16 of 512 steps; B 16, K 4, T 1024: NSEG 16 of 64 steps.)
The layout depends on the SM count and the shape only, never on the autotuned config (CT_ALIGN is
the largest declared CT), so pass 1 and pass 2 may be tuned independently.

All math is fp32; v may be fp32/bf16/fp16, grad v is written in v's dtype. grad z is summed per
program into [NSEG, B, K] partials added by torch: deterministic, no atomics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from muse_lm.ops._dispatch import interpreter_enabled
from muse_lm.ops.scan.bk_triton import BKConfig, _check_inputs

__all__ = [
    "CONFIGS",
    "BKSeqConfig",
    "bk_resolvent_backward_seq",
    "bk_resolvent_forward_seq",
    "default_config",
    "plan_segments",
    "prune_configs_for",
    "smem_estimate",
]

LANES_PER_SM = 1024
MIN_SEG = 64
MAX_NSEG = 128


@dataclass(frozen=True)
class BKSeqConfig(BKConfig):
    """`BKConfig`'s launch shape (CT time steps per tile, BK channels per program, warps per
    program), with tiles of at least 4 steps: pass 1 normalizes its map every 4 steps."""

    def __post_init__(self):
        super().__post_init__()
        if self.chunk < 4:
            raise ValueError(f"BKSeqConfig: chunk={self.chunk} must be at least 4 (pass 1 normalizes every 4 steps)")


# Declared once: the autotuner's search space on CUDA, each checked by tests/gpu/test_bk_seq_gpu.py.
# Compiled for sm_90 with Triton 3.6 (ptxas -v), the tile sits one channel per thread with its CT steps
# in registers (the splits are register moves); every config below compiles without spills (fwd 72-151
# registers, bwd 155-236) and 0-8 KB of shared memory (the store's re/im interleave). CT 64, and CT 32
# with 64 channels in 2 warps, spilled in the backward, so they are not declared.
CONFIGS = (
    BKSeqConfig(16, 256, 8),
    BKSeqConfig(16, 128, 4),
    BKSeqConfig(16, 64, 2),
    BKSeqConfig(16, 32, 1),
    BKSeqConfig(32, 16, 1),
    BKSeqConfig(32, 4, 1),
)
CT_ALIGN = max(c.chunk for c in CONFIGS)


def default_config(k_dim: int) -> BKSeqConfig:
    """The config used without autotuning (interpreter): the widest channel block not above K's next
    power of two (at least 4), so few channels do not run mostly idle lanes."""
    fit = [c for c in CONFIGS if c.block_k <= max(4, triton.next_power_of_2(k_dim))]
    return max(fit, key=lambda c: (c.block_k, -c.num_warps))


def smem_estimate(chunk: int, block_k: int) -> int:
    """Upper estimate in bytes of one program's shared memory: the layout conversions of the tiles
    (the store's re/im interleave) staged through shared memory. Measured (sm_90, Triton 3.6) at most
    2 bytes per tile element; counted as four [BK, CT] fp32 tiles for margin."""
    return 16 * chunk * block_k


def prune_configs_for(configs, k_dim: int, smem_limit: int) -> list:
    """The triton.Configs whose channel block is at most twice K's next power of two (idle lanes
    otherwise) and whose shared memory fits `smem_limit` bytes; the smallest tile always survives."""
    fit = [
        c
        for c in configs
        if c.kwargs["BK"] <= 2 * max(4, triton.next_power_of_2(k_dim))
        and smem_estimate(c.kwargs["CT"], c.kwargs["BK"]) <= smem_limit
    ]
    return fit or [min(configs, key=lambda c: (c.kwargs["CT"] * c.kwargs["BK"], c.kwargs["BK"]))]


def _device_smem() -> int:
    props = triton.runtime.driver.active.utils.get_device_properties(torch.cuda.current_device())
    return int(props["max_shared_mem"])


def _prune_configs(configs, named_args, **kwargs):
    return prune_configs_for(configs, named_args["K"], _device_smem())


def _triton_configs() -> list[triton.Config]:
    return [triton.Config({"CT": c.chunk, "BK": c.block_k}, num_warps=c.num_warps) for c in CONFIGS]


SEQ_MIN_CHANNELS = 1024


def prefers_seq(shape: tuple[int, ...]) -> bool:
    """Whether the autotuned dispatch runs this pair for a [B,T,K] problem: with B * K >= SEQ_MIN_CHANNELS
    channels the sequential recurrence is memory-bound and beats the scan pair (H100, B 16 K 512 T 8192:
    fwd 0.40 vs 2.29 ms, bwd 0.82 vs 1.46 ms); with few channels (B 16, K 4) the scan is ~4x faster.
    Only those two ends are measured: 1024 (8 channels per SM) is a guess at the crossover, which
    `benchmarks/check_bk_seq_gpu.py` times K 32/64/128 too (its value checks there passed; the timings
    ran past the call's limit and are not measured yet)."""
    b, _, k_dim = shape
    return b * k_dim >= SEQ_MIN_CHANNELS


def plan_segments(b: int, k_dim: int, t: int, sm_count: int, align: int = CT_ALIGN) -> tuple[int, int]:
    """(NSEG, SEG) for a [B,T,K] problem on `sm_count` SMs: the rule in the module docstring.
    SEG is a multiple of `align`; NSEG = ceil(T / SEG) >= 1."""
    want = triton.cdiv(LANES_PER_SM * sm_count, max(1, b * k_dim))
    nseg = max(1, min(want, t // MIN_SEG, MAX_NSEG))
    return _segments(t, nseg, align)


def _segments(t: int, nseg: int, align: int) -> tuple[int, int]:
    seg = triton.cdiv(triton.cdiv(t, nseg), align) * align
    return triton.cdiv(t, seg), seg


@triton.jit
def _halves(x, N: tl.constexpr):
    """[R, N] -> its first and second halves along dim 1, [R, N/2] each (register moves)."""
    return tl.split(tl.permute(tl.reshape(x, [x.shape[0], 2, N // 2]), (0, 2, 1)))


@triton.jit
def _unhalves(a, b, N: tl.constexpr):
    """Inverse of `_halves`: [R, N/2] x 2 -> [R, N]."""
    return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), [a.shape[0], N])


@triton.jit
def _row(x):
    """[R, 1] -> [R]."""
    return tl.reshape(x, [x.shape[0]])


@triton.jit
def _col(x):
    """[R] -> [R, 1]."""
    return tl.reshape(x, [x.shape[0], 1])


@triton.jit
def _cdiv(nr, ni, dr, di):
    """(nr + i ni) / (dr + i di), both scaled by max(|dr|, |di|) first so |d|^2 cannot underflow."""
    r = 1.0 / tl.maximum(tl.maximum(tl.abs(dr), tl.abs(di)), 1e-30)
    nr, ni, dr, di = nr * r, ni * r, dr * r, di * r
    inv = 1.0 / (dr * dr + di * di)
    return (nr * dr + ni * di) * inv, (ni * dr - nr * di) * inv


@triton.jit
def _fwd_rows(v, zr, zi, gr, gi, N: tl.constexpr):
    """v [BK, N] (time along dim 1), z and G_{t0-1} [BK] -> (Re G, Im G [BK, N], G_{t0+N-1})."""
    if N == 1:
        # w = c - G_{t-1}; |w| >= Im z > 0, so 1/|w|^2 is finite without scaling.
        wr = 2.0 + _row(v) - zr - gr
        wi = -zi - gi
        inv = 1.0 / (wr * wr + wi * wi)
        gr = wr * inv
        gi = -wi * inv
        return _col(gr), _col(gi), gr, gi
    else:
        v0, v1 = _halves(v, N)
        o0r, o0i, gr, gi = _fwd_rows(v0, zr, zi, gr, gi, N // 2)
        o1r, o1i, gr, gi = _fwd_rows(v1, zr, zi, gr, gi, N // 2)
        return _unhalves(o0r, o1r, N), _unhalves(o0i, o1i, N), gr, gi


@triton.jit
def _map_rows(v, zr, zi, a0r, a0i, a1r, a1i, b0r, b0i, b1r, b1i, N: tl.constexpr):
    """Left-multiplies the Moebius matrix [[a0, a1], [b0, b1]] (rows a, b) by [[0, 1], [-1, c_t]] for
    the N steps of v [BK, N] in order, normalized after every 4 steps."""
    if N == 1:
        cr = 2.0 + _row(v) - zr
        # New rows: (b, c b - a).
        n0r = cr * b0r + zi * b0i - a0r
        n0i = cr * b0i - zi * b0r - a0i
        n1r = cr * b1r + zi * b1i - a1r
        n1i = cr * b1i - zi * b1r - a1i
        return b0r, b0i, b1r, b1i, n0r, n0i, n1r, n1i
    else:
        v0, v1 = _halves(v, N)
        a0r, a0i, a1r, a1i, b0r, b0i, b1r, b1i = _map_rows(v0, zr, zi, a0r, a0i, a1r, a1i, b0r, b0i, b1r, b1i, N // 2)
        a0r, a0i, a1r, a1i, b0r, b0i, b1r, b1i = _map_rows(v1, zr, zi, a0r, a0i, a1r, a1i, b0r, b0i, b1r, b1i, N // 2)
        if N == 4:
            # Growth over 4 steps is at most (|c| + 1)^4: finite in fp32 for |c| < 1e9.
            s = tl.maximum(
                tl.maximum(tl.maximum(tl.abs(a0r), tl.abs(a0i)), tl.maximum(tl.abs(a1r), tl.abs(a1i))),
                tl.maximum(tl.maximum(tl.abs(b0r), tl.abs(b0i)), tl.maximum(tl.abs(b1r), tl.abs(b1i))),
            )
            r = 1.0 / tl.maximum(s, 1e-30)
            a0r, a0i, a1r, a1i = a0r * r, a0i * r, a1r * r, a1i * r
            b0r, b0i, b1r, b1i = b0r * r, b0i * r, b1r * r, b1i * r
        return a0r, a0i, a1r, a1i, b0r, b0i, b1r, b1i


@triton.jit
def _bwd_rows(gr, gi, dr, di, lr, li, sr, si, acc_r, acc_i, N: tl.constexpr):
    """Back to front over G, grad G [BK, N] from lam_{t0+N} and s = conj(G_{t0+N}^2) [BK] ->
    (grad v [BK, N], lam_{t0}, conj(G_{t0}^2), acc + sum of w_t = conj(G_t^2) lam_t)."""
    if N == 1:
        # lam_t = gG_t + conj(G_{t+1}^2) lam_{t+1}; then s becomes conj(G_t^2) and w_t = s lam_t.
        nr = _row(dr) + sr * lr - si * li
        ni = _row(di) + sr * li + si * lr
        xr = _row(gr)
        xi = _row(gi)
        sr = xr * xr - xi * xi
        si = -2.0 * xr * xi
        wr = sr * nr - si * ni
        wi = sr * ni + si * nr
        return _col(-wr), nr, ni, sr, si, acc_r + wr, acc_i + wi
    else:
        g0r, g1r = _halves(gr, N)
        g0i, g1i = _halves(gi, N)
        d0r, d1r = _halves(dr, N)
        d0i, d1i = _halves(di, N)
        o1, lr, li, sr, si, acc_r, acc_i = _bwd_rows(g1r, g1i, d1r, d1i, lr, li, sr, si, acc_r, acc_i, N // 2)
        o0, lr, li, sr, si, acc_r, acc_i = _bwd_rows(g0r, g0i, d0r, d0i, lr, li, sr, si, acc_r, acc_i, N // 2)
        return _unhalves(o0, o1, N), lr, li, sr, si, acc_r, acc_i


@triton.jit
def _bwd_map_rows(gr, gi, dr, di, ar, ai, br, bi, sr, si, N: tl.constexpr):
    """Back to front: composes x -> A x + Bc (lam_t as a function of lam_end) over N steps."""
    if N == 1:
        nar = sr * ar - si * ai
        nai = sr * ai + si * ar
        nbr = sr * br - si * bi + _row(dr)
        nbi = sr * bi + si * br + _row(di)
        xr = _row(gr)
        xi = _row(gi)
        return nar, nai, nbr, nbi, xr * xr - xi * xi, -2.0 * xr * xi
    else:
        g0r, g1r = _halves(gr, N)
        g0i, g1i = _halves(gi, N)
        d0r, d1r = _halves(dr, N)
        d0i, d1i = _halves(di, N)
        ar, ai, br, bi, sr, si = _bwd_map_rows(g1r, g1i, d1r, d1i, ar, ai, br, bi, sr, si, N // 2)
        ar, ai, br, bi, sr, si = _bwd_map_rows(g0r, g0i, d0r, d0i, ar, ai, br, bi, sr, si, N // 2)
        return ar, ai, br, bi, sr, si


@triton.jit
def _tile(base, t0, end, K, o_k, m_k, CT: tl.constexpr):
    """Element offsets [BK, CT] of times t0 .. t0+CT-1 and their mask (t < end, k < K)."""
    o_t = t0.to(tl.int64) + tl.arange(0, CT)
    return base + o_t[None, :] * K + o_k[:, None], m_k[:, None] & (o_t < end)[None, :]


@triton.jit
def _load_complex(ptr, p, m):
    """(re, im) [BK, CT] of the complex64 tensor viewed as (re, im) pairs, one contiguous load."""
    return tl.split(tl.load(ptr + 2 * p[:, :, None] + tl.arange(0, 2)[None, None, :], mask=m[:, :, None], other=0.0))


@triton.jit
def _conj_sq_at(g_ptr, base, t, T, K, o_k, m_k):
    """conj(G_t^2) [BK], zero when t >= T (nothing flows back from past the end)."""
    m = m_k & (t < T)
    p = 2 * (base + t.to(tl.int64) * K + o_k)
    gr = tl.load(g_ptr + p, mask=m, other=0.0)
    gi = tl.load(g_ptr + p + 1, mask=m, other=0.0)
    return gr * gr - gi * gi, -2.0 * gr * gi


@triton.jit
def _map_ptr(m_ptr, j, i_b, B, K, o_k, E: tl.constexpr):
    """Row 0 of segment j's map, [NSEG, B, E, K] fp32: row e is `+ e * K`."""
    return m_ptr + ((j * B + i_b).to(tl.int64) * E) * K + o_k


@triton.jit
def _apply_fwd_map(m_ptr, j, i_b, B, K, o_k, m_k, gr, gi):
    """G -> (a0 G + a1) / (b0 G + b1) with segment j's map (idle lanes read the map G -> 0)."""
    p = _map_ptr(m_ptr, j, i_b, B, K, o_k, 8)
    a0r, a0i = tl.load(p, mask=m_k, other=0.0), tl.load(p + K, mask=m_k, other=0.0)
    a1r, a1i = tl.load(p + 2 * K, mask=m_k, other=0.0), tl.load(p + 3 * K, mask=m_k, other=0.0)
    b0r, b0i = tl.load(p + 4 * K, mask=m_k, other=0.0), tl.load(p + 5 * K, mask=m_k, other=0.0)
    b1r, b1i = tl.load(p + 6 * K, mask=m_k, other=1.0), tl.load(p + 7 * K, mask=m_k, other=0.0)
    nr = a0r * gr - a0i * gi + a1r
    ni = a0r * gi + a0i * gr + a1i
    dr = b0r * gr - b0i * gi + b1r
    di = b0r * gi + b0i * gr + b1i
    return _cdiv(nr, ni, dr, di)


@triton.jit
def _apply_bwd_map(m_ptr, j, i_b, B, K, o_k, m_k, lr, li):
    """lam -> A lam + Bc with segment j's map."""
    p = _map_ptr(m_ptr, j, i_b, B, K, o_k, 4)
    ar, ai = tl.load(p, mask=m_k, other=0.0), tl.load(p + K, mask=m_k, other=0.0)
    br, bi = tl.load(p + 2 * K, mask=m_k, other=0.0), tl.load(p + 3 * K, mask=m_k, other=0.0)
    return ar * lr - ai * li + br, ar * li + ai * lr + bi


@triton.jit
def _fwd_maps_kernel(
    v_ptr, z_ptr, m_ptr, B, T, K, SEG, LOG_B, LOG_T, CT: tl.constexpr, BK: tl.constexpr, INTERPRET: tl.constexpr
):
    """Pass 1: segment s's Moebius map (8 reals) -> m [NSEG, B, 8, K], for s = 0 .. NSEG-2 (full
    segments: SEG is a multiple of CT and ends before T). LOG_B, LOG_T: the autotuner's key only."""
    i_b, i_s = tl.program_id(0), tl.program_id(2)
    o_k = tl.program_id(1) * BK + tl.arange(0, BK)
    m_k = o_k < K
    zr = tl.load(z_ptr + 2 * o_k, mask=m_k, other=0.0)
    zi = tl.load(z_ptr + 2 * o_k + 1, mask=m_k, other=1.0)
    base = i_b.to(tl.int64) * T * K
    one = tl.full([BK], 1.0, tl.float32)
    zero = tl.zeros([BK], dtype=tl.float32)
    a0r, a0i, a1r, a1i, b0r, b0i, b1r, b1i = one, zero, zero, zero, zero, zero, one, zero
    start = i_s * SEG
    if INTERPRET:  # Triton 3.6's interpreter cannot take a runtime bound in range() under NumPy 2
        t0 = start
        while t0 < start + SEG:
            p, m = _tile(base, t0, T, K, o_k, m_k, CT)
            v = tl.load(v_ptr + p, mask=m, other=0.0).to(tl.float32)
            a0r, a0i, a1r, a1i, b0r, b0i, b1r, b1i = _map_rows(v, zr, zi, a0r, a0i, a1r, a1i, b0r, b0i, b1r, b1i, CT)
            t0 += CT
    else:
        for t0 in range(start, start + SEG, CT):
            p, m = _tile(base, t0, T, K, o_k, m_k, CT)
            v = tl.load(v_ptr + p, mask=m, other=0.0).to(tl.float32)
            a0r, a0i, a1r, a1i, b0r, b0i, b1r, b1i = _map_rows(v, zr, zi, a0r, a0i, a1r, a1i, b0r, b0i, b1r, b1i, CT)
    p = _map_ptr(m_ptr, i_s, i_b, B, K, o_k, 8)
    tl.store(p, a0r, mask=m_k)
    tl.store(p + K, a0i, mask=m_k)
    tl.store(p + 2 * K, a1r, mask=m_k)
    tl.store(p + 3 * K, a1i, mask=m_k)
    tl.store(p + 4 * K, b0r, mask=m_k)
    tl.store(p + 5 * K, b0i, mask=m_k)
    tl.store(p + 6 * K, b1r, mask=m_k)
    tl.store(p + 7 * K, b1i, mask=m_k)


@triton.jit
def _fwd_tile(v_ptr, g_ptr, base, t0, end, K, o_k, m_k, zr, zi, gr, gi, CT: tl.constexpr):
    """Writes G for times t0 .. min(t0+CT, end)-1 from G_{t0-1} = (gr, gi) [BK]; returns the tile's
    last G (only used when the tile was full: a partial tile ends its segment)."""
    p, m = _tile(base, t0, end, K, o_k, m_k, CT)
    v = tl.load(v_ptr + p, mask=m, other=0.0).to(tl.float32)
    out_r, out_i, gr, gi = _fwd_rows(v, zr, zi, gr, gi, CT)
    tl.store(g_ptr + 2 * p[:, :, None] + tl.arange(0, 2)[None, None, :], tl.join(out_r, out_i), mask=m[:, :, None])
    return gr, gi


@triton.jit
def _fwd_kernel(
    v_ptr, z_ptr, m_ptr, g_ptr, B, T, K, SEG, LOG_B, LOG_T,
    CT: tl.constexpr, BK: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Pass 2: v [B,T,K] real, z [K,2] fp32, maps of segments 0 .. s-1 -> g [B,T,K,2] fp32 of segment s."""
    i_b, i_s = tl.program_id(0), tl.program_id(2)
    o_k = tl.program_id(1) * BK + tl.arange(0, BK)
    m_k = o_k < K
    # Idle lanes get z = i (finite, away from the real axis) so they never produce NaN.
    zr = tl.load(z_ptr + 2 * o_k, mask=m_k, other=0.0)
    zi = tl.load(z_ptr + 2 * o_k + 1, mask=m_k, other=1.0)
    base = i_b.to(tl.int64) * T * K
    gr = tl.zeros([BK], dtype=tl.float32)
    gi = tl.zeros([BK], dtype=tl.float32)
    start = i_s * SEG
    end = tl.minimum(start + SEG, T)
    if INTERPRET:
        j = 0
        while j < i_s:
            gr, gi = _apply_fwd_map(m_ptr, j, i_b, B, K, o_k, m_k, gr, gi)
            j += 1
        t0 = start
        while t0 < end:
            gr, gi = _fwd_tile(v_ptr, g_ptr, base, t0, end, K, o_k, m_k, zr, zi, gr, gi, CT)
            t0 += CT
    else:
        for j in range(0, i_s):
            gr, gi = _apply_fwd_map(m_ptr, j, i_b, B, K, o_k, m_k, gr, gi)
        for t0 in range(start, end, CT):
            gr, gi = _fwd_tile(v_ptr, g_ptr, base, t0, end, K, o_k, m_k, zr, zi, gr, gi, CT)


@triton.jit
def _bwd_maps_kernel(
    g_ptr, dg_ptr, m_ptr, B, T, K, SEG, LOG_B, LOG_T, CT: tl.constexpr, BK: tl.constexpr, INTERPRET: tl.constexpr
):
    """Pass 1: segment s's affine map lam_start = A lam_end + Bc -> m [NSEG, B, 4, K] (A, Bc as re, im),
    for s = 1 .. NSEG-1. Tiles start at the segment's start, so only the last segment's last tile is
    partial; its padded rows read G = grad G = 0 and leave the map as it is (A is already 0 there)."""
    i_b, i_s = tl.program_id(0), tl.program_id(2) + 1
    o_k = tl.program_id(1) * BK + tl.arange(0, BK)
    m_k = o_k < K
    base = i_b.to(tl.int64) * T * K
    start = i_s * SEG
    end = tl.minimum(start + SEG, T)
    sr, si = _conj_sq_at(g_ptr, base, end, T, K, o_k, m_k)
    ar = tl.full([BK], 1.0, tl.float32)
    ai = tl.zeros([BK], dtype=tl.float32)
    br = tl.zeros([BK], dtype=tl.float32)
    bi = tl.zeros([BK], dtype=tl.float32)
    n_tiles = tl.cdiv(end - start, CT)
    if INTERPRET:
        i = 0
        while i < n_tiles:
            p, m = _tile(base, start + (n_tiles - 1 - i) * CT, end, K, o_k, m_k, CT)
            gr, gi = _load_complex(g_ptr, p, m)
            dr, di = _load_complex(dg_ptr, p, m)
            ar, ai, br, bi, sr, si = _bwd_map_rows(gr, gi, dr, di, ar, ai, br, bi, sr, si, CT)
            i += 1
    else:
        for i in range(0, n_tiles):
            p, m = _tile(base, start + (n_tiles - 1 - i) * CT, end, K, o_k, m_k, CT)
            gr, gi = _load_complex(g_ptr, p, m)
            dr, di = _load_complex(dg_ptr, p, m)
            ar, ai, br, bi, sr, si = _bwd_map_rows(gr, gi, dr, di, ar, ai, br, bi, sr, si, CT)
    p = _map_ptr(m_ptr, i_s, i_b, B, K, o_k, 4)
    tl.store(p, ar, mask=m_k)
    tl.store(p + K, ai, mask=m_k)
    tl.store(p + 2 * K, br, mask=m_k)
    tl.store(p + 3 * K, bi, mask=m_k)


@triton.jit
def _bwd_tile(g_ptr, dg_ptr, dv_ptr, base, t0, end, K, o_k, m_k, lr, li, sr, si, acc_r, acc_i, CT: tl.constexpr):
    """Times t0 .. t0+CT-1 back to front: writes grad v, carries lam, conj(G^2) and the grad z sum."""
    p, m = _tile(base, t0, end, K, o_k, m_k, CT)
    gr, gi = _load_complex(g_ptr, p, m)
    dr, di = _load_complex(dg_ptr, p, m)
    dv, lr, li, sr, si, acc_r, acc_i = _bwd_rows(gr, gi, dr, di, lr, li, sr, si, acc_r, acc_i, CT)
    tl.store(dv_ptr + p, dv.to(dv_ptr.dtype.element_ty), mask=m)
    return lr, li, sr, si, acc_r, acc_i


@triton.jit
def _bwd_kernel(
    g_ptr, dg_ptr, m_ptr, dv_ptr, dz_ptr, B, T, K, SEG, NSEG, LOG_B, LOG_T,
    CT: tl.constexpr, BK: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Pass 2: g, dg [B,T,K,2] fp32, maps of segments s+1 .. NSEG-1 -> dv [B,T,K] (v's dtype) of
    segment s and dz partials [NSEG, B, K, 2] fp32."""
    i_b, i_s = tl.program_id(0), tl.program_id(2)
    o_k = tl.program_id(1) * BK + tl.arange(0, BK)
    m_k = o_k < K
    base = i_b.to(tl.int64) * T * K
    start = i_s * SEG
    end = tl.minimum(start + SEG, T)
    sr, si = _conj_sq_at(g_ptr, base, end, T, K, o_k, m_k)
    lr = tl.zeros([BK], dtype=tl.float32)  # lam_end: what flows in from the later segments
    li = tl.zeros([BK], dtype=tl.float32)
    acc_r = tl.zeros([BK], dtype=tl.float32)
    acc_i = tl.zeros([BK], dtype=tl.float32)
    n_tiles = tl.cdiv(end - start, CT)
    if INTERPRET:
        j = NSEG - 1
        while j > i_s:
            lr, li = _apply_bwd_map(m_ptr, j, i_b, B, K, o_k, m_k, lr, li)
            j -= 1
        i = 0
        while i < n_tiles:
            t0 = start + (n_tiles - 1 - i) * CT
            lr, li, sr, si, acc_r, acc_i = _bwd_tile(
                g_ptr, dg_ptr, dv_ptr, base, t0, end, K, o_k, m_k, lr, li, sr, si, acc_r, acc_i, CT
            )
            i += 1
    else:
        for jj in range(0, NSEG - 1 - i_s):
            lr, li = _apply_bwd_map(m_ptr, NSEG - 1 - jj, i_b, B, K, o_k, m_k, lr, li)
        for i in range(0, n_tiles):
            t0 = start + (n_tiles - 1 - i) * CT
            lr, li, sr, si, acc_r, acc_i = _bwd_tile(
                g_ptr, dg_ptr, dv_ptr, base, t0, end, K, o_k, m_k, lr, li, sr, si, acc_r, acc_i, CT
            )
    p_z = ((i_s * B + i_b).to(tl.int64) * K + o_k)[:, None] * 2 + tl.arange(0, 2)[None, :]
    tl.store(dz_ptr + p_z, tl.join(acc_r, acc_i), mask=m_k[:, None])


# Tuned once per (K, power-of-two bucket of B, of T), like bk_triton.py: buckets keep generation from
# re-tuning at every new T. The segment layout does not depend on the config, so each pass tunes alone.
_TUNE = dict(key=["K", "LOG_B", "LOG_T"], prune_configs_by={"early_config_prune": _prune_configs})
_fwd_maps_tuned = triton.autotune(configs=_triton_configs(), **_TUNE)(_fwd_maps_kernel)
_fwd_tuned = triton.autotune(configs=_triton_configs(), **_TUNE)(_fwd_kernel)
_bwd_maps_tuned = triton.autotune(configs=_triton_configs(), **_TUNE)(_bwd_maps_kernel)
_bwd_tuned = triton.autotune(configs=_triton_configs(), **_TUNE)(_bwd_kernel)


def _plan(shape: tuple[int, int, int], config: BKSeqConfig | None, nseg: int | None, device) -> tuple[int, int]:
    """(NSEG, SEG): forced by `nseg` (rounded: SEG is a multiple of CT, so NSEG may come out smaller),
    else `plan_segments` on the device's SM count (1 under the interpreter)."""
    b, t, k_dim = shape
    interpret = interpreter_enabled()
    if config is not None:
        align = config.chunk
    else:
        align = default_config(k_dim).chunk if interpret else CT_ALIGN
    if nseg is not None:
        if nseg < 1:
            raise ValueError(f"bk_resolvent_seq: nseg={nseg} must be at least 1 (1 = no split of T)")
        return _segments(t, nseg, align)
    sm_count = 1 if interpret else torch.cuda.get_device_properties(device).multi_processor_count
    return plan_segments(b, k_dim, t, sm_count, align)


def _launch(kernel, tuned, shape, grid_z: int, config: BKSeqConfig | None, *args) -> None:
    """Runs `kernel` on grid (B, channel blocks, grid_z) with `config`, or the autotuned wrapper when
    config is None on CUDA."""
    b, _, k_dim = shape
    interpret = interpreter_enabled()
    if config is None and not interpret:
        tuned[lambda meta: (b, triton.cdiv(k_dim, meta["BK"]), grid_z)](*args, INTERPRET=False)
        return
    cfg = config or default_config(k_dim)
    grid = (b, triton.cdiv(k_dim, cfg.block_k), grid_z)
    kernel[grid](*args, CT=cfg.chunk, BK=cfg.block_k, INTERPRET=interpret, num_warps=cfg.num_warps)


def bk_resolvent_forward_seq(
    v: Tensor, z: Tensor, config: BKSeqConfig | None = None, *, out: Tensor | None = None, nseg: int | None = None
) -> Tensor:
    """G [B,T,K] complex64 for v [B,T,K] (fp32/bf16/fp16) and z [K] complex64 (no autograd).

    Same contract as `bk_triton.bk_resolvent_forward`. `out` (contiguous [B,T,K] complex64) is written
    in place when given; `nseg` forces the number of segments of T (tests), else `plan_segments`.
    """
    _check_inputs(v, z)
    v = v.contiguous()
    shape = b, t, k_dim = v.shape
    if out is None:
        out = torch.empty(v.shape, device=v.device, dtype=torch.complex64)
    elif out.shape != v.shape or out.dtype != torch.complex64 or not out.is_contiguous():
        raise ValueError(f"bk_resolvent_forward_seq: out must be contiguous {tuple(v.shape)} complex64")
    if out.numel() == 0:
        return out
    z_ri = torch.view_as_real(z.resolve_conj()).contiguous()
    n, seg = _plan(shape, config, nseg, v.device)
    maps = torch.empty(n, b, 8, k_dim, device=v.device, dtype=torch.float32) if n > 1 else z_ri
    scalars = (b, t, k_dim, seg, b.bit_length(), t.bit_length())
    if n > 1:
        _launch(_fwd_maps_kernel, _fwd_maps_tuned, shape, n - 1, config, v, z_ri, maps, *scalars)
    _launch(_fwd_kernel, _fwd_tuned, shape, n, config, v, z_ri, maps, torch.view_as_real(out), *scalars)
    return out


def bk_resolvent_backward_seq(
    g: Tensor, grad_g: Tensor, v_dtype: torch.dtype, config: BKSeqConfig | None = None, *, nseg: int | None = None
) -> tuple[Tensor, Tensor]:
    """(grad v [B,T,K] in v_dtype, grad z [K] complex64) from G and grad G ([B,T,K] complex64 each).

    Same contract as `bk_triton.bk_resolvent_backward`; `nseg` as in `bk_resolvent_forward_seq`.
    """
    shape = b, t, k_dim = g.shape
    dv = torch.empty(g.shape, device=g.device, dtype=v_dtype)
    if g.numel() == 0:
        return dv, torch.zeros(k_dim, device=g.device, dtype=torch.complex64)
    g_ri = torch.view_as_real(g.contiguous())
    # Autograd may hand a conjugate view or a broadcast (expanded) gradient: materialize it.
    dg_ri = torch.view_as_real(grad_g.to(torch.complex64).resolve_conj().contiguous())
    n, seg = _plan(shape, config, nseg, g.device)
    maps = torch.empty(n, b, 4, k_dim, device=g.device, dtype=torch.float32) if n > 1 else g_ri
    partial = torch.empty(n, b, k_dim, 2, device=g.device, dtype=torch.float32)
    scalars = (b, t, k_dim, seg)
    logs = (b.bit_length(), t.bit_length())
    if n > 1:
        _launch(_bwd_maps_kernel, _bwd_maps_tuned, shape, n - 1, config, g_ri, dg_ri, maps, *scalars, *logs)
    _launch(_bwd_kernel, _bwd_tuned, shape, n, config, g_ri, dg_ri, maps, dv, partial, *scalars, n, *logs)
    return dv, torch.view_as_complex(partial.sum((0, 1)))
