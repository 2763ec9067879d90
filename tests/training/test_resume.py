"""Exact resume: stopping at K and resuming gives bit-identical per-step metrics and weights;
resume misuse is refused before anything is written."""

from __future__ import annotations

import shutil

import pytest
from safetensors.torch import load_file

from muse_lm.errors import ConfigError
from muse_lm.io import update_latest
from muse_lm.training import RunOptions, train
from muse_lm.training.metrics import read_metrics

# Fields that measure time, not the computation.
_TIMING = {"tokens_per_s", "elapsed_s", "mem_gib"}
STEPS, STOP = 12, 5


def _options(corpus, out, overrides, **kw) -> RunOptions:
    kw = {"preset": "tiny", "steps": STEPS, **kw}
    return RunOptions(data=str(corpus), out=str(out), overrides=overrides, progress=False, **kw)


def _train_lines(run_dir) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in _TIMING}
            for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def _eval_by_step(run_dir) -> dict[int, float]:
    return {r["step"]: r["eval_loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "eval_loss" in r}


@pytest.fixture(scope="module")
def full_run(small_corpus, tiny_defaults, tmp_path_factory):
    """The uninterrupted reference run: gumbel gates (random draws every step) and gradient
    accumulation, so that RNG and micro-batch positions must both be restored exactly."""
    overrides = {**tiny_defaults, "gate_mode": "gumbel", "micro_batch": 2, "grad_accum": 2}
    out = tmp_path_factory.mktemp("full") / "run"
    train(_options(small_corpus, out, overrides))
    return out, overrides


def test_stop_then_resume_is_bit_identical(full_run, small_corpus, tmp_path):
    full, overrides = full_run
    split = tmp_path / "split"
    stopped = train(_options(small_corpus, split, overrides, stop_at=STOP))
    assert stopped.step == STOP and stopped.latest_checkpoint == split / f"step-{STOP:07d}"
    assert (split / "latest").read_text().strip() == f"step-{STOP:07d}"

    resumed = train(_options(small_corpus, split, overrides, resume=True))
    assert resumed.step == STEPS
    assert resumed.start_eval_loss == stopped.start_eval_loss  # the run's step-0 loss is kept
    assert _train_lines(split) == _train_lines(full)  # every field, compared with ==
    full_evals, split_evals = _eval_by_step(full), _eval_by_step(split)
    assert {s: split_evals[s] for s in full_evals} == full_evals
    a = load_file(full / f"step-{STEPS:07d}" / "model.safetensors")
    b = load_file(split / f"step-{STEPS:07d}" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_resume_after_a_crash_replays_the_lost_steps(full_run, small_corpus, tmp_path):
    """A run that died after its step-10 checkpoint (steps 11-12 logged but not saved) resumes
    from step 10: the orphaned lines are dropped and replayed identically."""
    full, overrides = full_run
    crashed = tmp_path / "crashed"
    shutil.copytree(full, crashed)
    shutil.rmtree(crashed / f"step-{STEPS:07d}")
    update_latest(crashed, "step-0000010")
    train(_options(small_corpus, crashed, overrides, resume=True))
    assert _train_lines(crashed) == _train_lines(full)


def test_resume_can_extend_a_finished_run(full_run, small_corpus, tmp_path):
    full, overrides = full_run
    longer = tmp_path / "longer"
    shutil.copytree(full, longer)
    result = train(_options(small_corpus, longer, overrides, resume=True, steps=STEPS + 3))
    assert result.step == STEPS + 3
    assert [r["step"] for r in _train_lines(longer)] == list(range(1, STEPS + 4))


@pytest.mark.parametrize("change, match", [
    ({}, "already finished"),
    ({"stop_at": 4, "steps": 20}, "not after the checkpoint's step"),
    ({"seed": 7}, "differs from the resumed run's seed"),
    ({"overrides": {"d_model": 64}}, "shape cannot change"),
    ({"preset": "8gb"}, "differs from the resumed run's preset"),
])
def test_resume_misuse_is_refused_without_writing(full_run, small_corpus, change, match):
    full, overrides = full_run
    before = {p.name: p.stat().st_mtime_ns for p in full.iterdir()}
    change = dict(change)
    overrides = {**overrides, **change.pop("overrides", {})}
    with pytest.raises(ConfigError, match=match):
        train(_options(small_corpus, full, overrides, resume=True, **change))
    assert {p.name: p.stat().st_mtime_ns for p in full.iterdir()} == before
