"""Semiseparable (AR-SSM / Mamba-2 SSD) sequence mixer: validate -> dispatch -> reference.

Per head: h_t = exp(log_a_t) * h_{t-1} + u_t x_t^T (h_t is R x P), y_t = v_t^T h_t.
The math and the three equivalent forms live in `reference.py`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from muse_lm.ops._dispatch import resolve_impl
from muse_lm.ops.semiseparable.reference import semiseparable_chunked, semiseparable_step_reference

__all__ = ["semiseparable_scan", "semiseparable_step"]

_DATA_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_STATE_DTYPES = (torch.float32, torch.float64)


def _check_tensor(op: str, name: str, t: object, ndim: int, layout: str, dtypes: tuple) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.ndim != ndim:
        raise ValueError(f"{op}: {name} must be {layout} ({ndim} dims), got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{op}: {name} has dtype {t.dtype}; expected one of {names} (convert with .to())")


def _check_same(op: str, name: str, t: Tensor, expected: tuple, layout: str, ref: Tensor) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(
            f"{op}: {name} has shape {tuple(t.shape)} but expected {layout} = {tuple(expected)} "
            f"to match x {tuple(ref.shape)}"
        )
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {ref.device}; move them to one device")


def _check_cu_seqlens(op: str, cu_seqlens: object, batch: int, length: int) -> int:
    """Returns the number of segments N."""
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{op}: cu_seqlens must be a 1-D integer tensor [N+1] (N >= 1 segments)")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{op}: cu_seqlens has dtype {cu_seqlens.dtype}; expected int32 or int64")
    if batch != 1:
        raise ValueError(
            f"{op}: with cu_seqlens the batch size must be 1 (sequences are packed along T), got B={batch}; "
            "concatenate the sequences into x[0] and describe them with cu_seqlens"
        )
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != length:
        raise ValueError(
            f"{op}: cu_seqlens must start at 0 and end at T={length}, got {bounds[0]}..{bounds[-1]}"
        )
    if any(b < a for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"{op}: cu_seqlens must be nondecreasing, got {bounds}")
    return len(bounds) - 1


def _validate_scan(x, u, v, log_a, initial_state, cu_seqlens, chunk_size) -> None:
    op = "semiseparable_scan"
    _check_tensor(op, "x", x, 4, "[B,T,H,P]", _DATA_DTYPES)
    _check_tensor(op, "u", u, 4, "[B,T,H,R]", _DATA_DTYPES)
    _check_tensor(op, "v", v, 4, "[B,T,H,R]", _DATA_DTYPES)
    _check_tensor(op, "log_a", log_a, 3, "[B,T,H]", _STATE_DTYPES)
    batch, length, heads, p_dim = x.shape
    r_dim = u.shape[-1]
    if length < 1:
        raise ValueError(f"{op}: x has T=0 tokens; pass at least one token")
    _check_same(op, "u", u, (batch, length, heads, r_dim), "[B,T,H,R]", x)
    _check_same(op, "v", v, u.shape, "[B,T,H,R] (same as u)", x)
    _check_same(op, "log_a", log_a, (batch, length, heads), "[B,T,H]", x)
    if not (x.dtype == u.dtype == v.dtype):
        raise ValueError(f"{op}: x, u, v must share one dtype, got {x.dtype}, {u.dtype}, {v.dtype}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be a positive int, got {chunk_size!r}")
    n_states = batch if cu_seqlens is None else _check_cu_seqlens(op, cu_seqlens, batch, length)
    if initial_state is not None:
        _check_tensor(
            op, "initial_state", initial_state, 4, "[B,H,R,P] ([N,H,R,P] with cu_seqlens)", _STATE_DTYPES
        )
        _check_same(op, "initial_state", initial_state, (n_states, heads, r_dim, p_dim), "[B|N,H,R,P]", x)


def semiseparable_scan(
    x: Tensor,
    u: Tensor,
    v: Tensor,
    log_a: Tensor,
    *,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    chunk_size: int = 64,
    impl: str | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Causal semiseparable scan: h_t = exp(log_a_t) h_{t-1} + u_t x_t^T, y_t = v_t^T h_t, per head.

    Args:
        x: [B,T,H,P] values (fp32, bf16, fp16 or fp64; math in fp32, fp64 for fp64).
        u, v: [B,T,H,R] write and read vectors, same dtype as x.
        log_a: [B,T,H] log-decay, <= 0 (fp32 or fp64). Not checked for sign (that would need a
            host sync); positive values are outside the contract and can overflow.
        initial_state: [B,H,R,P] fp32/fp64, or [N,H,R,P] with cu_seqlens; None means zeros.
        output_final_state: also return the state after the last token (of each segment).
        cu_seqlens: int32/int64 [N+1], 0 = c_0 <= ... <= c_N = T, with B = 1: packed sequences,
            the state restarts at every boundary.
        chunk_size: tokens per chunk of the chunked algorithm (the result does not depend on it).
        impl: None | "torch" | "triton". None runs `triton.py` for CUDA tensors (chunked SSD forward
            and backward, cu_seqlens included) unless an input is fp64, and the torch reference on the
            CPU and for fp64. "triton" runs the kernel (CUDA, or CPU under TRITON_INTERPRET=1) for
            fp32/bf16/fp16 x, u, v with fp32 log_a and initial_state; fp64 inputs with "triton" raise
            NotImplementedError.
    Returns:
        (y [B,T,H,P] in x's dtype, final state [B|N,H,R,P] in fp32/fp64 or None).
    Example:
        >>> x, u, v = torch.randn(1, 8, 2, 4), torch.randn(1, 8, 2, 3), torch.randn(1, 8, 2, 3)
        >>> y, h = semiseparable_scan(x, u, v, -torch.rand(1, 8, 2), output_final_state=True)
        >>> y.shape, h.shape
        (torch.Size([1, 8, 2, 4]), torch.Size([1, 2, 3, 4]))
    """
    _validate_scan(x, u, v, log_a, initial_state, cu_seqlens, chunk_size)
    if _pick("semiseparable_scan", impl, (x, u, v, log_a), x, log_a, initial_state) == "triton":
        return _scan_triton(x, u, v, log_a, initial_state, output_final_state, cu_seqlens, chunk_size)
    return semiseparable_chunked(
        x,
        u,
        v,
        log_a,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        chunk_size=chunk_size,
    )


