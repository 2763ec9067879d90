"""StabilityMonitor: finite checks, trend outliers (armed late, MAD band), widening, per-layer
statistics that single out a blown-up layer, config validation, and use from a plain loop."""

from __future__ import annotations

import math
import random

import pytest
import torch

from muse_lm.errors import ConfigError
from muse_lm.models import MuseConfig, MuseLM
from muse_lm.training.recovery import EventLog, RecoveryPolicy
from muse_lm.training.stability import StabilityConfig, StabilityMonitor, layer_groups


def _feed(monitor, values, start=0, grad=1.0):
    return [monitor.observe(start + i, v, grad) for i, v in enumerate(values)]


def test_non_finite_loss_or_grad_is_flagged_even_before_arming():
    monitor = StabilityMonitor()
    assert not monitor.armed
    nan = monitor.observe(0, float("nan"), 1.0)
    inf = monitor.observe(1, 3.0, torch.tensor(float("inf")))
    assert not nan.healthy and not nan.finite and "loss" in nan.reason
    assert not inf.healthy and not inf.finite and "gradient" in inf.reason
    assert monitor.healthy_steps == 0  # bad steps never enter the trend


def test_noisy_healthy_run_passes_and_a_spike_is_caught_only_once_armed():
    rng = random.Random(0)
    monitor = StabilityMonitor()
    # A decaying loss with 3% noise and grad norms that swing 2x: never flagged.
    values = [5.0 * math.exp(-i / 300) * (1 + 0.03 * rng.gauss(0, 1)) for i in range(500)]
    verdicts = [monitor.observe(i, v, 1.0 + rng.random()) for i, v in enumerate(values)]
    assert all(v.healthy for v in verdicts)
    spike = monitor.observe(500, 2.0 * values[-1], 1.0)
    assert not spike.healthy and spike.finite and "above the trend" in spike.reason
    grad_spike = monitor.observe(501, values[-1], 50.0)
    assert not grad_spike.healthy and "gradient norm" in grad_spike.reason

    early = StabilityMonitor(StabilityConfig(arm_after=20))
    _feed(early, [4.0] * 10)
    assert early.observe(10, 40.0, 1.0).healthy  # not armed yet: only finite checks


def test_widen_loosens_the_thresholds():
    monitor = StabilityMonitor()
    _feed(monitor, [4.0, 4.1, 3.9] * 10)
    assert not monitor.observe(30, 6.0, 1.0).healthy
    monitor.widen(2.0)
    assert monitor.observe(31, 6.0, 1.0).healthy


def test_state_dict_round_trip():
    monitor = StabilityMonitor()
    _feed(monitor, [4.0, 4.2] * 15)
    monitor.widen()
    other = StabilityMonitor()
    other.load_state_dict(monitor.state_dict())
    assert other.state_dict() == monitor.state_dict()
    assert other.observe(30, 9.0, 1.0).healthy == monitor.observe(30, 9.0, 1.0).healthy


def _tiny_model() -> MuseLM:
    torch.manual_seed(0)
    return MuseLM(MuseConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_rank=4, min_rank=2,
                             bk_heads=2, tt_rank=4))


def test_layer_stats_single_out_a_blown_up_layer_and_record_activations():
    model = _tiny_model()
    monitor = StabilityMonitor(StabilityConfig(stats_every=1))
    monitor.attach(model)
    assert {"blocks.0", "blocks.1"} <= set(layer_groups(model))
    ids = torch.randint(0, 64, (2, 16))
    for step in range(3):
        monitor.collect_activations(step)
        model.zero_grad()
        loss = model(ids, ids)
        loss.backward()
        assert monitor.observe(step, loss, torch.tensor(1.0), model).healthy
    stats = monitor.forward_stats
    names = ("act_rms", "ssm_decay", "ssm_state_rms", "bk_logdet", "bk_resonance")
    assert set(stats) == {f"blocks.{i}/{n}" for i in (0, 1) for n in names}
    assert all(math.isfinite(v) for v in stats.values())
    assert all(0 < stats[f"blocks.{i}/ssm_decay"] < 1 and 0 <= stats[f"blocks.{i}/bk_resonance"] <= 1
               for i in (0, 1))
    assert monitor.suspect_layers(model) == []
    with torch.no_grad():
        for p in model.blocks[1].parameters():
            if p.dim() >= 2:
                p.mul_(100.0)
    assert monitor.suspect_layers(model) == ["blocks.1"]


@pytest.mark.parametrize("field,value", [("arm_after", 0), ("window", -1), ("loss_k", 0.0),
                                         ("stats_decay", 1.0), ("suspect_ratio", 1.0)])
def test_bad_config_is_a_clear_error(field, value):
    with pytest.raises(ConfigError, match=f"StabilityConfig.{field}"):
        StabilityConfig(**{field: value})
    with pytest.raises(ConfigError, match="unknown fields"):
        StabilityConfig.from_dict({"no_such": 1})


def test_monitor_and_policy_in_a_users_own_loop(tmp_path):
    """The docs/stability.md example: a NaN step is skipped and the weights stay finite."""
    model = _tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    monitor = StabilityMonitor()
    policy = RecoveryPolicy(monitor=monitor, events=EventLog(tmp_path / "events.jsonl"))
    ids = torch.randint(0, 64, (2, 16))
    for step in range(30):
        loss = model(ids, ids)
        if step == 25:
            loss = loss * float("nan")  # a fault
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0 * policy.clip_scale)
        verdict = monitor.observe(step, loss, grad_norm, model)
        decision = policy.step(verdict, [] if verdict.healthy else monitor.suspect_layers(model))
        if decision.apply_update:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    events = EventLog(tmp_path / "events.jsonl").read()
    assert [(e["step"], e["action"]) for e in events] == [(25, "skip")]
    assert events[0]["reason"] == "loss is nan"


def test_spectral_statistics_are_length_normalized():
    """A healthy long sequence reads like a short one: per-token log-det and resonance distance
    do not grow with T (so a long context is never flagged)."""
    model = _tiny_model().eval()
    monitor = StabilityMonitor(StabilityConfig(stats_every=1))
    monitor.attach(model)
    values = {}
    for T in (32, 512):
        ids = torch.randint(0, 64, (1, T), generator=torch.Generator().manual_seed(T))
        monitor.collect_activations(0)
        with torch.no_grad():
            model(ids, ids)
        monitor.update_baselines(model)
        values[T] = dict(monitor.forward_stats)
    for name in ("bk_logdet", "bk_resonance", "ssm_decay"):
        short, long = values[32][f"blocks.0/{name}"], values[512][f"blocks.0/{name}"]
        assert math.isfinite(long) and abs(long - short) <= 0.2 * abs(short) + 0.05, (name, short, long)
