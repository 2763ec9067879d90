"""Dense fused linear cross-entropy on a GPU: correctness, then fwd+bwd time and peak memory.

1. Correctness of every usable config on a few shapes vs the blocked reference (rel. Frobenius
   error of the loss, dh and dW).
2. fwd+bwd at N 16384, V 50257, D 1024, bf16 (do_bench medians, peak extra memory) of: ours
   (default config), the torch reference, naive logits + F.cross_entropy, cut-cross-entropy
   (default and filter_eps=None) and Liger's fused linear CE, where installed.
3. Autotune sweep: every usable config's fwd, bwd and fwd+bwd time.

Inputs are realistic: h ~ N(0, 1), W ~ N(0, 3 / sqrt(D)) (logit std ~3: a peaked softmax),
uniform targets. Peak extra memory = torch.cuda.max_memory_allocated() after
reset_peak_memory_stats(), minus the inputs' bytes; gradients are freed before each step, so they
count in the peak, as they do for every competitor. "allocated_before_mib" is what was already
held (beyond the inputs) when the step began, e.g. cuBLAS workspaces from earlier matmuls: it is
in every provider's peak. "model_peak_extra_mib" = `peak_memory_bytes` + that, for ours.

    PYTHONPATH=src python3 benchmarks/check_lce_gpu.py --out $OUT/lce.json [--quick]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from muse_lm.ops.tt_cross_entropy import triton_dense
from muse_lm.ops.tt_cross_entropy.reference import linear_cross_entropy_ref
from muse_lm.provenance import git_commit

N, V, D = 16384, 50257, 1024
CHECK_SHAPES = [(4099, 50257, 1024, torch.bfloat16), (1, 50257, 1024, torch.bfloat16), (777, 5003, 264, torch.float32)]
# Failures we record per provider / config instead of aborting the run (messages are kept).
_RUN_ERRORS = (RuntimeError, ValueError, triton.runtime.errors.OutOfResources, triton.compiler.errors.CompilationError)




def _inputs(n: int, v: int, d: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(n, d, device="cuda", generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(v, d, device="cuda", generator=gen) * 3 / d**0.5).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,), device="cuda", generator=gen)
    return h, w, t


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _ours(config=None) -> Callable:
    def fn(h, w, t):
        return triton_dense.linear_cross_entropy_triton(
            h, w, t, ignore_index=-100, reduction="mean", z_loss=0.0, config=config
        )

    return fn


def _naive(h, w, t):
    return F.cross_entropy((h @ w.T).float(), t)


def _reference(h, w, t):
    return linear_cross_entropy_ref(h, w, t)


def _competitors() -> dict[str, Callable | str]:
    """name -> loss fn(h, w, t), or the import error as a string ("unavailable: ...")."""
    out: dict[str, Callable | str] = {}
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        out["cce_default"] = lambda h, w, t: cce(h, w, t)
        out["cce_filter_eps_none"] = lambda h, w, t: cce(h, w, t, filter_eps=None)
    except ImportError as err:
        out["cce_default"] = out["cce_filter_eps_none"] = f"unavailable: {err!r}"
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        out["liger"] = lambda h, w, t: liger(w, h, t)  # Liger takes (lin_weight, input, target)
    except ImportError as err:
        out["liger"] = f"unavailable: {err!r}"
    return out


def _measure(fn: Callable, h, w, t) -> dict:
    """Median ms of fwd, fwd+bwd, and the peak extra memory of one fwd+bwd step."""

    def step():
        h.grad = w.grad = None
        fn(h, w, t).backward()

    with torch.no_grad():
        fwd = do_bench(lambda: fn(h, w, t), warmup=25, rep=200, return_mode="median")
    fwd_bwd = do_bench(step, warmup=25, rep=300, return_mode="median")
    h.grad = w.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    inputs = sum(x.numel() * x.element_size() for x in (h, w, t))
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() - inputs
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - inputs
    h.grad = w.grad = None
    return {
        "fwd_ms": fwd,
        "fwd_bwd_ms": fwd_bwd,
        "peak_extra_mib": peak / 2**20,
        "allocated_before_mib": before / 2**20,
    }


def _check(configs_of: Callable) -> list[dict]:
    rows = []
    for n, v, d, dtype in CHECK_SHAPES:
        h, w, t = _inputs(n, v, d, dtype, seed=n)
        t[::11] = -100
        ref = linear_cross_entropy_ref(h, w, t, z_loss=1e-4)
        want = torch.autograd.grad(ref, (h, w))
        for cfg in (None, *configs_of(dtype)):
            row = {"shape": [n, v, d], "dtype": str(dtype), "config": str(cfg or "default")}
            try:
                loss = triton_dense.linear_cross_entropy_triton(
                    h, w, t, ignore_index=-100, reduction="mean", z_loss=1e-4, config=cfg
                )
                got = torch.autograd.grad(loss, (h, w))
                row |= {"loss": _rel(loss, ref), "dh": _rel(got[0], want[0]), "dw": _rel(got[1], want[1])}
                tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
                row["ok"] = all(row[k] <= tol for k in ("loss", "dh", "dw"))
            except _RUN_ERRORS as err:
                row |= {"ok": False, "error": repr(err)[:300]}
            rows.append(row)
            print(row, flush=True)
    return rows


def _time_config(cfg, h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> dict:
    """fwd and bwd launcher medians of one config (inputs detached: launchers only)."""
    fwd = do_bench(lambda: triton_dense.lce_forward(h, w, t, cfg), warmup=10, rep=100, return_mode="median")
    lse, _ = triton_dense.lce_forward(h, w, t, cfg)
    grad = torch.full_like(lse, 1.0 / t.numel())
    bwd = do_bench(
        lambda: triton_dense.lce_backward(h, w, t, lse, grad, 0.0, cfg), warmup=10, rep=100, return_mode="median"
    )
    return {"fwd_ms": fwd, "bwd_ms": bwd, "fwd_bwd_ms": fwd + bwd}


def _sweep(h, w, t) -> dict:
    out = {}
    for cfg in triton_dense.usable_configs(h.device, dot_f32=False):
        name = f"bm{cfg.block_m}_bv{cfg.block_v}_bk{cfg.block_k}_w{cfg.num_warps}_s{cfg.num_stages}_g{cfg.group_m}"
        try:
            out[name] = _time_config(cfg, h.detach(), w.detach(), t)
        except _RUN_ERRORS as err:
            out[name] = {"error": repr(err)[:300]}
        print(name, out[name], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "lce.json"))
    parser.add_argument("--quick", action="store_true", help="skip the correctness pass and the sweep")
    args = parser.parse_args()
    torch.manual_seed(0)

    def configs_of(dtype):
        return triton_dense.usable_configs(torch.device("cuda"), dot_f32=dtype != torch.bfloat16)

    check = [] if args.quick else _check(configs_of)
    h, w, t = _inputs(N, V, D, torch.bfloat16)
    with torch.no_grad():
        logit_std = (h[:256] @ w.T).float().std().item()
    providers: dict[str, Callable | str] = {"muse_triton": _ours(), "torch_reference": _reference, "naive": _naive}
    providers |= _competitors()
    timing = {}
    for name, fn in providers.items():
        if isinstance(fn, str):
            timing[name] = {"error": fn}
        else:
            try:
                timing[name] = _measure(fn, h, w, t)
            except _RUN_ERRORS as err:
                timing[name] = {"error": repr(err)[:300]}
        print(name, timing[name], flush=True)
    if "allocated_before_mib" in timing["muse_triton"]:
        cfg = triton_dense.default_config(N, False, configs_of(torch.bfloat16))
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        model = triton_dense.peak_memory_bytes(N, V, D, torch.bfloat16, cfg, num_sms=sms) / 2**20
        timing["muse_triton"]["model_peak_extra_mib"] = model + timing["muse_triton"]["allocated_before_mib"]
    sweep = {} if args.quick else _sweep(h, w, t)
    ratios = {}
    for other in ("cce_default", "cce_filter_eps_none", "liger", "naive"):
        if "fwd_bwd_ms" in timing.get(other, {}) and "fwd_bwd_ms" in timing["muse_triton"]:
            ratios[f"time_over_{other}"] = timing["muse_triton"]["fwd_bwd_ms"] / timing[other]["fwd_bwd_ms"]
            ratios[f"memory_over_{other}"] = timing["muse_triton"]["peak_extra_mib"] / timing[other]["peak_extra_mib"]
    report = {
        "part": "dense_linear_cross_entropy",
        "gpu": torch.cuda.get_device_name(),
        "max_shared_mem": triton_dense._max_shared_mem(torch.cuda.current_device()),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": git_commit(),
        "shape": {"tokens": N, "vocab": V, "d_model": D, "dtype": "bfloat16", "logit_std": logit_std},
        "default_config": str(triton_dense.default_config(N, False, configs_of(torch.bfloat16))),
        "correctness": check,
        "all_correct": all(row["ok"] for row in check),
        "timing": timing,
        "ratios": ratios,
        "target": "time and peak memory <= 1.2x cut-cross-entropy",
        "config_sweep": sweep,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("gpu", "torch", "triton", "commit", "all_correct", "ratios")}, indent=2))


if __name__ == "__main__":
    main()
