import math

import pytest
import torch

from muse_lm.layers import HolographicTTEmbedding, HTTEmbedding
from muse_lm.layers.htt import factorize_dim, factorize_vocab


@pytest.mark.parametrize("V,K", [(50257, 2), (4096, 2), (32768, 3), (7, 2), (1000, 3)])
def test_vocab_factorization_covers_vocab(V, K):
    f = factorize_vocab(V, K)
    assert len(f) == K and math.prod(f) >= V and math.prod(f) < V * 1.1 + 10


@pytest.mark.parametrize("D,K,expect", [(1024, 2, (32, 32)), (768, 2, (24, 32)), (128, 3, (4, 4, 8)), (13, 2, (1, 13))])
def test_dim_factorization_is_exact(D, K, expect):
    assert factorize_dim(D, K) == expect


@pytest.mark.parametrize("K", [2, 3])
def test_lookup_equals_reconstructed_dense_table(K):
    torch.manual_seed(0)
    emb = HTTEmbedding(101, 24, rank=4, num_cores=K).double()
    table = emb.dense_weight()
    assert table.shape == (101, 24)
    ids = torch.randint(0, 101, (3, 7))
    torch.testing.assert_close(emb(ids), table[ids])


def test_init_gives_the_target_row_std_and_few_parameters():
    torch.manual_seed(0)
    emb = HTTEmbedding(32768, 1024, rank=16, init_std=0.02)
    std = emb.dense_weight()[:2048].std().item()
    assert 0.015 < std < 0.025
    assert emb.num_parameters() < 0.01 * 32768 * 1024


def test_tied_head_loss_equals_cross_entropy_on_dense_logits():
    torch.manual_seed(0)
    emb = HTTEmbedding(50, 12, rank=3).double()
    h = torch.randn(4, 5, 12, dtype=torch.float64)
    tgt = torch.randint(0, 50, (4, 5))
    ref = torch.nn.functional.cross_entropy((h @ emb.dense_weight().T).reshape(-1, 50), tgt.reshape(-1))
    torch.testing.assert_close(emb.loss(h, tgt), ref)
    torch.testing.assert_close(emb.logits(h), h @ emb.dense_weight().T)


def test_holographic_alias_signature():
    emb = HolographicTTEmbedding(1000, 64, 8)
    assert isinstance(emb, HTTEmbedding) and emb.tt_ranks == (1, 8, 1)
    assert emb(torch.tensor([0, 999])).shape == (2, 64)
