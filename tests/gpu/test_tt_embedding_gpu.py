"""The fused TT lookup on a real GPU vs the fp64 reference: every config, K = 2 and 3, fp32 and
bf16, odd N and N = 1, outputs poisoned with NaN first, core gradients. Skipped without CUDA."""

import pytest
import torch

from muse_lm.ops import tt_embedding

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# (vocab factors, dim factors, inner ranks): odd sizes, the benchmark's shape, K = 3.
SHAPES = [
    ((7, 5), (3, 5), (4,)),
    ((225, 224), (32, 32), (16,)),
    ((11, 9, 13), (4, 6, 5), (3, 5)),
    ((37, 37, 37), (8, 8, 16), (16, 16)),
]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"v{s[0]}d{s[1]}r{s[2]}")
@pytest.mark.parametrize("n", [1, 777, 4099])
def test_every_config_matches_fp64_reference(shape, dtype, n):
    from muse_lm.ops.tt_embedding import triton as tt_triton

    v, d, r = shape
    ranks = (1, *r, 1)
    gen = torch.Generator(device="cuda").manual_seed(n)
    cores = [
        (torch.randn(v[k], ranks[k], d[k], ranks[k + 1], device="cuda", generator=gen) * 0.5).to(dtype)
        for k in range(len(v))
    ]
    rows = torch.tensor(v).prod().item()
    ids = torch.randint(0, rows, (n,), device="cuda", generator=gen)
    ref_cores = [c.detach().double().requires_grad_() for c in cores]
    ref = tt_embedding(ids, ref_cores, impl="torch")
    grad = torch.randn(ref.shape, device="cuda", generator=gen, dtype=torch.float64).to(dtype)
    ref_grads = torch.autograd.grad(ref, ref_cores, grad.double())
    for cfg in tt_triton.CONFIGS:
        poison = torch.full((n, ref.shape[1]), float("nan"), device="cuda", dtype=dtype)
        out = tt_triton.tt_lookup_forward(ids, cores, cfg, out=poison)
        assert torch.isfinite(out).all(), cfg
        assert _rel(out, ref) < TOL[dtype], cfg
        for method in ("sorted", "atomic") if len(v) == 2 else ("atomic",):
            grads = tt_triton.tt_lookup_backward(ids, cores, grad, cfg, method=method)
            for got, want in zip(grads, ref_grads):
                assert got.dtype == dtype and torch.isfinite(got).all(), (cfg, method)
                assert _rel(got, want) < TOL[dtype] * (3 if dtype == torch.bfloat16 else 10), (cfg, method)
            if method == "sorted":  # no atomics: bitwise reproducible
                again = tt_triton.tt_lookup_backward(ids, cores, grad, cfg, method=method)
                assert all(torch.equal(a, b) for a, b in zip(grads, again)), cfg
    if len(v) == 2:
        for seg_cfg in tt_triton.SEGMENT_CONFIGS:
            grads = tt_triton.tt_lookup_backward(ids, cores, grad, method="sorted", segment_config=seg_cfg)
            for got, want in zip(grads, ref_grads):
                assert got.dtype == dtype and torch.isfinite(got).all(), seg_cfg
                assert _rel(got, want) < TOL[dtype] * (3 if dtype == torch.bfloat16 else 10), seg_cfg


@pytest.mark.parametrize("K", [2, 3])
def test_default_dispatch_on_cuda_is_triton_and_trains(K):
    torch.manual_seed(0)
    v, d, r = SHAPES[0] if K == 2 else SHAPES[2]
    ranks = (1, *r, 1)
    cores = [torch.randn(v[k], ranks[k], d[k], ranks[k + 1], device="cuda", requires_grad=True) for k in range(K)]
    rows = torch.tensor(v).prod().item()
    ids = torch.randint(0, rows, (3, 41), device="cuda")
    out = tt_embedding(ids, cores)
    assert "TTEmbeddingTriton" in str(out.grad_fn.next_functions)
    ref = tt_embedding(ids, cores, impl="torch")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), cores)
    ref_grads = torch.autograd.grad(ref.square().sum(), cores)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("v1, v2, n, dist", [(225, 224, 32768, "uniform"), (225, 224, 1_000_003, "zipf"),
                                             (4096, 3, 77_777, "uniform"), (1, 2, 5, "uniform")])
def test_digit_sort_equals_torch_stable_sort(v1, v2, n, dist):
    """The counting sort at the benchmark's size, on a million Zipf-distributed ids (245 blocks of
    4096, past the 64 blocks of shorter inputs; a few digits hold most ids) and at the widest digit
    it takes, against torch.sort."""
    from muse_lm.ops.tt_embedding.digit_sort import sort_by_digits

    gen = torch.Generator(device="cuda").manual_seed(n)
    if dist == "zipf":
        weights = 1.0 / torch.arange(1, v1 * v2 + 1, device="cuda", dtype=torch.float32)
        ids = torch.multinomial(weights, n, replacement=True, generator=gen)
    else:
        ids = torch.randint(0, v1 * v2, (n,), device="cuda", generator=gen)
    order, starts = sort_by_digits(ids, v1, v2)
    for core, (digit, v) in enumerate(((ids // v2, v1), (ids % v2, v2))):
        ranked = torch.sort(digit, stable=True)
        assert torch.equal(order[core].long(), ranked.indices), core
        want = torch.searchsorted(ranked.values, torch.arange(v + 1, device="cuda"))
        assert torch.equal(starts[core, : v + 1].long(), want), core
