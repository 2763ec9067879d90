"""linear_recurrence: parallel scan vs a python-loop definition, reverse identity, gradients."""

import pytest
import torch
from torch.testing import assert_close

from muse_lm.ops import linear_recurrence
from muse_lm.ops._dispatch import interpreter_enabled

F64 = dict(rtol=1e-10, atol=1e-10)


def naive(a, b, initial=None, reverse=False):
    """The definition, one token at a time, in float64."""
    a, b = a.double(), b.double()
    h = torch.zeros_like(a[:, 0]) if initial is None else initial.double()
    order = range(a.shape[1] - 1, -1, -1) if reverse else range(a.shape[1])
    out = [None] * a.shape[1]
    for t in order:
        h = a[:, t] * h + b[:, t]
        out[t] = h
    return torch.stack(out, 1)


def make(shape, seed=0, dtype=torch.float64):
    """a in [-1.1, 1.1] with exact zeros sprinkled in, b normal, initial normal."""
    gen = torch.Generator().manual_seed(seed)
    a = 2.2 * torch.rand(shape, generator=gen, dtype=torch.float64) - 1.1
    a = torch.where(torch.rand(shape, generator=gen, dtype=torch.float64) < 0.1, torch.zeros_like(a), a)
    b = torch.randn(shape, generator=gen, dtype=torch.float64)
    initial = torch.randn(shape[:1] + shape[2:], generator=gen, dtype=torch.float64)
    return a.to(dtype), b.to(dtype), initial.to(dtype)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("shape", [(2, 1), (2, 5, 3), (1, 33, 2, 4), (3, 100, 7)])
def test_matches_naive(shape, reverse):
    a, b, initial = make(shape)
    assert (a < 0).any() or shape[1] == 1
    for init in (None, initial):
        h = linear_recurrence(a, b, reverse=reverse, initial=init)
        assert h.shape == a.shape and h.dtype == torch.float64
        assert_close(h, naive(a, b, init, reverse), **F64)


def test_zero_a_cuts_the_history():
    a, b, initial = make((2, 9, 3))
    a[:, 4] = 0.0
    h = linear_recurrence(a, b, initial=initial)
    # With a_5 = 0, h_5 = b_5 whatever came before.
    assert torch.equal(h[:, 4], b[:, 4])


@pytest.mark.parametrize("length", [1, 5, 33])
def test_reverse_is_exactly_the_flipped_forward(length):
    a, b, initial = make((2, length, 3), dtype=torch.float32)
    h_rev = linear_recurrence(a, b, reverse=True, initial=initial)
    h_flip = linear_recurrence(a.flip(1), b.flip(1), initial=initial).flip(1)
    assert torch.equal(h_rev, h_flip)


def test_fp32_and_bf16():
    a, b, initial = make((2, 100, 3))
    ref = naive(a, b, initial)
    h32 = linear_recurrence(a.float(), b.float(), initial=initial.float())
    assert h32.dtype == torch.float32
    assert_close(h32.double(), ref, rtol=1e-5, atol=1e-5)
    a16, b16 = a.bfloat16(), b.bfloat16()
    h16 = linear_recurrence(a16, b16, initial=initial)
    assert h16.dtype == torch.bfloat16
    # Computed in fp32 from the rounded inputs: only the output rounding remains.
    ref16 = naive(a16, b16, initial)
    assert ((h16.double() - ref16).norm() / ref16.norm()) < 4e-3


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("length", [1, 6])
def test_gradcheck(length, reverse):
    a, b, initial = (t.requires_grad_() for t in make((2, length, 2), seed=3))
    fn = lambda a, b, init: linear_recurrence(a, b, reverse=reverse, initial=init)
    assert torch.autograd.gradcheck(fn, (a, b, initial))


def test_gradients_match_naive_autograd():
    # Larger T than gradcheck can afford: the custom backward against autograd through the loop.
    a, b, initial = make((2, 37, 3), seed=4)
    grad_out = torch.randn(2, 37, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for reverse in (False, True):
        leaves = [t.clone().requires_grad_() for t in (a, b, initial)]
        fast = torch.autograd.grad(
            linear_recurrence(*leaves[:2], reverse=reverse, initial=leaves[2]), leaves, grad_out
        )
        slow = torch.autograd.grad(naive(*leaves[:2], leaves[2], reverse), leaves, grad_out)
        for g_fast, g_slow in zip(fast, slow):
            assert_close(g_fast, g_slow, **F64)


def test_no_initial_gives_grads_for_a_and_b():
    a, b, _ = make((1, 8, 2), seed=6)
    a.requires_grad_()
    b.requires_grad_()
    linear_recurrence(a, b).sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


@pytest.mark.parametrize(
    "case",
    ["a-1d", "T0", "shape-mismatch", "dtype-mismatch", "int", "initial-shape", "not-tensor", "impl-bogus"],
)
def test_bad_inputs_raise_value_error(case):
    a, b, initial = make((2, 5, 3), dtype=torch.float32)
    calls = {
        "a-1d": lambda: linear_recurrence(a[0, 0], b[0, 0]),
        "T0": lambda: linear_recurrence(a[:, :0], b[:, :0]),
        "shape-mismatch": lambda: linear_recurrence(a, b[:, :4]),
        "dtype-mismatch": lambda: linear_recurrence(a, b.double()),
        "int": lambda: linear_recurrence(a.long(), b.long()),
        "initial-shape": lambda: linear_recurrence(a, b, initial=initial[:, :2]),
        "not-tensor": lambda: linear_recurrence(a, [1.0]),
        "impl-bogus": lambda: linear_recurrence(a, b, impl="cuda"),
    }
    with pytest.raises(ValueError, match="linear_recurrence"):
        calls[case]()


def test_triton_impl_refused_on_cpu_without_the_interpreter_and_for_fp64():
    a, b, _ = make((1, 4, 2), dtype=torch.float32)
    if not interpreter_enabled():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            linear_recurrence(a, b, impl="triton")
    with pytest.raises(NotImplementedError):
        linear_recurrence(a.double(), b.double(), impl="triton")
