"""The fused TT lookup kernel (forward and atomic backward) vs the torch reference, through
Triton's interpreter, in fp32, for every declared config.

Triton reads TRITON_INTERPRET when its kernels are defined, so the interpreter tests run in a
child pytest process started with TRITON_INTERPRET=1 (`test_interpreter_suite`); in this process
they are skipped.
"""


import pytest
import torch

from muse_lm.ops import tt_embedding
from muse_lm.ops._dispatch import interpreter_enabled

pytest.importorskip("triton")

interp = pytest.mark.skipif(not interpreter_enabled(), reason="runs in the TRITON_INTERPRET=1 child process")

# (vocab factors, dim factors, inner ranks): odd sizes, size-1 factors, rank 1, K = 2 and 3.
SHAPES = [
    ((7, 5), (3, 5), (4,)),
    ((5, 3), (1, 1), (1,)),
    ((3, 4, 5), (3, 2, 5), (3, 4)),
    ((2, 3, 2), (1, 3, 1), (1, 2)),
]


def _cores(v, d, r, seed):
    gen = torch.Generator().manual_seed(seed)
    ranks = (1, *r, 1)
    return [torch.randn(v[k], ranks[k], d[k], ranks[k + 1], generator=gen).requires_grad_() for k in range(len(v))]


@pytest.mark.skipif(interpreter_enabled(), reason="this is the parent of the interpreter run")
def test_interpreter_suite(interpreter_run):
    interpreter_run(__file__)


@interp
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"v{s[0]}d{s[1]}r{s[2]}")
def test_every_config_matches_reference_forward_and_backward(shape):
    from muse_lm.ops.tt_embedding.triton import CONFIGS, SEGMENT_CONFIGS, tt_lookup_backward, tt_lookup_forward

    v, d, r = shape
    cores = _cores(v, d, r, seed=len(SHAPES) + sum(v))
    rows = torch.tensor(v).prod().item()
    for n in (1, 13):
        ids = torch.randint(0, rows, (n,), generator=torch.Generator().manual_seed(n))
        ref = tt_embedding(ids, cores, impl="torch")
        grad = torch.randn_like(ref)
        ref_grads = torch.autograd.grad(ref, cores, grad)
        plain = [c.detach() for c in cores]
        methods = ("sorted", "atomic") if len(v) == 2 else ("atomic",)
        for cfg in CONFIGS:
            out = tt_lookup_forward(ids, plain, cfg)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=f"{cfg} N={n}")
            got = tt_lookup_backward(ids, plain, grad, cfg, method="atomic")
            for g, want in zip(got, ref_grads):
                torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-5, msg=f"{cfg} atomic N={n}")
        if "sorted" not in methods:
            continue
        for seg_cfg in SEGMENT_CONFIGS:
            got = tt_lookup_backward(ids, plain, grad, method="sorted", segment_config=seg_cfg)
            for g, want in zip(got, ref_grads):
                torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-5, msg=f"{seg_cfg} sorted N={n}")


@interp
@pytest.mark.parametrize("K", [2, 3])
def test_public_op_with_impl_triton_matches_reference_including_repeated_ids(K):
    v, d, r = SHAPES[0] if K == 2 else SHAPES[2]
    cores = _cores(v, d, r, seed=7)
    rows = torch.tensor(v).prod().item()
    # Repeated ids make many atomics land on the same core entries.
    ids = torch.tensor([[0, rows - 1, 3, 3, 3], [rows - 1, 1, 0, 2, 3]])
    out = tt_embedding(ids, cores, impl="triton")
    ref = tt_embedding(ids, cores, impl="torch")
    assert out.shape == ref.shape == (2, 5, torch.tensor(d).prod().item())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(out, cores, grad), torch.autograd.grad(ref, cores, grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # A column slice (what decoding passes: seq[:, t][:, None]) is a strided view after reshape.
    column = ids[:, 1:2]
    torch.testing.assert_close(tt_embedding(column, cores, impl="triton"), tt_embedding(column, cores, impl="torch"))


@interp
def test_empty_ids_give_empty_rows_and_zero_gradients():
    cores = _cores(*SHAPES[0], seed=3)
    out = tt_embedding(torch.zeros(0, 4, dtype=torch.long), cores, impl="triton")
    assert out.shape == (0, 4, 15)
    grads = torch.autograd.grad(out.sum(), cores)
    assert all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.skipif(interpreter_enabled(), reason="checks the non-interpreter dispatch")
def test_cpu_dispatch_uses_reference_and_refuses_triton_without_interpreter():
    cores = _cores(*SHAPES[0], seed=1)
    ids = torch.tensor([0, 5, 34])
    torch.testing.assert_close(tt_embedding(ids, cores), tt_embedding(ids, cores, impl="torch"))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        tt_embedding(ids, cores, impl="triton")


@interp
def test_sorted_backward_is_refused_for_three_cores():
    from muse_lm.ops.tt_embedding.triton import tt_lookup_backward

    cores = [c.detach() for c in _cores(*SHAPES[2], seed=2)]
    ids = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="K = 2 only"):
        tt_lookup_backward(ids, cores, torch.zeros(2, 30), method="sorted")


