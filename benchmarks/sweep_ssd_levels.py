"""The SSD scan's forward + backward in one level and in two with groups of 8 to 64 chunks (the walk's
level and group policy, `fused_states.use_fused_two_levels` / `fused_group_size`, from data): median ms
(`do_bench`) at the mixer's shape (bf16, 65536 tokens, 16 heads, P = R = 64, bench_mixer's decays).

    PYTHONPATH=src python3 benchmarks/sweep_ssd_levels.py --t 8192,16384 --out $OUT/ssd_levels.json
"""

from __future__ import annotations

import torch
from triton.testing import do_bench

import muse_lm.ops.semiseparable.fused_states as fs
from muse_lm.ops.semiseparable.triton import semiseparable_backward, semiseparable_forward
from sweep_ssd_configs import CHUNK, mixer_inputs, run_lengths

GROUPS = (8, 16, 32, 64)


def _step(x, dy, u, v, log_a, two_levels: bool) -> None:
    _, _, states = semiseparable_forward(x, u, v, log_a, None, CHUNK, two_levels=two_levels)
    semiseparable_backward(x, u, v, log_a, states, dy, None, CHUNK, two_levels=two_levels)


def levels(t: int) -> dict:
    """{"one": ms, "two_G<g>": ms for each group size g} at B = 65536 // t."""
    args = mixer_inputs(t, torch.Generator(device="cuda").manual_seed(t))
    row = {"one": do_bench(lambda: _step(*args, False), rep=300)}
    policy = fs.fused_group_size
    try:
        for grp in GROUPS:
            fs.fused_group_size = lambda n, g=grp: g  # looked up at call time by the scan
            row[f"two_G{grp}"] = do_bench(lambda: _step(*args, True), rep=300)
    finally:
        fs.fused_group_size = policy
    print(f"T{t}", row, flush=True)
    return row


def main() -> None:
    run_lengths(__doc__.splitlines()[0], "ssd_levels.json", levels)


if __name__ == "__main__":
    main()
