"""The dense fused linear cross-entropy kernel vs the blocked torch reference and an fp64 naive
definition, through Triton's interpreter, in fp32, for every declared config and reduction.

Triton reads TRITON_INTERPRET when its kernels are defined, so the interpreter tests run in a
child pytest process started with TRITON_INTERPRET=1 (`test_interpreter_suite`); in this process
they are skipped. Tolerance: ||err|| / ||ref|| <= 1e-5 for the loss and both gradients.
"""


import pytest
import torch
import torch.nn.functional as F

from muse_lm.ops._dispatch import interpreter_enabled
from muse_lm.ops.tt_cross_entropy.reference import linear_cross_entropy_ref

pytest.importorskip("triton")

interp = pytest.mark.skipif(not interpreter_enabled(), reason="runs in the TRITON_INTERPRET=1 child process")

TOL = 1e-5
# (N, V, D): odd sizes; N = 1; several vocab blocks and splits with D not a multiple of BK.
SHAPES = [(7, 37, 24), (1, 37, 24), (33, 300, 40)]
REDUCTIONS = ("mean", "sum", "none")


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _naive64(h, w, t, ignore_index, reduction, z_loss):
    """The definition in fp64, with the whole N x V logits."""
    logits = h.double() @ w.double().T
    valid = t != ignore_index
    lse = torch.logsumexp(logits, dim=1)
    ce = F.cross_entropy(logits, torch.where(valid, t, 0), reduction="none")
    per = torch.where(valid, ce + z_loss * lse.square(), torch.zeros_like(ce))
    if reduction == "none":
        return per
    return per.sum() if reduction == "sum" else per.sum() / valid.sum().clamp_min(1)


def _inputs(n, v, d, seed, dtype=torch.float32, ignore_index=-100):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=gen).to(dtype).requires_grad_()
    # Logit std ~2: a peaked softmax, not a uniform one.
    w = (torch.randn(v, d, generator=gen) * 2 / d**0.5).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=gen)
    if n > 2:
        t[1] = ignore_index
        t[n - 1] = ignore_index
    return h, w, t


