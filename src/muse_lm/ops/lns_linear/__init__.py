"""`lns_linear`: a linear layer whose weight is stored as 8-bit LNS codes (see `reference.py` for
the format). validate -> dispatch -> Triton (`triton.py`, CUDA) or the torch reference."""

from __future__ import annotations

import torch
from torch import Tensor

from muse_lm.ops._dispatch import resolve_impl
from muse_lm.ops.lns_linear.reference import (
    MAX_REL_ERROR,
    lns_decode,
    lns_decode_unit,
    lns_encode,
    lns_linear_reference,
)

__all__ = ["MAX_REL_ERROR", "lns_decode", "lns_decode_unit", "lns_encode", "lns_linear"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _fail(msg: str) -> None:
    raise ValueError(f"lns_linear: {msg}")


def _validate(x: Tensor, codes: Tensor, scale: Tensor, bias: Tensor | None, latent: Tensor | None) -> None:
    if not isinstance(x, Tensor) or x.dtype not in _FLOATS or x.ndim < 1:
        _fail(f"x must be a float tensor [..., K], got {getattr(x, 'dtype', type(x).__name__)}")
    if not isinstance(codes, Tensor) or codes.dtype != torch.uint8 or codes.ndim != 2:
        _fail(f"codes must be a uint8 tensor [N, K] (build it with lns_encode), got "
              f"{getattr(codes, 'dtype', type(codes).__name__)} {tuple(getattr(codes, 'shape', ()))}")
    n_out, k_in = codes.shape
    if x.shape[-1] != k_in:
        _fail(f"x has {x.shape[-1]} features but codes is [N, K] = {tuple(codes.shape)}; they must match")
    if not isinstance(scale, Tensor) or scale.shape != (n_out,) or not scale.is_floating_point():
        _fail(f"scale must be a float tensor [N] = ({n_out},), got {tuple(getattr(scale, 'shape', ()))}")
    if bias is not None and bias.shape != (n_out,):
        _fail(f"bias must be [N] = ({n_out},), got {tuple(bias.shape)}")
    if latent is not None and latent.shape != codes.shape:
        _fail(f"latent must be [N, K] = {tuple(codes.shape)} like codes, got {tuple(latent.shape)}")
    for name, t in (("codes", codes), ("scale", scale), ("bias", bias), ("latent", latent)):
        if t is not None and t.device != x.device:
            _fail(f"{name} is on {t.device} but x is on {x.device}; move them to one device")


def lns_linear(x: Tensor, codes: Tensor, scale: Tensor, bias: Tensor | None = None, *,
               latent: Tensor | None = None, impl: str | None = None) -> Tensor:
    """y = x @ decode(codes, scale)^T + bias, with 8-bit LNS weights.

    Args:
        x: [..., K] float (bf16 / fp16: tensor cores on CUDA; fp32: ieee fp32 dots; fp64: reference).
        codes: [N, K] uint8 LNS codes, scale: [N] per-row scale (`lns_encode(weight)` builds both).
        bias: [N] or None.
        latent: [N, K] float or None: a straight-through latent weight. The value is unchanged; the
            gradient of the decoded weight (g^T x) goes to `latent` (training with `trainable=True`).
        impl: None | "torch" | "triton" (None: the Triton kernel for CUDA tensors, else the reference).
    Returns:
        y [..., N] in x's dtype, differentiable in x, bias and latent (codes and scale get no gradient).
    Example:
        >>> codes, scale = lns_encode(torch.tensor([[1.0, -0.5]]))
        >>> lns_linear(torch.tensor([[2.0, 2.0]]), codes, scale)
        tensor([[1.]])
    """
    _validate(x, codes, scale, bias, latent)
    has_kernel = x.dtype in _KERNEL_DTYPES
    if impl == "triton" and not has_kernel:
        raise NotImplementedError(f"lns_linear: the Triton kernel takes bf16, fp16 or fp32 x, got {x.dtype}; "
                                  "pass impl='torch' (or impl=None) or convert x")
    if resolve_impl("lns_linear", impl, x, codes, has_triton_kernel=has_kernel) == "torch":
        return lns_linear_reference(x, codes, scale, bias, latent)
    # Imported here: Triton is optional, and its interpreter reads TRITON_INTERPRET at kernel definition.
    from muse_lm.ops.lns_linear.triton import lns_linear_triton

    return lns_linear_triton(x, codes, scale, bias, latent)
