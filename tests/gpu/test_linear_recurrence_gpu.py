"""The linear_recurrence Triton kernel on a real GPU: every declared config on odd T and chunk
boundaries (T = 1, 7, 63, 65, 1000, 4097), fp32 and bf16, forward and reverse, h and every gradient vs
the fp64 reference (outputs NaN-poisoned first), bitwise-repeatable backward, the configs kept under a
99 KB shared-memory cap, the shared-memory estimate against the compiled kernels, the autotuned public
op with autograd, and T = 1,000,000 with B = 1. Skipped without CUDA."""

import pytest
import torch

from muse_lm.ops.scan import linear_recurrence
from muse_lm.ops.scan.reference import linear_recurrence_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# Max |error| / max |fp64 reference| on the same (rounded) inputs: fp32 math throughout; bf16 rounds
# h, da and db on the way out (2^-9) and the saved h that da is formed from.
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
NAN = float("nan")


def _rel(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


def _problem(shape, dtype, *, seed, a_range=(-1.1, 1.1)):
    """a uniform in a_range with 5% exact zeros, b, initial (fp32) and dh normal; a, b, dh in dtype."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    lo, hi = a_range
    a = lo + (hi - lo) * torch.rand(shape, device="cuda", generator=gen)
    a = torch.where(torch.rand(shape, device="cuda", generator=gen) < 0.05, 0.0, a)
    b, grad_h = torch.randn(2, *shape, device="cuda", generator=gen)
    initial = torch.randn(shape[:1] + shape[2:], device="cuda", generator=gen)
    return a.to(dtype), b.to(dtype), initial, grad_h.to(dtype)


def _reference(a, b, initial, grad_h, reverse):
    """(h, da, db, dinitial) in fp64 through the reference and its custom backward."""
    leaves = [t.detach().double().requires_grad_() for t in (a, b, initial)]
    h = linear_recurrence_reference(*leaves[:2], reverse=reverse, initial=leaves[2])
    return (h.detach(), *torch.autograd.grad(h, leaves, grad_h.double()))


def _check(cfg, a, b, initial, grad_h, reverse, ref):
    from muse_lm.ops.scan.linrec_triton import linear_recurrence_backward, linear_recurrence_forward

    tol = TOL[a.dtype]
    h = linear_recurrence_forward(a, b, initial, reverse, cfg, out=torch.full_like(a, NAN))
    assert torch.isfinite(h).all(), cfg
    assert _rel(h, ref[0]) < tol, (cfg, "h", _rel(h, ref[0]))
    outs = (torch.full_like(a, NAN), torch.full_like(a, NAN))
    da, db, dinit = linear_recurrence_backward(a, h, initial, grad_h, reverse, cfg, out=outs)
    assert torch.isfinite(da).all() and torch.isfinite(db).all() and torch.isfinite(dinit).all(), cfg
    for name, got, want in (("da", da, ref[1]), ("db", db, ref[2]), ("dinitial", dinit, ref[3])):
        assert _rel(got, want) < tol, (cfg, name, _rel(got, want))
    return h, da, db


# Odd widths (not a multiple of 16: scalar loads, masked lanes) alternate with D = 64 (vector loads).
SHAPES = {1: (3, 1, 37), 7: (3, 7, 4, 16), 63: (3, 63, 37), 65: (3, 65, 4, 16), 1000: (3, 1000, 37),
          4097: (2, 4097, 4, 16)}


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("t", sorted(SHAPES))
def test_every_config_matches_the_fp64_reference(t, dtype, reverse):
    from muse_lm.ops.scan.linrec_triton import CONFIGS, linear_recurrence_backward

    a, b, initial, grad_h = _problem(SHAPES[t], dtype, seed=t)
    ref = _reference(a, b, initial, grad_h, reverse)
    for cfg in CONFIGS:
        h, da, db = _check(cfg, a, b, initial, grad_h, reverse, ref)
    # One program per (b, channel block), nothing accumulated across programs: bitwise repeatable.
    again = linear_recurrence_backward(a, h, initial, grad_h, reverse, cfg)
    assert torch.equal(da, again[0]) and torch.equal(db, again[1])


def test_configs_kept_for_a_99kb_card_run_and_match():
    """What the autotuner keeps on a consumer card (99 KB of shared memory) compiles and is right here."""
    from muse_lm.ops.scan.linrec_triton import LinRecConfig, _triton_configs, prune_configs_for

    for shape in ((2, 777, 256), (1, 3001, 5)):
        kept = prune_configs_for(_triton_configs(), shape[2], 99 * 1024)
        assert kept
        for dtype in (torch.float32, torch.bfloat16):
            for reverse in (False, True):
                a, b, initial, grad_h = _problem(shape, dtype, seed=shape[1] + reverse)
                ref = _reference(a, b, initial, grad_h, reverse)
                for c in kept:
                    _check(LinRecConfig(c.kwargs["BT"], c.kwargs["BD"], c.num_warps), a, b, initial, grad_h,
                           reverse, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_shared_memory_estimate_bounds_every_compiled_kernel(dtype):
    """The pruning estimate is an upper bound of what Triton really allocates, scan and backward."""
    import triton

    from muse_lm.ops.scan.linrec_triton import CONFIGS, _linrec_kernel, smem_estimate

    b, t, d = 2, 100, 64
    x = torch.randn(b, t, d, device="cuda").to(dtype)
    init = torch.zeros(b, d, device="cuda")
    last = torch.empty(b, d, device="cuda")
    for cfg in CONFIGS:
        for grad in (False, True):
            kernel = _linrec_kernel[(b * triton.cdiv(d, cfg.block_d),)](
                x, x, init, torch.empty_like(x), x, torch.empty_like(x), last, t, d, 2, 7,
                BT=cfg.block_t, BD=cfg.block_d, REVERSE=grad, HAS_INIT=True, GRAD=grad, NEED_DA=grad,
                INTERPRET=False, num_warps=cfg.num_warps,
            )
            assert kernel.metadata.shared <= smem_estimate(cfg.block_t, cfg.block_d), (cfg, grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_default_dispatch_is_the_autotuned_kernel_with_autograd(dtype):
    """impl=None on CUDA: the kernel, autotuned, differentiable in a, b and initial; with and without an
    initial state, both directions, [B,T,H,P] inputs. fp64 stays on the reference."""
    a, b, initial, grad_h = _problem((4, 1500, 3, 40), dtype, seed=5)
    for reverse in (False, True):
        for init in (initial, None):
            leaves = [t.clone().requires_grad_() for t in (a, b) + ((init,) if init is not None else ())]
            h = linear_recurrence(leaves[0], leaves[1], reverse=reverse, initial=init if init is None else leaves[2])
            assert h.dtype == dtype and "LinearRecurrenceTriton" in type(h.grad_fn).__name__
            got = torch.autograd.grad(h, leaves, grad_h)
            ref = _reference(a, b, initial if init is not None else torch.zeros_like(initial), grad_h, reverse)
            assert _rel(h, ref[0]) < TOL[dtype], (reverse, init is None)
            for name, g, want, leaf in zip(("a", "b", "initial"), got, ref[1:], leaves):
                assert g.dtype == leaf.dtype and _rel(g, want) < TOL[dtype], (name, reverse, init is None)
    h64 = linear_recurrence(a.double(), b.double())
    assert h64.dtype == torch.float64 and h64.grad_fn is None


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_one_million_tokens_with_one_sequence(dtype, reverse):
    """B = 1, T = 1,000,000, D = 64, |a| in [0.9, 1] (memory of tens of tokens, signs mixed): the
    autotuned op and its gradients against the fp64 reference; finite everywhere."""
    t, d = 1_000_000, 64
    a, b, initial, grad_h = _problem((1, t, d), dtype, seed=11, a_range=(0.9, 1.0))
    gen = torch.Generator(device="cuda").manual_seed(12)
    a = (a.float() * torch.where(torch.rand(a.shape, device="cuda", generator=gen) < 0.5, -1.0, 1.0)).to(dtype)
    leaves = [x.clone().requires_grad_() for x in (a, b, initial)]
    h = linear_recurrence(leaves[0], leaves[1], reverse=reverse, initial=leaves[2])
    assert torch.isfinite(h).all()
    got = torch.autograd.grad(h, leaves, grad_h)
    ref = _reference(a, b, initial, grad_h, reverse)
    assert _rel(h, ref[0]) < TOL[dtype]
    for name, g, want in zip(("a", "b", "initial"), got, ref[1:]):
        assert torch.isfinite(g).all() and _rel(g, want) < TOL[dtype], name
