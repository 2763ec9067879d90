"""TT-SVD conversion of a dense table: exact recovery of TT tables, error vs rank, rank capping."""

import math

import pytest
import torch

from muse_lm.layers import HTTEmbedding
from muse_lm.layers.tt_svd import tt_svd
from muse_lm.ops import tt_reconstruct


def _random_tt_table(vocab, v, d, ranks, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cores = [torch.randn(vk, ranks[k], dk, ranks[k + 1], generator=gen, dtype=torch.float64)
             for k, (vk, dk) in enumerate(zip(v, d))]
    return tt_reconstruct(cores, 0, vocab)


@pytest.mark.parametrize("v,d,ranks,vocab", [((9, 8), (4, 6), (1, 5, 1), 72), ((5, 4, 3), (2, 3, 4), (1, 3, 4, 1), 60)])
def test_table_that_is_a_tt_is_recovered_exactly(v, d, ranks, vocab):
    # vocab == prod(v): zero-padding rows of a TT table is generally not a TT of the same rank.
    table = _random_tt_table(vocab, v, d, ranks)
    emb = HTTEmbedding.from_embedding(table, rank=max(ranks) + 2, num_cores=len(v), vocab_factors=v, dim_factors=d)
    assert emb.conversion_error < 1e-6
    torch.testing.assert_close(emb.dense_weight(), table, rtol=1e-8, atol=1e-8)
    # The real ranks of this table are the ones it was built with (a generic draw attains them).
    assert emb.tt_ranks == tuple(ranks)


@pytest.mark.parametrize("K", [2, 3])
def test_error_decreases_with_rank_and_matches_dense_difference(K):
    torch.manual_seed(0)
    table = torch.randn(100, 24, dtype=torch.float64)
    errors = []
    for rank in (1, 2, 4, 8, 16):
        emb = HTTEmbedding.from_embedding(table, rank=rank, num_cores=K)
        direct = (torch.linalg.norm(emb.dense_weight() - table) / torch.linalg.norm(table)).item()
        assert emb.conversion_error == pytest.approx(direct, rel=1e-9)
        errors.append(emb.conversion_error)
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert 0 < errors[-1] < errors[0] < 1


@pytest.mark.parametrize("K", [2, 3])
def test_rank_is_capped_by_the_unfoldings(K):
    torch.manual_seed(0)
    table = torch.randn(30, 8, dtype=torch.float64)
    emb = HTTEmbedding.from_embedding(table, rank=1000, num_cores=K)
    modes = [v * d for v, d in zip(emb.vocab_factors, emb.dim_factors)]
    for k in range(1, K):
        assert emb.tt_ranks[k] <= min(math.prod(modes[:k]), math.prod(modes[k:]))
        assert emb.cores[k - 1].shape[3] == emb.tt_ranks[k] == emb.cores[k].shape[1]
    assert emb.tt_ranks[0] == emb.tt_ranks[-1] == 1
    # Full rank reproduces the table (padding rows are zeros, so they cost nothing).
    assert emb.conversion_error < 1e-10


@pytest.mark.parametrize("K", [2, 3])
def test_converted_lookup_equals_reconstructed_table(K):
    torch.manual_seed(1)
    table = torch.randn(57, 12)
    emb = HTTEmbedding.from_embedding(table, rank=3, num_cores=K)
    assert emb.cores[0].dtype == torch.float32
    dense = emb.dense_weight()
    ids = torch.randint(0, 57, (4, 9))
    torch.testing.assert_close(emb(ids), dense[ids])
    assert emb.num_parameters() == sum(c.numel() for c in emb.cores)


def test_cores_are_balanced_and_bad_input_raises():
    table = torch.randn(40, 16, dtype=torch.float64)
    cores, ranks, _ = tt_svd(table, (7, 6), (4, 4), rank=4)
    norms = [torch.linalg.norm(c).item() for c in cores]
    assert norms[0] == pytest.approx(norms[1], rel=1e-9)
    with pytest.raises(ValueError, match="does not fit"):
        tt_svd(table, (5, 6), (4, 4), rank=4)
    with pytest.raises(ValueError, match="rank"):
        tt_svd(table, (7, 6), (4, 4), rank=0)
    with pytest.raises(ValueError, match="must be"):
        HTTEmbedding.from_embedding(table[0], rank=2)
