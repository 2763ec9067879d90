"""The fused chunk-state walk of the SSD scan (`semiseparable/fused_states.py`) under Triton's
interpreter, fp32: forward and backward with fused_states=True, in one level and in two, equal to the
unfused path (the chunk kernel + one-level `state_pass`, <= 1e-5 relative) and to the fp64 recurrence
(1e-4); the two-level walk at every group size with states crossing whole groups; at odd sizes
(T = 1, T < chunk, T ragged; R != P, neither a power of two), with and without an initial state and a
final-state gradient, strong decays, packed documents (cu_seqlens, an empty one included); every
declared config once with its outputs NaN-poisoned; the autotuned launch path with a stub timer. In
this process: the dispatch policy, config checks and every config compiled for sm_86 / sm_90 within
99 KB of shared memory.

Triton reads TRITON_INTERPRET when its kernels are defined, so the interpreter tests run in a child
pytest (`test_interpreter_suite`, the `interpreter_run` fixture) and are skipped here.
"""

import pytest
import torch

from muse_lm.ops._dispatch import interpreter_enabled
from muse_lm.ops.semiseparable.reference import semiseparable_recurrent

pytest.importorskip("triton")

from test_semiseparable_triton import problem  # noqa: E402  the inputs of the unfused kernel's tests

