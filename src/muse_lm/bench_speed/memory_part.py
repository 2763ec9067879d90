"""The `memory` part: each preset at full size, real Trainer steps, peak against its budget and
against `muse estimate`; the inference preset on generation."""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time

import numpy as np
import torch

from muse_lm.bench_quality import (
    _fmt,
    environment,
)
from muse_lm.bench_speed.common import (
    MemorySettings,
    PartialWriter,
    _oom_text,
    _sync,
    free_device,
    measured_memory,
    time_steps,
)
from muse_lm.layers import convert_to_lns
from muse_lm.models import MuseLM
from muse_lm.presets import estimate_memory, get_preset
from muse_lm.training.distributed import DistInfo
from muse_lm.training.options import apply_overrides
from muse_lm.training.rng import seed_everything
from muse_lm.training.run import resolve_device
from muse_lm.training.trainer import Trainer

log = logging.getLogger("muse_lm")



# ---- the `memory` part -------------------------------------------------------------------------
def _random_stream(vocab: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=size, dtype=np.int64)


def _checks(row: dict, budget: float | None, estimate: float | None) -> None:
    peak = row.get("peak_gib")
    row["limit_gib"] = None if budget is None else 0.9 * budget
    row["fits"] = None if peak is None or budget is None else peak <= 0.9 * budget
    row["estimate_error"] = None if peak is None or estimate is None else estimate / peak - 1
    row["estimate_within_10pct"] = None if row["estimate_error"] is None else abs(row["estimate_error"]) <= 0.10


def measure_training_preset(name: str, settings: MemorySettings, device: torch.device) -> dict:
    """`settings.steps` real Trainer steps of preset `name` at its configured size (plus overrides)."""
    preset = get_preset(name)
    model_cfg, train = apply_overrides(preset.model, preset.train, settings.overrides)
    train = dataclasses.replace(train, steps=settings.steps, warmup_steps=min(train.warmup_steps, settings.steps))
    estimate = estimate_memory(dataclasses.replace(preset, model=model_cfg, train=train))
    row = {"preset": name, "kind": "training", "seq_len": train.seq_len, "micro_batch": train.micro_batch,
           "grad_accum": train.grad_accum, "activation_checkpointing": train.activation_checkpointing,
           "dtype": train.dtype, "params": estimate["params"], "budget_gib": preset.budget_gb,
           "estimate_gib": estimate["peak_gib"], "steps": settings.steps}
    per_step = train.micro_batch * train.grad_accum * (train.seq_len + 1)
    stream = _random_stream(model_cfg.vocab_size, per_step * settings.steps + 1, settings.seed)
    free_device(device)
    seed_everything(settings.seed)
    trainer = model = None
    try:
        with tempfile.TemporaryDirectory(prefix=f"muse-memory-{name}-") as tmp:
            model = MuseLM(model_cfg)
            if train.lns:  # as `muse train`: 8-bit LNS FFN weights, trained straight-through
                convert_to_lns(model, "ffn", trainable=True)
            trainer = Trainer(model, train, train_tokens=stream, heldout_tokens=stream[:train.seq_len + 1],
                              run_dir=tmp, tokenizer_json="{}", run_config={"bench": "memory"}, seed=settings.seed,
                              device=device, progress=False)
            times = time_steps(trainer.train_step, settings.steps, device)
            row.update(step_s=times, tokens_per_s=train.tokens_per_step / times[-1], **measured_memory(device))
    except torch.OutOfMemoryError as err:
        row["oom"] = _oom_text(err)
    del trainer, model  # outside the except: nothing pins the model, optimizer state or activations now
    free_device(device)
    _checks(row, preset.budget_gb, estimate["peak_gib"])
    return row


def measure_inference(settings: MemorySettings, device: torch.device) -> dict:
    """The inference preset on generation: one prompt of the preset's seq_len, then `new_tokens`
    decoded from the recurrent state; FFN weights as 8-bit LNS codes when the preset says LNS
    (`convert_to_lns`, inference form), the rest fp32 as `muse generate` loads it."""
    preset = get_preset("inference")
    model_cfg, train = apply_overrides(preset.model, preset.train, settings.overrides)
    row = {"preset": "inference", "kind": "generation", "seq_len": train.seq_len, "batch": 1,
           "new_tokens": settings.new_tokens, "budget_gib": preset.budget_gb, "estimate_gib": None,
           "lns": "ffn" if train.lns else None}
    free_device(device)
    seed_everything(settings.seed)
    model = prompt = out = None
    try:
        model = MuseLM(model_cfg)
        if train.lns:
            convert_to_lns(model, "ffn")
        model = model.to(device).eval()
        row["params"] = model.num_parameters()
        prompt = torch.from_numpy(_random_stream(model_cfg.vocab_size, train.seq_len, settings.seed))[None].to(device)
        t0 = time.perf_counter()
        out = model.generate(prompt, settings.new_tokens, seed=settings.seed)
        _sync(device)
        row.update(generate_s=time.perf_counter() - t0, generated=out.shape[1] - train.seq_len,
                   **measured_memory(device))
    except torch.OutOfMemoryError as err:
        row["oom"] = _oom_text(err)
    del model, prompt, out
    free_device(device)
    _checks(row, preset.budget_gb, None)
    return row


def run_memory_part(settings: MemorySettings) -> dict:
    """The `memory` part (see the module docstring); returns its JSON record."""
    start = time.perf_counter()
    device = resolve_device(settings.device, DistInfo())
    record = {"part": "memory", "schema": 1, "complete": False, "environment": environment(device),
              "settings": {**dataclasses.asdict(settings), "out": None if settings.out is None else str(settings.out)},
              "full_size": not settings.overrides, "rows": []}
    writer = PartialWriter(settings.out, "memory")
    jobs = [(name, lambda name=name: measure_training_preset(name, settings, device)) for name in settings.presets]
    if settings.inference:
        jobs.append(("inference", lambda: measure_inference(settings, device)))
    for name, job in jobs:
        if time.perf_counter() - start > settings.max_seconds:
            row = {"preset": name, "skipped": f"the part's time cap ({settings.max_seconds:.0f} s) was spent"}
        else:
            row = job()
        record["rows"].append(row)
        log.info("memory %s: peak %s GiB (estimate %s, limit %s)%s", name, _fmt(row.get("peak_gib"), ".2f"),
                 _fmt(row.get("estimate_gib"), ".2f"), _fmt(row.get("limit_gib"), ".1f"),
                 f" OOM: {row['oom']}" if "oom" in row else "")
        record["wall_s"] = time.perf_counter() - start
        writer.write(record)
    record.update(complete=True, wall_s=time.perf_counter() - start)
    return record