def _check(loss, h, w, t, ignore_index, reduction, z_loss, msg):
    """loss and its h / w gradients vs the blocked reference and the fp64 definition."""
    assert loss.dtype == torch.float32, msg
    ref = linear_cross_entropy_ref(h, w, t, ignore_index=ignore_index, reduction=reduction, z_loss=z_loss)
    naive = _naive64(h, w, t, ignore_index, reduction, z_loss)
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(loss.shape, generator=gen) if reduction == "none" else torch.tensor(1.7)
    got = torch.autograd.grad(loss, (h, w), g)
    want = torch.autograd.grad(ref, (h, w), g)
    exact = torch.autograd.grad(naive, (h, w), g.double())
    assert _rel(loss, ref) <= TOL and _rel(loss, naive) <= TOL, msg
    for a, b, c, name in zip(got, want, exact, ("dh", "dw")):
        assert a.dtype == b.dtype and torch.isfinite(a).all(), (msg, name)
        assert _rel(a, b) <= TOL and _rel(a, c) <= TOL, (msg, name, _rel(a, b), _rel(a, c))


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer a kernel must fill entirely starts as NaN."""
    from muse_lm.ops.tt_cross_entropy import triton_dense

    def nan_buffer(shape, device, dtype):
        return torch.full(shape, float("nan"), device=device, dtype=dtype)

    monkeypatch.setattr(triton_dense, "_new_buffer", nan_buffer)


@pytest.mark.skipif(interpreter_enabled(), reason="this is the parent of the interpreter run")
def test_interpreter_suite(interpreter_run):
    interpreter_run(__file__)


@interp
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-V{s[1]}-D{s[2]}")
def test_every_config_and_reduction_matches_reference_and_fp64(shape, poisoned):
    from muse_lm.ops.tt_cross_entropy.triton_dense import CONFIGS, linear_cross_entropy_triton

    h, w, t = _inputs(*shape, seed=sum(shape))
    for i, cfg in enumerate(CONFIGS):
        for reduction in REDUCTIONS:
            z_loss = 0.0 if i % 2 else 1e-2  # z_loss on and off over the configs
            loss = linear_cross_entropy_triton(
                h, w, t, ignore_index=-100, reduction=reduction, z_loss=z_loss, config=cfg
            )
            _check(loss, h, w, t, -100, reduction, z_loss, f"{cfg} {reduction} z={z_loss}")


@interp
def test_default_config_and_an_ignore_index_that_is_a_vocab_id(poisoned):
    from muse_lm.ops.tt_cross_entropy.triton_dense import linear_cross_entropy_triton

    h, w, t = _inputs(9, 37, 24, seed=4, ignore_index=3)
    t[4] = 3
    loss = linear_cross_entropy_triton(h, w, t, ignore_index=3, reduction="mean", z_loss=0.1)
    _check(loss, h, w, t, 3, "mean", 0.1, "ignore_index=3")


@interp
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_ignored_gives_zero_loss_and_zero_gradients(reduction, poisoned):
    from muse_lm.ops.tt_cross_entropy.triton_dense import linear_cross_entropy_triton

    h, w, _ = _inputs(5, 37, 24, seed=2)
    t = torch.full((5,), -100)
    loss = linear_cross_entropy_triton(h, w, t, ignore_index=-100, reduction=reduction, z_loss=0.1)
    assert loss.shape == ((5,) if reduction == "none" else ())
    assert torch.equal(loss, torch.zeros_like(loss))
    gh, gw = torch.autograd.grad(loss.sum(), (h, w))
    assert torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0


@interp
def test_zero_tokens():
    from muse_lm.ops.tt_cross_entropy.triton_dense import linear_cross_entropy_triton

    h, w, _ = _inputs(3, 37, 24, seed=5)
    h0 = h[:0].detach().requires_grad_()
    loss = linear_cross_entropy_triton(
        h0, w, torch.zeros(0, dtype=torch.long), ignore_index=-100, reduction="mean", z_loss=0.0
    )
    assert loss.item() == 0.0
    gh, gw = torch.autograd.grad(loss, (h0, w))
    assert gh.shape == (0, 24) and torch.count_nonzero(gw) == 0


@interp
@pytest.mark.parametrize("splits", [1, 2, 5])
def test_forward_partials_combine_over_any_vocab_split(splits, poisoned):
    """lse and the target logit do not depend on how the vocab is split over programs
    (5 splits of 300 rows in 64-row blocks leave a split whose last block lies past V)."""
    from muse_lm.ops.tt_cross_entropy.triton_dense import CONFIGS, lce_forward

    h, w, t = _inputs(33, 300, 40, seed=6)
    logits = h.detach().double() @ w.detach().double().T
    lse, tgt = lce_forward(h.detach(), w.detach(), t, CONFIGS[4], split_v=splits)
    valid = t != -100
    assert _rel(lse, torch.logsumexp(logits, 1)) <= TOL
    assert _rel(tgt[valid], logits[valid, t[valid]]) <= TOL


@interp
def test_chunked_weight_gradient_of_a_non_fp32_weight(poisoned):
    """A weight that is not fp32 (here fp64: the interpreter computes bf16 wrongly) takes the
    chunked fp32 dW buffer; chunks of 64 rows of a 300-row head, written into a NaN-poisoned dW."""
    from muse_lm.ops.tt_cross_entropy.triton_dense import CONFIGS, lce_backward, lce_forward

    h, w, t = _inputs(33, 300, 40, seed=7, dtype=torch.float64)
    cfg = CONFIGS[4]
    lse, _ = lce_forward(h.detach(), w.detach(), t, cfg)
    valid = t != -100
    token_grad = valid.float() / valid.sum()
    dh, dw = lce_backward(h.detach(), w.detach(), t, lse, token_grad, 0.05, cfg, chunk_rows=64)
    ref = _naive64(h, w, t, -100, "mean", 0.05)
    want_h, want_w = torch.autograd.grad(ref, (h, w))
    assert dh.dtype == dw.dtype == torch.float64
    assert _rel(dh, want_h) <= TOL and _rel(dw, want_w) <= TOL


@interp
@pytest.mark.parametrize("dh_chunk_rows", [None, 8])
def test_two_pass_backward_matches_one_pass_and_fp64(dh_chunk_rows, poisoned):
    """The two-pass backward (dh over row chunks, then dW over vocab chunks) gives the one-pass
    gradients; fp64 inputs (the interpreter computes bf16 dots wrongly) take separate fp32 row
    chunks, here 8 rows each over 33 rows, written into a NaN-poisoned dh."""
    from muse_lm.ops.tt_cross_entropy.triton_dense import CONFIGS, lce_backward, lce_forward

    h, w, t = _inputs(33, 300, 40, seed=11, dtype=torch.float64)
    cfg = CONFIGS[4]
    lse, _ = lce_forward(h.detach(), w.detach(), t, cfg)
    valid = t != -100
    token_grad = valid.float() / valid.sum()
    two = lce_backward(h.detach(), w.detach(), t, lse, token_grad, 0.05, cfg, chunk_rows=64, two_pass=True,
                       dh_chunk_rows=dh_chunk_rows)
    one = lce_backward(h.detach(), w.detach(), t, lse, token_grad, 0.05, cfg, chunk_rows=64, two_pass=False)
    want = torch.autograd.grad(_naive64(h, w, t, -100, "mean", 0.05), (h, w))
    for a, b, ref in zip(two, one, want, strict=True):
        assert a.dtype == torch.float64 and _rel(a, ref) <= TOL and _rel(a, b) <= TOL


@interp
@pytest.mark.parametrize("n", [1, 33, 257])
def test_two_pass_in_place_16bit_dh_chunks_equal_one_pass(n, poisoned):
    """fp16 h with a bf16 weight keeps both gradients 16-bit while the kernel multiplies in fp32 (which
    the interpreter computes right): the two-pass dh then hosts its fp32 row chunks in its own unwritten
    rows (in-place chunks, then a separate tail), and must equal the one-pass gradients exactly."""
    from muse_lm.ops.tt_cross_entropy.triton_dense import CONFIGS, lce_backward, lce_forward

    gen = torch.Generator().manual_seed(n)
    h = torch.randn(n, 40, generator=gen).half()
    w = (0.2 * torch.randn(300, 40, generator=gen)).bfloat16()
    t = torch.randint(0, 300, (n,), generator=gen)
    cfg = CONFIGS[4]
    lse, _ = lce_forward(h.float(), w.float(), t, cfg)
    token_grad = torch.full((n,), 1.0 / n)
    two = lce_backward(h, w, t, lse, token_grad, 0.01, cfg, two_pass=True)
    one = lce_backward(h, w, t, lse, token_grad, 0.01, cfg, two_pass=False)
    for a, b, dtype in zip(two, one, (torch.float16, torch.bfloat16), strict=True):
        assert a.dtype == dtype and torch.equal(a, b)


@interp
@pytest.mark.parametrize(
    ("h_dtype", "w_dtype"),
    [(torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.float32, torch.float16)],
    ids=["h16", "hbf16", "w16"],
)
def test_16bit_gradients_narrowed_in_place(h_dtype, w_dtype, poisoned):
    """A 16-bit dh comes out of its fp32 accumulators in place (its storage is the first half's,
    no N x D fp32 block kept); a 16-bit dW takes its fp32 chunks in its own unwritten rows
    (in-place chunks, then a separate tail chunk). Mixed dtypes run fp32 dots, so the kernel math is
    exact here (the interpreter's 16-bit dots are not); the reference grads round to the same dtype."""
    from muse_lm.ops.tt_cross_entropy.triton_dense import CONFIGS, _dw_plan, linear_cross_entropy_triton

    h, w, t = _inputs(33, 300, 40, seed=10)
    h = h.detach().to(h_dtype).requires_grad_()
    w = w.detach().to(w_dtype).requires_grad_()
    cfg = CONFIGS[4]
    assert {where for *_, where in _dw_plan(300, cfg.block_v, 10**6, torch.float16)} == {"in_place", "separate"}
    loss = linear_cross_entropy_triton(h, w, t, ignore_index=-100, reduction="mean", z_loss=0.01, config=cfg)
    got = torch.autograd.grad(loss, (h, w))
    ref = _naive64(h, w, t, -100, "mean", 0.01)
    want = torch.autograd.grad(ref, (h, w))  # in h's / w's dtype
    assert _rel(loss, ref) <= TOL
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.isfinite(a).all()
        assert _rel(a, b) <= (4e-3 if a.dtype == torch.bfloat16 else 5e-4)  # one 16-bit rounding
    gh = got[0]
    assert gh.is_contiguous() and gh.untyped_storage().nbytes() <= gh.numel() * gh.element_size() + 2 * 40


@interp
@pytest.mark.parametrize("which", ["h", "weight"])
def test_gradient_of_one_input_only(which):
    from muse_lm.ops.tt_cross_entropy.triton_dense import linear_cross_entropy_triton

    h, w, t = _inputs(7, 37, 24, seed=8)
    h_in = h if which == "h" else h.detach()
    w_in = w if which == "weight" else w.detach()
    loss = linear_cross_entropy_triton(h_in, w_in, t, ignore_index=-100, reduction="sum", z_loss=0.0)
    ref = linear_cross_entropy_ref(h_in, w_in, t, reduction="sum")
    leaf = h_in if which == "h" else w_in
    (got,) = torch.autograd.grad(loss, leaf)
    (want,) = torch.autograd.grad(ref, leaf)
    assert _rel(got, want) <= TOL


@interp
def test_mixed_dtypes_run_in_fp32():
    from muse_lm.ops.tt_cross_entropy.triton_dense import linear_cross_entropy_triton

    h, w, t = _inputs(7, 37, 24, seed=9)
    w64 = w.detach().double().requires_grad_()
    loss = linear_cross_entropy_triton(h, w64, t, ignore_index=-100, reduction="mean", z_loss=0.0)
    gh, gw = torch.autograd.grad(loss, (h, w64))
    assert loss.dtype == torch.float32 and gh.dtype == torch.float32 and gw.dtype == torch.float64
    ref = _naive64(h, w64, t, -100, "mean", 0.0)
    assert _rel(loss, ref) <= TOL
    for a, b in zip((gh, gw), torch.autograd.grad(ref, (h, w64))):
        assert _rel(a, b) <= TOL


@pytest.mark.skipif(interpreter_enabled(), reason="checks the non-interpreter guard")
def test_cpu_tensors_need_the_interpreter():
    from muse_lm.ops.tt_cross_entropy.triton_dense import linear_cross_entropy_triton

    h, w, t = _inputs(3, 37, 24, seed=1)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        linear_cross_entropy_triton(h, w, t, ignore_index=-100, reduction="mean", z_loss=0.0)


def test_shape_errors_and_config_validation():
    from muse_lm.ops.tt_cross_entropy.triton_dense import LCEConfig, linear_cross_entropy_triton

    with pytest.raises(ValueError, match="flatten"):
        linear_cross_entropy_triton(
            torch.randn(2, 3, 8),
            torch.randn(5, 8),
            torch.zeros(2, 3, dtype=torch.long),
            ignore_index=-100,
            reduction="mean",
            z_loss=0.0,
        )
    with pytest.raises(ValueError, match="power of two"):
        LCEConfig(96, 128, 64, 8, 3)
    with pytest.raises(ValueError, match="num_warps"):
        LCEConfig(64, 128, 64, 3, 3)
    with pytest.raises(ValueError, match="num_stages"):
        LCEConfig(64, 128, 64, 4, 0)


def test_default_table_respects_a_99kb_card():
    """Consumer cards (~99 KB of shared memory per block) still get a 16-bit and an fp32 config."""
    from muse_lm.ops.tt_cross_entropy.triton_dense import CONFIGS, default_config

    for dot_f32, elem in ((False, 2), (True, 4)):
        usable = tuple(c for c in CONFIGS if c.smem_bytes(elem) <= 99 * 1024)
        for n in (1, 40, 16384):
            cfg = default_config(n, dot_f32, usable)
            assert cfg in usable and cfg.smem_bytes(elem) <= 99 * 1024
    assert len(set(CONFIGS)) == len(CONFIGS) <= 6


def test_dw_plan_chunks_fit_in_the_unwritten_rows():
    """Chunks tile [0, V) in order; an in-place chunk's fp32 buffer (2x its rows of 16-bit dW)
    ends inside dW; only a < 2 BV-row tail takes a separate buffer; fp32 is one direct launch."""
    from muse_lm.ops.tt_cross_entropy.triton_dense import _dw_plan

    for v, block_v, cap in [(50257, 256, 8192), (50257, 128, 8192), (300, 64, 64), (37, 256, 8192), (4096, 16, 10**6)]:
        plan = _dw_plan(v, block_v, cap, torch.bfloat16)
        assert [s for s, _, _ in plan] == [0] + [e for _, e, _ in plan[:-1]] and plan[-1][1] == v
        for start, stop, where in plan:
            rows = stop - start
            if where == "in_place":
                assert rows % block_v == 0 and 0 < rows <= cap and start + 2 * rows <= v
            else:
                assert where == "separate" and (stop == v or rows == cap) and v - start < 2 * block_v
    assert _dw_plan(50257, 256, 8192, torch.float32) == [(0, 50257, "direct")]
    fp64 = _dw_plan(300, 64, 64, torch.float64)
    assert {w for *_, w in fp64} == {"separate"} and max(e - s for s, e, _ in fp64) == 64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 7, 1000])
