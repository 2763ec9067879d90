"""The linear_recurrence Triton kernel (scan and backward, forward and reverse) vs the torch reference
and an fp64 Python loop, through Triton's interpreter, in fp32; NaN-poisoned outputs; every declared
config; the public op's dispatch; config validation and shared-memory pruning.

Triton reads TRITON_INTERPRET when its kernels are defined, so the interpreter tests run in a child
pytest process started with TRITON_INTERPRET=1 (`test_interpreter_suite`); in this process they are
skipped. The interpreter runs a scan element by element in Python (~0.1 s per 2048-element chunk), so
shapes are small here; tests/gpu/test_linear_recurrence_gpu.py runs every config at full size.
"""

import pytest
import torch
from test_linear_recurrence import naive  # the fp64 definition (differentiable), shared with the reference tests

from muse_lm.ops._dispatch import interpreter_enabled
from muse_lm.ops.scan import linear_recurrence
from muse_lm.ops.scan.reference import linear_recurrence_reference

pytest.importorskip("triton")

interp = pytest.mark.skipif(not interpreter_enabled(), reason="runs in the TRITON_INTERPRET=1 child process")

# Max |error| / max |fp64 answer|: fp32 math throughout, h = A * carry + H at most a few roundings off.
TOL = 1e-5


def make(shape, seed=0, dtype=torch.float32):
    """a in [-1.1, 1.1] with exact zeros (10%), b and initial normal, dh normal: fp64, then `dtype`."""
    gen = torch.Generator().manual_seed(seed)
    a = 2.2 * torch.rand(shape, generator=gen, dtype=torch.float64) - 1.1
    a = torch.where(torch.rand(shape, generator=gen, dtype=torch.float64) < 0.1, torch.zeros_like(a), a)
    b = torch.randn(shape, generator=gen, dtype=torch.float64)
    initial = torch.randn(shape[:1] + shape[2:], generator=gen, dtype=torch.float64)
    grad_h = torch.randn(shape, generator=gen, dtype=torch.float64)
    return a.to(dtype), b.to(dtype), initial.to(dtype), grad_h.to(dtype)


def rel(got, want):
    """max |got - want| / max |want|, in fp64."""
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


def fp64_grads(fn, a, b, initial, grad_h):
    """(h, da, db, dinitial) of fn(a, b, initial) in fp64; dinitial None when initial is None."""
    leaves = [a.double().requires_grad_(), b.double().requires_grad_()]
    if initial is not None:
        leaves.append(initial.double().requires_grad_())
    h = fn(*leaves[:2], leaves[2] if initial is not None else None)
    grads = torch.autograd.grad(h, leaves, grad_h.double())
    return (h.detach(), *grads, *(() if initial is not None else (None,)))


def check_kernel(cfg, shape, reverse, with_initial, seed):
    """Forward and backward of the kernel with `cfg` (outputs NaN-poisoned) against the fp64 loop and the
    fp64 reference: h, da, db and dinitial."""
    from muse_lm.ops.scan.linrec_triton import linear_recurrence_backward, linear_recurrence_forward

    a, b, initial, grad_h = make(shape, seed=seed)
    initial = initial if with_initial else None
    case = (cfg, shape, reverse, with_initial)
    poison = torch.full(shape, float("nan"))
    h = linear_recurrence_forward(a, b, initial, reverse, cfg, out=poison)
    assert h.data_ptr() == poison.data_ptr() and torch.isfinite(h).all(), case
    outs = (torch.full(shape, float("nan")), torch.full(shape, float("nan")))
    da, db, dinit = linear_recurrence_backward(a, h, initial, grad_h, reverse, cfg, out=outs)
    assert da.data_ptr() == outs[0].data_ptr() and db.data_ptr() == outs[1].data_ptr()
    assert torch.isfinite(da).all() and torch.isfinite(db).all() and torch.isfinite(dinit).all(), case

    loop = lambda a, b, init: naive(a, b, init, reverse)  # noqa: E731
    ref = lambda a, b, init: linear_recurrence_reference(a, b, reverse=reverse, initial=init)  # noqa: E731
    for want in (fp64_grads(loop, a, b, initial, grad_h), fp64_grads(ref, a, b, initial, grad_h)):
        assert rel(h, want[0]) < TOL, case
        assert rel(da, want[1]) < TOL, case
        assert rel(db, want[2]) < TOL, case
        if with_initial:
            assert dinit.shape == initial.shape and rel(dinit, want[3]) < TOL, case


@pytest.mark.skipif(interpreter_enabled(), reason="this is the parent of the interpreter run")
def test_interpreter_suite(interpreter_run):
    interpreter_run(__file__)


