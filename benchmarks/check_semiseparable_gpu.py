"""Semiseparable (SSD) scan on one GPU: Triton kernels vs the torch reference, correctness then timing.

Shapes (B, T, H, P, R): (8, 1024, 12, 64, 32) (the 8gb preset's AR-SSM micro-batch) and
(1, 16384, 12, 64, 32) (one long sequence), chunk 64, log_a in [-2, 0]. For each shape and for bf16
and fp32 inputs: y, the final state and the gradients of x, u, v, log_a and the initial state, from
the autotuned kernel and from every declared config, against the fp64 reference (max |err| / max
|ref|); then the median ms (`do_bench`) of the forward and of forward+backward for the autotuned
kernel, every config (bf16) and the torch reference (its chunked form, fp32 math). Then (bf16, one
config, so few extra compiles): packed documents (cu_seqlens, lengths 1..70 over 16384 tokens) checked
against the fp64 reference with the unfused walk in one and two levels and timed against the same
tokens unpacked; B 1, T 65536, H 12 with the unfused two-level walk over chunk states vs the one-level
walk (the walk alone and the whole forward / forward+backward, checked against each other and the
fp64 reference); the one-token step kernel vs the torch step at B 1, 8, 64. Then, at the mixer shapes
(bf16, 65536 tokens, H 16, P = R = 64, T 2048 and 8192, or `--fused-t`; log_a in [-0.01, 0] so states
carry across chunks), each walk of FUSED_VARIANTS: y, the final state and every gradient against the
fp64 reference (and the fused walk with fp32 states against the unfused one, states included), the
median ms of the forward and of forward+backward (the default also with its products widened to
tf32), and the fused walk alone by group size. `--parts fused_states` runs that section alone. Writes
one JSON object with the GPU name, versions and git commit. Meant to finish in a few minutes on an
H100 (most of it compiling and autotuning).

    PYTHONPATH=src python3 benchmarks/check_semiseparable_gpu.py --out $OUT/ssd.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

import muse_lm.ops.semiseparable.triton as ssd_triton
from muse_lm.ops.semiseparable.fused_states import fused_chunk_states
from muse_lm.ops.semiseparable.reference import semiseparable_chunked, semiseparable_step_reference
from muse_lm.ops.semiseparable.state_pass import state_pass, use_two_levels
from muse_lm.ops.semiseparable.step_triton import semiseparable_step_forward
from muse_lm.ops.semiseparable.triton import (
    CONFIGS,
    default_config,
    semiseparable_backward,
    semiseparable_forward,
    semiseparable_triton,
)
from muse_lm.provenance import git_commit

SHAPES = [(8, 1024, 12, 64, 32), (1, 16384, 12, 64, 32)]
CHUNK = 64
TOL = {"bf16": 1e-2, "fp32": 1e-4}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
NAMES = ("y", "final", "x", "u", "v", "log_a", "initial_state")
LONG = (1, 65536, 12, 64, 32)  # B, T, H, P, R: the second level's regime
PACKED_TOKENS, PACKED_MAX_LEN = 16384, 70
STEP_BATCHES = (1, 8, 64)
# The mixer's shapes for the fused walk: 65536 tokens a step as (B, T), H 16, P = R = 64.
FUSED_TOKENS, FUSED_T, FUSED_HEADS, FUSED_DIM = 65536, (2048, 8192), 16, 64
# Fused vs unfused, bf16 data: the same products summed in another order. The fp32 states and final
# state agree to fp32 rounding (max |a - b| / max |b| <= 1e-4). A bf16 tensor may then round each
# element to the neighbouring bf16 value: one bf16 step is at most 2^-7 of the element, plus a floor of
# 1e-3 of the largest element for values near zero (cancellation). Checked element by element, so a
# real difference in one walk is not hidden by the largest element.
FP32_SAME_TOL, BF16_STEP, BF16_FLOOR = 1e-4, 2.0**-7, 1e-3


def _same_ratio(a, b) -> float:
    """Worst |a - b| over what rounding explains, for tensors of one dtype (<= 1 passes): fp32 tensors
    against FP32_SAME_TOL x max |b|; bf16 ones element by element against one bf16 step plus a floor."""
    if b.numel() == 0:
        return 0.0
    dtype = b.dtype
    a, b = a.double(), b.double()
    diff, top = (a - b).abs(), b.abs().max().clamp_min(1e-30)
    if dtype != torch.bfloat16:
        return (diff.max() / (FP32_SAME_TOL * top)).item()
    allowed = BF16_STEP * torch.maximum(a.abs(), b.abs()) + BF16_FLOOR * top
    return (diff / allowed).max().item()


def _rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _problem(b, t, h, p, r, dtype, seed=0, decay=2.0):
    """Inputs with log-decays uniform in [-decay, 0] per token."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x, dy = torch.randn(2, b, t, h, p, device="cuda", generator=gen)
    u, v = torch.randn(2, b, t, h, r, device="cuda", generator=gen)
    log_a = -decay * torch.rand(b, t, h, device="cuda", generator=gen)
    h0, dfinal = torch.randn(2, b, h, r, p, device="cuda", generator=gen)
    return x.to(dtype), u.to(dtype), v.to(dtype), log_a, h0, dy.to(dtype), dfinal


