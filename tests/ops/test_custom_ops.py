"""The scan and BK kernels as torch custom ops (`muse_lm::ssd_*`, `muse_lm::bk_*`): `torch.library.opcheck`
(schema, fake tensors against the real kernels, autograd registration, AOT dispatch with dynamic
shapes), values and gradients against the fp64 references, and `torch.compile(fullgraph=True)`
through them: the CUDA path of a compiled AR-SSM block must have no graph break (each break cost
host and GPU time on an H100, see ops/semiseparable/custom_ops.py). Runs in a TRITON_INTERPRET=1
child process."""

import pytest
import torch

from muse_lm.ops import semiseparable_scan
from muse_lm.ops._dispatch import interpreter_enabled
from muse_lm.ops.semiseparable.reference import semiseparable_recurrent

pytest.importorskip("triton")

interp = pytest.mark.skipif(not interpreter_enabled(), reason="runs in the TRITON_INTERPRET=1 child process")


@pytest.mark.skipif(interpreter_enabled(), reason="this is the parent of the interpreter run")
def test_interpreter_suite(interpreter_run):
    interpreter_run(__file__)


def _scan_inputs(with_state: bool):
    g = torch.Generator().manual_seed(1)
    b, t, h, p, r = 2, 21, 2, 16, 8  # T not a multiple of the chunk
    x, u, v = (torch.randn(b, t, h, d, generator=g) * s for d, s in ((p, 1.0), (r, 0.3), (r, 0.3)))
    log_a = -torch.rand(b, t, h, generator=g) * 2
    state = torch.randn(b, h, r, p, generator=g) if with_state else None
    return x, u, v, log_a, state


@interp
@pytest.mark.parametrize("with_state", [False, True])
def test_ssd_opcheck(with_state):
    from muse_lm.ops.semiseparable.custom_ops import ssd_forward

    x, u, v, log_a, state = _scan_inputs(with_state)
    leaves = [t.requires_grad_() for t in (x, u, v, log_a)] + ([state.requires_grad_()] if with_state else [])
    torch.library.opcheck(ssd_forward, (*leaves[:4], state, 16))


@interp
def test_ssd_custom_path_matches_fp64_values_and_grads():
    x, u, v, log_a, state = _scan_inputs(True)
    leaves = [t.clone().requires_grad_() for t in (x, u, v, log_a, state)]
    y, final = semiseparable_scan(*leaves[:4], initial_state=leaves[4], output_final_state=True, chunk_size=16,
                                  impl="triton")
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, u, v, log_a, state)]
    y_ref, final_ref = semiseparable_recurrent(*ref_leaves[:4], initial_state=ref_leaves[4], output_final_state=True)
    gy, gf = torch.randn_like(y_ref), torch.randn_like(final_ref)
    got = torch.autograd.grad((y * gy.float()).sum() + (final * gf.float()).sum(), leaves)
    want = torch.autograd.grad((y_ref * gy).sum() + (final_ref * gf).sum(), ref_leaves)
    for a, b in zip((y, final, *got), (y_ref, final_ref, *want), strict=True):
        assert (a.double() - b).abs().max() <= 1e-4 * b.abs().max()


@interp
def test_bk_opcheck_and_fp64():
    from muse_lm.ops.scan import bk_resolvent
    from muse_lm.ops.scan.bk_custom_ops import bk_forward

    g = torch.Generator().manual_seed(2)
    v = torch.randn(2, 19, 3, generator=g).requires_grad_()
    z = torch.tensor([0.5 + 0.3j, 1.0 + 0.5j, 2.5 + 0.1j]).requires_grad_()
    torch.library.opcheck(bk_forward, (v, z))
    out = bk_resolvent(v, z, impl="triton")
    ref = bk_resolvent(v.detach().double().requires_grad_(), z.detach().to(torch.complex128).requires_grad_(),
                       impl="torch")
    assert (out.to(torch.complex128) - ref).abs().max() <= 1e-5 * ref.abs().max()


@interp
def test_bk_op_runs_the_sequential_pair_on_many_channels(monkeypatch):
    """B * K >= SEQ_MIN_CHANNELS routes forward and backward to `bk_seq_triton` (the scan pair is never
    called), with values and gradients equal to the fp64 reference."""
    from muse_lm.ops.scan import bk_custom_ops, bk_resolvent
    from muse_lm.ops.scan.bk_seq_triton import SEQ_MIN_CHANNELS, prefers_seq

    b, t, k = 2, 9, SEQ_MIN_CHANNELS // 2
    assert prefers_seq((b, t, k)) and not prefers_seq((b, t, k - 1))
    calls = []
    for name in ("bk_resolvent_forward", "bk_resolvent_backward"):
        monkeypatch.setattr(bk_custom_ops, name, lambda *a, name=name, **kw: calls.append(name))
    g = torch.Generator().manual_seed(3)
    v = torch.randn(b, t, k, generator=g).requires_grad_()
    z = (0.5 + torch.rand(k, generator=g) + 1j * (0.2 + torch.rand(k, generator=g))).to(torch.complex64)
    z.requires_grad_()
    out = bk_resolvent(v, z, impl="triton")
    grad = torch.randn(b, t, k, dtype=torch.complex64, generator=g)
    got = torch.autograd.grad((out * grad.conj()).real.sum(), (v, z))
    v64, z64 = v.detach().double().requires_grad_(), z.detach().to(torch.complex128).requires_grad_()
    ref = bk_resolvent(v64, z64, impl="torch")
    want = torch.autograd.grad((ref * grad.to(torch.complex128).conj()).real.sum(), (v64, z64))
    assert calls == []
    for a, w in zip((out, *got), (ref, *want), strict=True):
        assert (a.to(w.dtype) - w).abs().max() <= 1e-4 * w.abs().max()


