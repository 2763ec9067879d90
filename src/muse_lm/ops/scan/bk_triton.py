"""BK resolvent diagonal in Triton: chunked 2x2 transfer-matrix scan forward, reverse affine scan backward.

Math (see `bk.py`): c_t = 2 + v_t - z, M_t = [[c_t, -1], [1, 0]], P_t = M_t ... M_1,
G_t = P_t[1,0] / P_t[0,0] = theta_{t-1} / theta_t, equivalently G_t = 1 / (c_t - G_{t-1}), G_0 = 0.

Forward: one program per (b, block of BK channels) walks T in chunks of CT. Inside a chunk a
`tl.associative_scan` over the 8 reals of the complex 2x2 matrices gives the chunk's prefix products
Q_t = M_t ... M_{t0}, each divided by its largest |entry| inside the combine: G is a ratio, so the
scale cancels and no log-scale needs carrying (nothing overflows at any T). Across chunks only
G_{t0-1} is carried: G_t = (Q_t[1,0] + Q_t[1,1] G_{t0-1}) / (Q_t[0,0] + Q_t[0,1] G_{t0-1}).

Backward (PyTorch's convention for complex: grad_in = conj(df/dz) * grad_out for holomorphic f).
dG_t/dc_t = -G_t^2 and dG_t/dG_{t-1} = G_t^2, so the total gradient reaching G_t is
    lam_t = gG_t + conj(G_{t+1}^2) lam_{t+1},   lam_{T+1} = 0          (reverse affine recurrence)
    grad v_t = Re(-conj(G_t^2) lam_t),   grad z = sum_{b,t} conj(G_t^2) lam_t   (dc/dz = -1).
It needs only G (the saved output) and gG: neither v nor z is kept for the backward. The same chunk
walk runs from the end of T, each chunk read back to front so that a forward `associative_scan` of
the affine pairs (a_t, b_t) = (conj(G_{t+1}^2), gG_t) composes them; lam_{t0} is carried. grad z is
summed per program and the [B, K] partials are added by torch: deterministic, no atomics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from muse_lm.ops._config import check_tiles, check_warps
from muse_lm.ops._dispatch import compile_boundary, interpreter_enabled

__all__ = [
    "CONFIGS",
    "BKConfig",
    "BKResolventTriton",
    "bk_resolvent_backward",
    "bk_resolvent_forward",
    "bk_resolvent_triton",
    "default_config",
]


@dataclass(frozen=True)
class BKConfig:
    """Launch shape: CT time steps per chunk, BK channels per program, warps per program."""

    chunk: int
    block_k: int
    num_warps: int

    def __post_init__(self):
        check_tiles(self, "chunk", "block_k", why="tl.arange tiles")
        if self.chunk < 2:
            raise ValueError(f"{type(self).__name__}: chunk={self.chunk} must be at least 2")
        check_warps(self)


# Declared once; every config is checked against the reference on the GPU and is the autotuner's
# search space on CUDA (a config that runs out of shared memory on a smaller card is skipped by the
# autotuner). Tiles of 512-1024 elements keep the 8-real tuples in registers (no spills on sm_90)
# with 2-16 KB of shared memory for the scan. Few heads (K = 4 in the presets) want long chunks of
# few channels: with B = 1 the channel blocks are the only parallelism.
CONFIGS = (
    BKConfig(64, 16, 4),
    BKConfig(128, 8, 4),
    BKConfig(256, 4, 4),
    BKConfig(512, 2, 4),
    BKConfig(1024, 1, 8),
)


def default_config(k_dim: int) -> BKConfig:
    """The config used without autotuning (interpreter): channels per program close to K."""
    block_k = min(16, triton.next_power_of_2(k_dim))
    return next((c for c in CONFIGS if c.block_k == block_k), CONFIGS[2])


def _prune_configs(configs, named_args, **kwargs):
    """Drops configs whose channel block is more than twice the next power of two of K (idle lanes);
    at least one config always survives. No kernel here uses shared memory beyond the scan's."""
    k_dim = named_args["K"]
    fit = [c for c in configs if c.kwargs["BK"] <= 2 * triton.next_power_of_2(k_dim)]
    return fit or [min(configs, key=lambda c: c.kwargs["BK"])]


