"""Semiseparable (SSD) scan in Triton: chunked forward and backward, states walked in fp32.

Per head h_t = exp(log_a_t) h_{t-1} + u_t x_t^T (R x P), y_t = v_t^T h_t. Split T into chunks of C
tokens; inside a chunk let cum_t be the inclusive cumulative log-decay from the chunk's first token
and g = cum_{C-1} (the chunk's total). With S the state entering the chunk:

    Y   = (V U^T o L) X + diag(e^cum) V S,       L[t,s] = exp(cum_t - cum_s) for s <= t, else 0
    S'  = e^g S + (diag(e^(g - cum)) U)^T X

Every exponent is a difference of cumulative log-decays that is <= 0 (L is masked *before* exp), so
nothing overflows however strong the decay; exp(+cum) * exp(-cum) is never formed.

Forward, three launches:
 1. `_chunk_state_kernel`: each chunk's own contribution (diag(e^(g-cum)) U)^T X  [B,H,NC,R,P] fp32,
    one program per (chunk, b*h, P-block): fully parallel, a tl.dot per program.
 2. `state_pass.state_pass`: the only sequential part, S_{c+1} = e^{g_c} S_c + local_c, elementwise on
    the R*P state; overwrites each chunk's local contribution with the state *entering* it and writes
    the final state. One level (a walk over all chunks per (b*h, block of R*P)) or, for long T with
    few sequences, two (groups of chunks walked in parallel, a short walk over the groups, a fix-up).
 3. `_chunk_output_kernel`: Y per (chunk, b*h, P-block) from the entering state, three tl.dots.
Steps 1 and 2 are the unfused walk; by default `fused_states.py` does both in one kernel (each
chunk's contribution formed inside the walk, in one level or two) and saves bf16 inputs' states in
bf16. The backward's steps 1 and 2 likewise.
Backward (dY, dS_final), the mirror image; the entering states are saved by the forward:
 1. the same `_chunk_state_kernel` with weights e^cum gives each chunk's V^T diag(e^cum) dY;
 2. the same state pass run from the end gives dS'_c, the gradient reaching the state that
    leaves chunk c (dS'_{c-1} = e^{g_c} dS'_c + V_c^T diag(e^cum) dY_c), and d initial_state;
 3. recompute the chunk's products and write dX, dU, dV and d log_a.
    With A = V U^T o L, dA = dY X^T o L:
      dX = A^T dY + diag(e^(g-cum)) U dS'
      dU = dA^T V + diag(e^(g-cum)) X dS'^T
      dV = dA U   + diag(e^cum) dY S^T
      dcum_t = sum_s (dA o V U^T)[t,s] - sum_s (dA o V U^T)[s,t]      (through L)
             + e^cum_t <dY_t, (V S)_t>                                (through e^cum)
             - w_t,  w_t = e^(g - cum_t) <u_t, dS' x_t>              (through e^(g - cum))
             = <v_t, dV_t> - <u_t, dU_t>    (the row sums of dA o V U^T are <v_t, (dA U)_t>, its
                                             column sums <u_s, (dA^T V)_s>; the state terms fill dU, dV)
      dg = e^g <S, dS'> + sum_t w_t, added to dcum_{C-1};  d log_a_j = sum_{t >= j} dcum_t.
    Two kernels: `_chunk_dx_kernel` per (chunk, b*h, P-block) for dX, and `_chunk_duv_kernel` per
    (chunk, b*h), which walks P in blocks accumulating the terms that sum over P in registers, so dU,
    dV, d log_a are written once (no partials, no atomics). Split in two because one kernel doing
    both spilled registers on sm_90.
A ragged last chunk is padded by masked loads: u = v = x = dY = 0 and log_a = 0 there, which adds
nothing and decays nothing, so the padded chunk's g equals its last real token's cumulative decay.

R is kept whole in every program (padded to a power of two >= 16; the output needs all of R), P is
split in blocks of BP (the state and the output are independent across P). Products accumulate in
fp32; fp32 inputs multiply exactly ("ieee"). With bf16/fp16 inputs, a product of two loaded 16-bit
tiles (u, v, x, dY, 16-bit states) runs on the tensor cores in that dtype (`_mm`, exact products),
and one with a computed fp32 operand is widened to tf32 (`_dot`). Not supported here: fp64 (the
reference).

Packed sequences (cu_seqlens, B = 1): each sequence is cut into its own chunks (`state_pass.chunk_table`:
first token and sequence end per chunk), so no chunk straddles a boundary; every chunk kernel reads its
span from the table and masks rows past its sequence's end exactly like a ragged last chunk, and the
state pass restarts at each sequence's first chunk (its initial state, or zeros) and writes a final
state per sequence. A sequence of L tokens costs ceil(L / C) chunks, so many very short sequences pay
for padding (a smaller chunk_size helps there); an empty one is a chunk of no tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from muse_lm.ops._config import check_at_least_one, check_tiles, check_warps
from muse_lm.ops._dispatch import compile_boundary, interpreter_enabled
from muse_lm.ops.semiseparable.state_pass import chunk_table, state_pass

__all__ = [
    "CONFIGS",
    "SSDConfig",
    "SemiseparableTriton",
    "default_config",
    "kernel_chunk",
    "prune_configs_for",
    "smem_estimate",
    "semiseparable_backward",
    "semiseparable_forward",
    "semiseparable_triton",
]


@dataclass(frozen=True)
class SSDConfig:
    """Launch shape of the chunk kernels: BP columns of P per program, warps and pipeline stages."""

    block_p: int
    num_warps: int
    num_stages: int

    def __post_init__(self):
        check_tiles(self, "block_p", minimum=16, why="tl.dot tiles")
        check_warps(self)
        check_at_least_one(self, "num_stages")


# Declared once: the autotuner's search space on CUDA (each kernel is tuned on its own), each checked
# against the reference by tests/gpu/test_semiseparable_gpu.py. BP = 16 is for small heads (the tiny
# preset); in the forward kernels BP = 32 doubles the programs when B*H*chunks is small; BP = 64
# covers P = head_dim in one block. The backward kernel walks P in blocks of BP (smaller blocks, fewer
# registers). num_stages stays 1: only the backward has a loop, and it is one to four trips long. A sweep
# of 18 configs on an H100 (benchmarks/sweep_ssd_configs.py, bf16, T 2048, P = R = 64) found nothing
# better than the autotuner's pick for the forward and dx kernels; for `_chunk_duv_kernel`, (32, 4, 3)
# was 4.6% faster before its d cum rework and is 4.6% slower since (0.565 vs 0.540 ms for (64, 4, 1)),
# so it stays undeclared. 8 warps are 1.6-1.9x slower for that kernel at every BP
# (benchmarks/results/ssd_duv_variants_scratch.json).
CONFIGS = (
    SSDConfig(16, 4, 1),
    SSDConfig(32, 4, 1),
    SSDConfig(32, 8, 1),
    SSDConfig(64, 4, 1),
    SSDConfig(64, 8, 1),
)
_MIN_CHUNK, _MAX_CHUNK = 16, 64


def kernel_chunk(chunk_size: int) -> int:
    """The kernel's chunk length for the caller's chunk_size: rounded up to a power of two and clamped
    to [16, 64] (tl.dot needs >= 16; 128 would quadruple the C x C fp32 tiles of a register-bound kernel).
    The result of the scan does not depend on the chunk length, so this changes only speed."""
    return min(_MAX_CHUNK, max(_MIN_CHUNK, triton.next_power_of_2(chunk_size)))


def _r_block(r_dim: int) -> int:
    return max(16, triton.next_power_of_2(r_dim))


def default_config(p_dim: int) -> SSDConfig:
    """The config used without autotuning (interpreter, explicit config=None off CUDA)."""
    block_p = min(64, max(16, triton.next_power_of_2(p_dim)))
    return next(c for c in CONFIGS if c.block_p == block_p)


def smem_estimate(block_p: int, chunk: int, block_r: int) -> int:
    """Upper estimate in bytes of the shared memory of the chunk kernels (the largest is the backward's
    `_chunk_duv_kernel`): fp32 dot operands at worst (16-bit products take half), 4 (2 C BP + 3 R BP +
    2 C R), plus one fp32 C x C tile. Checked against Triton 3.6's sm_90 compiles at C 64, R 32 before
    the 16-bit products: for BP 16, 32, 64 the largest kernel took 40, 56, 44 KB (bf16 inputs); the
    estimate says 46, 60, 88 KB. With them, R 64, BP 64: 64 KB against 128, and 48 KB since the
    d cum rework of `_chunk_duv_kernel`."""
    return 4 * (2 * chunk * block_p + 3 * block_r * block_p + 2 * chunk * block_r) + 4 * chunk * chunk


def _device_smem(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = triton.runtime.driver.active.utils.get_device_properties(index)
    return int(props["max_shared_mem"])


def prune_configs_for(configs, p_dim: int, chunk: int, block_r: int, smem_limit: int) -> list:
    """The triton.Configs whose P-block is at most the next power of two of P (no block of only idle
    columns) and whose estimated shared memory fits `smem_limit` bytes (99 KB on consumer cards, 227 KB
    on an H100); the smallest always survives. The autotuner also skips a config that fails to compile
    for resources, so the estimate only has to keep the search short."""
    fit = [
        c
        for c in configs
        if c.kwargs["BP"] <= max(16, triton.next_power_of_2(p_dim))
        and smem_estimate(c.kwargs["BP"], chunk, block_r) <= smem_limit
    ]
    return fit or [min(configs, key=lambda c: (c.kwargs["BP"], c.num_warps))]


def _prune_configs(configs, named_args, **kwargs):
    device = next(arg.device for arg in named_args.values() if isinstance(arg, Tensor))
    return prune_configs_for(configs, named_args["P"], kwargs["C"], kwargs["RB"], _device_smem(device))


def _triton_configs() -> list[triton.Config]:
    return [
        triton.Config({"BP": c.block_p}, num_warps=c.num_warps, num_stages=c.num_stages) for c in CONFIGS
    ]


@triton.jit
def _dot(a, b, PREC: tl.constexpr, acc=None):
    """a @ b of fp32 tiles with fp32 accumulation: "ieee" (fp32 inputs: exact fp32 products, the 1e-4
    contract) or "tf32" (bf16/fp16 inputs: tensor cores with 10-bit operands). For a product with a
    computed fp32 operand (the decayed scores, dA, fp32 states): its operands are rounded to tf32
    (2^-11) rather than to bf16 (2^-8); rounded to bf16, they put the max-relative error of y and dX
    at 1.1e-2 for P 64, R 32 (measured with exact products of bf16-rounded operands), over the 1e-2
    budget before the bf16 output's own rounding (~4e-3). Two loaded 16-bit tiles go through `_mm`.
    acc (fp32, optional) is added to the product by the dot itself."""
    if PREC == "ieee":
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision="tf32")


@triton.jit
def _mm(a, b, PREC: tl.constexpr, RAW: tl.constexpr):
    """a @ b of two tiles as loaded (one dtype), fp32 accumulation. RAW with 16-bit tiles: the tensor
    cores in their own dtype (a product of two bf16 or fp16 values is exact in fp32, so this is as
    accurate as widening them to tf32, at twice tf32's rate and half its operand bytes); otherwise
    both are widened to fp32 and multiplied by `_dot`."""
    if RAW and PREC == "tf32":
        return tl.dot(a, b)
    else:
        return _dot(a.to(tl.float32), b.to(tl.float32), PREC)


@triton.jit
def _load_raw(block_ptr):
    """A block-pointer tile (zero outside the tensor) in its stored dtype, for `_mm`."""
    return tl.load(block_ptr, boundary_check=(0, 1), padding_option="zero")


@triton.jit
def _chunk_span(tab_ptr, i_c, T, C: tl.constexpr, VARLEN: tl.constexpr):
    """(t0, t_end): chunk i_c's first token and the end (exclusive) of the tokens it may touch: T, or
    with cu_seqlens its sequence's end from the chunk table (a chunk never crosses a boundary)."""
    if VARLEN:
        t0 = tl.load(tab_ptr + i_c * 4)
        t_end = tl.load(tab_ptr + i_c * 4 + 1)
    else:
        t0 = i_c * C
        t_end = T
    return t0, t_end


@triton.jit
def _load_chunk_decay(la_ptr, i_b, i_h, t0, T, T_END, H, C: tl.constexpr):
    """cum [C] (inclusive cumulative log-decay from the chunk's first token; 0 on padded rows added
    to nothing) and the chunk's total g, for batch row i_b, head i_h, tokens t0 .. min(t0+C, T_END)-1."""
    o_t = t0 + tl.arange(0, C)
    la = tl.load(la_ptr + (i_b.to(tl.int64) * T + o_t) * H + i_h, mask=o_t < T_END, other=0.0).to(tl.float32)
    cum = tl.cumsum(la, 0)
    return cum, tl.sum(la, 0)


# Tiles are addressed through block pointers (a scalar base, shape and strides): a [C, BP] tile of
# 64-bit element pointers would hold two registers per element for the whole kernel, and the chunk
# kernels are register-bound. Out-of-range rows/columns are zero on load and skipped on store.
@triton.jit
def _rows(ptr, i_b, i_h, t0, w0, T, T_END, H, W, C: tl.constexpr, BW: tl.constexpr):
    """Block pointer to rows t0 .. t0+C-1 (those before T_END), columns w0 .. w0+BW-1 of head i_h,
    batch row i_b of a contiguous [B,T,H,W] tensor."""
    base = ptr + (i_b.to(tl.int64) * T * H + i_h) * W
    return tl.make_block_ptr(base, (T_END, W), (H * W, 1), (t0, w0), (C, BW), (1, 0))


@triton.jit
def _load_f32(block_ptr):
    """A block-pointer tile (zero outside the tensor) widened to fp32."""
    return tl.load(block_ptr, boundary_check=(0, 1), padding_option="zero").to(tl.float32)


@triton.jit
def _state_tile(ptr, i_bh, i_c, p0, R, P, NC, RB: tl.constexpr, BP: tl.constexpr):
    """Block pointer to the [RB, BP] tile at column p0 of chunk i_c's R x P state in [B*H,NC,R,P]."""
    base = ptr + (i_bh.to(tl.int64) * NC + i_c) * R * P
    return tl.make_block_ptr(base, (R, P), (P, 1), (0, p0), (RB, BP), (1, 0))


@triton.jit
def _chunk_program(NC, H, NPB):
    """(chunk, b*h, P-block) of this program. The launch is one axis ordered (batch, chunk, head,
    P-block), the last fastest, so the programs in flight read the same tokens of every head: [B,T,H,*]
    rows interleave the heads, and a grid that ran one head's chunks first used 1/H of each DRAM page
    it opened (at T 65536, B 1 the chunk kernels took 7% longer than at T 4096 on an H100; now 1%)."""
    pid = tl.program_id(0)
    i_p = pid % NPB
    rest = pid // NPB
    i_h = rest % H
    rest = rest // H
    i_c = rest % NC
    i_b = rest // NC
    return i_c, i_b * H + i_h, i_p


@triton.jit
def _chunk_state_kernel(
    a_ptr, b_ptr, la_ptr, out_ptr, g_ptr, tab_ptr, T, H, R, P, NC, LOG_BH, LOG_NC,
    C: tl.constexpr, RB: tl.constexpr, BP: tl.constexpr, VARLEN: tl.constexpr, FROM_START: tl.constexpr,
    PREC: tl.constexpr,
):
    """out[b,h,c] = (diag(w) A_c)^T B_c  [R, P] fp32, with A = u (or v), B = x (or dY) [B,T,H,*] and
    w = e^(g - cum) (decayed to the chunk's end: the forward) or e^cum (from its start: the backward).
    Also writes each chunk's total log-decay g to g_ptr [B*H, NC] fp32, for the state pass."""
    i_c, i_bh, i_p = _chunk_program(NC, H, tl.cdiv(P, BP))
    i_b, i_h = i_bh // H, i_bh % H
    t0, t_end = _chunk_span(tab_ptr, i_c, T, C, VARLEN)
    cum, g = _load_chunk_decay(la_ptr, i_b, i_h, t0, T, t_end, H, C)
    w = tl.exp(cum) if FROM_START else tl.exp(g - cum)
    p0 = i_p * BP
    a = tl.load(_rows(a_ptr, i_b, i_h, t0, 0, T, t_end, H, R, C, RB), boundary_check=(0, 1),
                padding_option="zero")
    bt = tl.load(_rows(b_ptr, i_b, i_h, t0, p0, T, t_end, H, P, C, BP), boundary_check=(0, 1),
                 padding_option="zero")
    aw = a.to(tl.float32) * w[:, None]
    bt = bt.to(tl.float32)
    local = _dot(tl.trans(aw), bt, PREC)
    tl.store(_state_tile(out_ptr, i_bh, i_c, p0, R, P, NC, RB, BP), local, boundary_check=(0, 1))
    tl.store(g_ptr + i_bh.to(tl.int64) * NC + i_c, g, mask=i_p == 0)


@triton.jit
def _chunk_output_kernel(
    x_ptr, u_ptr, v_ptr, la_ptr, st_ptr, y_ptr, tab_ptr, T, H, R, P, NC, LOG_BH, LOG_NC,
    C: tl.constexpr, RB: tl.constexpr, BP: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr,
    RAW: tl.constexpr, RAW_S: tl.constexpr,
):
    """y = (V U^T o L) X + diag(e^cum) V S for one (chunk, b*h, P-block); S = state entering the chunk."""
    i_c, i_bh, i_p = _chunk_program(NC, H, tl.cdiv(P, BP))
    i_b, i_h = i_bh // H, i_bh % H
    t0, t_end = _chunk_span(tab_ptr, i_c, T, C, VARLEN)
    cum, _ = _load_chunk_decay(la_ptr, i_b, i_h, t0, T, t_end, H, C)
    p0 = i_p * BP
    u = _load_raw(_rows(u_ptr, i_b, i_h, t0, 0, T, t_end, H, R, C, RB))
    v = _load_raw(_rows(v_ptr, i_b, i_h, t0, 0, T, t_end, H, R, C, RB))
    x = _load_f32(_rows(x_ptr, i_b, i_h, t0, p0, T, t_end, H, P, C, BP))
    s = _load_raw(_state_tile(st_ptr, i_bh, i_c, p0, R, P, NC, RB, BP))  # fp32, or bf16 when compact
    o_c = tl.arange(0, C)
    causal = o_c[:, None] >= o_c[None, :]
    # Masked before exp: above the diagonal the difference is positive and could overflow.
    decay = tl.exp(tl.where(causal, cum[:, None] - cum[None, :], float("-inf")))
    scores = _mm(v, tl.trans(u), PREC, RAW) * decay
    y = _dot(scores, x, PREC)
    y += tl.exp(cum)[:, None] * _mm(v, s, PREC, RAW_S)  # diag(e^cum) (V S): the rows scale after the product
    tl.store(_rows(y_ptr, i_b, i_h, t0, p0, T, t_end, H, P, C, BP), y.to(y_ptr.dtype.element_ty),
             boundary_check=(0, 1))


@triton.jit
def _chunk_dx_kernel(
    u_ptr, v_ptr, la_ptr, dst_ptr, dy_ptr, dx_ptr, tab_ptr, T, H, R, P, NC, LOG_BH, LOG_NC,
    C: tl.constexpr, RB: tl.constexpr, BP: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr,
    RAW: tl.constexpr, RAW_S: tl.constexpr,
):
    """dX = A^T dY + diag(e^(g-cum)) U dS' for one (chunk, b*h, P-block), A = V U^T o L; dS' = gradient
    of the state leaving the chunk, [B,H,NC,R,P] fp32 (bf16 with compact states)."""
    i_c, i_bh, i_p = _chunk_program(NC, H, tl.cdiv(P, BP))
    i_b, i_h = i_bh // H, i_bh % H
    t0, t_end = _chunk_span(tab_ptr, i_c, T, C, VARLEN)
    p0 = i_p * BP
    cum, g = _load_chunk_decay(la_ptr, i_b, i_h, t0, T, t_end, H, C)
    u = _load_raw(_rows(u_ptr, i_b, i_h, t0, 0, T, t_end, H, R, C, RB))
    v = _load_raw(_rows(v_ptr, i_b, i_h, t0, 0, T, t_end, H, R, C, RB))
    dy = _load_f32(_rows(dy_ptr, i_b, i_h, t0, p0, T, t_end, H, P, C, BP))
    ds = _load_raw(_state_tile(dst_ptr, i_bh, i_c, p0, R, P, NC, RB, BP))
    o_c = tl.arange(0, C)
    # A^T[s, t] = (u_s . v_t) exp(cum_t - cum_s) for t >= s, built transposed (no register transpose);
    # masked before exp: the other side's difference is positive and could overflow.
    causal_t = o_c[:, None] <= o_c[None, :]
    a_t = _mm(u, tl.trans(v), PREC, RAW) * tl.exp(tl.where(causal_t, cum[None, :] - cum[:, None], float("-inf")))
    dx = _dot(a_t, dy, PREC) + tl.exp(g - cum)[:, None] * _mm(u, ds, PREC, RAW_S)
    tl.store(_rows(dx_ptr, i_b, i_h, t0, p0, T, t_end, H, P, C, BP), dx.to(dx_ptr.dtype.element_ty),
             boundary_check=(0, 1))


@triton.jit
def _chunk_duv_kernel(
    x_ptr, u_ptr, v_ptr, la_ptr, st_ptr, dst_ptr, dy_ptr, du_ptr, dv_ptr, dla_ptr,
    tab_ptr, T, H, R, P: tl.constexpr, NC, LOG_BH, LOG_NC,
    C: tl.constexpr, RB: tl.constexpr, BP: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr,
    RAW: tl.constexpr, RAW_S: tl.constexpr,
):
    """dU, dV (in u's dtype) and d log_a (fp32) of one (chunk, b*h). S, dS' = state entering /
    gradient of the state leaving the chunk, [B,H,NC,R,P] fp32 each (bf16 with compact states). The
    terms that sum over P (dY X^T, X dS'^T, dY S^T, <S, dS'>) are accumulated over blocks of BP columns
    in registers, so every output is written once, whole (no partials, no atomics). Formulas: the
    module docstring; d cum comes from dU and dV themselves (<v, dV> - <u, dU>), so no C x C tile of
    dA o V U^T is formed, and each state term is the accumulator its dot product adds onto. On an H100
    (bf16, T 2048, P = R = 64, BP 64, 4 warps) that took the kernel from 0.70 to 0.53 ms (profile_scan.json): it spilled
    ~1.2 KB a thread before, ~0.7 KB now (benchmarks/ptxas_ssd_kernels.py)."""
    i_c, i_bh, _ = _chunk_program(NC, H, 1)
    i_b, i_h = i_bh // H, i_bh % H
    t0, t_end = _chunk_span(tab_ptr, i_c, T, C, VARLEN)
    dyx = tl.zeros([C, C], dtype=tl.float32)  # dY X^T
    xds = tl.zeros([C, RB], dtype=tl.float32)  # X dS'^T
    dys = tl.zeros([C, RB], dtype=tl.float32)  # dY S^T
    sds = 0.0  # <S, dS'>
    # Loaded before the loop over P, so their latency hides behind it.
    cum, g = _load_chunk_decay(la_ptr, i_b, i_h, t0, T, t_end, H, C)
    u_raw = _load_raw(_rows(u_ptr, i_b, i_h, t0, 0, T, t_end, H, R, C, RB))
    v_raw = _load_raw(_rows(v_ptr, i_b, i_h, t0, 0, T, t_end, H, R, C, RB))
    for p0 in range(0, P, BP):
        x = _load_raw(_rows(x_ptr, i_b, i_h, t0, p0, T, t_end, H, P, C, BP))
        dy = _load_raw(_rows(dy_ptr, i_b, i_h, t0, p0, T, t_end, H, P, C, BP))
        s = _load_raw(_state_tile(st_ptr, i_bh, i_c, p0, R, P, NC, RB, BP))
        ds = _load_raw(_state_tile(dst_ptr, i_bh, i_c, p0, R, P, NC, RB, BP))
        dyx += _mm(dy, tl.trans(x), PREC, RAW)
        xds += _mm(x, tl.trans(ds), PREC, RAW_S)
        dys += _mm(dy, tl.trans(s), PREC, RAW_S)
        sds += tl.sum(tl.sum(s.to(tl.float32) * ds.to(tl.float32), 1), 0)

    u, v = u_raw.to(tl.float32), v_raw.to(tl.float32)
    w_end = tl.exp(g - cum)  # e^(g - cum): from t to the chunk's end
    w = w_end * tl.sum(u * xds, 1)  # through e^(g - cum), summed into dg below
    o_c = tl.arange(0, C)
    causal = o_c[:, None] >= o_c[None, :]
    da = dyx * tl.exp(tl.where(causal, cum[:, None] - cum[None, :], float("-inf")))  # dY X^T o L
    du = _dot(tl.trans(da), v, PREC, w_end[:, None] * xds)
    tl.store(_rows(du_ptr, i_b, i_h, t0, 0, T, t_end, H, R, C, RB), du.to(du_ptr.dtype.element_ty),
             boundary_check=(0, 1))
    dcum = -tl.sum(u * du, 1)
    dv = _dot(da, u, PREC, tl.exp(cum)[:, None] * dys)  # e^cum: from the chunk's start to t
    tl.store(_rows(dv_ptr, i_b, i_h, t0, 0, T, t_end, H, R, C, RB), dv.to(dv_ptr.dtype.element_ty),
             boundary_check=(0, 1))
    dcum += tl.sum(v * dv, 1)
    # g = cum_{C-1} collects e^g <S, dS'> and the sum of w.
    dcum += tl.where(o_c == C - 1, tl.exp(g) * sds + tl.sum(w, 0), 0.0)
    dla = tl.cumsum(dcum, 0, reverse=True)  # d log_a_j = sum_{t >= j} dcum_t within the chunk
    o_t = t0 + o_c
    tl.store(dla_ptr + (i_b.to(tl.int64) * T + o_t) * H + i_h, dla, mask=o_t < t_end)


# Dot products of two 16-bit tiles as loaded (u, v, x, dY, and the chunk states when they are saved in
# the inputs' dtype) run on the tensor cores in that dtype instead of widened to tf32: the products are
# exact either way, and bf16 operands take half the shared memory and twice the rate of tf32. Products
# with a computed fp32 operand (decayed scores, dA) stay tf32 (see `_dot`).
RAW_DOTS_BY_DEFAULT = True


def _raw_meta(x_dtype: torch.dtype, *state_dtypes: torch.dtype) -> dict:
    """RAW / RAW_S of the chunk kernels: 16-bit inputs' own dot products, and those with the states
    too when every state tensor the kernel reads has the inputs' dtype."""
    # Not under Triton 3.6's interpreter: its tl.dot of bf16 tiles returns garbage (~1e10 off for
    # unit-normal 16 x 16 tiles), so the interpreter tests run the widened products and the GPU tests
    # (tests/gpu/test_semiseparable_gpu.py, the default path) these.
    raw = RAW_DOTS_BY_DEFAULT and x_dtype in (torch.bfloat16, torch.float16) and not interpreter_enabled()
    return dict(RAW=raw, RAW_S=raw and all(d == x_dtype for d in state_dtypes))


def _prec(dtype: torch.dtype) -> str:
    """The `_dot` mode: fp32 inputs keep exact fp32 products; for bf16/fp16 inputs, products with a
    computed fp32 operand run on tf32 tensor cores (those of two loaded 16-bit tiles: `_mm`)."""
    return "ieee" if dtype == torch.float32 else "tf32"


# Tuned per (P, R, chunk, bit length of B*H and of the number of chunks): the best P-block depends on
# how many programs the grid has; buckets keep a new T from re-tuning on every call.
_TUNE = dict(key=["P", "R", "C", "LOG_BH", "LOG_NC"], prune_configs_by={"early_config_prune": _prune_configs})
_chunk_state_tuned = triton.autotune(configs=_triton_configs(), **_TUNE)(_chunk_state_kernel)
_chunk_output_tuned = triton.autotune(configs=_triton_configs(), **_TUNE)(_chunk_output_kernel)
_chunk_dx_tuned = triton.autotune(configs=_triton_configs(), **_TUNE)(_chunk_dx_kernel)
_chunk_duv_tuned = triton.autotune(configs=_triton_configs(), **_TUNE)(_chunk_duv_kernel)


def _launch_chunks(kernel, tuned, shape, config: SSDConfig | None, args: tuple, **meta) -> None:
    """Runs a chunk kernel over chunks x B*H x P-blocks (one grid axis: `_chunk_program`) with `config`,
    or autotuned on CUDA when config is None; `_chunk_duv_kernel` walks P itself (no P-blocks).
    shape = (B, T, H, P, R, NC); args end with the chunk table (any tensor without VARLEN)."""
    b, t, h, p, r, nc = shape
    full = (*args, t, h, r, p, nc, (b * h).bit_length(), nc.bit_length())
    walks_p = kernel is _chunk_duv_kernel
    if config is None and not interpreter_enabled():
        tuned[lambda m: (nc * b * h * (1 if walks_p else triton.cdiv(p, m["BP"])),)](*full, **meta)
        return
    cfg = config or default_config(p)
    grid = (nc * b * h * (1 if walks_p else triton.cdiv(p, cfg.block_p)),)
    kernel[grid](*full, BP=cfg.block_p, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **meta)


def _check_kernel_inputs(x: Tensor, log_a: Tensor, initial_state: Tensor | None) -> None:
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or log_a.dtype != torch.float32 or (
        initial_state is not None and initial_state.dtype != torch.float32
    ):
        raise NotImplementedError(
            "semiseparable_triton: the kernels compute in fp32 (x, u, v fp32/bf16/fp16; log_a and "
            f"initial_state fp32), got x {x.dtype}, log_a {log_a.dtype}, initial_state "
            f"{None if initial_state is None else initial_state.dtype}; fp64 runs on the torch reference "
            "(impl='torch' or impl=None)"
        )


def _layout(x: Tensor, u: Tensor, chunk_size: int, cu_seqlens: Tensor | None):
    """(shape (B, T, H, P, R, NC), kernel chunk, chunk table or None, number of sequences)."""
    b, t, h, p = x.shape
    chunk = kernel_chunk(chunk_size)
    if cu_seqlens is None:
        return (b, t, h, p, u.shape[-1], triton.cdiv(t, chunk)), chunk, None, b
    if b != 1:
        raise ValueError(f"semiseparable_triton: with cu_seqlens the batch size must be 1, got B={b}")
    table = chunk_table(cu_seqlens, chunk, x.device)
    return (b, t, h, p, u.shape[-1], table.shape[0]), chunk, table, cu_seqlens.numel() - 1


def _walk_plan(fused_states: bool | None, two_levels: bool | None, shape: tuple) -> tuple[bool, bool]:
    """(fused, two levels): whether the chunk states come from `fused_states.py`'s fused walk instead of
    `_chunk_state_kernel` + `state_pass`, and in how many levels (None: the policies of
    `fused_states.resolve_walk`). Imported here: it imports this module."""
    from muse_lm.ops.semiseparable.fused_states import resolve_walk

    b, _, h, p, r, nc = shape
    return resolve_walk(fused_states, two_levels, b * h, nc, r * p)


def saved_state_dtype(x_dtype: torch.dtype, fused_states: bool | None = None,
                      compact_states: bool | None = None) -> torch.dtype:
    """The dtype of the entering states the forward saves for the backward, for inputs of `x_dtype`:
    bf16 for bf16 inputs when the fused walk runs (`fused_states.resolve_fused`) with compact states
    (None: `fused_states.use_compact_states`), else fp32. The custom op's fake implementation asks the
    same question, so compiled graphs see the dtype the kernels write. It does not depend on the
    shape: asking the shape-dependent walk policies there put guards on T into compiled graphs, and
    crossing a policy threshold recompiled the model."""
    from muse_lm.ops.semiseparable.fused_states import resolve_fused

    return _state_dtype(x_dtype, resolve_fused(fused_states), compact_states)


def _state_dtype(x_dtype: torch.dtype, fused: bool, compact_states: bool | None) -> torch.dtype:
    """`saved_state_dtype` once the walk is known (`_forward` has decided it already)."""
    from muse_lm.ops.semiseparable.fused_states import resolve_compact_states

    # bf16 only: a state sums a whole sequence's contributions, and without decay it can pass fp16's
    # 65504 where bf16 (fp32's range) cannot; fp32 inputs keep fp32 states.
    if compact_states and x_dtype != torch.bfloat16:
        raise ValueError(
            f"semiseparable_forward: compact_states=True saves bf16 states and needs bf16 inputs, got {x_dtype}: "
            "fp16 states could overflow (a state sums a whole sequence) and fp32 inputs keep fp32 states; pass "
            "compact_states=None or False"
        )
    compact = resolve_compact_states(compact_states, fused)
    return x_dtype if compact and x_dtype == torch.bfloat16 else torch.float32


def _chunk_states(a, b, log_a, states, init, layout, config, walk: tuple[bool, bool], reverse: bool, meta):
    """Writes each chunk's state into `states` (forward: a, b = u, x, the state entering the chunk;
    backward, reverse: v, dY, the gradient of the state leaving it) by the fused walk or by the chunk
    kernel + `state_pass`, in one level or two (walk = `_walk_plan`); returns (the final states, or
    d initial_state, and the tensor the later kernels take as their chunk table: the table itself, or
    any tensor when there is none)."""
    shape, chunk, table, n_seq = layout
    fused, two_levels = walk
    if fused:
        from muse_lm.ops.semiseparable.fused_states import fused_chunk_states, fused_group_size

        group = fused_group_size(shape[-1]) if two_levels else None
        final = fused_chunk_states(a, b, log_a, states, init, n_seq, chunk, table, reverse=reverse, group=group)
        return final, states if table is None else table  # never read without VARLEN
    bsz, _, h, _, _, nc = shape
    g = torch.empty(bsz * h, nc, device=a.device, dtype=torch.float32)
    tab = g if table is None else table
    _launch_chunks(_chunk_state_kernel, _chunk_state_tuned, shape, config, (a, b, log_a, states, g, tab),
                   FROM_START=reverse, **meta)
    return state_pass(states, g, init, n_seq, h, table, reverse=reverse, two_levels=two_levels), tab


def _forward(x, u, v, log_a, initial_state, layout, config, two_levels, out, fused_states=None,
             compact_states=None):
    shape, chunk, table, n_seq = layout
    b, t, h, p, r, nc = shape
    walk = _walk_plan(fused_states, two_levels, shape)
    if out is None:
        out = torch.empty_like(x)
    elif out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"semiseparable_forward: out must be contiguous {tuple(x.shape)} {x.dtype}")
    # Compact: bf16 inputs keep their saved chunk states in bf16 (the walk itself runs in fp32
    # registers); half the states' traffic and memory, for an error below the bf16 output's own.
    state_dtype = _state_dtype(x.dtype, walk[0], compact_states)
    states = torch.empty(b, h, nc, r, p, device=x.device, dtype=state_dtype)
    if x.numel() == 0 or u.numel() == 0:  # B, H, P or R is 0: nothing to launch, y = 0
        out.zero_()
        final = torch.zeros(n_seq, h, r, p, device=x.device, dtype=torch.float32)
        return out, (final if initial_state is None else final + initial_state), states
    init = None if initial_state is None else initial_state.contiguous()
    meta = dict(C=chunk, RB=_r_block(r), PREC=_prec(x.dtype), VARLEN=table is not None)
    final, tab = _chunk_states(u, x, log_a, states, init, layout, config, walk, False, meta)
    _launch_chunks(_chunk_output_kernel, _chunk_output_tuned, shape, config, (x, u, v, log_a, states, out, tab),
                   **meta, **_raw_meta(x.dtype, states.dtype))
    return out, final, states


