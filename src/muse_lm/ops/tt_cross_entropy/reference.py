"""Pure-torch blocked linear + cross-entropy: the loss of `h @ E[:V].T` without N x V logits.

One implementation serves both heads. A *row table* hands out rows [s, e) of the head matrix
E (`[V, D]`) in the compute dtype and routes a gradient for those rows back to its parameters:
`DenseRows` (a `[V, D]` weight) and `TTRows` (TT cores, rows rebuilt block by block, so the
V x D table never exists either).

Forward: stream over vocab blocks with an online log-sum-exp (running max m, rescaled sum s),
keeping per token only lse and the target logit. Backward: recompute each block's logits,
form dL/dlogits = g * ((1 + 2 z lse) * softmax - onehot), accumulate grad_h and push the block's
row gradient into the table. The largest temporaries are `[N, block]`.

Per-token loss for a non-ignored token: lse - logit[target] + z_loss * lse**2; 0 when ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from muse_lm.ops.tt_embedding.reference import tt_reconstruct_ref

# Largest [N, block] logits tile we aim for: 2**24 fp32 elements = 64 MiB (a few such
# temporaries live at once in the backward).
_TILE_ELEMENTS = 1 << 24
_MAX_BLOCK = 8192
_MIN_BLOCK = 256


def default_block_size(n_tokens: int, vocab_size: int) -> int:
    """Vocab rows per block: the largest power of two <= 8192 with N x block <= 2**24."""
    block = _MAX_BLOCK
    while block > _MIN_BLOCK and n_tokens * block > _TILE_ELEMENTS:
        block //= 2
    return max(1, min(block, vocab_size))


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """fp32, or fp64 when any input is fp64: bf16/fp16 inputs are upcast."""
    out = torch.float32
    for dt in dtypes:
        out = torch.promote_types(out, dt)
    return out


def _blocks(vocab_size: int, block_size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, vocab_size, block_size):
        yield start, min(start + block_size, vocab_size)


class DenseRows:
    """Row table over a dense head weight `[V, D]`."""

    def __init__(self, params: Sequence[Tensor], dtype: torch.dtype) -> None:
        (self.weight,) = params
        self.dtype = dtype
        self._grad: Tensor | None = None

    def rows(self, start: int, stop: int) -> Tensor:
        # Upcast one block at a time: a bf16 weight never gets a whole fp32 copy.
        return self.weight[start:stop].to(self.dtype)

    def add_row_grad(self, start: int, stop: int, grad_rows: Tensor) -> None:
        if self._grad is None:
            self._grad = torch.zeros_like(self.weight)
        # Each row lies in exactly one block, so plain assignment is the accumulation.
        self._grad[start:stop] = grad_rows.to(self.weight.dtype)

    def param_grads(self) -> tuple[Tensor | None, ...]:
        return (self._grad,)


class TTRows:
    """Row table over TT cores; rows past the head's vocab (factorization padding) are never asked for."""

    def __init__(self, params: Sequence[Tensor], dtype: torch.dtype) -> None:
        self.cores = list(params)
        self.dtype = dtype
        self._work = [c.to(dtype) for c in self.cores]
        self._leaves: list[Tensor] | None = None
        self._grads: list[Tensor | None] = [None] * len(self.cores)

    def rows(self, start: int, stop: int) -> Tensor:
        with torch.no_grad():
            return tt_reconstruct_ref(self._work, start, stop)

    def add_row_grad(self, start: int, stop: int, grad_rows: Tensor) -> None:
        # Rebuild the block with a graph and pull grad_rows back to the cores. The rebuild costs
        # O(block * D * r), small next to the O(N * block * D) logits, and keeps no graph alive
        # between blocks.
        if self._leaves is None:
            self._leaves = [c.detach().requires_grad_(True) for c in self._work]
        with torch.enable_grad():
            block = tt_reconstruct_ref(self._leaves, start, stop)
            grads = torch.autograd.grad(block, self._leaves, grad_rows, allow_unused=True)
        for k, g in enumerate(grads):
            if g is not None:
                self._grads[k] = g if self._grads[k] is None else self._grads[k] + g

    def param_grads(self) -> tuple[Tensor | None, ...]:
        out = []
        for core, g in zip(self.cores, self._grads):
            out.append(torch.zeros_like(core) if g is None else g.to(core.dtype))
        return tuple(out)


