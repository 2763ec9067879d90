"""First-order linear recurrence in Triton: one chunked scan kernel with a carry, used forward and backward.

    forward scan:  h_t = a_t h_{t-1} + b_t,  h_0 = initial      (reverse: h_t = a_t h_{t+1} + b_t, h_{T+1})

Inputs are viewed as [B,T,D] (D = the product of the trailing dims). One program per (b, block of BD
channels), on a 1-D grid, walks T in chunks of BT rows in "walk order": s = 0, 1, ... is time s
forward and time T-1-s in reverse, so a reverse scan is the forward one reading rows back to front
(no flips, no `reverse=True` scan). Inside a chunk `tl.associative_scan` over the pairs (a, b), combined as
    (a1, b1) then (a2, b2)  ->  (a1 a2, a2 b1 + b2),
gives each row's (A_s, H_s) = (product of a, recurrence from zero) since the chunk's first row, and
h_s = A_s carry + H_s with carry = h of the previous chunk's last row. Rows past the end are padded
with the identity pair (1, 0), so a chunk's last row always holds the newest real h. All math is
fp32; a and b may be fp32/bf16/fp16 and h is written in their dtype.

Backward (GRAD=True), the same kernel walking the other way. With g_t = dL/dh_t in total,
    g_t = a_{t+1} g_{t+1} + dh_t,    dL/db_t = g_t,   dL/da_t = g_t h_{t-1},   dL/dinitial = a_1 g_1
(forward scan; for a reverse one swap t+1 and t-1, and a_1 becomes a_T). In walk order of the
backward that is the same recurrence with a read one row *behind* (s-1) and h one row *ahead* (s+1),
`initial` standing in for the h past the last row. The kernel writes db = g and da = g h_prev in one
pass and the fp32 g of its last walk row (g_1, or g_T for a reverse scan), from which torch forms
dL/dinitial. Nothing is accumulated across programs: deterministic, no atomics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from muse_lm.ops._config import check_tiles, check_warps
from muse_lm.ops._dispatch import compile_boundary, interpreter_enabled

__all__ = [
    "CONFIGS",
    "LinRecConfig",
    "LinearRecurrenceTriton",
    "default_config",
    "linear_recurrence_backward",
    "linear_recurrence_forward",
    "linear_recurrence_triton",
    "prune_configs_for",
    "smem_estimate",
]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class LinRecConfig:
    """Launch shape: BT rows (time steps) per chunk, BD channels per program, warps per program."""

    block_t: int
    block_d: int
    num_warps: int

    def __post_init__(self):
        check_tiles(self, "block_t", "block_d", why="tl.arange tiles")
        if self.block_t < 2:
            raise ValueError(f"LinRecConfig: block_t={self.block_t} must be at least 2 (a chunk is a scan)")
        check_warps(self)


# Declared once: the autotuner's search space on CUDA (pruned per device by shared memory), each one
# checked against the reference by tests/gpu/test_linear_recurrence_gpu.py. Tiles of 2048-4096
# elements (8-16 per thread) keep a, b and the scan's pairs in registers: 64-128 registers, no spills,
# 0.5-32 KB of shared memory on sm_90 (Triton 3.6, fp32 and bf16, checked with ptxas). The split between
# rows and channels trades parallelism for chunk count: wide blocks (rows of 256-512 B) for many
# channels, narrow ones (rows of 8-32 B, at most one 32 B sector) so few channels (B = 1, D = 64) still
# give tens of programs. There are B * ceil(D / BD) programs, each walking ceil(T / BT) chunks in turn.
CONFIGS = (
    LinRecConfig(16, 128, 4),
    LinRecConfig(32, 128, 8),
    LinRecConfig(32, 64, 4),
    LinRecConfig(64, 32, 4),
    LinRecConfig(128, 16, 4),
    LinRecConfig(256, 8, 4),
    LinRecConfig(512, 4, 8),
    LinRecConfig(1024, 2, 8),
)


def default_config(width: int) -> LinRecConfig:
    """The config used without autotuning (the interpreter): the widest block not above the width's
    next power of two, so few channels do not run mostly idle lanes."""
    fit = [c for c in CONFIGS if c.block_d <= max(4, triton.next_power_of_2(width))]
    return max(fit, key=lambda c: c.block_d)


def smem_estimate(block_t: int, block_d: int) -> int:
    """Upper estimate in bytes of the shared memory of one program, scan or backward: the scan's
    cross-warp exchange and the last-row reduction stage fp32 tiles through shared memory, counted as
    three [BT, BD] fp32 tiles. Compiled by Triton 3.6 for sm_80, sm_89 and sm_90, CONFIGS take at most
    8 bytes an element (16-32 KB for the 128-channel tiles, 0.5-8 KB for the narrower ones)."""
    return 12 * block_t * block_d


def _device_smem(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = triton.runtime.driver.active.utils.get_device_properties(index)
    return int(props["max_shared_mem"])


def prune_configs_for(configs, width: int, smem_limit: int) -> list:
    """The triton.Configs whose channel block is at most the next power of two of the width (at least
    4; a wider block only adds idle lanes) and whose estimated shared memory fits `smem_limit` bytes
    (99 KB on consumer cards, 227 KB on an H100); the smallest tile always survives."""
    fit = [
        c
        for c in configs
        if c.kwargs["BD"] <= max(4, triton.next_power_of_2(width))
        and smem_estimate(c.kwargs["BT"], c.kwargs["BD"]) <= smem_limit
    ]
    return fit or [min(configs, key=lambda c: (c.kwargs["BT"] * c.kwargs["BD"], c.kwargs["BD"]))]


def _prune_configs(configs, named_args, **kwargs):
    return prune_configs_for(configs, named_args["D"], _device_smem(named_args["a_ptr"].device))


def _triton_configs() -> list[triton.Config]:
    return [triton.Config({"BT": c.block_t, "BD": c.block_d}, num_warps=c.num_warps) for c in CONFIGS]


@triton.jit
def _pair_combine(a1, b1, a2, b2):
    """(earlier x -> a1 x + b1, later x -> a2 x + b2) -> x -> a2 (a1 x + b1) + b2."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _rows(s, T, REVERSE: tl.constexpr):
    """Time index (int64) of walk positions s: s forward, T-1-s in reverse."""
    s = s.to(tl.int64)
    if REVERSE:
        return T - 1 - s
    else:
        return s