def _triton_configs() -> list[triton.Config]:
    return [triton.Config({"CT": c.chunk, "BK": c.block_k}, num_warps=c.num_warps) for c in CONFIGS]


@triton.jit
def _mat_combine(a00r, a00i, a01r, a01i, a10r, a10i, a11r, a11i, b00r, b00i, b01r, b01i, b10r, b10i, b11r, b11i):
    """(earlier A, later B) -> B @ A / max|entry| (complex 2x2, 8 reals each)."""
    p00r = b00r * a00r - b00i * a00i + b01r * a10r - b01i * a10i
    p00i = b00r * a00i + b00i * a00r + b01r * a10i + b01i * a10r
    p01r = b00r * a01r - b00i * a01i + b01r * a11r - b01i * a11i
    p01i = b00r * a01i + b00i * a01r + b01r * a11i + b01i * a11r
    p10r = b10r * a00r - b10i * a00i + b11r * a10r - b11i * a10i
    p10i = b10r * a00i + b10i * a00r + b11r * a10i + b11i * a10r
    p11r = b10r * a01r - b10i * a01i + b11r * a11r - b11i * a11i
    p11i = b10r * a01i + b10i * a01r + b11r * a11i + b11i * a11r
    s = tl.maximum(
        tl.maximum(tl.maximum(tl.abs(p00r), tl.abs(p00i)), tl.maximum(tl.abs(p01r), tl.abs(p01i))),
        tl.maximum(tl.maximum(tl.abs(p10r), tl.abs(p10i)), tl.maximum(tl.abs(p11r), tl.abs(p11i))),
    )
    # det M_t = 1, so a product is never zero; the floor only keeps a 0/0 out of padded lanes.
    r = 1.0 / tl.maximum(s, 1e-30)
    return p00r * r, p00i * r, p01r * r, p01i * r, p10r * r, p10i * r, p11r * r, p11i * r


@triton.jit
def _affine_combine(ar, ai, br, bi, cr, ci, dr, di):
    """(earlier x -> a x + b, later x -> c x + d) -> x -> c (a x + b) + d, all complex."""
    return cr * ar - ci * ai, cr * ai + ci * ar, cr * br - ci * bi + dr, cr * bi + ci * br + di


@triton.jit
def _cdiv(nr, ni, dr, di):
    """(nr + i ni) / (dr + i di), both scaled by max(|dr|, |di|) first so |d|^2 cannot underflow."""
    r = 1.0 / tl.maximum(tl.maximum(tl.abs(dr), tl.abs(di)), 1e-30)
    nr, ni, dr, di = nr * r, ni * r, dr * r, di * r
    inv = 1.0 / (dr * dr + di * di)
    return (nr * dr + ni * di) * inv, (ni * dr - nr * di) * inv


@triton.jit
def _fwd_chunk(v_ptr, g_ptr, base, t0, T, K, o_k, m_k, zr, cim, one, zero, gr, gi, CT: tl.constexpr):
    """Writes G for times t0 .. t0+CT-1 from G_{t0-1} = (gr, gi) [BK]; returns G_{t0+CT-1}."""
    o_c = tl.arange(0, CT)
    o_t = t0.to(tl.int64) + o_c
    m = (o_t < T)[:, None] & m_k[None, :]
    p_v = base + o_t[:, None] * K + o_k[None, :]
    v = tl.load(v_ptr + p_v, mask=m, other=0.0).to(tl.float32)
    cre = 2.0 + v - zr[None, :]
    # Q_t = M_t ... M_{t0} (normalized); M = [[c, -1], [1, 0]].
    q00r, q00i, q01r, q01i, q10r, q10i, q11r, q11i = tl.associative_scan(
        (cre, cim, -one, zero, one, zero, zero, zero), 0, _mat_combine
    )
    # [theta_t, theta_{t-1}] is proportional to Q_t [1, G_{t0-1}]^T.
    nr = q10r + q11r * gr[None, :] - q11i * gi[None, :]
    ni = q10i + q11r * gi[None, :] + q11i * gr[None, :]
    dr = q00r + q01r * gr[None, :] - q01i * gi[None, :]
    di = q00i + q01r * gi[None, :] + q01i * gr[None, :]
    out_r, out_i = _cdiv(nr, ni, dr, di)
    tl.store(g_ptr + 2 * p_v[:, :, None] + tl.arange(0, 2)[None, None, :], tl.join(out_r, out_i), mask=m[:, :, None])
    # Only full chunks hand their state on, so the last row is always a real token when it is used.
    last = (o_c == CT - 1)[:, None]
    return tl.sum(tl.where(last, out_r, 0.0), axis=0), tl.sum(tl.where(last, out_i, 0.0), axis=0)


