"""The sequential (memory-bound) BK resolvent kernels of `bk_seq_triton.py` through Triton's interpreter:
forward and backward vs the fp64 reference (autograd for the gradients) and vs `bk_triton.py`'s kernels,
T in {1, 7, CT, CT+1, 3 CT+5}, T unsplit (NSEG 1) and split (NSEG > 1), odd K, B > 1, NaN-poisoned
`out`, every declared config. In this process: the segment composition itself in torch at T = 100,000
(the interpreter is too slow there), the NSEG rule, config validation and pruning.

The interpreter tests run in a child pytest with TRITON_INTERPRET=1 (`test_interpreter_suite`), as in
tests/ops/test_bk_triton.py; tests/gpu/test_bk_seq_gpu.py runs the same checks at full size.
"""

import pytest
import torch
from test_bk_triton import naive_forward, reference_grads, rel  # fp64 definitions shared with bk_triton's tests

from muse_lm.ops._dispatch import interpreter_enabled

pytest.importorskip("triton")

interp = pytest.mark.skipif(not interpreter_enabled(), reason="runs in the TRITON_INTERPRET=1 child process")

# Im z from 0.05 (|G| up to 20) to 0.7, Re z inside and outside the band [0, 4].
Z = torch.tensor([0.3 + 0.05j, -1.2 + 0.7j, 2.0 + 0.2j], dtype=torch.complex64)
TOL_G = 1e-4
TOL_GRAD = 1e-4


def problem(b, t, k, seed, scale=1.5):
    gen = torch.Generator().manual_seed(seed)
    v = scale * torch.randn(b, t, k, generator=gen)
    grad_g = torch.randn(b, t, k, generator=gen, dtype=torch.complex64)
    return v, grad_g


def check_pair(cfg, v, z, grad_g, nseg):
    """Forward into a NaN-poisoned `out` and backward of the seq kernels vs the fp64 reference."""
    from muse_lm.ops.scan.bk_seq_triton import bk_resolvent_backward_seq, bk_resolvent_forward_seq

    poison = torch.full(v.shape, complex(float("nan"), float("nan")), dtype=torch.complex64)
    g = bk_resolvent_forward_seq(v, z, cfg, out=poison, nseg=nseg)
    assert g.data_ptr() == poison.data_ptr()
    assert torch.isfinite(torch.view_as_real(g)).all(), (cfg, nseg)
    assert (g.abs().double() <= (1 / z.imag.double()) * (1 + 1e-5)).all()
    g_ref, dv_ref, dz_ref = reference_grads(v, z, grad_g)
    assert rel(g, g_ref) < TOL_G, (cfg, nseg)
    dv, dz = bk_resolvent_backward_seq(g, grad_g, v.dtype, cfg, nseg=nseg)
    assert dv.dtype == v.dtype and dz.dtype == torch.complex64
    assert torch.isfinite(dv).all() and torch.isfinite(torch.view_as_real(dz)).all()
    assert rel(dv, dv_ref) < (TOL_GRAD if v.dtype == torch.float32 else 1e-2), (cfg, nseg)
    assert rel(dz, dz_ref) < TOL_GRAD, (cfg, nseg)
    return g, dv, dz


@pytest.mark.skipif(interpreter_enabled(), reason="this is the parent of the interpreter run")
def test_interpreter_suite(interpreter_run):
    interpreter_run(__file__)


def _config_ids():
    from muse_lm.ops.scan.bk_seq_triton import CONFIGS

    return range(len(CONFIGS))


@interp
@pytest.mark.parametrize("index", _config_ids())
def test_every_declared_config_matches_reference_unsplit_and_split(index):
    from muse_lm.ops.scan.bk_seq_triton import CONFIGS

    cfg = CONFIGS[index]
    ct = cfg.chunk
    # T = 1, inside one tile, one tile exactly, one step past it, three tiles and a bit. nseg 3 splits
    # every T > CT (into 2 segments: SEG is a multiple of CT); T <= CT cannot be split.
    for t, nseg in ((1, 1), (7, 3), (ct, 1), (ct + 1, 3), (3 * ct + 5, 1), (3 * ct + 5, 3)):
        v, grad_g = problem(2, t, 3, seed=t + index)
        check_pair(cfg, v, Z, grad_g, nseg)


