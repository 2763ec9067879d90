"""The BK resolvent Triton kernels (forward and backward) vs the torch reference and an fp64 naive
recurrence, through Triton's interpreter, in fp32; plus the gradient derivation itself, checked in
fp64 against autograd (and gradcheck) of the reference.

Triton reads TRITON_INTERPRET when its kernels are defined, so the interpreter tests run in a child
pytest process started with TRITON_INTERPRET=1 (`test_interpreter_suite`); in this process they are
skipped. The interpreter runs a scan element by element in Python, so shapes and chunks are small
here; tests/gpu/test_bk_gpu.py runs every declared config at full size.
"""

import pytest
import torch

from muse_lm.ops._dispatch import interpreter_enabled
from muse_lm.ops.scan import bk_resolvent
from muse_lm.ops.scan.bk import bk_resolvent_reference

pytest.importorskip("triton")

interp = pytest.mark.skipif(not interpreter_enabled(), reason="runs in the TRITON_INTERPRET=1 child process")

# Spread over the band [0, 4] and beyond; Im z from 0.05 (weak contraction, |G| up to 20) to 1.
Z = torch.tensor([0.3 + 0.05j, -1.2 + 0.7j, 2.0 + 0.2j], dtype=torch.complex128)
TOL_G = 1e-4
TOL_GRAD = 1e-4


def potentials(b, t, k, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(b, t, k, generator=gen, dtype=torch.float64)


def naive_forward(v, z):
    """G_t = 1 / (c_t - G_{t-1}), G_0 = 0, c_t = 2 + v_t - z: fp64 sequential recurrence, [B,T,K]."""
    c = (2 + v.double()).to(torch.complex128) - z.to(torch.complex128)
    g, out = torch.zeros_like(c[:, 0]), []
    for t in range(c.shape[1]):
        g = 1 / (c[:, t] - g)
        out.append(g)
    return torch.stack(out, 1)


def naive_backward(g, grad_g):
    """The derived gradients, sequentially in fp64 (PyTorch's conj convention for complex):
    lam_t = gG_t + conj(G_{t+1}^2) lam_{t+1}; grad v_t = Re(-conj(G_t^2) lam_t); grad z = sum conj(G_t^2) lam_t."""
    lam = torch.zeros_like(g[:, 0])
    grad_v = torch.zeros(g.shape, dtype=torch.float64)
    grad_z = torch.zeros(g.shape[2], dtype=torch.complex128)
    for t in reversed(range(g.shape[1])):
        if t + 1 < g.shape[1]:
            lam = grad_g[:, t] + (g[:, t + 1] ** 2).conj() * lam
        else:
            lam = grad_g[:, t].clone()
        w = (g[:, t] ** 2).conj() * lam
        grad_v[:, t] = -w.real
        grad_z += w.sum(0)
    return grad_v, grad_z


def rel(a, b):
    """max |a - b| / max |b| (complex or real, compared in fp64)."""
    a = a.to(torch.complex128) if a.is_complex() else a.double()
    b = b.to(torch.complex128) if b.is_complex() else b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def reference_grads(v, z, grad_g):
    vd = v.detach().double().requires_grad_()
    zd = z.detach().to(torch.complex128).requires_grad_()
    g = bk_resolvent_reference(vd, zd)
    return (g.detach(), *torch.autograd.grad(g, (vd, zd), grad_g.to(torch.complex128)))


def test_derived_gradients_match_autograd_and_gradcheck_of_the_reference():
    """The backward the kernel implements, in fp64, equals autograd through the reference scan, and
    the reference's own gradients pass gradcheck: the derivation is right before any kernel runs."""
    v = potentials(2, 9, 3, seed=4)
    gen = torch.Generator().manual_seed(5)
    grad_g = torch.randn(2, 9, 3, generator=gen, dtype=torch.complex128)
    g_ref, dv_ref, dz_ref = reference_grads(v, Z, grad_g)
    g = naive_forward(v, Z)
    assert rel(g, g_ref) < 1e-12
    dv, dz = naive_backward(g, grad_g)
    assert rel(dv, dv_ref) < 1e-10
    assert rel(dz, dz_ref) < 1e-10

    small = potentials(1, 4, 3, seed=6).requires_grad_()
    z_re, z_im = Z.real.clone().requires_grad_(), Z.imag.clone().requires_grad_()
    fn = lambda v, re, im: torch.view_as_real(bk_resolvent_reference(v, torch.complex(re, im)))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (small, z_re, z_im))


