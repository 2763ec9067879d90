"""The chunked TT head (table rebuilt per vocab chunk, dense fused kernels) vs the torch reference and
an fp64 naive definition, through Triton's interpreter, fp32: K = 2 and 3 cores, several chunks,
padding rows, ignored tokens, z-loss, each reduction, every dense config. Run in a TRITON_INTERPRET=1
child process (`test_interpreter_suite`), like the other kernel tests."""

import math

import pytest
import torch
from test_tt_head_triton import IGNORE, _naive_fp64  # the fp64 definition, shared with the fused head's tests

from muse_lm.ops._dispatch import interpreter_enabled
from muse_lm.ops.tt_cross_entropy.reference import tt_linear_cross_entropy_ref

pytest.importorskip("triton")

interp = pytest.mark.skipif(not interpreter_enabled(), reason="runs in the TRITON_INTERPRET=1 child process")


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _cores(vocab_factors, width_factors, rank, seed):
    gen = torch.Generator().manual_seed(seed)
    ranks = [1] + [rank] * (len(vocab_factors) - 1) + [1]
    return [(0.7 * torch.randn(v, ranks[k], d, ranks[k + 1], generator=gen)).requires_grad_()
            for k, (v, d) in enumerate(zip(vocab_factors, width_factors))]


def _problem(vocab_factors, width_factors, rank, vocab, n, seed):
    gen = torch.Generator().manual_seed(seed + 1)
    cores = _cores(vocab_factors, width_factors, rank, seed)
    h = torch.randn(n, torch.Size(width_factors).numel(), generator=gen).requires_grad_()
    t = torch.randint(0, vocab, (n,), generator=gen)
    t[1::4] = IGNORE
    t[0] = vocab - 1  # the last real row is a target
    return h, cores, t


def _check(h, cores, t, vocab, reduction, z_loss, cfg=None, chunk_elements=None):
    from muse_lm.ops.tt_cross_entropy.triton_tt_chunked import tt_linear_cross_entropy_chunked

    kw = dict(vocab_size=vocab, ignore_index=IGNORE, reduction=reduction, z_loss=z_loss)
    got = tt_linear_cross_entropy_chunked(h, cores, t, **kw, config=cfg,
                                          chunk_elements=chunk_elements)
    ref = tt_linear_cross_entropy_ref(h, cores, t, **kw)
    naive = _naive_fp64(h, cores, t, vocab, reduction, z_loss)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7))
    params = [h, *cores]
    got_g = torch.autograd.grad(got, params, grad)
    ref_g = torch.autograd.grad(ref, params, grad)
    naive_g = torch.autograd.grad(naive, params, grad.double())
    where = f"{cfg} {reduction} z={z_loss} chunk={chunk_elements}"
    assert _rel(got, ref) <= 1e-5 and _rel(got, naive) <= 1e-5, where
    for k, (a, b, c) in enumerate(zip(got_g, ref_g, naive_g)):
        assert a.dtype == torch.float32 and a.shape == b.shape, (k, where)
        assert _rel(a, b) <= 1e-5 and _rel(a, c) <= 1e-5, (k, where, _rel(a, b), _rel(a, c))


@pytest.mark.skipif(interpreter_enabled(), reason="this is the parent of the interpreter run")
def test_interpreter_suite(interpreter_run):
    interpreter_run(__file__)


def test_chunks_cover_the_vocab_in_whole_tiles_and_never_the_whole_table():
    from muse_lm.ops.tt_cross_entropy.triton_tt_chunked import chunk_bounds

    for vocab, width, block_v, elements in [(50257, 1024, 256, 1 << 22), (300, 8, 16, 1 << 22), (40, 8, 64, 64),
                                            (33, 4, 16, 64)]:
        chunks = chunk_bounds(vocab, width, block_v, elements)
        assert chunks[0][0] == 0 and chunks[-1][1] == vocab
        assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
        assert all((stop - start) % block_v == 0 for start, stop in chunks[:-1])
        if vocab > block_v:
            assert len(chunks) >= 2, (vocab, chunks)
    assert chunk_bounds(50257, 1024, 256, 1 << 22) == [(s, min(s + 4096, 50257)) for s in range(0, 50257, 4096)]


def test_backward_chunks_are_whole_last_core_blocks():
    from muse_lm.ops.tt_cross_entropy.triton_tt_chunked import BACKWARD_CHUNK_ELEMENTS, chunk_bounds

    for vocab, width, v_last, elements in [(50257, 1024, 224, 6 << 20), (83, 12, 10, 32 * 12), (40, 8, 64, 64),
                                           (300, 8, 7, 8)]:
        chunks = chunk_bounds(vocab, width, v_last, elements)
        assert chunks[0][0] == 0 and chunks[-1][1] == vocab
        assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
        assert all(start % v_last == 0 for start, _ in chunks)
        if vocab > v_last:
            assert len(chunks) >= 2, (vocab, chunks)
        rows = max(stop - start for start, stop in chunks)
        assert rows <= v_last or rows * width <= elements, (vocab, chunks)  # the budget, unless one block exceeds it
        assert vocab <= v_last or rows <= math.ceil(vocab / 2 / v_last) * v_last  # at most half the vocab, in blocks
    # 6144 rows fit the budget: 27 blocks of 224 (6048 rows); a block wider than the budget is one chunk.
    assert chunk_bounds(50257, 1024, 224, BACKWARD_CHUNK_ELEMENTS)[:2] == [(0, 6048), (6048, 12096)]
    assert chunk_bounds(300, 8, 7, 8)[:2] == [(0, 7), (7, 14)]


