"""The semiseparable (SSD) Triton kernels, forward and backward, vs the fp64 recurrence and autograd
through the fp64 reference, in fp32 under Triton's interpreter: every declared config, packed
documents (cu_seqlens), the one- and two-level walks over chunk states, the one-token step kernel;
plus dispatch, chunk-table and config checks.

Triton reads TRITON_INTERPRET when its kernels are defined, so the interpreter tests run in a child
pytest process started with TRITON_INTERPRET=1 (`test_interpreter_suite`); in this process they are
skipped. The interpreter runs every program in Python, so sizes here are tiny and odd (T not a
multiple of the chunk, T = 1, R and P not powers of two); tests/gpu/test_semiseparable_gpu.py runs
every declared config at full size.
"""

import pytest
import torch

from muse_lm.ops import semiseparable_scan
from muse_lm.ops._dispatch import interpreter_enabled
from muse_lm.ops.semiseparable.reference import semiseparable_chunked, semiseparable_recurrent

pytest.importorskip("triton")

interp = pytest.mark.skipif(not interpreter_enabled(), reason="runs in the TRITON_INTERPRET=1 child process")
TOL = 1e-4  # max |err| / max |ref|, fp32 kernels against fp64


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def problem(b, t, h, r, p, *, decay=(-3.0, 0.0), seed=0):
    """fp32 x [B,T,H,P], u, v [B,T,H,R], log_a [B,T,H] uniform in `decay`, h0 [B,H,R,P], and random
    gradients for y and the final state."""
    gen = torch.Generator().manual_seed(seed)
    x, dy = torch.randn(2, b, t, h, p, generator=gen)
    u, v = torch.randn(2, b, t, h, r, generator=gen)
    lo, hi = decay
    log_a = lo + (hi - lo) * torch.rand(b, t, h, generator=gen)
    h0, dfinal = torch.randn(2, b, h, r, p, generator=gen)
    return x, u, v, log_a, h0, dy, dfinal


def fp64_reference(x, u, v, log_a, h0, dy, dfinal):
    """(y, final) from the fp64 recurrence, and the gradients of <y, dy> + <final, dfinal> in
    (x, u, v, log_a, h0) by autograd through the fp64 chunked reference (h0 None: no initial state)."""
    leaves = [t.detach().double().requires_grad_() for t in (x, u, v, log_a)]
    h0_64 = None if h0 is None else h0.detach().double().requires_grad_()
    y_rec, f_rec = semiseparable_recurrent(*leaves, initial_state=h0_64, output_final_state=True)
    y, final = semiseparable_chunked(*leaves, initial_state=h0_64, output_final_state=True, chunk_size=8)
    loss = (y * dy.double()).sum() + (final * dfinal.double()).sum()
    grads = torch.autograd.grad(loss, leaves + ([h0_64] if h0 is not None else []))
    return y_rec, f_rec, grads


def test_reference_gradients_pass_fp64_gradcheck():
    """The oracle the kernel's gradients are checked against is itself right (fp64 gradcheck)."""
    x, u, v, log_a, h0, _, _ = problem(1, 5, 1, 2, 3, seed=1)
    leaves = tuple(t.double().requires_grad_() for t in (x, u, v, log_a, h0))

    def fn(x, u, v, log_a, h0):
        return semiseparable_chunked(x, u, v, log_a, initial_state=h0, output_final_state=True, chunk_size=2)

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.skipif(interpreter_enabled(), reason="this is the parent of the interpreter run")
def test_interpreter_suite(interpreter_run):
    interpreter_run(__file__)


def _small_configs():
    from muse_lm.ops.semiseparable.triton import SSDConfig

    # P-blocks smaller than P (partial sums over blocks), equal to and larger than P.
    return [SSDConfig(16, 4, 2), SSDConfig(32, 2, 1), SSDConfig(64, 1, 3)]


# (B, T, H, R, P, chunk): T = 1, T inside one chunk, T = a chunk exactly, T ragged over several
# chunks; R and P odd and not powers of two, R > 16 (two R tiles' worth of padding), P > 16.
SHAPES = [(2, 1, 2, 3, 5, 16), (1, 7, 3, 5, 7, 16), (2, 16, 2, 17, 20, 16), (1, 37, 2, 5, 33, 16)]


