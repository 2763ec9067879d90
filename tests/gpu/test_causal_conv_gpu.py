"""causal_conv1d's Triton kernels on a real GPU: every declared config on odd T (1, 7, 63, 65, 1000,
4097) and D not a multiple of the channel block, fp32 and bf16 activations (fp32 weights, as under
autocast), with and without past and bias, y and every gradient against the fp64 definition with
outputs NaN-poisoned first; the backward bitwise repeatable; the public op inside torch.compile
(Inductor) equal to eager. Skipped without CUDA."""

import pytest
import torch

from muse_lm.ops import causal_conv1d

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# Max |error| / max |fp64 answer on the same rounded inputs|: fp32 math; bf16 rounds y and grad_x once.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _definition(x, weight, bias, past, grad_y):
    """(y, dx, dw, db, dpast) in fp64 by F.conv1d over cat(past, x), depthwise, then SiLU."""
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias, past)]
    xd, wd, bd, pd = leaves
    xp = torch.cat([pd, xd], 1).transpose(1, 2)
    y = torch.nn.functional.silu(torch.nn.functional.conv1d(xp, wd.unsqueeze(1), bd, groups=x.shape[2]))
    y = y.transpose(1, 2)
    return (y.detach(), *torch.autograd.grad(y, leaves, grad_y.double()))


def _problem(B, T, D, K, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(B, T, D, device="cuda", generator=g).to(dtype)
    weight = torch.randn(D, K, device="cuda", generator=g) / K**0.5
    bias = torch.randn(D, device="cuda", generator=g)
    past = torch.randn(B, K - 1, D, device="cuda", generator=g).to(dtype)
    grad_y = torch.randn(B, T, D, device="cuda", generator=g).to(dtype)
    return x, weight, bias, past, grad_y


def _rel(got, want):
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cfg_index", [0, 1, 2])
def test_every_config_every_length_matches_fp64(cfg_index, dtype, nan_empty):
    from muse_lm.ops.causal_conv.triton import CONV_CONFIGS, causal_conv1d_backward, causal_conv1d_forward

    cfg = CONV_CONFIGS[cfg_index]
    for T in (1, 7, 63, 65, 1000, 4097):
        for with_past, with_bias in ((False, True), (True, True), (True, False)):
            x, w, b, past, gy = _problem(3, T, 200, 4, dtype, seed=T)
            b = b if with_bias else torch.zeros_like(b)
            want = _definition(x, w, b, past if with_past else torch.zeros_like(past), gy)
            bias_arg, past_arg = (b if with_bias else None), (past if with_past else None)
            y = causal_conv1d_forward(x, w, bias_arg, past_arg, True, cfg)
            dx, dw, db, dp = causal_conv1d_backward(x, w, bias_arg, past_arg, gy, True, cfg)
            case = (cfg, dtype, T, with_past, with_bias)
            got = {"y": y, "dx": dx, "dw": dw, "db": db, "dpast": dp}
            for name, ref in zip(("y", "dx", "dw", "db", "dpast"), want):
                if got[name] is None:
                    assert (name == "db" and not with_bias) or (name == "dpast" and not with_past), case
                    continue
                assert torch.isfinite(got[name]).all(), (case, name)
                assert _rel(got[name], ref) < TOL[dtype], (case, name, _rel(got[name], ref))


def test_backward_is_bitwise_repeatable():
    from muse_lm.ops.causal_conv.triton import causal_conv1d_backward

    x, w, b, _, gy = _problem(16, 1024, 768, 4, torch.bfloat16, seed=1)
    first = causal_conv1d_backward(x, w, b, None, gy, True)
    for _ in range(3):
        again = causal_conv1d_backward(x, w, b, None, gy, True)
        for a, c in zip(first[:3], again[:3]):
            assert torch.equal(a, c)


def test_compiled_public_op_equals_eager():
    """Inside torch.compile (Inductor, as the model runs it) the custom op gives eager's y and gradients."""
    x, w, b, _, gy = _problem(4, 333, 96, 4, torch.bfloat16, seed=2)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        y = fn(*leaves)
        return (y.detach(), *torch.autograd.grad(y, leaves, gy))

    def op(x, w, b):
        return causal_conv1d(x, w, b) * 2.0

    eager = run(op)
    compiled = run(torch.compile(op, fullgraph=True))
    for a, c in zip(eager, compiled):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