@interp
def test_small_tiles_many_segments_and_bk_triton_agree():
    """Tiles of 4 steps: up to 5 segments, a partial channel block (K 3 over blocks of 2), and the
    result equals bk_triton.py's kernels (the default config there) within the tolerances."""
    from muse_lm.ops.scan.bk_seq_triton import BKSeqConfig, _segments
    from muse_lm.ops.scan.bk_triton import bk_resolvent_backward, bk_resolvent_forward

    chunk = 4
    cfg = BKSeqConfig(chunk, 2, 1)
    for t in (1, 7, chunk, chunk + 1, 3 * chunk + 5):
        v, grad_g = problem(3, t, 3, seed=40 + t)
        for nseg in (1, 5):
            g, dv, dz = check_pair(cfg, v, Z, grad_g, nseg)
        assert t <= chunk or _segments(t, 5, chunk)[0] >= 2
    # The last T (4 or 5 segments) against the other kernel pair.
    g_other = bk_resolvent_forward(v, Z)
    dv_other, dz_other = bk_resolvent_backward(g_other, grad_g, v.dtype)
    assert rel(g, g_other) < TOL_G
    assert rel(dv, dv_other) < TOL_GRAD
    assert rel(dz, dz_other) < TOL_GRAD


@interp
def test_long_walk_over_many_segments_stays_on_the_fp64_recurrence():
    """400 steps in 13 segments of 32: strong and near-free potentials, Im z 0.05 (|G| up to 20)."""
    from muse_lm.ops.scan.bk_seq_triton import BKSeqConfig, bk_resolvent_backward_seq, bk_resolvent_forward_seq

    z = torch.tensor([0.5 + 0.05j, 3.0 + 0.3j], dtype=torch.complex64)
    v, grad_g = problem(1, 400, 2, seed=9, scale=3.0)
    v[:, 130:270] *= 0.01
    cfg = BKSeqConfig(8, 2, 1)
    g = bk_resolvent_forward_seq(v, z, cfg, nseg=13)
    assert torch.isfinite(torch.view_as_real(g)).all()
    assert rel(g, naive_forward(v, z)) < TOL_G
    assert (g.abs().double() <= (1 / z.imag.double()) * (1 + 1e-5)).all()
    _, dv_ref, dz_ref = reference_grads(v, z, grad_g)
    dv, dz = bk_resolvent_backward_seq(g, grad_g, torch.float32, cfg, nseg=13)
    assert rel(dv, dv_ref) < TOL_GRAD and rel(dz, dz_ref) < TOL_GRAD


@interp
def test_bf16_potentials_default_config_and_planned_segments():
    """config None (the default config under the interpreter) with the planned NSEG (sm_count 1: T // 64
    segments here), bf16 v: grad v comes back in bf16."""
    from muse_lm.ops.scan.bk_seq_triton import default_config, plan_segments

    v, grad_g = problem(2, 130, 5, seed=3)
    assert plan_segments(2, 5, 130, 1, default_config(5).chunk)[0] == 2
    check_pair(None, v.to(torch.bfloat16), Z.repeat(2)[:5], grad_g, None)