@pytest.mark.skipif(interpreter_enabled(), reason="this is the parent of the interpreter run")
def test_interpreter_suite(interpreter_run):
    interpreter_run(__file__)


def _small_configs():
    from muse_lm.ops.scan.bk_triton import BKConfig

    # Chunk boundaries every few tokens, channel blocks smaller than, equal to and larger than K = 3.
    return [BKConfig(4, 2, 1), BKConfig(8, 4, 4), BKConfig(16, 1, 2)]


@interp
@pytest.mark.parametrize("cfg_index", [0, 1, 2])
def test_configs_match_reference_forward_and_backward(cfg_index):
    from muse_lm.ops.scan.bk_triton import bk_resolvent_backward, bk_resolvent_forward

    cfg = _small_configs()[cfg_index]
    z = Z.to(torch.complex64)
    # T = 1, an odd T inside one chunk, a T two chunks and a bit long (not a multiple of the chunk).
    for t in (1, 7, 2 * cfg.chunk + 3):
        v = potentials(2, t, 3, scale=1.5, seed=t).float()
        gen = torch.Generator().manual_seed(t + 1)
        grad_g = torch.randn(2, t, 3, generator=gen, dtype=torch.complex64)
        poison = torch.full((2, t, 3), complex(float("nan"), float("nan")), dtype=torch.complex64)
        g = bk_resolvent_forward(v, z, cfg, out=poison)
        assert g.data_ptr() == poison.data_ptr()
        assert torch.isfinite(torch.view_as_real(g)).all(), (cfg, t)
        naive = naive_forward(v, z)
        assert rel(g, naive) < TOL_G, (cfg, t)
        assert (g.abs().double() <= (1 / z.imag.double()) * (1 + 1e-5)).all()
        g_ref, dv_ref, dz_ref = reference_grads(v, z, grad_g)
        assert rel(g, g_ref) < TOL_G, (cfg, t)
        dv, dz = bk_resolvent_backward(g, grad_g, torch.float32, cfg)
        assert dv.dtype == torch.float32 and dz.dtype == torch.complex64
        assert rel(dv, dv_ref) < TOL_GRAD, (cfg, t)
        assert rel(dz, dz_ref) < TOL_GRAD, (cfg, t)


@interp
def test_many_chunks_stay_on_the_fp64_recurrence():
    """600 tokens in 75 chunks of 8: the carried G keeps the kernel on the fp64 recurrence, strong
    and near-free potentials and a small Im z (|G| up to 20) included."""
    from muse_lm.ops.scan.bk_triton import BKConfig, bk_resolvent_forward

    z = torch.tensor([0.5 + 0.05j, 3.0 + 0.3j], dtype=torch.complex64)
    v = potentials(1, 600, 2, scale=3.0, seed=9).float()
    v[:, 200:400] *= 0.01
    g = bk_resolvent_forward(v, z, BKConfig(8, 2, 1))
    assert torch.isfinite(torch.view_as_real(g)).all()
    assert rel(g, naive_forward(v, z)) < TOL_G
    assert (g.abs().double() <= (1 / z.imag.double()) * (1 + 1e-5)).all()


