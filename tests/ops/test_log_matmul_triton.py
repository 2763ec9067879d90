"""log_matmul's Triton kernels (forward, both gradients, both range guards) vs float64, through Triton's
interpreter in fp32: every declared config on one small odd shape with NaN-poisoned outputs, inputs
spanning +-1000 (the range guard), -inf entries, bf16 inputs and batch dims through the public op;
plus config validation and shared-memory pruning (no kernel launch).

Triton reads TRITON_INTERPRET when its kernels are defined, so the interpreter tests run in a child
pytest process started with TRITON_INTERPRET=1 (`test_interpreter_suite`); in this process they are
skipped. tests/gpu/test_log_matmul_gpu.py runs the same checks at full size on a GPU.
"""

import pytest
import torch

from muse_lm.ops import log_matmul
from muse_lm.ops._dispatch import interpreter_enabled

pytest.importorskip("triton")

interp = pytest.mark.skipif(not interpreter_enabled(), reason="runs in the TRITON_INTERPRET=1 child process")
# The interpreter evaluates both sides of tl.where in NumPy (e.g. -inf - -inf in a discarded lane).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

NEG_INF = float("-inf")
SHAPE = (2, 37, 45, 29)  # Bt, M, K, N: nothing a multiple of a tile
# max |error| / max |float64 value| over finite entries. Forward: fp32 rounding of C; gradients: the
# weights exp(A + B - C) inherit C's fp32 rounding (ulp(2000) = 1.2e-4 for +-1000 inputs).
TOL = {"fwd": 1e-6, "grad": {"n10": 1e-5, "pm1000": 1e-4}}


def inputs(kind, seed=0, shape=SHAPE):
    bt, m, k, n = shape
    gen = torch.Generator().manual_seed(seed)
    if kind == "n10":
        return 10 * torch.randn(bt, m, k, generator=gen), 10 * torch.randn(bt, k, n, generator=gen)
    return 2000 * torch.rand(bt, m, k, generator=gen) - 1000, 2000 * torch.rand(bt, k, n, generator=gen) - 1000


def reference(a, b, grad):
    """C and the closed-form gradients in float64 (weight 0 where C = -inf)."""
    a, b, grad = a.detach().double(), b.detach().double(), grad.double()
    c = torch.logsumexp(a[..., :, :, None] + b[..., None, :, :], dim=-2)
    w = torch.exp(a[..., :, :, None] + b[..., None, :, :] - c.masked_fill(c == NEG_INF, float("inf"))[..., :, None, :])
    w = w * grad[..., :, None, :]
    return c, w.sum(-1), w.sum(-3)


def rel(x, ref):
    """max |x - ref| / max |ref| over ref's finite entries; x must be non-finite exactly where ref is."""
    x, ref = x.double(), ref.double()
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(x), finite), "non-finite entries differ from the float64 reference"
    assert torch.equal(x[~finite], ref[~finite]), "the -inf entries differ"
    return ((x - ref)[finite].abs().max() / ref[finite].abs().max().clamp_min(1e-30)).item()


def poisoned(*shape):
    return torch.full(shape, float("nan"))


def run_all(a, b, grad, cfg, precision="tf32x3"):
    """Forward and both gradients with `cfg`, every output NaN-poisoned first; returns (C, flags, dA, dB)."""
    from muse_lm.ops.log_matmul.triton import log_matmul_backward, log_matmul_forward_with_flags

    out = poisoned(*grad.shape)
    c, flags = log_matmul_forward_with_flags(a, b, cfg, precision=precision, out=out)
    assert c.data_ptr() == out.data_ptr()
    da, db = log_matmul_backward(a, b, c, grad, cfg, precision=precision, out=(poisoned(*a.shape), poisoned(*b.shape)))
    return c, flags, da, db


@pytest.mark.skipif(interpreter_enabled(), reason="this is the parent of the interpreter run")
def test_interpreter_suite(interpreter_run):
    interpreter_run(__file__)


def _config_ids():
    from muse_lm.ops.log_matmul.triton import CONFIGS

    return [f"{c.block_m}x{c.block_n}x{c.block_k}-w{c.num_warps}-s{c.num_stages}" for c in CONFIGS]