@interp
def test_fullgraph_compile_through_the_custom_ops():
    """fullgraph=True raises on any graph break: the dispatch, the checks and both ops trace."""
    from muse_lm.ops.scan.bk_triton import bk_resolvent_triton

    x, u, v, log_a, state = _scan_inputs(True)

    def fn(x, u, v, log_a, state, pot):
        y, final = semiseparable_scan(x, u, v, log_a, initial_state=state, output_final_state=True,
                                      chunk_size=16, impl="triton")
        g = bk_resolvent_triton(pot + y[..., :1, 0], torch.tensor([0.4 + 0.6j]))
        return y.sum() + final.sum() + g.real.sum()

    pot = torch.randn(2, 21, 1)
    leaves = [t.clone().requires_grad_() for t in (x, u, v, log_a, state, pot)]
    eager = fn(*leaves)
    want = torch.autograd.grad(eager, leaves)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=True)
    got_loss = compiled(*leaves)
    got = torch.autograd.grad(got_loss, leaves)
    assert torch.allclose(got_loss, eager, rtol=1e-5)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


@interp
def test_compiled_scan_does_not_recompile_across_the_walk_policy_thresholds(monkeypatch):
    """The walk's shape policies (one or two levels) are the kernels' business: the fake implementation
    must not guard on them, or a compiled model recompiles whenever T crosses a threshold (on an H100,
    MuseLM recompiled for ~2 minutes at T 4096 and again at 16384). The two-level threshold is lowered
    so small T cross it; B and the widths stay apart from T (no duck-sized equalities)."""
    from muse_lm.ops.semiseparable import fused_states
    from muse_lm.ops.semiseparable.custom_ops import semiseparable_custom

    monkeypatch.setattr(fused_states, "FUSED_TWO_LEVEL_MIN_CHUNKS", 4)
    torch._dynamo.reset()
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(gm)
        return gm

    fn = torch.compile(lambda x, u, v, la: semiseparable_custom(x, u, v, la, None, 16)[0].sum(), backend=backend,
                       dynamic=True)
    g = torch.Generator().manual_seed(3)
    for b, t in ((3, 33), (2, 100), (5, 161)):  # 3, 7 and 11 chunks of 16: across the lowered threshold
        x = torch.randn(b, t, 2, 7, generator=g)
        u, v = torch.randn(2, b, t, 2, 5, generator=g)
        fn(x, u, v, -torch.rand(b, t, 2, generator=g))
    assert len(compiles) == 1, f"{len(compiles)} compiles"


@interp
def test_compiled_ar_ssm_block_has_no_graph_break_on_the_kernel_path(monkeypatch):
    """The block as it runs on CUDA (the kernels' dispatch forced on these CPU tensors; the CUDA-only
    Im z check replaced by its traceable device assert)."""
    import muse_lm.ops.scan as scan_ops
    import muse_lm.ops.semiseparable as ss_ops
    from muse_lm.ops._dispatch import resolve_impl

    force = lambda op, impl, *t, has_triton_kernel: resolve_impl(op, "triton", *t, has_triton_kernel=True)
    monkeypatch.setattr(ss_ops, "resolve_impl", force)
    monkeypatch.setattr(scan_ops, "resolve_impl", force)
    monkeypatch.setattr(scan_ops, "_check_z", lambda op, z, k, ref: torch._assert_async((z.imag > 0).all(), op))
    from muse_lm.models import MuseConfig, MuseLM

    cfg = MuseConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_rank=8, min_rank=2, bk_heads=2,
                     tt_rank=4)
    block = MuseLM(cfg).blocks[0]
    explanation = torch._dynamo.explain(block)(torch.randn(2, 9, 32))
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]


@interp
def test_unused_outputs_send_no_zero_filled_gradients(monkeypatch):
    """Only y is used: the backward op gets grad_final None, not a zero-filled [B,H,R,P] tensor (nor
    one for the [B,H,NC,R,P] entering states)."""
    from muse_lm.ops.semiseparable import custom_ops

    seen = []
    real = custom_ops.semiseparable_backward

    def spy(x, u, v, log_a, states, grad_y, grad_final, chunk_size):
        seen.append(grad_final)
        return real(x, u, v, log_a, states, grad_y, grad_final, chunk_size)

    monkeypatch.setattr(custom_ops, "semiseparable_backward", spy)
    x, u, v, log_a, _ = _scan_inputs(False)
    x.requires_grad_()
    y, _ = semiseparable_scan(x, u, v, log_a, chunk_size=16, impl="triton")
    y.sum().backward()
    assert seen == [None] and x.grad is not None