def test_chunk_core_grads_stay_fp32_under_autocast():
    """The two GEMMs of a chunk's core gradients against fp64 autograd through the rebuild, inside a
    bf16 autocast region (a backward run under autocast must not round them to bf16)."""
    from muse_lm.ops.tt_cross_entropy.triton_tt_chunked import _chunk_core_grads
    from muse_lm.ops.tt_embedding.reference import tt_reconstruct_ref

    for factors, widths in (((9, 10), (3, 4)), ((3, 5, 4), (2, 3, 2))):
        cores = _cores(factors, widths, 3, seed=4)
        start, stop = factors[-1], 3 * factors[-1]
        d_rows = torch.randn(stop - start, torch.Size(widths).numel(), generator=torch.Generator().manual_seed(4))
        exact = [c.detach().double().requires_grad_() for c in cores]
        want = torch.autograd.grad(tt_reconstruct_ref(exact, start, stop), exact, d_rows.double())
        masters = [c.detach().float().requires_grad_() for c in cores]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = _chunk_core_grads(masters, start, stop, d_rows)
        for g, w in zip(got, want):
            assert g.dtype == torch.float32 and g.shape == w.shape
            assert _rel(g, w) <= 1e-6, _rel(g, w)


@interp
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_two_cores_several_chunks_each_reduction(reduction):
    from muse_lm.ops.tt_cross_entropy.triton_dense import LCEConfig
    from muse_lm.ops.tt_cross_entropy.triton_tt_chunked import chunk_bounds

    # vocab 83 of 9 x 10 rows (7 padding rows); 16-row tiles and 32-row chunks -> 3 chunks.
    cfg = LCEConfig(block_m=16, block_v=16, block_k=16, num_warps=4, num_stages=2)
    assert len(chunk_bounds(83, 12, 16, 32 * 12)) == 3
    h, cores, t = _problem((9, 10), (3, 4), 3, 83, n=13, seed=1)
    _check(h, cores, t, 83, reduction, 0.05, cfg=cfg, chunk_elements=32 * 12)


@interp
def test_three_cores_and_every_dense_config():
    from muse_lm.ops.tt_cross_entropy.triton_dense import CONFIGS, LCEConfig

    h, cores, t = _problem((3, 5, 4), (2, 3, 2), 2, 57, n=9, seed=2)
    for cfg in CONFIGS:  # one chunk each (57 rows < every declared tile)
        _check(h, cores, t, 57, "mean", 0.0, cfg=cfg)
    small = LCEConfig(block_m=16, block_v=16, block_k=16, num_warps=4, num_stages=2)
    _check(h, cores, t, 57, "none", 0.02, cfg=small, chunk_elements=16 * 12)  # 4 chunks, 3 cores


@interp
def test_single_token_frozen_cores_and_empty_batch():
    from muse_lm.ops.tt_cross_entropy.triton_tt_chunked import tt_linear_cross_entropy_chunked

    h, cores, t = _problem((7, 5), (3, 5), 3, 31, n=1, seed=3)
    _check(h, cores, t, 31, "sum", 0.1)
    kw = dict(vocab_size=31, ignore_index=IGNORE, reduction="sum", z_loss=0.0)
    frozen = [c.detach() for c in cores]
    (got,) = torch.autograd.grad(tt_linear_cross_entropy_chunked(h, frozen, t, **kw), [h])
    (ref,) = torch.autograd.grad(tt_linear_cross_entropy_ref(h, frozen, t, **kw), [h])
    assert _rel(got, ref) <= 1e-5
    empty = tt_linear_cross_entropy_chunked(h[:0], cores, t[:0], **kw)
    assert empty.shape == () and float(empty.detach()) == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in torch.autograd.grad(empty, [h, *cores]))


@interp
def test_a_target_past_the_chunk_never_picks_a_padding_block():
    """The forward's last vocab split can end in blocks wholly past V (their logits are -inf); a
    target shifted there (it belongs to a later chunk) must add nothing, not -inf (that made every
    training loss inf on the GPU before the kernel masked the pick with the column bound)."""
    from muse_lm.ops.tt_cross_entropy.triton_dense import LCEConfig, lce_forward_partials

    cfg = LCEConfig(block_m=16, block_v=16, block_k=16, num_warps=4, num_stages=2)
    gen = torch.Generator().manual_seed(0)
    h, w = torch.randn(5, 16, generator=gen), torch.randn(48, 16, generator=gen)  # 3 tiles of 16 rows
    t = torch.tensor([3, 50, 60, 63, 47])  # 50..63 lie in the 4th tile: past V = 48, inside split 2's range
    m, s, tgt = lce_forward_partials(h, w, t, cfg, split_v=2)  # 2 tiles per split: split 1 = tiles 2 and 3
    assert m.shape[0] == 2 and torch.isfinite(tgt).all()
    logits = h @ w.T
    assert tgt.sum(0)[1:4].abs().max() == 0
    assert torch.allclose(tgt.sum(0)[[0, 4]], logits[[0, 4], [3, 47]], atol=1e-5)
