"""HTT benchmark, part (3): the memory of embedding + head, dense vs HTT, at d_model 1024, V 50257.

For each of a dense tied table and an HTT (rank 16, 2 cores) it reports, in MiB:

- parameters, gradients and AdamW state (two fp32 moments), counted from the module;
- the activation peak of one training step of embedding + head on N tokens: lookup, the loss of
  the tied head on the looked-up rows (bf16 autocast, the model's real ops: `nn.functional.embedding`
  + fused `linear_cross_entropy` for the dense table, the fused TT lookup + TT head for HTT),
  backward; measured as `max_memory_allocated()` minus what was allocated before the step (the
  parameters and the hidden states), so gradients count in the peak as they would in training.

The counted part runs anywhere; the measured part needs CUDA (skipped with a note elsewhere).

    PYTHONPATH=src python benchmarks/bench_htt_memory.py [--tokens 16384] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from muse_lm.layers import HTTEmbedding
from muse_lm.layers.htt import DenseTiedEmbedding
from muse_lm.provenance import git_commit

V, D, RANK, CORES = 50257, 1024, 16, 2
MIB = 2**20




def counted(module: torch.nn.Module) -> dict:
    """Parameters, their fp32 gradients and AdamW's two fp32 moments, in MiB and as a count."""
    n = sum(p.numel() for p in module.parameters())
    return {"parameters": n, "params_mib": 4 * n / MIB, "grads_mib": 4 * n / MIB, "adamw_mib": 8 * n / MIB,
            "total_static_mib": 16 * n / MIB}


def measured_step(module: torch.nn.Module, tokens: int, seed: int = 0) -> dict:
    """Peak extra MiB and time of lookup + tied-head loss + backward on `tokens` tokens (CUDA)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    ids = torch.randint(0, V, (tokens,), device="cuda", generator=gen)
    targets = torch.randint(0, V, (tokens,), device="cuda", generator=gen)
    # The trunk's output: a leaf standing in for the network between embedding and head.
    trunk = torch.randn(tokens, D, device="cuda", generator=gen, dtype=torch.bfloat16).requires_grad_()

    def step():
        for p in module.parameters():
            p.grad = None
        trunk.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            x = module(ids)
            h = trunk + 0.0 * x  # keeps the lookup's backward in the graph
            loss = module.loss(h, targets)
        loss.backward()

    step()  # compile / autotune outside the measurement
    torch.cuda.synchronize()
    for p in module.parameters():
        p.grad = None
    trunk.grad = None
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    torch.cuda.synchronize()
    return {"peak_extra_mib": (torch.cuda.max_memory_allocated() - base) / MIB, "step_ms": start.elapsed_time(end)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "htt_memory.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    modules = {"dense": DenseTiedEmbedding(V, D), "htt": HTTEmbedding(V, D, rank=RANK, num_cores=CORES)}
    rows = {}
    for name, module in modules.items():
        row = counted(module)
        if torch.cuda.is_available():
            row.update(measured_step(module.cuda(), args.tokens))
        rows[name] = row
        print(name, {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    result = {
        "shape": {"vocab": V, "d_model": D, "rank": RANK, "cores": CORES, "tokens": args.tokens,
                  "vocab_factors": list(modules["htt"].vocab_factors), "dim_factors": list(modules["htt"].dim_factors)},
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "note": None if torch.cuda.is_available() else "no CUDA: activation peaks not measured",
        "torch": torch.__version__,
        "commit": git_commit(),
        "rows": rows,
        "param_ratio": rows["dense"]["parameters"] / rows["htt"]["parameters"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