@triton.jit
def _bk_fwd_kernel(
    v_ptr, z_ptr, g_ptr, T, K, LOG_B, LOG_T, CT: tl.constexpr, BK: tl.constexpr, INTERPRET: tl.constexpr
):
    """v [B,T,K] real (any float dtype), z [K,2] fp32 (re, im) -> g [B,T,K,2] fp32 (re, im of G).

    LOG_B, LOG_T (bit lengths of B and T) are unused here: they are the autotuner's key."""
    i_b = tl.program_id(0)
    o_k = tl.program_id(1) * BK + tl.arange(0, BK)
    m_k = o_k < K
    # Idle lanes get z = i (finite, away from the real axis) so they never produce NaN.
    zr = tl.load(z_ptr + 2 * o_k, mask=m_k, other=0.0)
    zi = tl.load(z_ptr + 2 * o_k + 1, mask=m_k, other=1.0)
    base = i_b.to(tl.int64) * T * K
    one = tl.full([CT, BK], 1.0, tl.float32)
    zero = tl.zeros([CT, BK], dtype=tl.float32)
    cim = zero - zi[None, :]
    # G_{t0-1}, the only state between chunks.
    gr = tl.zeros([BK], dtype=tl.float32)
    gi = tl.zeros([BK], dtype=tl.float32)
    if INTERPRET:  # Triton 3.6's interpreter cannot take a runtime bound in range() under NumPy 2
        t0 = 0
        while t0 < T:
            gr, gi = _fwd_chunk(v_ptr, g_ptr, base, t0, T, K, o_k, m_k, zr, cim, one, zero, gr, gi, CT)
            t0 += CT
    else:
        for t0 in range(0, T, CT):
            gr, gi = _fwd_chunk(v_ptr, g_ptr, base, t0, T, K, o_k, m_k, zr, cim, one, zero, gr, gi, CT)


@triton.jit
def _bwd_chunk(g_ptr, dg_ptr, dv_ptr, base, t1, T, K, o_k, m_k, lr, li, acc_r, acc_i, CT: tl.constexpr):
    """Times t1-CT .. t1-1 read back to front, from lam_{t1} = (lr, li) [BK]: writes grad v, returns
    (lam_{t1-CT}, acc + sum over the chunk of conj(G_t^2) lam_t)."""
    o_c = tl.arange(0, CT)
    o_2 = tl.arange(0, 2)[None, None, :]
    # Row j is time t1 - 1 - j; rows before time 0 are padding (zeros: they add nothing).
    o_t = t1.to(tl.int64) - 1 - o_c
    m = (o_t >= 0)[:, None] & m_k[None, :]
    m_next = ((o_t >= 0) & (o_t + 1 < T))[:, None] & m_k[None, :]
    p = base + o_t[:, None] * K + o_k[None, :]
    gr, gi = tl.split(tl.load(g_ptr + 2 * p[:, :, None] + o_2, mask=m[:, :, None], other=0.0))
    hr, hi = tl.split(tl.load(g_ptr + 2 * (p + K)[:, :, None] + o_2, mask=m_next[:, :, None], other=0.0))
    br, bi = tl.split(tl.load(dg_ptr + 2 * p[:, :, None] + o_2, mask=m[:, :, None], other=0.0))
    # lam_t = a_t lam_{t+1} + gG_t with a_t = conj(G_{t+1}^2) (zero after the last token).
    ar = hr * hr - hi * hi
    ai = -2.0 * hr * hi
    ca, cai, cb, cbi = tl.associative_scan((ar, ai, br, bi), 0, _affine_combine)
    lam_r = ca * lr[None, :] - cai * li[None, :] + cb
    lam_i = ca * li[None, :] + cai * lr[None, :] + cbi
    # w_t = conj(G_t^2) lam_t = -grad c_t.
    sr = gr * gr - gi * gi
    si = -2.0 * gr * gi
    wr = sr * lam_r - si * lam_i
    wi = sr * lam_i + si * lam_r
    tl.store(dv_ptr + p, (-wr).to(dv_ptr.dtype.element_ty), mask=m)
    acc_r += tl.sum(tl.where(m, wr, 0.0), axis=0)
    acc_i += tl.sum(tl.where(m, wi, 0.0), axis=0)
    # Only full chunks hand lam on (the partial one holds time 0), so the last row is real when used.
    last = (o_c == CT - 1)[:, None]
    return tl.sum(tl.where(last, lam_r, 0.0), axis=0), tl.sum(tl.where(last, lam_i, 0.0), axis=0), acc_r, acc_i