@interp
@pytest.mark.parametrize("cfg_index", [0, 1, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-T{}-H{}-R{}-P{}-C{}".format(*s))
def test_configs_match_fp64_forward_and_backward(shape, cfg_index):
    from muse_lm.ops.semiseparable.triton import semiseparable_backward, semiseparable_forward

    cfg = _small_configs()[cfg_index]
    # Alternate configs run the unfused one-level walk and the fused walk (the default, whose own
    # configs have their own test), so each shape covers both.
    walk = dict(fused_states=cfg_index % 2 == 1)
    b, t, h, r, p, chunk = shape
    x, u, v, log_a, h0, dy, dfinal = problem(b, t, h, r, p, seed=t + r)
    poison = torch.full_like(x, float("nan"))
    y, final, states = semiseparable_forward(x, u, v, log_a, h0, chunk, cfg, out=poison, **walk)
    assert y.data_ptr() == poison.data_ptr() and torch.isfinite(y).all()
    y_ref, f_ref, grads_ref = fp64_reference(x, u, v, log_a, h0, dy, dfinal)
    assert rel(y, y_ref) < TOL and rel(final, f_ref) < TOL, cfg
    grads = semiseparable_backward(x, u, v, log_a, states, dy, dfinal, chunk, cfg, **walk)
    for name, got, want in zip(("x", "u", "v", "log_a", "h0"), grads, grads_ref):
        assert got.shape == want.shape and torch.isfinite(got).all(), name
        assert rel(got, want) < TOL, (name, cfg, walk)


@interp
def test_autotuned_launch_path_with_a_stub_benchmark(monkeypatch):
    """The CUDA branch (triton.autotune over every declared config: pruning, keys, launch grids) run
    under the interpreter with a stub timer: every config of every kernel runs, and the tuned result
    is still right (trials leave no stale output behind)."""
    import types

    import muse_lm.ops.semiseparable.triton as ssd

    monkeypatch.setattr(ssd, "_device_smem", lambda device: 99 * 1024)
    cuda_launch = types.FunctionType(
        ssd._launch_chunks.__code__, {**ssd.__dict__, "interpreter_enabled": lambda: False}
    )
    monkeypatch.setattr(ssd, "_launch_chunks", cuda_launch)
    benched = []
    tuned_kernels = (ssd._chunk_state_tuned, ssd._chunk_output_tuned, ssd._chunk_dx_tuned, ssd._chunk_duv_tuned)
    for tuned in tuned_kernels:

        def stub(fn, quantiles, name=tuned.base_fn.__name__):
            fn()
            benched.append(name)
            return [1.0, 1.0, 1.0]

        monkeypatch.setitem(tuned.__dict__, "do_bench", stub)  # a cached_property: bypass its getter
        monkeypatch.setattr(tuned, "cache", {})
    x, u, v, log_a, h0, dy, dfinal = problem(2, 40, 2, 5, 40, seed=12)
    # The unfused walk: its chunk-state kernel is one of the four (the fused walk has its own test).
    y, final, states = ssd.semiseparable_forward(x, u, v, log_a, h0, 16, fused_states=False)
    grads = ssd.semiseparable_backward(x, u, v, log_a, states, dy, dfinal, 16, fused_states=False)
    y_ref, f_ref, grads_ref = fp64_reference(x, u, v, log_a, h0, dy, dfinal)
    assert rel(y, y_ref) < TOL and rel(final, f_ref) < TOL
    for name, got, want in zip(("x", "u", "v", "log_a", "h0"), grads, grads_ref):
        assert rel(got, want) < TOL, name
    # P 40: every declared block (16, 32, 64) is kept; each kernel benched each config once.
    assert sorted(set(benched)) == sorted(t.base_fn.__name__ for t in tuned_kernels)
    assert all(benched.count(t.base_fn.__name__) == len(ssd.CONFIGS) for t in tuned_kernels)


@interp
def test_strong_decay_and_a_free_stretch_over_many_chunks():
    """log_a down to -20 per token (a chunk's cumulative log-decay near -300, past exp's fp32 range)
    next to a stretch with no decay at all, over 6 chunks: finite and on the fp64 oracle."""
    from muse_lm.ops.semiseparable.triton import semiseparable_backward, semiseparable_forward

    x, u, v, log_a, h0, dy, dfinal = problem(1, 90, 2, 3, 5, decay=(-20.0, -0.5), seed=3)
    log_a[:, 40:60] = 0.0
    log_a[:, 60:70] = -1e-4
    assert log_a[:, :16].sum(1).min() < -88
    y, final, states = semiseparable_forward(x, u, v, log_a, h0, 16)
    y_ref, f_ref, grads_ref = fp64_reference(x, u, v, log_a, h0, dy, dfinal)
    assert torch.isfinite(y).all() and torch.isfinite(final).all()
    assert rel(y, y_ref) < TOL and rel(final, f_ref) < TOL
    grads = semiseparable_backward(x, u, v, log_a, states, dy, dfinal, 16)
    for name, got, want in zip(("x", "u", "v", "log_a", "h0"), grads, grads_ref):
        assert torch.isfinite(got).all() and rel(got, want) < TOL, name


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_public_op_impl_triton_autograd_matches_reference(dtype):
    x, u, v, log_a, h0, dy, dfinal = problem(2, 21, 2, 3, 6, seed=5)
    leaves = [t.to(dtype).requires_grad_() for t in (x, u, v)] + [log_a.requires_grad_(), h0.requires_grad_()]
    # chunk_size 5 is rounded up to the kernel's 16: the result does not depend on it.
    y, final = semiseparable_scan(*leaves[:4], initial_state=leaves[4], output_final_state=True, chunk_size=5,
                                  impl="triton")
    assert "muse_lm_ssd_forward" in type(y.grad_fn).__name__
    assert y.dtype == dtype and final.dtype == torch.float32
    got = torch.autograd.grad((y * dy.to(dtype)).sum() + (final * dfinal).sum(), leaves)
    y_ref, f_ref, want = fp64_reference(*(t.detach() for t in leaves), dy.to(dtype), dfinal)
    tol = TOL if dtype == torch.float32 else 2e-2  # bf16 operands on the tensor-core products
    assert rel(y, y_ref) < tol and rel(final, f_ref) < tol
    for name, g, w, leaf in zip(("x", "u", "v", "log_a", "h0"), got, want, leaves):
        assert g.dtype == leaf.dtype, name
        assert rel(g, w) < tol, (name, dtype)


@interp
def test_without_initial_state_only_y_or_only_final_state_used():
    x, u, v, log_a, _, dy, dfinal = problem(1, 19, 2, 3, 4, seed=7)
    xg, lg = x.clone().requires_grad_(), log_a.clone().requires_grad_()
    y, final = semiseparable_scan(xg, u, v, lg, chunk_size=16, impl="triton")
    assert final is None
    y_ref, f_ref, grads_ref = fp64_reference(x, u, v, log_a, None, dy, torch.zeros_like(dfinal))
    assert rel(y, y_ref) < TOL
    got = torch.autograd.grad((y * dy).sum(), (xg, lg))
    assert rel(got[0], grads_ref[0]) < TOL and rel(got[1], grads_ref[3]) < TOL
    # Only the final state reaches the loss: grad_y arrives as None.
    y, final = semiseparable_scan(xg, u, v, lg, output_final_state=True, chunk_size=16, impl="triton")
    got = torch.autograd.grad((final * dfinal).sum(), (xg, lg))
    _, _, grads_ref = fp64_reference(x, u, v, log_a, None, torch.zeros_like(dy), dfinal)
    assert rel(final, f_ref) < TOL
    assert rel(got[0], grads_ref[0]) < TOL and rel(got[1], grads_ref[3]) < TOL


@interp
@pytest.mark.parametrize("dims", [(0, 5, 2, 3, 4), (1, 5, 2, 0, 4), (1, 5, 2, 3, 0)], ids=["B0", "R0", "P0"])
def test_empty_dimensions(dims):
    x, u, v, log_a, h0, _, _ = problem(*dims)
    leaves = [t.requires_grad_() for t in (x, u, v, log_a, h0)]
    y, final = semiseparable_scan(*leaves[:4], initial_state=leaves[4], output_final_state=True, impl="triton")
    # With B, R or P zero, y is all zeros (R = 0: nothing is written) and the state has no elements.
    torch.testing.assert_close(y, torch.zeros_like(x))
    assert final.shape == h0.shape and final.numel() == 0
    grads = torch.autograd.grad(y.sum() + final.sum(), leaves, allow_unused=True)
    assert all(g is None or g.shape == leaf.shape for g, leaf in zip(grads, leaves))


def packed_problem(lengths, h, r, p, *, decay=(-3.0, 0.0), seed=0):
    """problem() for one packed row of documents with these lengths: (x, u, v, log_a, h0 [N,H,R,P],
    dy, dfinal [N,H,R,P], cu_seqlens int32)."""
    x, u, v, log_a, _, dy, _ = problem(1, sum(lengths), h, r, p, decay=decay, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    h0, dfinal = torch.randn(2, len(lengths), h, r, p, generator=gen)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return x, u, v, log_a, h0, dy, dfinal, cu


def packed_reference(x, u, v, log_a, h0, dy, dfinal, cu):
    """fp64 (y, finals) and the gradients in (x, u, v, log_a, h0) through the reference's cu_seqlens."""
    leaves = [t.detach().double().requires_grad_() for t in (x, u, v, log_a, h0)]
    y, final = semiseparable_chunked(*leaves[:4], initial_state=leaves[4], output_final_state=True,
                                     cu_seqlens=cu, chunk_size=8)
    loss = (y * dy.double()).sum() + (final * dfinal.double()).sum()
    return y.detach(), final.detach(), torch.autograd.grad(loss, leaves)


# Documents of 1 .. 70 tokens and two empty ones (one first): chunks of 16 end mid-document and at
# boundaries, a 70-token document spans five chunks, and most chunks would straddle a boundary if
# the row were cut into chunks regardless of the documents.
LENGTHS = [0, 1, 3, 16, 70, 2, 0, 17, 5, 1, 33, 9]


@interp
@pytest.mark.parametrize("cfg_index", range(5))
def test_cu_seqlens_many_short_documents_every_config(cfg_index):
    from muse_lm.ops.semiseparable.triton import CONFIGS, semiseparable_backward, semiseparable_forward

    cfg = CONFIGS[cfg_index]
    x, u, v, log_a, h0, dy, dfinal, cu = packed_problem(LENGTHS, 2, 5, 20, seed=cfg_index)
    y_ref, f_ref, grads_ref = packed_reference(x, u, v, log_a, h0, dy, dfinal, cu)
    # The four walks (unfused and fused, one and two levels), over the configs (the interpreter is slow).
    walk = (dict(two_levels=False, fused_states=False), dict(two_levels=True, fused_states=False),
            dict(two_levels=False, fused_states=True), dict(two_levels=True, fused_states=True))[cfg_index % 4]
    poison = torch.full_like(x, float("nan"))
    y, final, states = semiseparable_forward(x, u, v, log_a, h0, 16, cfg, out=poison, cu_seqlens=cu, **walk)
    assert torch.isfinite(y).all() and final.shape == h0.shape
    assert rel(y, y_ref) < TOL and rel(final, f_ref) < TOL, (cfg, walk)
    # An empty document passes its initial state (and the final state's gradient) straight through.
    torch.testing.assert_close(final[0], h0[0])
    grads = semiseparable_backward(x, u, v, log_a, states, dy, dfinal, 16, cfg, cu_seqlens=cu, **walk)
    for name, got, want in zip(("x", "u", "v", "log_a", "h0"), grads, grads_ref):
        assert got.shape == want.shape and torch.isfinite(got).all(), name
        assert rel(got, want) < TOL, (name, cfg, walk)
    torch.testing.assert_close(grads[4][6], dfinal[6])


@interp
def test_cu_seqlens_public_op_autograd_without_initial_state():
    """impl='triton' with cu_seqlens runs the kernel (not the reference); no initial state, bf16 data."""
    lengths = [4, 1, 40, 0, 7]
    x, u, v, log_a, _, dy, dfinal, cu = packed_problem(lengths, 2, 3, 6, decay=(-20.0, 0.0), seed=4)
    leaves = [t.to(torch.bfloat16).requires_grad_() for t in (x, u, v)] + [log_a.requires_grad_()]
    y, final = semiseparable_scan(*leaves, output_final_state=True, cu_seqlens=cu.long(), chunk_size=16,
                                  impl="triton")
    assert "SemiseparableTriton" in type(y.grad_fn).__name__ and final.shape == (5, 2, 3, 6)
    got = torch.autograd.grad((y * dy.bfloat16()).sum() + (final * dfinal).sum(), leaves)
    zeros = torch.zeros_like(dfinal)
    y_ref, f_ref, want = packed_reference(*(t.detach() for t in leaves), zeros, dy.bfloat16(), dfinal, cu)
    assert rel(y, y_ref) < 2e-2 and rel(final, f_ref) < 2e-2
    for name, g, w in zip(("x", "u", "v", "log_a"), got, want):
        assert rel(g, w) < 2e-2, name


@interp
@pytest.mark.parametrize("shape", [(1, 200, 1, 3, 5), (2, 90, 2, 17, 6)], ids=["B1-13chunks", "B2-6chunks"])
def test_two_level_state_walk_matches_one_level_and_fp64(shape):
    """The two-level walk (groups of chunks in parallel, a walk over groups, a fix-up) against the
    unfused and the fused one-level walks and the fp64 oracle, forward and backward, with strong
    decays (products that reach zero inside a group) next to a stretch with no decay at all."""
    from muse_lm.ops.semiseparable.state_pass import group_size
    from muse_lm.ops.semiseparable.triton import semiseparable_backward, semiseparable_forward

    b, t, h, r, p = shape
    assert triton_cdiv(t, 16) > group_size(triton_cdiv(t, 16))  # more than one group
    x, u, v, log_a, h0, dy, dfinal = problem(b, t, h, r, p, decay=(-20.0, -0.5), seed=t)
    log_a[:, t // 3 : t // 2] = 0.0
    y_ref, f_ref, grads_ref = fp64_reference(x, u, v, log_a, h0, dy, dfinal)
    walks = {"unfused": dict(two_levels=False, fused_states=False),
             "two_levels": dict(two_levels=True, fused_states=False),
             "fused": dict(two_levels=False, fused_states=True), "fused_two": dict(two_levels=True, fused_states=True)}
    out = {}
    for name_walk, walk in walks.items():
        y, final, states = semiseparable_forward(x, u, v, log_a, h0, 16, **walk)
        grads = semiseparable_backward(x, u, v, log_a, states, dy, dfinal, 16, **walk)
        assert rel(y, y_ref) < TOL and rel(final, f_ref) < TOL, name_walk
        for name, got, want in zip(("x", "u", "v", "log_a", "h0"), grads, grads_ref):
            assert torch.isfinite(got).all() and rel(got, want) < TOL, (name, name_walk)
        out[name_walk] = (y, final, states, *grads)
    for other in ("two_levels", "fused", "fused_two"):
        for one, two in zip(out["unfused"], out[other]):
            assert rel(two, one) < 1e-5, other


def triton_cdiv(a, b):
    return -(-a // b)


def test_fp64_with_impl_triton_is_refused_and_impl_none_is_the_reference():
    x, u, v, log_a, h0, _, _ = problem(1, 4, 1, 2, 3)
    with pytest.raises(NotImplementedError, match="impl='torch'"):
        semiseparable_scan(x.double(), u.double(), v.double(), log_a.double(), impl="triton")
    with pytest.raises(NotImplementedError, match="fp32"):
        semiseparable_scan(x, u, v, log_a, initial_state=h0.double(), impl="triton")
    xg = x.clone().requires_grad_()
    y, _ = semiseparable_scan(xg, u, v, log_a)
    assert not any(k in type(y.grad_fn).__name__ for k in ("SemiseparableTriton", "ssd_forward"))
    torch.testing.assert_close(y, semiseparable_chunked(x, u, v, log_a)[0])


@pytest.mark.skipif(interpreter_enabled(), reason="checks the non-interpreter dispatch")
def test_triton_on_cpu_without_interpreter_is_refused():
    x, u, v, log_a, _, _, _ = problem(1, 4, 1, 2, 3)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        semiseparable_scan(x, u, v, log_a, impl="triton")


def test_config_validation_chunk_rounding_and_pruning():
    from muse_lm.ops.semiseparable.triton import (
        CONFIGS,
        SSDConfig,
        _triton_configs,
        default_config,
        kernel_chunk,
        prune_configs_for,
        smem_estimate,
    )

    with pytest.raises(ValueError, match="power of two"):
        SSDConfig(48, 4, 2)
    with pytest.raises(ValueError, match="power of two"):
        SSDConfig(8, 4, 2)
    with pytest.raises(ValueError, match="num_warps"):
        SSDConfig(64, 3, 2)
    with pytest.raises(ValueError, match="num_stages"):
        SSDConfig(64, 4, 0)
    assert [kernel_chunk(c) for c in (1, 5, 16, 17, 48, 64, 100, 1000)] == [16, 16, 16, 32, 64, 64, 64, 64]
    for p in (1, 7, 33, 64, 200):
        assert default_config(p) in CONFIGS
    configs = _triton_configs()
    h100, consumer = 227 * 1024, 99 * 1024
    # The 8gb layer (P 64, R 32, chunk 64): no P-block wider than P, and every one fits both cards
    # (the largest 64-wide kernel compiles to 44 KB on sm_90, estimated at 88 KB).
    for limit in (h100, consumer):
        assert {c.kwargs["BP"] for c in prune_configs_for(configs, 64, 64, 32, limit)} == {16, 32, 64}
    assert {c.kwargs["BP"] for c in prune_configs_for(configs, 20, 64, 32, h100)} == {16, 32}
    assert {c.kwargs["BP"] for c in prune_configs_for(configs, 64, 64, 32, 70 * 1024)} == {16, 32}
    assert smem_estimate(64, 64, 32) <= consumer < smem_estimate(64, 64, 128)
    # Nothing fits: the smallest config survives (the autotuner skips what fails to compile).
    assert prune_configs_for(configs, 64, 128, 128, 1024) == [min(configs, key=lambda c: c.kwargs["BP"])]


def test_chunk_table_group_size_and_the_two_level_choice():
    from muse_lm.ops.semiseparable.state_pass import chunk_table, group_size, use_two_levels

    cu = torch.tensor([0, 0, 1, 17, 17, 50])
    table = chunk_table(cu, 16, torch.device("cpu"))
    assert table.dtype == torch.int32
    # (first token, sequence end, sequence, flags 1 = first chunk, 2 = last chunk); empty ones get one chunk.
    assert table.tolist() == [
        [0, 0, 0, 3], [0, 1, 1, 3], [1, 17, 2, 3], [17, 17, 3, 3], [17, 50, 4, 1], [33, 50, 4, 0], [49, 50, 4, 2],
    ]
    assert [group_size(n) for n in (1, 2, 6, 10, 64, 256, 1024, 1025)] == [2, 2, 4, 4, 8, 16, 32, 64]
    # B=1, H=12, R*P = 2048: one long sequence takes the two-level walk, a short one or many rows do not.
    assert use_two_levels(12, 1024, 2048) and use_two_levels(12, 256, 2048)
    assert not use_two_levels(12, 16, 2048) and not use_two_levels(8 * 12, 1024, 2048)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_step_kernel_matches_the_reference_step(dtype):
    """R 200 (padded to 256) puts P 40 over two P-blocks; with and without a state, the caller's
    state untouched, and an in-place update giving the same state."""
    from muse_lm.ops import semiseparable_step
    from muse_lm.ops.semiseparable.reference import semiseparable_step_reference
    from muse_lm.ops.semiseparable.step_triton import semiseparable_step_forward

    b, h, r, p = 2, 3, 200, 40
    gen = torch.Generator().manual_seed(9)
    x, u, v = (torch.randn(b, h, n, generator=gen).to(dtype) for n in (p, r, r))
    log_a = -3.0 * torch.rand(b, h, generator=gen)
    state = torch.randn(b, h, r, p, generator=gen)
    kept = state.clone()
    tol = TOL if dtype == torch.float32 else 1e-2  # bf16: y is rounded to bf16
    for prev in (state, None):
        y, new = semiseparable_step(x, u, v, log_a, prev, impl="triton")
        y_ref, new_ref = semiseparable_step_reference(x.double(), u.double(), v.double(), log_a.double(),
                                                      None if prev is None else prev.double())
        assert y.dtype == dtype and new.dtype == torch.float32
        assert rel(y, y_ref) < tol and rel(new, new_ref) < TOL
    assert torch.equal(state, kept)
    y_in, new_in = semiseparable_step_forward(x, u, v, log_a, state, out_state=state)
    assert new_in.data_ptr() == state.data_ptr()
    y, new = semiseparable_step(x, u, v, log_a, kept, impl="triton")
    assert torch.equal(new_in, new) and torch.equal(y_in, y)


@interp
def test_step_kernel_steps_equal_the_scan_and_its_gradients_the_reference():
    from muse_lm.ops import semiseparable_step
    from muse_lm.ops.semiseparable.reference import semiseparable_step_reference

    x, u, v, log_a, h0, dy, dfinal = problem(2, 9, 2, 5, 7, seed=10)
    y_scan, f_scan = semiseparable_scan(x, u, v, log_a, initial_state=h0, output_final_state=True,
                                        chunk_size=16, impl="triton")
    state, ys = h0, []
    for t in range(9):
        y_t, state = semiseparable_step(x[:, t], u[:, t], v[:, t], log_a[:, t], state, impl="triton")
        ys.append(y_t)
    assert rel(torch.stack(ys, 1), y_scan) < 1e-5 and rel(state, f_scan) < 1e-5
    # Autograd through one step (the backward runs in torch) against the fp64 reference's.
    leaves = [t.clone().requires_grad_() for t in (x[:, 0], u[:, 0], v[:, 0], log_a[:, 0], h0)]
    y_t, new = semiseparable_step(*leaves, impl="triton")
    assert "SemiseparableStepTriton" in type(y_t.grad_fn).__name__
    got = torch.autograd.grad((y_t * dy[:, 0]).sum() + (new * dfinal).sum(), leaves)
    ref = [t.detach().double().requires_grad_() for t in leaves]
    y_r, new_r = semiseparable_step_reference(*ref)
    want = torch.autograd.grad((y_r * dy[:, 0].double()).sum() + (new_r * dfinal.double()).sum(), ref)
    for name, g, w in zip(("x", "u", "v", "log_a", "state"), got, want):
        assert g.shape == w.shape and rel(g, w) < TOL, name
    # Without a state (the first token) the log-decay has no gradient to give.
    y_t, new = semiseparable_step(*leaves[:4], None, impl="triton")
    got = torch.autograd.grad((y_t * dy[:, 0]).sum() + (new * dfinal).sum(), leaves[:4])
    y_r, new_r = semiseparable_step_reference(*ref[:4], None)
    want = torch.autograd.grad((y_r * dy[:, 0].double()).sum() + (new_r * dfinal.double()).sum(), ref[:4])
    for name, g, w in zip(("x", "u", "v", "log_a"), got, want):
        assert torch.allclose(g.double(), w, atol=1e-5), name


def test_step_fp64_with_impl_triton_is_refused_and_impl_none_on_cpu_is_the_reference():
    from muse_lm.ops import semiseparable_step

    gen = torch.Generator().manual_seed(2)
    x, u, v = (torch.randn(1, 2, n, generator=gen) for n in (3, 4, 4))
    log_a, state = -torch.rand(1, 2, generator=gen), torch.randn(1, 2, 4, 3, generator=gen)
    with pytest.raises(NotImplementedError, match="impl='torch'"):
        semiseparable_step(x, u, v, log_a, state.double(), impl="triton")
    xg = x.clone().requires_grad_()
    y, _ = semiseparable_step(xg, u, v, log_a, state)
    assert "Triton" not in type(y.grad_fn).__name__