@interp
def test_empty_batch_and_bad_nseg():
    from muse_lm.ops.scan.bk_seq_triton import bk_resolvent_backward_seq, bk_resolvent_forward_seq

    g = bk_resolvent_forward_seq(torch.zeros(0, 5, 3), Z)
    assert g.shape == (0, 5, 3)
    dv, dz = bk_resolvent_backward_seq(g, torch.zeros_like(g), torch.float32)
    assert dv.shape == (0, 5, 3) and torch.equal(dz, torch.zeros(3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="nseg=0"):
        bk_resolvent_forward_seq(torch.zeros(1, 5, 3), Z, nseg=0)


def _segment_maps_fwd(c, seg):
    """Torch mirror of forward pass 1 + carry: entering G [NSEG, K] of each segment from the Moebius
    maps [[0, 1], [-1, c_t]] composed per segment in c's precision, normalized every 4 steps."""
    nseg = c.shape[0] // seg
    cs = c.view(nseg, seg, -1)
    one, zero = torch.ones_like(cs[:, 0]), torch.zeros_like(cs[:, 0])
    a0, a1, b0, b1 = one, zero, zero, one
    for t in range(seg):
        a0, a1, b0, b1 = b0, b1, cs[:, t] * b0 - a0, cs[:, t] * b1 - a1
        if t % 4 == 3:
            s = torch.stack([x.abs() for x in (a0, a1, b0, b1)]).amax(0)
            a0, a1, b0, b1 = (x / s for x in (a0, a1, b0, b1))
    g, enter = torch.zeros_like(c[0]), []
    for j in range(nseg):
        enter.append(g)
        g = (a0[j] * g + a1[j]) / (b0[j] * g + b1[j])
    return torch.stack(enter)


def _segment_maps_bwd(g, grad_g, seg):
    """Torch mirror of backward pass 1 + carry: lam entering each segment from its end, [NSEG, K]."""
    nseg = g.shape[0] // seg
    gs, ds = g.view(nseg, seg, -1), grad_g.view(nseg, seg, -1)
    s_end = torch.cat([(gs[1:, 0] ** 2).conj(), torch.zeros_like(gs[:1, 0])])
    a, b, s = torch.ones_like(s_end), torch.zeros_like(s_end), s_end
    for t in reversed(range(seg)):
        a, b, s = s * a, s * b + ds[:, t], (gs[:, t] ** 2).conj()
    lam, enter = torch.zeros_like(g[0]), [None] * nseg
    for j in reversed(range(nseg)):
        enter[j] = lam
        lam = a[j] * lam + b[j]
    return torch.stack(enter)


def test_segment_composition_in_fp32_at_t_100000():
    """The passes' math at T = 100,000 in 100 segments of 1000, in fp32 torch: the composed Moebius
    maps give every segment's entering G, and the composed affine maps every segment's entering lam,
    within 1e-4 of the fp64 sequential recurrences, with a long stretch of near-free motion."""
    t, seg = 100_000, 1000
    z = torch.tensor([0.5 + 0.02j, -1.0 + 0.3j, 2.0 + 0.1j, 3.5 + 1.0j], dtype=torch.complex128)
    gen = torch.Generator().manual_seed(7)
    v = 3.0 * torch.randn(t, 4, generator=gen, dtype=torch.float64)
    v[t // 3 : t // 2] *= 0.01
    grad_g = torch.randn(t, 4, generator=gen, dtype=torch.complex128)
    c = (2 + v).to(torch.complex128) - z
    g = torch.empty_like(c)
    prev = torch.zeros_like(c[0])
    for i in range(t):  # fp64 sequential forward, every step
        prev = 1 / (c[i] - prev)
        g[i] = prev
    g_enter = torch.cat([torch.zeros_like(g[:1]), g[seg - 1 : -1 : seg]])
    got = _segment_maps_fwd(c.to(torch.complex64), seg)
    assert torch.isfinite(torch.view_as_real(got)).all()
    assert rel(got, g_enter) < 1e-4
    lam = torch.empty_like(c)
    nxt = torch.zeros_like(c[0])
    for i in reversed(range(t)):  # fp64 sequential lam_t = gG_t + conj(G_{t+1}^2) lam_{t+1}
        nxt = grad_g[i] + ((g[i + 1] ** 2).conj() * nxt if i + 1 < t else 0)
        lam[i] = nxt
    lam_enter = torch.cat([lam[seg::seg], torch.zeros_like(lam[:1])])
    got = _segment_maps_bwd(g.to(torch.complex64), grad_g.to(torch.complex64), seg)
    assert torch.isfinite(torch.view_as_real(got)).all()
    assert rel(got, lam_enter) < 1e-4


def test_segment_plan_rule():
    from muse_lm.ops.scan.bk_seq_triton import CT_ALIGN, MAX_NSEG, MIN_SEG, plan_segments

    # The brief's shapes on an H100 (132 SMs).
    assert plan_segments(16, 512, 8192, 132) == (16, 512)
    assert plan_segments(16, 4, 1024, 132) == (16, 64)
    for b, k, t in [(1, 1, 1), (16, 4, 1000), (1, 4, 1_000_000), (64, 4096, 8192), (3, 5, 97)]:
        nseg, seg = plan_segments(b, k, t, 132)
        assert 1 <= nseg <= MAX_NSEG and seg % CT_ALIGN == 0
        assert (nseg - 1) * seg < t <= nseg * seg  # every segment holds at least one step
        assert nseg == 1 or seg >= MIN_SEG
    # More SMs never mean fewer segments; enough channels need none.
    assert plan_segments(16, 4, 8192, 16)[0] <= plan_segments(16, 4, 8192, 132)[0]
    assert plan_segments(64, 4096, 8192, 132)[0] == 1


def test_config_validation_default_and_pruning():
    from muse_lm.ops.scan import bk_seq_triton as seq

    with pytest.raises(ValueError, match="power of two"):
        seq.BKSeqConfig(24, 4, 4)
    with pytest.raises(ValueError, match="at least 4"):
        seq.BKSeqConfig(2, 4, 4)
    with pytest.raises(ValueError, match="num_warps"):
        seq.BKSeqConfig(16, 4, 3)
    for k in (1, 3, 4, 5, 9, 200, 512):
        cfg = seq.default_config(k)
        assert cfg in seq.CONFIGS and cfg.block_k <= max(4, 1 << (k - 1).bit_length())
    assert all(seq.CT_ALIGN % c.chunk == 0 for c in seq.CONFIGS)

    configs = seq._triton_configs()
    assert len(seq.prune_configs_for(configs, 512, 232448)) == len(configs)
    kept = seq.prune_configs_for(configs, 4, 232448)
    assert kept and all(c.kwargs["BK"] <= 8 for c in kept)
    # A card with little shared memory keeps only the tiles that fit, and never none.
    small = seq.prune_configs_for(configs, 512, 16 * 1024)
    assert small and all(seq.smem_estimate(c.kwargs["CT"], c.kwargs["BK"]) <= 16 * 1024 for c in small)
    assert seq.prune_configs_for(configs, 512, 0)