RowTableFactory = Callable[[Sequence[Tensor], torch.dtype], "DenseRows | TTRows"]


@dataclass(frozen=True)
class LossSpec:
    """Non-tensor arguments of the blocked loss."""

    table: RowTableFactory
    vocab_size: int
    ignore_index: int
    reduction: str
    z_loss: float
    block_size: int


def _target_columns(targets: Tensor, valid: Tensor, start: int, stop: int) -> tuple[Tensor, Tensor]:
    """(in_block [N] bool, column [N] long clamped into the block) for the targets."""
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    in_block = valid & (safe >= start) & (safe < stop)
    column = (safe - start).clamp(0, stop - start - 1)
    return in_block, column


def _online_lse(
    h: Tensor, targets: Tensor, valid: Tensor, table: DenseRows | TTRows, spec: LossSpec
) -> tuple[Tensor, Tensor]:
    """Streams the vocab: returns (lse [N], target logit [N]) without N x V logits."""
    n = h.shape[0]
    run_max = h.new_full((n,), float("-inf"))
    run_sum = h.new_zeros(n)
    target_logit = h.new_zeros(n)
    for start, stop in _blocks(spec.vocab_size, spec.block_size):
        logits = h @ table.rows(start, stop).T  # [N, b]
        in_block, column = _target_columns(targets, valid, start, stop)
        picked = logits.gather(1, column[:, None]).squeeze(1)
        target_logit = target_logit + torch.where(in_block, picked, torch.zeros_like(picked))
        new_max = torch.maximum(run_max, logits.amax(dim=1))
        # In place: one [N, b] buffer per block.
        block_sum = logits.sub_(new_max[:, None]).exp_().sum(dim=1)
        run_sum = run_sum * torch.exp(run_max - new_max) + block_sum
        run_max = new_max
    return run_max + torch.log(run_sum), target_logit


def combine_lse_partials(m: Tensor, s: Tensor) -> Tensor:
    """log-sum-exp `[N]` from per-split running maxima `m` `[S, N]` and sums `s` `[S, N]` of exp(logit - m)
    (the kernels' vocab splits); a split with no real vocab entry (m = -inf, s = 0) adds nothing."""
    top = m.amax(dim=0)
    return top + torch.log((s * torch.exp(m - top)).sum(dim=0))


