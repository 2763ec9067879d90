"""TT-SVD: the tensor-train cores of an existing dense embedding table.

The table W `[V, D]` is padded with zero rows to V_pad = prod v_k and read as a 2K-way tensor
T[i_1..i_K, j_1..j_K] = W[row(i), col(j)], rows in mixed radix over (v_1..v_K) and columns over
(d_1..d_K), most significant first (the layout `muse_lm.ops.tt_embedding` defines). Interleaving
the modes as (i_1 j_1)(i_2 j_2)... makes core k a tensor over the pair (i_k, j_k), and the usual
sequential truncated SVDs (Oseledets 2011) give the best-rank-r factor at each unfolding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from muse_lm.ops.tt_embedding import tt_reconstruct

_RANK_RTOL = 1e-12


def tt_svd(weight: Tensor, vocab_factors: Sequence[int], dim_factors: Sequence[int],
           rank: int) -> tuple[list[Tensor], tuple[int, ...], float]:
    """Truncated TT-SVD of `weight` `[V, D]`.

    Args:
        weight: the dense table, `[V, D]`, V <= prod(vocab_factors), D == prod(dim_factors).
        vocab_factors: (v_1..v_K).
        dim_factors: (d_1..d_K).
        rank: the largest inner TT rank; each r_k is further capped by the sizes of its
            unfolding (min(prod_{l<=k} v_l d_l, prod_{l>k} v_l d_l)) and by its numerical rank
            (singular values under 1e-12 of the largest are dropped).

    Returns:
        (cores, ranks, error): cores[k] `(v_k, r_{k-1}, d_k, r_k)` in fp64 on weight's device,
        ranks (r_0..r_K) with r_0 = r_K = 1, and the relative Frobenius error
        ||W - E[:V]||_F / ||W||_F over the V real rows (0 for an all-zero table).
    """
    vocab_factors, dim_factors = tuple(vocab_factors), tuple(dim_factors)
    k_cores = len(vocab_factors)
    if rank < 1:
        raise ValueError(f"tt_svd: rank={rank} must be >= 1")
    if weight.ndim != 2 or len(dim_factors) != k_cores:
        raise ValueError(
            f"tt_svd: need a 2-d weight and as many dim factors as vocab factors, got weight "
            f"{tuple(weight.shape)}, v={vocab_factors}, d={dim_factors}")
    rows, width = weight.shape
    v_pad = math.prod(vocab_factors)
    if rows > v_pad or width != math.prod(dim_factors):
        raise ValueError(
            f"tt_svd: weight {tuple(weight.shape)} does not fit factors v={vocab_factors} (prod {v_pad} "
            f"must be >= V) and d={dim_factors} (prod must equal D={width})")
    w64 = weight.detach().to(torch.float64)
    padded = torch.cat([w64, w64.new_zeros(v_pad - rows, width)]) if v_pad > rows else w64
    # (v_1..v_K, d_1..d_K) -> (v_1, d_1, v_2, d_2, ...): mode k is the pair (i_k, j_k).
    order = [a for k in range(k_cores) for a in (k, k_cores + k)]
    rest = padded.reshape(*vocab_factors, *dim_factors).permute(*order).contiguous()
    modes = [v * d for v, d in zip(vocab_factors, dim_factors)]
    cores, ranks = [], [1]
    for k in range(k_cores - 1):
        mat = rest.reshape(ranks[-1] * modes[k], -1)
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        # Directions with singular value ~0 (rounding of an exactly low-rank unfolding) carry
        # nothing but noise into the next core: drop them too.
        r = max(1, min(rank, int((s > s[0] * _RANK_RTOL).sum())))
        cores.append(u[:, :r].reshape(ranks[-1], vocab_factors[k], dim_factors[k], r))
        rest = s[:r, None] * vh[:r]
        ranks.append(r)
    cores.append(rest.reshape(ranks[-1], vocab_factors[-1], dim_factors[-1], 1))
    ranks.append(1)
    cores = _balance([c.permute(1, 0, 2, 3).contiguous() for c in cores])
    recon = tt_reconstruct(cores, 0, rows)
    norm = torch.linalg.norm(w64)
    error = float(torch.linalg.norm(recon - w64) / norm) if norm > 0 else float(torch.linalg.norm(recon))
    return cores, tuple(ranks), error


def _balance(cores: list[Tensor]) -> list[Tensor]:
    """Rescales the cores to equal Frobenius norms (their product, the table, is unchanged).

    TT-SVD leaves all the scale in the last core; an optimizer with one learning rate for every
    core then moves the orthonormal cores far more, relative to their size, than the last one.
    """
    norms = [torch.linalg.norm(c) for c in cores]
    if any(n == 0 for n in norms):
        return cores
    target = math.prod(float(n) for n in norms) ** (1.0 / len(cores))
    return [c * (target / float(n)) for c, n in zip(cores, norms)]
