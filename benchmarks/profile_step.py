"""Where a training step's GPU time goes: torch.profiler over a few MuseLM (and TransformerLM)
training steps of the bench_model setup (bf16 autocast, fused AdamW), kernels grouped by name.

    PYTHONPATH=src python benchmarks/profile_step.py --preset 8gb --seq-len 1024 --tokens 16384 --out DIR

Writes DIR/profile_step.json (per model: step time, the peak memory allocated over the timed steps,
the top kernels by total CUDA time, and the share of the step each takes) and prints the tables. A
diagnostic, not a result: the numbers a user decides by come from bench_model.py.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from muse_lm.bench_quality import matched_transformer_config
from muse_lm.bench_speed.common import build_transformer
from muse_lm.bench_speed.graphed import GraphedStep, make_capturable
from muse_lm.bench_speed.model_part import train_step
from muse_lm.models import MuseLM
from muse_lm.presets import get_preset
from muse_lm.training.config import TrainConfig
from muse_lm.training.optim import build_optimizer


def _timed(step, n: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def _profile(name: str, model, train: TrainConfig, seq_len: int, tokens: int, top: int, compiled: bool,
             cprofile: bool = False, graphed: bool = False) -> dict:
    device = torch.device("cuda")
    model = model.to(device)
    model.check_ids = False  # a host sync per step; the ids are in range by construction
    if compiled:
        model.forward = torch.compile(model.forward)
    opt = build_optimizer(model, train, device)
    if graphed:
        make_capturable(opt)
    batch = max(1, tokens // seq_len)
    data = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1), device=device)

    def step() -> None:
        train_step(model, opt, data[:, :-1], data[:, 1:], device)

    for _ in range(3):
        step()
    if graphed:
        step = GraphedStep(step, warmup=1)
    torch.cuda.reset_peak_memory_stats()
    step_s = _timed(step, 5)
    # What the timed steps held at most: the captured graph's pool included (it is the step's memory).
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        cuda_us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if cuda_us > 0 and ev.key and not ev.key.startswith("ProfilerStep"):
            rows.append({"kernel": ev.key[:140], "calls": ev.count // 3, "ms_per_step": cuda_us / 3 / 1e3})
    rows.sort(key=lambda r: -r["ms_per_step"])
    host = _host_profile(step, top) if cprofile else None
    total = sum(r["ms_per_step"] for r in rows)
    for r in rows:
        r["share"] = r["ms_per_step"] / total if total else 0.0
    print(f"\n== {name}: step {step_s * 1e3:.1f} ms, {batch * seq_len / step_s:,.0f} tokens/s, "
          f"peak allocated {peak_gib:.2f} GiB; "
          f"kernel time {total:.1f} ms/step over {sum(r['calls'] for r in rows)} launches")
    for r in rows[:top]:
        print(f"{r['ms_per_step']:8.3f} ms {r['share']*100:5.1f}% x{r['calls']:<5d} {r['kernel']}")
    model.cpu()
    torch.cuda.empty_cache()
    return {"step_s": step_s, "tokens_per_s": batch * seq_len / step_s, "peak_allocated_gib": peak_gib,
            "kernel_ms_per_step": total,
            "launches_per_step": sum(r["calls"] for r in rows), "kernels": rows[:top], "host": host}


def _host_profile(step, top: int, n: int = 3) -> str:
    """cProfile of n steps (host side): where the Python/launch time goes when the GPU waits on it.
    A host sync shows up as time inside the call that makes it."""
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    print(buf.getvalue())
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="8gb")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--top", type=int, default=45)
    ap.add_argument("--models", default="muse,transformer")
    ap.add_argument("--compile", choices=("off", "on", "both"), default="off",
                    help="torch.compile each model's forward (both: profile eager and compiled)")
    ap.add_argument("--cuda-graph", action="store_true", help="time and profile the step as a replayed CUDA graph")
    ap.add_argument("--cprofile", action="store_true", help="also cProfile the host side of a few steps")
    ap.add_argument("--out", default="/tmp")
    args = ap.parse_args()
    preset = get_preset(args.preset)
    torch.manual_seed(0)
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "preset": args.preset,
           "seq_len": args.seq_len, "tokens": args.tokens}
    modes = {"off": (False,), "on": (True,), "both": (False, True)}[args.compile]
    for name in args.models.split(","):
        for compiled in modes:
            torch.compiler.reset()
            if name == "muse":
                model = MuseLM(preset.model)
            else:
                model = build_transformer(matched_transformer_config(preset.model), "linear_cross_entropy")
            key = (f"{name}_compiled" if compiled else name) + ("_graphed" if args.cuda_graph else "")
            out[key] = _profile(key, model, preset.train, args.seq_len, args.tokens, args.top, compiled,
                                 args.cprofile, args.cuda_graph)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "profile_step.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
