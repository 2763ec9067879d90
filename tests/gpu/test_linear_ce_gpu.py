"""The dense fused linear cross-entropy on a real GPU: every usable config, fp32 and bf16, odd N and
N = 1, every reduction, NaN-poisoned buffers, the benchmark's shape class (V 50257, D 1024) against
the blocked reference, mixed dtypes, the configs a ~99 KB card keeps, and the measured peak memory
against `peak_memory_bytes`. Skipped without CUDA."""

import pytest
import torch
import torch.nn.functional as F

from muse_lm.ops.tt_cross_entropy import triton_dense
from muse_lm.ops.tt_cross_entropy.reference import linear_cross_entropy_ref

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# ||err|| / ||ref||: fp32 runs ieee dots and fp32 atomics; bf16 rounds inputs and dl to bf16.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """Every buffer a kernel must fill entirely starts as NaN."""

    def nan_buffer(shape, device, dtype):
        return torch.full(shape, float("nan"), device=device, dtype=dtype)

    monkeypatch.setattr(triton_dense, "_new_buffer", nan_buffer)


def _inputs(n, v, d, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(n, d, device="cuda", generator=gen).to(dtype).requires_grad_()
    # Logit std ~3: a peaked softmax, as in a trained head.
    w = (torch.randn(v, d, device="cuda", generator=gen) * 3 / d**0.5).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,), device="cuda", generator=gen)
    t[::7] = -100
    return h, w, t


def _naive64(h, w, t, reduction, z_loss):
    logits = h.double() @ w.double().T
    valid = t != -100
    lse = torch.logsumexp(logits, dim=1)
    ce = F.cross_entropy(logits, torch.where(valid, t, 0), reduction="none")
    per = torch.where(valid, ce + z_loss * lse.square(), torch.zeros_like(ce))
    if reduction == "none":
        return per
    return per.sum() if reduction == "sum" else per.sum() / valid.sum().clamp_min(1)


def _dot_f32(dtype) -> bool:
    return dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", [1, 777, 4099])
def test_every_usable_config_matches_fp64(n, dtype):
    h, w, t = _inputs(n, 5003, 264, dtype, seed=n)  # odd V; D not a multiple of any BK
    ref = _naive64(h, w, t, "mean", 1e-3)
    want = torch.autograd.grad(ref, (h, w))
    for cfg in triton_dense.usable_configs(h.device, _dot_f32(dtype)):
        loss = triton_dense.linear_cross_entropy_triton(
            h, w, t, ignore_index=-100, reduction="mean", z_loss=1e-3, config=cfg
        )
        got = torch.autograd.grad(loss, (h, w))
        assert loss.dtype == torch.float32 and _rel(loss, ref) <= TOL[dtype], cfg
        for a, b, name in zip(got, want, ("dh", "dw")):
            assert a.dtype == dtype and torch.isfinite(a).all(), (cfg, name)
            assert _rel(a, b) <= TOL[dtype], (cfg, name, _rel(a, b))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_forward_is_bitwise_repeatable(reduction):
    h, w, t = _inputs(333, 1001, 128, torch.float32, seed=3)
    loss = triton_dense.linear_cross_entropy_triton(h, w, t, ignore_index=-100, reduction=reduction, z_loss=0.01)
    again = triton_dense.linear_cross_entropy_triton(h, w, t, ignore_index=-100, reduction=reduction, z_loss=0.01)
    assert torch.equal(loss, again)  # the forward has no atomics
    ref = _naive64(h, w, t, reduction, 0.01)
    assert _rel(loss, ref) <= 1e-5
    g = torch.randn_like(loss)
    for a, b in zip(torch.autograd.grad(loss, (h, w), g), torch.autograd.grad(ref, (h, w), g.double())):
        assert _rel(a, b) <= 1e-5


def test_all_ignored_gives_zero():
    h, w, _ = _inputs(65, 1001, 128, torch.bfloat16, seed=4)
    t = torch.full((65,), -100, device="cuda")
    loss = triton_dense.linear_cross_entropy_triton(h, w, t, ignore_index=-100, reduction="mean", z_loss=0.0)
    assert loss.item() == 0.0
    gh, gw = torch.autograd.grad(loss, (h, w))
    assert torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0


