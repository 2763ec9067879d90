"""The fused TT head + cross-entropy kernels vs the torch reference and an fp64 naive definition,
through Triton's interpreter, in fp32, for every declared config.

Triton reads TRITON_INTERPRET when its kernels are defined, so the interpreter tests run in a
child pytest process started with TRITON_INTERPRET=1 (`test_interpreter_suite`); in this process
they are skipped.
"""


import pytest
import torch
import torch.nn.functional as F

from muse_lm.ops._dispatch import interpreter_enabled
from muse_lm.ops.tt_cross_entropy.reference import tt_linear_cross_entropy_ref
from muse_lm.ops.tt_embedding import tt_reconstruct

pytest.importorskip("triton")

interp = pytest.mark.skipif(not interpreter_enabled(), reason="runs in the TRITON_INTERPRET=1 child process")

IGNORE = -100
# (V1, V2, D1, D2, R, vocab_size): odd sizes, rank 1, size-1 factors, padding rows past vocab_size
# (the second leaves a whole i row and most of another out).
SHAPES = [(7, 5, 3, 5, 3, 31), (5, 9, 1, 4, 1, 33), (3, 17, 2, 3, 5, 51)]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _problem(shape, n, seed, n_ignored=1):
    v1, v2, d1, d2, r, vocab = shape
    gen = torch.Generator().manual_seed(seed)
    g1 = (0.7 * torch.randn(v1, 1, d1, r, generator=gen)).requires_grad_()
    g2 = (0.7 * torch.randn(v2, r, d2, 1, generator=gen)).requires_grad_()
    h = torch.randn(n, d1 * d2, generator=gen).requires_grad_()
    t = torch.randint(0, vocab, (n,), generator=gen)
    t[torch.randperm(n, generator=gen)[: min(n_ignored, n - 1)]] = IGNORE
    t[0] = vocab - 1  # the last real row is a target at least once
    return h, [g1, g2], t


def _naive_fp64(h, cores, t, vocab, reduction, z_loss):
    """F.cross_entropy on materialized fp64 logits, plus z_loss * lse**2 (the op's definition)."""
    table = tt_reconstruct([c.double() for c in cores])[:vocab]
    logits = h.double() @ table.T
    ce = F.cross_entropy(logits, t, ignore_index=IGNORE, reduction="none")
    valid = t != IGNORE
    per = torch.where(valid, ce + z_loss * torch.logsumexp(logits, -1).square(), torch.zeros_like(ce))
    if reduction == "none":
        return per
    return per.sum() if reduction == "sum" else per.sum() / valid.sum().clamp_min(1)


def _check_all(h, cores, t, vocab, reduction, z_loss, cfg, deterministic=False, seed=0):
    from muse_lm.ops.tt_cross_entropy.triton_tt import tt_linear_cross_entropy_triton

    kw = dict(vocab_size=vocab, ignore_index=IGNORE, reduction=reduction, z_loss=z_loss)
    got = tt_linear_cross_entropy_triton(h, cores, t, **kw, config=cfg, deterministic=deterministic)
    ref = tt_linear_cross_entropy_ref(h, cores, t, **kw)
    naive = _naive_fp64(h, cores, t, vocab, reduction, z_loss)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed))
    params = [h, *cores]
    got_g = torch.autograd.grad(got, params, grad)
    ref_g = torch.autograd.grad(ref, params, grad)
    naive_g = torch.autograd.grad(naive, params, grad.double())
    where = f"{cfg} {reduction} z={z_loss} det={deterministic} N={h.shape[0]}"
    if naive.abs().max() == 0:  # every token ignored: exact zeros
        assert torch.count_nonzero(got) == 0 and all(torch.count_nonzero(g) == 0 for g in got_g), where
        return
    assert _rel(got, ref) <= 1e-5 and _rel(got, naive) <= 1e-5, where
    for name, a, b, c in zip(("h", "G1", "G2"), got_g, ref_g, naive_g):
        assert a.dtype == torch.float32 and a.shape == b.shape, (name, where)
        assert _rel(a, b) <= 1e-5 and _rel(a, c) <= 1e-5, (name, where, _rel(a, b), _rel(a, c))


@pytest.mark.skipif(interpreter_enabled(), reason="this is the parent of the interpreter run")
def test_interpreter_suite(interpreter_run):
    interpreter_run(__file__)


@interp
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "V{}x{}-D{}x{}-R{}-vocab{}".format(*s))
def test_every_config_matches_reference_and_fp64_naive(shape):
    from muse_lm.ops.tt_cross_entropy.triton_tt import CONFIGS

    h, cores, t = _problem(shape, n=7, seed=sum(shape))
    for k, cfg in enumerate(CONFIGS):
        # Every config sees every reduction across the shapes; z-loss on every other call.
        reduction = ("mean", "sum", "none")[(k + SHAPES.index(shape)) % 3]
        _check_all(h, cores, t, shape[-1], reduction, 0.05 * (k % 2), cfg, seed=k)


