"""The semiseparable (SSD) Triton kernels on a real GPU: every declared config, odd T and chunk
boundaries, fp32 and bf16 inputs, y, the final state and every gradient vs the fp64 reference (outputs
NaN-poisoned first), strong decays, the configs kept under a 99 KB shared-memory cap, the autotuned
public op with autograd at the 8gb layer's shape, and the AR-SSM layer training on it. Skipped
without CUDA."""

import pytest
import torch

from muse_lm.ops import semiseparable_scan
from muse_lm.ops.semiseparable.reference import semiseparable_chunked

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# Max |error| / max |reference|: fp32 inputs keep fp32 products; bf16 rounds the tensor-core operands.
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
NAMES = ("x", "u", "v", "log_a", "initial_state")


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _problem(b, t, h, r, p, dtype, *, decay=(-3.0, 0.0), seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x, dy = torch.randn(2, b, t, h, p, device="cuda", generator=gen)
    u, v = torch.randn(2, b, t, h, r, device="cuda", generator=gen)
    lo, hi = decay
    log_a = lo + (hi - lo) * torch.rand(b, t, h, device="cuda", generator=gen)
    h0, dfinal = torch.randn(2, b, h, r, p, device="cuda", generator=gen)
    return x.to(dtype), u.to(dtype), v.to(dtype), log_a, h0, dy.to(dtype), dfinal


def _reference(x, u, v, log_a, h0, dy, dfinal):
    """fp64 (y, final) and the gradients of <y, dy> + <final, dfinal> in (x, u, v, log_a, h0)."""
    leaves = [t.detach().double().requires_grad_() for t in (x, u, v, log_a, h0)]
    y, final = semiseparable_chunked(*leaves[:4], initial_state=leaves[4], output_final_state=True)
    loss = (y * dy.double()).sum() + (final * dfinal.double()).sum()
    return y.detach(), final.detach(), torch.autograd.grad(loss, leaves)


def _check_config(cfg, args, ref, dtype, chunk=64):
    from muse_lm.ops.semiseparable.triton import semiseparable_backward, semiseparable_forward

    x, u, v, log_a, h0, dy, dfinal = args
    y_ref, f_ref, grads_ref = ref
    poison = torch.full_like(x, float("nan"))
    y, final, states = semiseparable_forward(x, u, v, log_a, h0, chunk, cfg, out=poison)
    assert torch.isfinite(y).all() and torch.isfinite(final).all(), cfg
    assert _rel(y, y_ref) < TOL[dtype] and _rel(final, f_ref) < TOL[dtype], cfg
    grads = semiseparable_backward(x, u, v, log_a, states, dy, dfinal, chunk, cfg)
    for name, got, want in zip(NAMES, grads, grads_ref):
        assert got.shape == want.shape and torch.isfinite(got).all(), (name, cfg)
        assert _rel(got, want) < TOL[dtype], (name, cfg, _rel(got, want))
    # Partials over P-blocks are summed by torch, no atomics: bitwise reproducible.
    again = semiseparable_backward(x, u, v, log_a, states, dy, dfinal, chunk, cfg)
    assert all(torch.equal(a, b) for a, b in zip(grads, again)), cfg


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("t", [1, 7, 63, 64, 65, 1000, 4097])
def test_every_config_matches_fp64_reference(t, dtype):
    from muse_lm.ops.semiseparable.triton import CONFIGS

    args = _problem(2, t, 3, 32, 64, dtype, seed=t)
    ref = _reference(*args)
    for cfg in CONFIGS:
        _check_config(cfg, args, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(1, 130, 2, 5, 40), (3, 77, 1, 17, 100), (1, 300, 4, 64, 128)],
                         ids=lambda s: "B{}-T{}-H{}-R{}-P{}".format(*s))
