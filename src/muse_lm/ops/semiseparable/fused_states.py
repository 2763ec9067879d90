"""The SSD scan's chunk-state walk fused with each chunk's own contribution: one kernel in place of
`triton._chunk_state_kernel` + the first level of `state_pass.state_pass` (all of it in one level),
same outputs.

Why: the chunk kernels of `triton.py` are memory-bound, and the fp32 chunk states [B,H,NC,R,P] are
most of their traffic. Unfused, the forward writes every chunk's local contribution, the one-level
walk reads it back and overwrites it with the entering state, and the output kernel reads that; the
backward does the same with the states' gradients. Here the local contribution is formed in
registers inside the walk, so one full write and one full read of the states go away in each
direction: at bf16, 65536 tokens, 16 heads, P = R = 64, chunk 64 about 1 GB of the scan's ~5 GB
(fwd+bwd on an H100 took 2.85 ms unfused against 1.49 ms for flash-linear-attention's
chunk_linear_attn). Measured on an H100 it is faster at those shapes, 2.85 -> 2.00-2.13 ms with bf16
states, so it is the default (`FUSED_STATES_BY_DEFAULT`), in one level or two (`use_fused_two_levels`).

The walk (notation of `state_pass.py`'s docstring). Program (row b*h, P-block, R-block) keeps its
[BR, BP] tile of the state e in fp32 registers (local = (diag(w) A)^T B is separable by rows of R and
columns of P, so the blocks are independent) and walks the row's chunks in order, from the end when
REVERSE. For chunk c of sequence n, with cum the inclusive cumulative log-decay from the chunk's first
token and g its total:

    local_c = (diag(w) A_c)^T B_c           one tl.dot [BR, C] x [C, BP]
    e       = init_n  (or 0)                if the walk enters sequence n at c
    states[b,h,c] = e
    e       = exp(g_c) e + local_c
    final_n = e                             if the walk leaves sequence n at c

Forward: A = u, B = x, w = e^(g - cum), init = the initial state; states[c] is the state entering
chunk c. Backward (REVERSE): A = v, B = dY, w = e^cum, init = the final state's gradient; states[c]
is the gradient of the state leaving c and final is d initial_state. Exponents are differences of
cumulative log-decays <= 0, as everywhere in `triton.py`. Packed sequences (cu_seqlens, B = 1) read
each chunk's span and flags from `state_pass.chunk_table` and mask rows past the sequence's end like
`triton.py`.

Two levels (GROUPED, for long walks): program (row, P-block, group k x R-blocks) walks only the G
chunks of group k, from a zero state, and records what `state_pass.py`'s first level records: p_c
(the decay product since the group's start, 0 after a reset), g_c, the group's end state and its
decay product. `state_pass.finish_groups` then walks the groups and fixes up every state and final.

Compact states (`semiseparable_forward(..., compact_states=True)`, bf16 inputs): the walk still runs
in fp32 registers but stores the states it hands on (and the backward their gradients) in bf16, which
halves the rest of the states' traffic and the memory saved for the backward. Not fp16: without
decay a state sums a whole sequence and could pass fp16's 65504. On the CPU, bf16 states add less
error than the bf16 output's own rounding (bf16 inputs, P = R = 64, T 2048: 1.6e-3 vs 2.4e-3
max-relative against fp64); the interpreter tests hold every output within the 1e-2 contract.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from muse_lm.ops._config import check_at_least_one, check_warps
from muse_lm.ops._dispatch import interpreter_enabled
from muse_lm.ops.semiseparable.state_pass import finish_groups, use_two_levels
from muse_lm.ops.semiseparable.triton import _device_smem, _dot, _load_chunk_decay, _load_f32, _prec, _rows

__all__ = [
    "COMPACT_STATES_BY_DEFAULT",
    "CONFIGS",
    "FUSED_STATES_BY_DEFAULT",
    "FusedStatesConfig",
    "default_config",
    "fused_chunk_states",
    "prune_configs_for",
    "fused_group_size",
    "resolve_compact_states",
    "resolve_walk",
    "smem_estimate",
    "use_compact_states",
    "resolve_fused",
    "use_fused_two_levels",
]

# Measured on an H100 (benchmarks/check_semiseparable_gpu.py --parts fused_states, bf16, 16 heads,
# P = R = 64, 65536 tokens): forward + backward 2.86 -> 2.22 ms at B 32 T 2048 and 2.85 -> 2.36 ms
# at B 8 T 8192, both as accurate against fp64 as the unfused walk.
FUSED_STATES_BY_DEFAULT = True
FUSED_TWO_LEVEL_MIN_CHUNKS = 128  # see use_fused_two_levels
# Saving bf16 inputs' chunk states in bf16 (fused walk only): 2.22 -> 2.02 ms and 2.36 -> 2.13 ms
# more, same shapes; the added error (1.6e-3 relative on the CPU) is below the bf16 output's own.
COMPACT_STATES_BY_DEFAULT = True
SMEM_99KB = 99 * 1024  # consumer cards (sm_86 / sm_89): every declared config must fit


@dataclass(frozen=True)
class FusedStatesConfig:
    """Launch shape of the fused walk: a [block_r, block_p] state tile per program, warps, and the
    pipeline stages of the chunk loop (loads of the next chunks overlap the current one's dot)."""

    block_r: int
    block_p: int
    num_warps: int
    num_stages: int

    def __post_init__(self):
        for name in ("block_r", "block_p"):
            value = getattr(self, name)
            if value not in (16, 32, 64):
                raise ValueError(f"FusedStatesConfig: {name}={value} must be 16, 32 or 64 (tl.dot tiles)")
        check_warps(self)
        check_at_least_one(self, "num_stages")


# Declared once: the autotuner's search space on CUDA, each checked by tests/ops/test_semiseparable_fused.py
# (interpreter, and 99 KB of shared memory compiled for sm_86 / sm_90) and tests/gpu. Small tiles put
# more walks in flight (a walk is a chain of dependent steps) at the price of reading A once per
# P-block and B once per R-block; 64 x 64 reads each input once. Three stages only where they fit 99 KB.
CONFIGS = (
    FusedStatesConfig(16, 16, 2, 3),
    FusedStatesConfig(32, 32, 4, 3),
    FusedStatesConfig(32, 64, 4, 2),
    FusedStatesConfig(32, 64, 4, 3),
    FusedStatesConfig(64, 32, 4, 2),
    FusedStatesConfig(64, 64, 4, 2),
    FusedStatesConfig(64, 64, 8, 2),
)


def _block(dim: int) -> int:
    return min(64, max(16, triton.next_power_of_2(dim)))


def default_config(r_dim: int, p_dim: int) -> FusedStatesConfig:
    """The config used without autotuning (the interpreter; `triton.py` lets the walk autotune on CUDA
    even with an explicit chunk-kernel config): the declared one with the largest tile that has no
    block of only idle rows or columns."""
    fit = [c for c in CONFIGS if c.block_r <= _block(r_dim) and c.block_p <= _block(p_dim)]
    return max(fit, key=lambda c: (c.block_r * c.block_p, c.block_p, -c.num_warps))


def smem_estimate(block_r: int, block_p: int, chunk: int, num_stages: int) -> int:
    """Upper estimate in bytes of the fused walk's shared memory: the pipelined loads of A [C, BR] and
    B [C, BP] (num_stages buffers, fp32 at worst) and one more copy of each as dot operands,
    4 C (BR + BP) (num_stages + 1). tests/ops/test_semiseparable_fused.py checks it against Triton's
    sm_86 / sm_90 compiles of every declared config at C 64."""
    return 4 * chunk * (block_r + block_p) * (num_stages + 1)


def prune_configs_for(configs, r_dim: int, p_dim: int, chunk: int, smem_limit: int) -> list:
    """The triton.Configs with no block wider than R or P needs and whose estimated shared memory fits
    `smem_limit` bytes; the smallest survives if none does."""
    fit = [
        c
        for c in configs
        if c.kwargs["BR"] <= _block(r_dim)
        and c.kwargs["BP"] <= _block(p_dim)
        and smem_estimate(c.kwargs["BR"], c.kwargs["BP"], chunk, c.num_stages) <= smem_limit
    ]
    return fit or [min(configs, key=lambda c: (c.kwargs["BR"] * c.kwargs["BP"], c.num_stages, c.num_warps))]


def _prune_configs(configs, named_args, **kwargs):
    device = next(arg.device for arg in named_args.values() if isinstance(arg, Tensor))
    return prune_configs_for(configs, named_args["R"], named_args["P"], kwargs["C"], _device_smem(device))


def _triton_configs() -> list[triton.Config]:
    return [
        triton.Config({"BR": c.block_r, "BP": c.block_p, "STAGES": c.num_stages}, num_warps=c.num_warps,
                      num_stages=c.num_stages)
        for c in CONFIGS
    ]


def use_fused_two_levels(rows: int, n_chunks: int, state_size: int) -> bool:
    """Whether the fused walk runs in two levels when not told (two_levels=None): where the unfused walk
    does (`state_pass.use_two_levels`: few state elements in all, so few walks in flight), and for any
    walk of at least `FUSED_TWO_LEVEL_MIN_CHUNKS` chunks. Measured on an H100 (bf16, 16 heads, P = R = 64,
    65536 tokens, the AR-SSM layer's initial decays; `benchmarks/sweep_ssd_levels.py`,
    `benchmarks/results/ssd_levels.json`), the scan's forward + backward: 128 chunks (B 8) 1.569 ms in
    one level vs 1.542 in two (groups of 64; 1.59-1.74 with groups of 32 down to 8); 256 chunks (B 4)
    1.923 vs 1.570. The one-level walk of 128 chunks took 0.489 ms of the scan against 0.392 for 64
    chunks (B 16). Before the fix-up ran as tiles of chunks (2026-11-27), 128 chunks were faster in one
    level. Many rows with many chunks (e.g. B 32 x T 8192) are unmeasured."""
    return n_chunks >= FUSED_TWO_LEVEL_MIN_CHUNKS or use_two_levels(rows, n_chunks, state_size)


def fused_group_size(n_chunks: int) -> int:
    """Chunks per group of the fused two-level walk: half the walk, at most 64 (the fastest measured
    from 128 to 1024 chunks: each step carries a tl.dot, so longer groups and fewer of them beat the
    unfused walk's sqrt(NC))."""
    return min(64, triton.next_power_of_2(max(1, n_chunks // 2)))


def use_compact_states(fused: bool) -> bool:
    """Whether the fused walk saves bf16 inputs' states in bf16 when not told (None)."""
    return fused and COMPACT_STATES_BY_DEFAULT


def resolve_compact_states(compact_states: bool | None, fused: bool) -> bool:
    """compact_states None asks `use_compact_states`; True without the fused walk is refused: the
    unfused walk accumulates each chunk's contribution in the states buffer in place, in fp32."""
    if compact_states is None:
        return use_compact_states(fused)
    if compact_states and not fused:
        raise ValueError(
            "semiseparable_forward: compact_states=True needs the fused walk (fused_states=True): the unfused "
            "walk accumulates each chunk's contribution in the states buffer in place, in fp32"
        )
    return bool(compact_states)


def resolve_fused(fused_states: bool | None) -> bool:
    """Whether the chunk states come from the fused walk: None asks `FUSED_STATES_BY_DEFAULT` (on:
    measured faster on an H100 at every shape). It never depends on the shape, so the custom op's fake
    implementation can ask it without guarding on sizes (which made compiled models recompile)."""
    return FUSED_STATES_BY_DEFAULT if fused_states is None else bool(fused_states)


def resolve_walk(fused_states: bool | None, two_levels: bool | None, rows: int, n_chunks: int,
                 state_size: int) -> tuple[bool, bool]:
    """(fused, two levels) for the walk over chunk states. None asks the policies: `resolve_fused`, then
    `use_fused_two_levels` for the fused walk or `state_pass.use_two_levels` for the unfused one. Every
    combination exists: both walks have a one-level and a two-level form."""
    fused = resolve_fused(fused_states)
    if two_levels is None:
        policy = use_fused_two_levels if fused else use_two_levels
        return fused, policy(rows, n_chunks, state_size)
    return fused, bool(two_levels)


@triton.jit
def _state_block(ptr, row, r0, p0, R, P, BR: tl.constexpr, BP: tl.constexpr):
    """Block pointer to the [BR, BP] tile at (r0, p0) of the row-th R x P matrix of a contiguous
    [rows, R, P] tensor (states viewed as [B*H*NC, R, P], init / final as [N*H, R, P])."""
    base = ptr + row.to(tl.int64) * R * P
    return tl.make_block_ptr(base, (R, P), (P, 1), (r0, p0), (BR, BP), (1, 0))


@triton.jit
def _walk_step(
    a_ptr, b_ptr, la_ptr, st_ptr, init_ptr, final_ptr, tab_ptr, pc_ptr, g_ptr, e, p, i, i_bh, i_b, i_h, r0, p0, T, H,
    R, P, NC, C: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr, HAS_INIT: tl.constexpr, REVERSE: tl.constexpr,
    VARLEN: tl.constexpr, GROUPED: tl.constexpr, PREC: tl.constexpr,
):
    """Step i of the walk (module docstring): stores the current state tile e [BR, BP] as chunk c's and
    returns (exp(g_c) e + local_c, exp(g_c) p), after a reset to init (and p to 0) where the walk enters
    a sequence and with the sequence's final written where it leaves one. GROUPED: p is the decay
    product since the group's start, stored as p_c for the fix-up by the (row, first tile) program."""
    c = NC - 1 - i if REVERSE else i
    if VARLEN:
        t0 = tl.load(tab_ptr + c * 4)
        t_end = tl.load(tab_ptr + c * 4 + 1)
        n = tl.load(tab_ptr + c * 4 + 2)
        flags = tl.load(tab_ptr + c * 4 + 3)
        first, last = (flags & 1) != 0, (flags & 2) != 0
    else:
        t0 = c * C
        t_end = T
        n = i_b
        first, last = c == 0, c == NC - 1
    enters = last if REVERSE else first
    leaves = first if REVERSE else last
    cum, g = _load_chunk_decay(la_ptr, i_b, i_h, t0, T, t_end, H, C)
    # Forward: decayed to the chunk's end; backward: from the chunk's start (both exponents <= 0).
    w = tl.exp(cum) if REVERSE else tl.exp(g - cum)
    a = _load_f32(_rows(a_ptr, i_b, i_h, t0, r0, T, t_end, H, R, C, BR))
    bt = _load_f32(_rows(b_ptr, i_b, i_h, t0, p0, T, t_end, H, P, C, BP))
    local = _dot(tl.trans(a * w[:, None]), bt, PREC)
    if enters:
        if HAS_INIT:
            e = _load_f32(_state_block(init_ptr, n * H + i_h, r0, p0, R, P, BR, BP))
        else:
            e = tl.zeros([BR, BP], dtype=tl.float32)
    p = tl.where(enters, 0.0, p)  # not p * 0: an inf p (log-decays > 0, outside the contract) would give NaN
    row = i_bh.to(tl.int64) * NC + c
    tl.store(_state_block(st_ptr, row, r0, p0, R, P, BR, BP), e.to(st_ptr.dtype.element_ty), boundary_check=(0, 1))
    if GROUPED:
        tl.store(pc_ptr + row, p, mask=(r0 == 0) & (p0 == 0))
        tl.store(g_ptr + row, g, mask=(r0 == 0) & (p0 == 0))
    decay = tl.exp(g)
    e = decay * e + local
    if leaves:
        tl.store(_state_block(final_ptr, n * H + i_h, r0, p0, R, P, BR, BP), e, boundary_check=(0, 1))
    return e, decay * p


# T and the chunk counts are not specialized: nothing gains from T % 16, and new T would recompile.
@triton.jit(do_not_specialize=["T", "NC", "G", "NG", "LOG_BH", "LOG_NC"])
def _fused_walk_kernel(
    a_ptr, b_ptr, la_ptr, st_ptr, init_ptr, final_ptr, tab_ptr, pc_ptr, g_ptr, gst_ptr, gdec_ptr, T, H, R, P, NC, G,
    NG, LOG_BH, LOG_NC, C: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr, STAGES: tl.constexpr,
    HAS_INIT: tl.constexpr, REVERSE: tl.constexpr, VARLEN: tl.constexpr, GROUPED: tl.constexpr,
    PREC: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Program (b*h, P-block, group k * R-blocks + R-block) walks its row's chunks: all NC of them, or
    with GROUPED steps k*G .. k*G+G-1 from a zero state (the first level of the two-level walk of
    `state_pass.py`, fused: p_c to pc and g_c to g [B*H, NC], the group's end state to gst [B*H, NG, R, P] fp32 and
    its decay product to gdec [B*H, NG]; `_group_carry_kernel` and `_group_fixup_kernel` finish it).
    a [B,T,H,R], b [B,T,H,P] (any float dtype), la [B,T,H] fp32, st [B,H,NC,R,P] fp32 or bf16 (written),
    init / final [N,H,R,P] fp32, tab the chunk table (VARLEN). LOG_BH, LOG_NC (bit lengths of B*H and
    NC) are only the autotuner's key."""
    i_bh, i_p, i_kr = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_rb = tl.cdiv(R, BR)
    i_k, i_r = i_kr // n_rb, i_kr % n_rb
    i_b, i_h = i_bh // H, i_bh % H
    r0, p0 = i_r * BR, i_p * BP
    i0 = i_k * G if GROUPED else 0
    i1 = tl.minimum(i0 + G, NC) if GROUPED else NC
    e = tl.zeros([BR, BP], dtype=tl.float32)
    p = tl.sum(tl.sum(e, 1), 0) + 1.0  # an fp32 tensor scalar, so the loop carries one type
    if INTERPRET:  # Triton 3.6's interpreter cannot take a runtime bound in range() under NumPy 2
        i = tl.program_id(0) * 0 + i0
        while i < i1:
            e, p = _walk_step(a_ptr, b_ptr, la_ptr, st_ptr, init_ptr, final_ptr, tab_ptr, pc_ptr, g_ptr, e, p, i,
                              i_bh, i_b, i_h, r0, p0, T, H, R, P, NC, C, BR, BP, HAS_INIT, REVERSE, VARLEN, GROUPED,
                              PREC)
            i += 1
    else:
        for i in tl.range(i0, i1, num_stages=STAGES):
            e, p = _walk_step(a_ptr, b_ptr, la_ptr, st_ptr, init_ptr, final_ptr, tab_ptr, pc_ptr, g_ptr, e, p, i,
                              i_bh, i_b, i_h, r0, p0, T, H, R, P, NC, C, BR, BP, HAS_INIT, REVERSE, VARLEN, GROUPED,
                              PREC)
    if GROUPED:
        grp = i_bh.to(tl.int64) * NG + i_k
        tl.store(_state_block(gst_ptr, grp, r0, p0, R, P, BR, BP), e, boundary_check=(0, 1))
        tl.store(gdec_ptr + grp, p, mask=(r0 == 0) & (p0 == 0))


# Tuned per (P, R, chunk, bit length of B*H and of the number of chunks), like triton.py's kernels: the
# best tile depends on how many walks run and how long they are; the buckets keep a new T from
# re-tuning on every call. Every output is overwritten whole, so tuning trials leave nothing stale.
_TUNE = dict(key=["P", "R", "C", "LOG_BH", "LOG_NC", "G"], prune_configs_by={"early_config_prune": _prune_configs})
_fused_walk_tuned = triton.autotune(configs=_triton_configs(), **_TUNE)(_fused_walk_kernel)


def _check_args(a: Tensor, b: Tensor, log_a: Tensor, states: Tensor, init: Tensor | None, n_seq: int,
                chunk: int, table: Tensor | None, final: Tensor | None) -> None:
    bsz, t, h, r = a.shape
    p = b.shape[-1]
    if b.shape[:3] != a.shape[:3] or log_a.shape != a.shape[:3] or log_a.dtype != torch.float32:
        raise ValueError(
            f"fused_chunk_states: a [B,T,H,R] {tuple(a.shape)}, b [B,T,H,P] {tuple(b.shape)} and log_a "
            f"[B,T,H] fp32 {tuple(log_a.shape)} {log_a.dtype} must agree on B, T, H"
        )
    compact = a.dtype == states.dtype == torch.bfloat16  # bf16 inputs may keep bf16 states
    dtype_ok = states.dtype == torch.float32 or compact
    if not dtype_ok or not states.is_contiguous() or states.shape[:2] != (bsz, h) or states.shape[3:] != (r, p):
        raise ValueError(f"fused_chunk_states: states must be contiguous [B,H,NC,R,P] = [{bsz},{h},NC,{r},{p}] in "
                         f"fp32 (or bf16 for bf16 a), got {tuple(states.shape)} {states.dtype}")
    if chunk not in (16, 32, 64):
        raise ValueError(f"fused_chunk_states: chunk={chunk} must be the kernel chunk (16, 32 or 64); see "
                         "triton.kernel_chunk")
    if table is None and states.shape[2] != triton.cdiv(t, chunk):
        raise ValueError(
            f"fused_chunk_states: states hold {states.shape[2]} chunks, T={t} needs {triton.cdiv(t, chunk)}"
        )
    if table is not None and (bsz != 1 or table.shape != (states.shape[2], 4)):
        raise ValueError("fused_chunk_states: with a chunk table B must be 1 and the table [NC, 4] one row a chunk")
    for name, s in (("init", init), ("final", final)):
        if s is not None and (s.shape != (n_seq, h, r, p) or s.dtype != torch.float32 or not s.is_contiguous()):
            raise ValueError(f"fused_chunk_states: {name} must be contiguous fp32 [{n_seq},{h},{r},{p}], got "
                             f"{tuple(s.shape)} {s.dtype}")


def fused_chunk_states(
    a: Tensor,
    b: Tensor,
    log_a: Tensor,
    states: Tensor,
    init: Tensor | None,
    n_seq: int,
    chunk: int,
    table: Tensor | None = None,
    *,
    reverse: bool,
    config: FusedStatesConfig | None = None,
    final: Tensor | None = None,
    group: int | None = None,
) -> Tensor:
    """The fused walk of the module docstring; writes states [B,H,NC,R,P] in place (fp32, or bf16 for bf16
    a: the walk runs in fp32 and stores rounded copies) and returns the
    finals [n_seq,H,R,P] fp32 (into `final` when given).

    a [B,T,H,R], b [B,T,H,P] contiguous, one float dtype (forward: u, x; backward with reverse=True:
    v, dY); log_a [B,T,H] fp32 contiguous; init [n_seq,H,R,P] fp32 or None (zeros): the initial states
    (forward) or the final states' gradients (backward). chunk is the kernel chunk (16, 32 or 64);
    table the chunk table of cu_seqlens (then B = 1) or None (then n_seq = B). config None autotunes
    over `CONFIGS` on CUDA and takes `default_config` under the interpreter. group None walks each row
    in one level; an int G walks groups of G chunks in parallel and finishes with the carry and fix-up
    passes of `state_pass.py` (two levels). The same values as `_chunk_state_kernel` + `state_pass`
    up to fp32 rounding (and, for bf16 states with two levels, one more bf16 rounding in the fix-up).
    """
    _check_args(a, b, log_a, states, init, n_seq, chunk, table, final)
    if group is not None and (isinstance(group, bool) or not isinstance(group, int) or group < 1):
        raise ValueError(f"fused_chunk_states: group={group!r} must be None (one level) or a positive int")
    bsz, _, h, r = a.shape
    p, nc = b.shape[-1], states.shape[2]
    final = _new_final(final, states, n_seq)
    if states.numel() == 0:  # B, H, R or P is 0: no state element to walk (and final is empty too)
        return final
    if group is None:
        _launch_walk(a, b, log_a, states, init, final, table, (states,) * 4, None, 1, chunk, reverse, config)
        return final
    rows, n_groups = bsz * h, triton.cdiv(nc, group)
    # Every element is written by the walk (p_c and g_c by each chunk's first tile, each group's end
    # state and decay product after its last chunk) before the carry and fix-up read it.
    pc, g = torch.empty(2, rows, nc, device=states.device, dtype=torch.float32)
    gst = torch.empty(rows, n_groups, r, p, device=states.device, dtype=torch.float32)
    gdec = torch.empty(rows, n_groups, device=states.device, dtype=torch.float32)
    _launch_walk(a, b, log_a, states, init, final, table, (pc, g, gst, gdec), group, n_groups, chunk, reverse, config)
    finish_groups(states, g, final, table, pc, gst, gdec, h, group, reverse)
    return final


def _new_final(final: Tensor | None, states: Tensor, n_seq: int) -> Tensor:
    if final is not None:
        return final
    b, h, _, r, p = states.shape
    return torch.empty(n_seq, h, r, p, device=states.device, dtype=torch.float32)


def _launch_walk(a, b, log_a, states, init, final, table, group_bufs, group, n_groups, chunk, reverse, config):
    bsz, t, h, r = a.shape
    p, nc = b.shape[-1], states.shape[2]
    interpret = interpreter_enabled()
    args = (a, b, log_a, states, init if init is not None else final, final, table if table is not None else states,
            *group_bufs, t, h, r, p, nc, group or 0, n_groups, (bsz * h).bit_length(), nc.bit_length())
    meta = dict(C=chunk, HAS_INIT=init is not None, REVERSE=reverse, VARLEN=table is not None,
                GROUPED=group is not None, PREC=_prec(a.dtype), INTERPRET=interpret)
    if config is None and not interpret:
        _fused_walk_tuned[lambda m: (bsz * h, triton.cdiv(p, m["BP"]), n_groups * triton.cdiv(r, m["BR"]))](
            *args, **meta
        )
        return
    cfg = config or default_config(r, p)
    grid = (bsz * h, triton.cdiv(p, cfg.block_p), n_groups * triton.cdiv(r, cfg.block_r))
    _fused_walk_kernel[grid](*args, BR=cfg.block_r, BP=cfg.block_p, STAGES=cfg.num_stages, num_warps=cfg.num_warps,
                             num_stages=cfg.num_stages, **meta)
