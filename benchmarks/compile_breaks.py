"""Graph breaks of a compiled MuseLM block and of the whole model on this device (a diagnostic):
every break costs host time and cuts Inductor's fusion, so the CUDA path should have none inside a
block. Prints each break's reason and where it happened.

    PYTHONPATH=src python benchmarks/compile_breaks.py --preset 8gb
"""

from __future__ import annotations

import argparse

import torch

from muse_lm.models import MuseLM
from muse_lm.presets import get_preset


def _report(name: str, explanation) -> None:
    print(f"== {name}: {explanation.graph_count} graphs, {explanation.graph_break_count} breaks")
    for b in explanation.break_reasons:
        where = b.user_stack[-1] if b.user_stack else "?"
        print(f"- {b.reason.splitlines()[0][:160]} at {where}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="8gb")
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = MuseLM(get_preset(args.preset).model).to(device)
    model.check_ids = False
    ids = torch.randint(0, model.config.vocab_size, (2, args.seq_len), device=device)
    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        x = model.embed(ids)
        _report("block", torch._dynamo.explain(model.blocks[0])(x))
        torch._dynamo.reset()
        _report("model (forward + loss)", torch._dynamo.explain(model.forward)(ids, ids))


if __name__ == "__main__":
    main()
