"""Tensor-train (HTT) embedding with a tied head, and the dense tied embedding it replaces.

Both expose the same interface to the model: `forward(ids) -> [..., D]`, `loss(h, targets)` (fused
cross-entropy, never forming the logits), `logits(h)` (blockwise), `num_parameters()`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from muse_lm.layers.tt_svd import tt_svd
from muse_lm.ops import linear_cross_entropy, tt_embedding, tt_linear_cross_entropy, tt_reconstruct
from muse_lm.ops.tt_cross_entropy import tt_logits


def factorize_vocab(vocab_size: int, num_cores: int) -> tuple[int, ...]:
    """Balanced radices (v_1..v_K) with prod >= vocab_size and as little padding as the balance allows."""
    factors = []
    remaining = vocab_size
    for k in range(num_cores, 0, -1):
        v = math.ceil(remaining ** (1.0 / k) - 1e-9)
        factors.append(v)
        remaining = math.ceil(remaining / v)
    return tuple(factors)


def factorize_dim(d_model: int, num_cores: int) -> tuple[int, ...]:
    """Exact factorization (d_1..d_K) of d_model, d_1 <= d_2 <= ..., as balanced as divisors allow.

    A smaller d_1 lowers the tied head's FLOPs (DESIGN.md: d_1 = 16 at D = 1024 gives ~0.32x of a
    dense head), and a balanced split keeps the cores tiny; the largest divisor <= D^(1/k) does both.
    """
    factors = []
    remaining = d_model
    for k in range(num_cores, 1, -1):
        target = remaining ** (1.0 / k)
        d = max(x for x in range(1, int(target + 1e-9) + 1) if remaining % x == 0)
        factors.append(d)
        remaining //= d
    factors.append(remaining)
    return tuple(factors)


class HTTEmbedding(nn.Module):
    """Tensor-train token table E[i] = G_1[i_1] G_2[i_2] ... G_K[i_K], tied to the output head.

    cores[k]: (v_k, r_{k-1}, d_k, r_k), r_0 = r_K = 1. The V x D table is never built: lookup
    gathers and contracts core slices; the head streams vocab blocks through a fused cross-entropy.

    Args:
        vocab_size: V (ids in [0, V)); the factorization may pad to prod(v_k) >= V, padding rows
            never appear in a loss or in logits.
        d_model: D = prod(d_k).
        rank: TT rank r of every inner bond.
        num_cores: K in {2, 3}.
        init_std: target std of a table entry; cores are sampled so the product has it (TT-Rec).
    """

    def __init__(self, vocab_size: int, d_model: int, rank: int = 16, num_cores: int = 2, *,
                 vocab_factors: tuple[int, ...] | None = None, dim_factors: tuple[int, ...] | None = None,
                 init_std: float = 0.02):
        super().__init__()
        if num_cores not in (2, 3):
            raise ValueError(f"HTTEmbedding: num_cores={num_cores} is not supported; use 2 or 3")
        if rank < 1:
            raise ValueError(f"HTTEmbedding: rank={rank} must be >= 1")
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.vocab_factors = tuple(vocab_factors or factorize_vocab(vocab_size, num_cores))
        self.dim_factors = tuple(dim_factors or factorize_dim(d_model, num_cores))
        if math.prod(self.vocab_factors) < vocab_size or math.prod(self.dim_factors) != d_model:
            raise ValueError(
                f"HTTEmbedding: factors {self.vocab_factors} x {self.dim_factors} do not cover "
                f"vocab_size={vocab_size} (prod >= V) and d_model={d_model} (prod == D)")
        self.tt_ranks = (1,) + (rank,) * (num_cores - 1) + (1,)
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(v, self.tt_ranks[k], d, self.tt_ranks[k + 1]))
            for k, (v, d) in enumerate(zip(self.vocab_factors, self.dim_factors)))
        self.init_std = init_std
        self.conversion_error: float | None = None  # set by from_embedding (TT-SVD)
        # Optional id permutation (`set_id_permutation`): id_map[id] = the TT row holding token id.
        # None (the default) is the identity and is not saved in the state dict.
        self.register_buffer("id_map", None)
        self.reset_parameters()

    @classmethod
    def from_embedding(cls, weight: torch.Tensor, rank: int = 16, num_cores: int = 2, *,
                       vocab_factors: tuple[int, ...] | None = None,
                       dim_factors: tuple[int, ...] | None = None) -> HTTEmbedding:
        """TT-SVD of an existing table `weight` `[V, D]` (e.g. a pretrained nn.Embedding's weight).

        Each inner rank is `rank` or less where the unfolding is smaller. Sets `tt_ranks` to the
        ranks used and `conversion_error` to ||W - E||_F / ||W||_F over the V real rows; the cores
        take weight's dtype and device.
        """
        if weight.ndim != 2:
            raise ValueError(f"HTTEmbedding.from_embedding: weight must be [V, D], got {tuple(weight.shape)}")
        vocab_size, d_model = weight.shape
        emb = cls(vocab_size, d_model, rank, num_cores, vocab_factors=vocab_factors, dim_factors=dim_factors)
        cores, ranks, error = tt_svd(weight, emb.vocab_factors, emb.dim_factors, rank)
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.get_default_dtype()
        emb.cores = nn.ParameterList(nn.Parameter(c.to(device=weight.device, dtype=dtype)) for c in cores)
        emb.tt_ranks = ranks
        emb.conversion_error = error
        return emb

    def set_id_permutation(self, permutation: torch.Tensor | None) -> None:
        """Serve token ids through a permutation of the TT rows (`muse_lm.convert` reorders rows).

        Row order matters to a tensor train (rows that share a leading digit share a core slice),
        so a table may be factorized in another order. With `permutation[new] = old` (the TT row
        `new` holds token `old`), lookup, loss, logits and `dense_weight` all speak original ids:
        the module stores `id_map = argsort(permutation)` (old id -> TT row) and maps ids, targets
        and logit columns through it. `None` restores the identity.

        Args:
            permutation: `[V]` int64, a permutation of 0..V-1, or None.
        """
        if permutation is None:
            self.id_map = None
            return
        permutation = torch.as_tensor(permutation)
        expected = torch.arange(self.vocab_size, device=permutation.device)
        if (permutation.shape != (self.vocab_size,) or permutation.dtype.is_floating_point
                or not torch.equal(permutation.sort().values.long(), expected)):
            raise ValueError(f"HTTEmbedding.set_id_permutation: need a permutation of 0..{self.vocab_size - 1} "
                             f"(shape [{self.vocab_size}], integer), got shape {tuple(permutation.shape)}, "
                             f"dtype {permutation.dtype}")
        self.id_map = torch.argsort(permutation.long()).to(self.cores[0].device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A saved permuted module carries `id_map`; adopt it even if this one was built without,
        # so the usual `HTTEmbedding(...).load_state_dict(saved)` round trip works.
        key = prefix + "id_map"
        if key in state_dict and self.id_map is None:
            self.id_map = torch.empty_like(state_dict[key], device=self.cores[0].device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _map_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return ids if self.id_map is None else self.id_map[ids]

    def reset_parameters(self) -> None:
        # An entry is a sum over prod(inner ranks) products of K independent core entries, so its
        # variance is prod(sigma_k^2) * prod(r): pick equal sigma_k that give init_std overall.
        inner = math.prod(self.tt_ranks[1:-1])
        sigma = (self.init_std**2 / inner) ** (1.0 / (2 * len(self.cores)))
        for core in self.cores:
            nn.init.normal_(core, std=sigma)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] int64 -> [..., D]."""
        return tt_embedding(self._map_ids(ids), list(self.cores))

    def loss(self, h: torch.Tensor, targets: torch.Tensor, **kwargs) -> torch.Tensor:
        """Fused tied-head cross-entropy. h [..., D], targets [...]."""
        if self.id_map is not None:
            # Only real ids are mapped: ignore_index (and any bad id) reaches the op unchanged.
            real = (targets >= 0) & (targets < self.vocab_size)
            targets = torch.where(real, self.id_map[targets.clamp(0, self.vocab_size - 1)], targets)
        return tt_linear_cross_entropy(h, list(self.cores), targets, vocab_size=self.vocab_size, **kwargs)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., D] -> [..., V], computed block by block from the cores."""
        out = tt_logits(h, list(self.cores), vocab_size=self.vocab_size)
        return out if self.id_map is None else out[..., self.id_map]

    def dense_weight(self) -> torch.Tensor:
        """The full [V, D] table (tests, conversion); the model itself never calls this."""
        table = tt_reconstruct(list(self.cores), 0, self.vocab_size)
        return table if self.id_map is None else table[self.id_map]

    def num_parameters(self) -> int:
        return sum(c.numel() for c in self.cores)

    def extra_repr(self) -> str:
        return (f"vocab_size={self.vocab_size}, d_model={self.d_model}, v={self.vocab_factors}, "
                f"d={self.dim_factors}, ranks={self.tt_ranks}, params={self.num_parameters():,} "
                f"(dense {self.vocab_size * self.d_model:,})")


class HolographicTTEmbedding(HTTEmbedding):
    """The prior art's name, kept as an alias. Its "holographic" bond phase is not a parameter:
    a constant phase folds into a core, so it adds no expressiveness (docs/htt.md)."""

    def __init__(self, vocab_size: int, d_model: int, rank: int = 16, num_cores: int = 2, **kwargs):
        super().__init__(vocab_size, d_model, rank, num_cores, **kwargs)


class DenseTiedEmbedding(nn.Module):
    """An ordinary [V, D] table tied to the head (the baseline HTT is compared with)."""

    def __init__(self, vocab_size: int, d_model: int, *, init_std: float = 0.02):
        super().__init__()
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.weight = nn.Parameter(torch.empty(vocab_size, d_model))
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.init_std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.weight)

    def loss(self, h: torch.Tensor, targets: torch.Tensor, **kwargs) -> torch.Tensor:
        return linear_cross_entropy(h, self.weight, targets, **kwargs)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.weight.to(h.dtype).T

    def dense_weight(self) -> torch.Tensor:
        return self.weight

    def num_parameters(self) -> int:
        return self.weight.numel()