@triton.jit
def _bk_bwd_kernel(
    g_ptr, dg_ptr, dv_ptr, dz_ptr, T, K, LOG_B, LOG_T, CT: tl.constexpr, BK: tl.constexpr, INTERPRET: tl.constexpr
):
    """g, dg [B,T,K,2] fp32 -> dv [B,T,K] (v's dtype), dz partials [B,K,2] fp32 (sum over this b's T)."""
    i_b = tl.program_id(0)
    o_k = tl.program_id(1) * BK + tl.arange(0, BK)
    m_k = o_k < K
    base = i_b.to(tl.int64) * T * K
    lr = tl.zeros([BK], dtype=tl.float32)  # lam_{t1}: the gradient flowing in from later chunks
    li = tl.zeros([BK], dtype=tl.float32)
    acc_r = tl.zeros([BK], dtype=tl.float32)
    acc_i = tl.zeros([BK], dtype=tl.float32)
    # Chunks end at t1 = T, T - CT, ...: aligned to the end, so only the last one walked is partial.
    if INTERPRET:
        t1 = T
        while t1 > 0:
            lr, li, acc_r, acc_i = _bwd_chunk(g_ptr, dg_ptr, dv_ptr, base, t1, T, K, o_k, m_k, lr, li, acc_r, acc_i, CT)
            t1 -= CT
    else:
        for i_c in range(0, tl.cdiv(T, CT)):
            t1 = T - i_c * CT
            lr, li, acc_r, acc_i = _bwd_chunk(g_ptr, dg_ptr, dv_ptr, base, t1, T, K, o_k, m_k, lr, li, acc_r, acc_i, CT)
    p_z = (i_b * K + o_k)[:, None] * 2 + tl.arange(0, 2)[None, :]
    tl.store(dz_ptr + p_z, tl.join(acc_r, acc_i), mask=m_k[:, None])


# Tuned once per (K, power-of-two bucket of B, of T): the best split between chunk length and
# channels per program depends on how many programs there are and how many chunks each walks, and
# buckets keep generation (a new T every call) from re-tuning every time.
_TUNE = dict(key=["K", "LOG_B", "LOG_T"], prune_configs_by={"early_config_prune": _prune_configs})
_bk_fwd_tuned = triton.autotune(configs=_triton_configs(), **_TUNE)(_bk_fwd_kernel)
_bk_bwd_tuned = triton.autotune(configs=_triton_configs(), **_TUNE)(_bk_bwd_kernel)


def _launch(kernel, tuned, shape: tuple[int, int, int], config: BKConfig | None, *tensors: Tensor) -> None:
    """Runs `kernel` over `tensors` for a [B,T,K] problem with `config`, or the autotuned wrapper
    when config is None on CUDA."""
    b, t, k_dim = shape
    interpret = interpreter_enabled()
    args = (*tensors, t, k_dim, b.bit_length(), t.bit_length())
    if config is None and not interpret:
        tuned[lambda meta: (b, triton.cdiv(k_dim, meta["BK"]))](*args, INTERPRET=False)
        return
    cfg = config or default_config(k_dim)
    grid = (b, triton.cdiv(k_dim, cfg.block_k))
    kernel[grid](*args, CT=cfg.chunk, BK=cfg.block_k, INTERPRET=interpret, num_warps=cfg.num_warps)


