"""The no-sync path of the stability monitor (lag >= 1, the CUDA default), exercised on the CPU:
the device flag decides the skip through the fused AdamW's `found_inf`, the host judges the
step later, and the ladder still reaches rollback and re-init. The GPU test
(tests/gpu/test_no_sync_training.py) proves there is no implicit host sync on CUDA."""

from __future__ import annotations

import math

import pytest
import torch

from muse_lm.training import RunOptions
from muse_lm.training.distributed import DistInfo
from muse_lm.training.faults import FaultPlan
from muse_lm.training.lagged import LaggedReader
from muse_lm.training.recovery import RecoveryConfig, SnapshotKeeper
from muse_lm.training.run import build_trainer, plan_run
from muse_lm.training.stability import StabilityConfig, StabilityMonitor


def test_lag_defaults_by_device_and_is_validated():
    assert StabilityConfig().resolved_lag(torch.device("cpu")) == 0
    assert StabilityConfig().resolved_lag(torch.device("cuda")) == 1
    assert StabilityConfig(lag=2).resolved_lag(torch.device("cpu")) == 2
    for bad in (-1, 9, 1.5, True):
        with pytest.raises(Exception, match="lag"):
            StabilityConfig(lag=bad)


def test_device_flag_agrees_with_the_host_verdict():
    monitor = StabilityMonitor(StabilityConfig(arm_after=3, window=10))
    for step in range(10):
        monitor.judge(step, 2.0 + 0.01 * (step % 3), 1.0 + 0.1 * (step % 2))
    limits = monitor.limits()
    assert all(math.isfinite(x) for x in limits)
    cases = [(2.0, 1.0), (50.0, 1.0), (2.0, 500.0), (math.nan, 1.0), (2.0, math.inf)]
    for loss, grad in cases:
        flag = monitor.device_flag(torch.tensor(loss), torch.tensor(grad), limits)
        verdict = StabilityMonitor(monitor.config).judge(0, loss, grad, limits=limits)
        assert bool(flag) == (not verdict.healthy), (loss, grad)
    # Unarmed: only non-finite values are flagged.
    fresh = StabilityMonitor()
    assert fresh.limits() == (math.inf, math.inf)
    assert float(fresh.device_flag(torch.tensor(1e9), torch.tensor(1e9), fresh.limits())) == 0.0


def test_the_device_decision_is_authoritative():
    monitor = StabilityMonitor()
    verdict = monitor.judge(5, 2.0, 1.0, flagged=True)
    assert not verdict.healthy and "device" in verdict.reason and len(monitor.losses) == 0


def test_lagged_reader_returns_entries_in_order_up_to_a_step():
    reader = LaggedReader()
    for step in range(4):
        reader.push(step, torch.tensor([float(step), 2.0 * step]), meta=step)
    first = reader.ready(1)
    assert [e.step for e in first] == [0, 1] and first[1].values.tolist() == [1.0, 2.0]
    assert len(reader) == 2
    reader.clear()
    assert reader.ready(10) == []


def test_snapshot_ahead_of_the_verified_steps_waits_for_their_verdicts():
    keeper = SnapshotKeeper(every=5, confirm=3)
    states = iter(range(100))
    keeper.update(4, True, lambda: next(states), ahead=1)  # state 5 holds one unverified step
    assert keeper.pending[0] == 5 and keeper.good is None
    keeper.update(7, True, lambda: next(states), ahead=1)
    assert keeper.good is None  # verified 7: only 2 verified steps past state 5
    keeper.update(8, True, lambda: next(states), ahead=1)
    assert keeper.good[0] == 5


def _trainer(small_corpus, tiny_overrides, out, steps, lag, faults=()):
    options = RunOptions(preset="tiny", data=str(small_corpus), out=str(out), steps=steps,
                         overrides=tiny_overrides, progress=False, seed=1, faults=list(faults))
    return build_trainer(plan_run(options), options, torch.device("cpu"), DistInfo(),
                         stability=StabilityConfig(lag=lag))


def test_lagged_run_skips_on_the_device_and_climbs_the_ladder(small_corpus, tiny_overrides, tmp_path):
    tiny_overrides.update(checkpoint_every=10, eval_every=35, log_every=5)
    trainer = _trainer(small_corpus, tiny_overrides, tmp_path / "run", 80, lag=1)
    assert trainer.optimizer.defaults["fused"]
    trainer.policy.config = RecoveryConfig(decay_after=7, snapshot_every=5, confirm_after=3)
    # Four NaN steps climb to rollback (judged one step late: the rollback also undoes step 34,
    # whose verdict is then never read); the replay's blown-up layer at 36 is the fifth anomaly.
    trainer.faults = FaultPlan([("nan_loss", s) for s in (30, 31, 32, 33)] + [("bad_layer", 36)])
    result = trainer.fit()
    actions = [e["action"] for e in trainer.events.read()]
    assert actions[:4] == ["skip", "lr_cut", "clip", "rollback"]
    assert "reinit" in actions and "stop" not in actions
    assert trainer.policy.level == 0 and len(trainer._reader) == 0
    reinit = next(e for e in trainer.events.read() if e["action"] == "reinit")
    assert reinit["layers"] and reinit["step"] == 36
    assert result.step == 80 and result.end_eval_loss < result.start_eval_loss
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_lagged_and_immediate_runs_agree_without_faults(small_corpus, tiny_overrides, tmp_path):
    tiny_overrides.update(checkpoint_every=20, eval_every=40, log_every=10)
    now = _trainer(small_corpus, tiny_overrides, tmp_path / "now", 40, lag=0).fit()
    later = _trainer(small_corpus, tiny_overrides, tmp_path / "later", 40, lag=1).fit()
    # Fused vs foreach AdamW differ only in rounding.
    assert later.end_eval_loss == pytest.approx(now.end_eval_loss, rel=1e-3)
