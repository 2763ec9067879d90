"""Fused tied TT head + cross-entropy (K = 2 cores): Triton kernels, launchers, autograd Function.

Math (DESIGN.md "Tied TT head"): cores G1 `(V1, 1, D1, R)`, G2 `(V2, R, D2, 1)`; vocab id
v = i*V2 + j, hidden column c = a*D2 + b, H_n = h[n] viewed `[D1, D2]`.

    X_n[i, (r, b)] = sum_a G1[i, a, r] H_n[a, b]                    (generated on the fly)
    logits[n, i, j] = sum_(r, b) X_n[i, (r, b)] G2'[j, (r, b)]      G2' = G2 viewed [V2, R*D2]

so the head is a GEMM whose rows are (token n, i) pairs and whose left operand X is made per
rank chunk by one batched tl.dot ([TB, BU*RC, D1] @ [TB, D1, D2], a pure reshape to
[TB*BU, RC*D2]); K = R*D2, N = V2. The kernels are written for a generic "form" (strides of an
outer core A with rows u and an inner core B with rows w), so the same code also runs with the
cores' roles swapped (u = j, w = i): that is how the deterministic dG1 is computed.

Kernels:
- `_fwd_kernel`, grid (token blocks, u blocks): logits tiles [TB*BU, BW] over the w blocks, online
  (max, sum-exp) and the target logit per token; per-program partials `[n_u_blocks, N]`, combined
  in torch (fixed order: deterministic).
- `_dh_kernel`, grid (token blocks): loops over every (u, w) block, recomputes logits, forms
  dl = g*(softmax*(1 + 2 z lse) - onehot), dX = dl @ B per rank chunk, and contracts dX with A
  into dh (fp32 registers, one store: deterministic, no atomics). With DO_DA it also adds
  dA[u, p, r] = sum_(n, q) H_n[p, q] dX_n[u, r, q] into an fp32 buffer with atomics (the default
  dG1: float atomics add in arrival order, so dG1 can differ between runs in the last bits).
- `_dw_kernel`, grid (w blocks, rank groups, token splits): recomputes logits and dl for its w
  block and adds dB[w, (r, q)] = sum_(n, u) dl[(n, u), w] X[(n, u), (r, q)] for its rank group
  into fp32 registers; each program writes its own slot of `[splits, W, R, Q]`, summed in torch:
  deterministic. Runs in X form for dG2 and, with `deterministic=True`, in the swapped form
  for dG1 (instead of the atomics).

Nothing of size N x V or V x D exists: the largest buffers are `[n_u_blocks, N]` partials and the
`[splits, V2, R*D2]` dG2 slots. No host sync.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from muse_lm.ops._config import check_at_least_one, check_tiles, check_warps
from muse_lm.ops._dispatch import compile_boundary, interpreter_enabled
from muse_lm.ops.tt_cross_entropy.reference import _reduce, _token_weights, combine_lse_partials


@dataclass(frozen=True)
class TTHeadConfig:
    """Tile shape shared by the three kernels.

    block_t: tokens per program; block_i: outer-core rows per program (rows = block_t * block_i);
    block_j: inner-core rows per logits tile; rank_chunk: ranks per K step (K step = rank_chunk*D2);
    dw_block_j / dw_rank_group: the dG2 kernel's inner rows and ranks per program.
    """

    block_t: int
    block_i: int
    block_j: int
    rank_chunk: int
    num_warps: int
    num_stages: int
    dw_block_j: int
    dw_rank_group: int

    def __post_init__(self):
        check_tiles(self, "block_t", "block_i", "block_j", "rank_chunk", "dw_block_j", "dw_rank_group")
        # tl.dot needs every tile side >= 16 on the GPU.
        if self.block_t * self.block_i < 16 or self.block_i * self.rank_chunk < 16:
            raise ValueError(
                f"TTHeadConfig: block_t*block_i={self.block_t * self.block_i} and "
                f"block_i*rank_chunk={self.block_i * self.rank_chunk} must both be >= 16 (tl.dot tiles)"
            )
        if self.block_i * self.dw_rank_group < 16 or min(self.block_j, self.dw_block_j) < 16:
            raise ValueError("TTHeadConfig: block_i*dw_rank_group, block_j and dw_block_j must be >= 16")
        check_warps(self)
        check_at_least_one(self, "num_stages")


# Every declared config is checked against the reference (interpreter tests and GPU tests).
# The first is the H100 default (a whole 256-wide V2 in one logits tile, so X is made once per
# row); the last fits a 99 KB shared-memory card.
CONFIGS = (
    TTHeadConfig(4, 16, 256, 2, 8, 2, 64, 8),
    TTHeadConfig(8, 8, 128, 2, 8, 2, 64, 8),
    TTHeadConfig(2, 16, 64, 1, 4, 2, 32, 8),
)


def _p2(x: int) -> int:
    return triton.next_power_of_2(max(1, x))


@dataclass(frozen=True)
class _Tiles:
    """Config sizes clamped to the problem (tiny heads don't need 256-wide tiles)."""

    tb: int
    bu: int
    bw: int
    rc: int
    bp: int
    bq: int
    dw_bw: int
    dw_rg: int


@dataclass(frozen=True)
class _Form:
    """Strides that cast the cores as outer core A[u, p, r], inner core B[w, r, q], H_n[p, q]."""

    a: Tensor
    b: Tensor
    U: int
    W: int
    P: int
    Q: int
    sa: tuple[int, int, int]
    sb: tuple[int, int, int]
    sh: tuple[int, int]
    sv: tuple[int, int]  # v = u * sv[0] + w * sv[1]

    def args(self) -> tuple:
        return (self.a, self.b, *self.sa, *self.sb, *self.sh, *self.sv)

    def sizes(self, r: int) -> dict:
        # Loop bounds are constexpr: Triton 3.6's interpreter cannot loop to a runtime int, and the
        # head's shape is fixed per model anyway.
        return dict(U=self.U, W=self.W, P=self.P, Q=self.Q, R=r)


def _forms(g1: Tensor, g2: Tensor) -> tuple[_Form, _Form]:
    """(X form: u = i, w = j) and (swapped: u = j, w = i) for contiguous cores."""
    v1, _, d1, r = g1.shape
    v2, _, d2, _ = g2.shape
    x = _Form(g1, g2, v1, v2, d1, d2, (d1 * r, r, 1), (r * d2, d2, 1), (d2, 1), (v2, 1))
    y = _Form(g2, g1, v2, v1, d2, d1, (r * d2, 1, d2), (d1 * r, 1, r), (1, d2), (1, v2))
    return x, y


def _tiles(cfg: TTHeadConfig, form: _Form) -> _Tiles:
    return _Tiles(
        tb=cfg.block_t,
        bu=cfg.block_i,
        bw=min(cfg.block_j, max(16, _p2(form.W))),
        rc=cfg.rank_chunk,
        bp=max(16, _p2(form.P)),
        bq=max(16, _p2(form.Q)),
        dw_bw=min(cfg.dw_block_j, max(16, _p2(form.W))),
        dw_rg=cfg.dw_rank_group,
    )


def smem_estimate(cfg: TTHeadConfig, d1: int, d2: int, v2: int, elem_bytes: int = 2) -> int:
    """Rough upper bound (bytes) on the shared memory of the largest kernel for this config.

    Dot operands staged in shared memory (times num_stages) plus an fp32 logits tile for layout
    conversions. An estimate, used only to drop configs that cannot fit a card.
    """
    bp, bq = max(16, _p2(d1)), max(16, _p2(d2))
    bw = min(cfg.block_j, max(16, _p2(v2)))
    rows, k = cfg.block_t * cfg.block_i, cfg.rank_chunk * bq
    gen = cfg.block_t * (cfg.block_i * cfg.rank_chunk * bp + bp * bq)
    staged = (rows * k + k * bw + gen) * elem_bytes * cfg.num_stages
    dw_bw = min(cfg.dw_block_j, max(16, _p2(v2)))
    dw = (rows * dw_bw + rows * cfg.dw_rank_group * bq) * elem_bytes * cfg.num_stages
    return max(staged, dw) + rows * max(bw, dw_bw) * 4


def usable_configs(
    device: torch.device, d1: int, d2: int, v2: int, smem_limit: int | None = None
) -> list[TTHeadConfig]:
    """CONFIGS that fit the device's shared memory (all of them under the interpreter)."""
    if smem_limit is None:
        if interpreter_enabled() or device.type != "cuda":
            return list(CONFIGS)
        props = triton.runtime.driver.active.utils.get_device_properties(device.index or 0)
        smem_limit = props["max_shared_mem"]
    fits = [c for c in CONFIGS if smem_estimate(c, d1, d2, v2) <= smem_limit]
    if not fits:
        raise RuntimeError(f"tt head: no declared config fits {smem_limit} bytes of shared memory")
    return fits


# --------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _mm(x, y, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(x, y, acc, input_precision="ieee")
    return tl.dot(x, y, acc)


@triton.jit
def _xgen(a_ptr, h_ptr, n, u0, r0, N, U: tl.constexpr, R: tl.constexpr, P: tl.constexpr, Q: tl.constexpr, D,
          sAu, sAp, sAr, sHp, sHq,
          TB: tl.constexpr, BU: tl.constexpr, RC: tl.constexpr, BP: tl.constexpr, BQ: tl.constexpr,
          IEEE: tl.constexpr):
    """X rows (n, u) for ranks [r0, r0 + RC): `[TB*BU, RC*BQ]` fp32, cols (r, q)."""
    k = tl.arange(0, BU * RC)
    ku = u0 + k // RC
    kr = r0 + k % RC
    p = tl.arange(0, BP)
    q = tl.arange(0, BQ)
    a2 = tl.load(
        a_ptr + ku[:, None] * sAu + p[None, :] * sAp + kr[:, None] * sAr,
        mask=((ku < U) & (kr < R))[:, None] & (p < P)[None, :],
        other=0.0,
    )  # [BU*RC, BP] rows (u, r)
    h3 = tl.load(
        h_ptr + n[:, None, None] * D + p[None, :, None] * sHp + q[None, None, :] * sHq,
        mask=(n < N)[:, None, None] & (p < P)[None, :, None] & (q < Q)[None, None, :],
        other=0.0,
    )  # [TB, BP, BQ]
    zero = tl.zeros([TB, BU * RC, BQ], dtype=tl.float32)
    x = _mm(tl.broadcast_to(a2[None, :, :], [TB, BU * RC, BP]), h3, zero, IEEE)  # [TB, BU*RC, BQ]
    return tl.reshape(x, [TB * BU, RC * BQ])


@triton.jit
def _logits(a_ptr, b_ptr, h_ptr, n, u0, w, N, U: tl.constexpr, W: tl.constexpr, R: tl.constexpr,
            P: tl.constexpr, Q: tl.constexpr, D, sAu, sAp, sAr, sBw, sBr, sBq, sHp, sHq,
            TB: tl.constexpr, BU: tl.constexpr, BW: tl.constexpr, RC: tl.constexpr, BP: tl.constexpr,
            BQ: tl.constexpr, IEEE: tl.constexpr):
    """Logits of rows (n, u) x cols w: `[TB*BU, BW]` fp32 (padding rows/cols hold 0)."""
    j = tl.arange(0, RC * BQ)
    jq = j % BQ
    acc = tl.zeros([TB * BU, BW], dtype=tl.float32)
    for r0 in range(0, R, RC):
        x = _xgen(a_ptr, h_ptr, n, u0, r0, N, U, R, P, Q, D, sAu, sAp, sAr, sHp, sHq, TB, BU, RC, BP, BQ, IEEE)
        jr = r0 + j // BQ
        bt = tl.load(
            b_ptr + w[None, :] * sBw + jr[:, None] * sBr + jq[:, None] * sBq,
            mask=(w < W)[None, :] & ((jr < R) & (jq < Q))[:, None],
            other=0.0,
        )  # [RC*BQ, BW]
        acc = _mm(x.to(bt.dtype), bt, acc, IEEE)  # [TB*BU, RC*BQ] @ [RC*BQ, BW]
    return acc


@triton.jit
def _rows(t_ptr, n0, u0, w, N, U: tl.constexpr, W: tl.constexpr, V, sVu, sVw, TB: tl.constexpr, BU: tl.constexpr):
    """Per-row token index, `valid` [rows, BW] (real vocab entry) and `hit` (the row's target)."""
    m = tl.arange(0, TB * BU)
    n_row = n0 + m // BU
    u_row = u0 + m % BU
    t = tl.load(t_ptr + n_row, mask=n_row < N, other=-1).to(tl.int64)
    t_ok = (t >= 0) & (t < V)
    tu = (t // sVu) % U
    tw = (t // sVw) % W
    v = u_row[:, None] * sVu + w[None, :] * sVw
    valid = (u_row < U)[:, None] & (w < W)[None, :] & (v < V)
    hit = valid & (t_ok & (tu == u_row))[:, None] & (w[None, :] == tw[:, None])
    return n_row, valid, hit


@triton.jit
def _fwd_kernel(a_ptr, b_ptr, sAu, sAp, sAr, sBw, sBr, sBq, sHp, sHq, sVu, sVw,
                h_ptr, t_ptr, m_ptr, s_ptr, tgt_ptr, N, D, V,
                U: tl.constexpr, W: tl.constexpr, P: tl.constexpr, Q: tl.constexpr, R: tl.constexpr,
                TB: tl.constexpr, BU: tl.constexpr, BW: tl.constexpr, RC: tl.constexpr, BP: tl.constexpr,
                BQ: tl.constexpr, IEEE: tl.constexpr):
    pid_u = tl.program_id(1)
    n0 = tl.program_id(0) * TB
    u0 = pid_u * BU
    n = (n0 + tl.arange(0, TB)).to(tl.int64)
    m_run = tl.full([TB * BU], float("-inf"), tl.float32)
    s_run = tl.zeros([TB * BU], dtype=tl.float32)
    tgt = tl.zeros([TB * BU], dtype=tl.float32)
    for w0 in range(0, W, BW):
        w = w0 + tl.arange(0, BW)
        logits = _logits(a_ptr, b_ptr, h_ptr, n, u0, w, N, U, W, R, P, Q, D, sAu, sAp, sAr, sBw, sBr, sBq,
                         sHp, sHq, TB, BU, BW, RC, BP, BQ, IEEE)
        n_row, valid, hit = _rows(t_ptr, n0, u0, w, N, U, W, V, sVu, sVw, TB, BU)
        logits = tl.where(valid, logits, float("-inf"))
        tgt += tl.sum(tl.where(hit, logits, 0.0), axis=1)
        m_new = tl.maximum(m_run, tl.max(logits, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully padded rows: keep exp() finite
        s_run = s_run * tl.exp(m_run - m_safe) + tl.sum(tl.exp(logits - m_safe[:, None]), axis=1)
        m_run = m_new
    m2 = tl.reshape(m_run, [TB, BU])
    m_tok = tl.max(m2, axis=1)
    m_tok_safe = tl.where(m_tok == float("-inf"), 0.0, m_tok)
    s_tok = tl.sum(tl.reshape(s_run, [TB, BU]) * tl.exp(m2 - m_tok_safe[:, None]), axis=1)
    t_tok = tl.sum(tl.reshape(tgt, [TB, BU]), axis=1)
    out = pid_u * N + n
    tl.store(m_ptr + out, m_tok, mask=n < N)
    tl.store(s_ptr + out, s_tok, mask=n < N)
    tl.store(tgt_ptr + out, t_tok, mask=n < N)


@triton.jit
def _dlogits(logits, valid, hit, n_row, lse_ptr, gs_ptr, go_ptr, N):
    """dL/dlogits = gs * exp(logit - lse) - go * onehot (0 off the vocab and for padding tokens)."""
    ok = n_row < N
    lse = tl.load(lse_ptr + n_row, mask=ok, other=0.0)
    gs = tl.load(gs_ptr + n_row, mask=ok, other=0.0)
    go = tl.load(go_ptr + n_row, mask=ok, other=0.0)
    p = tl.where(valid, tl.exp(logits - lse[:, None]), 0.0) * gs[:, None]
    return p - tl.where(hit, go[:, None], 0.0)


@triton.jit
def _dh_kernel(a_ptr, b_ptr, sAu, sAp, sAr, sBw, sBr, sBq, sHp, sHq, sVu, sVw,
               h_ptr, t_ptr, lse_ptr, gs_ptr, go_ptr, dh_ptr, da_ptr, N, D, V,
               U: tl.constexpr, W: tl.constexpr, P: tl.constexpr, Q: tl.constexpr, R: tl.constexpr,
               TB: tl.constexpr, BU: tl.constexpr, BW: tl.constexpr, RC: tl.constexpr, BP: tl.constexpr,
               BQ: tl.constexpr, IEEE: tl.constexpr, DO_DA: tl.constexpr):
    n0 = tl.program_id(0) * TB
    n = (n0 + tl.arange(0, TB)).to(tl.int64)
    p = tl.arange(0, BP)
    q = tl.arange(0, BQ)
    k = tl.arange(0, BU * RC)
    j = tl.arange(0, RC * BQ)
    dh = tl.zeros([TB, BP, BQ], dtype=tl.float32)
    for u0 in range(0, U, BU):
        ku = u0 + k // RC
        for w0 in range(0, W, BW):
            w = w0 + tl.arange(0, BW)
            logits = _logits(a_ptr, b_ptr, h_ptr, n, u0, w, N, U, W, R, P, Q, D, sAu, sAp, sAr, sBw, sBr, sBq,
                             sHp, sHq, TB, BU, BW, RC, BP, BQ, IEEE)
            n_row, valid, hit = _rows(t_ptr, n0, u0, w, N, U, W, V, sVu, sVw, TB, BU)
            dl = _dlogits(logits, valid, hit, n_row, lse_ptr, gs_ptr, go_ptr, N).to(b_ptr.dtype.element_ty)
            for r0 in range(0, R, RC):
                jr = r0 + j // BQ
                jq = j % BQ
                b2 = tl.load(
                    b_ptr + w[:, None] * sBw + jr[None, :] * sBr + jq[None, :] * sBq,
                    mask=(w < W)[:, None] & ((jr < R) & (jq < Q))[None, :],
                    other=0.0,
                )  # [BW, RC*BQ]
                dx = _mm(dl, b2, tl.zeros([TB * BU, RC * BQ], dtype=tl.float32), IEEE)  # rows (n, u), cols (r, q)
                dx3 = tl.reshape(dx, [TB, BU * RC, BQ]).to(b_ptr.dtype.element_ty)
                kr = r0 + k % RC
                a_mask = ((ku < U) & (kr < R))[None, :] & (p < P)[:, None]
                a_t = tl.load(a_ptr + ku[None, :] * sAu + p[:, None] * sAp + kr[None, :] * sAr, mask=a_mask, other=0.0)
                # dh_n[p, q] += sum_(u, r) A[u, p, r] dX_n[(u, r), q]: [TB, BP, BU*RC] @ [TB, BU*RC, BQ]
                dh = _mm(tl.broadcast_to(a_t[None, :, :], [TB, BP, BU * RC]), dx3, dh, IEEE)
                if DO_DA:
                    h_t = tl.load(
                        h_ptr + n[:, None, None] * D + q[None, :, None] * sHq + p[None, None, :] * sHp,
                        mask=(n < N)[:, None, None] & (q < Q)[None, :, None] & (p < P)[None, None, :],
                        other=0.0,
                    )  # [TB, BQ, BP]
                    da = _mm(dx3, h_t, tl.zeros([TB, BU * RC, BP], dtype=tl.float32), IEEE)  # [TB, BU*RC, BP]
                    tl.atomic_add(
                        da_ptr + ku[:, None] * sAu + p[None, :] * sAp + kr[:, None] * sAr,
                        tl.sum(da, axis=0),
                        mask=((ku < U) & (kr < R))[:, None] & (p < P)[None, :],
                        sem="relaxed",
                    )
    offs = n[:, None, None] * D + p[None, :, None] * sHp + q[None, None, :] * sHq
    mask = (n < N)[:, None, None] & (p < P)[None, :, None] & (q < Q)[None, None, :]
    tl.store(dh_ptr + offs, dh.to(dh_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dw_block(acc, a_ptr, b_ptr, sAu, sAp, sAr, sBw, sBr, sBq, sHp, sHq, sVu, sVw,
              h_ptr, t_ptr, lse_ptr, gs_ptr, go_ptr, n0, w, g0, N, D, V,
              U: tl.constexpr, W: tl.constexpr, P: tl.constexpr, Q: tl.constexpr, R: tl.constexpr,
              TB: tl.constexpr, BU: tl.constexpr, BW: tl.constexpr, RC: tl.constexpr, RG: tl.constexpr,
              BP: tl.constexpr, BQ: tl.constexpr, IEEE: tl.constexpr):
    """acc + the dB contribution of tokens [n0, n0 + TB) over every u block."""
    n = (n0 + tl.arange(0, TB)).to(tl.int64)
    for u0 in range(0, U, BU):
        logits = _logits(a_ptr, b_ptr, h_ptr, n, u0, w, N, U, W, R, P, Q, D, sAu, sAp, sAr, sBw, sBr, sBq,
                         sHp, sHq, TB, BU, BW, RC, BP, BQ, IEEE)
        n_row, valid, hit = _rows(t_ptr, n0, u0, w, N, U, W, V, sVu, sVw, TB, BU)
        dl = _dlogits(logits, valid, hit, n_row, lse_ptr, gs_ptr, go_ptr, N).to(b_ptr.dtype.element_ty)
        xg = _xgen(a_ptr, h_ptr, n, u0, g0, N, U, R, P, Q, D, sAu, sAp, sAr, sHp, sHq, TB, BU, RG, BP, BQ, IEEE)
        # dB[w, (r, q)] += dl^T @ X: [BW, rows] @ [rows, RG*BQ]
        acc = _mm(tl.trans(dl), xg.to(b_ptr.dtype.element_ty), acc, IEEE)
    return acc


@triton.jit
def _dw_kernel(a_ptr, b_ptr, sAu, sAp, sAr, sBw, sBr, sBq, sHp, sHq, sVu, sVw,
               h_ptr, t_ptr, lse_ptr, gs_ptr, go_ptr, part_ptr, N, D, V, SPLITS,
               U: tl.constexpr, W: tl.constexpr, P: tl.constexpr, Q: tl.constexpr, R: tl.constexpr,
               TB: tl.constexpr, BU: tl.constexpr, BW: tl.constexpr, RC: tl.constexpr, RG: tl.constexpr,
               BP: tl.constexpr, BQ: tl.constexpr, IEEE: tl.constexpr, INTERPRET: tl.constexpr):
    w = tl.program_id(0) * BW + tl.arange(0, BW)
    g0 = tl.program_id(1) * RG
    split = tl.program_id(2)
    acc = tl.zeros([BW, RG * BQ], dtype=tl.float32)
    if INTERPRET:  # Triton 3.6's interpreter cannot loop to a runtime bound with range()
        n0 = split * TB
        while n0 < N:
            acc = _dw_block(acc, a_ptr, b_ptr, sAu, sAp, sAr, sBw, sBr, sBq, sHp, sHq, sVu, sVw, h_ptr, t_ptr,
                            lse_ptr, gs_ptr, go_ptr, n0, w, g0, N, D, V, U, W, P, Q, R, TB, BU, BW, RC, RG, BP, BQ,
                            IEEE)
            n0 += SPLITS * TB
    else:
        for n0 in range(split * TB, N, SPLITS * TB):
            acc = _dw_block(acc, a_ptr, b_ptr, sAu, sAp, sAr, sBw, sBr, sBq, sHp, sHq, sVu, sVw, h_ptr, t_ptr,
                            lse_ptr, gs_ptr, go_ptr, n0, w, g0, N, D, V, U, W, P, Q, R, TB, BU, BW, RC, RG, BP, BQ,
                            IEEE)
    c = tl.arange(0, RG * BQ)
    cr = g0 + c // BQ
    cq = c % BQ
    offs = ((split * W + w.to(tl.int64))[:, None] * R + cr[None, :]) * Q + cq[None, :]
    tl.store(part_ptr + offs, acc, mask=(w < W)[:, None] & ((cr < R) & (cq < Q))[None, :])


# --------------------------------------------------------------------------------------------
# Launchers


def tt_head_forward(
    h: Tensor, g1: Tensor, g2: Tensor, targets: Tensor, vocab_size: int, config: TTHeadConfig
) -> tuple[Tensor, Tensor]:
    """(lse `[N]`, target logit `[N]`), fp32; rows >= vocab_size excluded. Inputs contiguous, same dtype."""
    n, d = h.shape
    form, _ = _forms(g1, g2)
    t = _tiles(config, form)
    r = g1.shape[3]
    n_ub = triton.cdiv(form.U, t.bu)
    parts = torch.empty(3, n_ub, n, device=h.device, dtype=torch.float32)
    _fwd_kernel[(triton.cdiv(n, t.tb), n_ub)](
        *form.args(), h, targets, parts[0], parts[1], parts[2], n, d, vocab_size, **form.sizes(r),
        TB=t.tb, BU=t.bu, BW=t.bw, RC=t.rc, BP=t.bp, BQ=t.bq, IEEE=h.dtype == torch.float32,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return combine_lse_partials(parts[0], parts[1]), parts[2].sum(0)


def _dw(form: _Form, h, targets, lse, gs, go, vocab_size, r, config, t: _Tiles) -> Tensor:
    """Gradient of the form's inner core B, `[W, R, Q]` fp32, deterministic (per-split slots)."""
    n, d = h.shape
    n_wb = triton.cdiv(form.W, t.dw_bw)
    n_g = triton.cdiv(r, t.dw_rg)
    n_tb = triton.cdiv(n, t.tb)
    # ~4 programs per SM on an H100 (132 SMs), never more splits than token blocks.
    splits = max(1, min(n_tb, triton.cdiv(528, n_wb * n_g)))
    part = torch.empty(splits, form.W, r, form.Q, device=h.device, dtype=torch.float32)
    _dw_kernel[(n_wb, n_g, splits)](
        *form.args(), h, targets, lse, gs, go, part, n, d, vocab_size, splits, **form.sizes(r),
        TB=t.tb, BU=t.bu, BW=t.dw_bw, RC=t.rc, RG=t.dw_rg, BP=t.bp, BQ=t.bq, IEEE=h.dtype == torch.float32,
        INTERPRET=interpreter_enabled(), num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return part.sum(0)


def tt_head_backward(
    h: Tensor,
    g1: Tensor,
    g2: Tensor,
    targets: Tensor,
    lse: Tensor,
    gs: Tensor,
    go: Tensor,
    vocab_size: int,
    config: TTHeadConfig,
    *,
    deterministic: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dh `[N, D]` in h's dtype, dG1, dG2 fp32 in the cores' shapes) for dlogits = gs*softmax - go*onehot.

    gs, go: `[N]` fp32 (0 for ignored tokens). dG1 uses fp32 atomics unless `deterministic`.
    """
    n, d = h.shape
    x_form, y_form = _forms(g1, g2)
    t = _tiles(config, x_form)
    r = g1.shape[3]
    dh = torch.empty_like(h)
    dg1 = torch.zeros(g1.shape, device=h.device, dtype=torch.float32)
    _dh_kernel[(triton.cdiv(n, t.tb),)](
        *x_form.args(), h, targets, lse, gs, go, dh, dg1, n, d, vocab_size, **x_form.sizes(r),
        TB=t.tb, BU=t.bu, BW=t.bw, RC=t.rc, BP=t.bp, BQ=t.bq, IEEE=h.dtype == torch.float32,
        DO_DA=not deterministic, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    dg2 = _dw(x_form, h, targets, lse, gs, go, vocab_size, r, config, t).reshape(g2.shape)
    if deterministic:
        # Swapped form: B = G1 as [i, r, a]; back to (V1, 1, D1, R).
        dg1 = _dw(y_form, h, targets, lse, gs, go, vocab_size, r, config, _tiles(config, y_form))
        dg1 = dg1.permute(0, 2, 1).reshape(g1.shape)
    return dh, dg1, dg2


# --------------------------------------------------------------------------------------------
# Autograd


@dataclass(frozen=True)
class _Spec:
    vocab_size: int
    ignore_index: int
    reduction: str
    z_loss: float
    config: TTHeadConfig
    deterministic: bool


class TTLinearCrossEntropyTriton(torch.autograd.Function):
    """Loss of the tied TT head from the fused kernels; the backward recomputes the logits."""

    @staticmethod
    def forward(ctx, h: Tensor, targets: Tensor, spec: _Spec, g1: Tensor, g2: Tensor) -> Tensor:
        dtype = _work_dtype(h, g1, g2)
        hw, c1, c2 = (x.to(dtype).contiguous() for x in (h, g1, g2))
        t = targets.contiguous()
        valid = t != spec.ignore_index
        lse, tgt = tt_head_forward(hw, c1, c2, t, spec.vocab_size, spec.config)
        per_token = torch.where(valid, lse - tgt + spec.z_loss * lse.square(), torch.zeros_like(lse))
        ctx.spec = spec
        ctx.dtypes = (h.dtype, g1.dtype, g2.dtype)
        ctx.save_for_backward(hw, t, lse, c1, c2)
        return _reduce(per_token, valid, spec.reduction)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        hw, t, lse, c1, c2 = ctx.saved_tensors
        spec: _Spec = ctx.spec
        valid = t != spec.ignore_index
        go = _token_weights(grad_out.to(torch.float32), valid, spec.reduction)
        go = go.expand_as(lse).contiguous()
        gs = (go * (1 + 2 * spec.z_loss * lse)).contiguous()
        dh, dg1, dg2 = tt_head_backward(
            hw, c1, c2, t, lse, gs, go, spec.vocab_size, spec.config, deterministic=spec.deterministic
        )
        h_dt, g1_dt, g2_dt = ctx.dtypes
        need = ctx.needs_input_grad
        return (
            dh.to(h_dt) if need[0] else None,
            None,
            None,
            dg1.to(g1_dt) if need[3] else None,
            dg2.to(g2_dt) if need[4] else None,
        )


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _work_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for x in tensors[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    if dtype not in _KERNEL_DTYPES:
        raise ValueError(
            f"tt_linear_cross_entropy: the Triton kernel takes fp32, bf16 or fp16 inputs, got {dtype}; "
            "pass impl='torch' for fp64"
        )
    return dtype


@compile_boundary
def tt_linear_cross_entropy_triton(
    h: Tensor,
    cores: Sequence[Tensor],
    targets: Tensor,
    *,
    vocab_size: int,
    ignore_index: int,
    reduction: str,
    z_loss: float,
    config: TTHeadConfig | None = None,
    deterministic: bool = False,
) -> Tensor:
    """Fused tied-TT-head loss: the contract of `tt_linear_cross_entropy` for h `[N, D]`, targets `[N]`.

    K = 2 cores only (K = 3 raises: use the reference). The loss is fp32; gradients come back in
    the inputs' dtypes. With bf16 inputs the logits use bf16 tensor-core products with fp32
    accumulation. dG1 is summed with fp32 atomics (last-bit run-to-run differences) unless
    `deterministic=True`, which computes it like dG2 (per-program slots added in a fixed order) at
    the cost of one more logits recomputation. Inputs are assumed validated by the public op.
    """
    if len(cores) != 2:
        raise ValueError(
            f"tt_linear_cross_entropy: the Triton kernel supports K = 2 cores, got {len(cores)}; pass impl='torch'"
        )
    if h.ndim != 2 or targets.shape != h.shape[:1]:
        raise ValueError(
            f"tt_linear_cross_entropy_triton: h must be [N, D] and targets [N], got {tuple(h.shape)} "
            f"and {tuple(targets.shape)}"
        )
    g1, g2 = cores
    cfg = config or usable_configs(h.device, g1.shape[2], g2.shape[2], g2.shape[0])[0]
    n = h.shape[0]
    if n == 0:
        # Nothing to launch; keep the graph so the gradients are zeros of the right shapes.
        zero = (h.sum() + g1.sum() + g2.sum()).float() * 0
        return zero.expand(0) if reduction == "none" else zero
    spec = _Spec(vocab_size, ignore_index, reduction, float(z_loss), cfg, deterministic)
    return TTLinearCrossEntropyTriton.apply(h, targets, spec, g1, g2)


__all__ = [
    "CONFIGS",
    "TTHeadConfig",
    "smem_estimate",
    "tt_head_backward",
    "tt_head_forward",
    "tt_linear_cross_entropy_triton",
    "usable_configs",
]