@interp
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_single_token_each_reduction_with_z_loss(reduction):
    from muse_lm.ops.tt_cross_entropy.triton_tt import CONFIGS

    h, cores, t = _problem(SHAPES[0], n=1, seed=3)
    _check_all(h, cores, t, SHAPES[0][-1], reduction, 0.1, CONFIGS[1])


@interp
def test_deterministic_mode_matches_and_repeats_bitwise():
    from muse_lm.ops.tt_cross_entropy.triton_tt import CONFIGS, tt_linear_cross_entropy_triton

    shape = SHAPES[2]
    h, cores, t = _problem(shape, n=9, seed=11, n_ignored=3)
    _check_all(h, cores, t, shape[-1], "mean", 0.02, CONFIGS[2], deterministic=True)
    kw = dict(vocab_size=shape[-1], ignore_index=IGNORE, reduction="sum", z_loss=0.0, deterministic=True)
    runs = [
        torch.autograd.grad(tt_linear_cross_entropy_triton(h, cores, t, **kw, config=CONFIGS[2]), [h, *cores])
        for _ in range(2)
    ]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@interp
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_zero_grads(reduction):
    from muse_lm.ops.tt_cross_entropy.triton_tt import CONFIGS

    h, cores, t = _problem(SHAPES[1], n=3, seed=5)
    t[:] = IGNORE
    _check_all(h, cores, t, SHAPES[1][-1], reduction, 0.1, CONFIGS[2])


@interp
def test_more_tokens_than_one_split_and_grads_of_h_only():
    """N spans several token blocks and dG2 splits; cores without requires_grad are fine."""
    from muse_lm.ops.tt_cross_entropy.triton_tt import CONFIGS, tt_linear_cross_entropy_triton

    shape = SHAPES[0]
    h, cores, t = _problem(shape, n=37, seed=2, n_ignored=5)
    _check_all(h, cores, t, shape[-1], "mean", 0.0, CONFIGS[0])
    frozen = [c.detach() for c in cores]
    kw = dict(vocab_size=shape[-1], ignore_index=IGNORE, reduction="sum", z_loss=0.0)
    (got,) = torch.autograd.grad(tt_linear_cross_entropy_triton(h, frozen, t, **kw, config=CONFIGS[0]), [h])
    (ref,) = torch.autograd.grad(tt_linear_cross_entropy_ref(h, frozen, t, **kw), [h])
    assert _rel(got, ref) <= 1e-5


@interp
def test_empty_batch_and_three_cores():
    from muse_lm.ops.tt_cross_entropy.triton_tt import tt_linear_cross_entropy_triton

    h, cores, t = _problem(SHAPES[0], n=2, seed=4)
    kw = dict(vocab_size=SHAPES[0][-1], ignore_index=IGNORE, z_loss=0.0)
    empty = tt_linear_cross_entropy_triton(h[:0], cores, t[:0], reduction="mean", **kw)
    assert empty.shape == () and float(empty) == 0.0
    grads = torch.autograd.grad(empty, [h, *cores])
    assert all(torch.count_nonzero(g) == 0 for g in grads)
    assert tt_linear_cross_entropy_triton(h[:0], cores, t[:0], reduction="none", **kw).shape == (0,)
    three = [torch.randn(3, 1, 2, 2), torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 1)]
    with pytest.raises(ValueError, match="K = 2"):
        tt_linear_cross_entropy_triton(torch.randn(2, 8), three, torch.tensor([0, 1]), reduction="mean", **kw)


def test_config_validation_and_shared_memory_pruning():
    from muse_lm.ops.tt_cross_entropy.triton_tt import CONFIGS, TTHeadConfig, smem_estimate, usable_configs

    with pytest.raises(ValueError, match="power of two"):
        TTHeadConfig(3, 16, 64, 1, 4, 2, 32, 8)
    with pytest.raises(ValueError, match=">= 16"):
        TTHeadConfig(1, 8, 64, 1, 4, 2, 32, 8)
    with pytest.raises(ValueError, match="num_warps"):
        TTHeadConfig(2, 16, 64, 1, 3, 2, 32, 8)
    sizes = [smem_estimate(c, 32, 32, 256) for c in CONFIGS]
    assert all(s > 0 for s in sizes)
    # A 99 KB card (RTX 3090/4090) keeps at least one config; an H100 (227 KB) keeps them all.
    small = usable_configs(torch.device("cuda", 0), 32, 32, 256, smem_limit=99 * 1024)
    assert small and all(smem_estimate(c, 32, 32, 256) <= 99 * 1024 for c in small)
    assert usable_configs(torch.device("cuda", 0), 32, 32, 256, smem_limit=227 * 1024) == list(CONFIGS)
    with pytest.raises(RuntimeError, match="no declared config"):
        usable_configs(torch.device("cuda", 0), 32, 32, 256, smem_limit=1024)

