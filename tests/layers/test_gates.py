import pytest
import torch

from muse_lm.layers import AdaptiveRankSemiseparableLayer, rank_gate


@pytest.mark.parametrize("mode", ["soft", "ste", "gumbel"])
def test_every_gate_mode_passes_gradient_to_the_gate_network(mode):
    torch.manual_seed(0)
    layer = AdaptiveRankSemiseparableLayer(16, max_rank=6, min_rank=2, num_heads=2, chunk_size=8,
                                           gate_mode=mode).train()
    x = torch.randn(2, 11, 16)
    y, penalty, _ = layer(x)
    (y.square().mean()).backward()
    # The gate logits are the last R columns of in_proj; their gradient must be non-zero.
    gate_rows = layer.in_proj.weight.grad[-layer.max_rank :]
    assert torch.isfinite(gate_rows).all()
    assert gate_rows[layer.min_rank :].abs().sum() > 0
    assert layer.gate_bias.grad is not None and layer.gate_bias.grad[layer.min_rank :].abs().sum() > 0


def test_gate_penalty_has_gradient_and_is_positive():
    layer = AdaptiveRankSemiseparableLayer(16, max_rank=6, min_rank=2, num_heads=2, gate_l1=0.1)
    _, penalty, _ = layer(torch.randn(1, 5, 16))
    assert penalty > 0
    penalty.backward()
    assert layer.gate_bias.grad[2:].gt(0).all()  # pushing gates down lowers the penalty


def test_gumbel_hard_gates_are_unbiased():
    torch.manual_seed(0)
    logits = torch.tensor([-2.0, -0.5, 0.0, 0.7, 2.5]).repeat(40000, 1)
    gate = rank_gate(logits, "gumbel", training=True, temperature=0.5)
    assert set(gate.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(gate.mean(0), torch.sigmoid(logits[0]), atol=0.01, rtol=0)


def test_min_rank_components_are_always_on():
    logits = torch.full((3, 6), -10.0)
    for mode in ("soft", "ste", "gumbel"):
        gate = rank_gate(logits, mode, training=True, min_rank=2)
        assert gate[:, :2].eq(1).all() and gate[:, 2:].lt(0.5).all()


def test_set_gate_mode_validates_and_sticks():
    layer = AdaptiveRankSemiseparableLayer(8, max_rank=4, min_rank=1, num_heads=2)
    layer.set_gate_mode("gumbel", gumbel_temperature=0.3)
    assert layer.gate_mode == "gumbel" and layer.gumbel_temperature == 0.3
    with pytest.raises(ValueError, match="not one of"):
        layer.set_gate_mode("hard")
    with pytest.raises(ValueError, match="gumbel_temperature"):
        layer.set_gate_mode("gumbel", gumbel_temperature=0)


def test_running_gate_statistics_track_the_gates():
    torch.manual_seed(0)
    layer = AdaptiveRankSemiseparableLayer(8, max_rank=4, min_rank=1, num_heads=2, stats_momentum=0.0)
    with torch.no_grad():
        layer.gate_bias.copy_(torch.tensor([0.0, 30.0, -30.0, 30.0]))
        layer.in_proj.weight[-4:].zero_()
    layer.train()(torch.randn(2, 5, 8))
    torch.testing.assert_close(layer.gate_mean, torch.tensor([1.0, 1.0, 0.0, 1.0]), atol=1e-6, rtol=0)
    assert float(layer.effective_rank()) == pytest.approx(3.0, abs=1e-5)


def test_state_norm_tracking_reports_the_final_state_rms():
    torch.manual_seed(0)
    layer = AdaptiveRankSemiseparableLayer(8, max_rank=4, min_rank=1, num_heads=2).eval()
    x = torch.randn(2, 9, 8)
    _, _, state = layer(x, return_state=True)
    assert layer.last_state_rms is None  # off by default: no extra output
    layer.track_state_norm = True
    layer(x)
    torch.testing.assert_close(layer.last_state_rms, state.ssm.pow(2).mean().sqrt())
    assert 0 < float(layer.last_decay_mean) <= 1
