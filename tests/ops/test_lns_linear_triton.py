"""The LNSLinear Triton kernel (forward and dx) vs the torch reference, through Triton's interpreter in
fp32: every declared config on one small odd shape, outputs NaN-poisoned first; the autograd path
(dx, bias and the straight-through latent gradient) through the public op.

Triton reads TRITON_INTERPRET when its kernels are defined, so the interpreter tests run in a child
pytest started with TRITON_INTERPRET=1 (`test_interpreter_suite`); here they are skipped. bf16 runs in
tests/gpu/test_lns_linear_gpu.py (Triton 3.6's interpreter does not compute bf16 dots correctly).
"""

import pytest
import torch

from muse_lm.ops._dispatch import interpreter_enabled
from muse_lm.ops.lns_linear import lns_decode, lns_encode, lns_linear

pytest.importorskip("triton")

interp = pytest.mark.skipif(not interpreter_enabled(), reason="runs in the TRITON_INTERPRET=1 child process")

M, K, N = 37, 45, 70  # odd everywhere: partial row, contraction and column tiles
TOL = 1e-5


def _problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen)
    w = torch.randn(N, K, generator=gen) * 10 ** torch.empty(N, K).uniform_(-3, 0, generator=gen)
    codes, scale = lns_encode(w)
    return x, codes, scale, torch.randn(N, generator=gen), torch.randn(M, N, generator=gen)


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.skipif(interpreter_enabled(), reason="this is the parent of the interpreter run")
def test_interpreter_suite(interpreter_run):
    interpreter_run(__file__)


@interp
def test_every_config_matches_the_reference_forward_and_dx():
    from muse_lm.ops.lns_linear.triton import CONFIGS, FP32_CONFIGS, lns_matmul_dx, lns_matmul_forward

    x, codes, scale, bias, grad = _problem()
    w = lns_decode(codes, scale).double()
    ref = x.double() @ w.t() + bias.double()
    dx_ref = grad.double() @ w
    for cfg in CONFIGS + FP32_CONFIGS:
        for b in (bias, None):
            poison = torch.full((M, N), float("nan"))
            y = lns_matmul_forward(x, codes, scale, b, cfg, out=poison)
            assert y.data_ptr() == poison.data_ptr() and torch.isfinite(y).all(), cfg
            assert _rel(y, ref if b is not None else ref - bias.double()) < TOL, cfg
        poison = torch.full((M, K), float("nan"))
        dx = lns_matmul_dx(grad, codes, scale, cfg, out=poison)
        assert dx.data_ptr() == poison.data_ptr() and torch.isfinite(dx).all(), cfg
        assert _rel(dx, dx_ref) < TOL, cfg


@interp
def test_public_op_autograd_with_latent_matches_the_reference():
    x, codes, scale, bias, grad = _problem(seed=1)
    latent = lns_decode(codes, scale) * 1.01  # any latent: only its gradient matters
    grads = []
    for impl in ("triton", "torch"):
        xi = x.reshape(1, M, K).clone().requires_grad_()
        bi, li = bias.clone().requires_grad_(), latent.clone().requires_grad_()
        y = lns_linear(xi, codes, scale, bi, latent=li, impl=impl)
        assert y.shape == (1, M, N)
        y.backward(grad.reshape(1, M, N))
        grads.append((y.detach(), xi.grad, bi.grad, li.grad))
    for got, want in zip(*grads):
        assert _rel(got, want) < TOL


@interp
def test_large_batches_decode_once_and_match_the_reference_exactly():
    """From DECODE_GEMM_MIN_ROWS rows the op decodes the weight once (one Triton pass) and runs one
    GEMM with the reference's own rounding, so forward and gradients match it to fp32 rounding."""
    from muse_lm.ops.lns_linear.triton import DECODE_GEMM_MIN_ROWS, decode_weight

    x, codes, scale, bias, _ = _problem(seed=2)
    torch.testing.assert_close(decode_weight(codes, scale, torch.float32), lns_decode(codes, scale), rtol=3e-7, atol=0)
    # (Their bf16 roundings agree bit for bit on the GPU: tests/gpu; the interpreter truncates bf16.)
    rows = DECODE_GEMM_MIN_ROWS + 3
    gen = torch.Generator().manual_seed(3)
    xb, grad = torch.randn(rows, K, generator=gen), torch.randn(rows, N, generator=gen)
    out = []
    for impl in ("triton", "torch"):
        xi = xb.clone().requires_grad_()
        y = lns_linear(xi, codes, scale, bias, impl=impl)
        y.backward(grad)
        out.append((y.detach(), xi.grad))
    for got, want in zip(*out):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@interp