@interp
@pytest.mark.parametrize("cfg_index", range(len(_config_ids())), ids=_config_ids())
def test_every_config_matches_float64_forward_and_both_gradients(cfg_index):
    from muse_lm.ops.log_matmul.triton import CONFIGS

    a, b = inputs("n10", seed=cfg_index)
    grad = torch.randn(SHAPE[0], SHAPE[1], SHAPE[3], generator=torch.Generator().manual_seed(100 + cfg_index))
    c, flags, da, db = run_all(a, b, grad, CONFIGS[cfg_index])
    c_ref, da_ref, db_ref = reference(a, b, grad)
    assert not flags.any()  # N(0, 10^2) never needs the guard: the scaled matmul did it all
    assert rel(c, c_ref) < TOL["fwd"]
    assert rel(da, da_ref) < TOL["grad"]["n10"]
    assert rel(db, db_ref) < TOL["grad"]["n10"]


@interp
def test_range_guard_recomputes_what_underflows_exactly():
    """+-1000 inputs: most scaled sums underflow (exp-matmul-log gives no finite value); the guard
    recomputes those outputs term by term, and the backward guard the tiles whose bound is loose."""
    from muse_lm.ops.log_matmul.triton import CONFIGS, log_matmul_grad

    a, b = inputs("pm1000", seed=1)
    grad = torch.randn(SHAPE[0], SHAPE[1], SHAPE[3], generator=torch.Generator().manual_seed(2))
    assert not torch.isfinite(torch.log(torch.exp(a) @ torch.exp(b))).any()
    cfg = CONFIGS[-1]
    c, flags, da, db = run_all(a, b, grad, cfg)
    assert 0.3 < flags.float().mean() < 1
    c_ref, da_ref, db_ref = reference(a, b, grad)
    assert rel(c, c_ref) < TOL["fwd"]
    assert rel(da, da_ref) < TOL["grad"]["pm1000"]
    assert rel(db, db_ref) < TOL["grad"]["pm1000"]
    assert log_matmul_grad("a", a, b, c, grad, torch.empty_like(a), cfg).any()
    assert log_matmul_grad("b", a, b, c, grad, torch.empty_like(b), cfg).any()


@interp
def test_guard_rewrites_only_the_flagged_outputs():
    """Moderate data with two rows of A spanning +-1000: only outputs of those rows are flagged, and
    the rest keep the scaled-matmul values."""
    from muse_lm.ops.log_matmul.triton import CONFIGS

    a, b = inputs("n10", seed=3)
    a[:, [4, 20]] = 2000 * torch.rand(2, 2, SHAPE[2], generator=torch.Generator().manual_seed(4)) - 1000
    b = b.clone()
    b[:, :, 3] += 900 * torch.sign(torch.randn(SHAPE[0], SHAPE[2], generator=torch.Generator().manual_seed(5)))
    grad = torch.randn(SHAPE[0], SHAPE[1], SHAPE[3], generator=torch.Generator().manual_seed(6))
    c, flags, da, db = run_all(a, b, grad, CONFIGS[4])
    assert flags.any() and not flags[:, [i for i in range(SHAPE[1]) if i not in (4, 20)]].any()
    c_ref, da_ref, db_ref = reference(a, b, grad)
    assert rel(c, c_ref) < TOL["fwd"]
    assert rel(da, da_ref) < TOL["grad"]["pm1000"] and rel(db, db_ref) < TOL["grad"]["pm1000"]


