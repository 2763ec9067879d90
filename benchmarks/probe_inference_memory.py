"""Where the inference preset's generation memory goes, phase by phase, in a fresh process.

`validate_memory.py` measured the inference preset at 7.22 GiB (limit 7.2) on an H100, of which only
1.10 GiB was the caching allocator's peak: 6.12 GiB was memory held outside it (the training presets
before it in the same process left 0.74). This script builds the preset (8-bit LNS FFN weights, as
`muse generate` loads it) and prints, after each phase, the memory outside the allocator
(total - free - reserved), the allocator's peak and the phase's wall time:

  build -> prefill only (0 new tokens) -> eager decode (cuda_graph=False) -> graphed decode.

Usage: PYTHONPATH=src python benchmarks/probe_inference_memory.py [--new-tokens 8] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from muse_lm import MuseLM, get_preset
from muse_lm.layers import convert_to_lns
from muse_lm.provenance import git_commit

GIB = 2**30


def _state(t0: float) -> dict:
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return {"outside_allocator_gib": (total - free - torch.cuda.memory_reserved()) / GIB,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB, "wall_s": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    preset = get_preset("inference")
    torch.manual_seed(0)
    phases = {}
    t0 = time.perf_counter()
    torch.cuda.init()
    phases["cuda_init"] = _state(t0)
    t0 = time.perf_counter()
    model = MuseLM(preset.model)
    if preset.train.lns:
        convert_to_lns(model, "ffn")
    model = model.cuda().eval()
    phases["build"] = _state(t0)
    prompt = torch.randint(0, preset.model.vocab_size, (1, preset.train.seq_len), device="cuda")
    for name, n, graph in (("prefill", 0, False), ("prefill_again", 0, False), ("eager_decode", args.new_tokens, False),
                           ("graphed_decode", args.new_tokens, True), ("graphed_again", args.new_tokens, True)):
        t0 = time.perf_counter()
        model.generate(prompt, n, seed=0, cuda_graph=graph)
        phases[name] = _state(t0)
        print(name, json.dumps(phases[name]), flush=True)
    record = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": git_commit(),
              "preset": "inference", "lns": preset.train.lns, "new_tokens": args.new_tokens, "phases": phases}
    print(json.dumps(record, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
