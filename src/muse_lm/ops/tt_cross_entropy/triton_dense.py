"""Dense fused linear cross-entropy: Triton kernels, launchers and the autograd Function.

loss_i = lse_i - logit_i[t_i] + z_loss * lse_i**2 with logits = h @ W.T (h `[N, D]`, W `[V, D]`);
ignored tokens give 0 and no gradient. No `[N, V]` tensor ever exists.

Forward (`_lce_fwd_kernel`): grid (cdiv(N, BM), SPLIT_V). A program streams its vocab range in
BV blocks; each logits tile `[BM, BV]` is accumulated over D in BK chunks with tl.dot (fp32
accumulators), columns >= V are -inf, and an online (max, sumexp) runs per row; the target logit is
picked where it lies. Per-split partials `[SPLIT_V, N]` are combined in torch (a few N-vectors).

Backward (`_lce_bwd_kernel`): grid over (row tile, vocab tile) pairs in grouped order (GROUP_M row
tiles share a vocab tile, so W and h tiles are reused from L2). A program recomputes its logits
tile, forms dl = g_i * ((1 + 2 z lse_i) * softmax - onehot) (0 for ignored rows and v >= V), then
per D chunk adds dl @ W[tile] into dh and (h[tile]^T @ dl)^T into dW with fp32 atomics. Float
atomics add in whatever order programs arrive, so gradients are nondeterministic in the last bits.

Memory (`peak_memory_bytes`): dW of a 16-bit weight is accumulated one vocab chunk (<=
`_DW_CHUNK_ELEMENTS`) per launch in an fp32 view of dW's own still-unwritten rows, then narrowed onto
the chunk's rows in place (`_dw_plan`, `_narrow_in_place`). A 16-bit backward needing both
gradients runs in two passes (`lce_backward`): dh first, by row chunks hosted the same way in dh's
unwritten rows, then dW; beyond the gradients only < 2 MiB. The one-pass backward (other dtypes,
one gradient) keeps fp32 dh accumulators (N x D x 4), a 16-bit dh narrowed into their first half's
bytes (`_finish_dh`), so no fp32 copy of either gradient outlives the op.

Math is fp32 (accumulate fp32); 16-bit inputs of one dtype feed tl.dot directly (tensor cores),
anything else is cast to fp32 in the kernel and multiplied with input_precision="ieee". The loss
is fp32; gradients come back in the inputs' dtypes. The whole op is free of host syncs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from muse_lm.ops._config import check_at_least_one, check_tiles, check_warps
from muse_lm.ops._dispatch import compile_boundary, interpreter_enabled
from muse_lm.ops.tt_cross_entropy.reference import _reduce, _token_weights, combine_lse_partials

# fp32 dW accumulator of a 16-bit weight: at most 2**23 elements (32 MiB) per vocab chunk, as
# measured (a bigger chunk's atomics would spill out of an H100's 50 MiB L2 more).
_DW_CHUNK_ELEMENTS = 1 << 23


@dataclass(frozen=True)
class LCEConfig:
    """Tile shape of both kernels: rows BM x vocab BV per tile, D chunk BK, warps, pipeline stages,
    and GROUP_M (row tiles that share a vocab tile in the backward's launch order)."""

    block_m: int
    block_v: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8

    def __post_init__(self):
        check_tiles(self, "block_m", "block_v", "block_k", minimum=16, why="tl.dot tiles")
        check_warps(self, (1, 2, 4, 8, 16))
        check_at_least_one(self, "num_stages", "group_m")

    def smem_bytes(self, elem_bytes: int) -> int:
        """Shared-memory estimate of the larger (backward) kernel: (stages + 1) sets of h and W
        chunks over its two pipelined D loops, plus the dl tile. Compiled offline with Triton 3.6
        it is exact for the 16-bit default on sm_90 (160 KiB) and an upper bound for every other
        config on sm_90 and sm_89, fp32 and bf16."""
        tiles = (self.num_stages + 1) * (self.block_m + self.block_v) * self.block_k
        return (tiles + self.block_m * self.block_v) * elem_bytes


# Every declared config is checked against the reference (interpreter and GPU tests); the GPU
# benchmark times each. Those over a device's shared memory are pruned there (`usable_configs`).
# Estimates at 2 bytes (bf16) / 4 bytes (fp32) per element:
CONFIGS = (
    LCEConfig(128, 128, 64, 8, 3),  # 160 KiB at bf16: the 16-bit fallback under ~227 KiB
    LCEConfig(128, 256, 32, 8, 3),  # 160 KiB at bf16: the 16-bit default on H100-class cards (BK 64: 256 KiB)
    LCEConfig(64, 128, 64, 4, 3),  # 112 KiB at bf16
    LCEConfig(128, 128, 32, 8, 2),  # 80 KiB at bf16: the 16-bit default on a 99 KB card
    LCEConfig(64, 64, 32, 4, 2),  # 64 KiB at fp32: the fp32 default (ieee dots run on the FMA units)
    LCEConfig(16, 64, 64, 4, 2, group_m=1),  # a few tokens (decode-sized N)
)

# Preference order of the default table, best first; the first usable one wins. H100, N 16384,
# V 50257, D 1024, bf16: BV 256 / BK 32 took 24.0 ms fwd+bwd vs 25.9 for 128 / 64 (half the dh
# atomics: each row tile meets half as many vocab tiles).
_PREFERRED_16BIT = (CONFIGS[1], CONFIGS[0], CONFIGS[3], CONFIGS[2], CONFIGS[4])
_PREFERRED_FP32 = (CONFIGS[4], CONFIGS[5])


def default_config(n_rows: int, dot_f32: bool, usable: tuple[LCEConfig, ...] = CONFIGS) -> LCEConfig:
    """Table: tiny N wastes little with BM 16; fp32 ieee dots want small tiles; else 128 x 256
    (64-row tiles up to 64 rows). `usable`: the configs that fit the device."""
    if n_rows <= 16 and CONFIGS[5] in usable:
        return CONFIGS[5]
    prefs = _PREFERRED_FP32 if dot_f32 else _PREFERRED_16BIT
    if not dot_f32 and n_rows <= 64:
        prefs = (CONFIGS[2], *prefs)
    for cfg in prefs:
        if cfg in usable:
            return cfg
    raise ValueError(f"linear_cross_entropy_triton: no declared config fits this device's shared memory: {CONFIGS}")


@functools.cache
def _max_shared_mem(device_index: int) -> int:
    props = triton.runtime.driver.active.utils.get_device_properties(device_index)
    return int(props["max_shared_mem"])


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def usable_configs(device: torch.device, dot_f32: bool) -> tuple[LCEConfig, ...]:
    """CONFIGS whose shared-memory estimate fits `device` (all of them under the interpreter)."""
    if device.type != "cuda":
        return CONFIGS
    limit = _max_shared_mem(_device_index(device))
    return tuple(c for c in CONFIGS if c.smem_bytes(4 if dot_f32 else 2) <= limit)


@triton.jit
def _dot(a, b, acc, DOT_F32: tl.constexpr):
    """acc + a @ b: fp32 ieee for fp32 (or mixed) inputs, tensor cores for one 16-bit dtype."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _logits_tile(
    h_ptr,
    w_ptr,
    rows,
    cols,
    row_ok,
    col_ok,
    D: tl.constexpr,
    BM: tl.constexpr,
    BV: tl.constexpr,
    BK: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """h[rows] @ W[cols].T accumulated over D in BK chunks: `[BM, BV]` fp32 (0 where masked)."""
    h_base = h_ptr + rows.to(tl.int64)[:, None] * D
    w_base = w_ptr + cols.to(tl.int64)[None, :] * D
    acc = tl.zeros([BM, BV], dtype=tl.float32)
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < D
        h = tl.load(h_base + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
        w_t = tl.load(w_base + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # [BK, BV]
        acc = _dot(h, w_t, acc, DOT_F32)  # [BM, BK] @ [BK, BV] -> [BM, BV]
    return acc


@triton.jit
def _lce_fwd_kernel(
    h_ptr,
    w_ptr,
    t_ptr,
    m_ptr,
    s_ptr,
    tgt_ptr,
    N,
    V,
    BLOCKS_PER_SPLIT,
    D: tl.constexpr,
    BM: tl.constexpr,
    BV: tl.constexpr,
    BK: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """Partials of split `pid_s` for rows of tile `pid_m`: running max, sum of exp(logit - max),
    and the target logit (0 unless the target lies in this split), each at [pid_s, row]."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < N
    t = tl.load(t_ptr + rows, mask=row_ok, other=-1)
    m_run = tl.full([BM], float("-inf"), dtype=tl.float32)
    s_run = tl.zeros([BM], dtype=tl.float32)
    tgt = tl.zeros([BM], dtype=tl.float32)
    v_lo = pid_s * BLOCKS_PER_SPLIT * BV
    # A while loop: Triton 3.6's interpreter (with numpy >= 2.3) cannot take runtime range() bounds.
    # Only the inner D loop (D is constexpr) needs to be a pipelined for loop.
    i = 0
    while i < BLOCKS_PER_SPLIT:
        cols = v_lo + i * BV + tl.arange(0, BV)
        col_ok = cols < V
        acc = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, D, BM, BV, BK, DOT_F32)
        acc = tl.where(col_ok[None, :], acc, float("-inf"))
        # col_ok too: a target at or past V (the chunked TT head shifts targets of later chunks
        # there) must not pick the -inf of a block wholly past V that ends the last split.
        hit = (cols[None, :] == t[:, None]) & col_ok[None, :]
        tgt += tl.sum(tl.where(hit, acc, 0.0), axis=1)
        m_new = tl.maximum(m_run, tl.max(acc, axis=1))
        # The last split may end in blocks wholly past V (all -inf): keep exp() away from -inf - -inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_run = s_run * tl.exp(m_run - m_safe) + tl.sum(tl.exp(acc - m_safe[:, None]), axis=1)
        m_run = m_new
        i += 1
    out = pid_s.to(tl.int64) * N + rows
    tl.store(m_ptr + out, m_run, mask=row_ok)
    tl.store(s_ptr + out, s_run, mask=row_ok)
    tl.store(tgt_ptr + out, tgt, mask=row_ok)