def test_zero_rows_and_all_zero_codes():
    from muse_lm.ops.lns_linear.triton import lns_matmul_forward

    codes = torch.zeros(5, 3, dtype=torch.uint8)
    y = lns_matmul_forward(torch.randn(4, 3), codes, torch.ones(5), torch.arange(5.0))
    assert torch.equal(y, torch.arange(5.0).expand(4, 5))
    assert lns_matmul_forward(torch.randn(0, 3), codes, torch.ones(5)).shape == (0, 5)


def test_triton_on_cpu_without_interpreter_is_refused():
    if interpreter_enabled():
        pytest.skip("the interpreter is on in this process")
    x, codes, scale, _, _ = _problem()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        lns_linear(x, codes, scale, impl="triton")


def test_config_validation_and_shared_memory_estimates():
    from muse_lm.ops.lns_linear.triton import CONFIGS, FP32_CONFIGS, LNSLinearConfig, configs_for, usable_configs

    with pytest.raises(ValueError, match="power of two"):
        LNSLinearConfig(48, 64, 32, 4, 2)
    with pytest.raises(ValueError, match="num_warps"):
        LNSLinearConfig(64, 64, 32, 3, 2)
    assert len(set(CONFIGS)) == len(CONFIGS)
    # At least one bf16 config fits a 99 KB card, and every one fits an H100's 227 KB.
    assert any(c.smem_bytes(2) <= 99 * 1024 for c in CONFIGS)
    assert all(c.smem_bytes(2) <= 227 * 1024 for c in CONFIGS)
    assert usable_configs(torch.device("cpu")) == CONFIGS
    # fp32 inputs autotune over their own small tiles (CONFIGS' spill to a 10-22 KB stack at fp32).
    assert usable_configs(torch.device("cpu"), 4) == FP32_CONFIGS == configs_for(torch.float32)
    assert configs_for(torch.bfloat16) == configs_for(torch.float16) == CONFIGS
    assert len(set(FP32_CONFIGS)) == len(FP32_CONFIGS) and not set(FP32_CONFIGS) & set(CONFIGS)
    assert all(c.smem_bytes(4) <= 99 * 1024 for c in FP32_CONFIGS)


@pytest.mark.parametrize("dtype, tuner", [(torch.float32, "_lns_mm_tuned_fp32"), (torch.bfloat16, "_lns_mm_tuned")])
def test_autotuned_launch_takes_the_search_space_of_the_dtype(monkeypatch, dtype, tuner):
    """On CUDA (here: the interpreter switch off, the autotuners replaced by recorders) fp32 inputs go to
    the fp32 autotuner over FP32_CONFIGS, 16-bit inputs to the one over CONFIGS."""
    import muse_lm.ops.lns_linear.triton as lt

    declared = {"_lns_mm_tuned": lt.CONFIGS, "_lns_mm_tuned_fp32": lt.FP32_CONFIGS}
    for name, configs in declared.items():  # each autotuner searches its own list
        got = [(c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"], c.num_warps) for c in getattr(lt, name).configs]
        assert got == [(c.block_m, c.block_n, c.block_k, c.num_warps) for c in configs], name
    calls = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **flags: calls.append((self.name, flags["DOT_F32"]))

    monkeypatch.setattr(lt, "interpreter_enabled", lambda: False)
    for name in ("_lns_mm_tuned", "_lns_mm_tuned_fp32"):
        monkeypatch.setattr(lt, name, Recorder(name))
    x, codes, scale, _, _ = _problem()
    lt.lns_matmul_forward(x.to(dtype), codes, scale)
    lt.lns_matmul_dx(torch.ones(M, N, dtype=dtype), codes, scale)
    assert calls == [(tuner, dtype == torch.float32)] * 2
