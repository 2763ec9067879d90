"""Tensor-train (HTT) embedding lookup: `tt_embedding(ids, cores)` and `tt_reconstruct(cores)`.

validate -> dispatch (`impl`) -> the fused Triton kernel (`triton.py`, CUDA by default, or CPU
under TRITON_INTERPRET=1) or the pure-torch reference (`reference.py`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from muse_lm.ops._dispatch import compile_boundary, resolve_impl
from muse_lm.ops.tt_embedding.reference import tt_embedding_ref, tt_reconstruct_ref

__all__ = ["check_tt_cores", "tt_embedding", "tt_reconstruct"]


def check_tt_cores(cores: Sequence[Tensor], op: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Validates TT cores and returns their factors `(v_1..v_K), (d_1..d_K)`.

    Raises ValueError naming the problem: K not in {2, 3}, a core that is not 4-d
    `(v_k, r_{k-1}, d_k, r_k)`, a broken rank chain (r_0 = r_K = 1,
    cores[k].shape[3] == cores[k+1].shape[1]), mixed dtypes/devices, or a non-float dtype.
    """
    if not isinstance(cores, (list, tuple)) or not all(isinstance(c, Tensor) for c in cores):
        raise ValueError(f"{op}: cores must be a list or tuple of tensors, got {type(cores).__name__}")
    if len(cores) not in (2, 3):
        raise ValueError(f"{op}: got {len(cores)} TT cores; 2 or 3 are supported")
    for k, core in enumerate(cores):
        if core.ndim != 4:
            raise ValueError(
                f"{op}: cores[{k}] has shape {tuple(core.shape)}; each core must be 4-d "
                "(v_k, r_{k-1}, d_k, r_k)"
            )
        if min(core.shape) < 1:
            raise ValueError(f"{op}: cores[{k}] has shape {tuple(core.shape)}; every size must be >= 1")
        if not core.dtype.is_floating_point:
            raise ValueError(f"{op}: cores[{k}] has dtype {core.dtype}; TT cores must be floating point")
        if core.dtype != cores[0].dtype or core.device != cores[0].device:
            raise ValueError(
                f"{op}: cores[{k}] is {core.dtype} on {core.device} but cores[0] is {cores[0].dtype} on "
                f"{cores[0].device}; all cores must share dtype and device"
            )
    if cores[0].shape[1] != 1 or cores[-1].shape[3] != 1:
        raise ValueError(
            f"{op}: boundary TT ranks are r_0={cores[0].shape[1]}, r_K={cores[-1].shape[3]}; both must be 1"
        )
    for k in range(len(cores) - 1):
        if cores[k].shape[3] != cores[k + 1].shape[1]:
            raise ValueError(
                f"{op}: TT rank chain broken: cores[{k}].shape[3]={cores[k].shape[3]} but "
                f"cores[{k + 1}].shape[1]={cores[k + 1].shape[1]}; they must be equal"
            )
    return tuple(c.shape[0] for c in cores), tuple(c.shape[2] for c in cores)


def check_int_tensor(x: Tensor, name: str, op: str) -> None:
    """Raises ValueError unless `x` is a tensor of an integer dtype (bool is not an id)."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{op}: {name} must be a tensor, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise ValueError(f"{op}: {name} has dtype {x.dtype}; it must be an integer tensor (e.g. torch.long)")


def tt_embedding(ids: Tensor, cores: Sequence[Tensor], *, impl: str | None = None) -> Tensor:
    """Looks up rows `ids` of the TT table without building it.

    Args:
        ids: `[...]` integer ids (any shape, 0-d included), each in [0, prod v_k). The range is
            checked only for CPU tensors: a CUDA check would force a host sync, so the model
            validates ids at the data boundary instead.
        cores: K = 2 or 3 tensors, cores[k] `(v_k, r_{k-1}, d_k, r_k)` with r_0 = r_K = 1. An id
            is written in mixed radix over (v_1..v_K), i_1 most significant.
        impl: None | "torch" | "triton" (see `muse_lm.ops._dispatch.resolve_impl`). The Triton
            backward is deterministic for K = 2 (sorted by digit, no atomics); for K = 3 it adds
            core gradients with float atomics, so they may differ between runs in the last bits
            (impl="torch" is deterministic).

    Returns:
        `[..., D]`, D = prod d_k, flattened in mixed radix over (d_1..d_K), d_1 most
        significant; dtype of the cores. Gradients flow to the cores; memory is O(N * D * r).

    Example:
        >>> cores = [torch.randn(7, 1, 3, 4), torch.randn(5, 4, 4, 1)]
        >>> tt_embedding(torch.tensor([[0, 34]]), cores).shape
        torch.Size([1, 2, 12])
    """
    vocab_factors, _ = check_tt_cores(cores, "tt_embedding")
    check_int_tensor(ids, "ids", "tt_embedding")
    if ids.device != cores[0].device:
        raise ValueError(f"tt_embedding: ids are on {ids.device} but the cores on {cores[0].device}")
    rows = math.prod(vocab_factors)
    if ids.device.type == "cpu" and ids.numel() > 0:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= rows:
            raise ValueError(
                f"tt_embedding: ids span [{lo}, {hi}] but the TT table has {rows} rows "
                f"(v={vocab_factors}); ids must be in [0, {rows})"
            )
    if resolve_impl("tt_embedding", impl, ids, *cores, has_triton_kernel=True) == "torch":
        return tt_embedding_ref(ids, cores)
    # Imported here: Triton is optional on CPU, and the interpreter reads TRITON_INTERPRET when
    # the kernels are defined.
    # contiguous: a column slice like seq[:, t] reshapes to a strided view, and the kernel reads ids densely.
    out = _lookup_triton(ids.reshape(-1).contiguous(), cores)
    return out.reshape(*ids.shape, out.shape[-1])


@compile_boundary
def _lookup_triton(flat_ids: Tensor, cores: Sequence[Tensor]) -> Tensor:
    from muse_lm.ops.tt_embedding.triton import TTEmbeddingTriton

    return TTEmbeddingTriton.apply(flat_ids, None, *cores)


def tt_reconstruct(cores: Sequence[Tensor], start: int = 0, stop: int | None = None) -> Tensor:
    """Rows [start, stop) of the dense TT table: `[stop - start, D]`.

    `stop` defaults to prod v_k. Memory is O((stop - start + v_K) * D); used by tests, TT-SVD
    error reports and the blocked head, never for the whole table in training code.
    """
    vocab_factors, _ = check_tt_cores(cores, "tt_reconstruct")
    rows = math.prod(vocab_factors)
    stop = rows if stop is None else stop
    if not (0 <= start <= stop <= rows):
        raise ValueError(
            f"tt_reconstruct: need 0 <= start <= stop <= {rows} (rows of the TT table), "
            f"got start={start}, stop={stop}"
        )
    return tt_reconstruct_ref(cores, start, stop)
