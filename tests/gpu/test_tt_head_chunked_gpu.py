"""The chunked TT head (the public `tt_linear_cross_entropy` on CUDA) on a real GPU vs the fp64
reference: K = 2 and 3, fp32 and bf16, N = 1 and odd N, several chunks, padding rows past
vocab_size, every reduction, torch.empty NaN-poisoned first, loss and every gradient; every dense
config, and the configs a 99 KB card keeps; the realistic shape (V 50257, D 1024) in bf16 with the
peak extra memory under the dense head's model. The fp64 side is the blocked reference on fp64
inputs (the CPU tests check it against the materialized-logits definition). Skipped without CUDA."""

import pytest
import torch

from muse_lm.ops.tt_cross_entropy.reference import tt_linear_cross_entropy_ref

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.usefixtures("nan_empty")]

IGNORE = -100
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _problem(vocab_factors, width_factors, rank, vocab, n, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    ranks = [1] + [rank] * (len(vocab_factors) - 1) + [1]
    # Scales give logits of O(1..10): a realistic softmax, neither flat nor one-hot.
    cores = [(torch.randn(v, ranks[k], d, ranks[k + 1], device="cuda", generator=gen) / (rank**0.25 * d**0.25))
             .to(dtype).requires_grad_() for k, (v, d) in enumerate(zip(vocab_factors, width_factors))]
    width = torch.Size(width_factors).numel()
    h = (torch.randn(n, width, device="cuda", generator=gen) * width**-0.25).to(dtype).requires_grad_()
    t = torch.randint(0, vocab, (n,), device="cuda", generator=gen)
    t[0] = vocab - 1
    if n > 2:
        t[1::7] = IGNORE
    return h, cores, t


def _check(problem, dtype, n, reduction="mean", z_loss=1e-3, config=None, chunk_elements=None, seed=0):
    from muse_lm.ops.tt_cross_entropy.triton_tt_chunked import tt_linear_cross_entropy_chunked

    vf, wf, rank, vocab = problem
    h, cores, t = _problem(vf, wf, rank, vocab, n, dtype, seed)
    kw = dict(vocab_size=vocab, ignore_index=IGNORE, reduction=reduction, z_loss=z_loss)
    got = tt_linear_cross_entropy_chunked(h, cores, t, **kw, config=config,
                                          chunk_elements=chunk_elements)
    ref_in = [x.detach().double().requires_grad_() for x in (h, *cores)]
    naive = tt_linear_cross_entropy_ref(ref_in[0], ref_in[1:], t, **kw)
    grad = torch.randn(naive.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    got_g = torch.autograd.grad(got, [h, *cores], grad.to(got.dtype))
    ref_g = torch.autograd.grad(naive, ref_in, grad.double())
    where = f"{problem} {dtype} N={n} {reduction} {config} chunk={chunk_elements}"
    errs = [_rel(got, naive)] + [_rel(a, b) for a, b in zip(got_g, ref_g)]
    assert all(torch.isfinite(g).all() for g in got_g), where
    assert all(g.dtype == dtype for g in got_g), where
    assert max(errs) <= TOL[dtype], (where, errs)
    return errs


# (vocab factors, width factors, rank, vocab): two cores with padding, three cores, the realistic one.
SMALL2 = ((37, 45), (8, 12), 6, 1650)
SMALL3 = ((11, 13, 12), (4, 6, 4), 5, 1700)
REAL = ((197, 256), (32, 32), 16, 50257)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("problem", [SMALL2, SMALL3], ids=["K2", "K3"])
@pytest.mark.parametrize("n", [1, 777, 4099])
def test_matches_fp64_with_several_chunks(problem, n, dtype):
    reduction = ("mean", "sum", "none")[n % 3]
    _check(problem, dtype, n, reduction, chunk_elements=256 * 96)  # 256-row chunks -> 7 chunks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_usable_dense_config_and_99kb_cap(monkeypatch, dtype):
    from muse_lm.ops.tt_cross_entropy import triton_dense

    for cfg in triton_dense.usable_configs(torch.device("cuda"), dot_f32=dtype == torch.float32):
        _check(SMALL2, dtype, 333, "mean", config=cfg, chunk_elements=cfg.block_v * 96)
    monkeypatch.setattr(triton_dense, "_max_shared_mem", lambda index: 99 * 1024)
    capped = triton_dense.usable_configs(torch.device("cuda"), dot_f32=dtype == torch.float32)
    assert capped
    for cfg in capped:
        _check(SMALL3, dtype, 129, "sum", config=cfg)


def test_realistic_shape_bf16_and_its_memory():
    """V 50257, D 1024, N 4099 bf16 through the public op under autocast-free bf16 inputs; the
    extra memory of fwd+bwd stays below dh's fp32 accumulators + a backward chunk's two fp32 buffers."""
    from muse_lm.ops import tt_linear_cross_entropy
    from muse_lm.ops.tt_cross_entropy.triton_tt_chunked import BACKWARD_CHUNK_ELEMENTS

    vf, wf, rank, vocab = REAL
    h, cores, t = _problem(vf, wf, rank, vocab, 4099, torch.bfloat16, seed=5)
    _check(REAL, torch.bfloat16, 4099, "mean")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = tt_linear_cross_entropy(h, cores, t, vocab_size=vocab, impl="triton")
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # The backward's chunk: fp32 dE and its regrouped copy; the forward's 16-bit chunk is smaller.
    chunk_bytes = 2 * BACKWARD_CHUNK_ELEMENTS * 4
    assert extra <= 4099 * 1024 * 4 + chunk_bytes + sum(c.numel() * 8 for c in cores) + (24 << 20), extra
