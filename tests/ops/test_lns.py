"""LNS format and `lns_matmul` torch references: to_lns / from_lns edge cases; exact and max_log
vs float64 on signed, mixed-magnitude, cancelling and out-of-float-range inputs (the
[[1e30, 1e-30]] @ [[1e-30], [1e30]] counterexample, log2 magnitudes of +-250); datapath vs the
xlns package's sequential sums bit for bit at F = 4, 8, 12, 23; the sb/db tables vs xlns's own
Gaussian-log function."""

import math

import numpy as np
import pytest
import torch

from muse_lm.errors import MuseUserError  # noqa: F401  (errors are ValueError subclasses or ValueError)
from muse_lm.ops import from_lns, lns_matmul, to_lns
from muse_lm.ops.lns.format import LOG_INF, LOG_ZERO
from muse_lm.ops.lns.reference import datapath_reference, gauss_log, gauss_table

xlns = pytest.importorskip("xlns")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _pair_values(pair):
    """float64 values of an LNS pair with float logs (only where they fit float64)."""
    s, lg = pair
    return torch.where(s != 0, s.double() * torch.exp2(lg.double()), 0.0)


def _random_pair(shape, lo, hi, seed, zero_frac=0.1):
    g = _gen(seed)
    log = (lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float64)).float()
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1, 1)
    sign = torch.where(torch.rand(shape, generator=g) < zero_frac, 0, sign).to(torch.int8)
    return sign, torch.where(sign != 0, log, float("-inf"))


def _terms(a, b):
    """float64 terms [M,K,N] (values s 2^(la+lb), exact while |la + lb| < 1000)."""
    (sa, la), (sb, lb) = a, b
    lt = la.double()[:, :, None] + lb.double()[None]
    st = (sa.long()[:, :, None] * sb.long()[None]).double()
    return torch.where(st != 0, st * torch.exp2(lt), 0.0)


# ---- to_lns / from_lns ---------------------------------------------------------------------------------


def test_to_lns_special_values_and_denormals():
    tiny = 2.0**-149  # the smallest float32 denormal
    x = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), tiny, -3 * tiny, 1.0, -0.75], dtype=torch.float32)
    s, lg = to_lns(x)
    assert s.dtype == torch.int8 and lg.dtype == torch.float32
    assert s.tolist() == [0, 0, 1, -1, 1, -1, 1, -1]
    assert lg[:4].tolist() == [float("-inf"), float("-inf"), float("inf"), float("inf")]
    assert lg[4].item() == -149.0  # exact, not flushed
    assert lg[5].item() == pytest.approx(math.log2(3) - 149, abs=1e-5)
    assert lg[6].item() == 0.0 and lg[7].item() == pytest.approx(math.log2(0.75), abs=1e-7)
    back = from_lns(s, lg)
    assert torch.equal(back[[0, 1, 2, 3, 6]], x[[0, 1, 2, 3, 6]].abs() * torch.tensor([1, 1, 1, -1, 1.0]))
    assert back[4].item() == tiny and back[5].item() == -3 * tiny

    fs, fl = to_lns(x, frac_bits=8)
    assert fl.dtype == torch.int32
    assert fl[:4].tolist() == [LOG_ZERO, LOG_ZERO, LOG_INF, LOG_INF]
    assert fl[4].item() == -149 * 256
    fb = from_lns(fs, fl, frac_bits=8)
    assert fb[0].item() == 0 and fb[2].item() == math.inf and fb[3].item() == -math.inf


def test_to_lns_nan_raises_with_its_index():
    x = torch.zeros(3, 4)
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"NaN at index \(2, 1\)"):
        to_lns(x)


def test_round_trip_and_fixed_point_rounding_matches_xlns():
    x = torch.randn(2000, generator=_gen(0), dtype=torch.float64)
    x = x * 10.0 ** torch.randint(-8, 8, (2000,), generator=_gen(1))
    s, lg = to_lns(x)
    assert ((from_lns(s, lg, dtype=torch.float64) - x).abs() / x.abs()).max() < 2e-6  # float32 logs
    for f in (4, 8, 12, 23):
        xlns.xlnssetF(f)
        _, fl = to_lns(x, frac_bits=f)
        want = torch.tensor([xlns.xlns(v).x for v in x.tolist()], dtype=torch.int32)
        if f <= 12:
            assert torch.equal(fl, want), f
        else:
            # xlns encodes in its float64 base 2.0 ** 2^-23, whose log is off by ~1e-9 relative: up
            # to a fraction of a unit at |log2| ~ 30, so a round-to-nearest may land one unit away.
            assert (fl - want).abs().max().item() <= 1
    xlns.xlnssetF(23)