def test_narrow_in_place_equals_a_cast(monkeypatch, dtype, n):
    from muse_lm.ops.tt_cross_entropy import triton_dense

    monkeypatch.setattr(triton_dense, "_NARROW_FIRST", 3)  # many doubling blocks
    src = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 100
    want = src.to(dtype)
    dst = src.view(dtype)[:n]  # the same bytes
    triton_dense._narrow_in_place(src, dst)
    assert torch.equal(dst, want)


def test_peak_memory_model_at_the_benchmark_shape():
    """bf16 N 16384, V 50257, D 1024: the two gradients, dW (98.2 MiB) and dh (32 MiB), + < 2 MiB
    (the two-pass backward keeps each gradient's fp32 chunks inside its own unwritten rows).
    cut-cross-entropy measured 130.9 MiB there (benchmarks/results/htt_head.json; the one-pass
    backward's N x D fp32 dh accumulators made ours 164.2): the target is <= 1.2x that."""
    from muse_lm.ops.tt_cross_entropy.triton_dense import CONFIGS, peak_memory_bytes

    mib = 2**20
    n, v, d = 16384, 50257, 1024
    floor = (v + n) * d * 2
    peak = peak_memory_bytes(n, v, d, torch.bfloat16)
    assert floor < peak <= floor + 2 * mib
    assert peak / mib <= 1.2 * 130.9
    assert peak_memory_bytes(n, v, d, torch.bfloat16, CONFIGS[0]) <= floor + 2 * mib
    fp32 = peak_memory_bytes(n, v, d, torch.float32)
    assert (n + v) * d * 4 < fp32 <= (n + v) * d * 4 + mib  # fp32 grads are the accumulators
    assert peak_memory_bytes(2 * n, v, d, torch.bfloat16) > peak  # dh grows with N
    with pytest.raises(ValueError, match="float64"):
        peak_memory_bytes(n, v, d, torch.float64)
