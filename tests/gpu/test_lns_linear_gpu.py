"""The LNSLinear Triton kernel on a real GPU: every declared config that fits the card, odd shapes,
bf16 / fp16 / fp32 x, forward and dx vs the fp64 reference of the same decoded weight (outputs
NaN-poisoned first), the autotuned dispatch with autograd, and LNSLinear modules on CUDA under
autocast. Skipped without CUDA."""

import pytest
import torch
from torch import nn

from muse_lm.layers import LNSLinear
from muse_lm.ops.lns_linear import lns_decode, lns_encode, lns_linear

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# max |err| / max |ref|: 16-bit x tiles and the decoded weight rounded to them (2^-8 relative each),
# fp32 accumulation; fp32 runs ieee dots.
TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-5}
# One row, odd sizes, and a many-tile odd shape: each (shape, dtype) compiles every config twice
# (forward and dx), which dominates this module's time, so no more shapes than these.
SHAPES = [(1, 64, 64), (37, 45, 70), (1027, 257, 1999)]


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _problem(m, k, n, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=gen).to(dtype)
    w = torch.randn(n, k, device="cuda", generator=gen) * 0.05
    codes, scale = lns_encode(w)
    bias = torch.randn(n, device="cuda", generator=gen).to(dtype)
    grad = torch.randn(m, n, device="cuda", generator=gen).to(dtype)
    return x, codes, scale, bias, grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_every_usable_config_matches_the_fp64_reference(shape, dtype):
    from muse_lm.ops.lns_linear.triton import lns_matmul_dx, lns_matmul_forward, usable_configs

    m, k, n = shape
    x, codes, scale, bias, grad = _problem(m, k, n, dtype, seed=m + k + n)
    w = lns_decode(codes, scale).double()
    ref = x.double() @ w.t() + bias.double()
    dx_ref = grad.double() @ w
    configs = usable_configs(x.device, x.element_size())
    assert configs
    for cfg in configs:
        poison = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
        y = lns_matmul_forward(x, codes, scale, bias, cfg, out=poison)
        assert torch.isfinite(y).all() and _rel(y, ref) < TOL[dtype], cfg
        poison = torch.full((m, k), float("nan"), device="cuda", dtype=dtype)
        dx = lns_matmul_dx(grad, codes, scale, cfg, out=poison)
        assert torch.isfinite(dx).all() and _rel(dx, dx_ref) < TOL[dtype], cfg


def _graph_names(fn, depth: int = 3) -> set[str]:
    """Class names of the autograd nodes within `depth` steps of `fn` (the op may end in a view)."""
    if fn is None or depth < 0:
        return set()
    names = {type(fn).__name__}
    for nxt, _ in fn.next_functions:
        names |= _graph_names(nxt, depth - 1)
    return names


def test_autotuned_dispatch_with_autograd_matches_the_reference():
    x, codes, scale, bias, grad = _problem(513, 384, 769, torch.bfloat16, seed=3)
    latent = lns_decode(codes, scale).requires_grad_()
    out = {}
    for impl in ("triton", "torch"):
        xi = x.detach().clone().requires_grad_()
        bi = bias.detach().clone().requires_grad_()
        li = latent.detach().clone().requires_grad_()
        y = lns_linear(xi, codes, scale, bi, latent=li, impl=impl)
        y.backward(grad)
        out[impl] = (y, xi.grad, bi.grad, li.grad)
    names = _graph_names(lns_linear(x.requires_grad_(), codes, scale).grad_fn)
    assert any(name.startswith("LNSLinearTriton") for name in names), names
    for got, want in zip(out["triton"], out["torch"]):
        assert torch.isfinite(got).all() and _rel(got, want) < 3e-2


def test_lns_linear_modules_on_cuda_under_autocast():
    torch.manual_seed(0)
    lin = nn.Linear(1024, 4096).cuda()
    x = torch.randn(4, 33, 1024, device="cuda")
    frozen = LNSLinear.from_linear(lin)
    trainable = LNSLinear.from_linear(lin, trainable=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_frozen = frozen(x)
        y_train = trainable(x)
        y_lin = lin(x)
    assert y_frozen.dtype == torch.bfloat16 and torch.equal(y_frozen, y_train)
    # 8-bit LNS weights: each off by at most 4.4%, errors mostly averaging out over K = 1024.
    assert _rel(y_frozen, y_lin) < 0.05
    y_train.float().sum().backward()
    assert trainable.weight.grad is not None and torch.isfinite(trainable.weight.grad).all()
    assert frozen.weight_bytes() == lin.weight.numel() + 4 * 4096  # 1 byte a weight + fp32 row scales


def test_large_batch_path_decodes_once_with_the_reference_rounding():
    from muse_lm.ops.lns_linear.triton import DECODE_GEMM_MIN_ROWS, decode_weight

    x, codes, scale, bias, grad = _problem(DECODE_GEMM_MIN_ROWS + 5, 384, 769, torch.bfloat16, seed=4)
    assert torch.equal(decode_weight(codes, scale, torch.bfloat16), lns_decode(codes, scale).bfloat16())
    out = {}
    for impl in ("triton", "torch"):
        xi = x.detach().clone().requires_grad_()
        y = lns_linear(xi, codes, scale, bias, impl=impl)
        y.backward(grad)
        out[impl] = (y, xi.grad)
    for got, want in zip(out["triton"], out["torch"]):
        assert _rel(got, want) < 1e-2
