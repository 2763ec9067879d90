"""semiseparable_scan / semiseparable_step: chunked form vs the quadratic and recurrent oracles."""

import pytest
import torch
from torch.testing import assert_close

from muse_lm.ops import semiseparable_scan, semiseparable_step
from muse_lm.ops._dispatch import interpreter_enabled
from muse_lm.ops.semiseparable.reference import semiseparable_quadratic, semiseparable_recurrent

F64 = dict(rtol=1e-9, atol=1e-9)


def make_inputs(b, t, h, r, p, *, dtype=torch.float64, decay=(-1.0, 0.0), seed=0):
    """x [B,T,H,P], u, v [B,T,H,R], log_a [B,T,H] uniform in `decay`, initial state [B,H,R,P]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, h, p, generator=gen, dtype=torch.float64)
    u = torch.randn(b, t, h, r, generator=gen, dtype=torch.float64)
    v = torch.randn(b, t, h, r, generator=gen, dtype=torch.float64)
    lo, hi = decay
    log_a = lo + (hi - lo) * torch.rand(b, t, h, generator=gen, dtype=torch.float64)
    h0 = torch.randn(b, h, r, p, generator=gen, dtype=torch.float64)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return x.to(dtype), u.to(dtype), v.to(dtype), log_a.to(state_dtype), h0.to(state_dtype)


@pytest.mark.parametrize("heads", [2, 3])
@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("length", [1, 7, 64, 65, 130])
def test_chunked_matches_quadratic_and_recurrent(length, chunk_size, heads):
    x, u, v, log_a, h0 = make_inputs(2, length, heads, 3, 5)
    kw = dict(initial_state=h0, output_final_state=True)
    y, final = semiseparable_scan(x, u, v, log_a, chunk_size=chunk_size, **kw)
    y_rec, final_rec = semiseparable_recurrent(x, u, v, log_a, **kw)
    y_quad, final_quad = semiseparable_quadratic(x, u, v, log_a, **kw)
    assert y.shape == (2, length, heads, 5) and final.shape == (2, heads, 3, 5)
    assert_close(y, y_rec, **F64)
    assert_close(final, final_rec, **F64)
    assert_close(y_quad, y_rec, **F64)
    assert_close(final_quad, final_rec, **F64)


def test_no_initial_state_and_no_final_state():
    x, u, v, log_a, _ = make_inputs(1, 9, 2, 3, 5)
    y, final = semiseparable_scan(x, u, v, log_a, chunk_size=4)
    assert final is None
    assert_close(y, semiseparable_recurrent(x, u, v, log_a)[0], **F64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_strong_decay_stays_finite(dtype):
    # log_a in [-20, -12]: a chunk's cumulative log-decay reaches below -1000, far past where
    # exp(+cum) overflows (about 88 in fp32, 709 in fp64).
    x, u, v, log_a, h0 = make_inputs(2, 130, 2, 3, 5, dtype=dtype, decay=(-20.0, -12.0))
    assert log_a[:, :64].cumsum(1).min() < -1000
    leaves = [t.clone().requires_grad_() for t in (x, u, v, log_a, h0)]
    y, final = semiseparable_scan(
        *leaves[:4], initial_state=leaves[4], output_final_state=True, chunk_size=64
    )
    assert torch.isfinite(y).all() and torch.isfinite(final).all()
    (y.sum() + final.sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)
    y, final = y.detach(), final.detach()
    to64 = lambda t: t.double()
    y_rec, final_rec = semiseparable_recurrent(
        *map(to64, (x, u, v, log_a)), initial_state=to64(h0), output_final_state=True
    )
    tol = F64 if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    assert_close(y.double(), y_rec, **tol)
    assert_close(final.double(), final_rec, **tol)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_cu_seqlens_equals_separate_sequences(index_dtype):
    bounds = [0, 5, 6, 6, 40, 71]  # a length-1 segment and an empty one
    n_seq = len(bounds) - 1
    x, u, v, log_a, _ = make_inputs(1, bounds[-1], 2, 3, 5)
    h0 = torch.randn(n_seq, 2, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cu = torch.tensor(bounds, dtype=index_dtype)
    y, final = semiseparable_scan(
        x, u, v, log_a, initial_state=h0, output_final_state=True, cu_seqlens=cu, chunk_size=16
    )
    assert final.shape == (n_seq, 2, 3, 5)
    for n, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if start == end:
            assert_close(final[n], h0[n], rtol=0, atol=0)
            continue
        seg = [t[:, start:end] for t in (x, u, v, log_a)]
        y_n, final_n = semiseparable_recurrent(*seg, initial_state=h0[n : n + 1], output_final_state=True)
        assert_close(y[:, start:end], y_n, **F64)
        assert_close(final[n : n + 1], final_n, **F64)
    y_quad, final_quad = semiseparable_quadratic(
        x, u, v, log_a, initial_state=h0, output_final_state=True, cu_seqlens=cu
    )
    assert_close(y, y_quad, **F64)
    assert_close(final, final_quad, **F64)


def test_bf16_inputs_are_computed_in_fp32():
    x, u, v, log_a, h0 = make_inputs(2, 100, 2, 3, 5, dtype=torch.bfloat16)
    y, final = semiseparable_scan(x, u, v, log_a, initial_state=h0, output_final_state=True, chunk_size=16)
    assert y.dtype == torch.bfloat16 and final.dtype == torch.float32
    # The oracle sees the same (bf16-rounded) inputs in fp64: what is left is y's final rounding.
    y_ref, final_ref = semiseparable_recurrent(
        x.double(), u.double(), v.double(), log_a.double(), initial_state=h0.double(), output_final_state=True
    )
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
    assert rel(y, y_ref) < 4e-3  # bf16 unit roundoff 2^-8, RMS about 2^-8 / sqrt(3)
    assert rel(final, final_ref) < 1e-6  # the state never passes through bf16


def test_gradcheck():
    x, u, v, log_a, h0 = make_inputs(1, 5, 2, 2, 3)
    leaves = [t.clone().requires_grad_() for t in (x, u, v, log_a, h0)]

    def fn(x, u, v, log_a, h0):
        return semiseparable_scan(x, u, v, log_a, initial_state=h0, output_final_state=True, chunk_size=2)

    assert torch.autograd.gradcheck(fn, leaves)


def test_gradcheck_cu_seqlens():
    x, u, v, log_a, _ = make_inputs(1, 6, 1, 2, 2)
    h0 = torch.randn(2, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    leaves = [t.clone().requires_grad_() for t in (x, u, v, log_a, h0)]
    cu = torch.tensor([0, 1, 6])

    def fn(x, u, v, log_a, h0):
        return semiseparable_scan(
            x, u, v, log_a, initial_state=h0, output_final_state=True, cu_seqlens=cu, chunk_size=2
        )

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("with_initial", [False, True])
def test_step_equals_scan_token_by_token(with_initial):
    x, u, v, log_a, h0 = make_inputs(2, 19, 3, 3, 5)
    initial = h0 if with_initial else None
    y, final = semiseparable_scan(
        x, u, v, log_a, initial_state=initial, output_final_state=True, chunk_size=8
    )
    state = initial
    for t in range(x.shape[1]):
        y_t, state = semiseparable_step(x[:, t], u[:, t], v[:, t], log_a[:, t], state)
        assert_close(y_t, y[:, t], **F64)
    assert_close(state, final, **F64)


def _bad_scan_calls():
    x, u, v, log_a, h0 = make_inputs(2, 6, 2, 3, 5, dtype=torch.float32)
    cu = torch.tensor([0, 2, 6])
    one = lambda t: t[:1]
    return {
        "x-3d": lambda: semiseparable_scan(x[..., 0], u, v, log_a),
        "u-wrong-T": lambda: semiseparable_scan(x, u[:, :5], v, log_a),
        "v-wrong-R": lambda: semiseparable_scan(x, u, v[..., :2], log_a),
        "log_a-wrong-shape": lambda: semiseparable_scan(x, u, v, log_a[:, :, :1]),
        "log_a-bf16": lambda: semiseparable_scan(x, u, v, log_a.bfloat16()),
        "x-int": lambda: semiseparable_scan(x.long(), u, v, log_a),
        "mixed-dtypes": lambda: semiseparable_scan(x.bfloat16(), u, v, log_a),
        "T0": lambda: semiseparable_scan(x[:, :0], u[:, :0], v[:, :0], log_a[:, :0]),
        "chunk0": lambda: semiseparable_scan(x, u, v, log_a, chunk_size=0),
        "state-shape": lambda: semiseparable_scan(x, u, v, log_a, initial_state=h0[:, :, :2]),
        "state-bf16": lambda: semiseparable_scan(x, u, v, log_a, initial_state=h0.bfloat16()),
        "cu-batch2": lambda: semiseparable_scan(x, u, v, log_a, cu_seqlens=cu),
        "cu-float": lambda: semiseparable_scan(*map(one, (x, u, v, log_a)), cu_seqlens=cu.float()),
        "cu-2d": lambda: semiseparable_scan(*map(one, (x, u, v, log_a)), cu_seqlens=cu[None]),
        "cu-not-0": lambda: semiseparable_scan(*map(one, (x, u, v, log_a)), cu_seqlens=cu + 1),
        "cu-not-T": lambda: semiseparable_scan(*map(one, (x, u, v, log_a)), cu_seqlens=torch.tensor([0, 5])),
        "cu-decreasing": lambda: semiseparable_scan(
            *map(one, (x, u, v, log_a)), cu_seqlens=torch.tensor([0, 4, 3, 6])
        ),
        "cu-state-count": lambda: semiseparable_scan(
            *map(one, (x, u, v, log_a)), cu_seqlens=cu, initial_state=h0[:1]
        ),
        "impl-bogus": lambda: semiseparable_scan(x, u, v, log_a, impl="cuda"),
        "step-shape": lambda: semiseparable_step(x[:, 0], u[:, 0], v[:, 0], log_a[:, 0, :1], None),
        "step-state": lambda: semiseparable_step(x[:, 0], u[:, 0], v[:, 0], log_a[:, 0], h0[0]),
        "step-u-dtype": lambda: semiseparable_step(x[:, 0], u[:, 0].double(), v[:, 0], log_a[:, 0], None),
    }


@pytest.mark.parametrize("case", list(_bad_scan_calls()))
def test_bad_inputs_raise_value_error(case):
    with pytest.raises(ValueError, match="semiseparable_s"):
        _bad_scan_calls()[case]()


def test_triton_impl_refused_where_it_cannot_run():
    x, u, v, log_a, h0 = make_inputs(1, 4, 1, 2, 2, dtype=torch.float32)
    if not interpreter_enabled():  # the kernels exist, but CPU tensors need the interpreter
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            semiseparable_scan(x, u, v, log_a, impl="triton")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            semiseparable_step(x[:, 0], u[:, 0], v[:, 0], log_a[:, 0], h0, impl="triton")
    with pytest.raises(NotImplementedError):  # fp64 has no kernel: it always runs on the reference
        semiseparable_scan(x.double(), u.double(), v.double(), log_a.double(), impl="triton")