def test_config_validation():
    from muse_lm.ops.tt_embedding.triton import TTLookupConfig

    with pytest.raises(ValueError, match="power of two"):
        TTLookupConfig(3, 4)
    with pytest.raises(ValueError, match="num_warps"):
        TTLookupConfig(4, 3)


@interp
def test_sorted_backward_splits_a_frequent_digit_over_programs():
    from muse_lm.ops.tt_embedding.triton import SEGMENT_CONFIGS, tt_lookup_backward

    cores = _cores(*SHAPES[0], seed=5)
    gen = torch.Generator().manual_seed(5)
    # 150 tokens share the first digit 0 (several chunks, several token blocks each, a ragged last
    # block), the rest are spread out.
    ids = torch.cat([torch.randint(0, 5, (150,), generator=gen), torch.randint(0, 35, (40,), generator=gen)])
    ref = tt_embedding(ids, cores, impl="torch")
    grad = torch.randn_like(ref)
    want = torch.autograd.grad(ref, cores, grad)
    for seg_cfg in SEGMENT_CONFIGS:
        got = tt_lookup_backward(ids, [c.detach() for c in cores], grad, method="sorted", segment_config=seg_cfg)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=str(seg_cfg))


@interp
@pytest.mark.parametrize("case", ["wide_and_empty_digits", "one_digit_few_tokens"])
def test_sorted_backward_wide_digits_empty_digits_and_unwritten_slots(case, monkeypatch):
    """wide_and_empty_digits: a first digit of 300 values (512 histogram bins; the second has 3
    values) and ids that leave most digit values without a token (their gradient rows must be
    exactly zero). one_digit_few_tokens: a first core of one digit value and fewer tokens than a
    piece's minimum. Every float buffer the backward allocates (torch.empty, torch.empty_like) starts as
    NaN, so a slot the reduce reads without the segment kernel having written it, or a gradient row
    it never writes, shows up."""
    from muse_lm.ops.tt_embedding.triton import SEGMENT_CONFIGS, tt_lookup_backward

    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(make):
        def alloc(*args, **kwargs):
            out = make(*args, **kwargs)
            return out.fill_(float("nan")) if out.is_floating_point() else out

        return alloc

    gen = torch.Generator().manual_seed(11)
    if case == "wide_and_empty_digits":
        cores = _cores((300, 3), (2, 3), (4,), seed=11)
        # 70 tokens on digit 7 (several pieces), a few on 3 more first digits; 296 digits get none.
        ids = torch.cat([torch.full((70,), 7 * 3 + 1), torch.tensor([0, 2, 150 * 3, 299 * 3 + 2])])
        ids = ids[torch.randperm(ids.numel(), generator=gen)]
        touched = [0, 7, 150, 299]
    else:
        cores = _cores((1, 5), (3, 2), (2,), seed=12)
        ids = torch.tensor([4, 0, 4])
        touched = [0]
    ref = tt_embedding(ids, cores, impl="torch")
    grad = torch.randn(ref.shape, generator=gen)
    want = torch.autograd.grad(ref, cores, grad)
    plain = [c.detach() for c in cores]
    monkeypatch.setattr(torch, "empty", poisoned(real_empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(real_empty_like))
    for seg_cfg in SEGMENT_CONFIGS:
        got = tt_lookup_backward(ids, plain, grad, method="sorted", segment_config=seg_cfg)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=str(seg_cfg))
        untouched = torch.ones(cores[0].shape[0], dtype=torch.bool)
        untouched[touched] = False
        assert torch.count_nonzero(got[0][untouched]) == 0


