"""Causal depthwise convolution with an optional SiLU: the AR-SSM layer's short token mixer.

validate -> dispatch -> reference (`reference.py`) or the Triton kernels (`triton.py`), the latter as
PyTorch custom ops with autograd (`muse_lm::causal_conv1d_fwd` / `_bwd`), so torch.compile keeps
them inside a compiled block as opaque calls.
"""

from __future__ import annotations

import torch
from torch import Tensor

from muse_lm.ops._dispatch import resolve_impl
from muse_lm.ops.causal_conv.reference import causal_conv1d_reference

__all__ = ["causal_conv1d"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ACTIVATIONS = ("silu", None)


def _check(x: Tensor, weight: Tensor, bias: Tensor | None, past: Tensor | None, activation: str | None) -> None:
    op = "causal_conv1d"
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("past", past)):
        if t is None:
            continue
        if not isinstance(t, Tensor) or t.dtype not in _DTYPES:
            got = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{op}: {name} must be a float16/bfloat16/float32/float64 tensor, got {got}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}; use one device")
    if x.ndim != 3:
        raise ValueError(f"{op}: x must be [B, T, D], got shape {tuple(x.shape)}")
    D = x.shape[2]
    if weight.ndim != 2 or weight.shape[0] != D or weight.shape[1] < 1:
        raise ValueError(f"{op}: weight must be [D, K] = [{D}, K >= 1] (one filter per channel), got "
                         f"{tuple(weight.shape)}")
    if bias is not None and bias.shape != (D,):
        raise ValueError(f"{op}: bias must be [D] = [{D}], got {tuple(bias.shape)}")
    expected = (x.shape[0], weight.shape[1] - 1, D)
    if past is not None and past.shape != expected:
        raise ValueError(f"{op}: past must be [B, K-1, D] = {list(expected)} (the K-1 inputs before the first "
                         f"token), got {tuple(past.shape)}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"{op}: activation={activation!r}; use 'silu' or None")


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    past: Tensor | None = None,
    activation: str | None = "silu",
    impl: str | None = None,
) -> Tensor:
    """y[b, t, d] = act(bias[d] + sum_{j<K} weight[d, j] * xp[b, t + j, d]), xp = cat(past, x) in time.

    Token t sees x[t-K+1..t] (and `past` before the first token): causal.

    Args:
        x: [B, T, D] inputs (fp16/bf16/fp32/fp64).
        weight: [D, K] one filter per channel (any float dtype: read as is, e.g. fp32 parameters
            with bf16 activations).
        bias: [D] or None.
        past: [B, K-1, D] the inputs before x's first token (a decoding cache), None for zeros.
        activation: "silu" or None.
        impl: None | "torch" | "triton". None runs the Triton kernels for CUDA tensors in fp32 math
            and the reference otherwise; fp64 inputs always run on the reference (impl="triton" with
            them raises NotImplementedError).
    Returns:
        y [B, T, D] in x's dtype, computed in fp32 (fp64 for fp64 inputs) and rounded once.
        Differentiable in x, weight, bias and past.
    Example:
        >>> causal_conv1d(torch.ones(1, 3, 1), torch.ones(1, 2), activation=None)
        tensor([[[1.], [2.], [2.]]])
    """
    _check(x, weight, bias, past, activation)
    fp32_math = all(t is None or t.dtype != torch.float64 for t in (x, weight, bias, past))
    if impl == "triton" and not fp32_math:
        raise NotImplementedError("causal_conv1d: the Triton kernels compute in fp32 but an input is float64; "
                                  "pass impl='torch' (or impl=None, which routes fp64 to the reference)")
    silu = activation == "silu"
    if resolve_impl("causal_conv1d", impl, x, weight, has_triton_kernel=fp32_math) == "torch":
        return causal_conv1d_reference(x, weight, bias, past, silu)
    # Imported here: Triton is optional, and its interpreter reads TRITON_INTERPRET at kernel definition.
    from muse_lm.ops.causal_conv.custom_ops import conv_forward

    return conv_forward(x, weight, bias, past, silu)
