"""The walk over chunk states of the SSD scan (`triton.py`), in one level or two, and the chunk table of
packed sequences (cu_seqlens).

Each row (b*h) holds NC chunks, walked in order i = 0 .. NC-1 (from the end when REVERSE); c is the
chunk at step i and n its sequence. With g_c the chunk's total log-decay and local_c its own
contribution (both written by the chunk kernels):

    e_c     = init_n                                if the walk enters sequence n at c
    e_c     = exp(g_prev) e_prev + local_prev       otherwise (prev = the chunk walked before c)
    final_n = exp(g_c) e_c + local_c                after the last chunk walked of sequence n

e_c overwrites local_c in place. Forward: e_c is the state entering chunk c, final the last state.
Backward (REVERSE, local = V^T diag(e^cum) dY): e_c is the gradient of the state leaving c, init the
final state's gradient, final the initial state's. Without cu_seqlens a row is one sequence (n = b);
with them (B = 1) a row holds every sequence, each in its own chunks (`chunk_table`), so the reset
above is the whole of the packed-sequence logic here.

One level (`_walk_kernel`): a program per (row, block of R*P) walks all NC chunks; latency-bound, so
with few rows and many chunks the GPU idles. Two levels, for long T with few sequences:
 1. `_group_walk_kernel`: groups of G chunks walked in parallel from a zero state, recording the
    local e_c, the product p_c of the decays since the group's start (0 after a reset) and the
    group's (end state, product);
 2. `_group_carry_kernel`: a short walk over the NC/G groups giving the state entering each group;
 3. `_group_fixup_kernel`: e_c += p_c E_group and final_n += e^(g_c) p_c E_group, in parallel over
    tiles of chunks (groups after the first).
Same values (up to fp32 rounding), about G + NC/G steps instead of NC, for twice the state traffic.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["chunk_table", "finish_groups", "group_size", "state_pass", "use_two_levels"]

_STATE_BLOCK = 256  # elements of the R*P state per walking program (at most)
_STATE_PROGRAMS = 264  # two per SM of an H100: below this a walk halves its block (down to 64)
_FIXUP_BLOCK = 512
_FIXUP_CHUNKS = 8  # chunks per fix-up program (fewer when G has fewer factors of two)
# Two levels when a row's walk is long and the rows are few: below this many state elements over all
# rows (B*H*R*P; the 8gb layer has R*P = 2048) the one-level walk is latency-bound rather than
# bandwidth-bound on an H100 (~1 us a step against 3 TB/s), and at this many chunks the two-level
# walk's G + NC/G steps (16 + 16) win back the fix-up pass and two extra launches.
_TWO_LEVEL_MAX_STATE = 1 << 17
_TWO_LEVEL_MIN_CHUNKS = 64


def chunk_table(cu_seqlens: Tensor, chunk: int, device: torch.device) -> Tensor:
    """int32 [NC, 4] on `device`, one row per kernel chunk of packed sequences: (first token, end of
    its sequence (exclusive), sequence index n, flags: 1 = the sequence's first chunk, 2 = its last).

    A sequence of L tokens gets ceil(L / chunk) chunks, so no chunk crosses a boundary; an empty one
    gets a single chunk of no tokens, which carries its initial state to its final state.
    """
    bounds = cu_seqlens.detach().to("cpu", torch.int64)
    starts, ends = bounds[:-1], bounds[1:]
    per_seq = ((ends - starts + chunk - 1) // chunk).clamp_min(1)
    seq = torch.repeat_interleave(torch.arange(len(per_seq)), per_seq)
    first_chunk = torch.cumsum(per_seq, 0) - per_seq
    j = torch.arange(len(seq)) - first_chunk[seq]  # index of the chunk within its sequence
    flags = (j == 0).long() + 2 * (j == per_seq[seq] - 1).long()
    table = torch.stack([starts[seq] + j * chunk, ends[seq], seq, flags], 1)
    return table.to(torch.int32).to(device)


def use_two_levels(rows: int, n_chunks: int, state_size: int) -> bool:
    """Whether the two-level walk is the faster for `rows` (B*H) walks of `n_chunks` chunks over a
    state of `state_size` (R*P) elements: many chunks and few state elements in all (see above)."""
    return n_chunks >= _TWO_LEVEL_MIN_CHUNKS and rows * state_size <= _TWO_LEVEL_MAX_STATE


def group_size(n_chunks: int) -> int:
    """Chunks per group of the two-level walk: the power of two near sqrt(NC), which balances the
    group walks (G steps) against the walk over groups (NC / G steps)."""
    return triton.next_power_of_2(max(1, math.isqrt(max(1, n_chunks - 1)) + 1))


@triton.jit
def _walk_load(st_ptr, g_ptr, init_ptr, tab_ptr, i_bh, i_b, i_h, i, limit, o_e, m_e, NC, H, RP,
               HAS_INIT: tl.constexpr, REVERSE: tl.constexpr, VARLEN: tl.constexpr):
    """Everything the walk needs of its i-th chunk, loaded ahead of use (masked off once i reaches
    `limit`): (c, n, enters, leaves, g, local [BLOCK], init [BLOCK]; zeros unless entering)."""
    ok = i < limit
    c = NC - 1 - i if REVERSE else i
    if VARLEN:
        n = tl.load(tab_ptr + c * 4 + 2, mask=ok, other=0)
        flags = tl.load(tab_ptr + c * 4 + 3, mask=ok, other=0)
        first, last = (flags & 1) != 0, (flags & 2) != 0
    else:
        n = i_b
        first, last = c == 0, c == NC - 1
    enters = last if REVERSE else first
    leaves = first if REVERSE else last
    row = i_bh.to(tl.int64) * NC + c
    g = tl.load(g_ptr + row, mask=ok, other=0.0)
    local = tl.load(st_ptr + row * RP + o_e, mask=m_e & ok, other=0.0)
    if HAS_INIT:
        init_row = (n * H + i_h).to(tl.int64) * RP
        init = tl.load(init_ptr + init_row + o_e, mask=m_e & (ok & enters), other=0.0)
    else:
        init = tl.zeros(local.shape, dtype=tl.float32)
    return c, n, enters, leaves, g, local, init


@triton.jit
def _walk_kernel(
    st_ptr, g_ptr, init_ptr, final_ptr, tab_ptr, NC, H, RP,
    BLOCK: tl.constexpr, HAS_INIT: tl.constexpr, REVERSE: tl.constexpr, VARLEN: tl.constexpr,
):
    """One level: program (row, block) walks all NC chunks (module docstring). st [B*H, NC, RP] fp32
    (local in, e out), g [B*H, NC], init/final [N*H, RP] (N sequences), tab the chunk table."""
    i_bh, i_e = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_e = i_e * BLOCK + tl.arange(0, BLOCK)
    m_e = o_e < RP
    s = tl.zeros([BLOCK], dtype=tl.float32)
    i = tl.program_id(0) * 0  # a tensor, so the values carried through the loop keep one type
    c, n, enters, leaves, g, local, init = _walk_load(
        st_ptr, g_ptr, init_ptr, tab_ptr, i_bh, i_b, i_h, i, NC, o_e, m_e, NC, H, RP, HAS_INIT, REVERSE, VARLEN
    )
    # A while loop, not range(NC): Triton 3.6's interpreter cannot take a runtime bound in range().
    while i < NC:
        # The next chunk's loads go out before this chunk's store and update: their latency hides.
        c2, n2, enters2, leaves2, g2, local2, init2 = _walk_load(
            st_ptr, g_ptr, init_ptr, tab_ptr, i_bh, i_b, i_h, i + 1, NC, o_e, m_e, NC, H, RP, HAS_INIT, REVERSE,
            VARLEN,
        )
        s = tl.where(enters, init, s)
        tl.store(st_ptr + (i_bh.to(tl.int64) * NC + c) * RP + o_e, s, mask=m_e)
        s = tl.exp(g) * s + local
        tl.store(final_ptr + (n * H + i_h).to(tl.int64) * RP + o_e, s, mask=m_e & leaves)
        c, n, enters, leaves, g, local, init = c2, n2, enters2, leaves2, g2, local2, init2
        i += 1


@triton.jit
def _group_walk_kernel(
    st_ptr, g_ptr, init_ptr, final_ptr, tab_ptr, pc_ptr, gst_ptr, gdec_ptr, NC, NG, G, H, RP,
    BLOCK: tl.constexpr, HAS_INIT: tl.constexpr, REVERSE: tl.constexpr, VARLEN: tl.constexpr,
):
    """Level 1: program (row, block, group k) walks chunks k*G .. k*G+G-1 from a zero state: writes
    the local e_c, p_c to pc [B*H, NC], the finals of sequences that end here (before the fix-up),
    and the group's end state and decay product to gst [B*H, NG, RP] and gdec [B*H, NG]."""
    i_bh, i_e, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    o_e = i_e * BLOCK + tl.arange(0, BLOCK)
    m_e = o_e < RP
    i0 = i_k * G
    i1 = tl.minimum(i0 + G, NC)
    s = tl.zeros([BLOCK], dtype=tl.float32)
    p = tl.sum(s, 0) + 1.0  # a fp32 tensor scalar: the decay product since the group's start
    i = i0
    c, n, enters, leaves, g, local, init = _walk_load(
        st_ptr, g_ptr, init_ptr, tab_ptr, i_bh, i_b, i_h, i, i1, o_e, m_e, NC, H, RP, HAS_INIT, REVERSE, VARLEN
    )
    while i < i1:
        c2, n2, enters2, leaves2, g2, local2, init2 = _walk_load(
            st_ptr, g_ptr, init_ptr, tab_ptr, i_bh, i_b, i_h, i + 1, i1, o_e, m_e, NC, H, RP, HAS_INIT, REVERSE,
            VARLEN,
        )
        s = tl.where(enters, init, s)
        p = tl.where(enters, 0.0, p)
        row = i_bh.to(tl.int64) * NC + c
        tl.store(st_ptr + row * RP + o_e, s, mask=m_e)
        tl.store(pc_ptr + row, p, mask=i_e == 0)
        s = tl.exp(g) * s + local
        p = tl.exp(g) * p
        tl.store(final_ptr + (n * H + i_h).to(tl.int64) * RP + o_e, s, mask=m_e & leaves)
        c, n, enters, leaves, g, local, init = c2, n2, enters2, leaves2, g2, local2, init2
        i += 1
    grp = i_bh.to(tl.int64) * NG + i_k
    tl.store(gst_ptr + grp * RP + o_e, s, mask=m_e)
    tl.store(gdec_ptr + grp, p, mask=i_e == 0)


@triton.jit
def _group_carry_kernel(gst_ptr, gdec_ptr, NG, RP, BLOCK: tl.constexpr):
    """Level 2: walks the groups of a row, E_{k+1} = p_k E_k + end_k from E_0 = 0 (a row's first chunk
    always starts a sequence), writing E_k (the state entering group k) over end_k in gst."""
    i_bh, i_e = tl.program_id(0), tl.program_id(1)
    o_e = i_e * BLOCK + tl.arange(0, BLOCK)
    m_e = o_e < RP
    base = i_bh.to(tl.int64) * NG
    e = tl.zeros([BLOCK], dtype=tl.float32)
    k = tl.program_id(0) * 0
    dec = tl.load(gdec_ptr + base + k)  # NG >= 1
    end = tl.load(gst_ptr + (base + k) * RP + o_e, mask=m_e, other=0.0)
    while k < NG:
        dec2 = tl.load(gdec_ptr + base + k + 1, mask=k + 1 < NG, other=0.0)
        end2 = tl.load(gst_ptr + (base + k + 1) * RP + o_e, mask=m_e & (k + 1 < NG), other=0.0)
        tl.store(gst_ptr + (base + k) * RP + o_e, e, mask=m_e)
        e = dec * e + end
        dec, end = dec2, end2
        k += 1


@triton.jit
def _group_fixup_kernel(
    st_ptr, g_ptr, final_ptr, tab_ptr, pc_ptr, gst_ptr, NC, NG, G, H, RP,
    SUB: tl.constexpr, BLOCK: tl.constexpr, REVERSE: tl.constexpr, VARLEN: tl.constexpr,
):
    """Level 3, program (j, row, block): walk steps i = G + j*SUB .. G + j*SUB + SUB-1, all in one group k
    (SUB divides G; group 0 is not launched: E_0 = 0), as a [SUB, BLOCK] tile: e_c += p_c E_k, and where
    the walk leaves a sequence at c, final_n += e^(g_c) p_c E_k. Rows with p_c = 0 (after a reset) are
    masked off. A tile of chunks per program, not one: a program per (chunk, block) made the launch
    grid-bound (as long with nothing to fix as with everything)."""
    j, i_bh, i_e = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    o_e = i_e * BLOCK + tl.arange(0, BLOCK)
    m_e = o_e < RP
    i0 = G + j * SUB
    i = i0 + tl.arange(0, SUB)
    ok = i < NC
    c = NC - 1 - i if REVERSE else i
    if VARLEN:
        n = tl.load(tab_ptr + c * 4 + 2, mask=ok, other=0)
        flags = tl.load(tab_ptr + c * 4 + 3, mask=ok, other=0)
        leaves = (flags & (1 if REVERSE else 2)) != 0
    else:
        n = tl.zeros([SUB], dtype=tl.int32) + i_b
        leaves = i == NC - 1
    row = i_bh.to(tl.int64) * NC + c
    p = tl.load(pc_ptr + row, mask=ok, other=0.0)
    on = ok & (p != 0.0)
    big_e = tl.load(gst_ptr + (i_bh.to(tl.int64) * NG + i0 // G) * RP + o_e, mask=m_e, other=0.0)
    carry = p[:, None] * big_e[None, :]
    active = on[:, None] & m_e[None, :]
    ptrs = st_ptr + row[:, None] * RP + o_e[None, :]
    e = tl.load(ptrs, mask=active, other=0.0).to(tl.float32)
    tl.store(ptrs, (e + carry).to(st_ptr.dtype.element_ty), mask=active)
    fin = active & leaves[:, None]
    f_ptrs = final_ptr + ((n * H + i_h).to(tl.int64) * RP)[:, None] + o_e[None, :]
    f = tl.load(f_ptrs, mask=fin, other=0.0)
    decay = tl.exp(tl.load(g_ptr + row, mask=on & leaves, other=0.0))
    tl.store(f_ptrs, f + decay[:, None] * carry, mask=fin)


def _walk_block(programs: int, state_size: int) -> int:
    """Elements of the R*P state per walking program: each walk is latency-bound, so with few walks
    smaller blocks put more programs in flight."""
    block = _STATE_BLOCK
    while block > 64 and programs * triton.cdiv(state_size, block) < _STATE_PROGRAMS:
        block //= 2
    return block


def state_pass(
    states: Tensor,
    g: Tensor,
    init: Tensor | None,
    n_seq: int,
    heads: int,
    table: Tensor | None,
    reverse: bool,
    two_levels: bool | None = None,
) -> Tensor:
    """The walk of the module docstring, in place over states [B,H,NC,R,P] fp32 (local contributions in,
    e out); g [B*H, NC] fp32; init [n_seq,H,R,P] fp32 or None (zeros); table the chunk table with
    cu_seqlens (then B = 1) or None. two_levels None picks by `use_two_levels`. Returns the finals
    [n_seq,H,R,P] fp32."""
    b, h, nc, r, p = states.shape
    rows, rp = b * h, r * p
    final = torch.empty(n_seq, h, r, p, device=states.device, dtype=torch.float32)
    if two_levels is None:
        two_levels = use_two_levels(rows, nc, rp)
    init_arg = init if init is not None else final  # never read without HAS_INIT
    tab = table if table is not None else g  # never read without VARLEN
    flags = dict(HAS_INIT=init is not None, REVERSE=reverse, VARLEN=table is not None)
    if not two_levels:
        block = _walk_block(rows, rp)
        _walk_kernel[(rows, triton.cdiv(rp, block))](
            states, g, init_arg, final, tab, nc, heads, rp, BLOCK=block, **flags
        )
        return final
    grp = group_size(nc)
    n_groups = triton.cdiv(nc, grp)
    pc = torch.empty(rows, nc, device=states.device, dtype=torch.float32)
    gst = torch.empty(rows, n_groups, rp, device=states.device, dtype=torch.float32)
    gdec = torch.empty(rows, n_groups, device=states.device, dtype=torch.float32)
    block = _walk_block(rows * n_groups, rp)
    _group_walk_kernel[(rows, triton.cdiv(rp, block), n_groups)](
        states, g, init_arg, final, tab, pc, gst, gdec, nc, n_groups, grp, heads, rp, BLOCK=block, **flags
    )
    finish_groups(states, g, final, table, pc, gst, gdec, heads, grp, reverse)
    return final


def finish_groups(states: Tensor, g: Tensor, final: Tensor, table: Tensor | None, pc: Tensor, gst: Tensor,
                  gdec: Tensor, heads: int, group: int, reverse: bool) -> None:
    """Levels 2 and 3 of the two-level walk, in place, after a first level (`_group_walk_kernel`, or the
    fused walk of `fused_states.py`) wrote the group-local states (fp32 or bf16) into states [B,H,NC,R,P],
    g [B*H, NC] fp32, p_c into pc [B*H, NC], each group's end state into gst [B*H, NG, R*P] fp32 (any
    view of that size) and its decay product into gdec [B*H, NG], and the finals of the sequences
    that end in a group before the carry."""
    b, h, nc, r, p = states.shape
    rows, rp, n_groups = b * h, r * p, gdec.shape[1]
    if nc <= group:  # one group: its states and finals are already right
        return
    block = _walk_block(rows, rp)
    _group_carry_kernel[(rows, triton.cdiv(rp, block))](gst, gdec, n_groups, rp, BLOCK=block)
    block = min(_FIXUP_BLOCK, triton.next_power_of_2(rp))
    sub = min(_FIXUP_CHUNKS, group & -group)  # a power of two that divides G: a tile stays in one group
    _group_fixup_kernel[(triton.cdiv(nc - group, sub), rows, triton.cdiv(rp, block))](
        states, g, final, table if table is not None else g, pc, gst, nc, n_groups, group, heads, rp,
        SUB=sub, BLOCK=block, REVERSE=reverse, VARLEN=table is not None,
    )
