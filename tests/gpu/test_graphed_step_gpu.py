"""On CUDA: the scan and BK custom ops pass `torch.library.opcheck` in bf16 and fp32, a compiled
MuseLM block has no graph break, and a training step captured as a CUDA graph (`GraphedStep`, what
`muse bench --only model` times) changes the weights exactly as the eager steps do."""

import copy

import pytest
import torch

from muse_lm.bench_speed.graphed import GraphedStep, make_capturable
from muse_lm.bench_speed.model_part import train_step
from muse_lm.models import MuseConfig, MuseLM
from muse_lm.training.config import TrainConfig
from muse_lm.training.optim import build_optimizer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
DEV = torch.device("cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 65, 300])
def test_ssd_opcheck_cuda(dtype, t):
    from muse_lm.ops.semiseparable.custom_ops import ssd_forward

    g = torch.Generator(device=DEV).manual_seed(t)
    x = torch.randn(2, t, 3, 64, device=DEV, generator=g).to(dtype).requires_grad_()
    u, v = (torch.randn(2, t, 3, 32, device=DEV, generator=g).mul(0.3).to(dtype).requires_grad_() for _ in range(2))
    log_a = (-torch.rand(2, t, 3, device=DEV, generator=g)).requires_grad_()
    state = torch.randn(2, 3, 32, 64, device=DEV, generator=g).requires_grad_()
    torch.library.opcheck(ssd_forward, (x, u, v, log_a, state, 64))
    torch.library.opcheck(ssd_forward, (x, u, v, log_a, None, 64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bk_opcheck_cuda(dtype):
    from muse_lm.ops.scan.bk_custom_ops import bk_forward

    v = torch.randn(3, 257, 4, device=DEV).to(dtype).requires_grad_()
    z = torch.tensor([0.5 + 0.5j, 1.5 + 0.2j, 2.5 + 0.1j, 3.5 + 1.0j], device=DEV).requires_grad_()
    torch.library.opcheck(bk_forward, (v, z))


def _tiny() -> MuseLM:
    torch.manual_seed(0)
    cfg = MuseConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=4, max_rank=16, min_rank=4, bk_heads=2,
                     tt_rank=8)
    model = MuseLM(cfg).to(DEV)
    model.check_ids = False  # its range check reads a flag on the host: a sync, not allowed in a capture
    return model


def test_compiled_block_has_no_graph_break():
    model = _tiny()
    with torch.autocast("cuda", torch.bfloat16):
        x = model.embed(torch.randint(0, 512, (2, 100), device=DEV))
        explanation = torch._dynamo.explain(model.blocks[0])(x)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]


def test_graphed_step_matches_eager_steps():
    eager, graphed = _tiny(), _tiny()
    graphed.load_state_dict(copy.deepcopy(eager.state_dict()))
    train = TrainConfig(lr=3e-3, weight_decay=0.1)
    opt_e, opt_g = build_optimizer(eager, train, DEV), build_optimizer(graphed, train, DEV)
    make_capturable(opt_e)
    make_capturable(opt_g)
    data = torch.randint(0, 512, (4, 129), device=DEV)
    ids, targets = data[:, :-1], data[:, 1:]
    # One uncaptured warm-up step, then the capture, which records the kernels without running them.
    step = GraphedStep(lambda: train_step(graphed, opt_g, ids, targets, DEV), warmup=1)
    train_step(eager, opt_e, ids, targets, DEV)
    for _ in range(3):
        step()
        train_step(eager, opt_e, ids, targets, DEV)
    torch.cuda.synchronize()
    moved = False
    for (name, a), b in zip(graphed.state_dict().items(), eager.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-5), name
    for a, b in zip(graphed.parameters(), _tiny().parameters(), strict=True):
        moved |= not torch.equal(a, b)
    assert moved  # the replays trained: weights left their initial values
    step.release()


def test_make_capturable_refuses_a_stepped_optimizer():
    model = _tiny()
    opt = build_optimizer(model, TrainConfig(), DEV)
    model(torch.randint(0, 512, (1, 9), device=DEV), torch.randint(0, 512, (1, 9), device=DEV)).backward()
    opt.step()
    with pytest.raises(ValueError, match="before the optimizer's first step"):
        make_capturable(opt)


def test_release_gives_the_pool_back():
    """Points of the model benchmark capture one graph each: releasing one must return its memory,
    or the later points' peaks (and the next model's) include every earlier graph's pool."""
    model = _tiny()
    opt = build_optimizer(model, TrainConfig(), DEV)
    make_capturable(opt)
    reserved = []
    for t in (64, 128, 256):
        data = torch.randint(0, 512, (8, t + 1), device=DEV)
        step = GraphedStep(lambda d=data: train_step(model, opt, d[:, :-1], d[:, 1:], DEV), warmup=1)
        step()
        step.release()
        del step, data
        import gc

        gc.collect()
        torch.cuda.empty_cache()
        reserved.append(torch.cuda.memory_reserved())
    assert reserved[-1] <= reserved[0] * 1.5 + 64 * 2**20, reserved
