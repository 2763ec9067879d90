"""SwiGLU keeps its gate and up for the backward but not their product (eager: a custom autograd
Function, bit-identical to the plain chain; compiled: a selective checkpoint the partitioner follows),
and RMSNorm hands on the autocast dtype under autocast."""

import pytest
import torch
import torch.nn.functional as F

from muse_lm.layers import RMSNorm, SwiGLU


def _plain(m: SwiGLU, x: torch.Tensor) -> torch.Tensor:
    gate, up = m.w13(x).split(m.hidden, dim=-1)
    return m.w2(F.silu(gate) * up)


def _run(fn, m: SwiGLU, x: torch.Tensor, autocast: bool):
    """(output, dx, dW13, dW2, shapes of the tensors autograd saved) of one forward + backward."""
    m.zero_grad(set_to_none=True)
    x.grad = None
    saved = []
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
            torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fn(x)
        weights = torch.linspace(-1, 1, y.numel()).view_as(y)  # a gradient that differs per element
        (y.float() * weights).sum().backward()
    return y.detach(), x.grad.clone(), m.w13.weight.grad.clone(), m.w2.weight.grad.clone(), saved


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_swiglu_eager_is_bit_identical_to_the_plain_chain_and_keeps_no_product(autocast):
    torch.manual_seed(0)
    m, hidden = SwiGLU(48, 80), 80
    x = torch.randn(2, 7, 48, requires_grad=True)
    *ours, saved = _run(m, m, x, autocast)
    *plain, plain_saved = _run(lambda x: _plain(m, x), m, x, autocast)
    for a, b, name in zip(ours, plain, ("y", "dx", "dW13", "dW2")):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert ours[3].dtype == torch.float32  # the fp32 parameter's gradient
    # gate and up are views of the w13 output's storage; the product would be a storage of its own.
    product_bytes = 2 * 7 * hidden * ours[0].element_size()
    storage = lambda ts: [t.untyped_storage().nbytes() for t in ts]  # noqa: E731
    assert product_bytes in storage(plain_saved)
    assert product_bytes not in storage(saved), storage(saved)


def test_swiglu_compiled_keeps_no_product_and_matches():
    torch.manual_seed(1)
    m = SwiGLU(64, 96)
    x = torch.randn(32, 64, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="aot_eager_decomp_partition", dynamic=False)
    *ours, saved = _run(compiled, m, x, True)
    *plain, _ = _run(lambda x: _plain(m, x), m, x, True)
    for a, b, name in zip(ours, plain, ("y", "dx", "dW13", "dW2")):
        assert torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2), name
    assert not any(tuple(t.shape) == (32, 96) for t in saved), [tuple(t.shape) for t in saved]
    assert any(tuple(t.shape) == (32, 192) for t in saved)  # gate and up: the w13 output, once


def test_swiglu_with_a_biased_down_projection_takes_its_own_forward():
    torch.manual_seed(2)
    m = SwiGLU(16, 32)
    m.w2 = torch.nn.Linear(32, 16)  # a bias: not the fused path
    x = torch.randn(3, 16)
    assert torch.equal(m(x), _plain(m, x))


def test_rms_norm_hands_on_the_autocast_dtype():
    torch.manual_seed(3)
    norm = RMSNorm(32)
    norm.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(4, 32)
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight
    assert norm(x).dtype == torch.float32 and torch.allclose(norm(x), want, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, want.to(torch.bfloat16))
    assert norm(x.double()).dtype == torch.float64  # no autocast: the input's dtype


def test_rms_norm_keeps_fp64_and_runs_on_devices_without_autocast():
    norm = RMSNorm(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert norm.double()(torch.randn(2, 8, dtype=torch.float64)).dtype == torch.float64
    meta = RMSNorm(8).to("meta")
    assert meta(torch.empty(2, 8, device="meta")).shape == (2, 8)  # no autocast on "meta": no error


def test_swiglu_refuses_a_double_backward_and_skips_frozen_inputs():
    torch.manual_seed(4)
    m = SwiGLU(16, 32)
    x = torch.randn(3, 16, requires_grad=True)
    (g,) = torch.autograd.grad(m(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="silu_backward"):
        g.sum().backward()
    m.w13.requires_grad_(False)
    m(torch.randn(3, 16)).sum().backward()  # gate and up need no gradient: only W2's is formed
    assert m.w13.weight.grad is None and m.w2.weight.grad is not None


def test_ar_ssm_conv_cache_keeps_the_parameters_dtype_under_autocast():
    """The norm hands the mixer bf16 under autocast; the conv cache it returns stays fp32 (the
    parameters' dtype), so a prefill under autocast loads into a decoder built without it."""
    from muse_lm.layers import AdaptiveRankSemiseparableLayer

    torch.manual_seed(5)
    layer = AdaptiveRankSemiseparableLayer(16, 4, num_heads=2).eval()
    x = torch.randn(1, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, _, state = layer(x.bfloat16(), return_state=True)
    assert state.conv.dtype == torch.float32
    _, _, plain = layer(x, return_state=True)
    assert plain.conv.dtype == torch.float32