@triton.jit
def _grouped_tile(pid, n_m, n_v, GROUP_M: tl.constexpr):
    """(row tile, vocab tile) of program `pid`: GROUP_M consecutive programs share a vocab tile."""
    per_group = GROUP_M * n_v
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_v = (pid % per_group) // size_m
    return pid_m, pid_v


@triton.jit
def _lce_bwd_kernel(
    h_ptr,
    w_ptr,
    t_ptr,
    lse_ptr,
    coef_ptr,
    g_ptr,
    dh_ptr,
    dh2_ptr,
    dw_ptr,
    N,
    ROWS_A,
    V_START,
    V_STOP,
    D: tl.constexpr,
    BM: tl.constexpr,
    BV: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_F32: tl.constexpr,
    COMPUTE_DH: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
):
    """dh += dl @ W[cols], dW[cols - V_START] += (h[rows]^T @ dl)^T for vocab cols in [V_START, V_STOP).

    coef_i = g_i (1 + 2 z lse_i) and g_i are 0 for ignored rows; dw_ptr points at a buffer whose row
    0 is vocab row V_START. dh rows < ROWS_A live in dh_ptr, the rest in dh2_ptr (its row 0 is row
    ROWS_A): two allocations, so the first can become the 16-bit dh in place (`_finish_dh`).
    """
    pid_m, pid_v = _grouped_tile(tl.program_id(0), tl.cdiv(N, BM), tl.cdiv(V_STOP - V_START, BV), GROUP_M)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = V_START + pid_v * BV + tl.arange(0, BV)
    row_ok = rows < N
    col_ok = cols < V_STOP
    acc = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, D, BM, BV, BK, DOT_F32)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    t = tl.load(t_ptr + rows, mask=row_ok, other=-1)
    dl = tl.exp(acc - lse[:, None]) * coef[:, None] - tl.where(cols[None, :] == t[:, None], g[:, None], 0.0)
    dl = tl.where(col_ok[None, :], dl, 0.0)  # [BM, BV]; rows past N have coef = g = 0
    if not DOT_F32:
        dl = dl.to(h_ptr.dtype.element_ty)
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    # Per-row select: the pointers stay contiguous along D, so the atomics vectorize as before.
    dh_rows = tl.where(rows < ROWS_A, dh_ptr + rows64 * D, dh2_ptr + (rows64 - ROWS_A) * D)
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < D
        if COMPUTE_DH:
            w = tl.load(w_ptr + cols64[:, None] * D + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            dh = _dot(dl, w, tl.zeros([BM, BK], dtype=tl.float32), DOT_F32)  # [BM, BV] @ [BV, BK]
            tl.atomic_add(dh_rows[:, None] + ks[None, :], dh, mask=row_ok[:, None] & k_ok[None, :], sem="relaxed")
        if COMPUTE_DW:
            # h^T @ dl, not tl.trans(dl) @ h: a dot fed by the transpose of a dot's result is
            # miscompiled at some tile sizes by Triton 3.4-3.7 on Hopper (fla issue #640).
            h_t = tl.load(h_ptr + rows64[None, :] * D + ks[:, None], mask=k_ok[:, None] & row_ok[None, :], other=0.0)
            dw_t = _dot(h_t, dl, tl.zeros([BK, BV], dtype=tl.float32), DOT_F32)  # [BK, BM] @ [BM, BV]
            tl.atomic_add(
                dw_ptr + (cols64 - V_START)[None, :] * D + ks[:, None],
                dw_t,
                mask=k_ok[:, None] & col_ok[None, :],
                sem="relaxed",
            )


def _new_buffer(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """Uninitialized buffer a kernel must fill entirely (tests patch this to poison it with NaN)."""
    return torch.empty(shape, device=device, dtype=dtype)


def _dot_f32(h: Tensor, weight: Tensor) -> bool:
    """Tensor-core dots only for one shared 16-bit dtype; anything else runs fp32 ieee."""
    return not (h.dtype == weight.dtype and h.dtype in (torch.bfloat16, torch.float16))


def _resolve_config(config: LCEConfig | None, h: Tensor, dot_f32: bool) -> LCEConfig:
    usable = usable_configs(h.device, dot_f32)
    if config is None:
        return default_config(h.shape[0], dot_f32, usable)
    need = config.smem_bytes(4 if dot_f32 else 2)
    if h.is_cuda and need > _max_shared_mem(_device_index(h.device)):
        raise ValueError(
            f"linear_cross_entropy_triton: {config} needs ~{need} bytes of shared memory, more than this "
            f"GPU's {_max_shared_mem(_device_index(h.device))}; pick one of usable_configs(device, dot_f32)"
        )
    return config


def _split_count(n_row_tiles: int, v_tiles: int, device: torch.device) -> int:
    """Vocab splits: enough programs for ~2 waves on the GPU (few rows need many splits)."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        target = triton.cdiv(2 * sms, n_row_tiles)
    else:  # interpreter: a few splits, so the combine path is exercised
        target = 3
    return max(1, min(target, v_tiles))


def lce_forward(
    h: Tensor, weight: Tensor, targets: Tensor, config: LCEConfig | None = None, *, split_v: int | None = None
) -> tuple[Tensor, Tensor]:
    """(lse `[N]`, target logit `[N]`), both fp32, for logits = h @ weight.T (never materialized).

    h `[N, D]`, weight `[V, D]`, targets `[N]` int (ignored ones may hold any value: their target
    logit is meaningless and must be masked by the caller). `split_v` overrides the vocab splits.
    """
    if h.shape[0] == 0:
        empty = torch.zeros(0, device=h.device, dtype=torch.float32)
        return empty, empty.clone()
    m, s, tgt = lce_forward_partials(h, weight, targets, config, split_v=split_v)
    return combine_lse_partials(m, s), tgt.sum(dim=0)


def lce_forward_partials(
    h: Tensor, weight: Tensor, targets: Tensor, config: LCEConfig | None = None, *, split_v: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The forward kernel's per-split partials, each `[splits, N]` fp32: running max m, sum of
    exp(logit - m), and the target logit (0 in splits that do not hold the target). N >= 1.
    `combine_lse_partials(m, s)` and `tgt.sum(0)` finish them; the chunked TT head concatenates
    the partials of all its vocab chunks and finishes once."""
    h, weight, targets = h.contiguous(), weight.contiguous(), targets.contiguous()
    n, d = h.shape
    v = weight.shape[0]
    dot_f32 = _dot_f32(h, weight)
    cfg = _resolve_config(config, h, dot_f32)
    n_m = triton.cdiv(n, cfg.block_m)
    v_tiles = triton.cdiv(v, cfg.block_v)
    splits = split_v or _split_count(n_m, v_tiles, h.device)
    per_split = triton.cdiv(v_tiles, min(splits, v_tiles))
    splits = triton.cdiv(v_tiles, per_split)  # every split starts below V
    m, s, tgt = (_new_buffer((splits, n), h.device, torch.float32) for _ in range(3))
    _lce_fwd_kernel[(n_m, splits)](
        h,
        weight,
        targets,
        m,
        s,
        tgt,
        n,
        v,
        per_split,
        D=d,
        BM=cfg.block_m,
        BV=cfg.block_v,
        BK=cfg.block_k,
        DOT_F32=dot_f32,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return m, s, tgt


def _dw_chunk_rows(v: int, d: int, block_v: int) -> int:
    rows = max(block_v, (_DW_CHUNK_ELEMENTS // max(d, 1)) // block_v * block_v)
    return min(rows, v)


def _dw_plan(v: int, block_v: int, max_rows: int, weight_dtype: torch.dtype) -> list[tuple[int, int, str]]:
    """(start, stop, where) vocab chunks of the weight gradient; `where` names the fp32 accumulator:

    "direct": dW itself (fp32 weight, one launch). "in_place": the fp32 view of dW's own rows
    [start, start + 2 (stop - start)), still unwritten, later narrowed onto rows [start, stop) (16-bit
    weight; so a chunk takes at most half of the rows left and is a multiple of block_v, and those
    still unwritten keep no extra memory). "separate": a fresh fp32 buffer, for the < 2 block_v rows a
    16-bit dW ends with, and every chunk of other (fp64) weights.
    """
    if weight_dtype == torch.float32:
        return [(0, v, "direct")]
    cap = max(block_v, max_rows // block_v * block_v)
    plan, start = [], 0
    while start < v:
        rows = min(cap, (v - start) // 2 // block_v * block_v) if weight_dtype.itemsize == 2 else 0
        stop = start + rows if rows else min(start + cap, v)
        plan.append((start, stop, "in_place" if rows else "separate"))
        start = stop
    return plan


# First block of `_narrow_in_place`, copied through a temporary: 2**18 elements (512 KiB at 16 bits).
_NARROW_FIRST = 1 << 18


def _narrow_in_place(src: Tensor, dst: Tensor) -> None:
    """dst[:] = src (cast) where 1-D fp32 `src` and 1-D 16-bit `dst` (same numel) start at one byte.

    dst[a:b] overwrites src[a/2 : b/2], already consumed once b <= 2a, and reads src[a:b], which it
    does not overlap: so blocks double, the first through a small temporary.
    """
    n = src.numel()
    first = min(n, _NARROW_FIRST)
    dst[:first].copy_(src[:first].to(dst.dtype))
    lo = first
    while lo < n:
        hi = min(2 * lo, n)
        dst[lo:hi].copy_(src[lo:hi])
        lo = hi


def _dh_accumulators(n: int, d: int, h: Tensor) -> tuple[Tensor, Tensor, int]:
    """fp32 dh accumulators (a, b, rows_a): rows < rows_a in `a`, the rest in `b`.

    A 16-bit h splits at ceil(N/2) rows, so `a` holds exactly the bytes of the 16-bit dh (see
    `_finish_dh`); no N x D fp32 block outlives the op. Other dtypes: one buffer (b = a).
    """
    if h.element_size() != 2 or n < 2:
        a = torch.zeros(n, d, device=h.device, dtype=torch.float32)
        return a, a, n
    rows_a = (n + 1) // 2
    a = torch.zeros(rows_a, d, device=h.device, dtype=torch.float32)
    return a, torch.zeros(n - rows_a, d, device=h.device, dtype=torch.float32), rows_a


def _finish_dh(a: Tensor, b: Tensor, n: int, d: int, dtype: torch.dtype) -> Tensor:
    """dh `[N, D]` in `dtype` from the accumulators of `_dh_accumulators`; a 16-bit dh takes `a`'s storage."""
    if a is b:
        return a.to(dtype)
    out = a.view(-1).view(dtype)  # 2 * rows_a * D elements over a's bytes
    _narrow_in_place(a.view(-1), out[: a.numel()])
    # Bytes [2 rows_a D, 2 N D) of a held fp32 elements < N D / 2 <= rows_a D: consumed above.
    out[a.numel() : n * d].copy_(b.view(-1))
    return out[: n * d].view(n, d)


def launch_backward(
    h: Tensor,
    weight: Tensor,
    targets: Tensor,
    lse: Tensor,
    coef: Tensor,
    token_grad: Tensor,
    dh: tuple[Tensor, Tensor, int],
    dw: Tensor,
    vocab_range: tuple[int, int],
    cfg: LCEConfig,
    *,
    need_h: bool,
    need_w: bool,
) -> None:
    """One `_lce_bwd_kernel` launch over vocab rows [start, stop) of `weight` (all contiguous).

    Adds this range's dL/dh into the fp32 accumulators `dh` = (a, b, rows_a) of `_dh_accumulators`
    and its dL/dW into the fp32 `dw` (row 0 = vocab row `start`). coef = token_grad (1 + 2 z lse).
    Used by `lce_backward` and by the chunked TT head (`triton_tt_chunked`), which calls it once
    per rebuilt chunk of the table with shared dh accumulators.
    """
    n, d = h.shape
    start, stop = vocab_range
    dh_a, dh_b, rows_a = dh
    grid = (triton.cdiv(n, cfg.block_m) * triton.cdiv(stop - start, cfg.block_v),)
    _lce_bwd_kernel[grid](
        h,
        weight,
        targets,
        lse,
        coef,
        token_grad,
        dh_a,
        dh_b,
        dw,
        n,
        rows_a,
        start,
        stop,
        D=d,
        BM=cfg.block_m,
        BV=cfg.block_v,
        BK=cfg.block_k,
        GROUP_M=cfg.group_m,
        DOT_F32=_dot_f32(h, weight),
        COMPUTE_DH=need_h,
        COMPUTE_DW=need_w,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def lce_backward(
    h: Tensor,
    weight: Tensor,
    targets: Tensor,
    lse: Tensor,
    token_grad: Tensor,
    z_loss: float,
    config: LCEConfig | None = None,
    *,
    need_h: bool = True,
    need_w: bool = True,
    chunk_rows: int | None = None,
    two_pass: bool | None = None,
    dh_chunk_rows: int | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """(dL/dh `[N, D]` in h's dtype, dL/dweight `[V, D]` in weight's dtype); None where not needed.

    token_grad `[N]` fp32 is dL/dloss_i (0 for ignored tokens), lse `[N]` from `lce_forward`.
    Gradients accumulate in fp32 (atomics: results vary between runs in the last bits). A non-fp32
    weight's gradient is accumulated at most `chunk_rows` vocab rows at a time (default: 2**23
    elements) per `_dw_plan`; a 16-bit dW hosts its own fp32 chunks. Extra memory: `peak_memory_bytes`.

    two_pass (default: when a 16-bit dh and dW are both needed): dh first, over row chunks that host
    their fp32 accumulators in dh's own unwritten rows (`_dw_plan` over rows, at most
    `dh_chunk_rows` rows a chunk), then dW over vocab chunks; the logits are recomputed once more
    (8 N V D FLOPs instead of 6) and the backward needs no memory beyond the two gradients. One pass
    keeps N x D fp32 dh accumulators (twice a 16-bit dh) alive while every vocab chunk runs.
    """
    h, weight, targets = h.contiguous(), weight.contiguous(), targets.contiguous()
    n, d = h.shape
    dot_f32 = _dot_f32(h, weight)
    cfg = _resolve_config(config, h, dot_f32)
    token_grad = token_grad.to(torch.float32).contiguous()
    lse = lse.to(torch.float32).contiguous()
    coef = token_grad * (1 + 2 * z_loss * lse)  # softmax scale; 0 for ignored rows
    if two_pass is None:
        two_pass = need_h and need_w and h.element_size() == 2 and weight.element_size() == 2
    rows = (h, targets, lse, coef, token_grad)
    if two_pass and need_h and need_w and n > 0:
        return _dh_pass(rows, weight, cfg, dh_chunk_rows), _vocab_pass(rows, weight, cfg, chunk_rows, None, True)
    dh_acc = _dh_accumulators(n, d, h) if need_h else None
    dw = None
    if need_w:
        dw = _vocab_pass(rows, weight, cfg, chunk_rows, dh_acc, True)
    elif need_h and n > 0:
        _vocab_pass(rows, weight, cfg, chunk_rows, dh_acc, False)
    return (_finish_dh(dh_acc[0], dh_acc[1], n, d, h.dtype) if need_h else None), dw


def _fp32_chunks(out: Tensor, plan: list[tuple[int, int, str]], fill: Callable[[int, int, Tensor], None]) -> None:
    """Accumulates `out` `[rows, D]` chunk by chunk in fp32 as `_dw_plan` says: for each (start, stop,
    where), `fill(start, stop, acc)` adds into the zeroed fp32 accumulator acc `[stop - start, D]`,
    which is then written into out[start:stop]. "direct": acc is (the zeroed fp32) `out` itself;
    "in_place": the fp32 view of out's still-unwritten rows [start, start + 2 (stop - start)), later
    narrowed onto rows [start, stop) (start * D is even: start is a multiple of the plan's block);
    "separate": a fresh buffer, freed before the next is made."""
    d = out.shape[1]
    flat = out.view(-1)
    for start, stop, where in plan:
        k = stop - start
        if where == "direct":
            acc = out
        elif where == "in_place":
            acc = flat[start * d : (start + 2 * k) * d].view(torch.float32).view(k, d).zero_()
        else:
            acc = torch.zeros(k, d, device=out.device, dtype=torch.float32)
        fill(start, stop, acc)
        if where == "in_place":
            _narrow_in_place(acc.view(-1), flat[start * d : stop * d])
        elif where == "separate":
            out[start:stop].copy_(acc)
        del acc


def _gradient_buffer(rows: int, d: int, like: Tensor) -> Tensor:
    """`[rows, D]` in like's dtype for `_fp32_chunks`: zeroed when fp32 (its own accumulator), else
    left for the chunks to write (`_new_buffer`)."""
    if like.dtype == torch.float32:
        return torch.zeros(rows, d, device=like.device, dtype=torch.float32)
    return _new_buffer((rows, d), like.device, like.dtype)


def _dh_pass(rows: tuple, weight: Tensor, cfg: LCEConfig, chunk_rows: int | None) -> Tensor:
    """dL/dh alone, row chunk by row chunk over the whole vocabulary (`lce_backward`'s first pass):
    a 16-bit dh hosts each chunk's fp32 accumulators in its own unwritten rows (`_dw_plan` over
    rows), an fp32 dh is its own accumulator, other dtypes get fp32 chunks."""
    h, targets, lse, coef, token_grad = rows
    n, d = h.shape
    dh = _gradient_buffer(n, d, h)

    def fill(start: int, stop: int, acc: Tensor) -> None:
        part = [t[start:stop] for t in rows]
        launch_backward(part[0], weight, part[1], part[2], part[3], part[4], (acc, acc, stop - start), coef,
                        (0, weight.shape[0]), cfg, need_h=True, need_w=False)

    _fp32_chunks(dh, _dw_plan(n, cfg.block_m, chunk_rows or n, h.dtype), fill)
    return dh


def _vocab_pass(rows: tuple, weight: Tensor, cfg: LCEConfig, chunk_rows: int | None, dh_acc: tuple | None,
                need_w: bool) -> Tensor | None:
    """One sweep over the vocabulary for every row: dL/dweight by vocab chunks (`_dw_plan`) when
    `need_w`, each launch also adding its dL/dh into the fp32 accumulators `dh_acc` = (a, b,
    rows_a) of `_dh_accumulators` when given (one pass; None: dW only). Without dW: one launch over
    the whole vocabulary, dh only. Returns dW or None."""
    h, targets, lse, coef, token_grad = rows
    n, d = h.shape
    v = weight.shape[0]
    if not need_w:
        launch_backward(h, weight, targets, lse, coef, token_grad, dh_acc, coef, (0, v), cfg,
                        need_h=True, need_w=False)
        return None
    dw = _gradient_buffer(v, d, weight)
    if n == 0:
        return dw.zero_()

    def fill(start: int, stop: int, acc: Tensor) -> None:
        launch_backward(h, weight, targets, lse, coef, token_grad, dh_acc or (coef, coef, n), acc, (start, stop), cfg,
                        need_h=dh_acc is not None, need_w=True)

    _fp32_chunks(dw, _dw_plan(v, cfg.block_v, chunk_rows or _dw_chunk_rows(v, d, cfg.block_v), weight.dtype), fill)
    return dw


# Row vectors alive at the peak (lse, token weights, coef, the valid mask and temporaries), per row.
_ROW_VECTOR_BYTES = 32


def peak_memory_bytes(
    n: int, v: int, d: int, dtype: torch.dtype, config: LCEConfig | None = None, *, num_sms: int = 132
) -> int:
    """Expected peak bytes one forward + backward allocates beyond its inputs, gradients included
    (both h `[N, D]` and weight `[V, D]` of `dtype`, both needing gradients; default `chunk_rows`).

    16-bit (two passes, see `lce_backward`): dh (N D) and dW (V D), each hosting its own fp32
    chunks in its unwritten rows, + the largest transient (a separate tail chunk, < 2 BM rows of dh
    or < 2 BV rows of dW in fp32, or a `_narrow_in_place` temporary) + row vectors. fp32: the
    gradients are their own accumulators. `config`: default for a large-shared-memory GPU when
    None; `num_sms` sizes the forward's vocab splits. Allocator rounding (<= 512 B per tensor) is
    not counted.
    """
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"peak_memory_bytes: dtype {dtype} is not modelled; use float32, float16 or bfloat16")
    if min(n, v, d) < 1:
        raise ValueError(f"peak_memory_bytes: need N, V, D >= 1, got {(n, v, d)}")
    dot_f32 = dtype == torch.float32
    cfg = config or default_config(n, dot_f32)
    vectors = _ROW_VECTOR_BYTES * n
    n_m, v_tiles = triton.cdiv(n, cfg.block_m), triton.cdiv(v, cfg.block_v)
    splits = max(1, min(triton.cdiv(2 * num_sms, n_m), v_tiles))
    forward = vectors + 6 * splits * n * 4  # m, s, tgt partials and the combine's temporaries
    item = dtype.itemsize
    if dot_f32:
        return max(forward, vectors + (n + v) * d * 4)

    def chunk_transient(plan) -> int:
        return max([(stop - start) * d * 4 for start, stop, where in plan if where == "separate"]
                   + [min((stop - start) * d, _NARROW_FIRST) * item for start, stop, where in plan
                      if where == "in_place"] + [0])

    dh_pass = vectors + n * d * item + chunk_transient(_dw_plan(n, cfg.block_m, n, dtype))
    dw_pass = vectors + (n + v) * d * item + chunk_transient(_dw_plan(v, cfg.block_v, _dw_chunk_rows(v, d, cfg.block_v),
                                                                       dtype))
    return max(forward, dh_pass, dw_pass)


class LinearCrossEntropyTriton(torch.autograd.Function):
    """Loss of `h @ weight.T` (see the module docstring); saves h, weight, targets and lse `[N]`."""

    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, reduction, z_loss, config):
        lse, target_logit = lce_forward(h, weight, targets, config)
        valid = targets != ignore_index
        per_token = torch.where(valid, lse - target_logit + z_loss * lse.square(), torch.zeros_like(lse))
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.args = (ignore_index, reduction, z_loss, config)
        return _reduce(per_token, valid, reduction)

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, targets, lse = ctx.saved_tensors
        ignore_index, reduction, z_loss, config = ctx.args
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        token_grad = _token_weights(grad_out.to(torch.float32), targets != ignore_index, reduction)
        dh, dw = lce_backward(h, weight, targets, lse, token_grad, z_loss, config, need_h=need_h, need_w=need_w)
        return dh, dw, None, None, None, None, None


@compile_boundary
def linear_cross_entropy_triton(
    h: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    ignore_index: int,
    reduction: str,
    z_loss: float,
    config: LCEConfig | None = None,
) -> Tensor:
    """Fused dense linear cross-entropy: loss of `h @ weight.T` without `[N, V]` logits.

    Per non-ignored token: lse_i - logit_i[t_i] + z_loss * lse_i**2; ignored tokens give 0 and no
    gradient. "mean" divides by the count of non-ignored tokens (0.0 when there are none), "sum"
    sums, "none" returns `[N]`. Arguments are validated by the public `linear_cross_entropy`.

    Args:
        h: `[N, D]` floating point (bf16 and fp32 tested).
        weight: `[V, D]` floating point.
        targets: `[N]` int64, in [0, V) or ignore_index.
        config: tile shape; default from `default_config`. Must fit the GPU's shared memory.

    Returns:
        fp32 loss: a scalar, or `[N]` for reduction "none". Gradients of h and weight come in their
        dtypes, and vary between runs in the last bits (fp32 atomics).
    """
    if h.ndim != 2 or weight.ndim != 2 or targets.shape != h.shape[:1] or h.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy_triton: need h [N, D], weight [V, D], targets [N]; got "
            f"{tuple(h.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)} (flatten leading dims first)"
        )
    if not h.is_cuda and not interpreter_enabled():
        raise RuntimeError("linear_cross_entropy_triton: CPU tensors need TRITON_INTERPRET=1 (or use impl='torch')")
    if h.dtype != weight.dtype:
        # One dtype per launch (mixed 16-bit/fp32 operands do not compile for tensor cores): the
        # promoted one, as a matmul would; the casts route the gradients back in each input's dtype.
        common = torch.promote_types(h.dtype, weight.dtype)
        h, weight = h.to(common), weight.to(common)
    return LinearCrossEntropyTriton.apply(h, weight, targets, ignore_index, reduction, float(z_loss), config)
