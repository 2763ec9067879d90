"""RecoveryPolicy: the ladder climbs one rung per anomaly, decays after healthy stretches,
widens after false alarms; snapshots, re-initialization, checkpoint fallback; and in the
trainer, repeated faults reach rollback and re-init and the level comes back down."""

from __future__ import annotations

import logging

import pytest
import torch

from muse_lm.errors import CheckpointError, ConfigError
from muse_lm.training import RunOptions, train
from muse_lm.training.distributed import DistInfo
from muse_lm.training.faults import FaultPlan
from muse_lm.training.recovery import (
    LADDER,
    EventLog,
    RecoveryConfig,
    RecoveryPolicy,
    SnapshotKeeper,
    capture_state,
    load_last_good_checkpoint,
    reinit_layers,
    restore_state,
)
from muse_lm.training.run import build_trainer, plan_run
from muse_lm.training.stability import StabilityMonitor, Verdict


def _bad(step, finite=False):
    return Verdict(step, float("nan") if not finite else 9.0, 1.0, healthy=False,
                   reason="loss is nan" if not finite else "loss spike", finite=finite)


def _good(step):
    return Verdict(step, 3.0, 1.0)


def test_ladder_climbs_one_rung_per_anomaly_and_logs_each_action(tmp_path):
    log_path = tmp_path / "events.jsonl"
    policy = RecoveryPolicy(RecoveryConfig(decay_after=5), events=EventLog(log_path))
    decisions = [policy.step(_bad(s), ["blocks.1"]) for s in range(6)]
    assert [d.action for d in decisions] == list(LADDER)
    assert not any(d.apply_update for d in decisions)
    assert [d.lr_scale for d in decisions] == [1.0, 0.5, 0.5, 0.5, 0.5, 0.5]
    assert [d.clip_scale for d in decisions] == [1.0, 1.0, 0.5, 0.5, 0.5, 0.5]
    events = EventLog(log_path).read()
    # rollback / reinit are recorded by whoever carries them out (the trainer), with details.
    assert [e["action"] for e in events] == ["skip", "lr_cut", "clip", "stop"]
    assert all({"step", "action", "reason"} <= set(e) for e in events)
    assert events[0]["layers"] == ["blocks.1"] and events[0]["loss"] == "nan"


def test_level_decays_so_isolated_spikes_never_add_up_to_stop():
    policy = RecoveryPolicy(RecoveryConfig(decay_after=10))
    for s in range(3):
        policy.step(_bad(s))
    assert policy.level == 3
    for s in range(3, 33):
        assert policy.step(_good(s)).apply_update
    assert policy.level == 0 and policy.lr_scale == 1.0 and policy.clip_scale == 1.0
    worst = 0
    for s in range(1000):
        policy.step(_bad(s) if s % 15 == 0 else _good(s))
        worst = max(worst, policy.level)
    assert worst == 1


def test_repeated_false_alarms_widen_the_monitor(tmp_path):
    monitor = StabilityMonitor()
    policy = RecoveryPolicy(RecoveryConfig(decay_after=4, widen_after=2), monitor=monitor,
                            events=EventLog(tmp_path / "e.jsonl"))
    for s in range(0, 20, 5):
        policy.step(_bad(s, finite=True))
        for t in range(s + 1, s + 5):
            policy.step(_good(t))
    assert monitor.scale == pytest.approx(1.5**2)
    actions = [e["action"] for e in EventLog(tmp_path / "e.jsonl").read()]
    assert actions.count("widen") == 2
    # NaN episodes are real trouble, never false alarms.
    policy2 = RecoveryPolicy(RecoveryConfig(decay_after=2, widen_after=1), monitor=StabilityMonitor())
    policy2.step(_bad(0))
    policy2.step(_good(1))
    policy2.step(_good(2))
    assert policy2.monitor.scale == 1.0


def test_policy_state_round_trip_continues_the_same_ladder():
    policy = RecoveryPolicy()
    policy.step(_bad(0))
    policy.step(_bad(1))
    resumed = RecoveryPolicy()
    resumed.load_state_dict(policy.state_dict())
    assert resumed.step(_bad(2)).action == policy.step(_bad(2)).action == "clip"


