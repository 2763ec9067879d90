"""Measures each GPU preset at its full size on the current implementation: one micro-batch training
step (bf16 autocast, AdamW, activation checkpointing as the preset says), time, tokens/s and peak memory
(DESIGN.md: max_memory_reserved + CUDA context), next to `muse estimate`'s prediction.

Usage: PYTHONPATH=src python benchmarks/probe_presets.py [--out benchmarks/results/presets_reference.json]
Writes JSON with the GPU name, versions and commit. Gradient accumulation does not raise the peak
(the same activations per micro-batch), so one micro-batch step stands for the preset's step.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from muse_lm import MuseLM, get_preset
from muse_lm.presets import estimate_memory
from muse_lm.provenance import git_commit
from muse_lm.training.optim import build_optimizer

PRESETS = ("max_efficiency", "8gb", "10gb", "24gb", "max_quality")


def cuda_context_gib() -> float:
    free, total = torch.cuda.mem_get_info()
    return (total - free - torch.cuda.memory_reserved()) / 2**30


def probe(name: str, repeats: int = 2) -> dict:
    preset = get_preset(name)
    torch.manual_seed(0)
    model = MuseLM(preset.model).cuda()
    model.gradient_checkpointing = preset.train.activation_checkpointing
    model.check_ids = False
    opt = build_optimizer(model, preset.train, torch.device("cuda"))
    B, T = preset.train.micro_batch, preset.train.seq_len
    ids = torch.randint(0, preset.model.vocab_size, (B, T + 1), device="cuda")
    torch.cuda.reset_peak_memory_stats()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    loss = step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / repeats
    peak = torch.cuda.max_memory_reserved() / 2**30 + cuda_context_gib()
    est = estimate_memory(preset)
    out = {"preset": name, "micro_batch": B, "seq_len": T, "step_s": dt, "tokens_per_s": B * T / dt,
           "peak_gib": peak, "estimate_gib": est["peak_gib"], "budget_gib": preset.budget_gb,
           "params": est["params"], "loss": float(loss)}
    torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/presets_reference.json")
    args = ap.parse_args()
    commit = git_commit()
    rows = []
    for name in PRESETS:
        try:
            rows.append(probe(name))
        except torch.OutOfMemoryError as err:  # OOM is a result, not a crash
            rows.append({"preset": name, "oom": str(err).splitlines()[0]})
            torch.cuda.empty_cache()
        print(json.dumps(rows[-1]), flush=True)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": commit,
              "impl": "torch reference ops (no Triton kernels yet)", "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
