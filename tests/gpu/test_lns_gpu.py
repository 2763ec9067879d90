"""lns_matmul on a real GPU: the Triton kernels (max_log, datapath) at every declared config on odd
shapes (outputs NaN-poisoned first), the exact mode's scaled GEMM on odd shapes in fp32 and bf16
(IEEE even with TF32 switched on), the range guard, and K = 4096 signed N(0,1) data within 1e-5 of
float64. Skipped without CUDA."""

import pytest
import torch

from muse_lm.ops import lns_matmul, to_lns
from muse_lm.ops.lns.reference import datapath_reference, exact_finish, max_log_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SHAPES = [(1, 1, 1), (37, 45, 29), (130, 257, 67), (513, 1000, 255)]
TOL_EXACT = {torch.float32: 1e-5, torch.bfloat16: 1e-5}  # vs float64 of the same (rounded) inputs


def _data(m, k, n, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(m, k, device="cuda", generator=g).to(dtype),
            torch.randn(k, n, device="cuda", generator=g).to(dtype))


def _rel(c, ref):
    return ((c.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _value(sign, log):
    return torch.where(sign != 0, sign.double() * torch.exp2(log.double()), 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_exact_scaled_gemm_on_odd_shapes_even_with_tf32_switched_on(shape, dtype):
    from muse_lm.ops.lns.gemm import exact_scaled_gemm

    a, b = _data(*shape, dtype, seed=sum(shape))
    ref = a.double() @ b.double()
    pa, pb = to_lns(a), to_lns(b)
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # the GEMM must still run in IEEE fp32
    try:
        acc, row, col = exact_scaled_gemm(pa, pb)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert torch.isfinite(acc).all() and torch.isfinite(row).all() and torch.isfinite(col).all()
    assert _rel(_value(*exact_finish(acc, row, col, pa, pb)), ref) < TOL_EXACT[dtype]


def test_exact_k4096_accuracy_and_autotuned_dispatch():
    a, b = _data(256, 4096, 192, torch.float32, seed=1)
    c = lns_matmul(a, b)
    assert c.dtype == torch.float32
    assert _rel(c, a.double() @ b.double()) <= 1e-5


def test_exact_range_guard_and_pm250_on_gpu():
    c = lns_matmul(torch.tensor([[1e30, 1e-30]], device="cuda"), torch.tensor([[1e-30], [1e30]], device="cuda"))
    assert c.item() == pytest.approx(2.0, rel=1e-6)
    g = torch.Generator(device="cuda").manual_seed(3)

    def pair(shape):
        sign = torch.where(torch.rand(shape, device="cuda", generator=g) < 0.5, -1, 1).to(torch.int8)
        return sign, 500 * torch.rand(shape, device="cuda", generator=g) - 250

    a, b = pair((65, 300)), pair((300, 33))
    s, lg = lns_matmul(a, b)
    lt = a[1].double()[:, :, None] + b[1].double()[None]
    top = lt.amax(1)
    want = ((a[0].double()[:, :, None] * b[0].double()[None]) * torch.exp2(lt - top[:, None])).sum(1)
    got = s.double() * torch.exp2(lg.double() - top)
    assert (got - want).abs().max().item() < 1e-4  # relative to the largest term


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_max_log_every_config(shape):
    from muse_lm.ops.lns.triton import MAX_LOG_CONFIGS, max_log_triton

    a, b = _data(*shape, torch.float32, seed=5)
    pa, pb = to_lns(a), to_lns(b)
    rs, rl = max_log_reference(pa, pb)
    for cfg in MAX_LOG_CONFIGS:
        m, _, n = shape
        out = (torch.full((m, n), -7, dtype=torch.int8, device="cuda"), torch.full((m, n), float("nan"), device="cuda"))
        s, lg = max_log_triton(pa, pb, cfg, out=out)
        assert torch.equal(s, rs), cfg
        assert (lg.double() - rl).abs().max().item() < 1e-5, cfg


@pytest.mark.parametrize("frac_bits", [4, 8, 12])
@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s)))
def test_datapath_every_config_bit_exact(shape, frac_bits):
    from muse_lm.ops.lns.triton import DATAPATH_CONFIGS, datapath_triton

    a, b = _data(*shape, torch.float32, seed=7)
    pa, pb = to_lns(a, frac_bits), to_lns(b, frac_bits)
    rs, rl = datapath_reference(pa, pb, frac_bits)
    for cfg in DATAPATH_CONFIGS:
        m, _, n = shape
        out = (torch.full((m, n), -7, dtype=torch.int8, device="cuda"),
               torch.full((m, n), 7, dtype=torch.int32, device="cuda"))
        s, lg = datapath_triton(pa, pb, frac_bits, cfg, out=out)
        assert torch.equal(s, rs), cfg
        assert torch.equal(lg.long(), rl), cfg
