"""causal_conv1d: the reference against F.conv1d's causal depthwise cross-correlation (values and
gradients, with and without a past, bias and SiLU), causality, input validation; the Triton kernels
against the fp64 definition through Triton's interpreter (every declared config, odd sizes, NaN-
poisoned outputs), through the custom op with autograd, and under torch.compile.

Triton reads TRITON_INTERPRET when its kernels are defined, so the interpreter tests run in a child
pytest process started with TRITON_INTERPRET=1 (`test_interpreter_suite`); here they are skipped.
"""

import pytest
import torch
import torch.nn.functional as F

from muse_lm.ops import causal_conv1d
from muse_lm.ops._dispatch import interpreter_enabled
from muse_lm.ops.causal_conv.reference import causal_conv1d_reference

interp = pytest.mark.skipif(not interpreter_enabled(), reason="runs in the TRITON_INTERPRET=1 child process")
NAN = float("nan")


def definition(x, weight, bias, past, silu):
    """F.conv1d over cat(past or zeros, x) in time, depthwise (groups = D), in x's dtype."""
    B, T, D = x.shape
    K = weight.shape[1]
    left = past if past is not None else x.new_zeros(B, K - 1, D)
    xp = torch.cat([left, x], 1).transpose(1, 2)
    y = F.conv1d(xp, weight.unsqueeze(1), bias, groups=D).transpose(1, 2)
    return F.silu(y) if silu else y


