"""The semiseparable (SSD) Triton kernels on a real GPU: every declared config, odd T and chunk
boundaries, fp32 and bf16 inputs, y, the final state and every gradient vs the fp64 reference (outputs
NaN-poisoned first), strong decays, the configs kept under a 99 KB shared-memory cap, the autotuned
public op with autograd at the 8gb layer's shape, the AR-SSM layer training on it, packed documents
(cu_seqlens, hundreds of 0..70-token documents), the one- and two-level walks over chunk states at
long T (unfused and fused), the fused chunk-state walk (the default; the shape/dtype tests run the
default, unfused and fused walks, and every declared walk config NaN-poisoned against the unfused
walk, two of them in two levels too), the one-token step kernel, and impl=None choosing the kernels on
CUDA. Skipped without CUDA."""

import pytest
import torch

from muse_lm.ops import semiseparable_scan
from muse_lm.ops.semiseparable.reference import semiseparable_chunked

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# Max |error| / max |reference|: fp32 inputs keep fp32 products; bf16 rounds the tensor-core operands.
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
NAMES = ("x", "u", "v", "log_a", "initial_state")
# The walk over chunk states: the default (the fused walk with bf16 states for bf16 inputs, in one or two
# levels by policy), the chunk kernel + `state_pass` (unfused), and the fused walk with fp32 states.
WALKS = {"default": {}, "unfused": {"fused_states": False}, "fused": {"fused_states": True, "compact_states": False}}


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


def _check_config(cfg, args, ref, dtype, chunk=64, **kw):
    """kw: cu_seqlens, two_levels, fused_states (and compact_states, forward only) for the kernels."""
    from muse_lm.ops.semiseparable.triton import semiseparable_backward, semiseparable_forward

    x, u, v, log_a, h0, dy, dfinal = args
    y_ref, f_ref, grads_ref = ref
    poison = torch.full_like(x, float("nan"))
    y, final, states = semiseparable_forward(x, u, v, log_a, h0, chunk, cfg, out=poison, **kw)
    assert torch.isfinite(y).all() and torch.isfinite(final).all(), cfg
    assert _rel(y, y_ref) < TOL[dtype] and _rel(final, f_ref) < TOL[dtype], cfg
    back = {k: val for k, val in kw.items() if k != "compact_states"}  # the states' dtype tells the backward
    grads = semiseparable_backward(x, u, v, log_a, states, dy, dfinal, chunk, cfg, **back)
    for name, got, want in zip(NAMES, grads, grads_ref):
        assert got.shape == want.shape and torch.isfinite(got).all(), (name, cfg)
        assert _rel(got, want) < TOL[dtype], (name, cfg, _rel(got, want))
    # Partials over P-blocks are summed by torch, no atomics: bitwise reproducible.
    again = semiseparable_backward(x, u, v, log_a, states, dy, dfinal, chunk, cfg, **back)
    assert all(torch.equal(a, b) for a, b in zip(grads, again)), cfg


@pytest.mark.parametrize("walk", WALKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("t", [1, 7, 63, 64, 65, 1000, 4097])
def test_every_config_matches_fp64_reference(t, dtype, walk):
    """Every config at T = 1, 65 and 4097; the other lengths with the first config only. Each distinct
    T specializes and compiles every kernel of every config again, which is what made this module
    run for minutes: the union still covers every length and every config several times."""
    from muse_lm.ops.semiseparable.triton import CONFIGS

    args = _problem(2, t, 3, 32, 64, dtype, seed=t)
    ref = _reference(*args)
    for cfg in CONFIGS if t in (1, 65, 4097) else CONFIGS[:1]:
        _check_config(cfg, args, ref, dtype, **WALKS[walk])


@pytest.mark.parametrize("walk", WALKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(1, 130, 2, 5, 40), (3, 77, 1, 17, 100), (1, 300, 4, 64, 128)],
                         ids=lambda s: "B{}-T{}-H{}-R{}-P{}".format(*s))
