"""On CUDA a training step never waits for the GPU: the stability monitor's flag is computed and
acted on by the device (fused AdamW `found_inf`), and the host reads the numbers one step late.
`torch.cuda.set_sync_debug_mode("error")` turns any implicit host sync inside `train_step`
(`.item()`, `.tolist()`, a blocking copy, data-dependent shapes) into an error. Faults still
climb the ladder. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from muse_lm.training import RunOptions
from muse_lm.training.distributed import DistInfo
from muse_lm.training.faults import FaultPlan
from muse_lm.training.run import build_trainer, plan_run

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _trainer(small_corpus, tiny_overrides, out, steps):
    options = RunOptions(preset="tiny", data=str(small_corpus), out=str(out), steps=steps,
                         overrides=tiny_overrides, progress=False, seed=1)
    return build_trainer(plan_run(options), options, torch.device("cuda"), DistInfo())


def test_train_steps_make_no_host_sync(small_corpus, tiny_overrides, tmp_path):
    tiny_overrides.update(checkpoint_every=1000, eval_every=1000, log_every=1000)
    trainer = _trainer(small_corpus, tiny_overrides, tmp_path / "run", 60)
    assert trainer._lag == 1 and trainer.optimizer.defaults["fused"]
    for _ in range(25):  # arm the monitor and warm up allocators / autotuners
        trainer.train_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(15):  # includes a stats step (every 10)
            trainer.train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert trainer.monitor.armed and trainer.monitor.healthy_steps >= 38


def test_faults_on_cuda_are_skipped_on_the_device_and_recovered(small_corpus, tiny_overrides, tmp_path):
    tiny_overrides.update(checkpoint_every=10, eval_every=40, log_every=10)
    trainer = _trainer(small_corpus, tiny_overrides, tmp_path / "run", 80)
    trainer.faults = FaultPlan([("nan_loss", 30), ("loss_spike", 45), ("bad_layer", 60)])
    result = trainer.fit()
    events = trainer.events.read()
    assert {30, 45, 60} <= {e["step"] for e in events}
    assert result.step == 80 and result.end_eval_loss < result.start_eval_loss
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
