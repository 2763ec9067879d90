"""The lns_matmul Triton kernels (exact, max_log, datapath) vs the torch references, through
Triton's interpreter, in fp32: every declared config on one small odd shape with NaN-poisoned
outputs; the exact kernel also on mixed magnitudes, log2 magnitudes of +-250 and the
[[1e30, 1e-30]] @ [[1e-30], [1e30]] counterexample (through the range guard); datapath at F = 4,
8, 12 bit for bit against the reference (itself checked against xlns in test_lns.py) and xlns.

Triton reads TRITON_INTERPRET when its kernels are defined, so these tests run in a child pytest
with TRITON_INTERPRET=1 (`test_interpreter_suite`) and are skipped in this process."""

import pytest
import torch

from muse_lm.ops import lns_matmul, to_lns
from muse_lm.ops._dispatch import interpreter_enabled
from muse_lm.ops.lns.reference import datapath_reference, max_log_reference

pytest.importorskip("triton")

interp = pytest.mark.skipif(not interpreter_enabled(), reason="runs in the TRITON_INTERPRET=1 child process")
M, K, N = 37, 45, 29  # odd, not multiples of any block, K spans several BK tiles


@pytest.mark.skipif(interpreter_enabled(), reason="this is the parent of the interpreter run")
def test_interpreter_suite(interpreter_run):
    interpreter_run(__file__)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _normal_pairs(seed):
    a = torch.randn(M, K, generator=_gen(seed))
    b = torch.randn(K, N, generator=_gen(seed + 1))
    a[3] = 0.0  # an all-zero row: bound -inf, output exactly 0
    return to_lns(a), to_lns(b)


def _value(sign, log):
    return torch.where(sign != 0, sign.double() * torch.exp2(log.double()), 0.0)


def _poison(shape, dtype):
    return torch.full(shape, -7 if not dtype.is_floating_point else float("nan"), dtype=dtype)


@interp
@pytest.mark.parametrize("cfg_index", range(3))
def test_max_log_every_config_matches_reference(cfg_index):
    from muse_lm.ops.lns.triton import MAX_LOG_CONFIGS, max_log_triton

    a, b = _normal_pairs(10 + cfg_index)
    out = (_poison((M, N), torch.int8), _poison((M, N), torch.float32))
    s, lg = max_log_triton(a, b, MAX_LOG_CONFIGS[cfg_index], out=out)
    rs, rl = max_log_reference(a, b)
    assert torch.equal(s, rs)
    assert torch.equal(torch.isinf(lg), torch.isinf(rl))
    fin = torch.isfinite(rl)
    assert (lg.double()[fin] - rl[fin]).abs().max().item() < 1e-5


@interp
@pytest.mark.parametrize("frac_bits", [4, 8, 12])
def test_datapath_every_config_is_bit_exact(frac_bits):
    from muse_lm.ops.lns.triton import DATAPATH_CONFIGS, datapath_triton

    a = torch.randn(M, K, generator=_gen(frac_bits), dtype=torch.float64) * 3
    b = torch.randn(K, N, generator=_gen(frac_bits + 1), dtype=torch.float64)
    a[:, ::7] = 0.0
    b[5] = -b[4]
    a[:, 5] = a[:, 4]  # terms 4 and 5 cancel exactly
    fa, fb = to_lns(a, frac_bits), to_lns(b, frac_bits)
    rs, rl = datapath_reference(fa, fb, frac_bits)
    for cfg in DATAPATH_CONFIGS:
        out = (_poison((M, N), torch.int8), _poison((M, N), torch.int32))
        s, lg = datapath_triton(fa, fb, frac_bits, cfg, out=out)
        assert torch.equal(s, rs), cfg
        assert torch.equal(lg.long(), rl), cfg


@interp
def test_dispatch_runs_the_kernels_through_lns_matmul():
    a = torch.randn(9, 20, generator=_gen(30))
    b = torch.randn(20, 7, generator=_gen(31))
    ref = a.double() @ b.double()
    c = lns_matmul(a, b, impl="triton")
    assert ((c.double() - ref).norm() / ref.norm()).item() < 1e-6
    m_t = lns_matmul(a, b, mode="max_log", impl="triton")
    assert torch.allclose(m_t, lns_matmul(a, b, mode="max_log", impl="torch"), rtol=1e-6)
    d_t = lns_matmul(to_lns(a, 8), to_lns(b, 8), mode="datapath", frac_bits=8, impl="triton")
    d_r = lns_matmul(to_lns(a, 8), to_lns(b, 8), mode="datapath", frac_bits=8, impl="torch")
    assert torch.equal(d_t[0], d_r[0]) and torch.equal(d_t[1], d_r[1])


@pytest.mark.skipif(interpreter_enabled(), reason="compiles for real GPU targets (no GPU needed)")
@pytest.mark.parametrize("capability", [86, 90], ids=["sm86", "sm90"])
def test_every_declared_config_compiles_and_its_shared_memory_estimate_holds(capability):
    """Compiled offline for an RTX 3090 / 4090-class card (sm_86, 99 KB of shared memory) and an H100:
    the estimate the autotuner prunes with is what Triton allocates, and every config fits 99 KB."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from muse_lm.ops.lns.triton import DATAPATH_CONFIGS, MAX_LOG_CONFIGS, _datapath_kernel, _max_log_kernel

    ptrs = {"sa_ptr": "*i8", "sb_ptr": "*i8", "s_ptr": "*i8"}
    max_log = {**ptrs, "la_ptr": "*fp32", "lb_ptr": "*fp32", "l_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32"}
    datapath = {**ptrs, "la_ptr": "*i32", "lb_ptr": "*i32", "tsb_ptr": "*i32", "tdb_ptr": "*i32", "l_ptr": "*i32",
                "M": "i32", "N": "i32", "K": "i32", "SB_LEN": "i32", "DB_LEN": "i32"}
    target = GPUTarget("cuda", capability, 32)
    for kernel, signature, configs in ((_max_log_kernel, max_log, MAX_LOG_CONFIGS),
                                       (_datapath_kernel, datapath, DATAPATH_CONFIGS)):
        names = list(kernel.arg_names)
        sig = {name: signature.get(name, "constexpr") for name in names}
        for cfg in configs:
            consts = {"BM": cfg.block_m, "BN": cfg.block_n, "BK": cfg.block_k, "INTERPRET": False}
            compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts), target=target,
                                      options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
            assert compiled.metadata.shared <= cfg.smem_bytes() <= 99 * 1024, (kernel.__name__, cfg)