def _backward(x, u, v, log_a, states, grad_y, grad_final, layout, config, two_levels, fused_states=None):
    shape, chunk, table, n_seq = layout
    b, t, h, p, r, nc = shape
    walk = _walk_plan(fused_states, two_levels, shape)
    if x.numel() == 0 or u.numel() == 0:  # B, H, P or R is 0: every gradient is empty or zero
        d_init = torch.zeros(n_seq, h, r, p, device=x.device, dtype=torch.float32)
        if grad_final is not None:  # an empty state (or no token in the way) passes its gradient through
            d_init = d_init + grad_final
        return torch.zeros_like(x), torch.zeros_like(u), torch.zeros_like(v), torch.zeros_like(log_a), d_init
    # Autograd may hand an expanded (broadcast) gradient: materialize it.
    dy = torch.zeros_like(x) if grad_y is None else grad_y.to(x.dtype).contiguous()
    dfinal = None if grad_final is None else grad_final.to(torch.float32).contiguous()
    meta = dict(C=chunk, RB=_r_block(r), PREC=_prec(x.dtype), VARLEN=table is not None)
    # The fused walk stores the states' gradients like the forward stored the states (compact or fp32);
    # the unfused walk accumulates in place and needs fp32.
    dstates = torch.empty(states.shape, device=x.device, dtype=states.dtype if walk[0] else torch.float32)
    d_init, tab = _chunk_states(v, dy, log_a, dstates, dfinal, layout, config, walk, True, meta)
    dx, du, dv = torch.empty_like(x), torch.empty_like(u), torch.empty_like(v)
    dla = torch.empty(log_a.shape, device=x.device, dtype=torch.float32)
    raw = _raw_meta(x.dtype, states.dtype, dstates.dtype)
    _launch_chunks(_chunk_dx_kernel, _chunk_dx_tuned, shape, config, (u, v, log_a, dstates, dy, dx, tab), **meta,
                   **raw)
    _launch_chunks(_chunk_duv_kernel, _chunk_duv_tuned, shape, config,
                   (x, u, v, log_a, states, dstates, dy, du, dv, dla, tab), **meta, **raw)
    return dx, du, dv, dla, d_init


