"""bk_resolvent / bk_resolvent_step: the normalized 2x2 transfer scan vs dense inverses."""

import pytest
import torch
from torch.testing import assert_close

from muse_lm.ops.scan import bk_resolvent, bk_resolvent_step

Z = torch.tensor([0.3 + 0.05j, -1.2 + 0.7j], dtype=torch.complex128)


def potentials(b, t, k, scale=1.0, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(b, t, k, generator=gen, dtype=torch.float64)).to(dtype)


def dense_shifted(v_col, z):
    """H_{1..t} - z for one head: tridiagonal, diagonal 2 + v - z, off-diagonals -1 (complex128)."""
    t = v_col.shape[0]
    off = -torch.ones(t - 1, dtype=torch.complex128)
    return torch.diag(2 + v_col.to(torch.complex128) - z) + torch.diag(off, 1) + torch.diag(off, -1)


def test_matches_dense_inverse_and_log_det():
    v = potentials(2, 12, 2)
    g = bk_resolvent(v, Z)
    assert g.shape == (2, 12, 2) and g.dtype == torch.complex128
    for bi in range(2):
        for k in range(2):
            prev_logdet = 0.0  # det of the empty matrix is 1
            for t in range(1, 13):
                m = dense_shifted(v[bi, :t, k], Z[k])
                expected = torch.linalg.inv(m)[t - 1, t - 1]
                assert_close(g[bi, t - 1, k], expected, rtol=1e-10, atol=1e-12)
                # -log|G_t| is the per-token log-det log|det_t / det_{t-1}|.
                logdet = torch.linalg.slogdet(m).logabsdet
                assert_close(-g[bi, t - 1, k].abs().log(), logdet - prev_logdet, rtol=1e-9, atol=1e-9)
                prev_logdet = logdet


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bounded_by_one_over_eta(dtype):
    z = torch.tensor([0.0 + 1e-3j, 2.0 + 0.01j, -3.0 + 1.0j], dtype=torch.complex128)
    v = potentials(2, 300, 3, scale=50.0, dtype=dtype)
    v[:, 100:200] *= 0.01  # a stretch of near-free motion, where |G| approaches its bound
    g = bk_resolvent(v, z.to(torch.complex64 if dtype == torch.float32 else torch.complex128))
    eps = 1e-4 if dtype == torch.float32 else 1e-10
    bound = 1 / z.imag
    assert (g.abs().double() <= bound * (1 + eps)).all()


def test_long_sequence_is_finite_and_satisfies_the_recurrence():
    # 100k tokens: an unnormalized transfer product would overflow within ~1000 of them.
    z = torch.tensor([0.5 + 0.02j, -1.0 + 0.3j], dtype=torch.complex64)
    v = potentials(1, 100_000, 2, scale=3.0, dtype=torch.float32)
    g = bk_resolvent(v, z)
    assert g.dtype == torch.complex64
    assert torch.isfinite(torch.view_as_real(g)).all()
    assert (g.abs() > 0).all()
    # Every token obeys the decode update G_t ((a_t - z) - G_{t-1}) = 1.
    diag = (2 + v).to(torch.complex64) - z
    g_prev = torch.cat([torch.zeros_like(g[:, :1]), g[:, :-1]], 1)
    residual = (g * (diag - g_prev) - 1).abs()
    assert residual.max() < 1e-3


def test_causal():
    v = potentials(2, 40, 2)
    g = bk_resolvent(v, Z)
    for t in (0, 17, 38):
        bumped = v.clone()
        bumped[:, t + 1] += 5.0
        g_bumped = bk_resolvent(bumped, Z)
        assert torch.equal(g_bumped[:, : t + 1], g[:, : t + 1])
        assert not torch.equal(g_bumped[:, t + 1], g[:, t + 1])


def test_gradcheck():
    v = potentials(1, 5, 2, seed=1).requires_grad_()
    z_re = Z.real.clone().requires_grad_()
    z_im = Z.imag.clone().requires_grad_()
    fn = lambda v, re, im: torch.view_as_real(bk_resolvent(v, torch.complex(re, im)))
    assert torch.autograd.gradcheck(fn, (v, z_re, z_im))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_step_agrees_with_scan(dtype):
    v = potentials(2, 50, 2, seed=2, dtype=dtype)
    z = Z.to(torch.complex64 if dtype == torch.float32 else torch.complex128)
    g = bk_resolvent(v, z)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    g_t = None
    for t in range(v.shape[1]):
        g_t = bk_resolvent_step(v[:, t], z, g_t)
        assert g_t.dtype == g.dtype
        assert_close(g_t, g[:, t], **tol)


def test_bf16_potentials_give_complex64():
    v = potentials(1, 8, 2, dtype=torch.bfloat16)
    g = bk_resolvent(v, Z.to(torch.complex64))
    assert g.dtype == torch.complex64
    assert_close(g, bk_resolvent(v.float(), Z.to(torch.complex64)))


@pytest.mark.parametrize(
    "case",
    [
        "im-zero",
        "im-negative",
        "z-real",
        "z-shape",
        "v-2d",
        "v-complex",
        "T0",
        "g-dtype",
        "g-shape",
        "step-im",
    ],
)
def test_bad_inputs_raise_value_error(case):
    v = potentials(2, 6, 2)
    calls = {
        "im-zero": lambda: bk_resolvent(v, torch.tensor([0.5 + 0j, 1 + 1j])),
        "im-negative": lambda: bk_resolvent(v, torch.tensor([0.5 - 0.1j, 1 + 1j])),
        "z-real": lambda: bk_resolvent(v, torch.tensor([0.5, 1.0])),
        "z-shape": lambda: bk_resolvent(v, Z[:1]),
        "v-2d": lambda: bk_resolvent(v[0], Z),
        "v-complex": lambda: bk_resolvent(v.to(torch.complex128), Z),
        "T0": lambda: bk_resolvent(v[:, :0], Z),
        "g-dtype": lambda: bk_resolvent_step(v[:, 0], Z, torch.zeros(2, 2, dtype=torch.complex64)),
        "g-shape": lambda: bk_resolvent_step(v[:, 0], Z, torch.zeros(1, 2, dtype=torch.complex128)),
        "step-im": lambda: bk_resolvent_step(v[:, 0], Z.conj(), None),
    }
    with pytest.raises(ValueError, match="bk_resolvent"):
        calls[case]()


def test_triton_impl_refused_where_no_kernel_applies():
    # fp64 scans and the one-token decode step have no Triton kernel: an explicit request says so.
    v = potentials(1, 4, 2)
    with pytest.raises(NotImplementedError):
        bk_resolvent(v, Z, impl="triton")
    with pytest.raises(NotImplementedError):
        bk_resolvent_step(v[:, 0], Z, None, impl="triton")