def _pick(op: str, impl: str | None, tensors: tuple, x: Tensor, log_a: Tensor, state: Tensor | None) -> str:
    """"torch" or "triton". The kernels compute in fp32: impl=None takes them for CUDA tensors unless
    an input is fp64 (the reference's, as documented); an explicit "triton" for fp64 raises the fix."""
    fp32_math = x.dtype != torch.float64 and log_a.dtype == torch.float32 and (
        state is None or state.dtype == torch.float32
    )
    if impl == "triton" and not fp32_math:
        raise NotImplementedError(
            f"{op}: the Triton kernel computes in fp32 but got data {x.dtype}, log-decay {log_a.dtype}"
            + ("" if state is None else f", state {state.dtype}")
            + "; pass impl='torch' (or impl=None) for fp64, or convert the data to float32/bfloat16 and "
            "the log-decay and state to float32"
        )
    return resolve_impl(op, impl, *tensors, has_triton_kernel=fp32_math)


def _scan_triton(x, u, v, log_a, initial_state, output_final_state, cu_seqlens, chunk_size):
    # Imported here: Triton is optional, and its interpreter reads TRITON_INTERPRET at kernel definition.
    from muse_lm.ops.semiseparable.triton import semiseparable_triton

    return semiseparable_triton(
        x, u, v, log_a, initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens, chunk_size=chunk_size,
    )


def semiseparable_step(
    x_t: Tensor,
    u_t: Tensor,
    v_t: Tensor,
    log_a_t: Tensor,
    state: Tensor | None,
    *,
    impl: str | None = None,
) -> tuple[Tensor, Tensor]:
    """One decode token of `semiseparable_scan`: returns (y_t [B,H,P] in x_t's dtype, new state).

    Args:
        x_t: [B,H,P]; u_t, v_t: [B,H,R]; log_a_t: [B,H] fp32/fp64;
        state: [B,H,R,P] fp32/fp64, or None for zeros (the first token). Never modified: the new
            state is a new tensor.
        impl: as in `semiseparable_scan`: None runs `step_triton.py` for CUDA tensors (unless an
            input is fp64) and the reference otherwise; "triton" forces the kernel.
    """
    op = "semiseparable_step"
    _check_tensor(op, "x_t", x_t, 3, "[B,H,P]", _DATA_DTYPES)
    _check_tensor(op, "u_t", u_t, 3, "[B,H,R]", _DATA_DTYPES)
    _check_tensor(op, "v_t", v_t, 3, "[B,H,R]", _DATA_DTYPES)
    _check_tensor(op, "log_a_t", log_a_t, 2, "[B,H]", _STATE_DTYPES)
    batch, heads, p_dim = x_t.shape
    r_dim = u_t.shape[-1]
    _check_same(op, "u_t", u_t, (batch, heads, r_dim), "[B,H,R]", x_t)
    _check_same(op, "v_t", v_t, u_t.shape, "[B,H,R] (same as u_t)", x_t)
    _check_same(op, "log_a_t", log_a_t, (batch, heads), "[B,H]", x_t)
    if not (x_t.dtype == u_t.dtype == v_t.dtype):
        raise ValueError(
            f"{op}: x_t, u_t, v_t must share one dtype, got {x_t.dtype}, {u_t.dtype}, {v_t.dtype}"
        )
    if state is not None:
        _check_tensor(op, "state", state, 4, "[B,H,R,P]", _STATE_DTYPES)
        _check_same(op, "state", state, (batch, heads, r_dim, p_dim), "[B,H,R,P]", x_t)
    if _pick(op, impl, (x_t, u_t, v_t, log_a_t), x_t, log_a_t, state) == "triton":
        from muse_lm.ops.semiseparable.step_triton import semiseparable_step_triton

        return semiseparable_step_triton(x_t, u_t, v_t, log_a_t, state)
    return semiseparable_step_reference(x_t, u_t, v_t, log_a_t, state)
