"""tt_embedding / tt_reconstruct against an independent, explicit definition of the TT table."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from muse_lm.ops._dispatch import interpreter_enabled
from muse_lm.ops.tt_embedding import tt_embedding, tt_reconstruct

# (vocab factors, width factors, ranks r_1..r_{K-1}): odd sizes on purpose.
SHAPES = {
    "K2": ((7, 5), (3, 4), (3,)),
    "K3": ((3, 4, 5), (2, 3, 2), (3, 2)),
}


def make_cores(vs, ds, ranks, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    full_ranks = (1, *ranks, 1)
    return [
        torch.randn(v, full_ranks[k], d, full_ranks[k + 1], generator=gen, dtype=dtype)
        for k, (v, d) in enumerate(zip(vs, ds))
    ]


def naive_table(cores):
    """E[t, col] = G_1[i_1][:, j_1, :] @ ... @ G_K[i_K][:, j_K, :], one scalar at a time.

    t = sum_k i_k * prod_{l>k} v_l and col = sum_k j_k * prod_{l>k} d_l (first factor most
    significant), written out with explicit loops so it shares nothing with the op.
    """
    vs = [c.shape[0] for c in cores]
    ds = [c.shape[2] for c in cores]
    table = torch.zeros(math.prod(vs), math.prod(ds), dtype=torch.float64)
    for digits in itertools.product(*[range(v) for v in vs]):
        t = 0
        for i, v in zip(digits, vs):
            t = t * v + i
        for js in itertools.product(*[range(d) for d in ds]):
            col = 0
            for j, d in zip(js, ds):
                col = col * d + j
            m = torch.ones(1, 1, dtype=torch.float64)
            for core, i, j in zip(cores, digits, js):
                m = m @ core[i, :, j, :].double()
            table[t, col] = m.item()
    return table


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("id_shape", [(), (1,), (2, 3, 4), (0, 3)])
def test_matches_naive_table(name, id_shape):
    cores = make_cores(*SHAPES[name])
    table = naive_table(cores)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, table.shape[0], id_shape, generator=gen)
    out = tt_embedding(ids, cores)
    assert out.shape == (*id_shape, table.shape[1])
    torch.testing.assert_close(out, table[ids], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(SHAPES))
def test_reconstruct_slices_match_naive(name):
    cores = make_cores(*SHAPES[name])
    table = naive_table(cores)
    rows = table.shape[0]
    torch.testing.assert_close(tt_reconstruct(cores), table, rtol=1e-12, atol=1e-12)
    # Ranges inside one prefix digit, across several, ending at the table's end, and empty.
    for start, stop in [(0, 1), (3, 4), (4, 17), (1, rows - 1), (rows - 6, rows), (9, 9)]:
        got = tt_reconstruct(cores, start, stop)
        assert got.shape == (stop - start, table.shape[1])
        torch.testing.assert_close(got, table[start:stop], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(SHAPES))
def test_gradcheck_wrt_cores(name):
    vs, ds, ranks = SHAPES[name]
    cores = [c.requires_grad_(True) for c in make_cores(vs, ds, ranks)]
    # Repeated ids: their gradients must add up in the same core slices.
    ids = torch.tensor([[0, 5, 5], [math.prod(vs) - 1, 11, 0]])
    assert torch.autograd.gradcheck(lambda *cs: tt_embedding(ids, list(cs)), tuple(cores))


def test_reconstruct_gradcheck_on_a_slice():
    cores = [c.requires_grad_(True) for c in make_cores(*SHAPES["K3"])]
    assert torch.autograd.gradcheck(lambda *cs: tt_reconstruct(list(cs), 7, 26), tuple(cores))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_output_dtype_follows_cores(dtype):
    cores = make_cores(*SHAPES["K2"], dtype=dtype)
    ids = torch.tensor([0, 34], dtype=torch.int32)
    out = tt_embedding(ids, cores)
    assert out.dtype == dtype
    expected = naive_table([c.double() for c in cores])[ids.long()]
    tol = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


class LargestTensor(TorchDispatchMode):
    """Records the largest numel of any tensor an op returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in tree_flatten(out)[0]:
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


def test_memory_is_per_token_not_per_vocab():
    vs, ds, rank = (250, 200), (2, 4), 4  # V = 50000, D = 8
    cores = [c.float().requires_grad_(True) for c in make_cores(vs, ds, (rank,))]
    ids = torch.randint(0, 50000, (64, 16), generator=torch.Generator().manual_seed(2))
    n, d = ids.numel(), math.prod(ds)
    with LargestTensor() as rec:
        tt_embedding(ids, cores).square().sum().backward()
    # Gathered slices are [N, r, d_k, r]; the cores' own gradients are the size of the cores.
    bound = max(n * d * rank, max(c.numel() for c in cores))
    assert 0 < rec.largest <= bound < 50000 * d


def test_bad_inputs_raise_value_error():
    good = make_cores(*SHAPES["K2"])
    ids = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="2 or 3"):
        tt_embedding(ids, good[:1])
    with pytest.raises(ValueError, match="4-d"):
        tt_embedding(ids, [good[0], good[1][0]])
    with pytest.raises(ValueError, match="rank chain"):
        tt_embedding(ids, [good[0], torch.randn(5, 2, 4, 1, dtype=torch.float64)])
    with pytest.raises(ValueError, match="boundary TT ranks"):
        tt_embedding(ids, [torch.randn(7, 2, 3, 3, dtype=torch.float64), good[1]])
    with pytest.raises(ValueError, match="integer"):
        tt_embedding(ids.double(), good)
    with pytest.raises(ValueError, match="share dtype"):
        tt_embedding(ids, [good[0], good[1].float()])
    with pytest.raises(ValueError, match=r"\[0, 35\)"):
        tt_embedding(torch.tensor([0, 35]), good)
    with pytest.raises(ValueError, match=r"\[0, 35\)"):
        tt_embedding(torch.tensor([-1]), good)
    with pytest.raises(ValueError, match="start <= stop"):
        tt_reconstruct(good, 5, 36)


def test_impl_dispatch():
    cores = make_cores(*SHAPES["K2"])
    ids = torch.tensor([3])
    torch.testing.assert_close(tt_embedding(ids, cores, impl="torch"), tt_embedding(ids, cores))
    # The Triton kernel runs on CUDA, or on CPU only under TRITON_INTERPRET=1.
    if not interpreter_enabled():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            tt_embedding(ids, cores, impl="triton")
    with pytest.raises(ValueError, match="bogus"):
        tt_embedding(ids, cores, impl="bogus")
