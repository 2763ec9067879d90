"""A compiled block rebuilds its cheap activations in the backward (layers/recompute.py): the norms'
outputs with the mixer's conv, the gated u and v, out_proj's input and the SwiGLU product. The
compiled block must train exactly like the eager one; what it keeps is counted by
tests/test_saved_activations.py on the kernels' path."""

import copy

import pytest
import torch

from muse_lm import MuseConfig, MuseLM
from muse_lm.layers.ar_ssm import ARSSMState

CFG = dict(vocab_size=97, d_model=32, n_layers=1, n_heads=2, max_rank=6, min_rank=2, chunk_size=8, tt_rank=4,
           bk_heads=2, ssm_expand=2)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Dynamo's per-code state (what it has compiled, which sizes it saw change) outlives a test: a later
    compile of the same block code would start dynamic. Each test here starts and ends with none."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _step(block, fn, x):
    """(output, penalty, dx, {name: grad}) of one forward + backward with a per-element gradient."""
    block.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    y, penalty, _ = fn(x)
    weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    ((y * weights).sum() + penalty).backward()
    grads = {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}
    grads.update({n: b.clone() for n, b in block.named_buffers()})  # the gate means: updated once a step
    return y.detach(), penalty.detach(), x.grad, grads


@pytest.mark.parametrize("gate_mode", ["soft", "ste", "fixed"])
def test_compiled_block_trains_like_eager(gate_mode):
    torch.manual_seed(0)
    block = MuseLM(MuseConfig(**CFG, gate_mode=gate_mode)).blocks[0].train()
    x = torch.randn(2, 19, 32)
    twin = copy.deepcopy(block)  # the same weights and gate means before the step
    eager = _step(block, block, x)
    # The partitioner Inductor uses, without its code generation: it follows the must-recompute tags.
    compiled = _step(twin, torch.compile(twin, backend="aot_eager_decomp_partition", dynamic=False), x)
    for name, a, b in zip(("y", "penalty", "dx"), eager[:3], compiled[:3]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert eager[3].keys() == compiled[3].keys()
    for name in eager[3]:
        torch.testing.assert_close(compiled[3][name], eager[3][name], rtol=1e-5, atol=1e-6, msg=name)


def test_projection_blocks_equal_the_one_linear():
    """The values and the rest come from two GEMMs on row blocks of in_proj's one weight: the same
    numbers as the one Linear split, and the values contiguous (the scan takes them without a copy)."""
    torch.manual_seed(0)
    mixer = MuseLM(MuseConfig(**CFG)).blocks[0].mixer
    xc = torch.randn(2, 9, 32, dtype=torch.float64)
    mixer.double()
    ours = mixer._project(xc)
    whole = mixer.in_proj(xc).split(mixer._splits, dim=-1)
    assert len(ours) == len(whole) == 5 and ours[0].is_contiguous()
    for a, b in zip(ours, whole):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_conv_out_is_refused_with_a_state():
    torch.manual_seed(0)
    mixer = MuseLM(MuseConfig(**CFG)).blocks[0].mixer.eval()
    x = torch.randn(1, 5, 32)
    xc = mixer.conv_input(x)
    y, _, _ = mixer(x, conv_out=xc)
    torch.testing.assert_close(y, mixer(x)[0], rtol=0, atol=0)  # the caller's conv is the layer's own
    state = ARSSMState(torch.zeros(1, mixer.conv_size - 1, 32), torch.zeros(1, mixer.num_heads, mixer.rank,
                                                                           mixer.head_dim))
    with pytest.raises(ValueError, match="no state in or out"):
        mixer(x, state, conv_out=xc)
    with pytest.raises(ValueError, match="no state in or out"):
        mixer(x, return_state=True, conv_out=xc)
    with pytest.raises(ValueError, match="conv_input"):
        mixer(x, conv_out=xc[:, :4])


def test_block_compiled_with_dynamic_shapes_trains_like_eager_at_ragged_lengths():
    """One compiled graph for every length (dynamic shapes, as after a recompile on a new length), on
    the torch reference ops: lengths that pad the last chunk, one chunk and two. The reference scan's
    zero padding once came back in the compiled backward as a narrowing whose strides the graph had
    not traced ("view size is not compatible")."""
    torch.manual_seed(0)
    block = MuseLM(MuseConfig(**{**CFG, "chunk_size": 16, "bk_heads": 0})).blocks[0].train()
    twin = copy.deepcopy(block)
    compiled = torch.compile(twin, backend="aot_eager", dynamic=True)
    for length in (11, 24):
        x = torch.randn(2, length, 32)
        eager, ours = _step(block, block, x), _step(twin, compiled, x)
        torch.testing.assert_close(ours[2], eager[2], rtol=1e-5, atol=1e-6, msg=f"dx at T {length}")
        for name in eager[3]:
            torch.testing.assert_close(ours[3][name], eager[3][name], rtol=1e-5, atol=1e-6, msg=f"{name} at T {length}")
