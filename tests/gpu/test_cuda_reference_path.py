"""The reference path on a CUDA device: same numbers as on the CPU, bf16 autocast training works,
generation with the state cache equals recomputation. Skipped without CUDA."""

import pytest
import torch

from muse_lm import MuseConfig, MuseLM
from muse_lm.ops import bk_resolvent, semiseparable_scan, tt_linear_cross_entropy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CFG = dict(vocab_size=300, d_model=64, n_layers=2, n_heads=4, max_rank=8, min_rank=2, chunk_size=16, tt_rank=4)


def test_ops_on_cuda_match_cpu():
    torch.manual_seed(0)
    x, u, v = torch.randn(2, 77, 3, 8), torch.randn(2, 77, 3, 5), torch.randn(2, 77, 3, 5)
    la = -torch.rand(2, 77, 3) * 3
    y_cpu, s_cpu = semiseparable_scan(x, u, v, la, output_final_state=True)
    y_gpu, s_gpu = semiseparable_scan(x.cuda(), u.cuda(), v.cuda(), la.cuda(), output_final_state=True)
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s_gpu.cpu(), s_cpu, rtol=1e-4, atol=1e-4)
    pot = torch.randn(2, 300, 4)
    z = torch.complex(torch.linspace(0.5, 3.5, 4), torch.full((4,), 0.3))
    torch.testing.assert_close(bk_resolvent(pot.cuda(), z.cuda()).cpu(), bk_resolvent(pot, z), rtol=1e-4, atol=1e-4)
    cores = [torch.randn(18, 1, 8, 4) * 0.3, torch.randn(17, 4, 8, 1) * 0.3]
    h, tgt = torch.randn(100, 64), torch.randint(0, 300, (100,))
    ref = tt_linear_cross_entropy(h, cores, tgt, vocab_size=300)
    out = tt_linear_cross_entropy(h.cuda(), [c.cuda() for c in cores], tgt.cuda(), vocab_size=300)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)


def test_bf16_autocast_training_step_is_finite_and_matches_fp32_loosely():
    torch.manual_seed(0)
    model = MuseLM(MuseConfig(**CFG)).cuda()
    ids = torch.randint(0, 300, (4, 200), device="cuda")
    fp32 = model(ids, ids).item()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(ids, ids)
    loss.backward()
    assert abs(loss.item() - fp32) < 0.05 * fp32
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_generation_on_cuda_equals_recomputation():
    torch.manual_seed(0)
    model = MuseLM(MuseConfig(**CFG)).cuda().eval()
    prompt = torch.randint(0, 300, (2, 9), device="cuda")
    out = model.generate(prompt, 12, temperature=0)
    seq = prompt
    for _ in range(12):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
