"""On CUDA with Inductor: a compiled MuseLM block (the kernels' custom ops, bf16 autocast) trains like
the eager block, and keeps for its backward no more than the CPU model of the same block says
(`benchmarks/saved_activations.py --compiled`, which stands in Inductor's partitioner by
aot_eager_decomp_partition): the norms' outputs, the conv's, the gated u and v and out_proj's input
are rebuilt in the backward (layers/recompute.py)."""

import pytest
import torch

from muse_lm.models import MuseConfig, MuseLM

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
DEV = torch.device("cuda")
# The tiny preset's block (d_model 128, 4 heads of 64 values, rank 16, SwiGLU 384, 4 BK heads).
CFG = MuseConfig(vocab_size=4096, d_model=128, n_layers=1, n_heads=4, ssm_expand=2, max_rank=16, min_rank=4,
                 bk_heads=4, tt_rank=16)
# saved_activations.py --compiled --preset tiny --seq-len 256, counting each storage once (CPU model of
# commit e997371): w13's output 1536, the residual 512, the mixer's output 256, the scan's values and
# output 1024, z 512, u and v 256, chunk states 128, gate logits, dt and BK's few values 128.
CPU_MODEL_BYTES_PER_TOKEN = 4352


def _block() -> torch.nn.Module:
    torch.manual_seed(0)
    return MuseLM(CFG).blocks[0].to(DEV).train()


def _step(block, fn, x, saved=None):
    """(y, dx, {name: grad}) of one bf16-autocast forward + backward; the tensors autograd keeps are
    appended to `saved` when given."""
    block.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    hooks = torch.autograd.graph.saved_tensors_hooks((lambda t: saved.append(t) or t) if saved is not None
                                                     else (lambda t: t), lambda t: t)
    with torch.autocast("cuda", torch.bfloat16), hooks:
        y, penalty, _ = fn(x)
        weights = torch.linspace(-1, 1, y.numel(), device=DEV).view_as(y)
        ((y.float() * weights).sum() + penalty).backward()
    return y.detach().float(), x.grad, {n: p.grad.clone() for n, p in block.named_parameters()}


def _storage_bytes(saved) -> int:
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved
                if isinstance(t, torch.Tensor)}.values())


def test_inductor_block_trains_like_eager():
    block = _block()
    x = torch.randn(2, 200, CFG.d_model, device=DEV)
    eager = _step(block, block, x)
    torch._dynamo.reset()
    compiled = _step(block, torch.compile(block, dynamic=False), x)
    torch._dynamo.reset()
    for name, a, b in zip(("y", "dx"), eager[:2], compiled[:2]):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2, msg=name)
    for name, a in eager[2].items():
        b = compiled[2][name]
        # bf16 activations: compare each gradient relative to its own scale.
        err = (b - a).norm() / a.norm().clamp_min(1e-12)
        assert err < 3e-2, (name, float(err))


def test_inductor_block_keeps_what_the_cpu_model_says():
    block = _block()
    torch._dynamo.reset()
    compiled = torch.compile(block, dynamic=False)
    kept = []
    for t in (256, 512):
        saved = []
        _step(block, compiled, torch.randn(1, t, CFG.d_model, device=DEV), saved)
        kept.append(_storage_bytes(saved))
    torch._dynamo.reset()
    per_token = (kept[1] - kept[0]) / 256
    assert per_token <= 1.05 * CPU_MODEL_BYTES_PER_TOKEN, (per_token, kept)
