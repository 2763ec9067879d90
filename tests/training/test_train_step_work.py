"""Work a training step does once per step, not once per micro-batch: the stability monitor's
forward statistics are recorded by the last micro-batch of a stats step only (a step keeps one
forward's values), with and without activation checkpointing and with the lagged monitor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from muse_lm.models import MuseConfig, MuseLM
from muse_lm.training import TrainConfig, Trainer
from muse_lm.training.stability import StabilityConfig

ACCUM = 3


def _trainer(tmp_path, *, lag: int, checkpointing: bool) -> Trainer:
    torch.manual_seed(0)
    model = MuseLM(MuseConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_rank=4, min_rank=1,
                              bk_heads=2, tt_rank=4))
    cfg = TrainConfig(seq_len=16, micro_batch=2, grad_accum=ACCUM, steps=10, lr=1e-3, warmup_steps=1,
                      dtype="fp32", activation_checkpointing=checkpointing)
    tokens = np.random.default_rng(0).integers(0, 64, size=16 * 2 * ACCUM * 4 + 1)
    return Trainer(model, cfg, train_tokens=tokens, heldout_tokens=tokens[:65], run_dir=tmp_path,
                   tokenizer_json="{}", run_config={}, progress=False,
                   stability=StabilityConfig(stats_every=2, lag=lag))


def _rms(t: torch.Tensor) -> float:
    return float(t.detach().pow(2).mean().sqrt())


@pytest.mark.parametrize(("lag", "checkpointing"), [(0, False), (1, False), (0, True)])
def test_forward_statistics_come_from_the_last_micro_batch_only(tmp_path, lag, checkpointing):
    trainer = _trainer(tmp_path, lag=lag, checkpointing=checkpointing)
    tracked: list[bool] = []  # per mixer forward of block 0: did it compute the statistics?
    block_rms: list[float] = []  # block 0's output RMS, per forward
    block = trainer.model.blocks[0]
    block.mixer.register_forward_hook(lambda mod, args, out: tracked.append(mod.track_state_norm))
    block.register_forward_hook(lambda mod, args, out: block_rms.append(_rms(out[0])))
    forwards = 2 if checkpointing else 1  # a checkpointed block runs again in backward

    trainer.train_step()  # step 0: a stats step
    assert tracked == [False] * (ACCUM - 1) * forwards + [True] * forwards
    last_rms = block_rms[-1]
    tracked.clear()
    trainer.train_step()  # step 1: not a stats step (the lagged monitor judges step 0 now)
    assert tracked == [False] * ACCUM * forwards

    stats = trainer.monitor.forward_stats
    assert {"blocks.0/act_rms", "blocks.0/ssm_state_rms", "blocks.0/ssm_decay", "blocks.0/bk_logdet",
            "blocks.1/bk_resonance"} <= set(stats)
    # The values kept are the last micro-batch's (before: every micro-batch recorded, the last won).
    assert stats["blocks.0/act_rms"] == pytest.approx(last_rms, rel=1e-6)
    assert block_rms[ACCUM * forwards - 1] != pytest.approx(block_rms[0], rel=1e-6)  # micro-batches differ
