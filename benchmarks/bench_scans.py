"""Issue 4's numbers on one GPU, every competitor in the same run.

1. `semiseparable_scan` forward+backward against flash-linear-attention's `chunk_linear_attn`
   (normalize=False) at equal state size: ours holds R x P = 32 x 64 per head, FLA's K x V is run as
   64 x 32 (FLA 0.6.0's backward hit an illegal memory access with K = 32, V = 64 on an H100 with
   triton 3.6; K = 64 is its well-trodden size), T = 2048 and 8192, same tokens per call. This part
   runs last: a crash inside a competitor's kernel poisons the CUDA context.
2. The same scan against SDPA causal attention (head dim P) at T = 8192.
3. Time per token of the scan from T = 1024 to 65536 at a fixed number of tokens per call.
4. `linear_recurrence` (fp32, 64K channels x T 8192) and `bk_resolvent` bandwidth as a fraction of
   the measured copy bandwidth (bytes that must move: inputs read once, outputs written once).

Usage: PYTHONPATH=src python benchmarks/bench_scans.py --out benchmarks/results/scans.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from muse_lm.ops import bk_resolvent, linear_recurrence, semiseparable_scan
from muse_lm.provenance import git_commit

H, P, R = 12, 64, 32


def _ms(fn) -> float:
    return float(do_bench(fn, warmup=10, rep=50, return_mode="median"))


def _fwd_bwd(fn, inputs: list[torch.Tensor]):
    """A closure running fn(*inputs) and its backward with a fixed upstream gradient."""
    out = fn(*inputs)
    grad = torch.randn_like(out)

    def step():
        for t in inputs:
            t.grad = None
        fn(*inputs).backward(grad)

    return step


def _ssd_inputs(b: int, t: int, dtype=torch.bfloat16) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(t)
    x = torch.randn(b, t, H, P, device="cuda", generator=g, dtype=dtype)
    u = torch.randn(b, t, H, R, device="cuda", generator=g, dtype=dtype) * R**-0.5
    v = torch.randn(b, t, H, R, device="cuda", generator=g, dtype=dtype) * R**-0.5
    log_a = -F.softplus(torch.randn(b, t, H, device="cuda", generator=g)) * 0.2
    return [z.requires_grad_() for z in (x, u, v, log_a)]


def ours(x, u, v, log_a):
    return semiseparable_scan(x, u, v, log_a, impl="triton")[0]


def fla_competitors() -> tuple[dict, str | None]:
    """FLA's kernels in our argument order (x, u, v, log_a), or ({}, why) when FLA is not installed."""
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except ImportError as err:  # a competitor that is missing is reported, never replaced
        return {}, f"flash-linear-attention not importable: {err}"

    def linear_attn(q, k, v):
        return chunk_linear_attn(q, k, v, scale=1.0, normalize=False)[0]

    return {"fla_chunk_linear_attn": linear_attn}, None


def _fla_inputs(b: int, t: int) -> list[torch.Tensor]:
    """q, k [B,T,H,P] and v [B,T,H,R]: state P x R per head, the size of ours."""
    g = torch.Generator(device="cuda").manual_seed(t + 1)
    q, k = (torch.randn(b, t, H, P, device="cuda", generator=g, dtype=torch.bfloat16) * P**-0.5 for _ in range(2))
    v = torch.randn(b, t, H, R, device="cuda", generator=g, dtype=torch.bfloat16)
    return [z.requires_grad_() for z in (q, k, v)]


def sdpa(b: int, t: int):
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(b, H, t, P, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
               for _ in range(3))
    return _fwd_bwd(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), [q, k, v])


def part_versus(tokens: int, results: dict) -> None:
    fla, why = fla_competitors()
    results["fla"] = why or importlib.metadata.version("fla-core")
    for t in (2048, 8192):
        b = max(1, tokens // t)
        inputs = _ssd_inputs(b, t)
        row = {"B": b, "T": t, "ours_ms": _ms(_fwd_bwd(ours, inputs))}
        for name, fn in fla.items():
            row[f"{name}_ms"] = _ms(_fwd_bwd(fn, _fla_inputs(b, t)))
            row[f"ours_over_{name}"] = row["ours_ms"] / row[f"{name}_ms"]
        if t == 8192:
            row["sdpa_causal_ms"] = _ms(sdpa(b, t))
            row["ours_over_sdpa"] = row["ours_ms"] / row["sdpa_causal_ms"]
        results[f"T{t}"] = row
        print(row, flush=True)


def part_per_token(tokens: int, results: dict) -> None:
    rows = {}
    for t in (1024, 2048, 4096, 8192, 16384, 32768, 65536):
        b = max(1, tokens // t)
        ms = _ms(_fwd_bwd(ours, _ssd_inputs(b, t)))
        rows[str(t)] = {"B": b, "fwd_bwd_ms": ms, "ns_per_token": 1e6 * ms / (b * t)}
        print(t, rows[str(t)], flush=True)
    per_token = [r["ns_per_token"] for r in rows.values()]
    results["per_token"] = rows
    results["per_token_spread"] = max(per_token) / min(per_token) - 1


def copy_gb_s(n_bytes: int) -> float:
    src = torch.empty(n_bytes // 4, device="cuda")
    dst = torch.empty_like(src)
    return 2 * n_bytes / _ms(lambda: dst.copy_(src)) / 1e6


def linrec_bandwidth(copy: float) -> dict:
    a = torch.rand(1, 8192, 65536, device="cuda") * 0.5 + 0.5
    b = torch.randn_like(a)
    ms = _ms(lambda: linear_recurrence(a, b, impl="triton"))
    moved = 3 * a.numel() * 4  # read a and b, write h
    return {"shape": list(a.shape), "ms": ms, "gb_s": moved / ms / 1e6, "copy_gb_s": copy,
            "fraction_of_copy": moved / ms / 1e6 / copy}


def part_bandwidth(results: dict) -> None:
    copy = copy_gb_s(8192 * 65536 * 4)
    results["linear_recurrence"] = linrec_bandwidth(copy)
    v = torch.randn(16, 8192, 512, device="cuda")
    z = torch.full((512,), complex(0.1, 0.5), device="cuda", dtype=torch.complex64)
    ms = _ms(lambda: bk_resolvent(v, z, impl="triton"))
    moved = v.numel() * (4 + 8)  # read fp32 v, write complex64 G
    results["bk_resolvent"] = {"shape": list(v.shape), "ms": ms, "gb_s": moved / ms / 1e6, "copy_gb_s": copy,
                               "fraction_of_copy": moved / ms / 1e6 / copy}
    print(results["linear_recurrence"], results["bk_resolvent"], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "scans.json"))
    ap.add_argument("--tokens", type=int, default=131072,
                    help="tokens per call (B = tokens // T); at 32K a call is ~1 ms and partly launch-bound")
    ap.add_argument("--parts", default="per_token,bandwidth,versus")
    args = ap.parse_args()
    start = time.time()
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "commit": git_commit(), "shape": {"H": H, "P": P, "R": R, "dtype": "bfloat16"},
               "tokens_per_call": args.tokens}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    parts = {"versus": lambda: part_versus(args.tokens, results),
             "per_token": lambda: part_per_token(args.tokens, results),
             "bandwidth": lambda: part_bandwidth(results)}
    for name in args.parts.split(","):
        parts[name]()
        results["wall_s"] = time.time() - start
        out.write_text(json.dumps(results, indent=1) + "\n")  # partial results survive a timeout


if __name__ == "__main__":
    main()