@triton.jit
def _chunk(
    a_ptr, x_ptr, out_ptr, h_ptr, da_ptr, base, s0, T, D, o_d, m_d, carry, h_edge,
    BT: tl.constexpr, REVERSE: tl.constexpr, GRAD: tl.constexpr, NEED_DA: tl.constexpr,
):
    """One chunk: walk positions s0 .. s0+BT-1 from `carry` [BD] fp32; returns the carry of its last row.

    Scan (GRAD False): out = h from (a, x = b). Backward (GRAD True): out = g from (a one walk row
    behind, x = dh); with NEED_DA also da = g * h_prev, h_prev = h one walk row ahead (h_edge past T)."""
    s = s0 + tl.arange(0, BT)
    m_s = s < T
    m = m_s[:, None] & m_d[None, :]
    p = base + _rows(s, T, REVERSE)[:, None] * D + o_d[None, :]
    if GRAD:
        # a_{t+1} (forward scan) is one walk row behind; on the first row it only multiplies the zero carry.
        m_a = (m_s & (s >= 1))[:, None] & m_d[None, :]
        a = tl.load(a_ptr + base + _rows(s - 1, T, REVERSE)[:, None] * D + o_d[None, :], mask=m_a, other=1.0)
    else:
        a = tl.load(a_ptr + p, mask=m, other=1.0)
    # Padding rows are the identity pair (1, 0): the chunk's last row then carries the newest real h.
    x = tl.load(x_ptr + p, mask=m, other=0.0).to(tl.float32)
    cum_a, cum_x = tl.associative_scan((a.to(tl.float32), x), 0, _pair_combine)
    h = cum_a * carry[None, :] + cum_x
    tl.store(out_ptr + p, h.to(out_ptr.dtype.element_ty), mask=m)
    if NEED_DA:
        m_h = (s + 1 < T)[:, None] & m_d[None, :]
        h_prev = tl.load(h_ptr + base + _rows(s + 1, T, REVERSE)[:, None] * D + o_d[None, :], mask=m_h, other=0.0)
        h_prev = tl.where((s + 1 == T)[:, None], h_edge[None, :], h_prev.to(tl.float32))
        tl.store(da_ptr + p, (h * h_prev).to(da_ptr.dtype.element_ty), mask=m)
    last = (tl.arange(0, BT) == BT - 1)[:, None]
    return tl.sum(tl.where(last, h, 0.0), axis=0)


