"""Speed and memory at model level (`muse bench --only model,memory`).

`model`: full training steps (forward, backward, fused AdamW; bf16 autocast on CUDA) of MuseLM and
TransformerLM baselines at T in {1024 ... 16384} with the same tokens per step (B = tokens / T):
tokens/s (median of CUDA-event-timed steps after warm-up), peak memory (DESIGN.md: the steady
steps' max_memory_reserved + the CUDA context, measured on the same steps as the speed) and a
log-log fit of time per token against T. OOM is a recorded result.

`memory`: every training preset at full size runs real `Trainer` steps (activation checkpointing,
micro-batch, accumulation and dtype as the preset says); its peak is checked against 0.9 x budget
and against `muse estimate`. The inference preset is measured on generation.

Both parts rewrite `<out>/<part>.json` (`"complete": false`) after every measurement, so a run cut
short still leaves its results; `python -m muse_lm.bench_speed --readme README.md` puts the
tables of benchmarks/results/{model,memory}.json into the README.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from muse_lm.bench_quality import BenchPart, register_part
from muse_lm.bench_speed.common import (
    LENGTHS,
    MAX_SECONDS,
    MEMORY_PRESETS,
    MODELS,
    QUICK_LENGTHS,
    QUICK_MODELS,
    DynamicCompiler,
    MemorySettings,
    ModelBenchSettings,
    equal_total_transformer_config,
    race_heads,
)
from muse_lm.bench_speed.memory_part import run_memory_part
from muse_lm.bench_speed.model_part import criteria, loglog_fit, model_configs, run_model_part, train_step
from muse_lm.bench_speed.report import plot_memory, plot_model, report_memory, report_model, update_readme
from muse_lm.errors import ConfigError
from muse_lm.presets import get_preset
from muse_lm.training.options import apply_overrides, parse_set_args

__all__ = [
    "MEMORY_PRESETS", "MODELS", "DynamicCompiler", "MemorySettings", "ModelBenchSettings", "criteria",
    "equal_total_transformer_config", "loglog_fit", "main", "race_heads", "run_memory_part", "run_model_part",
    "train_step", "update_readme",
]


# ---- registration ------------------------------------------------------------------------------
def _out(args: argparse.Namespace) -> Path | None:
    return Path(args.out) if args.out else None


def plan_model(args: argparse.Namespace) -> ModelBenchSettings:
    quick = getattr(args, "quick", False)
    settings = ModelBenchSettings(
        preset=args.preset, lengths=QUICK_LENGTHS if quick else LENGTHS, warmup_steps=2 if quick else 3,
        timed_steps=5 if quick else 10, models=QUICK_MODELS if quick else tuple(MODELS),
        max_seconds=args.max_seconds or MAX_SECONDS, device=args.device, compile=args.compile,
        cuda_graph=getattr(args, "cuda_graph", "off"), seed=args.seed,
        overrides=parse_set_args(args.sets), out=_out(args))
    model_configs(settings)  # shape mistakes are reported before anything runs
    return settings


def plan_memory(args: argparse.Namespace) -> MemorySettings:
    settings = MemorySettings(steps=1 if getattr(args, "quick", False) else 2, max_seconds=args.max_seconds or
                              MAX_SECONDS, device=args.device, seed=args.seed, overrides=parse_set_args(args.sets),
                              out=_out(args))
    for name in (*settings.presets, "inference"):
        preset = get_preset(name)
        apply_overrides(preset.model, preset.train, settings.overrides)
    return settings


register_part(BenchPart("model", plan_model, run_model_part, plot_model, report_model))
register_part(BenchPart("memory", plan_memory, run_memory_part, plot_memory, report_memory))


def main(argv: list[str] | None = None) -> int:
    """`python -m muse_lm.bench_speed --readme README.md [--results benchmarks/results]`."""
    parser = argparse.ArgumentParser(prog="python -m muse_lm.bench_speed", description=update_readme.__doc__)
    parser.add_argument("--readme", required=True, type=Path)
    parser.add_argument("--results", default=Path("benchmarks/results"), type=Path)
    args = parser.parse_args(argv)
    try:
        parts = update_readme(args.readme, args.results)
    except ConfigError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    print(f"{args.readme}: updated {', '.join(parts) or 'nothing (no model.json / memory.json)'}")
    return 0