def _small_configs():
    from muse_lm.ops.scan.linrec_triton import LinRecConfig

    # Chunks of a few rows (many chunk boundaries); channel blocks below, at and above D = 3 and 4.
    return [LinRecConfig(4, 2, 1), LinRecConfig(8, 4, 4), LinRecConfig(2, 8, 2)]


@interp
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cfg_index", [0, 1, 2])
def test_small_configs_odd_lengths_and_shapes(cfg_index, reverse):
    """T = 1, an odd T inside one chunk, T two chunks and a bit; [B,T], [B,T,D] and [B,T,2,2] inputs;
    with and without an initial state."""
    cfg = _small_configs()[cfg_index]
    for shape, with_initial in (((2, 1, 3), True), ((2, 7, 3), False), ((1, 2 * cfg.block_t + 3, 2, 2), True)):
        check_kernel(cfg, shape, reverse, with_initial, seed=shape[1])
    check_kernel(cfg, (3, 5), reverse, True, seed=1)


@interp
@pytest.mark.parametrize("cfg_index", range(8))
def test_every_declared_config_forward_and_backward(cfg_index):
    """Each config of CONFIGS on one full chunk plus a partial one (so the carry and the masked tail both
    run), both directions. D = 3 leaves lanes idle (masked) where BD >= 4; T = 1 runs in the small-config tests."""
    from muse_lm.ops.scan.linrec_triton import CONFIGS

    assert len(CONFIGS) == 8  # keep the parametrization in step with the declared configs
    cfg = CONFIGS[cfg_index]
    shape = (1, cfg.block_t + 3, min(3, cfg.block_d))  # one program per direction keeps this quick
    check_kernel(cfg, shape, False, True, seed=cfg_index)
    check_kernel(cfg, shape, True, False, seed=cfg_index + 10)


@interp
def test_many_chunks_carry_stays_on_the_fp64_loop():
    """160 tokens in 40 chunks of 4, |a| near 1 (long memory) and a stretch of exact zeros (a reset)."""
    from muse_lm.ops.scan.linrec_triton import LinRecConfig, linear_recurrence_forward

    gen = torch.Generator().manual_seed(3)
    a = (0.97 + 0.03 * torch.rand(2, 160, 2, generator=gen)) * torch.sign(torch.randn(2, 160, 2, generator=gen))
    a[:, 90:93] = 0.0
    b, initial = torch.randn(2, 160, 2, generator=gen), torch.randn(2, 2, generator=gen)
    for reverse in (False, True):
        h = linear_recurrence_forward(a, b, initial, reverse, LinRecConfig(4, 2, 1))
        assert rel(h, naive(a, b, initial, reverse)) < TOL, reverse


@interp
def test_public_op_dispatches_to_the_kernel_with_autograd_in_fp32_and_16_bit():
    """impl="triton" (config None -> default_config here): fp32, bf16 and fp16 a and b, an fp64 initial,
    both directions; h and every gradient against the fp64 loop on the same (rounded) inputs (16-bit
    outputs are rounded on the way out: 2^-9 for bf16, 2^-11 for fp16)."""
    for dtype, tol in ((torch.float32, TOL), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)):
        for reverse in (False, True):
            a, b, initial, grad_h = make((1, 9, 2, 2), seed=4, dtype=dtype)
            initial = initial.double()
            leaves = [t.clone().requires_grad_() for t in (a, b, initial)]
            h = linear_recurrence(*leaves[:2], reverse=reverse, initial=leaves[2], impl="triton")
            assert h.dtype == dtype and "LinearRecurrenceTriton" in type(h.grad_fn).__name__
            got = torch.autograd.grad(h, leaves, grad_h)
            want = fp64_grads(lambda a, b, i: naive(a, b, i, reverse), a, b, initial, grad_h)  # noqa: B023
            assert rel(h, want[0]) < tol, (dtype, reverse)
            for name, g, w, leaf in zip(("a", "b", "initial"), got, want[1:], leaves):
                assert g.dtype == leaf.dtype, name
                assert rel(g, w) < tol, (dtype, reverse, name)


