"""Fused TT head + cross-entropy on one GPU: correctness on a few shapes, then timing and memory.

Shape: N 16384 tokens, V 50257 = 197 x 256 (+175 padding rows, 0.35%), D 1024 = 32 x 32, TT rank
16, bf16. For every declared config that fits the card: fwd+bwd median ms (`do_bench`), the
forward alone, and the peak memory above the inputs; the deterministic mode for the default
config; and the dense naive head (logits + F.cross_entropy, fwd+bwd) in the same run. Writes
one JSON object with the GPU name, versions and git commit.

    PYTHONPATH=src python3 benchmarks/check_tt_head_gpu.py --out $OUT/tt_head.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.runtime.errors import OutOfResources
from triton.testing import do_bench

from muse_lm.ops.tt_cross_entropy.reference import tt_linear_cross_entropy_ref
from muse_lm.ops.tt_cross_entropy.triton_tt import (
    TTHeadConfig,
    tt_head_forward,
    tt_linear_cross_entropy_triton,
    usable_configs,
)
from muse_lm.provenance import git_commit

N, V, V1, V2, D1, D2, R = 16384, 50257, 197, 256, 32, 32, 16
# (V1, V2, D1, D2, R, vocab, N, dtype) checked against the fp64 reference before timing.
CHECKS = [
    (7, 5, 3, 5, 3, 31, 777, torch.float32),
    (37, 45, 8, 12, 6, 1650, 1, torch.bfloat16),
    (197, 256, 32, 32, 16, 50257, 1025, torch.bfloat16),
    (197, 256, 32, 32, 16, 50257, 513, torch.float32),
]




def _problem(v1, v2, d1, d2, r, vocab, n, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    g1 = (torch.randn(v1, 1, d1, r, device="cuda", generator=gen) / r**0.25).to(dtype).requires_grad_()
    g2 = (torch.randn(v2, r, d2, 1, device="cuda", generator=gen) / (r**0.25 * d2**0.5)).to(dtype).requires_grad_()
    h = (torch.randn(n, d1 * d2, device="cuda", generator=gen) / d1**0.5).to(dtype).requires_grad_()
    t = torch.randint(0, vocab, (n,), device="cuda", generator=gen)
    t[::13] = -100
    return h, [g1, g2], t


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check(cfg: TTHeadConfig) -> list[dict]:
    rows = []
    for *shape, n, dtype in CHECKS:
        h, cores, t = _problem(*shape, n, dtype)
        kw = dict(vocab_size=shape[5], ignore_index=-100, reduction="mean", z_loss=1e-3)
        got = tt_linear_cross_entropy_triton(h, cores, t, **kw, config=cfg)
        grads = torch.autograd.grad(got, [h, *cores])
        ref_in = [x.detach().double().requires_grad_() for x in (h, *cores)]
        ref = tt_linear_cross_entropy_ref(ref_in[0], ref_in[1:], t, **kw)
        ref_grads = torch.autograd.grad(ref, ref_in)
        errs = [_rel(got, ref)] + [_rel(a, b) for a, b in zip(grads, ref_grads)]
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        rows.append(
            dict(shape=shape, n=n, dtype=str(dtype), rel_err_loss_h_g1_g2=errs, ok=all(e <= tol for e in errs))
        )
    return rows


def _step(h, cores, t, cfg, deterministic=False):
    def step():
        for p in (h, *cores):
            p.grad = None
        loss = tt_linear_cross_entropy_triton(
            h, cores, t, vocab_size=V, ignore_index=-100, reduction="mean", z_loss=0.0, config=cfg,
            deterministic=deterministic,
        )
        loss.backward()

    return step


def _peak_extra_mb(step) -> float:
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def time_tt(cfg: TTHeadConfig, deterministic=False) -> dict:
    h, cores, t = _problem(V1, V2, D1, D2, R, V, N, torch.bfloat16)
    step = _step(h, cores, t, cfg, deterministic)
    hw, c1, c2 = (x.detach().contiguous() for x in (h, *cores))
    fwd = do_bench(lambda: tt_head_forward(hw, c1, c2, t, V, cfg), warmup=10, rep=50, return_mode="median")
    total = do_bench(step, warmup=10, rep=100, return_mode="median")
    return dict(config=repr(cfg), deterministic=deterministic, fwd_ms=fwd, fwd_bwd_ms=total,
                peak_extra_mb=_peak_extra_mb(step))


def time_dense() -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(V, D1 * D2, device="cuda", generator=gen) * 0.02).bfloat16().requires_grad_()
    h = torch.randn(N, D1 * D2, device="cuda", generator=gen).bfloat16().requires_grad_()
    t = torch.randint(0, V, (N,), device="cuda", generator=gen)

    def step():
        h.grad = w.grad = None
        F.cross_entropy((h @ w.T).float(), t, ignore_index=-100).backward()

    return dict(name="dense naive (bf16 logits -> fp32 F.cross_entropy)",
                fwd_bwd_ms=do_bench(step, warmup=10, rep=100, return_mode="median"),
                peak_extra_mb=_peak_extra_mb(step))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "tt_head.json"))
    args = parser.parse_args()
    start = time.time()
    configs = usable_configs(torch.device("cuda"), D1, D2, V2)
    result = dict(
        gpu=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        commit=git_commit(),
        shape=dict(N=N, V=V, factors=[V1, V2], D=[D1, D2], rank=R, dtype="bfloat16",
                   padding_rows=V1 * V2 - V),
        checks={},
        timings=[],
    )
    fitting = []
    for cfg in configs:
        try:
            result["checks"][repr(cfg)] = check(cfg)
        except OutOfResources as err:  # our shared-memory estimate let through a config that does not fit
            result["checks"][repr(cfg)] = f"out of resources: {err}"
            print(repr(cfg), "OUT OF RESOURCES", err, flush=True)
            continue
        fitting.append(cfg)
        print(repr(cfg), "ok" if all(r["ok"] for r in result["checks"][repr(cfg)]) else "MISMATCH", flush=True)
    configs = fitting
    result["dense"] = time_dense()
    print(result["dense"], flush=True)
    for cfg in configs:
        result["timings"].append(time_tt(cfg))
        print(result["timings"][-1], flush=True)
    result["timings"].append(time_tt(configs[0], deterministic=True))
    print(result["timings"][-1], flush=True)
    result["wall_s"] = time.time() - start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out} in {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