interp = pytest.mark.skipif(not interpreter_enabled(), reason="runs in the TRITON_INTERPRET=1 child process")
TOL = 1e-4  # max |err| / max |ref|: fp32 kernels against fp64
SAME = 1e-5  # fused against unfused: the same products, summed in another order at most
NAMES = ("x", "u", "v", "log_a", "h0")


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def packed_problem(lengths, h, r, p, *, decay=(-3.0, 0.0), seed=0):
    """problem() for one packed row of documents: h0, dfinal [N,H,R,P] and cu_seqlens int32 [N+1]."""
    x, u, v, log_a, _, dy, _ = problem(1, sum(lengths), h, r, p, decay=decay, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    h0, dfinal = torch.randn(2, len(lengths), h, r, p, generator=gen)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return x, u, v, log_a, h0, dy, dfinal, cu


def fp64_reference(x, u, v, log_a, h0, dy, dfinal, cu=None):
    """(y, final) of the fp64 token-by-token recurrence and the gradients of <y, dy> + <final, dfinal>
    in (x, u, v, log_a[, h0]) (h0 None: zero initial state; dfinal None: the final state unused)."""
    leaves = [t.detach().double().requires_grad_() for t in (x, u, v, log_a)]
    if h0 is not None:
        leaves.append(h0.detach().double().requires_grad_())
    y, final = semiseparable_recurrent(*leaves[:4], initial_state=leaves[4] if h0 is not None else None,
                                       output_final_state=True, cu_seqlens=cu)
    loss = (y * dy.double()).sum() + (0 if dfinal is None else (final * dfinal.double()).sum())
    return y.detach(), final.detach(), torch.autograd.grad(loss, leaves)


# The walks compared: unfused one-level (False), fused one-level (True), fused two-level ("two").
WALKS = {False: dict(fused_states=False, two_levels=False), True: dict(fused_states=True, two_levels=False),
         "two": dict(fused_states=True, two_levels=True)}


def run_both(x, u, v, log_a, h0, dy, dfinal, chunk, cu=None):
    """{walk: (y, final, states, dx, du, dv, dlog_a, dh0)} for each of WALKS, y NaN-poisoned."""
    from muse_lm.ops.semiseparable.triton import semiseparable_backward, semiseparable_forward

    out = {}
    for key, kw in WALKS.items():
        poison = torch.full_like(x, float("nan"))
        walk = dict(cu_seqlens=cu, **kw)
        y, final, states = semiseparable_forward(x, u, v, log_a, h0, chunk, out=poison, **walk)
        assert y.data_ptr() == poison.data_ptr()
        grads = semiseparable_backward(x, u, v, log_a, states, dy, dfinal, chunk, **walk)
        out[key] = (y, final, states, *grads)
        assert all(torch.isfinite(t).all() for t in out[key]), key
    return out


def check_against(out, ref, has_init):
    """Both fused walks vs the unfused one (every output, states included), all vs the fp64 reference."""
    y_ref, f_ref, grads_ref = ref
    names = ("y", "final", "states", "x", "u", "v", "log_a", "h0")
    for key in (True, "two"):
        for name, one, two in zip(names, out[False], out[key]):
            assert one.shape == two.shape and rel(two, one) < SAME, (name, key)
    # A gradient that is exactly zero in fp64 (d log_a at T = 1 with neither an initial state nor a
    # final-state gradient: log_a_0 only scales the zero state before the sequence) has no scale of its
    # own to be relative to, so it is held to the largest reference gradient's: the backward reads
    # d log_a off dU and dV (<v, dV> - <u, dU>), whose diagonal terms cancel to fp32 rounding, not to 0.
    scale = max(w.double().abs().max().item() for w in grads_ref)
    for fused in WALKS:
        y, final, _, *grads = out[fused]
        assert rel(y, y_ref) < TOL and rel(final, f_ref) < TOL, fused
        for name, got, want in zip(NAMES, grads[: 4 + has_init], grads_ref):
            if want.abs().max() == 0:
                assert got.double().abs().max().item() < TOL * scale, (name, fused)
            else:
                assert rel(got, want) < TOL, (name, fused)


def unfused_walk(a, b, log_a, init, n_seq, chunk, table, reverse):
    """The path the fused walk replaces: `_chunk_state_kernel` then the one-level `state_pass`."""
    from muse_lm.ops.semiseparable.state_pass import state_pass
    from muse_lm.ops.semiseparable.triton import _chunk_state_kernel, _chunk_state_tuned, _launch_chunks, _r_block

    bsz, t, h, r = a.shape
    p = b.shape[-1]
    nc = -(-t // chunk) if table is None else table.shape[0]
    states = torch.empty(bsz, h, nc, r, p)
    g = torch.empty(bsz * h, nc)
    tab = g if table is None else table
    _launch_chunks(_chunk_state_kernel, _chunk_state_tuned, (bsz, t, h, p, r, nc), None, (a, b, log_a, states, g, tab),
                   FROM_START=reverse, C=chunk, RB=_r_block(r), PREC="ieee", VARLEN=table is not None)
    final = state_pass(states, g, init, n_seq, h, table, reverse=reverse, two_levels=False)
    return states, final


@pytest.mark.skipif(interpreter_enabled(), reason="this is the parent of the interpreter run")
def test_interpreter_suite(interpreter_run):
    interpreter_run(__file__)


# (B, T, H, R, P, chunk): T = 1, T inside one chunk, T ragged over several chunks with R > 16 (two R
# tiles' worth of padding), chunk 32 with P over one 64-wide block.
SHAPES = [(2, 1, 2, 3, 5, 16), (1, 7, 3, 5, 7, 16), (2, 37, 2, 17, 20, 16), (1, 45, 2, 6, 40, 32)]
# (initial state, final state's gradient): the model's call (neither), a carried state (both), and one each.
EDGES = [(False, False), (True, True), (True, False), (False, True)]


# Every shape with the first two, the one-sided ones at one shape (interpreter time).
CASES = [(s, e) for s in SHAPES for e in EDGES[:2]] + [(SHAPES[2], e) for e in EDGES[2:]]


def _case_id(case):
    shape, edges = case
    return "B{}-T{}-H{}-R{}-P{}-C{}".format(*shape) + "-init{}-dfinal{}".format(*map(int, edges))


@interp
@pytest.mark.parametrize("shape,edges", CASES, ids=[_case_id(c) for c in CASES])
def test_fused_equals_unfused_and_fp64(shape, edges):
    b, t, h, r, p, chunk = shape
    x, u, v, log_a, h0, dy, dfinal = problem(b, t, h, r, p, seed=t + r)
    h0, dfinal = (h0 if edges[0] else None), (dfinal if edges[1] else None)
    out = run_both(x, u, v, log_a, h0, dy, dfinal, chunk)
    check_against(out, fp64_reference(x, u, v, log_a, h0, dy, dfinal), h0 is not None)
    if h0 is None:  # no initial state: d initial_state is still returned (the walk's final), unused
        assert out[True][-1].shape == (b, h, r, p)


@interp
def test_strong_decay_and_a_free_stretch_over_many_chunks():
    """log_a down to -20 per token (a chunk's cumulative log-decay near -300) next to a stretch with no
    decay at all, over 6 chunks: finite, fused equal to unfused and to the fp64 recurrence."""
    x, u, v, log_a, h0, dy, dfinal = problem(1, 90, 2, 3, 5, decay=(-20.0, -0.5), seed=3)
    log_a[:, 40:60] = 0.0
    assert log_a[:, :16].sum(1).min() < -88
    out = run_both(x, u, v, log_a, h0, dy, dfinal, 16)
    check_against(out, fp64_reference(x, u, v, log_a, h0, dy, dfinal), True)


# Documents of 0 .. 40 tokens, one empty in the middle and one first: chunks of 16 end mid-document and
# at boundaries, a 40-token document spans three chunks.
LENGTHS = [0, 1, 3, 16, 40, 2, 0, 17, 5]


@interp
def test_cu_seqlens_short_documents_with_empty_ones():
    x, u, v, log_a, h0, dy, dfinal, cu = packed_problem(LENGTHS, 2, 5, 20, decay=(-20.0, 0.0), seed=4)
    out = run_both(x, u, v, log_a, h0, dy, dfinal, 16, cu)
    check_against(out, fp64_reference(x, u, v, log_a, h0, dy, dfinal, cu), True)
    # An empty document passes its initial state, and the final state's gradient, straight through.
    torch.testing.assert_close(out[True][1][0], h0[0])
    torch.testing.assert_close(out[True][1][6], h0[6])
    torch.testing.assert_close(out[True][-1][6], dfinal[6])


BF16_TOL = 1e-2  # max |err| / max |ref| of bf16 inputs against fp64: the ops' stated bf16 contract


@interp
@pytest.mark.parametrize("packed", [False, True], ids=["batch", "cu_seqlens"])
def test_compact_states_bf16_match_fp64_and_save_16_bit_states(packed):
    """compact_states=True with bf16 inputs: the saved states and their gradients are bf16, every output
    and gradient within the bf16 contract of the fp64 recurrence, and close to the fp32-state fused path
    (the only difference is the states' rounding)."""
    from muse_lm.ops.semiseparable.triton import semiseparable_backward, semiseparable_forward

    if packed:
        x, u, v, log_a, h0, dy, dfinal, cu = packed_problem([5, 0, 40, 19], 2, 6, 20, decay=(-2.0, 0.0), seed=6)
    else:
        (x, u, v, log_a, h0, dy, dfinal), cu = problem(2, 75, 2, 6, 20, decay=(-2.0, 0.0), seed=6), None
    x, u, v, dy = (t.bfloat16() for t in (x, u, v, dy))
    ref = fp64_reference(x, u, v, log_a, h0, dy, dfinal, cu)
    runs = {}
    for compact, two in ((False, False), (True, False), (True, True)):
        walk = dict(cu_seqlens=cu, fused_states=True, two_levels=two)
        y, final, states = semiseparable_forward(x, u, v, log_a, h0, 16, out=torch.full_like(x, float("nan")),
                                                 compact_states=compact, **walk)
        assert states.dtype == (torch.bfloat16 if compact else torch.float32)
        grads = semiseparable_backward(x, u, v, log_a, states, dy, dfinal, 16, **walk)
        runs[compact, two] = (y, final, *grads)
    y_ref, f_ref, grads_ref = ref
    for two in (False, True):  # two levels: the fix-up rounds the group-local bf16 states once more
        for name, got, full, want in zip(("y", "final", *NAMES), runs[True, two], runs[False, False],
                                         (y_ref, f_ref, *grads_ref)):
            err, err_full = rel(got, want), rel(full, want)
            print(f"{name}: compact (two levels {two}) {err:.2e}, fp32 states {err_full:.2e}")
            assert torch.isfinite(got).all() and err < BF16_TOL, (name, two)
            # The states' rounding adds at most about the outputs' own bf16 rounding (2^-9 = 2e-3).
            assert err < err_full + 4e-3, (name, two)


@interp
def test_policies_switched_on_reach_the_custom_op_with_matching_fake_dtypes(monkeypatch):
    """With both policies on (what a GPU measurement would switch), the model's path (the custom op, no
    arguments) runs the fused walk with compact bf16 states, `torch.library.opcheck` finds the fake
    implementation's dtypes equal to the kernels', and values and gradients stay within the bf16
    contract of fp64."""
    from muse_lm.ops import semiseparable_scan
    from muse_lm.ops.semiseparable import fused_states
    from muse_lm.ops.semiseparable.custom_ops import ssd_forward

    monkeypatch.setattr(fused_states, "FUSED_STATES_BY_DEFAULT", True)
    monkeypatch.setattr(fused_states, "COMPACT_STATES_BY_DEFAULT", True)
    x, u, v, log_a, _, dy, _ = problem(2, 40, 2, 6, 20, decay=(-2.0, 0.0), seed=7)
    x, u, v, dy = (t.bfloat16() for t in (x, u, v, dy))
    leaves = [t.clone().requires_grad_() for t in (x, u, v, log_a)]
    _, _, states, *_ = ssd_forward(*(t.detach() for t in leaves), None, 16)
    assert states.dtype == torch.bfloat16
    torch.library.opcheck(ssd_forward, (*leaves, None, 16))
    y, _ = semiseparable_scan(*leaves, chunk_size=16, impl="triton", output_final_state=True)
    got = torch.autograd.grad((y.float() * dy.float()).sum(), leaves)
    y_ref, _, want = fp64_reference(x, u, v, log_a, None, dy, None)
    assert rel(y, y_ref) < BF16_TOL
    for name, g, w in zip(NAMES, got, want):
        assert rel(g, w) < BF16_TOL, name


def test_compact_states_are_bf16_only():
    """Compact states are bf16: asked for with fp16 inputs (without decay a state sums a whole sequence and
    can pass fp16's 65504; bf16 has fp32's range) or fp32 inputs, it raises instead of doing nothing."""
    from muse_lm.ops.semiseparable.triton import saved_state_dtype

    assert saved_state_dtype(torch.bfloat16, fused_states=True, compact_states=True) == torch.bfloat16
    for dtype in (torch.float16, torch.float32):
        with pytest.raises(ValueError, match="needs bf16 inputs"):
            saved_state_dtype(dtype, fused_states=True, compact_states=True)
    # None follows the policy (on): bf16 inputs keep bf16 states, fp16 and fp32 inputs fp32 ones.
    assert saved_state_dtype(torch.bfloat16, fused_states=True) == torch.bfloat16
    for dtype in (torch.float16, torch.float32):
        assert saved_state_dtype(dtype, fused_states=True) == torch.float32
    assert saved_state_dtype(torch.bfloat16, fused_states=False) == torch.float32  # unfused: fp32


def test_compact_states_need_the_fused_walk():
    from muse_lm.ops.semiseparable.triton import semiseparable_forward

    x, u, v, log_a, *_ = problem(1, 8, 1, 4, 4)
    x, u, v = (t.bfloat16() for t in (x, u, v))
    with pytest.raises(ValueError, match="compact_states=True needs the fused walk"):
        semiseparable_forward(x, u, v, log_a, None, 16, fused_states=False, compact_states=True)


@interp
def test_every_declared_config_poisoned_forward_and_backward_walks():
    """Each config's walk, both directions, plain and packed, into NaN-filled states and finals: equal
    to the unfused walk, so every tile of every chunk was stored. R 40 and P 40 keep every block size."""
    from muse_lm.ops.semiseparable.fused_states import CONFIGS, fused_chunk_states
    from muse_lm.ops.semiseparable.state_pass import chunk_table

    x, u, v, log_a, h0, dy, dfinal = problem(2, 37, 2, 40, 40, seed=8)
    xp, up, vp, lap, h0p, dyp, dfp, cu = packed_problem([5, 0, 20, 12], 1, 40, 40, seed=9)
    table = chunk_table(cu, 16, torch.device("cpu"))
    cases = [((u, x, log_a, h0, 2, None), False), ((v, dy, log_a, dfinal, 2, None), True),
             ((up, xp, lap, h0p, 4, table), False), ((vp, dyp, lap, dfp, 4, table), True)]
    wants = [unfused_walk(a, b, la, init, n, 16, tab, rev) for (a, b, la, init, n, tab), rev in cases]
    for cfg in CONFIGS:
        for ((a, b, la, init, n, tab), rev), (want_states, want_final) in zip(cases, wants):
            states = torch.full_like(want_states, float("nan"))
            final = torch.full_like(want_final, float("nan"))
            got = fused_chunk_states(a, b, la, states, init, n, 16, tab, reverse=rev, config=cfg, final=final)
            assert got.data_ptr() == final.data_ptr()
            assert torch.isfinite(states).all() and torch.isfinite(final).all(), (cfg, rev, tab is not None)
            assert rel(states, want_states) < SAME and rel(final, want_final) < SAME, (cfg, rev, tab is not None)


@interp
@pytest.mark.parametrize("cfg_index", [0, 2], ids=["16x16", "32x64"])
def test_two_level_walk_every_group_size_poisoned(cfg_index):
    """The fused walk in two levels (groups of 1, 2, 3, 8 and more chunks than there are; with 8, the
    fix-up's one tile of 8 chunks runs past the last of the 10), both directions,
    plain (with and without an initial state) and packed (a document ends inside a group, one is empty),
    into NaN-filled states and finals: equal to the unfused walk, so every group's fix-up reached every
    chunk. T 150 is 10 chunks of 16; the decay is weak and absent over chunks 2-6, so a state crosses
    whole groups and a wrong decay product or group carry shows."""
    from muse_lm.ops.semiseparable.fused_states import CONFIGS, fused_chunk_states
    from muse_lm.ops.semiseparable.state_pass import chunk_table

    x, u, v, log_a, h0, dy, dfinal = problem(2, 150, 2, 20, 24, decay=(-0.05, 0.0), seed=3)
    xp, up, vp, lap, h0p, dyp, dfp, cu = packed_problem([5, 0, 70, 12, 40], 1, 20, 24, decay=(-0.05, 0.0), seed=9)
    log_a[:, 32:112] = 0.0
    lap[:, 10:80] = 0.0
    table = chunk_table(cu, 16, torch.device("cpu"))
    cases = [((u, x, log_a, h0, 2, None), False), ((v, dy, log_a, dfinal, 2, None), True),
             ((u, x, log_a, None, 2, None), False), ((up, xp, lap, h0p, 5, table), False),
             ((vp, dyp, lap, dfp, 5, table), True)]
    for (a, b, la, init, n, tab), rev in cases:
        want_states, want_final = unfused_walk(a, b, la, init, n, 16, tab, rev)
        for group in (1, 2, 3, 8, 16):
            states = torch.full_like(want_states, float("nan"))
            final = torch.full_like(want_final, float("nan"))
            fused_chunk_states(a, b, la, states, init, n, 16, tab, reverse=rev, config=CONFIGS[cfg_index],
                               final=final, group=group)
            where = (group, rev, tab is not None, init is not None)
            assert torch.isfinite(states).all() and torch.isfinite(final).all(), where
            assert rel(states, want_states) < SAME and rel(final, want_final) < SAME, where


@interp
def test_autotuned_launch_path_with_a_stub_benchmark(monkeypatch):
    """The CUDA branch (triton.autotune: pruning by R, P, chunk and shared memory, the grid lambda) under
    the interpreter with a stub timer: every declared config runs once, and the tuned walk is right."""
    import muse_lm.ops.semiseparable.fused_states as fs

    monkeypatch.setattr(fs, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(fs, "_device_smem", lambda device: 99 * 1024)
    monkeypatch.setattr(fs._fused_walk_tuned, "cache", {})
    benched = []

    def stub(fn, quantiles):
        fn()
        benched.append(1)
        return [1.0, 1.0, 1.0]

    monkeypatch.setitem(fs._fused_walk_tuned.__dict__, "do_bench", stub)  # a cached_property: bypass its getter
    # INTERPRET is a constexpr argument: the monkeypatched check above sets it False, which the
    # interpreter cannot run (runtime range bound), so restore it for the kernel only.
    launch = fs._fused_walk_tuned.run

    def run(*args, **kwargs):
        return launch(*args, **{**kwargs, "INTERPRET": True})

    monkeypatch.setattr(fs._fused_walk_tuned, "run", run)
    x, u, v, log_a, h0, _, _ = problem(1, 40, 2, 40, 40, seed=12)
    states = torch.full((1, 2, 3, 40, 40), float("nan"))
    final = fs.fused_chunk_states(u, x, log_a, states, h0, 1, 16, reverse=False)
    want_states, want_final = unfused_walk(u, x, log_a, h0, 1, 16, None, False)
    assert rel(states, want_states) < SAME and rel(final, want_final) < SAME
    assert len(benched) == len(fs.CONFIGS)  # R 40, P 40 at 99 KB: nothing pruned


def test_two_level_policy_group_size_and_argument_checks():
    """The fused walk's level and group rules at their boundaries, and a bad group refused."""
    import muse_lm.ops.semiseparable.fused_states as fs

    many_rows = 1 << 12  # B*H: far from the unfused walk's few-rows rule at R*P 4096
    assert not fs.use_fused_two_levels(many_rows, fs.FUSED_TWO_LEVEL_MIN_CHUNKS - 1, 4096)
    assert fs.use_fused_two_levels(many_rows, fs.FUSED_TWO_LEVEL_MIN_CHUNKS, 4096)
    assert fs.use_fused_two_levels(16, 64, 4096)  # few rows: the unfused walk's rule holds too
    assert [fs.fused_group_size(n) for n in (1, 7, 64, 128, 256, 1024, 4096)] == [1, 4, 32, 64, 64, 64, 64]
    x, u, v, log_a, *_ = problem(1, 40, 1, 4, 4)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="group="):
            fs.fused_chunk_states(u, x, log_a, torch.empty(1, 1, 3, 4, 4), None, 1, 16, reverse=False, group=bad)


def test_sixteen_bit_products_only_where_both_tiles_are_loaded_sixteen_bit(monkeypatch):
    """RAW for bf16/fp16 inputs, RAW_S only when every state tensor has the inputs' dtype, neither for
    fp32 inputs, under the interpreter (whose bf16 tl.dot is wrong) or with the policy off."""
    import muse_lm.ops.semiseparable.triton as k

    monkeypatch.setattr(k, "interpreter_enabled", lambda: False)
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    assert k._raw_meta(bf16, bf16, bf16) == dict(RAW=True, RAW_S=True)
    assert k._raw_meta(bf16, bf16, fp32) == dict(RAW=True, RAW_S=False)  # compact states, unfused gradients
    assert k._raw_meta(fp16, fp32) == dict(RAW=True, RAW_S=False)
    assert k._raw_meta(fp32, fp32) == dict(RAW=False, RAW_S=False)
    monkeypatch.setattr(k, "RAW_DOTS_BY_DEFAULT", False)
    assert k._raw_meta(bf16, bf16) == dict(RAW=False, RAW_S=False)
    monkeypatch.setattr(k, "RAW_DOTS_BY_DEFAULT", True)
    monkeypatch.setattr(k, "interpreter_enabled", lambda: True)
    assert k._raw_meta(bf16, bf16) == dict(RAW=False, RAW_S=False)


def test_walk_policy(monkeypatch):
    """resolve_walk: fused or not by `FUSED_STATES_BY_DEFAULT` unless told; levels by the fused walk's own
    policy or the unfused walk's unless told; every combination allowed."""
    import muse_lm.ops.semiseparable.fused_states as fs

    assert fs.FUSED_STATES_BY_DEFAULT is True and fs.COMPACT_STATES_BY_DEFAULT is True  # measured on an H100
    long_few, short_many = (16, 1024, 4096), (512, 32, 4096)  # (B*H, chunks, R*P)
    assert fs.resolve_walk(None, None, *short_many) == (True, False)
    assert fs.resolve_walk(None, None, *long_few) == (True, fs.use_fused_two_levels(*long_few))
    assert fs.resolve_walk(False, None, *long_few) == (False, True)  # the unfused walk's policy
    assert fs.resolve_walk(False, None, *short_many) == (False, False)
    for fused in (None, True, False):
        for two in (True, False):
            assert fs.resolve_walk(fused, two, *long_few)[1] is two
    assert fs.resolve_walk(True, True, 1, 2, 3) == (True, True)
    monkeypatch.setattr(fs, "FUSED_STATES_BY_DEFAULT", False)
    assert fs.resolve_walk(None, None, *short_many) == (False, False)
    assert fs.resolve_walk(None, True, *short_many) == (False, True)
    assert fs.resolve_walk(True, None, *short_many) == (True, False)


def test_config_validation_default_config_pruning_and_argument_checks():
    import triton

    from muse_lm.ops.semiseparable.fused_states import (
        CONFIGS,
        SMEM_99KB,
        FusedStatesConfig,
        _triton_configs,
        default_config,
        fused_chunk_states,
        prune_configs_for,
        smem_estimate,
    )

    for bad, match in (((48, 16, 4, 2), "block_r"), ((16, 8, 4, 2), "block_p"), ((16, 16, 3, 2), "num_warps"),
                       ((16, 16, 4, 0), "num_stages")):
        with pytest.raises(ValueError, match=match):
            FusedStatesConfig(*bad)
    assert len(set(CONFIGS)) == len(CONFIGS)
    assert default_config(64, 64).block_r == default_config(64, 64).block_p == 64
    assert (default_config(3, 5).block_r, default_config(3, 5).block_p) == (16, 16)
    assert default_config(17, 40) in CONFIGS and default_config(17, 40).block_r <= 32
    configs = _triton_configs()
    tiles = lambda kept: {(c.kwargs["BR"], c.kwargs["BP"]) for c in kept}  # noqa: E731
    assert tiles(prune_configs_for(configs, 64, 64, 64, SMEM_99KB)) == {(c.block_r, c.block_p) for c in CONFIGS}
    assert tiles(prune_configs_for(configs, 20, 64, 64, SMEM_99KB)) == {(16, 16), (32, 32), (32, 64)}
    assert max(smem_estimate(c.block_r, c.block_p, 64, c.num_stages) for c in CONFIGS) <= SMEM_99KB
    # Nothing fits: the smallest tile survives.
    kept = prune_configs_for(configs, 64, 64, 64, 1024)
    assert len(kept) == 1 and tiles(kept) == {(16, 16)}
    assert all(c.kwargs["STAGES"] == c.num_stages for c in configs)
    x, u, v, log_a, h0, _, _ = problem(1, 20, 2, 3, 4)
    nc = triton.cdiv(20, 16)
    with pytest.raises(ValueError, match="chunk"):
        fused_chunk_states(u, x, log_a, torch.empty(1, 2, nc, 3, 4), None, 1, 8, reverse=False)
    with pytest.raises(ValueError, match="chunks"):
        fused_chunk_states(u, x, log_a, torch.empty(1, 2, nc + 1, 3, 4), None, 1, 16, reverse=False)
    with pytest.raises(ValueError, match="states"):
        fused_chunk_states(u, x, log_a, torch.empty(1, 2, nc, 4, 3), None, 1, 16, reverse=False)
    with pytest.raises(ValueError, match="init"):
        fused_chunk_states(u, x, log_a, torch.empty(1, 2, nc, 3, 4), h0.double(), 1, 16, reverse=False)


@pytest.mark.skipif(interpreter_enabled(), reason="compiles for real GPU targets (no GPU needed)")
@pytest.mark.parametrize("capability", [86, 90], ids=["sm86", "sm90"])
def test_every_declared_config_compiles_within_its_estimate_and_99kb(capability):
    """Compiled offline for an RTX 3090 / 4090-class card (sm_86, 99 KB of shared memory) and an H100 at
    the largest chunk (64), fp32 inputs and no chunk table (the case whose loads the pipeliner stages in
    shared memory; bf16 inputs and packed documents took less in every config when measured)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from muse_lm.ops.semiseparable.fused_states import CONFIGS, SMEM_99KB, _fused_walk_kernel, smem_estimate

    sig = {name: "constexpr" for name in _fused_walk_kernel.arg_names}
    ptrs = ("a_ptr", "b_ptr", "la_ptr", "st_ptr", "init_ptr", "final_ptr", "pc_ptr", "g_ptr", "gst_ptr", "gdec_ptr")
    sig.update({name: "*fp32" for name in ptrs})
    ints = ("T", "H", "R", "P", "NC", "G", "NG", "LOG_BH", "LOG_NC")
    sig.update({"tab_ptr": "*i32", **{name: "i32" for name in ints}})
    target = GPUTarget("cuda", capability, 32)
    for cfg in CONFIGS:
        for grouped in (False, True):
            consts = dict(C=64, BR=cfg.block_r, BP=cfg.block_p, STAGES=cfg.num_stages, HAS_INIT=True, REVERSE=False,
                          VARLEN=False, GROUPED=grouped, PREC="ieee", INTERPRET=False)
            source = ASTSource(fn=_fused_walk_kernel, signature=sig, constexprs=consts)
            compiled = triton.compile(source, target=target,
                                      options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
            estimate = smem_estimate(cfg.block_r, cfg.block_p, 64, cfg.num_stages)
            assert compiled.metadata.shared <= estimate <= SMEM_99KB, (cfg, grouped, compiled.metadata.shared)