@interp
def test_only_some_inputs_needing_grad_and_empty_batch():
    from muse_lm.ops.scan.linrec_triton import LinRecConfig, linear_recurrence_triton

    cfg = LinRecConfig(4, 2, 1)
    a, b, initial, grad_h = make((2, 6, 3), seed=5)
    want = fp64_grads(naive, a, b, initial, grad_h)
    # Only b: the kernel skips da (need_da=False); only initial: b's gradient is not returned.
    bg = b.clone().requires_grad_()
    (db,) = torch.autograd.grad(linear_recurrence_triton(a, bg, initial=initial, config=cfg), bg, grad_h)
    assert rel(db, want[2]) < TOL
    ig = initial.clone().requires_grad_()
    (di,) = torch.autograd.grad(linear_recurrence_triton(a, b, initial=ig, config=cfg), ig, grad_h)
    assert rel(di, want[3]) < TOL
    empty = torch.zeros(0, 5, 3, requires_grad=True)
    h = linear_recurrence_triton(empty, empty, config=cfg)
    assert h.shape == (0, 5, 3)
    assert torch.autograd.grad(h.sum(), empty)[0].shape == (0, 5, 3)


def test_fp64_is_refused_by_the_kernel_and_routed_to_the_reference():
    from muse_lm.ops.scan.linrec_triton import linear_recurrence_triton

    a, b, initial, _ = make((1, 4, 3), dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="impl='torch'"):
        linear_recurrence(a, b, impl="triton")
    with pytest.raises(NotImplementedError, match="fp64"):
        linear_recurrence_triton(a, b)
    with pytest.raises(NotImplementedError, match="both float32"):
        linear_recurrence_triton(a.float(), b.bfloat16())
    # impl=None on CPU is the reference, in every dtype.
    assert torch.equal(linear_recurrence(a, b, initial=initial), linear_recurrence_reference(a, b, initial=initial))
    a32, b32 = a.float(), b.float()
    assert torch.equal(linear_recurrence(a32, b32, reverse=True), linear_recurrence_reference(a32, b32, reverse=True))


@pytest.mark.skipif(interpreter_enabled(), reason="checks the non-interpreter dispatch")
def test_triton_on_cpu_without_interpreter_is_refused():
    a, b, _, _ = make((1, 4, 3))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        linear_recurrence(a, b, impl="triton")


def test_bad_out_buffers_are_refused():
    from muse_lm.ops.scan.linrec_triton import linear_recurrence_backward, linear_recurrence_forward

    a, b, _, grad_h = make((1, 4, 3))
    with pytest.raises(ValueError, match="out must be a contiguous"):
        linear_recurrence_forward(a, b, out=torch.empty(1, 4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="db must be a contiguous"):
        linear_recurrence_backward(a, b, None, grad_h, out=(torch.empty(1, 4, 3), torch.empty(4, 3)))


def test_config_validation_and_default():
    from muse_lm.ops.scan.linrec_triton import CONFIGS, LinRecConfig, default_config

    with pytest.raises(ValueError, match="power of two"):
        LinRecConfig(48, 4, 4)
    with pytest.raises(ValueError, match="power of two"):
        LinRecConfig(64, 3, 4)
    with pytest.raises(ValueError, match="at least 2"):
        LinRecConfig(1, 4, 4)
    with pytest.raises(ValueError, match="num_warps"):
        LinRecConfig(64, 4, 3)
    assert len(set(CONFIGS)) == len(CONFIGS)
    for width in (1, 3, 4, 5, 64, 1000, 65536):
        cfg = default_config(width)
        assert cfg in CONFIGS and cfg.block_d <= max(4, 1 << (width - 1).bit_length())


def test_pruning_by_shared_memory_and_width():
    """A config survives when its estimated shared memory fits the cap and its channel block is not
    mostly idle; the smallest tile always survives."""
    from muse_lm.ops.scan.linrec_triton import CONFIGS, _triton_configs, prune_configs_for, smem_estimate

    configs = _triton_configs()
    assert len(prune_configs_for(configs, 1024, 227 * 1024)) == len(CONFIGS)
    assert len(prune_configs_for(configs, 1024, 99 * 1024)) == len(CONFIGS)  # all fit a consumer card
    cap = 30 * 1024  # the 2048-element tiles fit, the 4096-element one does not
    kept = prune_configs_for(configs, 1024, cap)
    assert kept and len(kept) < len(configs)
    assert all(smem_estimate(c.kwargs["BT"], c.kwargs["BD"]) <= cap for c in kept)
    narrow = prune_configs_for(configs, 3, 227 * 1024)
    assert narrow and all(c.kwargs["BD"] <= 4 for c in narrow)
    assert {c.kwargs["BD"] for c in prune_configs_for(configs, 64, 227 * 1024)} == {2, 4, 8, 16, 32, 64}
    assert len(prune_configs_for(configs, 1024, 1)) == 1  # nothing fits: the smallest tile runs
    assert smem_estimate(64, 32) < smem_estimate(128, 32) == smem_estimate(64, 64)
