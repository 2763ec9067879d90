"""Blocked linear + cross-entropy heads (TT and dense) and tt_logits, against materialized logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from muse_lm.ops.tt_cross_entropy import linear_cross_entropy, tt_linear_cross_entropy, tt_logits
from muse_lm.ops.tt_cross_entropy.reference import default_block_size
from muse_lm.ops.tt_embedding import tt_reconstruct

TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}
REDUCTIONS = ["mean", "sum", "none"]
IGNORE = -100


def make_cores(vs, ds, rank, dtype=torch.float64, seed=0, scale=0.7):
    gen = torch.Generator().manual_seed(seed)
    ranks = (1, *([rank] * (len(vs) - 1)), 1)
    return [
        scale * torch.randn(v, ranks[k], d, ranks[k + 1], generator=gen, dtype=dtype)
        for k, (v, d) in enumerate(zip(vs, ds))
    ]


def make_batch(shape, width, vocab, dtype=torch.float64, seed=1, n_ignored=2):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, width, generator=gen, dtype=dtype)
    targets = torch.randint(0, vocab, shape, generator=gen)
    flat = targets.view(-1)
    flat[torch.randperm(flat.numel(), generator=gen)[:n_ignored]] = IGNORE
    return h, targets


def naive_loss(h, table, targets, reduction, z_loss):
    """F.cross_entropy on materialized logits, plus z_loss * lse**2 averaged like the CE."""
    logits = h @ table.T
    ce = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=IGNORE, reduction=reduction)
    valid = targets != IGNORE
    z = z_loss * torch.logsumexp(logits, dim=-1).square() * valid
    if reduction == "none":
        return ce.view(targets.shape) + z
    if reduction == "sum":
        return ce + z.sum()
    return ce + z.sum() / valid.sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
@pytest.mark.parametrize("vs,ds", [((6, 5), (3, 4)), ((3, 4, 3), (2, 2, 3))])
def test_tt_head_matches_materialized_logits(dtype, reduction, z_loss, vs, ds):
    vocab = math.prod(vs) - 3  # the last 3 rows are factorization padding and must not count
    cores = [c.requires_grad_(True) for c in make_cores(vs, ds, 3, dtype)]
    h, targets = make_batch((3, 5), math.prod(ds), vocab, dtype)
    h.requires_grad_(True)
    loss = tt_linear_cross_entropy(
        h, cores, targets, vocab_size=vocab, reduction=reduction, z_loss=z_loss, block_size=7
    )
    ref = naive_loss(h, tt_reconstruct(cores)[:vocab], targets, reduction, z_loss)
    assert loss.shape == ref.shape and loss.dtype == dtype
    torch.testing.assert_close(loss, ref, **TOLERANCE[dtype])
    grads = torch.autograd.grad(loss.sum(), [h, *cores])
    ref_grads = torch.autograd.grad(ref.sum(), [h, *cores])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_dense_head_matches_materialized_logits(dtype, reduction):
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(29, 12, generator=gen, dtype=dtype).requires_grad_(True)
    h, targets = make_batch((2, 7), 12, 29, dtype)
    h.requires_grad_(True)
    loss = linear_cross_entropy(h, weight, targets, reduction=reduction, z_loss=1e-2, block_size=8)
    ref = naive_loss(h, weight, targets, reduction, 1e-2)
    torch.testing.assert_close(loss, ref, **TOLERANCE[dtype])
    for g, r in zip(
        torch.autograd.grad(loss.sum(), [h, weight]), torch.autograd.grad(ref.sum(), [h, weight])
    ):
        torch.testing.assert_close(g, r, **TOLERANCE[dtype])


def test_z_loss_zero_is_exactly_f_cross_entropy_with_default_block():
    cores = make_cores((6, 5), (3, 4), 3, torch.float32)
    h, targets = make_batch((4, 6), 12, 28, torch.float32)
    loss = tt_linear_cross_entropy(h, cores, targets, vocab_size=28)
    ref = F.cross_entropy(h.view(-1, 12) @ tt_reconstruct(cores)[:28].T, targets.view(-1))
    torch.testing.assert_close(loss, ref, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_tt_head(reduction):
    cores = [c.requires_grad_(True) for c in make_cores((4, 3), (2, 3), 2)]
    h, targets = make_batch((2, 3), 6, 10)  # 2 of 6 targets ignored
    h.requires_grad_(True)

    def fn(h, *cores):
        # V = 10 < 12 rows; blocks of 3 -> [0,3) [3,6) [6,9) [9,10): a ragged last block.
        return tt_linear_cross_entropy(
            h, list(cores), targets, vocab_size=10, reduction=reduction, z_loss=0.1, block_size=3
        )

    assert torch.autograd.gradcheck(fn, (h, *cores))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_dense_head(reduction):
    weight = torch.randn(10, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    weight.requires_grad_(True)
    h, targets = make_batch((2, 3), 6, 10)
    h.requires_grad_(True)

    def fn(h, weight):
        return linear_cross_entropy(h, weight, targets, reduction=reduction, z_loss=0.1, block_size=4)

    assert torch.autograd.gradcheck(fn, (h, weight))


def test_gradcheck_three_cores():
    cores = [c.requires_grad_(True) for c in make_cores((2, 3, 2), (2, 1, 2), 2)]
    h, targets = make_batch((5,), 4, 11, n_ignored=1)
    h.requires_grad_(True)

    def fn(h, *cores):
        return tt_linear_cross_entropy(h, list(cores), targets, vocab_size=11, z_loss=0.1, block_size=5)

    assert torch.autograd.gradcheck(fn, (h, *cores))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_ignored_batch(dtype):
    cores = [c.requires_grad_(True) for c in make_cores((6, 5), (3, 4), 3, dtype)]
    h = torch.randn(3, 4, 12, dtype=dtype, requires_grad=True)
    targets = torch.full((3, 4), IGNORE)
    for reduction in REDUCTIONS:
        loss = tt_linear_cross_entropy(h, cores, targets, vocab_size=28, reduction=reduction, z_loss=0.1)
        assert torch.equal(loss, torch.zeros_like(loss))  # 0, not NaN, for "mean" too
        assert loss.shape == ((3, 4) if reduction == "none" else ())
        grads = torch.autograd.grad(loss.sum(), [h, *cores])
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_no_tokens_at_all():
    cores = make_cores((6, 5), (3, 4), 3)
    h, targets = torch.randn(0, 12, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    assert tt_linear_cross_entropy(h, cores, targets, vocab_size=30).item() == 0.0
    assert tt_linear_cross_entropy(h, cores, targets, vocab_size=30, reduction="none").shape == (0,)


@pytest.mark.parametrize("wants", ["h", "cores"])
def test_gradient_only_where_asked(wants):
    cores = make_cores((6, 5), (3, 4), 3)
    h, targets = make_batch((8,), 12, 30)
    (h if wants == "h" else cores[1]).requires_grad_(True)
    loss = tt_linear_cross_entropy(h, cores, targets, vocab_size=30, z_loss=1e-2, block_size=7)
    loss.backward()
    ref_h, ref_cores = h.detach().requires_grad_(True), [c.detach().requires_grad_(True) for c in cores]
    naive_loss(ref_h, tt_reconstruct(ref_cores)[:30], targets, "mean", 1e-2).backward()
    got, ref = (h.grad, ref_h.grad) if wants == "h" else (cores[1].grad, ref_cores[1].grad)
    torch.testing.assert_close(got, ref, **TOLERANCE[torch.float64])
    assert (cores[0].grad is None) and (wants == "cores" or cores[1].grad is None)


def test_bf16_inputs_compute_in_fp32_and_return_grads_in_bf16():
    cores = [c.bfloat16().requires_grad_(True) for c in make_cores((6, 5), (3, 4), 3)]
    h, targets = make_batch((4, 5), 12, 30, torch.bfloat16)
    h.requires_grad_(True)
    loss = tt_linear_cross_entropy(h, cores, targets, vocab_size=30, z_loss=1e-3, block_size=8)
    assert loss.dtype == torch.float32
    loss.backward()
    assert h.grad.dtype == torch.bfloat16 and all(c.grad.dtype == torch.bfloat16 for c in cores)
    # Same bf16 values, upcast: the streamed fp32 math must match the materialized fp32 math.
    ref = naive_loss(h.float(), tt_reconstruct([c.float() for c in cores])[:30], targets, "mean", 1e-3)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)


class LargestTensor(TorchDispatchMode):
    """Records the largest numel of any tensor an op returns while active (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in tree_flatten(out)[0]:
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


def test_recorder_sees_backward_ops():
    # Positive control: the materialized loss's backward builds N x V tensors and the recorder sees them.
    w = torch.randn(300, 8, requires_grad=True)
    loss = F.cross_entropy(torch.randn(64, 8) @ w.T, torch.randint(0, 300, (64,)))
    with LargestTensor() as rec:
        loss.backward()
    assert rec.largest >= 64 * 300


# The dense head shares the TT head's blocked loop; a smaller case keeps the test fast.
@pytest.mark.parametrize("head,n,vocab", [("tt", 2048, 50000), ("dense", 1024, 40000)])
def test_no_n_by_v_tensor_is_ever_created(head, n, vocab):
    width = 8
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(n, width, generator=gen, requires_grad=True)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    if head == "tt":
        params = [c.float().requires_grad_(True) for c in make_cores((250, 201), (2, 4), 4)]
        run = lambda: tt_linear_cross_entropy(h, params, targets, vocab_size=vocab, z_loss=1e-4)
    else:
        params = [torch.randn(vocab, width, generator=gen, requires_grad=True)]
        run = lambda: linear_cross_entropy(h, params[0], targets, z_loss=1e-4)
    with LargestTensor() as rec:
        run().backward()
    assert all(p.grad is not None for p in [h, *params])
    # The dense head's own weight gradient is V x D (= its parameter), far below N x V / 4.
    assert rec.largest < n * vocab / 4


@pytest.mark.parametrize("n", [1, 2048, 4096, 100_000])
def test_default_block_keeps_the_logits_tile_modest(n):
    block = default_block_size(n, 50257)
    assert 256 <= block <= 8192 and (n * block <= 2**24 or block == 256)
    assert default_block_size(n, 100) == 100  # never more rows than the vocab


@pytest.mark.parametrize("vs,ds", [((6, 5), (3, 4)), ((3, 4, 3), (2, 2, 3))])
def test_tt_logits_match_materialized(vs, ds):
    vocab = math.prod(vs) - 2
    cores = [c.requires_grad_(True) for c in make_cores(vs, ds, 3)]
    h = torch.randn(2, 3, math.prod(ds), dtype=torch.float64, requires_grad=True)
    logits = tt_logits(h, cores, vocab_size=vocab, block_size=5)
    ref = h @ tt_reconstruct(cores)[:vocab].T
    assert logits.shape == (2, 3, vocab)
    torch.testing.assert_close(logits, ref, **TOLERANCE[torch.float64])
    probe = torch.randn_like(ref)
    grads = torch.autograd.grad((logits * probe).sum(), [h, *cores])
    for g, r in zip(grads, torch.autograd.grad((ref * probe).sum(), [h, *cores])):
        torch.testing.assert_close(g, r, **TOLERANCE[torch.float64])


def test_bad_inputs_raise_value_error():
    cores = make_cores((6, 5), (3, 4), 3)
    h, targets = make_batch((4,), 12, 30)
    ok = dict(vocab_size=30)
    with pytest.raises(ValueError, match="rank chain"):
        tt_linear_cross_entropy(h, [cores[0], torch.randn(5, 2, 4, 1, dtype=torch.float64)], targets, **ok)
    with pytest.raises(ValueError, match="2 or 3"):
        tt_linear_cross_entropy(h, cores * 2, targets, **ok)
    with pytest.raises(ValueError, match="last dim 11"):
        tt_linear_cross_entropy(h[:, :11], cores, targets, **ok)
    with pytest.raises(ValueError, match="reduction"):
        tt_linear_cross_entropy(h, cores, targets, reduction="avg", **ok)
    with pytest.raises(ValueError, match="exceeds the 30 rows"):
        tt_linear_cross_entropy(h, cores, targets, vocab_size=31)
    with pytest.raises(ValueError, match="targets must be h.shape"):
        tt_linear_cross_entropy(h, cores, targets[:3], **ok)
    with pytest.raises(ValueError, match="integer"):
        tt_linear_cross_entropy(h, cores, targets.double(), **ok)
    with pytest.raises(ValueError, match="z_loss"):
        tt_linear_cross_entropy(h, cores, targets, z_loss=-1.0, **ok)
    with pytest.raises(ValueError, match="target 29 is outside"):
        tt_linear_cross_entropy(h, cores, torch.tensor([0, 29, 1, 2]), vocab_size=29)
    with pytest.raises(ValueError, match="block_size"):
        tt_linear_cross_entropy(h, cores, targets, block_size=0, **ok)
    with pytest.raises(ValueError, match="last dim 12"):
        linear_cross_entropy(h, torch.randn(30, 10, dtype=torch.float64), targets)
    with pytest.raises(ValueError, match="exceeds the 30 rows"):
        tt_logits(h, cores, vocab_size=40)


def test_impl_dispatch():
    cores = make_cores((6, 5), (3, 4), 3)
    h, targets = make_batch((4,), 12, 30)
    weight = tt_reconstruct(cores)
    torch.testing.assert_close(
        tt_linear_cross_entropy(h, cores, targets, vocab_size=30, impl="torch"),
        linear_cross_entropy(h, weight, targets, impl="torch"),
        **TOLERANCE[torch.float64],
    )
    for call in (
        lambda impl: tt_linear_cross_entropy(h, cores, targets, vocab_size=30, impl=impl),
        lambda impl: linear_cross_entropy(h, weight, targets, impl=impl),
        lambda impl: tt_logits(h, cores, vocab_size=30, impl=impl),
    ):
        with pytest.raises(NotImplementedError, match="no Triton kernel"):
            call("triton")
        with pytest.raises(ValueError, match="bogus"):
            call("bogus")