def check(shape, dtype_name) -> dict:
    x, u, v, log_a, h0, dy, dfinal = _problem(*shape, DTYPES[dtype_name])
    leaves = [t.double().requires_grad_() for t in (x, u, v, log_a, h0)]
    y_ref, f_ref = semiseparable_chunked(*leaves[:4], initial_state=leaves[4], output_final_state=True,
                                         chunk_size=CHUNK)
    loss = (y_ref * dy.double()).sum() + (f_ref * dfinal.double()).sum()
    want = (y_ref.detach(), f_ref.detach(), *torch.autograd.grad(loss, leaves))
    del leaves, y_ref, f_ref, loss
    rows = {}
    for name, cfg in [("autotuned", None)] + [(repr(c), c) for c in CONFIGS]:
        y, final, states = semiseparable_forward(x, u, v, log_a, h0, CHUNK, cfg)
        grads = semiseparable_backward(x, u, v, log_a, states, dy, dfinal, CHUNK, cfg)
        got = (y, final, *grads)
        errs = {n: _rel(g, w) for n, g, w in zip(NAMES, got, want)}
        finite = all(bool(torch.isfinite(g).all()) for g in got)
        rows[name] = dict(rel_err=errs, finite=finite, ok=finite and all(e <= TOL[dtype_name] for e in errs.values()))
        del y, final, states, grads, got
    return rows


def _fwd_bwd(fn, x, u, v, log_a, dy):
    leaves = [t.clone().requires_grad_() for t in (x, u, v, log_a)]

    def step():
        y = fn(*leaves)
        torch.autograd.grad(y, leaves, dy)

    return step


def time_shape(shape) -> dict:
    x, u, v, log_a, _, dy, _ = _problem(*shape, torch.bfloat16, seed=1)
    out = {}

    def record(name, fwd, fn):
        step = _fwd_bwd(fn, x, u, v, log_a, dy)
        fwd(), step()  # autotuning happens here, not inside do_bench's first (estimating) call
        out[name] = dict(
            fwd_ms=do_bench(fwd, warmup=5, rep=30, return_mode="median"),
            fwd_bwd_ms=do_bench(step, warmup=5, rep=30, return_mode="median"),
        )

    def kernel(cfg):
        return lambda *a: semiseparable_triton(*a, chunk_size=CHUNK, config=cfg)[0]

    record("autotuned", lambda: semiseparable_forward(x, u, v, log_a, None, CHUNK), kernel(None))
    for cfg in CONFIGS:
        record(repr(cfg), lambda cfg=cfg: semiseparable_forward(x, u, v, log_a, None, CHUNK, cfg), kernel(cfg))
    x32, u32, v32 = (t.float() for t in (x, u, v))
    record("autotuned_fp32_inputs", lambda: semiseparable_forward(x32, u32, v32, log_a, None, CHUNK),
           lambda *a: semiseparable_triton(*(t.float() for t in a[:3]), a[3], chunk_size=CHUNK)[0])

    def reference(*a):
        return semiseparable_chunked(*a, chunk_size=CHUNK)[0]

    record("torch_reference", lambda: reference(x, u, v, log_a), reference)
    ref, best = out["torch_reference"], out["autotuned"]
    out["speedup_autotuned_vs_reference"] = dict(
        fwd=ref["fwd_ms"] / best["fwd_ms"], fwd_bwd=ref["fwd_bwd_ms"] / best["fwd_bwd_ms"]
    )
    tokens = shape[0] * shape[1]
    out["autotuned_tokens_per_s_fwd_bwd"] = tokens / best["fwd_bwd_ms"] * 1e3
    return out


