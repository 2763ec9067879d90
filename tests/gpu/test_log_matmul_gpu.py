"""log_matmul's Triton kernels on a real GPU: every declared config on odd shapes, fp32 and bf16 inputs,
N(0, 10^2) log-values and rows spanning +-1000 (the range guards), C and both gradients vs float64
(outputs NaN-poisoned first), both dot precisions, and the default (autotuned) dispatch through the
public op with autograd. Skipped without CUDA."""

import pytest
import torch

from muse_lm.ops import log_matmul

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

NEG_INF = float("-inf")
# max |error| / max |float64 value| over finite entries; bf16 inputs are compared with the exact value
# for the bf16-rounded inputs, so only the bf16 rounding of C and the gradients adds.
TOL = {"fwd": 1e-5, "grad": {"n10": 1e-5, "pm1000": 1e-4, "bf16": 1e-2}}  # C is fp32 for every input dtype
SHAPES = [(1, 1, 1, 1), (1, 37, 45, 29), (2, 130, 257, 67), (1, 257, 1000, 129)]  # Bt, M, K, N


def _inputs(kind, shape, dtype, seed):
    bt, m, k, n = shape
    gen = torch.Generator(device="cuda").manual_seed(seed)
    if kind == "n10":
        a = 10 * torch.randn(bt, m, k, device="cuda", generator=gen)
        b = 10 * torch.randn(bt, k, n, device="cuda", generator=gen)
    else:
        a = 2000 * torch.rand(bt, m, k, device="cuda", generator=gen) - 1000
        b = 2000 * torch.rand(bt, k, n, device="cuda", generator=gen) - 1000
    grad = torch.randn(bt, m, n, device="cuda", generator=gen)
    return a.to(dtype), b.to(dtype), grad


def _reference(a, b, grad):
    """C and the closed-form gradients in float64, chunked over rows (weight 0 where C = -inf)."""
    a, b, grad = a.double(), b.double(), grad.double()
    cs, das, dbs = [], [], torch.zeros_like(b)
    for i0 in range(0, a.shape[1], 16):
        ai, gi = a[:, i0 : i0 + 16], grad[:, i0 : i0 + 16]
        terms = ai[..., :, :, None] + b[..., None, :, :]
        c = torch.logsumexp(terms, dim=-2)
        w = torch.exp(terms - c.masked_fill(c == NEG_INF, float("inf"))[..., :, None, :]) * gi[..., :, None, :]
        cs.append(c)
        das.append(w.sum(-1))
        dbs += w.sum(-3)
    return torch.cat(cs, 1), torch.cat(das, 1), dbs


def _rel(x, ref):
    x, ref = x.double(), ref.double()
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(x), finite), "non-finite entries differ from the float64 reference"
    return ((x - ref)[finite].abs().max() / ref[finite].abs().max().clamp_min(1e-30)).item()


def _nan(shape, dtype=torch.float32):
    return torch.full(shape, float("nan"), device="cuda", dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["n10", "pm1000"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-M{}-K{}-N{}".format(*s))
def test_every_config_matches_float64(shape, kind, dtype):
    from muse_lm.ops.log_matmul.triton import CONFIGS, log_matmul_backward, log_matmul_forward_with_flags

    a, b, grad = _inputs(kind, shape, dtype, seed=sum(shape))
    c_ref, da_ref, db_ref = _reference(a, b, grad)
    tol_grad = TOL["grad"][kind if dtype == torch.float32 else "bf16"]
    for cfg in CONFIGS:
        c, flags = log_matmul_forward_with_flags(a, b, cfg, out=_nan(grad.shape))
        assert _rel(c, c_ref) < TOL["fwd"], cfg
        if kind == "n10":
            assert not flags.any(), cfg
        da, db = log_matmul_backward(a, b, c, grad, cfg, out=(_nan(a.shape, dtype), _nan(b.shape, dtype)))
        assert da.dtype == db.dtype == dtype
        assert torch.isfinite(da).all() and torch.isfinite(db).all(), cfg
        assert _rel(da, da_ref) < tol_grad, cfg
        assert _rel(db, db_ref) < tol_grad, cfg
        again = log_matmul_backward(a, b, c, grad, cfg)
        assert torch.equal(da, again[0]) and torch.equal(db, again[1]), cfg  # no atomics: bitwise repeatable


def test_ieee_products_match_float64_too():
    from muse_lm.ops.log_matmul.triton import CONFIGS, log_matmul_backward, log_matmul_forward

    a, b, grad = _inputs("n10", (1, 257, 1000, 129), torch.float32, seed=3)
    c_ref, da_ref, db_ref = _reference(a, b, grad)
    for cfg in (CONFIGS[0], CONFIGS[-1]):
        c = log_matmul_forward(a, b, cfg, precision="ieee")
        assert _rel(c, c_ref) < TOL["fwd"], cfg
        da, db = log_matmul_backward(a, b, c, grad, cfg, precision="ieee")
        assert _rel(da, da_ref) < TOL["grad"]["n10"], cfg
        assert _rel(db, db_ref) < TOL["grad"]["n10"], cfg


def test_default_dispatch_is_triton_autotuned_with_batch_dims_and_neg_inf():
    a, b, grad = _inputs("n10", (2, 300, 513, 200), torch.float32, seed=4)
    a[0, 5] = NEG_INF
    b[1, :, 7] = NEG_INF
    a, b = a.requires_grad_(), b.requires_grad_()
    c = log_matmul(a[:, None], b[None])  # [2, 1, M, K] x [1, 2, K, N] -> [2, 2, M, N]
    assert c.shape == (2, 2, 300, 200)
    assert "LogMatmulTriton" in type(c.grad_fn.next_functions[0][0]).__name__
    assert (c[0, :, 5] == NEG_INF).all() and (c[:, 1, :, 7] == NEG_INF).all()
    gfull = grad[:, None].expand(2, 2, 300, 200)
    da, db = torch.autograd.grad(c, (a, b), gfull)
    assert torch.isfinite(da).all() and torch.isfinite(db).all() and (da[0, 5] == 0).all()
    for i in range(2):
        for j in range(2):
            c_ref, _, _ = _reference(a[i : i + 1].detach(), b[j : j + 1].detach(), grad[i : i + 1])
            assert _rel(c[i, j], c_ref[0]) < TOL["fwd"]
    # dA of batch row 0 collects the gradients of its products with both batch rows of B.
    da_ref = sum(_reference(a[:1].detach(), b[j : j + 1].detach(), grad[:1])[1] for j in range(2))
    assert _rel(da[:1], da_ref) < TOL["grad"]["n10"]