def test_format_errors_say_what_to_fix():
    with pytest.raises(ValueError, match="does not fit int32"):
        to_lns(torch.tensor([1e300], dtype=torch.float64), frac_bits=23)
    with pytest.raises(ValueError, match="frac_bits"):
        to_lns(torch.ones(2), frac_bits=31)
    with pytest.raises(ValueError, match="float tensor"):
        to_lns(torch.ones(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="int8"):
        from_lns(torch.ones(2), torch.zeros(2))
    with pytest.raises(ValueError, match="int32"):
        from_lns(torch.ones(2, dtype=torch.int8), torch.zeros(2), frac_bits=4)


# ---- exact ---------------------------------------------------------------------------------------------


def test_exact_signed_normal_data_matches_float64():
    a = torch.randn(33, 700, generator=_gen(2), dtype=torch.float64)
    b = torch.randn(700, 21, generator=_gen(3), dtype=torch.float64)
    c = lns_matmul(a, b)  # float64 in: float32 logs, float64 out
    assert c.dtype == torch.float64
    ref = a @ b
    assert ((c - ref).norm() / ref.norm()).item() < 1e-6
    # On the pairs themselves (no encoding error) the float64 reference is exact to rounding.
    pa, pb = to_lns(a.float()), to_lns(b.float())
    s, lg = lns_matmul(pa, pb)
    want = _terms(pa, pb).sum(1)
    got = torch.where(s != 0, s.double() * torch.exp2(lg.double()), 0.0)
    assert ((got - want).norm() / want.norm()).item() < 1e-6


def test_exact_counterexample_and_mixed_magnitudes():
    a = torch.tensor([[1e30, 1e-30]])
    b = torch.tensor([[1e-30], [1e30]])
    want = (a.double() @ b.double()).item()
    assert lns_matmul(a, b).item() == pytest.approx(want, rel=1e-6)
    assert abs(want - 2) < 1e-6
    # Magnitudes 1e-30 .. 1e30 with signs, each output against the sum of its |terms|.
    g = _gen(4)
    a = torch.randn(17, 64, generator=g, dtype=torch.float64) * 10.0 ** (60 * torch.rand(17, 64, generator=g) - 30)
    b = torch.randn(64, 13, generator=g, dtype=torch.float64) * 10.0 ** (60 * torch.rand(64, 13, generator=g) - 30)
    a, b = a.float().double(), b.float().double()
    c = lns_matmul(a, b)
    ref = a @ b
    scale = a.abs() @ b.abs()
    # float32 logs of |log2| up to 200 hold 2^-17 absolute: ~5e-6 relative per term, as here.
    assert ((c - ref).abs() / scale).max().item() < 1.1e-5


def test_exact_cancellation_and_zeros():
    a = torch.tensor([[1.0, 1.0, 3.0], [0.0, 0.0, 0.0], [2.0**100, 1.0, -(2.0**100)]], dtype=torch.float64)
    b = torch.tensor([[1.0], [-1.0], [0.0]], dtype=torch.float64)
    s, lg = lns_matmul(to_lns(a), to_lns(b))
    assert s.tolist() == [[0], [0], [1]]
    assert lg[:2].flatten().tolist() == [float("-inf")] * 2
    assert lg[2].item() == 100.0  # 2^100 * 1 - 1 * (-1) ... = 2^100 + 1 -> log 100 at float32 precision
    # Cancelling columns: b[:, 1] = -b[:, 0], so C[:, 0] = -C[:, 1] exactly.
    x = torch.randn(9, 40, generator=_gen(5))
    y = torch.randn(40, 1, generator=_gen(6))
    c = lns_matmul(x, torch.cat([y, -y], 1))
    assert torch.equal(c[:, 0], -c[:, 1])
    assert lns_matmul(torch.ones(2, 0), torch.ones(0, 3)).eq(0).all()


def test_exact_log_magnitudes_of_250_and_results_beyond_float_range():
    a = _random_pair((12, 48), -250, 250, seed=7)
    b = _random_pair((48, 10), -250, 250, seed=8)
    terms = _terms(a, b)  # |log2| up to 500: still inside float64
    want = terms.sum(1)
    s, lg = lns_matmul(a, b)
    got = torch.where(s != 0, s.double() * torch.exp2(lg.double()), 0.0)
    largest = terms.abs().amax(1)
    # float32 logs near 500 hold 2^-16 of absolute precision: relative 2^-16 ln 2 ~ 1e-5 of a term.
    assert ((got - want).abs() / largest).max().item() < 2e-5
    assert lg.abs().max().item() > 300  # far outside float32 (and many outputs beyond float64 precision)
    # The float output overflows to inf exactly there (documented), while the pair is finite.
    big = (torch.tensor([[1]], dtype=torch.int8), torch.tensor([[200.0]]))
    s2, l2 = lns_matmul(big, big)
    assert s2.item() == 1 and l2.item() == 400.0
    assert lns_matmul(torch.tensor([[3e38]]), torch.tensor([[10.0]])).item() == math.inf


def test_scaled_gemm_fast_path_matches_the_reference_including_the_guard_and_pm250():
    """The GPU path of exact (power-of-two scaling + one fp32 GEMM), run here on the CPU."""
    from muse_lm.ops.lns.gemm import exact_scaled_gemm
    from muse_lm.ops.lns.reference import exact_finish, exact_reference

    def value(sign, log):
        return torch.where(sign != 0, sign.double() * torch.exp2(log.double()), 0.0)

    pa = to_lns(torch.randn(37, 300, generator=_gen(21)))
    pb = to_lns(torch.randn(300, 29, generator=_gen(22)))
    pa[0][5] = 0  # an all-zero row: scale -inf, outputs exactly 0
    acc, row, col = exact_scaled_gemm(pa, pb)
    assert (acc.abs() <= 300).all() and row[5].item() == float("-inf")
    got, want = value(*exact_finish(acc, row, col, pa, pb)), value(*exact_reference(pa, pb))
    assert got[5].eq(0).all() and ((got - want).norm() / want.norm()).item() < 1e-6
    ca, cb = to_lns(torch.tensor([[1e30, 1e-30]])), to_lns(torch.tensor([[1e-30], [1e30]]))
    assert value(*exact_finish(*exact_scaled_gemm(ca, cb), ca, cb)).item() == pytest.approx(2.0, rel=1e-6)
    a, b = _random_pair((12, 48), -250, 250, seed=7), _random_pair((48, 10), -250, 250, seed=8)
    terms = _terms(a, b)
    got = value(*exact_finish(*exact_scaled_gemm(a, b), a, b))
    assert ((got - terms.sum(1)).abs() / terms.abs().amax(1)).max().item() < 2e-5
    with pytest.raises(ValueError, match="K >= 1"):
        exact_scaled_gemm(to_lns(torch.ones(2, 0)), to_lns(torch.ones(0, 3)))


def test_fast_exact_path_keeps_fixed_point_precision_for_large_logs():
    """Fixed-point logs near 2e4 need more than fp32's 24 bits: the GPU path must match the reference."""
    from muse_lm.ops.lns import _exact  # the dispatch both paths share: "triton" = the scaled GEMM

    g = _gen(31)
    f = 16
    sa = torch.where(torch.rand(4, 3, generator=g) < 0.5, -1, 1).to(torch.int8)
    sb = torch.where(torch.rand(3, 5, generator=g) < 0.5, -1, 1).to(torch.int8)
    la = ((20000 + 5 * torch.rand(4, 3, generator=g, dtype=torch.float64)) * 2**f).round() * 2.0**-f
    lb = ((-30000 + 5 * torch.rand(3, 5, generator=g, dtype=torch.float64)) * 2**f).round() * 2.0**-f
    got = _exact((sa, la), (sb, lb), "triton")
    want = _exact((sa, la), (sb, lb), "torch")
    assert torch.equal(got[0], want[0])
    assert (got[1].double() - want[1]).abs().max().item() < 2.0**-f


def test_ieee_fp32_matmul_restores_the_tf32_setting():
    from muse_lm.ops.lns.gemm import ieee_fp32_matmul

    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with pytest.raises(RuntimeError, match="inside"), ieee_fp32_matmul():
            assert torch.backends.cuda.matmul.allow_tf32 is False
            raise RuntimeError("inside")
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


# ---- max_log -------------------------------------------------------------------------------------------


def test_max_log_is_the_largest_term_with_the_documented_sign_rule():
    a = torch.randn(8, 30, generator=_gen(9), dtype=torch.float64)
    b = torch.randn(30, 6, generator=_gen(10), dtype=torch.float64)
    terms = a[:, :, None] * b[None]
    idx = terms.abs().argmax(1, keepdim=True)
    want = terms.gather(1, idx)[:, 0]
    got = lns_matmul(a, b, mode="max_log")
    assert ((got - want).abs() / want.abs()).max().item() < 1e-6
    # Tie of opposite signs: + wins.
    s, lg = lns_matmul(to_lns(torch.tensor([[2.0, -2.0]])), to_lns(torch.tensor([[1.0], [1.0]])), mode="max_log")
    assert s.item() == 1 and lg.item() == 1.0


# ---- datapath vs xlns ---------------------------------------------------------------------------------


def _xlns_sums(fa, fb, frac_bits):
    """sum(a_ik * b_kj for k) with xlns objects, left to right, at xlnssetF(F): (sign, x) lists."""
    xlns.xlnssetF(frac_bits)

    def obj(s, x):
        if s == 0:
            return xlns.xlns(0.0)
        t = xlns.xlns("")
        t.x, t.s = int(x), s < 0
        return t

    (sa, la), (sb, lb) = fa, fb
    a = [[obj(s, x) for s, x in zip(r1, r2, strict=True)] for r1, r2 in zip(sa.tolist(), la.tolist(), strict=True)]
    b = [[obj(s, x) for s, x in zip(r1, r2, strict=True)] for r1, r2 in zip(sb.tolist(), lb.tolist(), strict=True)]
    out = []
    for i in range(len(a)):
        row = []
        for j in range(len(b[0])):
            total = sum(a[i][k] * b[k][j] for k in range(len(b)))
            row.append((0, LOG_ZERO) if total.x == float("-inf") else (-1 if total.s else 1, int(total.x)))
        out.append(row)
    xlns.xlnssetF(23)
    return out


def datapath_problem(seed, m=5, k=24, n=6):
    """Signed data with zeros, repeated magnitudes and exactly cancelling columns and runs."""
    g = _gen(seed)
    a = torch.randn(m, k, generator=g, dtype=torch.float64) * 4
    a[:, ::5] = 0.0
    a[:, 1] = a[:, 2]  # equal terms ...
    b = torch.randn(k, n, generator=g, dtype=torch.float64)
    b[2] = -b[1]  # ... of opposite sign: exact cancellation inside the sum (db at z = 0)
    b[:, -1] = -b[:, 0]
    return a, b


@pytest.mark.parametrize("frac_bits", [4, 8, 12, 23])
def test_datapath_equals_xlns_bit_for_bit(frac_bits):
    a, b = datapath_problem(frac_bits)
    fa, fb = to_lns(a, frac_bits), to_lns(b, frac_bits)
    s, lg = lns_matmul(fa, fb, mode="datapath", frac_bits=frac_bits)
    assert s.dtype == torch.int8 and lg.dtype == torch.int32
    got = [list(zip(r1, r2, strict=True)) for r1, r2 in zip(s.tolist(), lg.tolist(), strict=True)]
    assert got == _xlns_sums(fa, fb, frac_bits)
    # Float in, float out: the same sums decoded; close to float64 at this F.
    c = lns_matmul(a, b, mode="datapath", frac_bits=frac_bits)
    ref = a @ b
    assert ((c - ref).norm() / ref.norm()).item() < 60 * 2.0**-frac_bits


def test_datapath_int64_reference_agrees_with_cancelling_runs():
    # +x, -x, +x, -x ... : every other partial sum is exactly zero (sign 0), then restarts.
    a = torch.tensor([[1.5, 1.5, 1.5, 1.5, 1.5]])
    b = torch.tensor([[1.0], [-1.0], [1.0], [-1.0], [2.0]])
    s, lg = datapath_reference(to_lns(a, 8), to_lns(b, 8), 8)
    assert s.item() == 1 and lg.item() == round(math.log2(3.0) * 256)


@pytest.mark.parametrize("frac_bits", [4, 8, 12])
def test_gauss_tables_match_xlns_and_end_in_zero(frac_bits):
    base = 2.0 ** (2 ** (-frac_bits))
    for same in (True, False):
        table = gauss_table(same, frac_bits)
        assert table[-1] == 0 and table.dtype == np.int64
        d = np.arange(1, table.size, 1 if frac_bits < 12 else 7)
        want = [int(xlns.sbdb_ufunc_ideal(-int(v), 0 if same else 1, B=base) // 2) for v in d]
        assert table[d].tolist() == want
        # Beyond the table every entry rounds to 0.
        assert not gauss_log(np.arange(table.size, table.size + 5000), same, frac_bits).any()


# ---- API errors ----------------------------------------------------------------------------------------


def test_lns_matmul_errors():
    x = torch.ones(2, 3)
    with pytest.raises(ValueError, match="mode"):
        lns_matmul(x, x.T, mode="fast")
    with pytest.raises(ValueError, match="needs frac_bits"):
        lns_matmul(x, x.T, mode="datapath")
    with pytest.raises(ValueError, match="do not"):
        lns_matmul(x, x)
    with pytest.raises(ValueError, match="infinite"):
        lns_matmul(torch.tensor([[float("inf")]]), torch.ones(1, 1))
    with pytest.raises(ValueError, match="both"):
        lns_matmul(x, to_lns(x.T))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        lns_matmul(x, x.T, impl="triton")
    with pytest.raises(NotImplementedError, match="impl='torch'"):
        lns_matmul(x, x.T, mode="datapath", frac_bits=23, impl="triton")
    with pytest.raises(NotImplementedError, match="fixed-point"):  # fp32 log sums would round them
        lns_matmul(x, x.T, mode="max_log", frac_bits=8, impl="triton")
