"""log_matmul's chunked torch reference (and the public op on CPU) vs the float64 definition
logsumexp_k(A_ik + B_kj): N(0, 10^2) log-values, rows spanning +-1000 (where exp-matmul-log fails),
-inf entries, chunk boundaries, batch broadcasting, bf16 inputs; gradients by gradcheck in fp64 and
against autograd of the definition; input validation. The Triton kernels are checked in
test_log_matmul_triton.py (interpreter) and tests/gpu/test_log_matmul_gpu.py.
"""

import pytest
import torch

from muse_lm.ops import log_matmul
from muse_lm.ops.log_matmul.reference import (
    chunk_sizes,
    default_chunk_elements,
    log_matmul_reference,
    log_matmul_reference_backward,
    log_matmul_reference_forward,
)

NEG_INF = float("-inf")
# max |error| / max |float64 value| over the finite outputs (or gradients), by input kind.
TOL = {"fwd": 1e-6, "grad": {"n10": 1e-5, "pm1000": 1e-4}}


def naive(a, b):
    """The definition in float64: logsumexp over k of A[..., i, k] + B[..., k, j] (materialized)."""
    return torch.logsumexp(a.double()[..., :, :, None] + b.double()[..., None, :, :], dim=-2)


def naive_grads(a, b, grad):
    ad, bd = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    return torch.autograd.grad(naive(ad, bd), (ad, bd), grad.double())


def closed_form_grads(a, b, grad):
    """dA, dB = sum over j / i of g_ij exp(A_ik + B_kj - C_ij) in float64, weight 0 where C = -inf
    (where autograd of logsumexp gives NaN)."""
    a, b, grad = a.detach().double(), b.detach().double(), grad.double()
    c = naive(a, b)
    w = torch.exp(a[:, :, None] + b[None] - c.masked_fill(c == NEG_INF, float("inf"))[:, None, :])
    w = w * grad[:, None, :]
    return w.sum(2), w.sum(0)


def rel(x, ref):
    """max |x - ref| / max |ref| over ref's finite entries; x must be non-finite exactly where ref is."""
    x, ref = x.double(), ref.double()
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(x), finite), "non-finite entries differ from the float64 reference"
    assert torch.equal(x[~finite], ref[~finite]), "the -inf entries differ"
    return ((x - ref)[finite].abs().max() / ref[finite].abs().max().clamp_min(1e-30)).item()


