"""Issue 5's numbers on one GPU, in one run: `lns_matmul` (accuracy of every mode and F, exact on
LNS pairs against fp32 `torch.matmul`), `log_matmul` (against the chunked torch reference and the
unsafe exp-matmul-log) and `LNSLinear` (against a bf16 `nn.Linear`, and held-out perplexity of a
trained model before and after `convert_to_lns`).

Each part lives in its own module (`lns_matmul_part.py`, `log_matmul_part.py`,
`lns_linear_part.py`, each runnable alone); this script runs them in order and writes one JSON,
rewritten after every part so a timeout keeps what finished.

Usage: PYTHONPATH=src python benchmarks/bench_lns.py [--parts lns_matmul,log_matmul,lns_linear]
       [--out benchmarks/results/lns.json]
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import torch
import triton

from muse_lm.provenance import git_commit

PARTS = ("lns_matmul", "log_matmul", "lns_linear")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "lns.json"))
    args = ap.parse_args()
    names = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(names) - set(PARTS))
    if unknown:
        ap.error(f"--parts: unknown {unknown}; choose from {', '.join(PARTS)}")
    if not torch.cuda.is_available():
        ap.error("bench_lns.py measures GPU kernels; run it on a machine with a CUDA device")
    sys.path.insert(0, str(Path(__file__).parent))  # the part modules sit beside this script
    device = torch.device("cuda", torch.cuda.current_device())
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "commit": git_commit(), "parts": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        start = time.time()
        module = importlib.import_module(f"{name}_part")
        report["parts"][name] = {**module.run(device), "wall_s": time.time() - start}
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"{name}: done in {time.time() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