def _errors(got, want) -> dict:
    return {n: _rel(g, w) for n, g, w in zip(NAMES, got, want)}


def _fp64_reference(x, u, v, log_a, h0, dy, dfinal, cu_seqlens=None) -> tuple:
    leaves = [t.double().requires_grad_() for t in (x, u, v, log_a, h0)]
    y, f = semiseparable_chunked(*leaves[:4], initial_state=leaves[4], output_final_state=True,
                                 cu_seqlens=cu_seqlens, chunk_size=CHUNK)
    loss = (y * dy.double()).sum() + (f * dfinal.double()).sum()
    return (y.detach(), f.detach(), *torch.autograd.grad(loss, leaves))


def _bench_pair(fwd, bwd) -> dict:
    """Median ms of fwd() and of fwd()+bwd(fwd's result), after one untimed run of each."""
    bwd(fwd())
    return dict(fwd_ms=do_bench(fwd, warmup=5, rep=30, return_mode="median"),
                fwd_bwd_ms=do_bench(lambda: bwd(fwd()), warmup=5, rep=30, return_mode="median"))


def packed_documents() -> dict:
    """cu_seqlens: ~470 documents of 1..70 tokens in one row of 16384, H 12, P 64, R 32, bf16."""
    gen = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, PACKED_MAX_LEN + 1, (PACKED_TOKENS,), generator=gen)
    lengths = lengths[: int((lengths.cumsum(0) <= PACKED_TOKENS).sum())]
    lengths[-1] += PACKED_TOKENS - int(lengths.sum())
    cu = torch.tensor([0, *lengths.cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    n = len(lengths)
    _, _, h, p, r = LONG
    x, u, v, log_a, _, dy, _ = _problem(1, PACKED_TOKENS, h, p, r, torch.bfloat16, seed=4)
    h0, dfinal = torch.randn(2, n, h, r, p, device="cuda")
    want = _fp64_reference(x, u, v, log_a, h0, dy, dfinal, cu)
    cfg = default_config(p)
    out = dict(documents=n, config=repr(cfg), checks={}, timings={})
    for two in (False, True):
        walk = dict(cu_seqlens=cu, two_levels=two, fused_states=False)
        y, f, states = semiseparable_forward(x, u, v, log_a, h0, CHUNK, cfg, **walk)
        grads = semiseparable_backward(x, u, v, log_a, states, dy, dfinal, CHUNK, cfg, **walk)
        errs = _errors((y, f, *grads), want)
        out["checks"][f"two_levels={two}"] = dict(rel_err=errs, ok=all(e <= TOL["bf16"] for e in errs.values()))
    del want
    for name, kw in (("packed", dict(cu_seqlens=cu)), ("same_tokens_unpacked", {})):
        init = h0 if kw else None
        fwd = lambda kw=kw, init=init: semiseparable_forward(x, u, v, log_a, init, CHUNK, cfg, **kw)  # noqa: E731
        bwd = lambda res, kw=kw: semiseparable_backward(x, u, v, log_a, res[2], dy, None, CHUNK, cfg, **kw)  # noqa: E731
        out["timings"][name] = _bench_pair(fwd, bwd)
    return out


def second_level() -> dict:
    """B 1, T 65536, H 12: one-level vs two-level walk over chunk states (bf16 data, autotuned kernels)."""
    b, t, h, p, r = LONG
    x, u, v, log_a, h0, dy, dfinal = _problem(*LONG, torch.bfloat16, seed=5)
    nc = triton.cdiv(t, CHUNK)
    out = dict(shape=dict(B=b, T=t, H=h, P=p, R=r, chunks=nc), unfused_two_levels=use_two_levels(b * h, nc, r * p),
               checks={}, timings={})
    want = _fp64_reference(x, u, v, log_a, h0, dy, dfinal)
    got = {}
    for two in (False, True):
        y, f, states = semiseparable_forward(x, u, v, log_a, h0, CHUNK, two_levels=two, fused_states=False)
        grads = semiseparable_backward(x, u, v, log_a, states, dy, dfinal, CHUNK, two_levels=two, fused_states=False)
        got[two] = (y, f, *grads)
        errs = _errors(got[two], want)
        out["checks"][f"two_levels={two}"] = dict(rel_err=errs, ok=all(e <= TOL["bf16"] for e in errs.values()))
    out["checks"]["two_vs_one_level_rel"] = _errors(got[True], got[False])
    del want, got
    local = torch.randn(b, h, nc, r, p, device="cuda")
    g = -torch.rand(b * h, nc, device="cuda")
    for two in (False, True):
        walk = lambda two=two: state_pass(local.clone(), g, h0, b, h, None, reverse=False, two_levels=two)  # noqa: E731
        # The walk is in place, so each timed call walks a fresh copy; the copy is timed on its own.
        clone_ms = do_bench(lambda: local.clone(), warmup=5, rep=30, return_mode="median")
        walk_ms = do_bench(walk, warmup=5, rep=30, return_mode="median")
        kw = dict(two_levels=two, fused_states=False)
        fwd = lambda kw=kw: semiseparable_forward(x, u, v, log_a, None, CHUNK, **kw)  # noqa: E731
        bwd = lambda res, kw=kw: semiseparable_backward(x, u, v, log_a, res[2], dy, None, CHUNK, **kw)  # noqa: E731
        out["timings"][f"two_levels={two}"] = dict(
            state_walk_ms=max(walk_ms - clone_ms, 1e-6), state_walk_with_copy_ms=walk_ms, copy_ms=clone_ms,
            **_bench_pair(fwd, bwd),
        )
    one, two = out["timings"]["two_levels=False"], out["timings"]["two_levels=True"]
    out["speedup_two_levels"] = {k: one[k] / two[k] for k in ("state_walk_ms", "fwd_ms", "fwd_bwd_ms")}
    return out


# The variants checked and timed: the unfused walk (levels by its policy), the fused walk with fp32 states,
# and the fused walk saving bf16 states in one level and in two; "default" is the path with no argument
# (the policies'), timed also with the chunk kernels' dot products all widened to tf32 (RAW off).
FUSED_VARIANTS = {"unfused": dict(fused_states=False),
                  "fused": dict(fused_states=True, two_levels=False, compact_states=False),
                  "fused_compact": dict(fused_states=True, two_levels=False, compact_states=True),
                  "fused_compact_two_levels": dict(fused_states=True, two_levels=True, compact_states=True),
                  "default": {}}
WALK_GROUPS = (None, 4, 8, 16, 32, 64)
FUSED_DECAY = 0.01  # the fused walk alone: one level, then groups of G chunks


def _fused_walk_shape(b: int, t: int) -> dict:
    """One mixer shape, bf16: each of FUSED_VARIANTS checked against the fp64 reference (and the fused
    walk against the unfused one), then timed (forward, forward+backward; no initial state, as in the
    model)."""
    h, p = FUSED_HEADS, FUSED_DIM
    # Weak decay (e^-0.32 per 64-token chunk at most): states carry across chunks and groups, so the
    # walks' accuracy is what the checks see (with [-2, 0] per token no state survived a chunk).
    x, u, v, log_a, h0, dy, dfinal = _problem(b, t, h, p, p, torch.bfloat16, seed=t, decay=FUSED_DECAY)
    want = _fp64_reference(x, u, v, log_a, h0, dy, dfinal)
    got = {}
    for name, kw in FUSED_VARIANTS.items():
        fwd, bwd = _pair(kw, h0, dy, dfinal, x, u, v, log_a)
        res = fwd()
        got[name] = (*res[:2], *bwd(res), res[2])
    pairs = list(zip((*NAMES, "states"), got["fused"], got["unfused"]))
    same = {n: _rel(a, b_) for n, a, b_ in pairs}
    finite = all(bool(torch.isfinite(g).all()) for one in got.values() for g in one)
    ratio = {n: _same_ratio(a, b_) for n, a, b_ in pairs}
    close = all(r <= 1.0 for r in ratio.values())
    checks = dict(fused_vs_unfused=dict(rel_err=same, rounding_ratio=ratio, finite=finite, ok=finite and close))
    for name in FUSED_VARIANTS:
        errs = _errors(got[name][:-1], want)
        checks[name] = dict(rel_err=errs, ok=all(e <= TOL["bf16"] for e in errs.values()))
    del want, got
    timings = {}
    variants = [(name, kw, True) for name, kw in FUSED_VARIANTS.items()] + [("default_widened", {}, False)]
    for name, kw, raw in variants:
        fwd, bwd = _pair(kw, None, dy, None, x, u, v, log_a)
        ssd_triton.RAW_DOTS_BY_DEFAULT = raw
        try:
            timings[name] = _bench_pair(fwd, bwd)
        finally:
            ssd_triton.RAW_DOTS_BY_DEFAULT = True
    base = timings["unfused"]
    timings["speedup_over_unfused"] = {name: {k: base[k] / timings[name][k] for k in ("fwd_ms", "fwd_bwd_ms")}
                                       for name, _, _ in variants if name != "unfused"}
    return dict(checks=checks, timings=timings, walk_alone_ms=_walk_groups(u, x, log_a))


def _pair(kw: dict, h0, dy, dfinal, x, u, v, log_a):
    """(fwd, bwd) closures of one variant: `semiseparable_forward` / `_backward` with kw."""
    back = {k: val for k, val in kw.items() if k != "compact_states"}
    fwd = lambda: semiseparable_forward(x, u, v, log_a, h0, CHUNK, **kw)  # noqa: E731
    bwd = lambda res: semiseparable_backward(x, u, v, log_a, res[2], dy, dfinal, CHUNK, **back)  # noqa: E731
    return fwd, bwd


def _walk_groups(u, x, log_a) -> dict:
    """Median ms of the forward fused walk alone (bf16 states, autotuned) in one level and in groups of
    G chunks (fewer groups than two skipped)."""
    b, t, h, r = u.shape
    nc = triton.cdiv(t, CHUNK)
    states = torch.empty(b, h, nc, r, x.shape[-1], device="cuda", dtype=torch.bfloat16)
    out = {}
    for group in WALK_GROUPS:
        if group is not None and group * 2 > nc:
            continue
        walk = lambda group=group: fused_chunk_states(u, x, log_a, states, None, b, CHUNK, reverse=False,  # noqa: E731
                                                      group=group)
        walk()
        out["one_level" if group is None else f"G{group}"] = do_bench(walk, warmup=5, rep=30, return_mode="median")
    return out


def fused_walk(lengths: tuple[int, ...] = FUSED_T) -> dict:
    """The fused chunk-state walk at the mixer shapes (65536 tokens as B x T, H 16, P = R = 64)."""
    out = {}
    for t in lengths:
        b = FUSED_TOKENS // t
        key = f"B{b}-T{t}-H{FUSED_HEADS}-P{FUSED_DIM}-R{FUSED_DIM}-bf16"
        out[key] = _fused_walk_shape(b, t)
        print("fused_states", key, json.dumps(out[key]), flush=True)
        torch.cuda.empty_cache()
    return out


def step_kernel() -> dict:
    """One decode token, H 12, R 32, P 64, fp32 state: the kernel vs the torch reference step."""
    _, _, h, p, r = LONG
    out = {}
    for b in STEP_BATCHES:
        x, u, v, log_a, h0, _, _ = _problem(b, 1, h, p, r, torch.bfloat16, seed=b)
        args = (x[:, 0], u[:, 0], v[:, 0], log_a[:, 0])
        y, new = semiseparable_step_forward(*args, h0)
        y_ref, new_ref = semiseparable_step_reference(*(a.double() for a in args), h0.double())
        errs = dict(y=_rel(y, y_ref), state=_rel(new, new_ref))
        kernel_ms = do_bench(lambda args=args, h0=h0: semiseparable_step_forward(*args, h0), warmup=10, rep=30,
                             return_mode="median")
        ref_ms = do_bench(lambda args=args, h0=h0: semiseparable_step_reference(*args, h0), warmup=10, rep=30,
                          return_mode="median")
        out[f"B{b}"] = dict(rel_err=errs, ok=errs["y"] <= TOL["bf16"] and errs["state"] <= 1e-5,
                            kernel_ms=kernel_ms, torch_ms=ref_ms, speedup=ref_ms / kernel_ms)
    return out


def _sections(result: dict, parts: set[str], fused_t: tuple[int, ...] = FUSED_T) -> None:
    """The shape checks and timings ("shapes"), then the named sections, each written into `result`."""
    if "shapes" in parts:
        for shape in SHAPES:
            for dtype_name in DTYPES:
                key = "B{}-T{}-H{}-P{}-R{}-{}".format(*shape, dtype_name)
                result["checks"][key] = check(shape, dtype_name)
                worst = {n: max(r["rel_err"].values()) for n, r in result["checks"][key].items()}
                print(key, "worst rel err per config", json.dumps(worst), flush=True)
                torch.cuda.empty_cache()
        for shape in SHAPES:
            key = "B{}-T{}-H{}-P{}-R{}-bf16".format(*shape)
            result["timings"][key] = time_shape(shape)
            print(key, json.dumps(result["timings"][key]), flush=True)
    for name, fn in (("cu_seqlens", packed_documents), ("second_level", second_level), ("step", step_kernel),
                     ("fused_states", lambda: fused_walk(fused_t))):
        if name in parts:
            result[name] = fn()
            print(name, json.dumps(result[name]), flush=True)
            torch.cuda.empty_cache()


def _all_ok(result: dict) -> bool:
    oks = [r["ok"] for rows in result["checks"].values() for r in rows.values()]
    for part in ("cu_seqlens", "second_level"):
        oks += [r["ok"] for r in result.get(part, {}).get("checks", {}).values() if "ok" in r]
    oks += [r["ok"] for r in result.get("step", {}).values()]
    oks += [r["ok"] for shape in result.get("fused_states", {}).values() for r in shape["checks"].values()]
    return bool(oks) and all(oks)


PARTS = ("shapes", "cu_seqlens", "second_level", "step", "fused_states")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "ssd.json"))
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)} (default: all)")
    parser.add_argument("--fused-t", default=",".join(map(str, FUSED_T)),
                        help="fused_states part: comma list of T (65536 tokens as B x T each)")
    args = parser.parse_args()
    parts = {p for p in args.parts.split(",") if p}
    if not parts or parts - set(PARTS):
        parser.error(f"--parts takes a comma list of {', '.join(PARTS)}, got {args.parts!r}")
    start = time.time()
    result = dict(
        gpu=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        commit=git_commit(),
        tolerance=TOL,
        chunk=CHUNK,
        parts=sorted(parts),
        checks={},
        timings={},
    )
    fused_t = tuple(int(t) for t in args.fused_t.split(",") if t)
    result["fused_t"] = list(fused_t)
    _sections(result, parts, fused_t)
    result["all_ok"] = _all_ok(result)
    result["wall_s"] = time.time() - start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"all_ok={result['all_ok']} wall {result['wall_s']:.0f}s -> {args.out}")


if __name__ == "__main__":
    main()
