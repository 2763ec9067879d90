"""The sequential BK resolvent kernels (`bk_seq_triton.py`) on a real GPU: every declared config at
B 16, T in {1, 1000, 8192}, K in {4, 512}, unsplit and split over T, NaN-poisoned outputs, G and both
gradients vs the fp64 reference and vs bk_triton.py's kernels; the autotuned path with the planned NSEG;
T = 1,000,000 with K 4 (finite, |G| <= 1/Im z, equal to bk_triton.py's kernel). Skipped without CUDA."""

import pytest
import torch
from test_bk_gpu import _reference, _rel  # the fp64 reference and error measure of bk_triton's GPU tests

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TOL = {"g": 1e-4, "grad_v": 1e-4, "grad_z": 1e-4}
Z4 = [0.3 + 0.05j, -1.2 + 0.7j, 2.0 + 0.2j, 3.9 + 0.1j]


def _problem(b, t, k, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    v = 1.5 * torch.randn(b, t, k, device="cuda", generator=gen)
    z = torch.tensor([Z4[i % 4] for i in range(k)], dtype=torch.complex64, device="cuda")
    grad_g = torch.randn(b, t, k, device="cuda", generator=gen, dtype=torch.complex64)
    return v, z, grad_g


def _poison(shape):
    return torch.full(shape, complex(float("nan"), float("nan")), device="cuda", dtype=torch.complex64)


@pytest.mark.parametrize("k", [4, 512])
@pytest.mark.parametrize("t", [1, 1000, 8192])
def test_every_config_unsplit_and_split_matches_reference_and_bk_triton(t, k):
    from muse_lm.ops.scan.bk_seq_triton import CONFIGS, bk_resolvent_backward_seq, bk_resolvent_forward_seq
    from muse_lm.ops.scan.bk_triton import bk_resolvent_backward, bk_resolvent_forward

    v, z, grad_g = _problem(16, t, k, seed=t + k)
    g_ref, dv_ref, dz_ref = _reference(v, z, grad_g)
    g_tri = bk_resolvent_forward(v, z)
    dv_tri, dz_tri = bk_resolvent_backward(g_tri, grad_g, v.dtype)
    bound = 1 / z.imag.double()
    for cfg in (None, *CONFIGS):
        for nseg in (None, 1, 7):
            g = bk_resolvent_forward_seq(v, z, cfg, out=_poison(v.shape), nseg=nseg)
            assert torch.isfinite(torch.view_as_real(g)).all(), (cfg, nseg)
            assert (g.abs().double() <= bound * (1 + 1e-5)).all(), (cfg, nseg)
            dv, dz = bk_resolvent_backward_seq(g, grad_g, v.dtype, cfg, nseg=nseg)
            assert torch.isfinite(dv).all(), (cfg, nseg)
            errs = {"g": _rel(g, g_ref), "grad_v": _rel(dv, dv_ref), "grad_z": _rel(dz, dz_ref)}
            assert all(errs[n] < TOL[n] for n in TOL), (cfg, nseg, errs)
            assert _rel(g, g_tri) < TOL["g"] and _rel(dv, dv_tri) < TOL["grad_v"], (cfg, nseg)
            assert _rel(dz, dz_tri) < TOL["grad_z"], (cfg, nseg)
            again = bk_resolvent_backward_seq(g, grad_g, v.dtype, cfg, nseg=nseg)
            assert torch.equal(dv, again[0]) and torch.equal(dz, again[1]), (cfg, nseg)


def test_bf16_potentials_give_bf16_grad_v():
    from muse_lm.ops.scan.bk_seq_triton import bk_resolvent_backward_seq, bk_resolvent_forward_seq

    v, z, grad_g = _problem(16, 1000, 4, seed=3)
    v = v.to(torch.bfloat16)
    g_ref, dv_ref, dz_ref = _reference(v, z, grad_g)
    g = bk_resolvent_forward_seq(v, z)
    dv, dz = bk_resolvent_backward_seq(g, grad_g, v.dtype)
    assert dv.dtype == torch.bfloat16
    assert _rel(g, g_ref) < TOL["g"] and _rel(dv, dv_ref) < 1e-2 and _rel(dz, dz_ref) < TOL["grad_z"]


def test_one_million_steps_finite_bounded_and_equal_to_bk_triton():
    from muse_lm.ops.scan.bk_seq_triton import bk_resolvent_backward_seq, bk_resolvent_forward_seq
    from muse_lm.ops.scan.bk_triton import bk_resolvent_backward, bk_resolvent_forward

    t = 1_000_000
    gen = torch.Generator(device="cuda").manual_seed(7)
    z = torch.tensor([0.5 + 0.02j, -1.0 + 0.3j, 2.0 + 0.1j, 3.5 + 1.0j], dtype=torch.complex64, device="cuda")
    v = 3.0 * torch.randn(1, t, 4, device="cuda", generator=gen)
    v[:, t // 3 : t // 2] *= 0.01  # a long stretch of near-free motion, where |G| nears its bound
    grad_g = torch.full((1, t, 4), 1j, device="cuda", dtype=torch.complex64)
    g = bk_resolvent_forward_seq(v, z)
    assert torch.isfinite(torch.view_as_real(g)).all()
    assert (g.abs().double() <= (1 / z.imag.double()) * (1 + 1e-5)).all()
    g_tri = bk_resolvent_forward(v, z)
    assert _rel(g, g_tri) < TOL["g"]
    dv, dz = bk_resolvent_backward_seq(g, grad_g, v.dtype)
    dv_tri, dz_tri = bk_resolvent_backward(g_tri, grad_g, v.dtype)
    assert torch.isfinite(dv).all() and torch.isfinite(torch.view_as_real(dz)).all()
    assert _rel(dv, dv_tri) < 1e-3 and _rel(dz, dz_tri) < 1e-3
