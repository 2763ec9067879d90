"""The AR-SSM layer's causal depthwise conv + SiLU, forward + backward, on one GPU: the Triton op
against what the layer ran before (GPU kernel time) (K shifted multiply-adds in the activations' dtype, compiled by
torch.compile, and the same eagerly), in the same run, with the copy bandwidth measured beside them.

Shape: the 8gb preset's training step (16 x 1024 tokens, D 768, K 4, bf16 activations, fp32 weights
under autocast). Bytes that must move: forward x read and y written; backward x and grad_y read,
grad_x written (grad_w and grad_bias are a few KB).

Usage: PYTHONPATH=src python benchmarks/bench_conv.py --out benchmarks/results/conv.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

from muse_lm.ops import causal_conv1d
from muse_lm.provenance import git_commit


def shifted_adds(x, weight, bias):
    """The layer's conv before the Triton op: shifted multiply-adds in x's dtype."""
    K = weight.shape[1]
    xp = torch.cat([x.new_zeros(x.shape[0], K - 1, x.shape[2]), x], dim=1)
    w, T = weight.to(x.dtype), x.shape[1]
    y = bias.to(x.dtype) + xp[:, :T] * w[:, 0]
    for j in range(1, K):
        y = y + xp[:, j : j + T] * w[:, j]
    return F.silu(y)


def _ms(fn, n: int = 50) -> float:
    """GPU kernel time of one call, ms (torch.profiler, summed over its kernels, mean of n calls). A
    pass of a few tens of microseconds is launch-bound when timed by wall clock (autograd's host work
    then dominates); inside a CUDA-graphed training step only the kernels' time counts."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    kernels = [ev for ev in prof.key_averages() if ev.device_type == DeviceType.CUDA]  # not the host ops
    total_us = sum(ev.self_device_time_total for ev in kernels)
    return total_us / n / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="16x1024x768x4", help="BxTxDxK")
    ap.add_argument("--out", default="benchmarks/results/conv.json")
    args = ap.parse_args()
    B, T, D, K = (int(v) for v in args.shape.split("x"))
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, T, D, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
    weight = (torch.randn(D, K, device="cuda", generator=g) / K**0.5).requires_grad_()
    bias = torch.randn(D, device="cuda", generator=g).requires_grad_()
    grad = torch.randn_like(x)
    variants = {
        "triton": lambda: causal_conv1d(x, weight, bias),
        "compiled_shifted_adds": torch.compile(lambda: shifted_adds(x, weight, bias)),
        "eager_shifted_adds": lambda: shifted_adds(x, weight, bias),
    }
    ref = causal_conv1d(x.float(), weight, bias, impl="torch")
    rows = {}
    for name, fn in variants.items():
        def step(fn=fn):
            x.grad = weight.grad = bias.grad = None
            fn().backward(grad)

        step()
        err = ((fn().float() - ref).abs().max() / ref.abs().max()).item()
        rows[name] = {"fwd_ms": _ms(fn), "fwd_bwd_ms": _ms(step), "rel_err_vs_fp32": err}
    nbytes = x.numel() * x.element_size()
    src = torch.empty(64 * 2**20, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() / float(do_bench(lambda: dst.copy_(src), rep=100, return_mode="median")) / 1e6
    for row in rows.values():
        row["fwd_gbs"] = 2 * nbytes / row["fwd_ms"] / 1e6
        row["fwd_bwd_gbs"] = 5 * nbytes / row["fwd_bwd_ms"] / 1e6
        row["fwd_bwd_of_copy_bandwidth"] = row["fwd_bwd_gbs"] / copy_gbs
    base = rows["compiled_shifted_adds"]["fwd_bwd_ms"]
    result = {
        "what": __doc__.splitlines()[0],
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": git_commit(),
        "shape": {"B": B, "T": T, "D": D, "K": K, "x": "bf16", "weight": "fp32"},
        "copy_gbs": copy_gbs,
        "median_ms": rows,
        "triton_over_compiled_fwd_bwd": rows["triton"]["fwd_bwd_ms"] / base,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for name, row in rows.items():
        print(f"{name:24s} fwd {row['fwd_ms']:.4f} ms  fwd+bwd {row['fwd_bwd_ms']:.4f} ms  "
              f"({100 * row['fwd_bwd_of_copy_bandwidth']:.0f}% of copy)  err {row['rel_err_vs_fp32']:.1e}")
    print(f"triton / compiled: {result['triton_over_compiled_fwd_bwd']:.2f}x; wrote {args.out}")


if __name__ == "__main__":
    main()
