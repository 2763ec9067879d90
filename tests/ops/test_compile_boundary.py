"""torch.compile around the Triton entry points: the embedding and heads run eagerly at a graph break
(`_dispatch.compile_boundary`), the scan and BK kernels as custom ops inside the graph
(tests/ops/test_custom_ops.py), so a compiled model gives the eager loss and gradients. Without the
boundary Dynamo traces into the launchers (on a GPU it failed on the autotuners' early_config_prune;
under the interpreter it traces the interpreter). Runs in a TRITON_INTERPRET=1 child process."""

import pytest
import torch

from muse_lm.ops import (
    bk_resolvent,
    linear_cross_entropy,
    linear_recurrence,
    semiseparable_scan,
    tt_embedding,
    tt_linear_cross_entropy,
)
from muse_lm.ops._dispatch import interpreter_enabled

pytest.importorskip("triton")

interp = pytest.mark.skipif(not interpreter_enabled(), reason="runs in the TRITON_INTERPRET=1 child process")


@pytest.mark.skipif(interpreter_enabled(), reason="this is the parent of the interpreter run")
def test_interpreter_suite(interpreter_run):
    interpreter_run(__file__)


def _inputs():
    g = torch.Generator().manual_seed(0)
    b, t, h, p, r = 1, 20, 2, 16, 16
    return {
        "x": torch.randn(b, t, h, p, generator=g), "u": torch.randn(b, t, h, r, generator=g) * 0.3,
        "v": torch.randn(b, t, h, r, generator=g) * 0.3, "log_a": -torch.rand(b, t, h, generator=g),
        "a": torch.rand(b, t, 8, generator=g), "pot": torch.randn(b, t, 2, generator=g),
        "cores": [torch.randn(5, 1, 4, 3, generator=g), torch.randn(7, 3, 8, 1, generator=g)],
        "w": torch.randn(33, 32, generator=g) * 0.2, "ids": torch.randint(0, 33, (b, t), generator=g),
    }


def _model(inp, params):
    """Every Triton entry point (impl="triton"), glued by torch code that compile traces and fuses."""
    x, u, v, log_a, a, pot, c0, c1, w = params
    y, _ = semiseparable_scan(x * 1.5, u, v, log_a, impl="triton")
    rec = linear_recurrence(a, y.flatten(2)[..., :8].tanh(), impl="triton")
    g = bk_resolvent(pot + rec[..., :2], torch.tensor([0.3 + 1.0j, -0.2 + 0.7j]), impl="triton")
    emb = tt_embedding(inp["ids"], [c0, c1], impl="triton")  # [B, T, 32]
    h = (emb + y.flatten(2)[..., :32] + g.real.repeat(1, 1, 16)).flatten(0, 1)
    tt = tt_linear_cross_entropy(h, [c0, c1], inp["ids"].flatten(), vocab_size=33, impl="triton")
    dense = linear_cross_entropy(h, w, inp["ids"].flatten(), impl="triton")
    return tt + dense


@interp
def test_compiled_equals_eager_loss_and_grads():
    inp = _inputs()
    names = ("x", "u", "v", "log_a", "a", "pot")
    leaves = [inp[n].clone().requires_grad_() for n in names] + [c.clone().requires_grad_() for c in inp["cores"]]
    leaves.append(inp["w"].clone().requires_grad_())
    eager = _model(inp, leaves)
    want = torch.autograd.grad(eager, leaves)
    compiled = torch.compile(lambda *p: _model(inp, p), backend="eager")
    got_loss = compiled(*leaves)
    got = torch.autograd.grad(got_loss, leaves)
    assert torch.allclose(got_loss, eager, rtol=1e-5, atol=1e-6)
    for k, (a, b) in enumerate(zip(got, want)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), k