@interp
def test_neg_inf_rows_columns_and_disjoint_supports_are_exact_and_nan_free():
    from muse_lm.ops.log_matmul.triton import CONFIGS

    a, b = inputs("n10", seed=7)
    a[0, 0], b[1, :, 5] = NEG_INF, NEG_INF  # a row and a column with no finite term
    a[0, 3], b[0, :, 7] = NEG_INF, NEG_INF
    a[0, 3, 10], b[0, 11, 7] = 0.0, 0.0  # row 3 and column 7 finite at different k: C = -inf there
    a[1, :, :9] = NEG_INF  # a whole K tile of -inf
    grad = torch.randn(SHAPE[0], SHAPE[1], SHAPE[3], generator=torch.Generator().manual_seed(8))
    for cfg in (CONFIGS[0], CONFIGS[-1]):
        c, _, da, db = run_all(a, b, grad, cfg)
        c_ref, da_ref, db_ref = reference(a, b, grad)
        assert c[0, 0].eq(NEG_INF).all() and c[1, :, 5].eq(NEG_INF).all() and c[0, 3, 7] == NEG_INF
        assert rel(c, c_ref) < TOL["fwd"]
        assert torch.isfinite(da).all() and torch.isfinite(db).all()
        assert (da[a == NEG_INF] == 0).all() and (db[b == NEG_INF] == 0).all()
        assert rel(da, da_ref) < TOL["grad"]["n10"] and rel(db, db_ref) < TOL["grad"]["n10"]


@interp
def test_nan_inputs_propagate_to_the_output_and_the_gradients():
    """A NaN must stay visible: not become -inf with zero gradients (a silently finite loss)."""
    from muse_lm.ops.log_matmul.triton import CONFIGS

    a, b = inputs("n10", seed=9)
    a[0, 1, 3] = float("nan")  # poisons output row 1 of batch 0
    b[1, 4, 6] = float("nan")  # poisons output column 6 of batch 1
    grad = torch.randn(SHAPE[0], SHAPE[1], SHAPE[3], generator=torch.Generator().manual_seed(10))
    c, _, da, _ = run_all(a, b, grad, CONFIGS[0])
    assert c[0, 1].isnan().all() and c[1, :, 6].isnan().all()
    assert da[0, 1].isnan().any()
    assert torch.isfinite(c[0, 0]).all()  # the other rows are untouched


@interp
def test_public_op_impl_triton_with_batch_broadcast_bf16_and_ieee():
    from muse_lm.ops.log_matmul.triton import CONFIGS, log_matmul_forward

    gen = torch.Generator().manual_seed(9)
    a = 10 * torch.randn(2, 1, 19, 21, generator=gen)
    b = 10 * torch.randn(3, 21, 17, generator=gen)
    grad = torch.randn(2, 3, 19, 17, generator=gen)
    for dtype, tol_c, tol_g in ((torch.float32, TOL["fwd"], TOL["grad"]["n10"]), (torch.bfloat16, 2**-8, 1e-2)):
        x, y = a.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()
        c = log_matmul(x, y, impl="triton")  # config None -> default_config under the interpreter
        assert c.dtype == dtype and c.shape == (2, 3, 19, 17)
        assert "LogMatmulTriton" in type(c.grad_fn.next_functions[0][0]).__name__  # under the reshape
        da, db = torch.autograd.grad(c, (x, y), grad.to(dtype))
        assert da.dtype == db.dtype == dtype
        # The exact values for the dtype-rounded inputs, gradients summed over the broadcast dims.
        c_ref, da_ref, db_ref = reference(x.expand(2, 3, 19, 21), y.expand(2, 3, 21, 17), grad)
        assert rel(c, c_ref) < tol_c
        assert rel(da, da_ref.sum(1, keepdim=True)) < tol_g and rel(db, db_ref.sum(0)) < tol_g
    # ieee products (FMA units) give the same values as tf32x3 under the interpreter's fp32 math.
    x, y = a[:, 0], b[:2]
    c_ref = reference(x, y, torch.zeros(2, 19, 17))[0]
    assert rel(log_matmul_forward(x, y, CONFIGS[4], precision="ieee"), c_ref) < TOL["fwd"]