def problem(B, T, D, K, *, with_past, with_bias, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    return (rand(B, T, D), rand(D, K), rand(D) if with_bias else None,
            rand(B, K - 1, D) if with_past else None, rand(B, T, D))


def grads(fn, x, weight, bias, past, grad_y, silu):
    """(y, dx, dw, db | None, dpast | None) of fn in fp64."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, weight, bias, past)]
    y = fn(*leaves, silu)
    live = [t for t in leaves if t is not None]
    got = iter(torch.autograd.grad(y, live, grad_y.double()))
    return (y.detach(), *(next(got) if t is not None else None for t in leaves))


@pytest.mark.parametrize("with_past", [False, True], ids=["zeros", "past"])
@pytest.mark.parametrize("silu", [True, False], ids=["silu", "linear"])
def test_reference_is_the_causal_depthwise_conv(with_past, silu):
    args = problem(2, 9, 5, 4, with_past=with_past, with_bias=True)
    want = grads(definition, *args, silu)
    got = grads(lambda x, w, b, p, s: causal_conv1d(x, w, b, past=p, activation="silu" if s else None), *args, silu)
    for g, w in zip(got, want):
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_reference_is_causal_and_widens_16_bit_inputs():
    x, w, b, _, _ = problem(1, 12, 3, 4, with_past=False, with_bias=True)
    y = causal_conv1d_reference(x, w, b)
    x2 = x.clone()
    x2[:, 7:] += 1.0
    torch.testing.assert_close(causal_conv1d_reference(x2, w, b)[:, :7], y[:, :7], rtol=0, atol=0)
    # bf16 activations with fp32 weights: fp32 math, one rounding at the end.
    xb = x.to(torch.bfloat16)
    got = causal_conv1d_reference(xb, w.float(), b.float())
    assert got.dtype == torch.bfloat16
    want = definition(xb.double(), w, b, None, True)
    assert (got.double() - want).abs().max() <= 2**-8 * want.abs().max()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(x=torch.zeros(2, 3)), r"x must be \[B, T, D\]"),
        (dict(weight=torch.zeros(5, 4)), r"weight must be \[D, K\]"),
        (dict(weight=torch.zeros(4, 0)), r"weight must be \[D, K\]"),
        (dict(bias=torch.zeros(3)), r"bias must be \[D\]"),
        (dict(past=torch.zeros(2, 2, 4)), r"past must be \[B, K-1, D\]"),
        (dict(x=torch.zeros(2, 3, 4, dtype=torch.int64)), "float16/bfloat16/float32/float64"),
        (dict(activation="gelu"), "activation='gelu'"),
    ],
)
def test_bad_inputs_are_clear_errors(kwargs, match):
    args = dict(x=torch.zeros(2, 3, 4), weight=torch.zeros(4, 4), bias=None, past=None, activation="silu")
    args.update(kwargs)
    x, w = args.pop("x"), args.pop("weight")
    with pytest.raises(ValueError, match=match):
        causal_conv1d(x, w, args.pop("bias"), **args)


def test_triton_on_cpu_without_the_interpreter_or_fp64_is_refused():
    x, w, b, _, _ = problem(1, 3, 2, 4, with_past=False, with_bias=True)
    with pytest.raises(NotImplementedError, match="float64"):
        causal_conv1d(x, w, b, impl="triton")
    if not interpreter_enabled():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            causal_conv1d(x.float(), w.float(), b.float(), impl="triton")


@pytest.mark.skipif(interpreter_enabled(), reason="this is the parent of the interpreter run")
def test_interpreter_suite(interpreter_run):
    interpreter_run(__file__)


def check_kernels(cfg, B, T, D, K, with_past, with_bias, silu, seed=0):
    """The launchers with `cfg` (outputs NaN-poisoned) against the fp64 definition: y and every gradient."""
    from muse_lm.ops.causal_conv import triton as kernels

    args = problem(B, T, D, K, with_past=with_past, with_bias=with_bias, seed=seed, dtype=torch.float32)
    want = grads(definition, *args, silu)
    x, w, b, past, gy = args
    real_empty = torch.empty_like
    poisoned = lambda t, **kw: real_empty(t, **kw).fill_(NAN) if t.dtype.is_floating_point else real_empty(t, **kw)  # noqa: E731
    try:
        torch.empty_like = poisoned  # every output buffer the launchers allocate starts as NaN
        got = (kernels.causal_conv1d_forward(x, w, b, past, silu, cfg),
               *kernels.causal_conv1d_backward(x, w, b, past, gy, silu, cfg))
    finally:
        torch.empty_like = real_empty
    case = (cfg, B, T, D, K, with_past, with_bias, silu)
    for name, g, ref in zip(("y", "dx", "dw", "db", "dpast"), got, want):
        if ref is None:
            assert g is None, (case, name)
            continue
        assert g.shape == ref.shape and torch.isfinite(g).all(), (case, name)
        if ref.numel() == 0:  # K = 1: no past row
            continue
        err = (g.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)
        assert err < 1e-5, (case, name, err.item())


@interp
@pytest.mark.parametrize("cfg_index", [0, 1, 2])
def test_every_declared_config_matches_fp64(cfg_index):
    """T = 1, T inside one tile, T over several tiles and programs, D not a multiple of the channel
    block; with and without past and bias; SiLU and linear."""
    from muse_lm.ops.causal_conv.triton import CONV_CONFIGS

    cfg = CONV_CONFIGS[cfg_index]
    for B, T, D, K, with_past, with_bias, silu in [
        (2, 1, 3, 4, True, True, True),
        (1, 7, 5, 4, False, True, True),
        (2, 3 * cfg.block_t + 5, cfg.block_d + 3, 4, True, False, True),
        (1, 2 * cfg.block_t + 1, 6, 3, False, True, False),
        (1, 5, 4, 1, True, True, True),
    ]:
        check_kernels(cfg, B, T, D, K, with_past, with_bias, silu, seed=T)


@interp
def test_backward_programs_walk_many_tiles():
    """Enough rows that each backward program walks several tiles (its grad_w partial kept across them)."""
    from muse_lm.ops.causal_conv import triton as kernels
    from muse_lm.ops.causal_conv.triton import ConvConfig

    cfg = ConvConfig(4, 16, 1)
    before = kernels.TARGET_PROGRAMS
    kernels.TARGET_PROGRAMS = 4  # 50 tiles of 4 rows, 12 a program: 5 programs, the last one short
    try:
        assert kernels._tiles_per_program(1, 200, 1, cfg.block_t) == 12
        check_kernels(cfg, 1, 200, 9, 4, True, True, True, seed=3)
    finally:
        kernels.TARGET_PROGRAMS = before


@interp
def test_public_op_and_compile_through_the_custom_op():
    """impl='triton' (the custom op with autograd) equals the reference in y and every gradient, eagerly
    and inside torch.compile (fp32, CPU tensors under the interpreter)."""
    x, w, b, past, gy = problem(2, 11, 6, 4, with_past=True, with_bias=True, dtype=torch.float32)

    def run(impl, compiled=False):
        leaves = [t.clone().requires_grad_() for t in (x, w, b, past)]
        fn = lambda *t: causal_conv1d(t[0], t[1], t[2], past=t[3], impl=impl)  # noqa: E731
        if compiled:
            fn = torch.compile(fn, backend="aot_eager", fullgraph=True)
        y = fn(*leaves)
        return (y.detach(), *torch.autograd.grad(y, leaves, gy))

    want = run("torch")
    for compiled in (False, True):
        for g, r in zip(run("triton", compiled), want):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@interp
def test_no_tokens_give_zero_gradients():
    """T = 0 with a past: nothing reads the past, so its gradient is zeros (not an unwritten buffer)."""
    from muse_lm.ops.causal_conv.triton import causal_conv1d_backward

    x, w, b, past, _ = problem(2, 1, 5, 4, with_past=True, with_bias=True, dtype=torch.float32)
    x = x[:, :0]
    real_empty = torch.empty_like
    try:
        torch.empty_like = lambda t, **kw: real_empty(t, **kw).fill_(NAN)  # noqa: E731
        dx, dw, db, dpast = causal_conv1d_backward(x, w, b, past, x.clone(), True)
    finally:
        torch.empty_like = real_empty
    assert dx.shape == x.shape
    for g in (dw, db, dpast):
        assert torch.equal(g, torch.zeros_like(g))
