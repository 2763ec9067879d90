"""Ablations of MuseLM at equal tokens (issue 10): the full model against bk_heads=0 (no BK features),
gate_mode=fixed (no rank gates) and embedding=dense (dense tied embedding + head instead of HTT):
held-out loss, training tokens/s and peak memory.

Usage: PYTHONPATH=src python benchmarks/ablate.py [--variants full,no_bk,...] [--tokens N] [--max-seconds S]
       [--compile auto|on|off] [--set KEY=VALUE ...] [--out DIR]
Same as `muse bench --only ablate`; writes DIR/ablate.json + DIR/ablate.png.
"""

import sys

from muse_lm.bench_quality import script_main

if __name__ == "__main__":
    sys.exit(script_main("ablate"))