@interp
@pytest.mark.parametrize("v1, v2, n", [(225, 224, 2503), (31, 17, 4133), (5, 3, 1), (600, 7, 999), (1, 9, 40)])
def test_digit_sort_is_a_stable_sort_by_each_digit(v1, v2, n, monkeypatch):
    """The counting sort against torch's stable sort. Blocks from 64 ids (the GPU's 1024 would make
    the interpreter sort for minutes): 2503 ids span 40 blocks of 64 with a ragged last one, 4133
    ids 33 of 128 (64 blocks at most); 600 values take 1024 histogram bins; a one-value digit puts
    every id in one group."""
    from muse_lm.ops.tt_embedding import digit_sort

    monkeypatch.setattr(digit_sort, "_MIN_BLOCK", 64)

    ids = torch.randint(0, v1 * v2, (n,), generator=torch.Generator().manual_seed(n))
    order, starts = digit_sort.sort_by_digits(ids, v1, v2)
    assert order.shape == (2, n) and starts.shape == (2, max(v1, v2) + 1)
    for core, (digit, v) in enumerate(((ids // v2, v1), (ids % v2, v2))):
        ranked = torch.sort(digit, stable=True)
        assert torch.equal(order[core].long(), ranked.indices), f"core {core}"
        assert torch.equal(starts[core, : v + 1].long(), torch.searchsorted(ranked.values, torch.arange(v + 1)))


@interp
def test_digit_sort_of_no_ids_and_of_a_strided_view():
    from muse_lm.ops.tt_embedding.digit_sort import sort_by_digits

    order, starts = sort_by_digits(torch.zeros(0, dtype=torch.long), 5, 3)
    assert order.shape == (2, 0) and torch.count_nonzero(starts) == 0
    ids = torch.randint(0, 15, (40, 2), generator=torch.Generator().manual_seed(2))[:, 1]  # stride 2
    order, _ = sort_by_digits(ids, 5, 3)
    assert torch.equal(order[0].long(), torch.sort(ids // 3, stable=True).indices)
    assert torch.equal(order[1].long(), torch.sort(ids % 3, stable=True).indices)


@interp
def test_wide_digits_take_the_atomic_backward_and_sorted_is_refused():
    from muse_lm.ops.tt_embedding.digit_sort import MAX_DIGITS
    from muse_lm.ops.tt_embedding.triton import tt_lookup_backward

    cores = _cores((MAX_DIGITS + 1, 2), (1, 2), (2,), seed=4)
    ids = torch.tensor([0, 2 * MAX_DIGITS + 1, 5, 5])
    ref = tt_embedding(ids, cores, impl="torch")
    grad = torch.randn_like(ref)
    want = torch.autograd.grad(ref, cores, grad)
    plain = [c.detach() for c in cores]
    for g, w in zip(tt_lookup_backward(ids, plain, grad), want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="method='atomic'"):
        tt_lookup_backward(ids, plain, grad, method="sorted")


def test_sorted_backward_slots_stay_within_int32_offsets():
    """The sorted backward addresses its slot buffer with int32 products: past ~2**31 / (d1 r + r d2) * 16 ids
    the default becomes the atomic backward and asking for "sorted" is an error (checked on shapes only)."""
    from muse_lm.ops.tt_embedding.triton import _slots_fit, tt_lookup_backward

    cores = [torch.empty(225, 1, 32, 16, device="meta"), torch.empty(224, 16, 32, 1, device="meta")]
    assert _slots_fit(1 << 24, cores) and not _slots_fit(1 << 26, cores)
    ids = torch.empty(1 << 26, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="int32 slot offsets"):
        tt_lookup_backward(ids, cores, torch.empty(1 << 26, 1024, device="meta"), method="sorted")
