"""Fused linear + cross-entropy heads that never hold N x V logits (or a V x D TT table).

`tt_linear_cross_entropy` (tied TT head), `linear_cross_entropy` (dense head) and
`tt_logits` (blocked logits for generation). validate -> dispatch (`impl`) -> kernel or reference.

Triton kernels: `triton_dense.py` (dense head) and, for the TT head, `triton_tt_chunked.py` (the
table rebuilt one vocab chunk at a time and streamed by the dense kernels; any K; the default) and
`triton_tt.py` (fully fused K = 2 kernels with a deterministic mode, reached directly), for fp32 /
bf16 / fp16 inputs; fp64 inputs run the pure-torch reference (`reference.py`) on every device,
and asking for impl="triton" there is an error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from muse_lm.ops._dispatch import resolve_impl
from muse_lm.ops.tt_cross_entropy.reference import (
    linear_cross_entropy_ref,
    tt_linear_cross_entropy_ref,
    tt_logits_ref,
)
from muse_lm.ops.tt_embedding import check_int_tensor, check_tt_cores

__all__ = ["linear_cross_entropy", "tt_linear_cross_entropy", "tt_logits"]

REDUCTIONS = ("mean", "sum", "none")


def _check_vocab(vocab_size: int, rows: int, vocab_factors: tuple[int, ...], op: str) -> None:
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1:
        raise ValueError(f"{op}: vocab_size={vocab_size!r} must be a positive int")
    if vocab_size > rows:
        raise ValueError(
            f"{op}: vocab_size={vocab_size} exceeds the {rows} rows of the TT table (v={vocab_factors}); "
            "choose vocab factors whose product is >= vocab_size"
        )


def _check_h(h: Tensor, width: int, device, op: str) -> None:
    if not isinstance(h, Tensor) or not h.dtype.is_floating_point or h.ndim < 1:
        raise ValueError(f"{op}: h must be a floating-point tensor [..., D]")
    if h.shape[-1] != width:
        raise ValueError(
            f"{op}: h has last dim {h.shape[-1]} but the head has D={width}; h must be [..., {width}]"
        )
    if h.device != device:
        raise ValueError(f"{op}: h is on {h.device} but the head parameters are on {device}")


def _check_block_size(block_size: int | None, op: str) -> None:
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"{op}: block_size={block_size!r} must be None or a positive int")


def _check_loss_args(
    h: Tensor, targets: Tensor, vocab_size: int, ignore_index: int, reduction: str, z_loss: float, op: str
) -> None:
    check_int_tensor(targets, "targets", op)
    if tuple(targets.shape) != tuple(h.shape[:-1]):
        raise ValueError(
            f"{op}: targets have shape {tuple(targets.shape)} but h is {tuple(h.shape)}; "
            "targets must be h.shape[:-1]"
        )
    if targets.device != h.device:
        raise ValueError(f"{op}: targets are on {targets.device} but h is on {h.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction={reduction!r} must be one of {REDUCTIONS}")
    if not isinstance(z_loss, (int, float)) or not math.isfinite(z_loss) or z_loss < 0:
        raise ValueError(f"{op}: z_loss={z_loss!r} must be a finite number >= 0")
    # Range check on CPU only: on CUDA it would force a host sync every step.
    if targets.device.type == "cpu" and targets.numel() > 0:
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
        if bool(bad.any()):
            value = int(targets[bad][0])
            raise ValueError(
                f"{op}: target {value} is outside [0, {vocab_size}) and is not ignore_index={ignore_index}"
            )


def _has_fp64(*tensors: Tensor) -> bool:
    """fp64 inputs keep the fp64 reference (the kernels compute in fp32)."""
    return any(t.dtype == torch.float64 for t in tensors)


def _autocast(*tensors: Tensor) -> list[Tensor]:
    """Under CUDA autocast the kernels take the autocast dtype (bf16 tensor-core products with fp32
    accumulation), as F.linear would; the casts carry the gradients back to fp32 parameters."""
    if torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
        return [t.to(dtype) for t in tensors]
    return list(tensors)


def tt_linear_cross_entropy(
    h: Tensor,
    cores: Sequence[Tensor],
    targets: Tensor,
    *,
    vocab_size: int,
    ignore_index: int = -100,
    reduction: str = "mean",
    z_loss: float = 0.0,
    block_size: int | None = None,
    impl: str | None = None,
) -> Tensor:
    """Next-token loss of a tied TT head, straight from the cores.

    Equals `F.cross_entropy(h @ E[:vocab_size].T, targets, ignore_index=..., reduction=...)`
    plus the z-loss, with E = `tt_reconstruct(cores)`; rows >= vocab_size (padding of the
    factorization) never count. Per non-ignored token the loss is
    `ce_i + z_loss * lse_i**2` (lse_i = logsumexp of token i's logits); ignored tokens give 0.
    "mean" divides the sum by the number of non-ignored tokens, and returns 0.0 (not NaN)
    when every token is ignored; "sum" sums; "none" returns `[...]` per-token losses.

    The vocab is streamed in blocks of `block_size` rows with an online log-sum-exp; the
    backward recomputes each block. No N x V or V x D tensor exists; the largest temporary is
    `[N, block_size]` (default: N * block <= 2**24, block <= 8192). Math runs in fp32 (fp64 for
    fp64 inputs): the loss comes back in that dtype, gradients in the inputs' dtypes.

    Args:
        h: `[..., D]` hidden states, D = prod d_k.
        cores: K = 2 or 3 TT cores, cores[k] `(v_k, r_{k-1}, d_k, r_k)`, r_0 = r_K = 1.
        targets: `[...]` (= h.shape[:-1]) integer targets in [0, vocab_size) or ignore_index.
            The range is checked only for CPU tensors (a CUDA check would force a host sync).
        vocab_size: V <= prod v_k.
        block_size: vocab rows per block of the torch reference (the kernels choose their own tiles).
        impl: None | "torch" | "triton" (see `muse_lm.ops._dispatch.resolve_impl`): None runs the
            Triton kernels on CUDA (non-fp64: the table rebuilt per vocab chunk and streamed by the
            dense fused kernels, `triton_tt_chunked.py`), the reference otherwise.

    Example:
        >>> cores = [torch.randn(7, 1, 3, 4), torch.randn(5, 4, 4, 1)]
        >>> h, t = torch.randn(2, 6, 12), torch.randint(0, 30, (2, 6))
        >>> tt_linear_cross_entropy(h, cores, t, vocab_size=30).shape
        torch.Size([])
    """
    op = "tt_linear_cross_entropy"
    vocab_factors, width_factors = check_tt_cores(cores, op)
    _check_vocab(vocab_size, math.prod(vocab_factors), vocab_factors, op)
    _check_h(h, math.prod(width_factors), cores[0].device, op)
    _check_loss_args(h, targets, vocab_size, ignore_index, reduction, z_loss, op)
    _check_block_size(block_size, op)
    kernel = not _has_fp64(h, *cores)
    if resolve_impl(op, impl, h, targets, *cores, has_triton_kernel=kernel) == "triton":
        # Triton is optional. The chunked head (dense kernels over rebuilt vocab chunks) is the fast
        # one; `triton_tt.py` keeps the fully fused, deterministic-capable K = 2 kernels.
        from muse_lm.ops.tt_cross_entropy.triton_tt_chunked import tt_linear_cross_entropy_chunked

        h, *cores = _autocast(h, *cores)
        loss = tt_linear_cross_entropy_chunked(
            h.reshape(-1, h.shape[-1]), cores, targets.reshape(-1), vocab_size=vocab_size,
            ignore_index=ignore_index, reduction=reduction, z_loss=z_loss)
        return loss.reshape(targets.shape) if reduction == "none" else loss
    return tt_linear_cross_entropy_ref(
        h,
        cores,
        targets,
        vocab_size=vocab_size,
        ignore_index=ignore_index,
        reduction=reduction,
        z_loss=z_loss,
        block_size=block_size,
    )


def linear_cross_entropy(
    h: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    z_loss: float = 0.0,
    block_size: int | None = None,
    impl: str | None = None,
) -> Tensor:
    """`tt_linear_cross_entropy` for a dense head `weight` `[V, D]` (vocab_size = V).

    Same loss, reductions, z-loss, dtypes and streaming (no N x V logits; the weight is upcast
    one block at a time). See `tt_linear_cross_entropy` for the arguments.

    Example:
        >>> w, h, t = torch.randn(30, 12), torch.randn(4, 12), torch.tensor([1, 2, -100, 29])
        >>> linear_cross_entropy(h, w, t, reduction="none").shape
        torch.Size([4])
    """
    op = "linear_cross_entropy"
    if not isinstance(weight, Tensor) or weight.ndim != 2 or not weight.dtype.is_floating_point:
        raise ValueError(f"{op}: weight must be a floating-point [V, D] tensor")
    if weight.shape[0] < 1:
        raise ValueError(f"{op}: weight has {weight.shape[0]} rows; the head needs V >= 1")
    _check_h(h, weight.shape[1], weight.device, op)
    _check_loss_args(h, targets, weight.shape[0], ignore_index, reduction, z_loss, op)
    _check_block_size(block_size, op)
    kernel = not _has_fp64(h, weight)
    if resolve_impl(op, impl, h, targets, weight, has_triton_kernel=kernel) == "triton":
        from muse_lm.ops.tt_cross_entropy.triton_dense import linear_cross_entropy_triton  # Triton is optional

        h, weight = _autocast(h, weight)
        loss = linear_cross_entropy_triton(
            h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), ignore_index=ignore_index,
            reduction=reduction, z_loss=z_loss)
        return loss.reshape(targets.shape) if reduction == "none" else loss
    return linear_cross_entropy_ref(
        h,
        weight,
        targets,
        ignore_index=ignore_index,
        reduction=reduction,
        z_loss=z_loss,
        block_size=block_size,
    )


def tt_logits(
    h: Tensor,
    cores: Sequence[Tensor],
    *,
    vocab_size: int,
    block_size: int | None = None,
    impl: str | None = None,
) -> Tensor:
    """Logits `h @ E[:vocab_size].T` of the TT head, built block by block: `[..., vocab_size]`.

    For generation and `model(ids)`: the V x D table is never built whole (the `[N, V]` output
    is the point here). Dtype is that of `h @ E.T`; gradients by plain autograd.
    """
    op = "tt_logits"
    vocab_factors, width_factors = check_tt_cores(cores, op)
    _check_vocab(vocab_size, math.prod(vocab_factors), vocab_factors, op)
    _check_h(h, math.prod(width_factors), cores[0].device, op)
    _check_block_size(block_size, op)
    resolve_impl(op, impl, h, *cores, has_triton_kernel=False)
    return tt_logits_ref(h, cores, vocab_size=vocab_size, block_size=block_size)
