"""Each SSD chunk kernel alone under each of a wide list of launch configs, to choose the declared
`CONFIGS` from data: median ms (`do_bench`) of `_chunk_output_kernel`, `_chunk_dx_kernel` and
`_chunk_duv_kernel` at the mixer's shapes (bf16, 65536 tokens, 16 heads, P = R = 64, bf16 states), and the config the
autotuner picks from `CONFIGS`. A config that fails to compile for resources is recorded as such.

    PYTHONPATH=src python3 benchmarks/sweep_ssd_configs.py --t 2048,16384 --out $OUT/ssd_sweep.json
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

import muse_lm.ops.semiseparable.triton as k
from bench_mixer import FULL, _log_decays
from muse_lm.provenance import git_commit

TOKENS, HEADS, DIM, CHUNK = 65536, 16, 64, 64
CANDIDATES = [k.SSDConfig(bp, w, st) for bp, w, st in itertools.product((16, 32, 64), (4, 8), (1, 2, 3))]


def mixer_inputs(t: int, gen: torch.Generator) -> tuple:
    """(x, dy, u, v, log_a) at the mixer's shape, B = TOKENS // t: bf16 normals, log-decays as
    bench_mixer draws them (the AR-SSM layer's initialization; runs before 2026-11-27's last drew them from
    [-2, 0], where no state survives two chunks and the two-level fix-up skipped nearly every chunk)."""
    b = TOKENS // t
    x, dy = torch.randn(2, b, t, HEADS, DIM, device="cuda", generator=gen).bfloat16()
    u, v = torch.randn(2, b, t, HEADS, DIM, device="cuda", generator=gen).bfloat16()
    log_a = _log_decays(FULL, b, t, gen)
    return x, dy, u, v, log_a


def result_header() -> dict:
    """What every result file of the mixer-shape scripts starts with: device, versions, commit, shape."""
    return dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                commit=git_commit(), shape=dict(tokens=TOKENS, heads=HEADS, P=DIM, R=DIM, dtype="bf16"))


def _inputs(t: int):
    gen = torch.Generator(device="cuda").manual_seed(t)
    x, dy, u, v, log_a = mixer_inputs(t, gen)
    b, nc = x.shape[0], triton.cdiv(t, CHUNK)
    states, dstates = torch.randn(2, b, HEADS, nc, DIM, DIM, device="cuda", generator=gen).bfloat16()
    return (b, t, HEADS, DIM, DIM, nc), x, dy, u, v, log_a, states, dstates


def _launches(t: int) -> dict:
    shape, x, dy, u, v, log_a, st, dst = _inputs(t)
    y, dx, du, dv = (torch.empty_like(a) for a in (x, x, u, v))
    dla = torch.empty_like(log_a)
    meta = dict(C=CHUNK, RB=DIM, PREC="tf32", VARLEN=False, RAW=True, RAW_S=True)
    out = {
        "output": (k._chunk_output_kernel, k._chunk_output_tuned, (x, u, v, log_a, st, y, st), meta),
        "dx": (k._chunk_dx_kernel, k._chunk_dx_tuned, (u, v, log_a, dst, dy, dx, st), meta),
        "duv": (k._chunk_duv_kernel, k._chunk_duv_tuned, (x, u, v, log_a, st, dst, dy, du, dv, dla, st), meta),
    }
    return shape, out


def _time(kernel, tuned, shape, cfg, args, meta) -> float:
    """Median ms of one launch with `cfg` (None: the autotuner over CONFIGS), after one untimed run."""

    def fn():
        k._launch_chunks(kernel, tuned, shape, cfg, args, **meta)

    fn()
    return do_bench(fn, warmup=5, rep=25, return_mode="median")


def sweep(t: int) -> dict:
    shape, launches = _launches(t)
    res = {}
    for name, (kernel, tuned, args, meta) in launches.items():
        rows = {}
        for cfg in CANDIDATES:
            try:
                rows[repr(cfg)] = _time(kernel, tuned, shape, cfg, args, meta)
            except triton.runtime.errors.OutOfResources as err:
                rows[repr(cfg)] = f"out of resources: {err}"
        timed = {c: ms for c, ms in rows.items() if isinstance(ms, float)}
        entry = dict(configs_ms=rows, best=min(timed, key=timed.get), best_ms=min(timed.values()))
        if tuned is not None:
            entry["autotuned_ms"] = _time(kernel, tuned, shape, None, args, meta)
            entry["autotuned_config"] = str(getattr(tuned, "best_config", None))
        res[name] = entry
        print(t, name, entry["best"], round(entry["best_ms"], 4), entry.get("autotuned_ms"),
              entry.get("autotuned_config"), flush=True)
    return res


def run_lengths(description: str, default_name: str, measure) -> None:
    """The mixer-shape scripts' main: `--t` lengths and `--out` path (default results/`default_name`);
    result_header() plus runs["T<t>"] = measure(t), the JSON rewritten after every length."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--t", default="2048,16384")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / default_name)
    args = ap.parse_args()
    res = dict(result_header(), runs={})
    for t in (int(v) for v in args.t.split(",")):
        res["runs"][f"T{t}"] = measure(t)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))


def main() -> None:
    run_lengths(__doc__.splitlines()[0], "ssd_sweep.json", sweep)


if __name__ == "__main__":
    main()
