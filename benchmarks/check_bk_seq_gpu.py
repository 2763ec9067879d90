"""BK resolvent on one GPU: the sequential kernels (`bk_seq_triton.py`) vs the scan kernels (`bk_triton.py`).

Shapes (B, T, K): (16, 8192, 512) (the bandwidth benchmark), K 128/64/32 (where the dispatch's
crossover, `prefers_seq`, lies) and (16, 1024, 4) (the model). For each shape:
both pairs (autotuned) against each other (max |err| / max |other|), then median ms (`do_bench`) of
the forward and of the backward of both, and a device copy moving the same bytes in the same run
(forward: v read + G written = 12 B/token; backward: G and grad G read + grad v written = 20 B/token),
so `of_copy` = copy ms / kernel ms is the fraction of the measured copy bandwidth. Writes one JSON
object with the GPU name, versions and git commit.

    PYTHONPATH=src python3 benchmarks/check_bk_seq_gpu.py --out $OUT/bk_seq.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from muse_lm.ops.scan.bk_seq_triton import bk_resolvent_backward_seq, bk_resolvent_forward_seq, plan_segments
from muse_lm.ops.scan.bk_triton import bk_resolvent_backward, bk_resolvent_forward
from muse_lm.provenance import git_commit

SHAPES = [(16, 8192, 512), (16, 8192, 128), (16, 8192, 64), (16, 8192, 32), (16, 1024, 4)]
Z = [0.3 + 0.05j, -1.2 + 0.7j, 2.0 + 0.2j, 1.0 + 1.0j]
TOL = 1e-4
BYTES_PER_TOKEN = {"fwd": 4 + 8, "bwd": 8 + 8 + 4}
PAIRS = {
    "seq": (bk_resolvent_forward_seq, bk_resolvent_backward_seq),
    "scan": (bk_resolvent_forward, bk_resolvent_backward),
}


def _rel(a, b) -> float:
    a = a.to(torch.complex128) if a.is_complex() else a.double()
    b = b.to(torch.complex128) if b.is_complex() else b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _problem(b, t, k, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    v = 1.5 * torch.randn(b, t, k, device="cuda", generator=gen)
    z = torch.tensor([Z[i % len(Z)] for i in range(k)], dtype=torch.complex64, device="cuda")
    grad_g = torch.randn(b, t, k, device="cuda", generator=gen, dtype=torch.complex64)
    return v, z, grad_g


def check(b, t, k) -> dict:
    """Both pairs, autotuned, against each other: the scan pair is the reference here (it is checked
    against fp64 by check_bk_gpu.py)."""
    v, z, grad_g = _problem(b, t, k)
    out = {}
    for name, (fwd, bwd) in PAIRS.items():
        g = fwd(v, z)
        out[name] = (g, *bwd(g, grad_g, v.dtype))
    seq, scan = out["seq"], out["scan"]
    errs = dict(g=_rel(seq[0], scan[0]), grad_v=_rel(seq[1], scan[1]), grad_z=_rel(seq[2], scan[2]))
    finite = all(bool(torch.isfinite(torch.view_as_real(x) if x.is_complex() else x).all()) for x in seq)
    return dict(rel_err_seq_vs_scan=errs, finite=finite, ok=finite and all(e <= TOL for e in errs.values()))


def _copy_ms(nbytes: int) -> float:
    """Median ms of a device copy that reads and writes nbytes / 2 each (the same bytes moved)."""
    src = torch.empty(nbytes // 8, device="cuda")
    dst = torch.empty_like(src)
    return do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")


def time_shape(b, t, k) -> dict:
    v, z, grad_g = _problem(b, t, k, seed=1)
    tokens = b * t * k
    copy = {mode: _copy_ms(tokens * n) for mode, n in BYTES_PER_TOKEN.items()}
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = dict(copy_ms=copy, nseg_seg=plan_segments(b, k, t, sms))
    for name, (fwd, bwd) in PAIRS.items():
        g = fwd(v, z)
        ms = dict(
            fwd=do_bench(lambda fwd=fwd: fwd(v, z), warmup=10, rep=100, return_mode="median"),
            bwd=do_bench(lambda bwd=bwd, g=g: bwd(g, grad_g, v.dtype), warmup=10, rep=100, return_mode="median"),
        )
        out[name] = {
            mode: dict(ms=ms[mode], gb_s=tokens * BYTES_PER_TOKEN[mode] / ms[mode] / 1e6, of_copy=copy[mode] / ms[mode])
            for mode in ms
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bk_seq.json"))
    args = parser.parse_args()
    start = time.time()
    result = dict(
        gpu=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        commit=git_commit(),
        tolerance=TOL,
        bytes_per_token=BYTES_PER_TOKEN,
        checks={},
        timings={},
    )
    for b, t, k in SHAPES:
        key = f"B{b}-T{t}-K{k}"
        result["checks"][key] = check(b, t, k)
        print(key, json.dumps(result["checks"][key]), flush=True)
    result["all_ok"] = all(r["ok"] for r in result["checks"].values())
    for b, t, k in SHAPES:
        key = f"B{b}-T{t}-K{k}"
        result["timings"][key] = time_shape(b, t, k)
        print(key, json.dumps(result["timings"][key]), flush=True)
    result["wall_s"] = time.time() - start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"all_ok={result['all_ok']} wall {result['wall_s']:.0f}s -> {args.out}")


if __name__ == "__main__":
    main()