@pytest.mark.parametrize("n", [1, 4099])
def test_benchmark_shape_class_bf16_every_usable_config_against_reference(n):
    """V 50257, D 1024, bf16 (several dW chunks): vs the blocked fp32-math reference."""
    h, w, t = _inputs(n, 50257, 1024, torch.bfloat16, seed=5)
    if n == 1:
        t[0] = 17
    ref = linear_cross_entropy_ref(h, w, t, reduction="mean", z_loss=1e-4)
    want = torch.autograd.grad(ref, (h, w))
    for cfg in triton_dense.usable_configs(h.device, dot_f32=False):
        loss = triton_dense.linear_cross_entropy_triton(
            h, w, t, ignore_index=-100, reduction="mean", z_loss=1e-4, config=cfg
        )
        got = torch.autograd.grad(loss, (h, w))
        assert _rel(loss, ref) <= 1e-2, cfg
        for a, b, name in zip(got, want, ("dh", "dw")):
            assert torch.isfinite(a).all() and _rel(a, b) <= 1e-2, (cfg, name, _rel(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_configs_capped_at_99kb_are_correct(monkeypatch, dtype):
    """What a consumer card (RTX 3090/4090: 99 KB per block) would run, default included."""
    monkeypatch.setattr(triton_dense, "_max_shared_mem", lambda index: 99 * 1024)
    usable = triton_dense.usable_configs(torch.device("cuda"), _dot_f32(dtype))
    assert usable and all(c.smem_bytes(4 if _dot_f32(dtype) else 2) <= 99 * 1024 for c in usable)
    h, w, t = _inputs(1025, 5003, 512, dtype, seed=6)
    ref = _naive64(h, w, t, "sum", 0.0)
    want = torch.autograd.grad(ref, (h, w))
    for cfg in (None, *usable):
        loss = triton_dense.linear_cross_entropy_triton(
            h, w, t, ignore_index=-100, reduction="sum", z_loss=0.0, config=cfg
        )
        assert _rel(loss, ref) <= TOL[dtype], cfg
        for a, b in zip(torch.autograd.grad(loss, (h, w)), want):
            assert _rel(a, b) <= TOL[dtype], cfg
    too_big = max(triton_dense.CONFIGS, key=lambda c: c.smem_bytes(2))
    with pytest.raises(ValueError, match="shared memory"):
        triton_dense.linear_cross_entropy_triton(
            h, w, t, ignore_index=-100, reduction="sum", z_loss=0.0, config=too_big
        )


@pytest.mark.parametrize(
    ("h_dtype", "w_dtype"), [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)], ids=["h16", "w16"]
)
def test_mixed_dtypes_match_fp64(h_dtype, w_dtype):
    """One 16-bit side: fp32 dots; the 16-bit gradient is narrowed in place (dh) or in dW's rows."""
    h, w, t = _inputs(1025, 50257, 256, torch.float32, seed=8)
    h = h.detach().to(h_dtype).requires_grad_()
    w = w.detach().to(w_dtype).requires_grad_()
    ref = _naive64(h, w, t, "mean", 1e-4)
    want = torch.autograd.grad(ref, (h, w))
    loss = triton_dense.linear_cross_entropy_triton(h, w, t, ignore_index=-100, reduction="mean", z_loss=1e-4)
    got = torch.autograd.grad(loss, (h, w))
    assert _rel(loss, ref) <= 1e-5
    for a, b, dtype in zip(got, want, (h_dtype, w_dtype)):
        assert a.dtype == dtype and _rel(a, b) <= TOL[dtype]


def test_peak_memory_matches_the_model():
    """One bf16 fwd + bwd at V 50257, D 1024 allocates what `peak_memory_bytes` says (the gradients
    included), give or take the caching allocator's rounding (< 1 MiB per block)."""
    n, v, d = 4099, 50257, 1024
    h, w, t = _inputs(n, v, d, torch.bfloat16, seed=9)
    cfg = triton_dense.default_config(n, False, triton_dense.usable_configs(h.device, dot_f32=False))

    def step():
        h.grad = w.grad = None
        triton_dense.linear_cross_entropy_triton(h, w, t, ignore_index=-100, reduction="mean", z_loss=0.0).backward()

    step()  # compile outside the measurement
    h.grad = w.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    sms = torch.cuda.get_device_properties(h.device).multi_processor_count
    model = triton_dense.peak_memory_bytes(n, v, d, torch.bfloat16, cfg, num_sms=sms)
    mib = 2**20
    assert model - 2 * mib <= peak <= model + 4 * mib, (peak / mib, model / mib)
