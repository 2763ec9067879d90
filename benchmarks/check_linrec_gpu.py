"""linear_recurrence on one GPU: the Triton kernel vs the torch reference, correctness then timing.

Shapes (B, T, D): (8, 4096, 1024) (a training batch, many channels) and (1, 1_000_000, 64) (one long
sequence, few channels); fp32, a uniform in [-1.1, 1.1] with 5% exact zeros, an initial state.
For each shape: h and the gradients of a, b and initial from the autotuned kernel and from every
declared config, forward and reverse, against the fp64 reference (max |err| / max |ref|); then median
ms (`do_bench`) of the forward and of forward+backward for the autotuned kernel, every config, the fp32
torch reference and a torch.compile'd cumprod/cumsum closed form (h = P * cumsum(b / P), P = cumprod(a):
the usual "fast" baseline, which divides by vanishing products, so its error is reported too), with
the effective bandwidth (forward: a, b read, h written; backward: a, dh, h read, da, db written) next
to the copy bandwidth measured in the same run. Last, the forward's bandwidth at the issue's target
size, 64k channels x T 8192 (B 8, D 8192), checked on a slice of channels. Writes one JSON object.

    PYTHONPATH=src python3 benchmarks/check_linrec_gpu.py --out $OUT/linrec.json [--no-compile]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from muse_lm.ops.scan.linrec_triton import CONFIGS, linear_recurrence_forward, linear_recurrence_triton
from muse_lm.ops.scan.reference import linear_recurrence_reference
from muse_lm.provenance import git_commit

SHAPES = [(8, 4096, 1024), (1, 1_000_000, 64)]
TARGET = (8, 8192, 8192)  # 64k channels x T 8192: the bandwidth criterion (80% of copy)
TOL = 1e-4
DEVICE = "cuda"


def _rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _problem(b, t, d, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    a = 2.2 * torch.rand(b, t, d, device=DEVICE, generator=gen) - 1.1
    a = torch.where(torch.rand(b, t, d, device=DEVICE, generator=gen) < 0.05, 0.0, a)
    x, grad_h = torch.randn(2, b, t, d, device=DEVICE, generator=gen)
    initial = torch.randn(b, d, device=DEVICE, generator=gen)
    return a, x, initial, grad_h


def _grads(fn, a, b, initial, grad_h, dtype):
    """(h, da, db, dinitial) of fn(a, b, initial) with the leaves in `dtype`."""
    leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (a, b, initial)]
    h = fn(*leaves)
    return (h.detach(), *torch.autograd.grad(h, leaves, grad_h.to(dtype)))


def check(b, t, d) -> dict:
    a, x, initial, grad_h = _problem(b, t, d)
    rows = {}
    for reverse in (False, True):
        ref = _grads(lambda a, b, i: linear_recurrence_reference(a, b, reverse=reverse, initial=i),  # noqa: B023
                     a, x, initial, grad_h, torch.float64)
        for name, cfg in [("autotuned", None)] + [(repr(c), c) for c in CONFIGS]:
            got = _grads(lambda a, b, i: linear_recurrence_triton(a, b, reverse=reverse, initial=i, config=cfg),  # noqa: B023
                         a, x, initial, grad_h, torch.float32)
            errs = {k: _rel(g, r) for k, g, r in zip(("h", "da", "db", "dinitial"), got, ref)}
            finite = all(bool(torch.isfinite(g).all()) for g in got)
            ok = finite and all(e <= TOL for e in errs.values())
            rows[f"{name} {'rev' if reverse else 'fwd'}"] = dict(rel_err=errs, finite=finite, ok=ok)
        # The fp32 torch reference, for scale: how far the path the kernel replaces is from fp64.
        ref32 = _grads(lambda a, b, i: linear_recurrence_reference(a, b, reverse=reverse, initial=i),  # noqa: B023
                       a, x, initial, grad_h, torch.float32)
        rows[f"torch_fp32_reference {'rev' if reverse else 'fwd'}"] = dict(
            rel_err={k: _rel(g, r) for k, g, r in zip(("h", "da", "db", "dinitial"), ref32, ref)}
        )
    return rows


def _closed_form(a, b):
    """h = P_t * sum_{s<=t} b_s / P_s with P = cumprod(a): exact in real numbers, not in floats."""
    prod = torch.cumprod(a, 1)
    return prod * torch.cumsum(b / prod, 1)


def _fwd_bwd(fn, a, b, grad_h):
    ag, bg = a.clone().requires_grad_(), b.clone().requires_grad_()

    def step():
        torch.autograd.grad(fn(ag, bg), (ag, bg), grad_h)

    return step


def time_shape(b, t, d, compiled) -> dict:
    a, x, _, grad_h = _problem(b, t, d, seed=1)
    fwd_bytes = 3 * a.numel() * a.element_size()
    fwd_bwd_bytes = fwd_bytes + 5 * a.numel() * a.element_size()
    out = {}

    def record(name, fwd, fn):
        step = _fwd_bwd(fn, a, x, grad_h)
        fwd(), step()  # autotune / compile before timing
        fwd_ms = do_bench(fwd, warmup=5, rep=40, return_mode="median")
        both_ms = do_bench(step, warmup=5, rep=40, return_mode="median")
        out[name] = dict(fwd_ms=fwd_ms, fwd_bwd_ms=both_ms, fwd_gb_s=fwd_bytes / fwd_ms / 1e6,
                         fwd_bwd_gb_s=fwd_bwd_bytes / both_ms / 1e6)

    record("autotuned", lambda: linear_recurrence_forward(a, x), linear_recurrence_triton)
    for cfg in CONFIGS:
        record(repr(cfg), lambda cfg=cfg: linear_recurrence_forward(a, x, config=cfg),
               lambda p, q, cfg=cfg: linear_recurrence_triton(p, q, config=cfg))
    record("torch_reference_fp32", lambda: linear_recurrence_reference(a, x), linear_recurrence_reference)
    ref = out["torch_reference_fp32"]
    out["speedup_autotuned_vs_reference"] = dict(
        fwd=ref["fwd_ms"] / out["autotuned"]["fwd_ms"], fwd_bwd=ref["fwd_bwd_ms"] / out["autotuned"]["fwd_bwd_ms"]
    )
    if compiled is not None:
        start = time.time()
        compiled(a, x)  # compile outside the timing
        record("compiled_cumsum_closed_form", lambda: compiled(a, x), compiled)
        err = _rel(compiled(a, x), linear_recurrence_reference(a.double(), x.double()))
        # Products of |a| < 1 underflow, then b / 0: NaN or inf, written as null (strict JSON).
        out["compiled_cumsum_closed_form"]["rel_err_h"] = err if math.isfinite(err) else None
        out["compiled_cumsum_closed_form"]["with_compile_s"] = time.time() - start
        base = out["compiled_cumsum_closed_form"]
        out["speedup_autotuned_vs_compiled"] = dict(
            fwd=base["fwd_ms"] / out["autotuned"]["fwd_ms"], fwd_bwd=base["fwd_bwd_ms"] / out["autotuned"]["fwd_bwd_ms"]
        )
    return out


def target_bandwidth(copy_gb_s: float) -> dict:
    """Forward of the autotuned kernel at 64k channels x T 8192 (6 GB moved), checked on 64 channels."""
    b, t, d = TARGET
    a, x, _, _ = _problem(b, t, d, seed=2)
    h = linear_recurrence_forward(a, x)
    err = _rel(h[:1, :, :64], linear_recurrence_reference(a[:1, :, :64].double(), x[:1, :, :64].double()))
    ms = do_bench(lambda: linear_recurrence_forward(a, x, out=h), warmup=5, rep=100, return_mode="median")
    gb_s = 3 * a.numel() * a.element_size() / ms / 1e6
    return dict(shape=TARGET, fwd_ms=ms, fwd_gb_s=gb_s, fraction_of_copy=gb_s / copy_gb_s, rel_err_h_slice=err,
                ok=err <= TOL)


def _copy_gb_s(nbytes: int = 1 << 30) -> float:
    x = torch.empty(nbytes // 4, device=DEVICE)
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=5, rep=40, return_mode="median")
    return 2 * nbytes / ms / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "linrec.json"))
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd cumsum baseline")
    args = parser.parse_args()
    start = time.time()
    copy = _copy_gb_s()
    result = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  commit=git_commit(), tolerance=TOL, copy_gb_s=copy, checks={}, timings={})
    for b, t, d in SHAPES:
        key = f"B{b}-T{t}-D{d}"
        result["checks"][key] = check(b, t, d)
        print(key, json.dumps({n: r["rel_err"] for n, r in result["checks"][key].items()}), flush=True)
        torch.cuda.empty_cache()
    compiled = None if args.no_compile else torch.compile(_closed_form)
    for b, t, d in SHAPES:
        key = f"B{b}-T{t}-D{d}"
        result["timings"][key] = time_shape(b, t, d, compiled)
        print(key, json.dumps(result["timings"][key]), flush=True)
        torch.cuda.empty_cache()
    result["target_bandwidth"] = target_bandwidth(copy)
    print("target", json.dumps(result["target_bandwidth"]), flush=True)
    result["all_ok"] = result["target_bandwidth"]["ok"] and all(
        r.get("ok", True) for rows in result["checks"].values() for r in rows.values()
    )
    result["wall_s"] = time.time() - start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"all_ok={result['all_ok']} wall {result['wall_s']:.0f}s -> {args.out}")


if __name__ == "__main__":
    main()
