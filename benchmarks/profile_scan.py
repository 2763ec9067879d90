"""Where the SSD scan's time goes on one GPU: torch.profiler's CUDA time per kernel of the default
`semiseparable_forward` + `semiseparable_backward` (bf16, 65536 tokens, 16 heads, P = R = 64), by T.

    PYTHONPATH=src python3 benchmarks/profile_scan.py --t 2048,16384 --out $OUT/profile_scan.json
"""

from __future__ import annotations

import json
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from muse_lm.ops.semiseparable.triton import semiseparable_backward, semiseparable_forward
from sweep_ssd_configs import CHUNK, TOKENS, mixer_inputs, run_lengths

REPS = 20


def kernel_times(t: int) -> dict:
    """{kernel name: mean CUDA ms per forward+backward}, and their sum, at B = TOKENS // t."""
    b = TOKENS // t
    x, dy, u, v, log_a = mixer_inputs(t, torch.Generator(device="cuda").manual_seed(t))

    def step():
        _, _, states = semiseparable_forward(x, u, v, log_a, None, CHUNK)
        semiseparable_backward(x, u, v, log_a, states, dy, None, CHUNK)

    for _ in range(3):  # compile and autotune outside the profile
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(REPS):
            step()
        torch.cuda.synchronize()
    per = defaultdict(float)
    for evt in prof.key_averages():
        if evt.device_time_total > 0:
            per[evt.key] += evt.device_time_total / 1000 / REPS
    per = dict(sorted(per.items(), key=lambda kv: -kv[1]))
    return dict(B=b, T=t, kernels_ms=per, total_ms=sum(per.values()))


def _profile_row(t: int) -> dict:
    row = kernel_times(t)
    print(f"T{t}", json.dumps(row, indent=1), flush=True)
    return row


def main() -> None:
    run_lengths(__doc__.splitlines()[0], "profile_scan.json", _profile_row)


if __name__ == "__main__":
    main()
