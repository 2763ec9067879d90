"""AdaptiveRankSemiseparableLayer.prune_ranks: the weights shrink, and the pruned layer computes exactly
what the unpruned one computes with the removed components' gates forced to 0."""

import copy

import pytest
import torch

from muse_lm.layers import AdaptiveRankSemiseparableLayer
from muse_lm.layers.ar_ssm import PruneReport

D, R, MIN_RANK, H = 16, 6, 2, 2
# Running mean gates: components 2 and 4 are mostly closed; 0 and 1 are the always-on ones.
MEANS = [1.0, 1.0, 0.05, 0.8, 0.2, 0.6]


def make_layer(gate_mode: str = "soft", min_rank: int = MIN_RANK, **kw) -> AdaptiveRankSemiseparableLayer:
    torch.manual_seed(0)
    layer = AdaptiveRankSemiseparableLayer(D, max_rank=R, min_rank=min_rank, num_heads=H, chunk_size=8,
                                           gate_mode=gate_mode, **kw).double().eval()
    with torch.no_grad():  # spread the gates so that kept components are neither all open nor all shut
        layer.in_proj.weight[-R:].normal_(std=0.5)
        layer.gate_bias.copy_(torch.linspace(-1.0, 1.5, R))
        layer.gate_mean.copy_(torch.tensor(MEANS, dtype=torch.float64))
    return layer


def gates_forced_off(layer: AdaptiveRankSemiseparableLayer, removed) -> AdaptiveRankSemiseparableLayer:
    """A copy whose `removed` components have gate logit -inf: their gate is exactly 0 in every mode
    but fixed (sigmoid(-inf) = 0; the hard gate 1[logit > 0] = 0)."""
    ref = copy.deepcopy(layer)
    with torch.no_grad():
        ref.gate_bias[list(removed)] = -torch.inf
    return ref


@pytest.mark.parametrize("gate_mode", ["soft", "ste", "gumbel"])
def test_pruned_output_equals_unpruned_with_removed_gates_forced_off(gate_mode):
    layer = make_layer(gate_mode)
    x = torch.randn(2, 21, D, dtype=torch.float64)
    ref = gates_forced_off(layer, [2, 4])
    y_ref, pen_ref, st_ref = ref(x, return_state=True)
    report = layer.prune_ranks(0.5)
    assert report == PruneReport(0.5, 6, 4, (0, 1, 3, 5), (2, 4), tuple(MEANS))
    y, pen, st = layer(x, return_state=True)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-13)
    torch.testing.assert_close(pen, pen_ref, rtol=0, atol=1e-15)
    # The state keeps only the kept components; the forced-off ones were exactly 0 in the reference.
    assert st.ssm.shape == (2, H, 4, layer.head_dim)
    torch.testing.assert_close(st.ssm, st_ref.ssm[:, :, [0, 1, 3, 5]], rtol=0, atol=1e-13)
    assert st_ref.ssm[:, :, [2, 4]].abs().max() == 0
    # Pruning changed something: the unpruned layer's output differs.
    assert (y - make_layer(gate_mode)(x)[0]).abs().max() > 1e-6


def test_weights_and_statistics_shrink_and_keep_their_values():
    layer = make_layer()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.prune_ranks(0.5)
    kept = torch.tensor([0, 1, 3, 5])
    d_in = layer.d_inner
    assert layer.rank == 4 and layer.max_rank == R
    assert layer.in_proj.weight.shape == (d_in + 2 * H * 4 + H + 4, D)
    w, w0 = layer.in_proj.weight, before["in_proj.weight"]
    torch.testing.assert_close(w[:d_in], w0[:d_in], rtol=0, atol=0)  # values untouched
    for part in (0, 1):  # u, then v: rows h * R + r
        rows0 = torch.cat([d_in + part * H * R + h * R + kept for h in range(H)])
        torch.testing.assert_close(w[d_in + part * H * 4: d_in + (part + 1) * H * 4], w0[rows0], rtol=0, atol=0)
    torch.testing.assert_close(w[-4 - H:-4], w0[-R - H:-R], rtol=0, atol=0)  # decay step rows
    torch.testing.assert_close(w[-4:], w0[-R:][kept], rtol=0, atol=0)  # gate logits
    torch.testing.assert_close(layer.gate_bias, before["gate_bias"][kept], rtol=0, atol=0)
    torch.testing.assert_close(layer.gate_mean, before["gate_mean"][kept], rtol=0, atol=0)
    assert layer.effective_rank() == pytest.approx(1 + 1 + 0.8 + 0.6)
    assert "gate_mean" in dict(layer.named_buffers())
    assert layer.in_proj.weight.dtype == torch.float64


