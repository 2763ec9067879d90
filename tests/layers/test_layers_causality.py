"""Every layer is causal: perturbing token t+1 leaves all outputs at positions <= t unchanged."""

import pytest
import torch

from muse_lm.layers import AdaptiveRankSemiseparableLayer, BKSpectralFeatures, HTTEmbedding, RMSNorm, SwiGLU
from muse_lm.layers.ar_ssm import ARSSMState


def _assert_causal(fn, x: torch.Tensor, t: int) -> None:
    y0 = fn(x)
    x1 = x.clone()
    x1[:, t + 1 :] += torch.randn_like(x1[:, t + 1 :])
    y1 = fn(x1)
    torch.testing.assert_close(y1[:, : t + 1], y0[:, : t + 1], rtol=0, atol=1e-12)
    assert not torch.allclose(y1[:, t + 1 :], y0[:, t + 1 :]), "perturbation did not reach later outputs"


@pytest.mark.parametrize("gate_mode", ["soft", "ste", "gumbel"])
def test_ar_ssm_is_causal(gate_mode):
    torch.manual_seed(0)
    layer = AdaptiveRankSemiseparableLayer(16, max_rank=6, min_rank=2, num_heads=2, chunk_size=8,
                                           gate_mode=gate_mode).double().eval()
    x = torch.randn(2, 21, 16, dtype=torch.float64)
    for t in (0, 7, 8, 19):
        _assert_causal(lambda z: layer(z)[0], x, t)


def test_bk_features_are_causal():
    torch.manual_seed(0)
    bk = BKSpectralFeatures(16, num_heads=3).double()
    x = torch.randn(2, 17, 16, dtype=torch.float64)
    for t in (0, 5, 15):
        _assert_causal(lambda z: bk(z)[0].double(), x, t)


def test_pointwise_layers_are_causal():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    _assert_causal(RMSNorm(16).double(), x, 3)
    _assert_causal(SwiGLU(16, 32).double(), x, 3)


def test_htt_embedding_is_per_token():
    emb = HTTEmbedding(50, 12, rank=3).double()
    ids = torch.randint(0, 50, (2, 8))
    out0 = emb(ids)
    ids2 = ids.clone()
    ids2[:, 5:] = (ids2[:, 5:] + 1) % 50
    torch.testing.assert_close(emb(ids2)[:, :5], out0[:, :5], rtol=0, atol=0)


def test_ar_ssm_conv_equals_causal_depthwise_conv1d():
    """The shifted multiply-add conv is F.conv1d's causal depthwise cross-correlation, with and
    without cached left context, values and gradients."""
    torch.manual_seed(0)
    layer = AdaptiveRankSemiseparableLayer(24, 8, 2, num_heads=4, conv_size=4).double()
    with torch.no_grad():
        layer.conv.bias.normal_()
    x = torch.randn(2, 7, 24, dtype=torch.float64, requires_grad=True)
    past = torch.randn(2, 3, 24, dtype=torch.float64)
    for state in (None, ARSSMState(past, torch.zeros(2, 4, 8, 6, dtype=torch.float64))):
        y, tail = layer._conv(x, state, need_tail=True)
        left = past if state is not None else torch.zeros_like(past)
        xp = torch.cat([left, x], 1)
        ref = torch.nn.functional.silu(torch.nn.functional.conv1d(
            xp.transpose(1, 2), layer.conv.weight, layer.conv.bias, groups=24).transpose(1, 2))
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(tail, xp[:, -3:])
        g = torch.randn_like(y)
        got = torch.autograd.grad(y, (x, layer.conv.weight, layer.conv.bias), g)
        want = torch.autograd.grad(ref, (x, layer.conv.weight, layer.conv.bias), g)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # Fewer tokens than the cache holds: the tail mixes the old cache and the new tokens.
    short = torch.randn(2, 2, 24, dtype=torch.float64)
    _, tail = layer._conv(short, ARSSMState(past, torch.zeros(2, 4, 8, 6, dtype=torch.float64)), need_tail=True)
    torch.testing.assert_close(tail, torch.cat([past, short], 1)[:, -3:], rtol=0, atol=0)