# T and the autotune buckets are not specialized (T == 1, T % 16): nothing in the kernel gains from it,
# and it would multiply the compiled variants. D is: D % 16 == 0 lets the loads and stores vectorize.
@triton.jit(do_not_specialize=["T", "LOG_B", "LOG_T"])
def _linrec_kernel(
    a_ptr, x_ptr, init_ptr, out_ptr, h_ptr, da_ptr, last_ptr, T, D, LOG_B, LOG_T,
    BT: tl.constexpr, BD: tl.constexpr, REVERSE: tl.constexpr, HAS_INIT: tl.constexpr,
    GRAD: tl.constexpr, NEED_DA: tl.constexpr, INTERPRET: tl.constexpr,
):
    """a, x, out, h, da [B,T,D] (a, x any float dtype; h, da only read/written with GRAD / NEED_DA);
    init, last [B,D] fp32. Scan: out = h from carry init (zero without HAS_INIT). GRAD: out = g from a
    zero carry, init = the h past the walk's end (h_0 / h_{T+1}); last = g of the final walk row.

    LOG_B, LOG_T (bit lengths of B and T) are unused here: with D they are the autotuner's key."""
    # A 1-D grid (CUDA caps grid dims 1 and 2 at 65535); neighbouring programs share rows of one b.
    n_d = tl.cdiv(D, BD)
    i_b = tl.program_id(0) // n_d
    o_d = (tl.program_id(0) % n_d) * BD + tl.arange(0, BD)
    m_d = o_d < D
    base = i_b.to(tl.int64) * T * D
    edge = tl.zeros([BD], dtype=tl.float32)
    if HAS_INIT:
        edge = tl.load(init_ptr + i_b.to(tl.int64) * D + o_d, mask=m_d, other=0.0)
    # The scan starts from the initial state; the backward from a zero gradient past the end.
    if GRAD:
        carry = tl.zeros([BD], dtype=tl.float32)
    else:
        carry = edge
    if INTERPRET:  # Triton 3.6's interpreter cannot take a runtime bound in range() under NumPy 2
        s0 = 0
        while s0 < T:
            carry = _chunk(a_ptr, x_ptr, out_ptr, h_ptr, da_ptr, base, s0, T, D, o_d, m_d, carry, edge,
                           BT, REVERSE, GRAD, NEED_DA)
            s0 += BT
    else:
        for s0 in range(0, T, BT):
            carry = _chunk(a_ptr, x_ptr, out_ptr, h_ptr, da_ptr, base, s0, T, D, o_d, m_d, carry, edge,
                           BT, REVERSE, GRAD, NEED_DA)
    if GRAD:
        tl.store(last_ptr + i_b.to(tl.int64) * D + o_d, carry, mask=m_d)


