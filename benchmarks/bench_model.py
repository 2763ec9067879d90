"""Training speed and memory against sequence length (issue 7): MuseLM against a standard
TransformerLM (SDPA, plain logits + F.cross_entropy) and a strong one (SDPA + the faster of
cut-cross-entropy and our fused linear_cross_entropy), matched on non-embedding parameters, plus the
strong one at MuseLM's total parameters; T in 1024..16384 at 16384 tokens per step.

Usage: PYTHONPATH=src python benchmarks/bench_model.py [--quick] [--preset 8gb] [--compile auto|on|off]
       [--max-seconds 540] [--set KEY=VALUE ...] [--out DIR]
Same as `muse bench --only model`; writes DIR/model.json (rewritten after every point, so a timeout
keeps what was measured), DIR/model.png and DIR/report.md.
"""

import sys

from muse_lm.bench_quality import script_main

if __name__ == "__main__":
    sys.exit(script_main("model"))
