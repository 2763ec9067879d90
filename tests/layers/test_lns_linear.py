"""8-bit LNS weights: the format (encode / decode), `LNSLinear` (frozen and trainable with a straight-
through gradient), `convert_to_lns`, and a tiny MuseLM whose FFNs train in LNS on the CPU."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from muse_lm.layers import LNSLinear, SwiGLU, convert_to_lns
from muse_lm.models import MuseConfig, MuseLM
from muse_lm.ops.lns_linear import MAX_REL_ERROR, lns_decode, lns_decode_unit, lns_encode, lns_linear


def _weight(n=24, k=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # Mixed magnitudes (10^-6 .. 10^1) so rows span far more than the 2^-15.75 code range.
    return torch.randn(n, k, generator=gen) * 10 ** torch.empty(n, k).uniform_(-6, 1, generator=gen)


def test_round_trip_error_is_within_half_a_code_and_signs_are_kept():
    w = _weight()
    codes, scale = lns_encode(w)
    assert codes.dtype == torch.uint8 and scale.dtype == torch.float32 and scale.shape == (w.shape[0],)
    assert torch.equal(scale, w.abs().amax(1))
    dec = lns_decode(codes, scale).double()
    nonzero = (codes & 127) > 0
    rel = ((dec - w.double()).abs() / w.double().abs())[nonzero]
    assert MAX_REL_ERROR == pytest.approx(2 ** (1 / 16) - 1)
    assert rel.max().item() <= MAX_REL_ERROR * (1 + 1e-5)
    assert torch.equal(dec[nonzero].sign(), w.double()[nonzero].sign())
    # The row maximum is code 127 exactly, and decodes to itself.
    top = w.abs().argmax(1)
    assert ((codes[torch.arange(w.shape[0]), top] & 127) == 127).all()
    assert torch.allclose(dec[torch.arange(w.shape[0]), top].abs(), scale.double())


def test_underflow_is_code_zero_and_exact_zero():
    s = 1.0
    # Below s * 2^-15.8125 -> code 0; the smallest code is s * 2^-15.75.
    w = torch.tensor([[s, 2.0**-15.75, -(2.0**-15.7), 2.0**-15.9, -(2.0**-20), 0.0, -0.0]])
    codes, scale = lns_encode(w)
    assert codes.tolist() == [[127, 1, 128 | 1, 0, 0, 0, 0]]
    dec = lns_decode(codes, scale)
    assert dec[0, 3:].eq(0).all() and not dec[0, 3:].signbit().any()
    assert dec[0, 2].item() == pytest.approx(-(2.0**-15.75), rel=1e-6)
    # The sign bit on code 0 ("negative zero") still decodes to exactly 0.
    assert lns_decode_unit(torch.tensor([128], dtype=torch.uint8)).item() == 0.0


def test_zero_row_has_zero_scale_and_zero_codes():
    w = torch.zeros(2, 5)
    w[1, 2] = -3.0
    codes, scale = lns_encode(w)
    assert scale.tolist() == [0.0, 3.0]
    assert codes[0].eq(0).all() and codes[1, 2].item() == 128 | 127
    assert torch.equal(lns_decode(codes, scale), w)


def test_every_code_decodes_to_its_power_of_two():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    unit = lns_decode_unit(codes).double()
    mag = torch.arange(256) & 127
    expect = torch.where(mag == 0, 0.0, 2.0 ** ((mag.double() - 127) / 8))
    expect = torch.where(torch.arange(256) >= 128, -expect, expect)
    assert torch.allclose(unit, expect, rtol=1e-6, atol=0)


def test_from_linear_equals_the_decoded_matmul_and_halves_the_bytes():
    torch.manual_seed(0)
    lin = nn.Linear(40, 24)
    with torch.no_grad():
        lin.weight.copy_(_weight())
    layer = LNSLinear.from_linear(lin)
    assert not layer.trainable and list(dict(layer.named_parameters())) == []
    assert layer.codes.dtype == torch.uint8 and layer.codes.shape == (24, 40)
    x = torch.randn(3, 5, 40)
    w = lns_decode(*lns_encode(lin.weight))
    assert torch.allclose(layer(x), F.linear(x, w, lin.bias), atol=1e-6, rtol=1e-5)
    assert layer.weight_bytes() * 2 <= 24 * 40 * 2 + 8 * 24  # codes: 1 byte/weight (+ fp32 scales)
    x.requires_grad_()
    layer(x).sum().backward()
    assert torch.allclose(x.grad, w.sum(0).expand_as(x), atol=1e-5)


def test_from_linear_refuses_non_finite_weights():
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight[0, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        LNSLinear.from_linear(lin)


def test_trainable_ste_gradient_equals_the_gradient_through_the_decoded_weight():
    torch.manual_seed(1)
    lin = nn.Linear(40, 24)
    layer = LNSLinear.from_linear(lin, trainable=True)
    assert {n for n, _ in layer.named_parameters()} == {"weight", "bias"}
    x = torch.randn(6, 40, requires_grad=True)
    target = torch.randn(6, 24)
    F.mse_loss(layer(x), target).backward()

    w_dec = lns_decode(*lns_encode(lin.weight)).requires_grad_()
    bias = lin.bias.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    F.mse_loss(F.linear(x2, w_dec, bias), target).backward()
    assert torch.allclose(layer.weight.grad, w_dec.grad, atol=1e-7, rtol=1e-5)
    assert torch.allclose(layer.bias.grad, bias.grad, atol=1e-7, rtol=1e-5)
    assert torch.allclose(x.grad, x2.grad, atol=1e-7, rtol=1e-5)
    # The forward really uses the quantized weight, not the latent one.
    assert not torch.allclose(layer(x), lin(x), atol=1e-4)


def test_state_dict_round_trips_for_both_kinds():
    torch.manual_seed(2)
    lin = nn.Linear(16, 8)
    frozen = LNSLinear.from_linear(lin)
    assert set(frozen.state_dict()) == {"codes", "scale", "bias"}
    fresh = LNSLinear(16, 8)
    fresh.load_state_dict(frozen.state_dict())
    x = torch.randn(4, 16)
    assert torch.equal(fresh(x), frozen(x))

    trainable = LNSLinear.from_linear(lin, trainable=True)
    assert set(trainable.state_dict()) == set(lin.state_dict())  # a float checkpoint loads either way
    again = LNSLinear(16, 8, trainable=True)
    again.load_state_dict(trainable.state_dict())
    assert torch.equal(again(x), trainable(x))
    # Freezing the trained latent weight stores exactly the codes its forward used.
    lin.load_state_dict(trainable.state_dict())
    assert torch.equal(LNSLinear.from_linear(lin)(x), trainable(x))


def test_lns_linear_validates_inputs():
    codes, scale = lns_encode(torch.randn(4, 3))
    with pytest.raises(ValueError, match="features"):
        lns_linear(torch.randn(2, 5), codes, scale)
    with pytest.raises(ValueError, match="uint8"):
        lns_linear(torch.randn(2, 3), codes.float(), scale)
    with pytest.raises(ValueError, match="scale"):
        lns_linear(torch.randn(2, 3), codes, scale[:2])
    with pytest.raises(NotImplementedError, match="Triton kernel"):
        lns_linear(torch.randn(2, 3, dtype=torch.float64), codes, scale, impl="triton")
    out = lns_linear(torch.randn(2, 3, dtype=torch.float64), codes, scale)
    assert out.dtype == torch.float64


def _tiny_config():
    return MuseConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, ssm_expand=1, max_rank=4, min_rank=2,
                      bk_heads=0, tt_rank=4, chunk_size=16)


def test_convert_to_lns_replaces_exactly_the_ffn_linears():
    torch.manual_seed(3)
    model = MuseLM(_tiny_config())
    linears_before = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    ffn = {f"{n}.{c}" for n, m in model.named_modules() if isinstance(m, SwiGLU) for c in ("w13", "w2")}
    assert ffn and ffn <= linears_before
    assert convert_to_lns(model, "ffn") is model
    lns = {n for n, m in model.named_modules() if isinstance(m, LNSLinear)}
    assert lns == ffn
    assert {n for n, m in model.named_modules() if isinstance(m, nn.Linear)} == linears_before - ffn
    with pytest.raises(ValueError, match="'ffn'.*'all'"):
        convert_to_lns(model, "attention")


def _markov_batches(n_batches, batch, seq, vocab, seed):
    """Token streams of a sparse random first-order Markov chain (4 successors per token): learnable
    well below log(vocab) by a tiny model in a few dozen steps."""
    gen = torch.Generator().manual_seed(0)  # the same chain for every split
    succ = torch.stack([torch.randperm(vocab, generator=gen)[:4] for _ in range(vocab)])
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        tok = torch.randint(vocab, (batch,), generator=gen)
        rows = [tok]
        for _ in range(seq):
            tok = succ[tok, torch.randint(4, (batch,), generator=gen)]
            rows.append(tok)
        out.append(torch.stack(rows, 1))
    return out


def _train(lns: bool, train, heldout) -> tuple[float, float]:
    torch.manual_seed(0)
    model = MuseLM(_tiny_config())
    if lns:
        convert_to_lns(model, "ffn", trainable=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def heldout_loss():
        model.eval()
        with torch.no_grad():
            loss = sum(model(b[:, :-1], b[:, 1:]).item() for b in heldout) / len(heldout)
        model.train()
        return loss

    start = heldout_loss()
    for batch in train:
        opt.zero_grad()
        model(batch[:, :-1], batch[:, 1:]).backward()
        opt.step()
    return start, heldout_loss()


def test_tiny_muse_with_trainable_lns_ffns_trains_like_the_float_model():
    """Same init, data and optimizer: the LNS model's held-out loss falls at least 80% as far as the
    float model's and ends within 0.1 nats of it (the chain's entropy is log 4 = 1.39 nats)."""
    vocab = 64
    train = _markov_batches(60, 8, 32, vocab, seed=1)
    heldout = _markov_batches(4, 8, 32, vocab, seed=2)
    f_start, f_end = _train(False, train, heldout)
    l_start, l_end = _train(True, train, heldout)
    assert f_start == pytest.approx(math.log(vocab), abs=0.3) and l_start == pytest.approx(f_start, abs=0.05)
    assert f_end < f_start - 1.0  # the task is learnable in this budget
    assert (l_start - l_end) >= 0.8 * (f_start - f_end)
    assert abs(l_end - f_end) < 0.1


@pytest.mark.parametrize("trainable", [False, True])
def test_every_linear_converted_model_runs_its_lns_projections(trainable):
    """convert_to_lns(model, "all") also converts the AR-SSM's in_proj, whose plain-Linear fast path
    (a padded GEMM on the weight) must then give way to the LNS layer's own forward."""
    torch.manual_seed(0)
    model = MuseLM(MuseConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_rank=8, min_rank=2, bk_heads=2,
                              tt_rank=4))
    convert_to_lns(model, "all", trainable=trainable)
    mixer = model.blocks[0].mixer
    assert isinstance(mixer.in_proj, LNSLinear)
    calls = []
    mixer.in_proj.register_forward_hook(lambda mod, args, out: calls.append(out.shape))
    ids = torch.randint(0, 64, (2, 9))
    loss = model(ids, ids)
    assert torch.isfinite(loss) and calls == [(2, 9, mixer.in_proj.out_features)]