def _check_inputs(v: Tensor, z: Tensor) -> None:
    if v.dtype == torch.float64 or z.dtype != torch.complex64:
        raise NotImplementedError(
            f"bk_resolvent_triton: the kernel computes in fp32/complex64, got v {v.dtype} and z {z.dtype}; "
            "fp64 inputs run on the torch reference (impl='torch' or impl=None), or convert v to float32 "
            "and z to complex64"
        )
    if v.ndim != 3 or z.shape != (v.shape[2],):
        raise ValueError(f"bk_resolvent_triton: need v [B,T,K] and z [K], got {tuple(v.shape)} and {tuple(z.shape)}")


def bk_resolvent_forward(v: Tensor, z: Tensor, config: BKConfig | None = None, *, out: Tensor | None = None) -> Tensor:
    """G [B,T,K] complex64 for v [B,T,K] (fp32/bf16/fp16) and z [K] complex64 (no autograd).

    `out` (contiguous [B,T,K] complex64) is written in place when given (tests poison it).
    """
    _check_inputs(v, z)
    v = v.contiguous()
    b, t, k_dim = v.shape
    if out is None:
        out = torch.empty(v.shape, device=v.device, dtype=torch.complex64)
    elif out.shape != v.shape or out.dtype != torch.complex64 or not out.is_contiguous():
        raise ValueError(f"bk_resolvent_forward: out must be contiguous {tuple(v.shape)} complex64")
    if out.numel() == 0:
        return out
    z_ri = torch.view_as_real(z.resolve_conj()).contiguous()
    _launch(_bk_fwd_kernel, _bk_fwd_tuned, (b, t, k_dim), config, v, z_ri, torch.view_as_real(out))
    return out


def bk_resolvent_backward(
    g: Tensor, grad_g: Tensor, v_dtype: torch.dtype, config: BKConfig | None = None
) -> tuple[Tensor, Tensor]:
    """(grad v [B,T,K] in v_dtype, grad z [K] complex64) from G and grad G ([B,T,K] complex64 each)."""
    b, t, k_dim = g.shape
    dv = torch.empty(g.shape, device=g.device, dtype=v_dtype)
    if g.numel() == 0:
        return dv, torch.zeros(k_dim, device=g.device, dtype=torch.complex64)
    g_ri = torch.view_as_real(g.contiguous())
    # Autograd may hand a conjugate view or a broadcast (expanded) gradient: materialize it.
    dg_ri = torch.view_as_real(grad_g.to(torch.complex64).resolve_conj().contiguous())
    partial = torch.empty(b, k_dim, 2, device=g.device, dtype=torch.float32)
    _launch(_bk_bwd_kernel, _bk_bwd_tuned, (b, t, k_dim), config, g_ri, dg_ri, dv, partial)
    return dv, torch.view_as_complex(partial.sum(0))


class BKResolventTriton(torch.autograd.Function):
    """G = bk_resolvent_forward(v, z); the backward needs only G (saved) and grad G."""

    @staticmethod
    def forward(ctx, v: Tensor, z: Tensor, config: BKConfig | None) -> Tensor:
        g = bk_resolvent_forward(v, z, config)
        ctx.save_for_backward(g)
        ctx.v_dtype, ctx.config = v.dtype, config
        return g

    @staticmethod
    def backward(ctx, grad_g: Tensor):
        (g,) = ctx.saved_tensors
        if not any(ctx.needs_input_grad[:2]):
            return None, None, None
        dv, dz = bk_resolvent_backward(g, grad_g, ctx.v_dtype, ctx.config)
        return (dv if ctx.needs_input_grad[0] else None), (dz if ctx.needs_input_grad[1] else None), None


def bk_resolvent_triton(v: Tensor, z: Tensor, *, config: BKConfig | None = None) -> Tensor:
    """Differentiable G [B,T,K] complex64 for v [B,T,K] real (fp32/bf16/fp16), z [K] complex64, Im z > 0.

    Same contract as `muse_lm.ops.scan.bk_resolvent` (which validates and dispatches here on CUDA);
    config None autotunes over `CONFIGS` on CUDA (the default config under the interpreter) and runs
    through the custom ops of `bk_custom_ops.py`, which `torch.compile` keeps inside its graph.
    """
    _check_inputs(v, z)
    if config is None:
        from muse_lm.ops.scan.bk_custom_ops import bk_forward

        return bk_forward(v, z)
    return _bk_function(v, z, config)


@compile_boundary
def _bk_function(v: Tensor, z: Tensor, config: BKConfig) -> Tensor:
    return BKResolventTriton.apply(v, z, config)