def _reduce(per_token: Tensor, valid: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    # Mean over non-ignored tokens; with none the sum is 0 and we divide by 1 (loss 0, not NaN).
    return total / valid.sum().clamp_min(1).to(total.dtype)


def _token_weights(grad_out: Tensor, valid: Tensor, reduction: str) -> Tensor:
    """dLoss/dper_token [N]: zero for ignored tokens."""
    weight = grad_out * valid.to(grad_out.dtype)  # "none": grad_out is [N]; else a scalar
    if reduction == "mean":
        weight = weight / valid.sum().clamp_min(1).to(grad_out.dtype)
    return weight


class BlockedLinearCrossEntropy(torch.autograd.Function):
    """loss(h @ E[:V].T, targets) streamed over vocab blocks; E comes from `spec.table(params)`."""

    @staticmethod
    def forward(ctx, h: Tensor, targets: Tensor, spec: LossSpec, *params: Tensor) -> Tensor:
        # Autocast off: the reference computes in compute_dtype. Under autocast its products ran in bf16, and a
        # compiled graph traced the backward under it too, where bf16 logits met fp32 one-hots in scatter_add_.
        with torch.autocast(h.device.type, enabled=False):
            dtype = compute_dtype(h.dtype, *(p.dtype for p in params))
            table = spec.table(params, dtype)
            valid = targets != spec.ignore_index
            lse, target_logit = _online_lse(h.to(dtype), targets, valid, table, spec)
            per_token = lse - target_logit + spec.z_loss * lse.square()
            per_token = torch.where(valid, per_token, torch.zeros_like(per_token))
            ctx.spec = spec
            ctx.save_for_backward(h, targets, lse, *params)
            return _reduce(per_token, valid, spec.reduction)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        h_in, targets, lse, *params = ctx.saved_tensors
        with torch.autocast(h_in.device.type, enabled=False):
            spec: LossSpec = ctx.spec
            need_h = ctx.needs_input_grad[0]
            need_params = any(ctx.needs_input_grad[3:])
            dtype = lse.dtype
            h = h_in.to(dtype)
            table = spec.table(params, dtype)
            valid = targets != spec.ignore_index
            token_grad = _token_weights(grad_out.to(dtype), valid, spec.reduction)
            # d per_token / d logits = (1 + 2 z lse) softmax - onehot(target)
            softmax_scale = torch.where(valid, token_grad * (1 + 2 * spec.z_loss * lse), torch.zeros_like(lse))
            grad_h = torch.zeros_like(h) if need_h else None
            for start, stop in _blocks(spec.vocab_size, spec.block_size):
                rows = table.rows(start, stop)  # [b, D]
                # softmax * scale, in place in the recomputed [N, b] logits buffer
                grad_logits = (h @ rows.T).sub_(lse[:, None]).exp_().mul_(softmax_scale[:, None])
                in_block, column = _target_columns(targets, valid, start, stop)
                onehot = torch.where(in_block, token_grad, torch.zeros_like(token_grad))
                grad_logits.scatter_add_(1, column[:, None], -onehot[:, None])
                if need_h:
                    grad_h += grad_logits @ rows
                if need_params:
                    table.add_row_grad(start, stop, grad_logits.T @ h)  # [b, D]
            param_grads = table.param_grads() if need_params else (None,) * len(params)
            param_grads = [g if want else None for g, want in zip(param_grads, ctx.needs_input_grad[3:])]
            return (None if grad_h is None else grad_h.to(h_in.dtype), None, None, *param_grads)


def blocked_linear_cross_entropy(
    h: Tensor, targets: Tensor, params: Sequence[Tensor], spec: LossSpec
) -> Tensor:
    """h `[..., D]`, targets `[...]` -> loss (scalar, or `[...]` for reduction "none")."""
    h2 = h.reshape(-1, h.shape[-1])
    t1 = targets.reshape(-1)
    loss = BlockedLinearCrossEntropy.apply(h2, t1, spec, *params)
    return loss.reshape(targets.shape) if spec.reduction == "none" else loss


def _spec(
    table: RowTableFactory,
    vocab_size: int,
    n_tokens: int,
    ignore_index: int,
    reduction: str,
    z_loss: float,
    block_size: int | None,
) -> LossSpec:
    block = block_size or default_block_size(n_tokens, vocab_size)
    return LossSpec(table, vocab_size, ignore_index, reduction, float(z_loss), block)


def tt_linear_cross_entropy_ref(
    h: Tensor,
    cores: Sequence[Tensor],
    targets: Tensor,
    *,
    vocab_size: int,
    ignore_index: int = -100,
    reduction: str = "mean",
    z_loss: float = 0.0,
    block_size: int | None = None,
) -> Tensor:
    """Cross-entropy of `h @ tt_reconstruct(cores)[:vocab_size].T` (+ z-loss), streamed."""
    spec = _spec(TTRows, vocab_size, targets.numel(), ignore_index, reduction, z_loss, block_size)
    return blocked_linear_cross_entropy(h, targets, list(cores), spec)


def linear_cross_entropy_ref(
    h: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    z_loss: float = 0.0,
    block_size: int | None = None,
) -> Tensor:
    """Cross-entropy of `h @ weight.T` (+ z-loss), streamed over vocab blocks."""
    spec = _spec(DenseRows, weight.shape[0], targets.numel(), ignore_index, reduction, z_loss, block_size)
    return blocked_linear_cross_entropy(h, targets, [weight], spec)


def tt_logits_ref(
    h: Tensor, cores: Sequence[Tensor], *, vocab_size: int, block_size: int | None = None
) -> Tensor:
    """`h @ E[:vocab_size].T` built block by block (plain autograd): `[..., vocab_size]`.

    Computed in the dtype `h @ E.T` would have; the V x D table is never built whole.
    """
    h2 = h.reshape(-1, h.shape[-1])
    block = block_size or default_block_size(h2.shape[0], vocab_size)
    dtype = torch.promote_types(h.dtype, cores[0].dtype)
    h2 = h2.to(dtype)
    work = [c.to(dtype) for c in cores]
    parts = [h2 @ tt_reconstruct_ref(work, s, e).T for s, e in _blocks(vocab_size, block)]
    return torch.cat(parts, dim=1).reshape(*h.shape[:-1], vocab_size)