def test_snapshot_is_trusted_only_after_k_healthy_steps():
    keeper = SnapshotKeeper(every=5, confirm=3)
    captured = []

    def capture():
        captured.append(len(captured))
        return captured[-1]

    for step in range(1, 8):
        keeper.update(step, True, capture)
    assert keeper.pending == (5, 0) and keeper.good is None
    keeper.update(8, True, capture)
    assert keeper.good == (5, 0)
    keeper.update(10, True, capture)
    keeper.update(11, False, capture)  # the candidate of step 10 is discarded
    assert keeper.pending is None and keeper.good == (5, 0)


def test_capture_restore_and_reinit_weight_matrices_only():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    snap = capture_state(model, opt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt.step()
    restore_state(snap, model, opt)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    names = reinit_layers(model, opt, ["0"])
    assert names == ["0.weight"]
    assert not torch.equal(model[0].weight, before["0.weight"])
    assert torch.equal(model[0].bias, before["0.bias"])
    assert model[0].weight not in opt.state and model[0].bias in opt.state


def test_bad_config_is_a_clear_error():
    with pytest.raises(ConfigError, match="RecoveryConfig.lr_factor"):
        RecoveryConfig(lr_factor=1.5)
    with pytest.raises(ConfigError, match="RecoveryConfig.decay_after"):
        RecoveryConfig(decay_after=0)


def test_corrupted_latest_checkpoint_falls_back_to_the_previous(small_corpus, tiny_overrides, tmp_path, caplog):
    tiny_overrides.update(checkpoint_every=5, keep_checkpoints=3, eval_every=10)
    out = tmp_path / "run"
    train(RunOptions(preset="tiny", data=str(small_corpus), out=str(out), overrides=tiny_overrides, steps=10,
                     progress=False))
    model_file = out / "step-0000010" / "model.safetensors"
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model_file.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="muse_lm"):
        ckpt = load_last_good_checkpoint(out)
    assert ckpt.path.name == "step-0000005"
    assert "step-0000010" in caplog.text and "sha256" in caplog.text
    result = train(RunOptions(out=str(out), resume=True, steps=12, progress=False))
    assert result.step == 12
    (out / "latest").unlink()
    for p in out.glob("step-*/model.safetensors"):
        p.write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="no loadable checkpoint"):
        load_last_good_checkpoint(out)


def test_repeated_faults_reach_rollback_and_reinit_then_the_level_steps_down(small_corpus, tiny_overrides,
                                                                             tmp_path):
    tiny_overrides.update(checkpoint_every=10, eval_every=20, log_every=5)
    options = RunOptions(preset="tiny", data=str(small_corpus), out=str(tmp_path / "run"), steps=70,
                         overrides=tiny_overrides, progress=False)
    trainer = build_trainer(plan_run(options), options, torch.device("cpu"), DistInfo())
    trainer.policy.config = RecoveryConfig(decay_after=5, snapshot_every=5, confirm_after=3)
    # Four NaN steps climb to rollback; the replayed steps then hit the fifth fault: re-init.
    trainer.faults = FaultPlan([("nan_loss", s) for s in (30, 31, 32, 33, 34)] + [("bad_layer", 36)])
    result = trainer.fit()
    events = trainer.events.read()
    actions = [e["action"] for e in events]
    assert actions[:4] == ["skip", "lr_cut", "clip", "rollback"]
    assert "reinit" in actions and "stop" not in actions
    rollback = events[3]
    assert rollback["to_step"] <= 30 and rollback["data_offset"] == 34 - rollback["to_step"]
    assert trainer.policy.level == 0  # stepped back down over the healthy stretch
    assert trainer.faults.fired == set(trainer.faults.faults)
    assert result.step == 70 and result.end_eval_loss < result.start_eval_loss
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_rollback_before_any_good_state_skips_with_a_reason(small_corpus, tiny_overrides, tmp_path):
    tiny_overrides.update(checkpoint_every=50, eval_every=20)
    options = RunOptions(preset="tiny", data=str(small_corpus), out=str(tmp_path / "run"), steps=20,
                         overrides=tiny_overrides, progress=False,
                         faults=[f"nan_loss@{s}" for s in (2, 3, 4, 5)])
    trainer = build_trainer(plan_run(options), options, torch.device("cpu"), DistInfo())
    result = trainer.fit()
    events = trainer.events.read()
    assert [e["action"] for e in events] == ["skip", "lr_cut", "clip", "rollback"]
    assert "no good state to roll back to yet" in events[-1]["reason"]
    assert result.step == 20 and trainer.data_offset == 0
