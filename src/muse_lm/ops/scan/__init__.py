"""Associative scans: the linear recurrence and the BK 2x2 transfer-matrix resolvent.

validate -> dispatch -> reference (`reference.py` for the recurrence, `bk.py` for BK).
"""

from __future__ import annotations

import torch
from torch import Tensor

from muse_lm.ops._dispatch import resolve_impl
from muse_lm.ops.scan.bk import bk_resolvent_reference, bk_resolvent_step_reference, complex_dtype
from muse_lm.ops.scan.reference import linear_recurrence_reference

__all__ = ["bk_resolvent", "bk_resolvent_step", "linear_recurrence"]

_REAL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_COMPLEX_DTYPES = (torch.complex64, torch.complex128)


def _check_dtype(op: str, name: str, t: object, dtypes: tuple) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{op}: {name} has dtype {t.dtype}; expected one of {names} (convert with .to())")


def _check_device(op: str, name: str, t: Tensor, ref: Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; use one device")


def linear_recurrence(
    a: Tensor,
    b: Tensor,
    *,
    reverse: bool = False,
    initial: Tensor | None = None,
    impl: str | None = None,
) -> Tensor:
    """h_t = a_t * h_{t-1} + b_t along dim 1, elementwise over the other dims.

    Args:
        a, b: [B,T,...] same shape and dtype (fp32/fp64; bf16/fp16 are computed in fp32).
            a may be negative or zero.
        reverse: scan from the end: h_t = a_t * h_{t+1} + b_t. Exactly
            `linear_recurrence(a.flip(1), b.flip(1), initial=initial).flip(1)`.
        initial: [B,...] h_0 (h_{T+1} when reverse), None for zeros.
        impl: None | "torch" | "triton". None uses the Triton kernel (`linrec_triton.py`) for CUDA
            tensors in fp32 math (a, b fp32/bf16/fp16); fp64 always runs on the reference, and
            impl="triton" with it raises NotImplementedError.
    Returns:
        h [B,T,...] in a's dtype. Differentiable in a, b and initial.
    Example:
        >>> linear_recurrence(torch.full((1, 3), 0.5), torch.ones(1, 3))
        tensor([[1.0000, 1.5000, 1.7500]])
    """
    op = "linear_recurrence"
    _check_dtype(op, "a", a, _REAL_DTYPES)
    _check_dtype(op, "b", b, _REAL_DTYPES)
    if a.ndim < 2 or a.shape[1] < 1:
        raise ValueError(
            f"{op}: a must be [B,T,...] with T >= 1 (scan along dim 1), got shape {tuple(a.shape)}"
        )
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(
            f"{op}: a and b must have the same shape and dtype, got a {tuple(a.shape)} {a.dtype} and "
            f"b {tuple(b.shape)} {b.dtype}; broadcast or convert them first"
        )
    _check_device(op, "b", b, a, "a")
    if initial is not None:
        _check_dtype(op, "initial", initial, _REAL_DTYPES)
        expected = a.shape[:1] + a.shape[2:]
        if initial.shape != expected:
            raise ValueError(
                f"{op}: initial has shape {tuple(initial.shape)} but expected [B,...] = {tuple(expected)} "
                f"(a's shape {tuple(a.shape)} without the time dim 1)"
            )
        _check_device(op, "initial", initial, a, "a")
    # The kernel computes in fp32; fp64 stays on the reference (impl=None routes it there on CUDA too).
    fp32_math = a.dtype != torch.float64
    if impl == "triton" and not fp32_math:
        raise NotImplementedError(
            f"{op}: the Triton kernel computes in fp32 but got a and b {a.dtype}; pass impl='torch' (or "
            "impl=None, which routes fp64 to the reference) or convert a and b with .float()"
        )
    if resolve_impl(op, impl, a, b, has_triton_kernel=fp32_math) == "torch":
        return linear_recurrence_reference(a, b, reverse=reverse, initial=initial)
    # Imported here: Triton is optional, and its interpreter reads TRITON_INTERPRET at kernel definition.
    from muse_lm.ops.scan.linrec_triton import linear_recurrence_triton

    return linear_recurrence_triton(a, b, reverse=reverse, initial=initial)


def _check_z(op: str, z: object, k_dim: int, ref: Tensor) -> None:
    _check_dtype(op, "z", z, _COMPLEX_DTYPES)
    if z.shape != (k_dim,):
        raise ValueError(
            f"{op}: z must be [K] = ({k_dim},) (one spectral point per BK head), got {tuple(z.shape)}"
        )
    _check_device(op, "z", z, ref, "v")
    # Im z > 0 is what keeps (H - z) invertible and |G| <= 1/Im z. Reading the flag on the host
    # would sync a CUDA stream on every forward, so on CUDA it is a device-side assert (the BK
    # layer builds eta = eta_min + softplus(.), so it never fires there); on CPU a clear error.
    positive = (z.imag > 0).all()
    if z.is_cuda:
        torch._assert_async(positive, f"{op}: every z must have Im z > 0")
    elif not bool(positive):
        raise ValueError(
            f"{op}: every z must have Im z > 0 (got Im z = {z.imag.tolist()}); build z as "
            "E + i*eta with eta = eta_min + softplus(.) so the resolvent stays bounded"
        )


def bk_resolvent(v: Tensor, z: Tensor, *, impl: str | None = None) -> Tensor:
    """Causal BK resolvent diagonal G_t = [(H_{1..t} - z)^{-1}]_{tt} (see `bk.py` for the math).

    Args:
        v: [B,T,K] real potentials (fp32/fp64; bf16/fp16 are computed in fp32), one column per head.
        z: [K] complex64/complex128 with Im z > 0.
        impl: None | "torch" | "triton". None uses the Triton kernel (`bk_triton.py`) for CUDA
            tensors in fp32 math (v fp32/bf16/fp16, z complex64); fp64 v or complex128 z always run
            on the reference, and impl="triton" with them raises NotImplementedError.
    Returns:
        G [B,T,K]: complex64 for fp32 v, complex128 for fp64 v (or complex128 z). |G_t| <= 1/Im z.
        The per-token log-det log|det(H_{1..t}-z)/det(H_{1..t-1}-z)| is -log|G_t| (`-G.abs().log()`).
    Example:
        >>> g = bk_resolvent(torch.zeros(1, 4, 1), torch.tensor([0.5j]))
        >>> g.shape, g.dtype
        (torch.Size([1, 4, 1]), torch.complex64)
    """
    op = "bk_resolvent"
    _check_dtype(op, "v", v, _REAL_DTYPES)
    if v.ndim != 3 or v.shape[1] < 1:
        raise ValueError(f"{op}: v must be [B,T,K] with T >= 1, got shape {tuple(v.shape)}")
    _check_z(op, z, v.shape[2], v)
    # The kernel computes in fp32/complex64; fp64 (or complex128 z) stays on the reference.
    fp32_math = v.dtype != torch.float64 and z.dtype == torch.complex64
    if impl == "triton" and not fp32_math:
        raise NotImplementedError(
            f"{op}: the Triton kernel computes in fp32/complex64 but got v {v.dtype} and z {z.dtype}; "
            "pass impl='torch' (or impl=None, which routes fp64 to the reference) or convert v to float32 "
            "and z to complex64"
        )
    if resolve_impl(op, impl, v, z, has_triton_kernel=fp32_math) == "torch":
        return bk_resolvent_reference(v, z)
    # Imported here: Triton is optional, and its interpreter reads TRITON_INTERPRET at kernel definition.
    from muse_lm.ops.scan.bk_triton import bk_resolvent_triton

    return bk_resolvent_triton(v, z)


def bk_resolvent_step(v_t: Tensor, z: Tensor, g_prev: Tensor | None, *, impl: str | None = None) -> Tensor:
    """One decode token of `bk_resolvent`: G_t = 1 / ((2 + v_t - z) - G_{t-1}), O(1) per token.

    Args:
        v_t: [B,K] real potentials of this token.
        z: [K] complex with Im z > 0.
        g_prev: [B,K] G_{t-1} in the output dtype of `bk_resolvent`, or None at the first token (G_0 = 0).
    Returns:
        G_t [B,K] complex.
    """
    op = "bk_resolvent_step"
    _check_dtype(op, "v_t", v_t, _REAL_DTYPES)
    if v_t.ndim != 2:
        raise ValueError(f"{op}: v_t must be [B,K], got shape {tuple(v_t.shape)}")
    _check_z(op, z, v_t.shape[1], v_t)
    if g_prev is not None:
        expected = complex_dtype(v_t, z)
        _check_dtype(op, "g_prev", g_prev, (expected,))
        if g_prev.shape != v_t.shape:
            raise ValueError(f"{op}: g_prev must be [B,K] = {tuple(v_t.shape)}, got {tuple(g_prev.shape)}")
        _check_device(op, "g_prev", g_prev, v_t, "v_t")
    resolve_impl(op, impl, v_t, z, has_triton_kernel=False)
    return bk_resolvent_step_reference(v_t, z, g_prev)