# Tuned once per (width, power-of-two bucket of T, of B, direction, pass): how many programs there are
# (B * D / BD) and how many chunks each walks (T / BT) decide the best split, and the buckets keep
# generation-style calls (a new T every time) from re-tuning on every call.
_TUNE = dict(
    key=["D", "LOG_B", "LOG_T", "REVERSE", "GRAD", "NEED_DA"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
_linrec_tuned = triton.autotune(configs=_triton_configs(), **_TUNE)(_linrec_kernel)


def _launch(shape: tuple[int, int, int], config: LinRecConfig | None, tensors: tuple, **flags) -> None:
    """Runs the kernel on a [B,T,D] problem with `config`, or autotuned when config is None on CUDA."""
    b, t, d = shape
    interpret = interpreter_enabled()
    args = (*tensors, t, d, b.bit_length(), t.bit_length())
    if config is None and not interpret:
        _linrec_tuned[lambda meta: (b * triton.cdiv(d, meta["BD"]),)](*args, INTERPRET=False, **flags)
        return
    cfg = config or default_config(d)
    grid = (b * triton.cdiv(d, cfg.block_d),)
    _linrec_kernel[grid](*args, BT=cfg.block_t, BD=cfg.block_d, INTERPRET=interpret, num_warps=cfg.num_warps,
                         **flags)


def _as_3d(t: Tensor) -> Tensor:
    """[B,T,...] -> contiguous [B,T,D] (D = 1 for [B,T]; explicit, as -1 is ambiguous when B = 0)."""
    return t.reshape(t.shape[0], t.shape[1], math.prod(t.shape[2:])).contiguous()


def _initial_2d(initial: Tensor | None, b: int, d: int) -> Tensor | None:
    return None if initial is None else initial.reshape(b, d).to(torch.float32).contiguous()


def _check_inputs(a: Tensor, b: Tensor, initial: Tensor | None) -> None:
    op = "linear_recurrence_triton"
    if a.dtype not in _KERNEL_DTYPES or b.dtype != a.dtype:
        raise NotImplementedError(
            f"{op}: the kernel takes a and b both float32, bfloat16 or float16 (fp32 math), got {a.dtype} and "
            f"{b.dtype}; fp64 runs on the torch reference (impl='torch' or impl=None), or convert with .float()"
        )
    if a.ndim < 2 or a.shape != b.shape or a.shape[1] < 1:
        raise ValueError(
            f"{op}: need a and b of one shape [B,T,...] with T >= 1, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if initial is not None and initial.shape != a.shape[:1] + a.shape[2:]:
        expected = tuple(a.shape[:1] + a.shape[2:])
        raise ValueError(f"{op}: initial must be [B,...] = {expected}, got {tuple(initial.shape)}")


def _check_out(name: str, out: Tensor | None, shape: torch.Size, dtype: torch.dtype, device) -> Tensor:
    if out is None:
        return torch.empty(shape, device=device, dtype=dtype)
    if out.shape != shape or out.dtype != dtype or not out.is_contiguous() or out.device != device:
        raise ValueError(
            f"linear_recurrence_triton: {name} must be a contiguous {tuple(shape)} {dtype} tensor on {device}, got "
            f"{tuple(out.shape)} {out.dtype} on {out.device}"
        )
    return out


def linear_recurrence_forward(
    a: Tensor,
    b: Tensor,
    initial: Tensor | None = None,
    reverse: bool = False,
    config: LinRecConfig | None = None,
    *,
    out: Tensor | None = None,
) -> Tensor:
    """h [B,T,...] in a's dtype from a, b [B,T,...] (fp32/bf16/fp16) and initial [B,...] or None (no autograd).

    `out` (contiguous, a's shape and dtype) is written in place when given (tests poison it).
    """
    _check_inputs(a, b, initial)
    a3, b3 = _as_3d(a), _as_3d(b)
    bs, t, d = a3.shape
    out = _check_out("out", out, a.shape, a.dtype, a.device)
    if out.numel() == 0:
        return out
    init = _initial_2d(initial, bs, d)
    out3 = out.view(bs, t, d)
    # Unused pointer slots get a3 (never read: the flags turn their loads and stores off).
    tensors = (a3, b3, a3 if init is None else init, out3, a3, a3, a3)
    _launch((bs, t, d), config, tensors, REVERSE=reverse, HAS_INIT=init is not None, GRAD=False, NEED_DA=False)
    return out


def linear_recurrence_backward(
    a: Tensor,
    h: Tensor,
    initial: Tensor | None,
    grad_h: Tensor,
    reverse: bool = False,
    config: LinRecConfig | None = None,
    *,
    need_da: bool = True,
    out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """Gradients of h = linear_recurrence_forward(a, b, initial, reverse) from a, the saved h and dL/dh.

    Returns (da or None without need_da, db) in a's dtype and the fp32 dL/dinitial [B,...] (always
    computed: it is a product of two [B,...] slices). `out` = (da, db) preallocated, written in place.
    """
    _check_inputs(a, h, initial)
    a3, h3 = _as_3d(a), _as_3d(h)
    bs, t, d = a3.shape
    da, db = out if out is not None else (None, None)
    da = _check_out("da", da, a.shape, a.dtype, a.device) if need_da else None
    db = _check_out("db", db, a.shape, a.dtype, a.device)
    g_last = torch.empty(bs, d, device=a.device, dtype=torch.float32)
    if db.numel() == 0:
        return da, db, g_last.zero_().view(a.shape[:1] + a.shape[2:])
    init = _initial_2d(initial, bs, d)
    # Autograd may hand an expanded or non-contiguous gradient: materialize it.
    dh3 = _as_3d(grad_h.to(a.dtype) if grad_h.dtype not in _KERNEL_DTYPES else grad_h)
    db3 = db.view(bs, t, d)
    da3 = da.view(bs, t, d) if need_da else db3
    tensors = (a3, dh3, a3 if init is None else init, db3, h3, da3, g_last)
    # The backward of a forward scan walks in reverse and vice versa.
    _launch((bs, t, d), config, tensors, REVERSE=not reverse, HAS_INIT=init is not None, GRAD=True, NEED_DA=need_da)
    # dL/dinitial = a at the first time of the scan (t = 1, or T in reverse) times g there.
    a_first = a3[:, t - 1 if reverse else 0].to(torch.float32)
    return da, db, (a_first * g_last).view(a.shape[:1] + a.shape[2:])


class LinearRecurrenceTriton(torch.autograd.Function):
    """h = linear_recurrence_forward(a, b, initial, reverse); the backward needs a, h and initial."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, initial: Tensor | None, reverse: bool, config: LinRecConfig | None):
        h = linear_recurrence_forward(a, b, initial, reverse, config)
        ctx.save_for_backward(a, h, initial)
        ctx.reverse, ctx.config = reverse, config
        return h

    @staticmethod
    def backward(ctx, grad_h: Tensor):
        a, h, initial = ctx.saved_tensors
        need_a, need_b, need_init = ctx.needs_input_grad[:3]
        if not (need_a or need_b or need_init):
            return None, None, None, None, None
        da, db, dinit = linear_recurrence_backward(a, h, initial, grad_h, ctx.reverse, ctx.config, need_da=need_a)
        dinit = dinit.to(initial.dtype) if need_init else None
        return da, (db if need_b else None), dinit, None, None


@compile_boundary
def linear_recurrence_triton(
    a: Tensor, b: Tensor, *, reverse: bool = False, initial: Tensor | None = None, config: LinRecConfig | None = None
) -> Tensor:
    """Differentiable h [B,T,...] in a's dtype, h_t = a_t h_{t-1} + b_t (h_t = a_t h_{t+1} + b_t in reverse).

    Same contract as `muse_lm.ops.scan.linear_recurrence` (which validates and dispatches here on CUDA)
    for a, b fp32/bf16/fp16 (computed in fp32) and initial [B,...] of any float dtype or None;
    config None autotunes over `CONFIGS` on CUDA (the default config under the interpreter).
    """
    _check_inputs(a, b, initial)
    return LinearRecurrenceTriton.apply(a, b, initial, reverse, config)