def test_odd_ranks_and_head_dims_with_strong_decays(shape, dtype, walk):
    """R and P not powers of two (and P over two blocks), log_a down to -20 per token next to a stretch
    with no decay at all."""
    from muse_lm.ops.semiseparable.triton import CONFIGS

    args = _problem(*shape, dtype, decay=(-20.0, 0.0), seed=sum(shape))
    args[3][:, shape[1] // 3 : shape[1] // 2] = 0.0
    ref = _reference(*args)
    for cfg in CONFIGS:
        _check_config(cfg, args, ref, dtype, **WALKS[walk])


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
    assert "muse_lm_ssd_forward" in type(y.grad_fn).__name__
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


def _packed(lengths, h, r, p, dtype, seed):
    """One packed row of documents: the _problem tensors with h0 / dfinal per document, and cu_seqlens."""
    x, u, v, log_a, _, dy, _ = _problem(1, sum(lengths), h, r, p, dtype, decay=(-20.0, 0.0), seed=seed)
    gen = torch.Generator(device="cuda").manual_seed(seed + 1)
    h0, dfinal = torch.randn(2, len(lengths), h, r, p, device="cuda", generator=gen)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    return (x, u, v, log_a, h0, dy, dfinal), cu


def _packed_reference(args, cu):
    x, u, v, log_a, h0, dy, dfinal = args
    leaves = [t.detach().double().requires_grad_() for t in (x, u, v, log_a, h0)]
    y, final = semiseparable_chunked(*leaves[:4], initial_state=leaves[4], output_final_state=True, cu_seqlens=cu)
    loss = (y * dy.double()).sum() + (final * dfinal.double()).sum()
    return y.detach(), final.detach(), torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cu_seqlens_many_short_documents_every_config_both_walks(dtype):
    """300 documents of 0..70 tokens (a tenth empty) in one row, per-document initial states."""
    from muse_lm.ops.semiseparable.triton import CONFIGS

    gen = torch.Generator().manual_seed(5)
    lengths = torch.randint(1, 71, (300,), generator=gen)
    lengths[torch.rand(300, generator=gen) < 0.1] = 0
    args, cu = _packed(lengths.tolist(), 3, 32, 64, dtype, seed=5)
    ref = _packed_reference(args, cu)
    for cfg in CONFIGS:
        for walk in (dict(two_levels=False, fused_states=False), dict(two_levels=True, fused_states=False),
                     dict(two_levels=False, fused_states=True), dict(two_levels=True, fused_states=True)):
            _check_config(cfg, args, ref, dtype, cu_seqlens=cu, **walk)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cu_seqlens_public_op_long_documents_default_impl(dtype):
    """impl=None on CUDA runs the kernel for packed documents too, long ones included (a 20000-token
    document takes the two-level walk), with autograd."""
    args, cu = _packed([20000, 1, 0, 3000, 64, 65], 4, 32, 64, dtype, seed=6)
    x, u, v, log_a, h0, dy, dfinal = args
    leaves = [t.clone().requires_grad_() for t in (x, u, v, log_a, h0)]
    y, final = semiseparable_scan(*leaves[:4], initial_state=leaves[4], output_final_state=True, cu_seqlens=cu)
    assert "SemiseparableTriton" in type(y.grad_fn).__name__
    grads = torch.autograd.grad((y * dy).sum() + (final * dfinal).sum(), leaves)
    y_ref, f_ref, grads_ref = _packed_reference(args, cu)
    assert _rel(y, y_ref) < TOL[dtype] and _rel(final, f_ref) < TOL[dtype]
    for name, got, want in zip(NAMES, grads, grads_ref):
        assert _rel(got, want) < TOL[dtype], (name, _rel(got, want))


@pytest.mark.parametrize("t", [1000, 65536])
def test_two_level_walk_at_long_t_matches_one_level_and_reference(t):
    """B 1, H 4: the regime the second level is for; both walks against the fp64 reference and each
    other, forward and backward, every output."""
    from muse_lm.ops.semiseparable.state_pass import use_two_levels
    from muse_lm.ops.semiseparable.triton import semiseparable_backward, semiseparable_forward

    assert use_two_levels(4, t // 64, 32 * 64) == (t == 65536)
    args = _problem(1, t, 4, 32, 64, torch.float32, decay=(-1.0, 0.0), seed=t)
    x, u, v, log_a, h0, dy, dfinal = args
    y_ref, f_ref, grads_ref = _reference(*args)
    outs = {}
    for fused in (False, True):
        for two_levels in (False, True):
            walk = dict(two_levels=two_levels, fused_states=fused)
            y, final, states = semiseparable_forward(x, u, v, log_a, h0, 64, **walk)
            grads = semiseparable_backward(x, u, v, log_a, states, dy, dfinal, 64, **walk)
            assert _rel(y, y_ref) < 1e-4 and _rel(final, f_ref) < 1e-4, walk
            for name, got, want in zip(NAMES, grads, grads_ref):
                assert torch.isfinite(got).all() and _rel(got, want) < 1e-4, (name, walk, _rel(got, want))
            outs[fused, two_levels] = (y, final, states, *grads)
    for other in ((False, True), (True, False), (True, True)):
        for one, two in zip(outs[False, False], outs[other]):
            assert _rel(two, one) < 1e-5, other


def _unfused_walk(a, b, log_a, init, n_seq, table, reverse, chunk=64):
    """The path the fused walk replaces: `_chunk_state_kernel` (autotuned) then the one-level
    `state_pass`. Returns (states [B,H,NC,R,P], finals [n_seq,H,R,P]), fp32."""
    from muse_lm.ops.semiseparable.state_pass import state_pass
    from muse_lm.ops.semiseparable.triton import (
        _chunk_state_kernel,
        _chunk_state_tuned,
        _launch_chunks,
        _prec,
        _r_block,
    )

    bsz, t, h, r = a.shape
    p = b.shape[-1]
    nc = -(-t // chunk) if table is None else table.shape[0]
    states = torch.empty(bsz, h, nc, r, p, device="cuda")
    g = torch.empty(bsz * h, nc, device="cuda")
    tab = g if table is None else table
    _launch_chunks(_chunk_state_kernel, _chunk_state_tuned, (bsz, t, h, p, r, nc), None, (a, b, log_a, states, g, tab),
                   FROM_START=reverse, C=chunk, RB=_r_block(r), PREC=_prec(a.dtype), VARLEN=table is not None)
    return states, state_pass(states, g, init, n_seq, h, table, reverse=reverse, two_levels=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(2, 1, 3, 32, 64), (2, 65, 3, 32, 64), (3, 4097, 2, 17, 100), (1, 300, 4, 64, 128)],
                         ids=lambda s: "B{}-T{}-H{}-R{}-P{}".format(*s))
def test_fused_walk_every_config_matches_the_unfused_walk(shape, dtype):
    """Every declared `FusedStatesConfig`, forward (u, x) and backward (v, dY, reverse) walks, plain and
    packed (0..70-token documents, per-document initial states), written into NaN-filled states and
    finals: finite and equal to `_chunk_state_kernel` + the one-level `state_pass`. fp32 products are
    exact, so only the summation order differs (1e-5); bf16 runs tf32 products on possibly different
    tensor-core instructions (1e-4)."""
    from muse_lm.ops.semiseparable.fused_states import CONFIGS, fused_chunk_states
    from muse_lm.ops.semiseparable.state_pass import chunk_table

    tol = 1e-5 if dtype == torch.float32 else 1e-4
    x, u, v, log_a, h0, dy, dfinal = _problem(*shape, dtype, decay=(-20.0, 0.0), seed=sum(shape))
    log_a[:, shape[1] // 3 : shape[1] // 2] = 0.0
    b, _, h, r, p = shape
    cases = [(u, x, log_a, h0, b, None, False), (v, dy, log_a, dfinal, b, None, True)]
    if b == 1:
        gen = torch.Generator().manual_seed(7)
        lengths = torch.randint(0, 71, (shape[1],), generator=gen)
        lengths = lengths[: int((lengths.cumsum(0) <= shape[1]).sum())]
        lengths[-1] += shape[1] - int(lengths.sum())
        cu = torch.tensor([0, *lengths.cumsum(0).tolist()], device="cuda", dtype=torch.int32)
        table = chunk_table(cu, 64, cu.device)
        n = len(lengths)
        inits = torch.randn(2, n, h, r, p, device="cuda")
        cases += [(u, x, log_a, inits[0], n, table, False), (v, dy, log_a, inits[1], n, table, True)]
    for a, bb, la, init, n_seq, table, reverse in cases:
        want_states, want_final = _unfused_walk(a, bb, la, init, n_seq, table, reverse)
        # None: the autotuned launch; each config in one level, and two of them in two (groups of 4 chunks).
        runs = [(cfg, None) for cfg in (None, *CONFIGS)] + [(None, 4), (CONFIGS[0], 4)]
        for cfg, group in runs:
            states = torch.full_like(want_states, float("nan"))
            final = torch.full_like(want_final, float("nan"))
            fused_chunk_states(a, bb, la, states, init, n_seq, 64, table, reverse=reverse, config=cfg, final=final,
                               group=group)
            where = (cfg, group, reverse, table is not None)
            assert torch.isfinite(states).all() and torch.isfinite(final).all(), where
            assert _rel(states, want_states) < tol and _rel(final, want_final) < tol, where


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_step_kernel_matches_reference_and_decoding_matches_the_scan(dtype):
    """semiseparable_step with impl=None runs the kernel on CUDA: equal to the fp64 reference step, the
    caller's state untouched, and 50 decode steps equal to the scan of the same tokens."""
    from muse_lm.ops import semiseparable_step
    from muse_lm.ops.semiseparable.reference import semiseparable_step_reference
    from muse_lm.ops.semiseparable.step_triton import semiseparable_step_forward

    x, u, v, log_a, h0, _, _ = _problem(8, 50, 12, 32, 64, dtype, seed=7)
    kept = h0.clone()
    y, new = semiseparable_step(x[:, 0], u[:, 0], v[:, 0], log_a[:, 0], h0)
    assert torch.equal(h0, kept)
    y_ref, new_ref = semiseparable_step_reference(*(t[:, 0].double() for t in (x, u, v, log_a)), h0.double())
    assert _rel(y, y_ref) < TOL[dtype] and _rel(new, new_ref) < 1e-5
    y_in, new_in = semiseparable_step_forward(x[:, 0], u[:, 0], v[:, 0], log_a[:, 0], kept, out_state=kept)
    assert new_in.data_ptr() == kept.data_ptr() and torch.equal(new_in, new) and torch.equal(y_in, y)
    state, ys = h0, []
    for t in range(50):
        y_t, state = semiseparable_step(x[:, t], u[:, t], v[:, t], log_a[:, t], state)
        ys.append(y_t)
    y_scan, f_scan = semiseparable_scan(x, u, v, log_a, initial_state=h0, output_final_state=True)
    # The step is exact fp32 arithmetic; the scan's chunk states multiply bf16 inputs' decayed rows on
    # tf32 tensor cores (operands rounded to 2^-11), so their final state differs by ~5e-4 there.
    state_tol = 1e-4 if dtype == torch.float32 else 2e-3
    assert _rel(torch.stack(ys, 1), y_scan) < TOL[dtype] and _rel(state, f_scan) < state_tol


def test_impl_none_picks_the_kernels_on_cuda_and_the_reference_for_fp64():
    from muse_lm.ops import semiseparable_step

    x, u, v, log_a, h0, _, _ = _problem(1, 10, 2, 4, 8, torch.float32, seed=8)
    leaves = [t.clone().requires_grad_() for t in (x, u, v, log_a)]
    y, _ = semiseparable_scan(*leaves)
    assert "muse_lm_ssd_forward" in type(y.grad_fn).__name__  # the kernels, through the custom op
    y_t, _ = semiseparable_step(*(t[:, 0] for t in leaves), h0)
    assert "SemiseparableStepTriton" in type(y_t.grad_fn).__name__
    y64, _ = semiseparable_scan(*(t.double().requires_grad_() for t in (x, u, v, log_a)))
    assert "Triton" not in type(y64.grad_fn).__name__
    assert _rel(y, y64) < 1e-4