def test_always_on_components_are_never_pruned():
    layer = make_layer()
    with torch.no_grad():
        layer.gate_mean.zero_()  # statistics say "closed", but components 0 and 1 have gate 1 by design
    report = layer.prune_ranks(1.0)
    assert report.kept == (0, 1) and layer.rank == 2


def test_a_threshold_that_removes_every_component_is_refused_and_changes_nothing():
    layer = make_layer(min_rank=0)
    with torch.no_grad():
        layer.gate_mean.copy_(torch.tensor([0.1, 0.3, 0.05, 0.2, 0.2, 0.25]))
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match="would remove all 6 rank components .largest mean gate 0.3.*at most"):
        layer.prune_ranks(0.31)
    assert layer.rank == R
    for k, v in layer.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    assert layer.prune_ranks(0.3).kept == (1,)  # at the largest mean the strongest one stays


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), True, "0.5"])
def test_threshold_must_be_a_probability(bad):
    with pytest.raises(ValueError, match="must be a number in \\[0, 1\\]"):
        make_layer().prune_ranks(bad)


def test_threshold_zero_removes_nothing():
    layer = make_layer()
    weight = layer.in_proj.weight
    report = layer.prune_ranks(0.0)
    assert report.removed == () and report.rank_after == R and layer.in_proj.weight is weight


def test_pruning_twice_equals_pruning_once_at_the_higher_threshold():
    once, twice = make_layer(), make_layer()
    once.prune_ranks(0.7)
    assert twice.prune_ranks(0.3).kept == (0, 1, 3, 5)
    assert twice.prune_ranks(0.7).kept == (0, 1, 2)  # indices into the rank it had then
    x = torch.randn(1, 9, D, dtype=torch.float64)
    torch.testing.assert_close(twice(x)[0], once(x)[0], rtol=0, atol=0)


def test_running_statistics_decide_and_training_goes_on_at_the_smaller_rank():
    layer = make_layer(stats_momentum=0.0).train()
    with torch.no_grad():
        layer.gate_bias.copy_(torch.tensor([0.0, 0.0, -30.0, 30.0, -30.0, 30.0]))
    layer(torch.randn(2, 8, D, dtype=torch.float64))  # the EMA (momentum 0) becomes this batch's mean
    assert layer.prune_ranks(0.5).removed == (2, 4)
    y, penalty, _ = layer(torch.randn(2, 8, D, dtype=torch.float64))
    (y.square().mean() + penalty).backward()
    assert layer.gate_bias.grad.shape == (4,) and layer.in_proj.weight.grad is not None
    assert layer.gate_mean.shape == (4,)


def test_step_by_step_generation_equals_the_scan_after_pruning():
    layer = make_layer()
    layer.prune_ranks(0.5)
    x = torch.randn(2, 10, D, dtype=torch.float64)
    y_full, _, _ = layer(x)
    _, _, state = layer(x[:, :4], return_state=True)
    steps = []
    for t in range(4, 10):
        y_t, _, state = layer(x[:, t:t + 1], state)
        steps.append(y_t)
    # Step and scan sum in different orders; out_norm rescales y, hence not 1e-15.
    torch.testing.assert_close(torch.cat(steps, 1), y_full[:, 4:], rtol=1e-9, atol=1e-11)


def test_constructor_rank_is_validated():
    assert AdaptiveRankSemiseparableLayer(8, max_rank=4, min_rank=1, num_heads=2, rank=2).in_proj.weight.shape[0] \
        == 16 + 2 * 2 * 2 + 2 + 2
    for rank in (0, 5):
        with pytest.raises(ValueError, match=f"rank={rank} must be in \\[max\\(min_rank, 1\\)=1, max_rank=4\\]"):
            AdaptiveRankSemiseparableLayer(8, max_rank=4, min_rank=1, num_heads=2, rank=rank)
    with pytest.raises(ValueError, match="rank=1 must be in \\[max\\(min_rank, 1\\)=2"):
        AdaptiveRankSemiseparableLayer(8, max_rank=4, min_rank=2, num_heads=2, rank=1)