@interp
def test_empty_and_k_zero_and_fp64_refusal():
    from muse_lm.ops.log_matmul.triton import log_matmul_triton

    c = log_matmul(torch.zeros(3, 0), torch.zeros(0, 2), impl="triton")
    assert c.shape == (3, 2) and (c == NEG_INF).all()
    assert log_matmul(torch.zeros(0, 4), torch.zeros(4, 5), impl="triton").shape == (0, 5)
    a, b = torch.zeros(1, 0, 4, requires_grad=True), torch.randn(1, 4, 5, requires_grad=True)
    da, db = torch.autograd.grad(log_matmul_triton(a, b).sum(), (a, b), allow_unused=True)
    assert da.shape == (1, 0, 4) and (db == 0).all()
    with pytest.raises(NotImplementedError, match="fp64 runs on the torch reference"):
        log_matmul_triton(torch.zeros(1, 2, 3, dtype=torch.float64), torch.zeros(1, 3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="precision"):
        log_matmul_triton(torch.zeros(1, 2, 3), torch.zeros(1, 3, 2), precision="tf32")


@pytest.mark.skipif(interpreter_enabled(), reason="checks the non-interpreter dispatch")
def test_triton_on_cpu_without_interpreter_is_refused():
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        log_matmul(torch.zeros(2, 3), torch.zeros(3, 2), impl="triton")


def test_config_validation_and_default():
    from muse_lm.ops.log_matmul.triton import CONFIGS, LogMatmulConfig, default_config

    with pytest.raises(ValueError, match="power of two"):
        LogMatmulConfig(48, 64, 32, 4, 2)
    with pytest.raises(ValueError, match="power of two >= 16"):
        LogMatmulConfig(64, 64, 8, 4, 2)
    with pytest.raises(ValueError, match="num_warps"):
        LogMatmulConfig(64, 64, 32, 3, 2)
    with pytest.raises(ValueError, match="num_stages"):
        LogMatmulConfig(64, 64, 32, 4, 0)
    with pytest.raises(ValueError, match="'fwd' or 'bwd'"):
        CONFIGS[0].smem_bytes("guard")
    assert default_config(4096, 4096) == CONFIGS[0]
    for m, n in ((1, 1), (37, 29), (100, 3), (5000, 7)):
        cfg = default_config(m, n)
        assert cfg in CONFIGS and max(cfg.block_m, cfg.block_n) <= max(32, 2 * max(m, n))


def test_shared_memory_estimates_and_pruning():
    """The estimates cover what ptxas reported for sm_90 (fp32 inputs, tf32x3; offline compile), and
    pruning keeps what fits: everything on an H100 for a big product, the 64-wide and smaller tiles
    on a 99 KB consumer card, small tiles for a small product, and always at least one config."""
    from muse_lm.ops.log_matmul.triton import CONFIGS, _triton_configs, prune_configs_for

    measured_kb = {  # (BM, BN, BK, warps, stages): (fwd, bwd) shared memory in KB on sm_90
        (128, 128, 32, 8, 3): (96, 160), (128, 64, 32, 8, 3): (64, 128), (64, 128, 32, 8, 3): (80, 112),
        (64, 128, 32, 4, 3): (80, 112), (64, 64, 32, 4, 3): (48, 80), (32, 32, 32, 4, 2): (12, 28),
    }  # fmt: skip
    for c in CONFIGS:
        fwd_kb, bwd_kb = measured_kb[(c.block_m, c.block_n, c.block_k, c.num_warps, c.num_stages)]
        assert fwd_kb * 1024 <= c.smem_bytes("fwd") <= (fwd_kb + 24) * 1024
        assert c.smem_bytes("bwd") == bwd_kb * 1024
    configs = _triton_configs()
    assert prune_configs_for(configs, 4096, 4096, 227 * 1024, "bwd") == configs
    consumer = prune_configs_for(configs, 4096, 4096, 99 * 1024, "bwd")
    assert [(c.kwargs["BM"], c.kwargs["BN"]) for c in consumer] == [(64, 64), (32, 32)]
    assert prune_configs_for(configs, 4096, 4096, 99 * 1024, "fwd") == configs[1:]  # all but 128 x 128
    small = prune_configs_for(configs, 20, 20, 227 * 1024, "fwd")
    assert all(c.kwargs["BM"] <= 64 and c.kwargs["BN"] <= 64 for c in small) and small
    assert len(prune_configs_for(configs, 4096, 4096, 1024, "bwd")) == 1