def inputs(kind, shape_a, shape_b, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if kind == "n10":  # log-values of widely spread magnitudes: the benchmark's data
        return 10 * torch.randn(shape_a, generator=gen), 10 * torch.randn(shape_b, generator=gen)
    if kind == "pm1000":  # every row and column spans +-1000: exp() over- and underflows
        return 2000 * torch.rand(shape_a, generator=gen) - 1000, 2000 * torch.rand(shape_b, generator=gen) - 1000
    raise ValueError(kind)


def unsafe(a, b):
    """The naive fast path exp -> matmul -> log that the op exists to replace."""
    return torch.log(torch.exp(a) @ torch.exp(b))


@pytest.mark.parametrize("kind", ["n10", "pm1000"])
def test_reference_matches_float64_where_exp_matmul_log_fails(kind):
    a, b = inputs(kind, (2, 7, 45), (2, 45, 9))
    ref = naive(a, b)
    c = log_matmul_reference(a, b)
    assert c.dtype == torch.float32 and c.shape == (2, 7, 9)
    assert rel(c, ref) < TOL["fwd"]
    assert rel(log_matmul(a, b), ref) < TOL["fwd"]  # the public op on CPU is the reference
    if kind == "pm1000":
        assert not torch.isfinite(unsafe(a, b)).any()


def test_neg_inf_entries_give_exact_minus_inf_and_zero_nan_free_gradients():
    a, b = inputs("n10", (6, 5), (5, 4), seed=1)
    a[0] = NEG_INF  # a row with no finite term
    b[:, 1] = NEG_INF  # a column with no finite term
    a[1], b[:, 2] = NEG_INF, NEG_INF
    a[1, 0], b[3, 2] = 0.5, 0.25  # row 1 and column 2 are finite only at different k: output (1, 2) is -inf
    a[2, 1:4] = NEG_INF  # scattered -inf that leave finite outputs
    a, b = a.requires_grad_(), b.requires_grad_()
    c = log_matmul(a, b)
    ref = naive(a.detach(), b.detach())
    assert rel(c.detach(), ref) < TOL["fwd"]
    assert (c[0] == NEG_INF).all() and (c[:, 1] == NEG_INF).all() and c[1, 2] == NEG_INF
    assert torch.isfinite(c[3:, [0, 2, 3]]).all()
    grad = torch.randn(c.shape, generator=torch.Generator().manual_seed(2), dtype=c.dtype)
    da, db = torch.autograd.grad(c, (a, b), grad)
    assert torch.isfinite(da).all() and torch.isfinite(db).all()
    assert (da[0] == 0).all() and (db[:, 1] == 0).all() and (da[a.detach() == NEG_INF] == 0).all()
    da_ref, db_ref = closed_form_grads(a, b, grad)
    assert rel(da, da_ref) < TOL["grad"]["n10"] and rel(db, db_ref) < TOL["grad"]["n10"]


def test_k_zero_is_minus_inf_and_empty_outputs_are_empty():
    c = log_matmul(torch.zeros(3, 0), torch.zeros(0, 2))
    assert c.shape == (3, 2) and (c == NEG_INF).all()
    assert log_matmul(torch.zeros(0, 4), torch.zeros(4, 5)).shape == (0, 5)
    a = torch.zeros(2, 0, requires_grad=True)
    b = torch.zeros(0, 3, requires_grad=True)
    da, db = torch.autograd.grad(log_matmul(a, b).exp().sum(), (a, b))
    assert da.shape == (2, 0) and db.shape == (0, 3)


def test_chunks_respect_the_budget_and_do_not_change_the_result():
    cases = [(1, 300, 50, 200, 1000), (4, 3, 7, 5, 10**6), (2, 9, 5000, 9, 1000), (3, 1, 1, 1, 1)]
    for batch, m, k, n, budget in cases:
        cb, cm, cn = chunk_sizes(batch, m, k, n, budget)
        assert 1 <= cb <= batch and 1 <= cm <= m and 1 <= cn <= n
        assert cb * cm * k * cn <= budget or (cb, cm, cn) == (1, 1, 1)  # one (1, K, 1) slice at least
    assert default_chunk_elements(torch.float32) * 4 * 3 <= 64 * 2**20
    with pytest.raises(ValueError, match="max_elements"):
        chunk_sizes(1, 1, 1, 1, 0)
    a, b = inputs("pm1000", (3, 11, 13), (3, 13, 10), seed=3)
    whole = log_matmul_reference_forward(a, b)
    # 13 * 5 * 2 = 130 elements a chunk: 2 columns, 5 rows, 1 batch entry at a time (ragged ends).
    pieces = log_matmul_reference_forward(a, b, max_chunk_elements=130)
    torch.testing.assert_close(pieces, whole, rtol=1e-6, atol=0)
    grad = torch.randn(3, 11, 10, generator=torch.Generator().manual_seed(4))
    for got, want in zip(
        log_matmul_reference_backward(a, b, whole, grad, max_chunk_elements=130),
        log_matmul_reference_backward(a, b, whole, grad),
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["n10", "pm1000"])
def test_chunked_gradients_match_autograd_of_the_definition(kind):
    a, b = inputs(kind, (2, 9, 17), (2, 17, 6), seed=5)
    a, b = a.requires_grad_(), b.requires_grad_()
    grad = torch.randn(2, 9, 6, generator=torch.Generator().manual_seed(6))
    da, db = torch.autograd.grad(log_matmul_reference(a, b, max_chunk_elements=17 * 4), (a, b), grad)
    da_ref, db_ref = naive_grads(a, b, grad)
    assert rel(da, da_ref) < TOL["grad"][kind] and rel(db, db_ref) < TOL["grad"][kind]
    # fp64 inputs stay fp64 end to end and agree to fp64 rounding.
    ad, bd = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    got = torch.autograd.grad(log_matmul(ad, bd), (ad, bd), grad.double())
    assert got[0].dtype == torch.float64
    assert rel(got[0], da_ref) < 1e-12 and rel(got[1], db_ref) < 1e-12


def test_gradcheck_fp64_tiny_with_batch_broadcast_and_neg_inf_entries():
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(2, 1, 3, 4, generator=gen, dtype=torch.float64)
    b = 3 * torch.randn(3, 4, 2, generator=gen, dtype=torch.float64)
    a[0, 0, 1, 2] = NEG_INF  # a zero probability inside otherwise finite sums
    a.requires_grad_()
    b.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: log_matmul(x, y), (a, b))
    assert torch.autograd.gradcheck(lambda x, y: log_matmul_reference(x, y, max_chunk_elements=8), (a[0], b[:1]))


def test_batch_dims_broadcast_like_matmul():
    a, b = inputs("n10", (2, 1, 5, 6), (3, 6, 4), seed=8)
    c = log_matmul(a, b)
    assert c.shape == (2, 3, 5, 4)
    for i in range(2):
        for j in range(3):
            assert rel(c[i, j], naive(a[i, 0], b[j])) < TOL["fwd"]


def test_bf16_inputs_are_computed_in_fp32_and_returned_in_bf16():
    a, b = inputs("n10", (5, 33), (33, 7), seed=9)
    a16, b16 = a.bfloat16().requires_grad_(), b.bfloat16().requires_grad_()
    c = log_matmul(a16, b16)
    assert c.dtype == torch.bfloat16
    ref = naive(a16.detach(), b16.detach())  # the exact value for the bf16-rounded inputs
    assert ((c.double() - ref).abs() <= 2**-8 * ref.abs()).all()  # bf16 rounding of the output only
    da, db = torch.autograd.grad(c.float().sum(), (a16, b16))
    assert da.dtype == db.dtype == torch.bfloat16
    da_ref, db_ref = naive_grads(a16, b16, torch.ones(5, 7))
    assert rel(da, da_ref) < 1e-2 and rel(db, db_ref) < 1e-2


def test_invalid_inputs_raise_with_the_fix():
    x = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="disagree on K"):
        log_matmul(x, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="dtypes match"):
        log_matmul(x, torch.zeros(4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="at least 2 dims"):
        log_matmul(torch.zeros(4), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="float16, bfloat16, float32 or float64"):
        log_matmul(torch.zeros(3, 4, dtype=torch.int64), torch.zeros(4, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="torch.Tensor"):
        log_matmul([[0.0]], torch.zeros(1, 1))
    with pytest.raises(ValueError, match="do not broadcast"):
        log_matmul(torch.zeros(2, 3, 4), torch.zeros(3, 4, 2))
    with pytest.raises(ValueError, match="impl="):
        log_matmul(x, torch.zeros(4, 2), impl="cuda")
    with pytest.raises(NotImplementedError, match="impl='torch'"):
        log_matmul(x.double(), torch.zeros(4, 2, dtype=torch.float64), impl="triton")
    with pytest.raises(ValueError, match=r"\[Bt,M,K\]"):
        log_matmul_reference(x, torch.zeros(4, 2))
