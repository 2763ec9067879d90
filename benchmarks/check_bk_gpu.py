"""BK resolvent on one GPU: Triton kernels vs the torch reference, correctness then timing.

Shapes: (B, T, K) = (8, 1024, 4) (a training micro-batch) and (1, 65536, 4) (one long sequence),
fp32 potentials, z with Im z from 0.05 to 1. For each shape: G and both gradients of the autotuned
kernel and of every declared config against the fp64 reference (max |err| / max |ref|); then
median ms (`do_bench`) of the forward and of forward+backward for the autotuned kernel, every
config and the fp32 torch reference, and the forward's effective bandwidth (v read + G written).
Writes one JSON object with the GPU name, versions and git commit.

    PYTHONPATH=src python3 benchmarks/check_bk_gpu.py --out $OUT/bk.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from muse_lm.ops.scan.bk import bk_resolvent_reference
from muse_lm.ops.scan.bk_triton import CONFIGS, bk_resolvent_backward, bk_resolvent_forward, bk_resolvent_triton
from muse_lm.provenance import git_commit

SHAPES = [(8, 1024, 4), (1, 65536, 4)]
Z = [0.3 + 0.05j, -1.2 + 0.7j, 2.0 + 0.2j, 1.0 + 1.0j]
TOL = 1e-4




def _rel(a, b) -> float:
    a = a.to(torch.complex128) if a.is_complex() else a.double()
    b = b.to(torch.complex128) if b.is_complex() else b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _problem(b, t, k, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    v = 1.5 * torch.randn(b, t, k, device="cuda", generator=gen)
    z = torch.tensor(Z[:k], dtype=torch.complex64, device="cuda")
    grad_g = torch.randn(b, t, k, device="cuda", generator=gen, dtype=torch.complex64)
    return v, z, grad_g


def check(b, t, k) -> dict:
    v, z, grad_g = _problem(b, t, k)
    vd = v.double().requires_grad_()
    zd = z.to(torch.complex128).requires_grad_()
    g_ref = bk_resolvent_reference(vd, zd)
    dv_ref, dz_ref = torch.autograd.grad(g_ref, (vd, zd), grad_g.to(torch.complex128))
    rows = {}
    for name, cfg in [("autotuned", None)] + [(repr(c), c) for c in CONFIGS]:
        g = bk_resolvent_forward(v, z, cfg)
        dv, dz = bk_resolvent_backward(g, grad_g, v.dtype, cfg)
        errs = dict(g=_rel(g, g_ref), grad_v=_rel(dv, dv_ref), grad_z=_rel(dz, dz_ref))
        finite = bool(torch.isfinite(torch.view_as_real(g)).all() and torch.isfinite(dv).all())
        rows[name] = dict(rel_err=errs, finite=finite, ok=finite and all(e <= TOL for e in errs.values()))
    # The fp32 torch reference, for scale: how far the path it replaces is from fp64.
    g32 = bk_resolvent_reference(v, z)
    rows["torch_fp32_reference"] = dict(rel_err=dict(g=_rel(g32, g_ref)))
    return rows


def _fwd_bwd(fn, v, z, grad_g):
    vg = v.clone().requires_grad_()
    zg = z.clone().requires_grad_()

    def step():
        torch.autograd.grad(fn(vg, zg), (vg, zg), grad_g)

    return step


def time_shape(b, t, k) -> dict:
    v, z, grad_g = _problem(b, t, k, seed=1)
    moved = b * t * k * (v.element_size() + 8)  # v in, complex64 G out
    out = {}

    def record(name, fwd, step):
        ms = do_bench(fwd, warmup=5, rep=40, return_mode="median")
        out[name] = dict(
            fwd_ms=ms, fwd_bwd_ms=do_bench(step, warmup=5, rep=40, return_mode="median"), fwd_gb_s=moved / ms / 1e6
        )

    record(
        "autotuned", lambda: bk_resolvent_forward(v, z), _fwd_bwd(lambda a, c: bk_resolvent_triton(a, c), v, z, grad_g)
    )
    for cfg in CONFIGS:
        record(
            repr(cfg),
            lambda cfg=cfg: bk_resolvent_forward(v, z, cfg),
            _fwd_bwd(lambda a, c, cfg=cfg: bk_resolvent_triton(a, c, config=cfg), v, z, grad_g),
        )
    record("torch_reference_fp32", lambda: bk_resolvent_reference(v, z), _fwd_bwd(bk_resolvent_reference, v, z, grad_g))
    ref = out["torch_reference_fp32"]
    out["speedup_autotuned_vs_reference"] = dict(
        fwd=ref["fwd_ms"] / out["autotuned"]["fwd_ms"], fwd_bwd=ref["fwd_bwd_ms"] / out["autotuned"]["fwd_bwd_ms"]
    )
    return out


def _copy_gb_s(nbytes: int = 1 << 30) -> float:
    x = torch.empty(nbytes // 4, device="cuda")
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=5, rep=40, return_mode="median")
    return 2 * nbytes / ms / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bk.json"))
    args = parser.parse_args()
    start = time.time()
    result = dict(
        gpu=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        commit=git_commit(),
        tolerance=TOL,
        copy_gb_s=_copy_gb_s(),
        checks={},
        timings={},
    )
    for b, t, k in SHAPES:
        key = f"B{b}-T{t}-K{k}"
        result["checks"][key] = check(b, t, k)
        print(key, json.dumps({n: r["rel_err"] for n, r in result["checks"][key].items()}), flush=True)
    result["all_ok"] = all(r.get("ok", True) for rows in result["checks"].values() for r in rows.values())
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
