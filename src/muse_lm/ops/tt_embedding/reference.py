"""Pure-torch tensor-train (TT) table: row lookup and contiguous row blocks.

Notation (docs/ and DESIGN.md "HTT embedding"): K cores, cores[k] has shape
(v_k, r_{k-1}, d_k, r_k) with r_0 = r_K = 1. Row t of the table E (V_pad = prod v_k rows,
D = prod d_k columns) is G_1[i_1] G_2[i_2] ... G_K[i_K], where (i_1, ..., i_K) are the digits
of t in mixed radix over (v_1, ..., v_K), i_1 most significant, and the row is flattened in
mixed radix over (d_1, ..., d_K), d_1 most significant.

These functions assume validated inputs (see `muse_lm.ops.tt_embedding`); gradients reach the
cores through ordinary autograd.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def tt_digits(ids: Tensor, vocab_factors: Sequence[int]) -> list[Tensor]:
    """Mixed-radix digits of `ids` ([N] int) over `vocab_factors`, most significant first."""
    rest = ids.long()
    digits = []
    for v in reversed(vocab_factors[1:]):
        digits.append(rest % v)
        rest = rest // v
    digits.append(rest)
    return digits[::-1]


def tt_embedding_ref(ids: Tensor, cores: Sequence[Tensor]) -> Tensor:
    """Rows `ids` of the TT table.

    Args:
        ids: `[...]` integer ids in [0, prod v_k).
        cores: K tensors, cores[k] `(v_k, r_{k-1}, d_k, r_k)`, r_0 = r_K = 1.

    Returns:
        `[..., D]` with D = prod d_k, in the cores' dtype.

    Memory is O(N * D * r): each token gathers its K core slices and contracts them left to
    right, so the largest intermediate is `[N, d_1..d_k, r_k]` (never the V x D table).
    """
    flat = ids.reshape(-1)
    n = flat.shape[0]
    digits = tt_digits(flat, [c.shape[0] for c in cores])
    # acc: [N, d_1..d_k (flattened, d_1 most significant), r_k]
    width = cores[0].shape[2]
    acc = cores[0].index_select(0, digits[0]).reshape(n, width, cores[0].shape[3])
    for core, digit in zip(cores[1:], digits[1:]):
        _, r_in, d_k, r_out = core.shape
        slices = core.index_select(0, digit)  # [N, r_{k-1}, d_k, r_k]
        acc = torch.bmm(acc, slices.reshape(n, r_in, d_k * r_out))  # [N, P, d_k * r_k]
        width *= d_k
        acc = acc.reshape(n, width, r_out)
    return acc.reshape(*ids.shape, width)


def partial_rows(cores: Sequence[Tensor], start: int, stop: int) -> Tensor:
    """Rows [start, stop) of the train cores[0..k]: `[stop - start, d_1..d_k, r_k]`.

    Contiguous rows share their leading digits, so instead of gathering per row we take the
    few prefix rows that cover the range (recursively) and combine them with the *whole*
    last core: the intermediate has at most (stop - start) + 2 v_k rows.
    """
    first = cores[0]
    if len(cores) == 1:
        return first[start:stop].reshape(stop - start, first.shape[2], first.shape[3])
    last = cores[-1]
    v_last, r_in, d_last, r_out = last.shape
    p_start, p_stop = start // v_last, (stop - 1) // v_last + 1
    prefix = partial_rows(cores[:-1], p_start, p_stop)  # [m, P, r_{k-1}]
    m, p_width, _ = prefix.shape
    # [m, P, r] x [r, v * d * r'] -> [m, P, v, d, r'] -> rows (prefix, v) x cols (P, d)
    full = (prefix.reshape(m * p_width, r_in) @ last.permute(1, 0, 2, 3).reshape(r_in, -1)).reshape(
        m, p_width, v_last, d_last, r_out
    )
    full = full.permute(0, 2, 1, 3, 4).reshape(m * v_last, p_width * d_last, r_out)
    offset = start - p_start * v_last
    return full[offset : offset + stop - start]


def tt_reconstruct_ref(cores: Sequence[Tensor], start: int = 0, stop: int | None = None) -> Tensor:
    """Rows [start, stop) of the dense TT table: `[stop - start, D]` (stop defaults to prod v_k).

    Used by tests and by the blocked head, which asks for one vocab block at a time.
    """
    total = 1
    for c in cores:
        total *= c.shape[0]
    stop = total if stop is None else stop
    width = 1
    for c in cores:
        width *= c.shape[2]
    if stop <= start:
        return cores[0].new_zeros(0, width)
    return partial_rows(cores, start, stop).reshape(stop - start, width)
