"""The log-semiring product log_matmul(A, B) = log sum_k exp(A_ik + B_kj).

validate -> dispatch -> the chunked torch reference (`reference.py`) or the Triton kernels
(`triton.py`: scaled tile matmuls with an online log-sum-exp and a range guard).
"""

from __future__ import annotations

import torch
from torch import Tensor

from muse_lm.ops._dispatch import resolve_impl
from muse_lm.ops.log_matmul.reference import log_matmul_reference

__all__ = ["log_matmul"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check(op: str, name: str, t: object) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _DTYPES:
        raise ValueError(
            f"{op}: {name} has dtype {t.dtype}; expected float16, bfloat16, float32 or float64 log-values "
            "(convert with .float())"
        )
    if t.ndim < 2:
        raise ValueError(f"{op}: {name} must have at least 2 dims (..., rows, cols), got shape {tuple(t.shape)}")


def log_matmul(A: Tensor, B: Tensor, *, impl: str | None = None) -> Tensor:
    """C = log(exp(A) @ exp(B)) computed stably: C_ij = log sum_k exp(A_ik + B_kj).

    The product of the log semiring, what HMM / CRF code does with log-probabilities (a forward
    step is log_matmul(log_alpha, log_transitions)). -inf entries mean probability 0; an output with
    no finite term is -inf and its gradient is 0 (not NaN). Inputs spanning +-1000 and more are
    fine: no exp of an input is ever formed unscaled.

    Args:
        A: [..., M, K] log-values; B: [..., K, N], same dtype and device; batch dims broadcast.
            fp32 / fp64, or bf16 / fp16 computed in fp32. +inf entries are not supported.
        impl: None | "torch" | "triton". None runs the Triton kernels on CUDA tensors (fp64 always
            runs the reference; impl="triton" with fp64 raises NotImplementedError) and the chunked
            torch reference (~64 MB live at most) on CPU tensors.
    Returns:
        C [..., M, N] in the inputs' dtype. Differentiable in A and B:
        dA_ik = sum_j g_ij exp(A_ik + B_kj - C_ij), dB_kj = sum_i g_ij exp(A_ik + B_kj - C_ij),
        computed without materializing M x K x N.
    Example:
        >>> log_matmul(torch.tensor([[0.0, float("-inf")]]), torch.tensor([[1.0], [5.0]]))
        tensor([[1.]])
    """
    op = "log_matmul"
    _check(op, "A", A)
    _check(op, "B", B)
    if A.dtype != B.dtype:
        raise ValueError(f"{op}: A is {A.dtype} but B is {B.dtype}; convert one of them so the dtypes match")
    if A.device != B.device:
        raise ValueError(f"{op}: A is on {A.device} but B is on {B.device}; use one device")
    m, k = A.shape[-2:]
    if B.shape[-2] != k:
        raise ValueError(
            f"{op}: A [..., M, K] = {tuple(A.shape)} and B [..., K, N] = {tuple(B.shape)} disagree on K "
            f"({k} vs {B.shape[-2]}); the inner dims must match as in A @ B"
        )
    n = B.shape[-1]
    try:
        batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
    except RuntimeError as err:
        raise ValueError(
            f"{op}: the batch dims of A {tuple(A.shape[:-2])} and B {tuple(B.shape[:-2])} do not broadcast"
        ) from err
    fp32_math = A.dtype != torch.float64
    if impl == "triton" and not fp32_math:
        raise NotImplementedError(
            f"{op}: the Triton kernels compute in fp32 but got {A.dtype}; pass impl='torch' (or impl=None, "
            "which routes fp64 to the reference) or convert the inputs to float32"
        )
    use = resolve_impl(op, impl, A, B, has_triton_kernel=fp32_math)
    # Broadcast views are flattened to [Bt, ., .]; autograd sums the gradient back over broadcast dims.
    bt = batch.numel()
    a = A.expand(*batch, m, k).reshape(bt, m, k)
    b = B.expand(*batch, k, n).reshape(bt, k, n)
    if use == "torch":
        c = log_matmul_reference(a, b)
    else:
        # Imported here: Triton is optional, and its interpreter reads TRITON_INTERPRET at kernel definition.
        from muse_lm.ops.log_matmul.triton import log_matmul_triton

        c = log_matmul_triton(a, b)
    return c.reshape(*batch, m, n)