def test_odd_ranks_and_head_dims_with_strong_decays(shape, dtype):
    """R and P not powers of two (and P over two blocks), log_a down to -20 per token next to a stretch
    with no decay at all."""
    from muse_lm.ops.semiseparable.triton import CONFIGS

    args = _problem(*shape, dtype, decay=(-20.0, 0.0), seed=sum(shape))
    args[3][:, shape[1] // 3 : shape[1] // 2] = 0.0
    ref = _reference(*args)
    for cfg in CONFIGS:
        _check_config(cfg, args, ref, dtype)


def test_configs_kept_for_a_99kb_card_run_and_match():
    """What the autotuner keeps on a consumer card (99 KB of shared memory) compiles and is right here."""
    from muse_lm.ops.semiseparable.triton import SSDConfig, _triton_configs, prune_configs_for

    for dtype in (torch.bfloat16, torch.float32):
        kept = prune_configs_for(_triton_configs(), 128, 64, 32, 99 * 1024)
        args = _problem(2, 200, 3, 32, 128, dtype, seed=11)
        ref = _reference(*args)
        for c in kept:
            _check_config(SSDConfig(c.kwargs["BP"], c.num_warps, c.num_stages), args, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_autotuned_public_op_at_the_8gb_layer_shape(dtype):
    """B 8, T 1024, H 12, P 64, R 32, chunk 64 (the 8gb preset's AR-SSM), autograd through the op."""
    x, u, v, log_a, h0, dy, dfinal = _problem(8, 1024, 12, 32, 64, dtype, decay=(-2.0, 0.0), seed=1)
    leaves = [t.clone().requires_grad_() for t in (x, u, v, log_a, h0)]
    y, final = semiseparable_scan(*leaves[:4], initial_state=leaves[4], output_final_state=True, impl="triton")
    assert "SemiseparableTriton" in type(y.grad_fn).__name__
    grads = torch.autograd.grad((y * dy).sum() + (final * dfinal).sum(), leaves)
    y_ref, f_ref, grads_ref = _reference(x, u, v, log_a, h0, dy, dfinal)
    assert _rel(y, y_ref) < TOL[dtype] and _rel(final, f_ref) < TOL[dtype]
    for name, got, want, leaf in zip(NAMES, grads, grads_ref, leaves):
        assert got.dtype == leaf.dtype, name
        assert _rel(got, want) < TOL[dtype], (name, _rel(got, want))


def test_long_sequence_matches_the_reference():
    x, u, v, log_a, _, dy, _ = _problem(1, 16384, 2, 32, 64, torch.bfloat16, decay=(-0.5, 0.0), seed=3)
    leaves = [t.clone().requires_grad_() for t in (x, u, v, log_a)]
    y, _ = semiseparable_scan(*leaves, impl="triton")
    grads = torch.autograd.grad((y * dy).sum(), leaves)
    ref = [t.detach().double().requires_grad_() for t in (x, u, v, log_a)]
    y_ref, _ = semiseparable_chunked(*ref)
    grads_ref = torch.autograd.grad((y_ref * dy.double()).sum(), ref)
    assert _rel(y, y_ref) < TOL[torch.bfloat16]
    for name, got, want in zip(NAMES, grads, grads_ref):
        assert _rel(got, want) < TOL[torch.bfloat16], name


def test_ar_ssm_layer_output_and_grads_match_with_the_kernel(monkeypatch):
    """The layer's call (non-contiguous views of one projection, autocast bf16) through impl='triton'
    gives the reference's output and parameter gradients."""
    import muse_lm.layers.ar_ssm as ar_ssm
    from muse_lm.layers import AdaptiveRankSemiseparableLayer

    torch.manual_seed(0)
    layer = AdaptiveRankSemiseparableLayer(64, num_heads=2, max_rank=8, min_rank=2, expand=1).cuda()
    x = torch.randn(2, 300, 64, device="cuda")

    def run(impl):
        def scan(*args, **kwargs):
            return semiseparable_scan(*args, **kwargs, impl=impl)

        monkeypatch.setattr(ar_ssm, "semiseparable_scan", scan)
        layer.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, penalty, _ = layer(x)
        (out.float().square().mean() + penalty).backward()
        return out.float(), {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}

    out_t, grads_t = run("triton")
    out_r, grads_r = run("torch")
    assert _rel(out_t, out_r) < 2e-2
    assert grads_t.keys() == grads_r.keys()
    for name in grads_r:
        assert torch.isfinite(grads_t[name]).all() and _rel(grads_t[name], grads_r[name]) < 5e-2, name