def semiseparable_forward(
    x: Tensor,
    u: Tensor,
    v: Tensor,
    log_a: Tensor,
    initial_state: Tensor | None,
    chunk_size: int = 64,
    config: SSDConfig | None = None,
    *,
    out: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    two_levels: bool | None = None,
    fused_states: bool | None = None,
    compact_states: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y [B,T,H,P] in x's dtype, final state [B|N,H,R,P] fp32, entering states [B,H,NC,R,P] fp32, or
    bf16 with compact states), no autograd.

    x [B,T,H,P], u, v [B,T,H,R] (one dtype: fp32/bf16/fp16), log_a [B,T,H] fp32, initial_state
    [B|N,H,R,P] fp32 or None. cu_seqlens [N+1] (B = 1): packed sequences, each in its own chunks (NC
    counts them all). two_levels: the walk over chunk states in two levels (True), one (False) or
    chosen by policy (None: `fused_states.use_fused_two_levels` for the fused walk,
    `state_pass.use_two_levels` for the unfused one). fused_states: the chunk states from a walk fused
    with each chunk's contribution (`fused_states.py`, True), the unfused kernels (False) or chosen by
    `fused_states.FUSED_STATES_BY_DEFAULT` (None; on). `config` sets the chunk kernels; the fused walk autotunes
    on CUDA or takes its own default config.
    compact_states (True needs the fused walk; None: `fused_states.use_compact_states`, on):
    bf16 inputs save the entering states in bf16 (the backward then keeps the states' gradients so
    too); True with fp16 or fp32 inputs raises (fp16's range could overflow a state). `out`
    (contiguous, shaped and typed like x) is written in place when given (tests poison it). The
    entering states are what the backward needs.
    """
    _check_kernel_inputs(x, log_a, initial_state)
    x, u, v, log_a = (t.contiguous() for t in (x, u, v, log_a))
    layout = _layout(x, u, chunk_size, cu_seqlens)
    return _forward(x, u, v, log_a, initial_state, layout, config, two_levels, out, fused_states, compact_states)


def semiseparable_backward(
    x: Tensor,
    u: Tensor,
    v: Tensor,
    log_a: Tensor,
    states: Tensor,
    grad_y: Tensor | None,
    grad_final: Tensor | None,
    chunk_size: int = 64,
    config: SSDConfig | None = None,
    *,
    cu_seqlens: Tensor | None = None,
    two_levels: bool | None = None,
    fused_states: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, du, dv in x's dtype, d log_a fp32, d initial_state [B|N,H,R,P] fp32) from the forward's
    inputs (the same cu_seqlens), its entering states and the gradients of y and of the final state
    (None means zero). two_levels, fused_states: the walk over the states' gradients, as in
    `semiseparable_forward` (either walk may follow either forward)."""
    x, u, v, log_a = (t.contiguous() for t in (x, u, v, log_a))
    layout = _layout(x, u, chunk_size, cu_seqlens)
    return _backward(x, u, v, log_a, states, grad_y, grad_final, layout, config, two_levels, fused_states)


class SemiseparableTriton(torch.autograd.Function):
    """(y, final state) = semiseparable_forward(...); the backward recomputes each chunk from the saved
    inputs and the states entering each chunk ([B,H,NC,R,P] fp32, or bf16 when compact)."""

    @staticmethod
    def forward(ctx, x, u, v, log_a, initial_state, chunk_size: int, config, cu_seqlens, two_levels):
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not zeros
        x, u, v, log_a = (t.contiguous() for t in (x, u, v, log_a))
        layout = _layout(x, u, chunk_size, cu_seqlens)  # built once: the chunk table costs a host sync
        y, final, states = _forward(x, u, v, log_a, initial_state, layout, config, two_levels, None)
        ctx.save_for_backward(x, u, v, log_a, states)
        ctx.layout, ctx.config, ctx.two_levels = layout, config, two_levels
        ctx.has_init = initial_state is not None
        return y, final

    @staticmethod
    def backward(ctx, grad_y, grad_final):
        x, u, v, log_a, states = ctx.saved_tensors
        dx, du, dv, dla, d_init = _backward(
            x, u, v, log_a, states, grad_y, grad_final, ctx.layout, ctx.config, ctx.two_levels
        )
        needs = ctx.needs_input_grad
        grads = [g if n else None for g, n in zip((dx, du, dv, dla), needs[:4])]
        return (*grads, d_init if ctx.has_init and needs[4] else None, None, None, None, None)


def semiseparable_triton(
    x: Tensor,
    u: Tensor,
    v: Tensor,
    log_a: Tensor,
    *,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    chunk_size: int = 64,
    config: SSDConfig | None = None,
    two_levels: bool | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Differentiable Triton scan; same contract as `muse_lm.ops.semiseparable_scan` (which validates and
    dispatches here). config None autotunes over `CONFIGS` on CUDA (the default config under the
    interpreter); two_levels as in `semiseparable_forward`.

    The model's case (no cu_seqlens, config and two_levels automatic) runs through the custom ops of
    `custom_ops.py`, which `torch.compile` keeps inside its graph; the others through the autograd
    Function behind `compile_boundary`."""
    _check_kernel_inputs(x, log_a, initial_state)
    if cu_seqlens is None and config is None and two_levels is None:
        from muse_lm.ops.semiseparable.custom_ops import semiseparable_custom

        y, final = semiseparable_custom(x, u, v, log_a, initial_state, chunk_size)
    else:
        y, final = _semiseparable_function(x, u, v, log_a, initial_state, chunk_size, config, cu_seqlens, two_levels)
    return y, (final if output_final_state else None)


@compile_boundary
def _semiseparable_function(x, u, v, log_a, initial_state, chunk_size, config, cu_seqlens, two_levels):
    return SemiseparableTriton.apply(x, u, v, log_a, initial_state, chunk_size, config, cu_seqlens, two_levels)