@interp
def test_public_op_impl_triton_autograd_matches_reference_with_bf16_v_and_conj_grads():
    z = Z.to(torch.complex64).requires_grad_()
    for dtype in (torch.float32, torch.bfloat16):
        v = potentials(2, 11, 3, seed=3).to(dtype).requires_grad_()
        g = bk_resolvent(v, z, impl="triton")  # config None -> default_config under the interpreter
        assert g.dtype == torch.complex64 and "muse_lm_bk_forward" in type(g.grad_fn).__name__
        v_ref = v.detach().double().requires_grad_()
        z_ref = z.detach().to(torch.complex128).requires_grad_()
        g_ref = bk_resolvent(v_ref, z_ref, impl="torch")
        assert rel(g, g_ref) < TOL_G

        def loss(g, z):
            # What the BK layer reads (eta Re G, eta Im G), plus a conj view and |G| for the monitor.
            eta = z.imag
            return (
                (g.real * eta).sin().sum()
                + (g.imag * eta).square().sum()
                + (g.conj() * g[:, :1]).real.sum()
                + g.abs().log().sum()
            )

        got = torch.autograd.grad(loss(g, z), (v, z))
        want = torch.autograd.grad(loss(g_ref, z_ref), (v_ref, z_ref))
        assert got[0].dtype == dtype and got[1].dtype == torch.complex64
        tol = TOL_GRAD if dtype == torch.float32 else 1e-2  # bf16 rounds grad v on the way out
        assert rel(got[0], want[0]) < tol, dtype
        assert rel(got[1], want[1]) < TOL_GRAD, dtype


@interp
def test_empty_batch_and_only_v_or_only_z_needing_grad():
    from muse_lm.ops.scan.bk_triton import bk_resolvent_triton

    z = Z.to(torch.complex64)
    empty = torch.zeros(0, 5, 3, requires_grad=True)
    g = bk_resolvent_triton(empty, z)
    assert g.shape == (0, 5, 3)
    assert torch.autograd.grad(g.real.sum(), empty)[0].shape == (0, 5, 3)
    v = potentials(1, 5, 3, seed=1).float()
    zg = z.clone().requires_grad_()
    (dz,) = torch.autograd.grad(bk_resolvent_triton(v, zg).imag.sum(), zg)
    _, _, dz_ref = reference_grads(v, z, torch.full((1, 5, 3), 1j, dtype=torch.complex128))
    assert rel(dz, dz_ref) < TOL_GRAD


def test_fp64_is_refused_by_the_kernel_and_routed_to_the_reference():
    from muse_lm.ops.scan.bk_triton import bk_resolvent_triton

    v = potentials(1, 4, 3)
    with pytest.raises(NotImplementedError, match="fp32/complex64"):
        bk_resolvent(v, Z, impl="triton")
    with pytest.raises(NotImplementedError, match="fp32/complex64"):
        bk_resolvent(v.float(), Z, impl="triton")  # complex128 z
    with pytest.raises(NotImplementedError, match="impl='torch'"):
        bk_resolvent_triton(v, Z.to(torch.complex64))
    # impl=None on CPU is the reference, in every dtype.
    torch.testing.assert_close(bk_resolvent(v, Z), bk_resolvent_reference(v, Z))


@pytest.mark.skipif(interpreter_enabled(), reason="checks the non-interpreter dispatch")
def test_triton_on_cpu_without_interpreter_is_refused():
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        bk_resolvent(potentials(1, 4, 3).float(), Z.to(torch.complex64), impl="triton")


def test_config_validation_and_default():
    from muse_lm.ops.scan.bk_triton import CONFIGS, BKConfig, default_config

    with pytest.raises(ValueError, match="power of two"):
        BKConfig(48, 4, 4)
    with pytest.raises(ValueError, match="power of two"):
        BKConfig(64, 3, 4)
    with pytest.raises(ValueError, match="num_warps"):
        BKConfig(64, 4, 3)
    for k in (1, 3, 4, 5, 9, 200):
        cfg = default_config(k)
        assert cfg in CONFIGS and cfg.block_k <= max(16, k)


def test_autotune_pruning_keeps_blocks_near_k():
    from muse_lm.ops.scan.bk_triton import _prune_configs, _triton_configs

    configs = _triton_configs()
    for k in (1, 4, 5, 64):
        kept = _prune_configs(configs, {"K": k})
        assert kept and all(c.kwargs["BK"] <= 2 * max(1, 1 << (k - 1).bit_length()) for c in kept), k
    assert len(_prune_configs(configs, {"K": 64})) == len(configs)
