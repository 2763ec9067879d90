"""Peak training memory of every GPU preset at full size (issue 7): real Trainer steps (activation
checkpointing, micro-batch, accumulation and dtype as the preset says), peak = max_memory_reserved +
CUDA context, checked against 0.9 x the budget and against `muse estimate` (within 10%); the
inference preset measured on generation.

Usage: PYTHONPATH=src python benchmarks/validate_memory.py [--quick] [--max-seconds 540] [--out DIR]
Same as `muse bench --only memory`; writes DIR/memory.json (rewritten after every preset),
DIR/memory.png and DIR/report.md.
"""

import sys

from muse_lm.bench_quality import script_main

if __name__ == "__main__":
    sys.exit(script_main("memory"))
