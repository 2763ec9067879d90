"""lns_matmul on one GPU: accuracy of every mode against float64, exact's speed against fp32
torch.matmul (tf32 off) on the same shape, datapath's throughput. Under 3 minutes on an H100.

- accuracy: signed N(0,1) data (M, K, N) = (512, 4096, 512): ||err|| / ||ref|| for exact,
  max_log and datapath at F = 4, 8, 12 (Triton) and F = 23 (the float64 torch reference on the CPU,
  on a 64 x 512 x 64 slice: it is a sequential Python-level loop over k).
- range: LNS pairs with log2 magnitudes uniform in [-250, 250] (products to 2^+-500, beyond
  float32 and near float64's limits), max |C - C_ref| / (largest term) per output.
- speed: exact on LNS pairs (sign int8, fp32 log) at 4096^3, pairs in -> pairs out (scaled fp32 GEMM),
  vs torch.matmul fp32 with tf32 off, `do_bench` medians; plus its error vs float64 there.
- datapath: Triton F = 8 at 1024^3, terms per second, reported plainly.

    PYTHONPATH=src python benchmarks/lns_matmul_part.py --out $OUT/lns_matmul_part.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def _rel(c: torch.Tensor, ref: torch.Tensor) -> float:
    return ((c.double() - ref).norm() / ref.norm()).item()


def _accuracy(device: torch.device) -> dict:
    from muse_lm.ops import lns_matmul

    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(512, 4096, device=device, generator=g)
    b = torch.randn(4096, 512, device=device, generator=g)
    ref = a.double() @ b.double()
    rows = {
        "exact": _rel(lns_matmul(a, b, mode="exact"), ref),
        "max_log": _rel(lns_matmul(a, b, mode="max_log"), ref),
    }
    for f in (4, 8, 12):
        rows[f"datapath_F{f}"] = _rel(lns_matmul(a, b, mode="datapath", frac_bits=f), ref)
    a_s, b_s = a[:64, :512].cpu(), b[:512, :64].cpu()
    ref_s = a_s.double() @ b_s.double()
    rows["datapath_F23_torch_64x512x64"] = _rel(lns_matmul(a_s, b_s, mode="datapath", frac_bits=23), ref_s)
    rows["exact_same_64x512x64"] = _rel(lns_matmul(a_s, b_s, mode="exact"), ref_s)
    return {"shape_MKN": [512, 4096, 512], "data": "signed N(0,1), fp32", "rel_fro_err_vs_float64": rows}


def _range(device: torch.device) -> dict:
    from muse_lm.ops import lns_matmul

    g = torch.Generator(device=device).manual_seed(1)

    def pair(shape):
        sign = torch.where(torch.rand(shape, device=device, generator=g) < 0.5, -1, 1).to(torch.int8)
        return sign, 500 * torch.rand(shape, device=device, generator=g) - 250

    a, b = pair((256, 1024)), pair((1024, 256))
    s, lg = lns_matmul(a, b)
    lt = a[1].double()[:, :, None] + b[1].double()[None]
    top = lt.amax(1)
    want = ((a[0].double()[:, :, None] * b[0].double()[None]) * torch.exp2(lt - top[:, None])).sum(1)
    got = s.double() * torch.exp2(lg.double() - top)
    return {
        "shape_MKN": [256, 1024, 256],
        "log2_range": [-250, 250],
        "max_abs_err_over_largest_term": (got - want).abs().max().item(),
        "result_log2_range": [lg.min().item(), lg.max().item()],
        "note": "float32 logs near |log2| = 500 hold 2^-16 absolute, i.e. ~1e-5 of the largest term",
    }


def _speed(device: torch.device) -> dict:
    from triton.testing import do_bench

    from muse_lm.ops import lns_matmul, to_lns

    n = 4096
    g = torch.Generator(device=device).manual_seed(2)
    a = torch.randn(n, n, device=device, generator=g)
    b = torch.randn(n, n, device=device, generator=g)
    pa, pb = to_lns(a), to_lns(b)
    torch.backends.cuda.matmul.allow_tf32 = False
    lns_matmul(pa, pb)  # autotune outside the timing
    t_lns = do_bench(lambda: lns_matmul(pa, pb), warmup=50, rep=300)
    t_mm = do_bench(lambda: torch.matmul(a, b), warmup=50, rep=300)
    from muse_lm.ops.lns.gemm import exact_scaled_gemm

    t_gemm = do_bench(lambda: exact_scaled_gemm(pa, pb), warmup=50, rep=300)
    s, lg = lns_matmul(pa, pb)
    ref = a.double() @ b.double()
    err = _rel(torch.where(s != 0, s.double() * torch.exp2(lg.double()), 0.0), ref)
    err_mm = _rel(torch.matmul(a, b), ref)
    return {
        "shape": [n, n, n],
        "exact_lns_pairs_ms": t_lns,
        "torch_matmul_fp32_tf32_off_ms": t_mm,
        "ratio": t_lns / t_mm,
        "scaled_gemm_only_ms": t_gemm,
        "note": "exact_lns_pairs_ms is the whole public call: operand checks, scaling, the fp32 GEMM, the "
                "float64 finish and range guard; scaled_gemm_only_ms is the scaling + GEMM alone",
        "exact_rel_fro_err_vs_float64": err,
        "torch_fp32_rel_fro_err_vs_float64": err_mm,
    }


def _datapath_speed(device: torch.device) -> dict:
    from triton.testing import do_bench

    from muse_lm.ops import lns_matmul, to_lns

    n = 1024
    g = torch.Generator(device=device).manual_seed(3)
    pa = to_lns(torch.randn(n, n, device=device, generator=g), 8)
    pb = to_lns(torch.randn(n, n, device=device, generator=g), 8)
    ms = do_bench(lambda: lns_matmul(pa, pb, mode="datapath", frac_bits=8), warmup=5, rep=50)
    return {"shape": [n, n, n], "frac_bits": 8, "ms": ms, "lns_additions_per_s": n**3 / (ms * 1e-3)}


def run(device) -> dict:
    """All the numbers above as one dict (device: a CUDA device or its name)."""
    import triton

    from muse_lm.provenance import git_commit

    device = torch.device(device)
    t0 = time.time()
    out = {
        "gpu": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": git_commit(),
        "accuracy": _accuracy(device),
        "range": _range(device),
        "speed_exact": _speed(device),
        "datapath_throughput": _datapath_speed(device),
    }
    out["wall_s"] = time.time() - t0
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lns_matmul_part.json"))
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    result = run(args.device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
